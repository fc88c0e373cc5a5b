"""Where triples come from: one `DatasetConfig` -> a list of `Triple`.

Folders, metadata.jsonl and metadata.csv are read by `triples.discover_triples`; Hugging Face datasets (a
`save_to_disk` folder, parquet/arrow files, or an imagefolder) are opened here with the `datasets` library.
Images inside a dataset are referenced lazily (`RowImage`) and read by row when needed, so a large parquet
dataset is never held in memory.
"""

from __future__ import annotations

import functools
from pathlib import Path

from kontext_lora.config import DatasetConfig
from kontext_lora.data.triples import DataError, RowImage, Triple, discover_triples

HF_TABLE_SUFFIXES = (".parquet", ".arrow")
_SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def discover_dataset(ds: DatasetConfig) -> list[Triple]:
    """The triples of one configured dataset, sorted by stem (raises DataError naming the file on bad input)."""
    root = Path(ds.path).expanduser().absolute()
    if ds.format == "hf" or (ds.format == "auto" and _looks_like_hf(root)):
        return _triples_from_hf(root, ds)
    return discover_triples(
        root,
        ds.default_caption,
        layout=ds.format,
        control_keys=ds.control_keys,
        target_key=ds.target_key,
        caption_key=ds.caption_key,
        mask_key=ds.mask_key,
    )


def _looks_like_hf(root: Path) -> bool:
    """A save_to_disk folder, a parquet/arrow file, or a folder of them, and no jsonl/csv of ours."""
    if root.is_file():
        return root.suffix in HF_TABLE_SUFFIXES
    if not root.is_dir() or (root / "metadata.jsonl").is_file() or (root / "metadata.csv").is_file():
        return False
    return any((root / marker).is_file() for marker in _SAVE_TO_DISK_MARKERS) or bool(_table_files(root))


def _table_files(root: Path) -> list[Path]:
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
        if root.is_dir() and any((root / marker).is_file() for marker in _SAVE_TO_DISK_MARKERS):
            loaded = datasets.load_from_disk(str(root))
        elif root.is_file() or _table_files(root):
            files = [root] if root.is_file() else _table_files(root)
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


def _triples_from_hf(root: Path, ds: DatasetConfig) -> list[Triple]:
    """One triple per row; image columns become paths (imagefolder) or lazy `RowImage`s (embedded bytes)."""
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist; check the dataset path")
    location = f"{root}::{ds.split}"
    table = open_hf_dataset(location)
    columns = set(table.column_names)
    for column in (*ds.control_keys, ds.target_key):
        if column not in columns:
            raise DataError(
                f"Hugging Face dataset {root} has no column '{column}' (columns: {', '.join(sorted(columns))}); "
                "set the dataset's control_keys/target_key"
            )
    image_columns = [*ds.control_keys, ds.target_key] + ([ds.mask_key] if ds.mask_key in columns else [])
    refs = {column: _column_refs(table, location, column, root) for column in image_columns}
    captions = table[ds.caption_key] if ds.caption_key in columns else [None] * len(table)
    triples, seen = [], set()
    for row in range(len(table)):
        target = refs[ds.target_key][row]
        if target is None:
            raise DataError(f"Hugging Face dataset {root} row {row}: column '{ds.target_key}' is empty")
        controls = []
        for column in ds.control_keys:
            if refs[column][row] is None:
                raise DataError(f"Hugging Face dataset {root} row {row}: control column '{column}' is empty")
            controls.append(refs[column][row])
        caption = captions[row]
        if caption is not None and not isinstance(caption, str):
            raise DataError(f"Hugging Face dataset {root} row {row}: caption is {type(caption).__name__}, not text")
        stem = Path(target).stem if isinstance(target, Path) else f"row{row:06d}"
        stem = stem if stem not in seen else f"{stem}_row{row:06d}"
        seen.add(stem)
        triples.append(
            Triple(
                stem=stem,
                control=controls[0] if controls else None,
                target=target,
                caption=(caption if caption is not None else ds.default_caption).strip(),
                more_controls=tuple(controls[1:]),
                mask=refs[ds.mask_key][row] if ds.mask_key in refs else None,
            )
        )
    if not triples:
        raise DataError(f"no triples found in Hugging Face dataset {root}; it has no rows")
    return sorted(triples, key=lambda triple: triple.stem)


def _column_refs(table, location: str, column: str, root: Path) -> list[Path | RowImage | None]:
    """Per row: the image file's path when it is on disk and not embedded, else a RowImage; None when empty.

    Read through pyarrow so that the embedded bytes of a large dataset are never copied into Python.
    """
    data = table.data.column(column).combine_chunks()
    if table._indices is not None:  # a selected/shuffled view: map back to the underlying rows
        data = data.take(table._indices.column(0).combine_chunks())
    if hasattr(data, "field"):  # an Image feature: struct<bytes, path>
        has_bytes = data.field("bytes").is_valid().to_pylist()
        paths = data.field("path").to_pylist()
    else:  # a string column of paths relative to the dataset
        has_bytes, paths = [False] * len(data), data.to_pylist()
    refs: list[Path | RowImage | None] = []
    for row, (embedded, path) in enumerate(zip(has_bytes, paths, strict=True)):
        if embedded:
            refs.append(RowImage(location, row, column))
        elif path:
            file = Path(path) if Path(path).is_absolute() else root / path
            if not file.is_file():
                raise DataError(f"Hugging Face dataset {root} row {row}: image {file} does not exist")
            refs.append(file)
        else:
            refs.append(None)
    return refs
