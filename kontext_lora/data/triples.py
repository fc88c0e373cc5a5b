"""(control image, target image, caption) triples: discovery on disk and image decoding.

Three layouts are understood here (see `discover_triples`; Hugging Face datasets are in `sources.py`):

    root/control/<stem>.<ext>   root/target/<stem>.<ext>   root/target/<stem>.txt (optional caption)
    root/metadata.jsonl         {"control": "...", "target": "...", "caption": "..."} per line
    root/metadata.csv           a header row naming the control, target and caption columns

The folder and column names are configurable (`control_keys` lists several controls per target, or none for
text-to-image pairs); an optional `mask` folder/column holds per-target loss masks.

Everything a user can get wrong about their files raises `DataError` with a one-line message naming the file,
so that a bad dataset fails before any model is loaded rather than hours into training.
"""

from __future__ import annotations

import csv
import errno
import io
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from kontext_lora.data.errors import DataError
from kontext_lora.data.hf import RowImage

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
CAPTION_EXTENSION = ".txt"
METADATA_FILENAME = "metadata.jsonl"
CSV_FILENAME = "metadata.csv"
CONTROL_DIRNAME = "control"
TARGET_DIRNAME = "target"

_EXTENSIONS_HINT = "/".join(sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS))


ImageRef = Path | RowImage


@dataclass(frozen=True)
class Triple:
    """One training example: edit `control` (plus `more_controls`) into `target` as described by `caption`.

    `control` is None for a text-to-image pair; `caption` may hold several lines, one of which is drawn per step.
    """

    stem: str
    control: ImageRef | None
    target: ImageRef
    caption: str
    more_controls: tuple[ImageRef, ...] = ()
    mask: ImageRef | None = None

    @property
    def controls(self) -> tuple[ImageRef, ...]:
        """Every control image in id order (index 1, 2, ...); empty for a text-to-image pair."""
        return ((self.control,) if self.control is not None else ()) + self.more_controls

    @property
    def captions(self) -> list[str]:
        """The caption's non-empty lines (one is drawn per step); [""] when there is none."""
        return [line.strip() for line in self.caption.splitlines() if line.strip()] or [""]


# ---------------------------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------------------------


def discover_triples(
    root: str | Path,
    default_caption: str = "",
    *,
    layout: str = "auto",
    control_keys: Sequence[str] = (CONTROL_DIRNAME,),
    target_key: str = TARGET_DIRNAME,
    caption_key: str = "caption",
    mask_key: str = "mask",
) -> list[Triple]:
    """Find the triples under `root` (metadata.jsonl, else metadata.csv, else control/ + target/), sorted by stem.

    `layout` forces one of "folder", "jsonl", "csv"; the keys name the subfolders (folder layout) or the fields.
    """
    root = Path(root).expanduser().absolute()
    _check_not_a_loop(root, "dataset path")
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist; check the dataset path")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a folder; point it at the folder that holds control/ and target/")

    keys = _Keys(tuple(control_keys), target_key, caption_key, mask_key)
    metadata, table = root / METADATA_FILENAME, root / CSV_FILENAME
    if layout == "jsonl" or (layout == "auto" and metadata.is_file()):
        if not metadata.is_file():
            raise DataError(f"{metadata} does not exist; write one JSON object per triple, or change `format`")
        triples, where = _triples_from_jsonl(root, metadata, default_caption, keys), str(metadata)
    elif layout == "csv" or (layout == "auto" and table.is_file()):
        if not table.is_file():
            raise DataError(f"{table} does not exist; write a header row and one row per triple, or change `format`")
        triples, where = _triples_from_csv(root, table, default_caption, keys), str(table)
    else:
        control_dirs = [root / name for name in keys.controls]
        target_dir = root / keys.target
        folders = [*control_dirs, target_dir]
        if not any(folder.is_dir() for folder in folders):
            names = " and ".join(f"{folder.name}/" for folder in folders)
            raise DataError(
                f"dataset folder {root} has neither {METADATA_FILENAME} nor {names} "
                f"subfolders; put images in {' and '.join(str(f) for f in folders)}, or write {metadata}"
            )
        for folder in folders:
            if not folder.is_dir():
                wanted = " and ".join(str(f) for f in folders)
                raise DataError(f"missing folder {folder}; the folder layout needs both {wanted}")
        mask_dir = root / keys.mask
        triples = _triples_from_folders(
            control_dirs, target_dir, default_caption, mask_dir if mask_dir.is_dir() else None
        )
        where = " and ".join(str(f) for f in folders)

    if not triples:
        raise DataError(f"no triples found in {where}; add (control, target) image pairs")
    return sorted(triples, key=lambda triple: triple.stem)


