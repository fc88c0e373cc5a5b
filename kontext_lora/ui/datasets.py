"""The Datasets page's data: triples as the trainer discovers them, preflight's findings and each pair's bucket.

Edits go to the dataset's own files, where training reads them: a caption is `target/<stem>.txt` (or the
caption field of the pair's metadata.jsonl line); dropping a pair moves its files into the dataset's hidden
`.dropped/` folder, which discovery skips (move them back to restore the pair); a flag is a stem listed in the
hidden `.flagged.txt`, a note for the user that training ignores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from kontext_lora.atomic import atomic_save_image, atomic_write_text
from kontext_lora.config import DataConfig, DatasetConfig
from kontext_lora.ui.paths import PathRefused, Root

FLAG_FILE = ".flagged.txt"
DROP_DIR = ".dropped"
THUMB_SIDE = 160
# Folders of runs and caches are not datasets and can hold thousands of files: not walked.
_SKIP = frozenset({"cache", "validation", "logs", "best", "node_modules", "__pycache__", "wandb"})


class EditRefused(ValueError):
    """An edit that cannot be made to this dataset's layout; the message says why."""


@dataclass
class Row:
    """One pair as the page shows it."""

    stem: str
    controls: list[str]  # root-relative image paths, id order
    target: str
    caption: str
    mask: str | None
    bucket: str  # "HxW | controls", or why the pair is not trained on
    issues: list[tuple[str, str]] = field(default_factory=list)  # (level, message)
    flagged: bool = False

    @property
    def level(self) -> str:
        levels = {level for level, _ in self.issues}
        return next((lv for lv in ("error", "warning", "note") if lv in levels), "")


@dataclass
class DatasetView:
    path: str
    layout: str
    rows: list[Row]
    errors: list[str]  # problems of the dataset as a whole (e.g. a missing folder)
    buckets: dict[str, int]


def find_datasets(root: Root) -> list[str]:
    """Root-relative folders that hold a dataset: control/ + target/ folders, or a metadata.jsonl / .csv."""
    found = []
    for folder, dirs, files in root.walk(_SKIP):
        if folder.name.startswith("step-"):
            dirs.clear()
            continue
        if ("target" in dirs and len(dirs) >= 2) or "metadata.jsonl" in files or "metadata.csv" in files:
            found.append(root.relative(folder))
            dirs.clear()  # a dataset's own folders are not datasets
    return found


def _layout(folder: Path) -> str:
    if (folder / "metadata.jsonl").is_file():
        return "jsonl"
    if (folder / "metadata.csv").is_file():
        return "csv"
    return "folder"


