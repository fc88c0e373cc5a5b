"""(control image, target image, caption) triples: discovery on disk, image decoding, and a torch Dataset.

Two layouts are understood (see `discover_triples`):

    root/control/<stem>.<ext>   root/target/<stem>.<ext>   root/target/<stem>.txt (optional caption)
    root/metadata.jsonl         {"control": "...", "target": "...", "caption": "..."} per line

Everything a user can get wrong about their files raises `DataError` with a one-line message naming the file,
so that a bad dataset fails before any model is loaded rather than hours into training.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
CAPTION_EXTENSION = ".txt"
METADATA_FILENAME = "metadata.jsonl"
CONTROL_DIRNAME = "control"
TARGET_DIRNAME = "target"

_EXTENSIONS_HINT = "/".join(sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS))


class DataError(ValueError):
    """Bad input data a user can fix; the message is one line naming the offending file and the fix."""

    def __init__(self, message: str) -> None:
        # Messages embed paths and decoder reasons that may contain newlines; the contract is one line.
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class Triple:
    """One training example: edit `control` into `target` as described by `caption`."""

    stem: str
    control: Path
    target: Path
    caption: str


# ---------------------------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------------------------


def discover_triples(root: str | Path, default_caption: str = "") -> list[Triple]:
    """Find the triples under `root` (metadata.jsonl if present, else control/ + target/), sorted by stem."""
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist; check the dataset path")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a folder; point it at the folder that holds control/ and target/")

    metadata = root / METADATA_FILENAME
    if metadata.is_file():
        triples = _triples_from_jsonl(root, metadata, default_caption)
    else:
        control_dir, target_dir = root / CONTROL_DIRNAME, root / TARGET_DIRNAME
        if not control_dir.is_dir() and not target_dir.is_dir():
            raise DataError(
                f"dataset folder {root} has neither {METADATA_FILENAME} nor {CONTROL_DIRNAME}/ and {TARGET_DIRNAME}/ "
                f"subfolders; put images in {control_dir} and {target_dir}, or write {metadata}"
            )
        for folder in (control_dir, target_dir):
            if not folder.is_dir():
                raise DataError(f"missing folder {folder}; the folder layout needs both {control_dir} and {target_dir}")
        triples = _triples_from_folders(control_dir, target_dir, default_caption)

    if not triples:
        where = metadata if metadata.is_file() else f"{root / CONTROL_DIRNAME} and {root / TARGET_DIRNAME}"
        raise DataError(f"no triples found in {where}; add (control, target) image pairs")
    return sorted(triples, key=lambda triple: triple.stem)


def _scan_image_folder(folder: Path, allow_captions: bool) -> tuple[dict[str, Path], dict[str, Path]]:
    """Return ({stem: image path}, {stem: caption path}) for the files directly inside `folder`."""
    images: dict[str, Path] = {}
    captions: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        # Hidden entries are OS/editor litter (.DS_Store, ._foo.jpg, .ipynb_checkpoints), never data.
        if path.name.startswith("."):
            continue
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


def _triples_from_folders(control_dir: Path, target_dir: Path, default_caption: str) -> list[Triple]:
    """Pair root/control/<stem>.* with root/target/<stem>.* and read root/target/<stem>.txt captions."""
    controls, _ = _scan_image_folder(control_dir, allow_captions=False)
    targets, captions = _scan_image_folder(target_dir, allow_captions=True)

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
    for stem, caption_path in captions.items():
        if stem not in targets:
            # Usually a typo in the stem; without this check the caption would silently never be used.
            raise DataError(
                f"caption file {caption_path} has no target image; expected {target_dir / stem}.<{_EXTENSIONS_HINT}>"
            )

    triples = []
    for stem, target in targets.items():
        caption = _read_caption(captions[stem]) if stem in captions else default_caption
        triples.append(Triple(stem=stem, control=controls[stem], target=target, caption=caption))
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


def _triples_from_jsonl(root: Path, metadata: Path, default_caption: str) -> list[Triple]:
    """Read one {"control", "target", "caption"?} object per line of `metadata`; paths are relative to `root`."""
    try:
        text = metadata.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{metadata} is not valid UTF-8 ({exc.reason} at byte {exc.start}); re-save it as UTF-8"
        ) from exc

    triples: list[Triple] = []
    line_of_stem: dict[str, int] = {}
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
        for field in ("control", "target"):
            if field not in record:
                raise DataError(f"{where}: missing field '{field}' (the path of the {field} image, relative to {root})")
            if not isinstance(record[field], str) or not record[field]:
                raise DataError(f"{where}: field '{field}' must be a non-empty path string, got {record[field]!r}")
        caption = record.get("caption")
        if caption is None:
            caption = default_caption
        elif not isinstance(caption, str):
            raise DataError(f"{where}: field 'caption' must be a string, got {type(caption).__name__}")

        control = _resolve_listed_path(root, record["control"], where, "control")
        target = _resolve_listed_path(root, record["target"], where, "target")
        stem = _stem_for(root, target)
        if stem in line_of_stem:
            # Stems identify examples (sorting, caches, sample names), so two lines may not share a target name.
            raise DataError(
                f"{where}: target {target} has the same name '{stem}' as the target on line {line_of_stem[stem]}; "
                "give each target a distinct file name"
            )
        line_of_stem[stem] = line_number
        triples.append(Triple(stem=stem, control=control, target=target, caption=caption.strip()))
    return triples


def _resolve_listed_path(root: Path, listed: str, where: str, field: str) -> Path:
    """Resolve a metadata path (relative to `root`, or absolute) and check the file exists."""
    path = Path(listed).expanduser()
    path = path if path.is_absolute() else root / path
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


def load_image(path: str | Path) -> Image.Image:
    """Open, fully decode, apply the EXIF orientation and convert `path` to an RGB image (alpha over white)."""
    path = Path(path).expanduser().absolute()
    try:
        with _strict_decoding(), Image.open(path) as img:
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


# ---------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------


class TripleDataset(torch.utils.data.Dataset):
    """Square crops of (control, target) pairs with their captions."""

    def __init__(self, triples: list[Triple], resolution: int) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        self.triples = list(triples)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.triples)

    def __getitem__(self, index: int) -> dict:
        """Return {"control": (3, R, R), "target": (3, R, R) float32 in [-1, 1], "caption": str, "stem": str}."""
        triple = self.triples[index]
        return {
            "control": image_to_tensor(load_image(triple.control), self.resolution),
            "target": image_to_tensor(load_image(triple.target), self.resolution),
            "caption": triple.caption,
            "stem": triple.stem,
        }

    def verify(self) -> None:
        """Decode every image once so an unreadable file raises DataError before training starts."""
        for triple in self.triples:
            load_image(triple.control)
            load_image(triple.target)


def collate_triples(items: list[dict]) -> dict:
    """Batch dataset items: control/target (B, 3, R, R); caption/stem as lists of B strings."""
    return {
        "control": torch.stack([item["control"] for item in items]),  # (B, 3, R, R)
        "target": torch.stack([item["target"] for item in items]),  # (B, 3, R, R)
        "caption": [item["caption"] for item in items],
        "stem": [item["stem"] for item in items],
    }
