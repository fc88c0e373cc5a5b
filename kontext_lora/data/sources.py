"""Where triples come from: one `DatasetConfig` -> a list of `Triple`.

Folders, metadata.jsonl and metadata.csv are read by `triples.discover_triples`; Hugging Face datasets (a
`save_to_disk` folder, parquet/arrow files, or an imagefolder) are opened here with the `datasets` library.
Images inside a dataset are referenced lazily (`RowImage`) and read by row when needed, so a large parquet
dataset is never held in memory.
"""

from __future__ import annotations

from pathlib import Path

from kontext_lora.config import DatasetConfig
from kontext_lora.data.errors import DataError
from kontext_lora.data.hf import HF_TABLE_SUFFIXES, SAVE_TO_DISK_MARKERS, RowImage, open_hf_dataset, table_files
from kontext_lora.data.triples import Triple, discover_triples


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
    return any((root / marker).is_file() for marker in SAVE_TO_DISK_MARKERS) or bool(table_files(root))


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
