"""Preflight: check every triple of every dataset before anything is encoded, and report it.

Errors (the run stops): missing or duplicate pairs, unreadable/truncated/empty files, images too small or too
huge to use, bad metadata. Warnings (the run goes on): control/target aspect mismatch past a tolerance, empty
captions, images that would need more upscaling than allowed (those triples are skipped). Notes: files that are
normalised on load (CMYK, 16-bit, palette, alpha, EXIF rotation).
"""

from __future__ import annotations

import math
import os
import textwrap
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from kontext_lora.atomic import atomic_save_image
from kontext_lora.config import DataConfig, DatasetConfig
from kontext_lora.data.buckets import bucket_list, nearest_bucket, upscale_factor
from kontext_lora.data.sources import discover_dataset
from kontext_lora.data.triples import DataError, ImageRef, Triple, load_image, open_source

MIN_SIDE = 16  # one Kontext token is 16 x 16 pixels
_EXIF_ORIENTATION = 0x0112
_MODE_NOTES = {
    "CMYK": "CMYK converted to RGB",
    "P": "palette image converted to RGB",
    "RGBA": "alpha composited over white",
    "LA": "alpha composited over white",
    "PA": "alpha composited over white",
    "I;16": "16-bit image scaled to 8 bits",
    "I;16B": "16-bit image scaled to 8 bits",
    "I;16L": "16-bit image scaled to 8 bits",
    "I": "32-bit image scaled to 8 bits",
    "F": "float image scaled to 8 bits",
}


@dataclass(frozen=True)
class Issue:
    level: str  # "error", "warning" or "note"
    dataset: int
    file: str
    message: str


@dataclass
class PreflightReport:
    """What preflight found: usable triples per dataset, image sizes, and every issue."""

    paths: list[str]
    found: list[int] = field(default_factory=list)  # triples discovered per dataset
    usable: list[list[Triple]] = field(default_factory=list)  # passed and not skipped, per dataset
    sizes: dict[ImageRef, tuple[int, int]] = field(default_factory=dict)  # (width, height) after EXIF rotation
    issues: list[Issue] = field(default_factory=list)

    def of_level(self, level: str) -> list[Issue]:
        return [issue for issue in self.issues if issue.level == level]

    @property
    def errors(self) -> list[Issue]:
        return self.of_level("error")

    def table(self) -> str:
        """The summary table (one row per dataset) followed by the issues, grouped."""
        header = f"{'dataset':48s} {'triples':>7s} {'usable':>7s} {'errors':>7s} {'warnings':>8s} {'notes':>6s}"
        lines = ["preflight:", header]
        for i, path in enumerate(self.paths):
            count = Counter(issue.level for issue in self.issues if issue.dataset == i)
            name = path if len(path) <= 48 else "..." + path[-45:]
            lines.append(
                f"{name:48s} {self.found[i]:7d} {len(self.usable[i]):7d} {count['error']:7d} "
                f"{count['warning']:8d} {count['note']:6d}"
            )
        count = Counter(issue.level for issue in self.issues)
        lines.append(
            f"{'total':48s} {sum(self.found):7d} {sum(len(u) for u in self.usable):7d} {count['error']:7d} "
            f"{count['warning']:8d} {count['note']:6d}"
        )
        for level in ("error", "warning"):
            listed = self.of_level(level)
            for issue in listed[:20]:
                lines.append(f"  {level}: {issue.message}")
            if len(listed) > 20:
                lines.append(f"  ... and {len(listed) - 20} more {level}s")
        notes = Counter(issue.message.split(": ", 1)[-1] for issue in self.of_level("note"))
        for text, count in notes.most_common():
            lines.append(f"  note: {count} image(s): {text}")
        return "\n".join(lines)

    def raise_on_errors(self) -> None:
        """Stop with the first error's message (and how many more there are)."""
        errors = self.errors
        if errors:
            more = (
                f" (and {len(errors) - 1} more errors; `kontext-lora preflight` lists them)" if len(errors) > 1 else ""
            )
            raise DataError(errors[0].message + more)


def preflight(data: DataConfig, show_progress: bool = True) -> PreflightReport:
    """Discover and check every dataset of `data`; never raises for bad input, the report holds it."""
    report = PreflightReport(paths=[ds.path for ds in data.datasets])
    discovered: list[list[Triple]] = []
    for index, ds in enumerate(data.datasets):
        try:
            triples = discover_dataset(ds)
        except DataError as exc:
            report.issues.append(Issue("error", index, ds.path, str(exc)))
            triples = []
        discovered.append(triples)
        report.found.append(len(triples))

    refs = {ref for triples in discovered for t in triples for ref in (*t.controls, t.target, t.mask) if ref}
    results = _inspect_all(sorted(refs, key=str), data.num_workers, show_progress)
    for index, (ds, triples) in enumerate(zip(data.datasets, discovered, strict=True)):
        report.usable.append([t for t in triples if _check_triple(t, ds, data, index, results, report)])
    return report


def _inspect_all(refs: list[ImageRef], workers: int, show_progress: bool) -> dict[ImageRef, tuple]:
    """{ref: ("ok", (width, height), [notes]) or ("error", message)}, decoding in threads (PIL frees the GIL)."""
    from kontext_lora.progress import progress_bar

    with ThreadPoolExecutor(max_workers=max(1, workers or min(8, os.cpu_count() or 1))) as pool:
        results = list(
            progress_bar(pool.map(_inspect, refs), total=len(refs), desc="preflight", unit="img", show=show_progress)
        )
    return dict(zip(refs, results, strict=True))