def _fingerprint(folder: Path) -> str:
    """Changes whenever a file of the dataset is added, removed, rewritten or touched."""
    digest = hashlib.sha1()
    for path, _, files in os.walk(folder):
        if Path(path).name.startswith(".") and Path(path) != folder:
            continue
        for name in sorted(files):
            stat = os.stat(os.path.join(path, name))
            digest.update(f"{path}/{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


_reports: dict[tuple, tuple] = {}  # (folder, settings, fingerprint) -> (triples, report, plan); preflight decodes
_reports_lock = threading.Lock()  # every image, so an unchanged dataset is not checked again


def _checked(ds: DatasetConfig, data: DataConfig) -> tuple:
    from kontext_lora.data.plan import build_plan
    from kontext_lora.data.preflight import preflight
    from kontext_lora.data.sources import discover_dataset
    from kontext_lora.data.triples import DataError

    key = (
        ds.path,
        tuple(ds.control_keys),
        data.resolution,
        data.buckets,
        data.control_bucket,
        _fingerprint(Path(ds.path)),
    )
    with _reports_lock:
        if key in _reports:
            return _reports[key]
    try:
        triples = discover_dataset(ds)
    except DataError as exc:
        return [], None, [], str(exc)
    report = preflight(data, show_progress=False)
    plan = build_plan(data, report)
    with _reports_lock:
        if len(_reports) > 32:
            _reports.clear()
        _reports[key] = (triples, report, plan, "")
    return _reports[key]


def view_dataset(root: Root, path: str, resolution: int, buckets: str, control_keys: list[str]) -> DatasetView:
    """Every pair of the dataset at `path` with its issues and bucket under these data settings."""
    from kontext_lora.data.buckets import describe_bucket_key

    folder = root.resolve(path)
    ds = DatasetConfig(path=str(folder), control_keys=control_keys)
    data = DataConfig(datasets=[ds], resolution=resolution, buckets=buckets)
    triples, report, plan, error = _checked(ds, data)
    flagged = _flags(folder)
    by_file: dict[str, list[tuple[str, str]]] = {}
    errors = [error] if error else []
    if report is not None:
        for issue in report.issues:
            by_file.setdefault(issue.file, []).append((issue.level, issue.message))
        errors += [issue.message for issue in report.issues if issue.file == str(folder)]
    bucket_of = {sample.triple.stem: describe_bucket_key(sample.bucket_key) for sample in plan}
    rows = []
    for triple in triples:
        refs = [*triple.controls, triple.target, *([triple.mask] if triple.mask else [])]
        issues = [found for ref in refs for found in by_file.get(str(ref), [])]
        rows.append(
            Row(
                stem=triple.stem,
                controls=[root.relative(c) for c in triple.controls],
                target=root.relative(triple.target),
                caption=triple.caption,
                mask=root.relative(triple.mask) if triple.mask else None,
                bucket=bucket_of.get(triple.stem, "not trained on (see the findings)"),
                issues=issues,
                flagged=triple.stem in flagged,
            )
        )
    counts: dict[str, int] = {}
    for bucket in bucket_of.values():
        counts[bucket] = counts.get(bucket, 0) + 1
    return DatasetView(root.relative(folder), _layout(folder), rows, errors, counts)


def thumbnail(root: Root, path: str, cache_dir: Path, side: int = THUMB_SIDE) -> Path:
    """A JPEG of the image at `path` fitted into side x side, cached on disk by path, size and mtime."""
    from PIL import Image

    from kontext_lora.data.triples import IMAGE_EXTENSIONS

    source = root.resolve(path)
    if source.suffix.lower() not in IMAGE_EXTENSIONS:
        raise PathRefused(f"{path} is not an image")
    stat = source.stat()
    name = hashlib.sha1(f"{source}:{stat.st_size}:{stat.st_mtime_ns}:{side}".encode()).hexdigest()
    cached = cache_dir / "thumbs" / f"{name}.jpg"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as img:
            img.draft("RGB", (side, side))  # JPEG: decode at a fraction of the size
            img = img.convert("RGB")
            img.thumbnail((side, side))
            atomic_save_image(img, cached, "JPEG", quality=85)  # a unique temp name: concurrent requests may race
    return cached


def _flags(folder: Path) -> set[str]:
    try:
        return {line.strip() for line in (folder / FLAG_FILE).read_text().splitlines() if line.strip()}
    except OSError:
        return set()


def set_flag(root: Root, path: str, stem: str, flagged: bool) -> bool:
    folder = root.resolve(path)
    stems = _flags(folder)
    stems = stems | {stem} if flagged else stems - {stem}
    atomic_write_text(folder / FLAG_FILE, "".join(f"{s}\n" for s in sorted(stems)))
    return flagged


def _triple(folder: Path, stem: str, control_keys: list[str]):
    from kontext_lora.data.sources import discover_dataset
    from kontext_lora.data.triples import DataError

    try:
        triples = discover_dataset(DatasetConfig(path=str(folder), control_keys=control_keys))
    except DataError as exc:
        raise EditRefused(str(exc)) from None
    for triple in triples:
        if triple.stem == stem:
            return triple
    raise EditRefused(f"no pair with stem {stem!r} in {folder}")


def write_caption(root: Root, path: str, stem: str, caption: str, control_keys: list[str]) -> Path:
    """Write the pair's caption where discovery reads it; returns the file written."""
    folder = root.resolve(path)
    triple = _triple(folder, stem, control_keys)
    layout = _layout(folder)
    caption = caption.replace("\r\n", "\n").strip()
    if layout == "folder":
        target = Path(triple.target)
        file = target.with_suffix(".txt")
        atomic_write_text(file, caption + "\n")
        return file
    if layout == "jsonl":
        return _rewrite_jsonl(folder, Path(triple.target), caption=caption)
    raise EditRefused(f"{folder / 'metadata.csv'}: edit captions of a csv dataset in the csv file itself")


def drop_pair(root: Root, path: str, stem: str, control_keys: list[str]) -> list[Path]:
    """Move the pair's files into `<dataset>/.dropped/` (same relative paths); returns where they went."""
    folder = root.resolve(path)
    triple = _triple(folder, stem, control_keys)
    layout = _layout(folder)
    files = [Path(ref) for ref in (*triple.controls, triple.target, triple.mask) if ref is not None]
    if layout == "folder":
        caption = Path(triple.target).with_suffix(".txt")
        files += [caption] if caption.is_file() else []
    elif layout == "jsonl":
        _rewrite_jsonl(folder, Path(triple.target), drop=True)
    else:
        raise EditRefused(f"{folder / 'metadata.csv'}: drop rows of a csv dataset in the csv file itself")
    moved = []
    for file in files:
        if not file.resolve().is_relative_to(folder):
            continue  # a metadata line may name a file elsewhere: only the listing goes
        destination = folder / DROP_DIR / file.resolve().relative_to(folder)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(file, destination)
        moved.append(destination)
    return moved


def _rewrite_jsonl(folder: Path, target: Path, caption: str | None = None, drop: bool = False) -> Path:
    """Change the caption of (or remove) the metadata.jsonl line whose target is `target`; dropped lines are kept
    in .dropped/metadata.jsonl."""
    metadata = folder / "metadata.jsonl"
    lines, dropped = [], []
    for line in metadata.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            lines.append(line)
            continue
        listed = record.get("target") if isinstance(record, dict) else None
        if isinstance(listed, str) and (folder / listed).resolve() == target.resolve():
            if drop:
                dropped.append(line)
                continue
            record["caption"] = caption
            line = json.dumps(record, ensure_ascii=False)
        lines.append(line)
    atomic_write_text(metadata, "".join(line + "\n" for line in lines))
    if dropped:
        (folder / DROP_DIR).mkdir(exist_ok=True)
        with open(folder / DROP_DIR / "metadata.jsonl", "a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in dropped))
    return metadata