@dataclass(frozen=True)
class _Keys:
    controls: tuple[str, ...]
    target: str
    caption: str
    mask: str


def _check_not_a_loop(path: Path, what: str) -> None:
    """A symlink that points back at itself makes every later check say 'does not exist'; name it instead."""
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except (RuntimeError, OSError) as exc:
            if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
                raise DataError(f"{what} {path} is a symlink loop; point the link at a real file or folder") from None


def _scan_image_folder(folder: Path, allow_captions: bool) -> tuple[dict[str, Path], dict[str, Path]]:
    """Return ({stem: image path}, {stem: caption path}) for the files directly inside `folder`."""
    images: dict[str, Path] = {}
    captions: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        # Hidden entries are OS/editor litter (.DS_Store, ._foo.jpg, .ipynb_checkpoints), never data.
        if path.name.startswith("."):
            continue
        _check_not_a_loop(path, "file")
        if path.is_dir():
            raise DataError(f"unexpected subfolder {path}; images must sit directly in {folder}")
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            if path.stem in images:
                raise DataError(
                    f"two images share the stem '{path.stem}': {images[path.stem]} and {path}; "
                    "rename or delete one so each stem appears once per folder"
                )
            images[path.stem] = path
        elif suffix == CAPTION_EXTENSION and allow_captions:
            captions[path.stem] = path
        elif suffix == CAPTION_EXTENSION:
            raise DataError(
                f"caption file {path} is in {folder.name}/; captions belong next to the target image, "
                f"move it to {folder.parent / TARGET_DIRNAME / path.name}"
            )
        else:
            # Raised rather than skipped: a silently ignored '.heic' or '.jpg.part' is a missing training example.
            raise DataError(
                f"unsupported file {path}; images must have one of the extensions {_EXTENSIONS_HINT} "
                "(convert it, or move it out of the dataset folder)"
            )
    return images, captions


def _triples_from_folders(
    control_dirs: list[Path], target_dir: Path, default_caption: str, mask_dir: Path | None = None
) -> list[Triple]:
    """Pair root/<control dir>/<stem>.* with root/target/<stem>.* and read root/target/<stem>.txt captions."""
    targets, captions = _scan_image_folder(target_dir, allow_captions=True)
    all_controls = []
    for control_dir in control_dirs:
        controls, _ = _scan_image_folder(control_dir, allow_captions=False)
        for stem, target in targets.items():
            if stem not in controls:
                raise DataError(
                    f"target image {target} has no control image; expected {control_dir / stem}.<{_EXTENSIONS_HINT}>"
                )
        for stem, control in controls.items():
            if stem not in targets:
                raise DataError(
                    f"control image {control} has no target image; expected {target_dir / stem}.<{_EXTENSIONS_HINT}>"
                )
        all_controls.append(controls)
    masks = _scan_image_folder(mask_dir, allow_captions=False)[0] if mask_dir is not None else {}
    for stem, mask in masks.items():
        if stem not in targets:
            raise DataError(f"mask {mask} has no target image; expected {target_dir / stem}.<{_EXTENSIONS_HINT}>")
    for stem, caption_path in captions.items():
        if stem not in targets:
            # Usually a typo in the stem; without this check the caption would silently never be used.
            raise DataError(
                f"caption file {caption_path} has no target image; expected {target_dir / stem}.<{_EXTENSIONS_HINT}>"
            )

    triples = []
    for stem, target in targets.items():
        caption = _read_caption(captions[stem]) if stem in captions else default_caption
        controls_of_stem = [controls[stem] for controls in all_controls]
        triples.append(
            Triple(
                stem=stem,
                control=controls_of_stem[0] if controls_of_stem else None,
                target=target,
                caption=caption,
                more_controls=tuple(controls_of_stem[1:]),
                mask=masks.get(stem),
            )
        )
    return triples