def _inspect(ref: ImageRef) -> tuple:
    """Decode one image fully; report its upright size and what loading it normalises."""
    if isinstance(ref, Path):
        try:
            if ref.stat().st_size == 0:
                return ("error", f"image {ref} is an empty (0-byte) file; re-export or replace it")
        except OSError as exc:
            return ("error", f"cannot read image {ref}: {exc.strerror or exc}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(open_source(ref)) as img:
                mode, size = img.mode, img.size
                orientation = img.getexif().get(_EXIF_ORIENTATION)
                transparent = img.info.get("transparency") is not None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return ("error", _huge_message(ref))
    except DataError as exc:
        return ("error", str(exc))
    except Exception:
        pass  # unreadable header: load_image below gives the precise message
    else:
        if size[0] * size[1] > (Image.MAX_IMAGE_PIXELS or math.inf):
            return ("error", _huge_message(ref, size))
    try:
        upright = load_image(ref)
    except DataError as exc:
        return ("error", str(exc))
    notes = []
    if mode in _MODE_NOTES:
        notes.append(_MODE_NOTES[mode])
    elif transparent:
        notes.append("transparent colour composited over white")
    if orientation not in (None, 1):
        notes.append(f"EXIF orientation {orientation} applied (image rotated upright)")
    width, height = upright.size
    if min(width, height) < MIN_SIDE:
        return ("error", f"image {ref} is only {width}x{height} pixels; images need at least {MIN_SIDE} px a side")
    return ("ok", (width, height), notes)


def _huge_message(ref: ImageRef, size: tuple[int, int] | None = None) -> str:
    limit = (Image.MAX_IMAGE_PIXELS or 0) / 1e6
    dims = f" ({size[0]}x{size[1]}, {size[0] * size[1] / 1e6:.0f} MP)" if size else ""
    return f"image {ref} is huge{dims}, over PIL's {limit:.0f} MP decompression-bomb limit; downscale it first"


def _check_triple(
    triple: Triple, ds: DatasetConfig, data: DataConfig, index: int, results: dict, report: PreflightReport
) -> bool:
    """Record the triple's issues; True when it can be trained on."""
    ok = True
    for ref in (*triple.controls, triple.target, *([triple.mask] if triple.mask else [])):
        result = results[ref]
        if result[0] == "error":
            report.issues.append(Issue("error", index, str(ref), result[1]))
            ok = False
            continue
        report.sizes[ref] = result[1]
        for note in result[2]:
            report.issues.append(Issue("note", index, str(ref), f"{ref}: {note}"))
    if not ok:
        return False

    if not any(line for line in triple.captions):
        report.issues.append(
            Issue("warning", index, str(triple.target), f"empty caption for {triple.target} (trained on no prompt)")
        )
    target_size = report.sizes[triple.target]
    target_ratio = target_size[0] / target_size[1]
    for control in triple.controls:
        ratio = report.sizes[control][0] / report.sizes[control][1]
        if abs(math.log(ratio / target_ratio)) > math.log1p(data.aspect_tolerance):
            fate = "is cropped to the target's bucket" if data.control_bucket == "target" else "gets its own bucket"
            report.issues.append(
                Issue(
                    "warning",
                    index,
                    str(control),
                    f"control {control} has aspect ratio {ratio:.2f} but target {triple.target} has "
                    f"{target_ratio:.2f} (tolerance {data.aspect_tolerance:.0%}); the control {fate}",
                )
            )
    buckets = bucket_list(data.buckets, ds.resolution or data.resolution, data.max_aspect_ratio)
    target_bucket = nearest_bucket(*target_size, buckets)
    for ref in (triple.target, *triple.controls):
        bucket = target_bucket if ref == triple.target or data.control_bucket == "target" else None
        bucket = bucket or nearest_bucket(*report.sizes[ref], buckets)
        factor = upscale_factor(*report.sizes[ref], bucket)
        if factor > data.max_upscale:
            w, h = report.sizes[ref]
            report.issues.append(
                Issue(
                    "warning",
                    index,
                    str(ref),
                    f"skipped {triple.stem}: {ref} ({w}x{h}) would be upscaled x{factor:.1f} to {bucket[1]}x{bucket[0]}"
                    f", more than data.max_upscale={data.max_upscale}",
                )
            )
            return False
    return True


def write_contact_sheet(report: PreflightReport, path: str | os.PathLike, samples: int = 8, height: int = 128) -> Path:
    """A JPEG of `samples` usable triples spread over the datasets: controls | target | caption, one row each."""
    everything = [t for triples in report.usable for t in triples]
    if not everything:
        raise DataError("no usable triples to put on a contact sheet")
    step = max(1, len(everything) // samples)
    chosen = everything[::step][:samples]
    columns = max(len(t.controls) for t in chosen) + 1
    cell, text_width = height, 360
    sheet = Image.new("RGB", (columns * (cell + 8) + text_width, len(chosen) * (cell + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, triple in enumerate(chosen):
        y = 8 + row * (cell + 8)
        for col, ref in enumerate((*triple.controls, triple.target)):
            x = 8 + (col if ref != triple.target else columns - 1) * (cell + 8)
            thumb = ImageOps.contain(load_image(ref), (cell, cell))
            sheet.paste(thumb, (x, y))
        caption = " / ".join(triple.captions)
        lines = [triple.stem] + textwrap.wrap(caption or "(empty caption)", 56)[: cell // 14 - 1]
        draw.multiline_text((8 + columns * (cell + 8), y), "\n".join(lines), fill="black", font=font)
    return atomic_save_image(sheet, path, "JPEG", quality=90)
