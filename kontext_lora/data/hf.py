"""Hugging Face datasets as image sources: opening one with its images left encoded, and `RowImage`, a lazy
reference to an image stored in a row, read only when it is decoded or hashed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from kontext_lora.data.errors import DataError

HF_TABLE_SUFFIXES = (".parquet", ".arrow")
SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def table_files(root: Path) -> list[Path]:
    for suffix in HF_TABLE_SUFFIXES:
        files = sorted(root.rglob(f"*{suffix}"))
        if files:
            return files
    return []


@functools.lru_cache(maxsize=8)
def open_hf_dataset(location: str):
    """Open `<path>::<split>` as a `datasets.Dataset` with image columns left encoded (bytes + path)."""
    import datasets

    path_text, split = location.rsplit("::", 1)
    root = Path(path_text)
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist; check the dataset path")
    try:
        if root.is_dir() and any((root / marker).is_file() for marker in SAVE_TO_DISK_MARKERS):
            loaded = datasets.load_from_disk(str(root))
        elif root.is_file() or table_files(root):
            files = [root] if root.is_file() else table_files(root)
            builder = files[0].suffix.lstrip(".")
            loaded = datasets.load_dataset(builder, data_files={split: [str(f) for f in files]}, split=split)
        else:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(root), split=split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ValueError, ArrowInvalid...)
        raise DataError(f"cannot open Hugging Face dataset {root}: {exc}; check the files and `format`") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"Hugging Face dataset {root} has no split '{split}' (splits: {', '.join(loaded)})")
        loaded = loaded[split]
    # Left encoded, images cost nothing until a row is read, and their bytes can be hashed for the caches.
    for name, feature in loaded.features.items():
        if isinstance(feature, datasets.Image):
            loaded = loaded.cast_column(name, datasets.Image(decode=False))
    return loaded


def row_image_bytes(ref: RowImage) -> bytes:
    """The encoded bytes of an image stored in a dataset row."""
    value = open_hf_dataset(ref.location)[ref.row][ref.column]
    if isinstance(value, dict) and value.get("bytes"):
        return value["bytes"]
    path = value.get("path") if isinstance(value, dict) else value
    if not path:
        raise DataError(f"{ref}: holds no image bytes and no path")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{ref}: cannot read {path}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class RowImage:
    """An image stored inside a Hugging Face dataset (encoded bytes in a column of one row)."""

    location: str  # the dataset as `open_hf_dataset` re-opens it: "<path>::<split>"
    row: int
    column: str

    def __str__(self) -> str:
        return f"{self.location.split('::')[0]} row {self.row} column '{self.column}'"

    def read_bytes(self) -> bytes:
        return row_image_bytes(self)