def _read_caption(path: Path) -> str:
    """Read a caption .txt as UTF-8 (a BOM is tolerated), stripped of surrounding whitespace."""
    try:
        # utf-8-sig: Windows editors prepend a BOM that would otherwise become part of the prompt.
        return path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise DataError(
            f"caption file {path} is not valid UTF-8 ({exc.reason} at byte {exc.start}); re-save it as UTF-8"
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot read caption file {path}: {exc.strerror or exc}") from exc


def _triples_from_jsonl(root: Path, metadata: Path, default_caption: str, keys: _Keys | None = None) -> list[Triple]:
    """Read one {"control", "target", "caption"?} object per line of `metadata`; paths are relative to `root`."""
    keys = keys or _Keys((CONTROL_DIRNAME,), TARGET_DIRNAME, "caption", "mask")
    try:
        text = metadata.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{metadata} is not valid UTF-8 ({exc.reason} at byte {exc.start}); re-save it as UTF-8"
        ) from exc

    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{metadata} line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: not valid JSON ({exc.msg}); each line must be one object like "
                '{"control": "control/a.png", "target": "target/a.png", "caption": "..."}'
            ) from exc
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with 'control' and 'target', got {type(record).__name__}")
        records.append((where, line_number, record))
    return _triples_from_records(root, records, default_caption, keys, "line")


def _triples_from_csv(root: Path, table: Path, default_caption: str, keys: _Keys) -> list[Triple]:
    """Read metadata.csv: a header row, then one row per triple; paths are relative to `root`."""
    try:
        text = table.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{table} is not valid UTF-8 ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from exc
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise DataError(f"{table}: not valid CSV ({exc}); quote fields that contain commas or newlines") from exc
    if not rows:
        raise DataError(f"no triples found in {table}; it is empty (write a header row such as control,target,caption)")
    header = [name.strip() for name in rows[0]]
    for column in (*keys.controls, keys.target):
        if column not in header:
            raise DataError(
                f"{table}: missing column '{column}' in the header row ({', '.join(header) or 'empty'}); "
                "add it or set the dataset's control_keys/target_key"
            )
    records = []
    for line_number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{table} row {line_number}"
        if len(row) != len(header):
            raise DataError(f"{where}: has {len(row)} fields but the header has {len(header)}; fix the row")
        record = {name: cell for name, cell in zip(header, row, strict=True) if name}
        if keys.mask in record and not record[keys.mask].strip():
            del record[keys.mask]  # an empty mask cell: this target has no mask
        records.append((where, line_number, record))
    return _triples_from_records(root, records, default_caption, keys, "row")


def _triples_from_records(
    root: Path, records: list[tuple[str, int, dict]], default_caption: str, keys: _Keys, unit: str
) -> list[Triple]:
    """Triples from jsonl/csv records {control key: path, ..., target key: path, caption key: text}."""
    triples: list[Triple] = []
    line_of_stem: dict[str, int] = {}
    for where, line_number, record in records:
        for field in (*keys.controls, keys.target):
            if field not in record:
                raise DataError(f"{where}: missing field '{field}' (the path of the {field} image, relative to {root})")
            if not isinstance(record[field], str) or not record[field]:
                raise DataError(f"{where}: field '{field}' must be a non-empty path string, got {record[field]!r}")
        caption = record.get(keys.caption)
        if caption is None:
            caption = default_caption
        elif not isinstance(caption, str):
            raise DataError(f"{where}: field '{keys.caption}' must be a string, got {type(caption).__name__}")

        controls = [_resolve_listed_path(root, record[field], where, field) for field in keys.controls]
        target = _resolve_listed_path(root, record[keys.target], where, keys.target)
        mask = record.get(keys.mask)
        if mask is not None and not isinstance(mask, str):
            raise DataError(f"{where}: field '{keys.mask}' must be a path string, got {type(mask).__name__}")
        mask_path = _resolve_listed_path(root, mask, where, keys.mask) if mask else None
        stem = _stem_for(root, target)
        if stem in line_of_stem:
            # Stems identify examples (sorting, caches, sample names), so two lines may not share a target name.
            raise DataError(
                f"{where}: target {target} has the same name '{stem}' as the target on {unit} {line_of_stem[stem]}; "
                "give each target a distinct file name"
            )
        line_of_stem[stem] = line_number
        triples.append(
            Triple(
                stem=stem,
                control=controls[0] if controls else None,
                target=target,
                caption=caption.strip(),
                more_controls=tuple(controls[1:]),
                mask=mask_path,
            )
        )
    return triples


def _resolve_listed_path(root: Path, listed: str, where: str, field: str) -> Path:
    """Resolve a metadata path (relative to `root`, or absolute) and check the file exists."""
    path = Path(listed.strip()).expanduser()
    path = path if path.is_absolute() else root / path
    _check_not_a_loop(path, f"{where}: {field} image")
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise DataError(f"{where}: {field} image {path} {state}; fix the path (relative paths are from {root})")
    return path


def _stem_for(root: Path, target: Path) -> str:
    """Name a jsonl example by its target path relative to root, without extension (e.g. 'shoes/001')."""
    try:
        return target.relative_to(root).with_suffix("").as_posix()
    except ValueError:
        return target.stem  # absolute path outside root: only its file name is meaningful


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """Refuse truncated files even if another library has set PIL's global LOAD_TRUNCATED_IMAGES."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def open_source(ref: str | ImageRef):
    """What `Image.open` takes for an image reference: a path, or the bytes of a dataset row."""
    if isinstance(ref, RowImage):
        return io.BytesIO(ref.read_bytes())
    return ref


def load_image(path: str | ImageRef) -> Image.Image:
    """Open, fully decode, apply the EXIF orientation and convert `path` to an RGB image (alpha over white)."""
    if not isinstance(path, RowImage):
        path = Path(path).expanduser().absolute()
    try:
        with _strict_decoding(), Image.open(open_source(path)) as img:
            # load() decodes every byte now, so a truncated file fails here and not inside a DataLoader worker.
            img.load()
            # Phones store portrait shots as landscape pixels plus an orientation tag; training must see them upright.
            upright = ImageOps.exif_transpose(img)
            return _to_rgb(upright)
    except DataError:
        raise
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, struct.error, DecompressionBombError...
        reason = str(exc) or type(exc).__name__
        raise DataError(f"cannot read image {path}: {reason}; re-export or replace the file") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels become white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # convert("RGB") clips these to 0..255, which turns most of a 16-bit image white; rescale instead.
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
        else:
            values = values / 257.0  # 65535 -> 255
        gray = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    # info["transparency"] covers palette and tRNS-keyed L/RGB PNGs (has_transparency_data needs Pillow >= 10.1).
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "RGB":
        return img.copy()  # detach from the (about to be closed) file
    return img.convert("RGB")


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Resize so the shorter side is `size`, center-crop to size x size; returns (3, size, size) float32 in [-1, 1]."""
    if size <= 0:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if img.mode != "RGB":
        img = _to_rgb(img)
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    # Cropping via `box` inside resize() avoids resizing pixels that are then thrown away and keeps sub-pixel
    # centering exact; PIL's bicubic widens its kernel when downscaling (antialiasing), and reducing_gap lets it
    # box-reduce huge photos first, which is much faster and visually identical.
    square = img.resize(
        (size, size),
        resample=Image.Resampling.BICUBIC,
        box=(left, top, left + side, top + side),
        reducing_gap=3.0,
    )
    pixels = torch.from_numpy(np.array(square, dtype=np.float32))  # (size, size, 3) in [0, 255]
    return (pixels / 127.5 - 1.0).permute(2, 0, 1).contiguous()  # (3, size, size) in [-1, 1]
