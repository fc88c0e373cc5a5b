"""Disk caches of encodings: content-addressed safetensors shards.

Every cached tensor is named by a key: a hash of everything that determines it (the image file's bytes, the
model's identity, the bucket, the transform; or the caption text, the text encoders' identity and the sequence
length). A changed image, caption or setting therefore gets a new key and is recomputed; every other entry is
found again. Shards are written whole and renamed into place, so an interrupted run leaves complete shards only
and the next run computes just the missing keys (resumable), and several processes can fill one cache at once.

Integrity: each shard's metadata holds the sha256 of every tensor's bytes. Before a run reads the cache it
`verify`s the entries it needs: one that fails its checksum, or holds NaN or infinity, is reported and computed
again. The model identity in every key hashes the whole of each weight file (remembered in `file_digests.json`
by path, size and mtime, so a large model is read once), so any change to the weights recomputes. A run filling
the cache holds `.lock` (an flock): a second run sharing the folder waits, then computes only what is still missing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kontext_lora.atomic import atomic_path, atomic_write_text, umask_mode
from kontext_lora.data.triples import DataError, ImageRef, RowImage

SHARD_SUFFIX = ".safetensors"
SHARD_MAX_BYTES = 256 * 2**20  # a shard is flushed at this size: bounded memory while caching, few files
_FILE_DIGESTS: dict[tuple, str] = {}


def entry_key(*parts: object) -> str:
    """A stable 160-bit hex key of JSON-serialisable parts."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def content_digest(ref: ImageRef) -> str:
    """sha256 of an image's bytes (memoised per process by path, size and mtime)."""
    if isinstance(ref, RowImage):
        memo = (str(ref),)
        if memo not in _FILE_DIGESTS:
            _FILE_DIGESTS[memo] = hashlib.sha256(ref.read_bytes()).hexdigest()
        return _FILE_DIGESTS[memo]
    try:
        stat = ref.stat()
    except OSError as exc:
        raise DataError(f"cannot read {ref}: {exc.strerror or exc}") from exc
    memo = (str(ref), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(ref, "rb") as handle:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
        _FILE_DIGESTS[memo] = digest.hexdigest()
    return _FILE_DIGESTS[memo]


def file_digest(path: Path, index: dict[str, list]) -> str:
    """sha256 of a whole file, taken from `index` ({path: [size, mtime_ns, digest]}) while size and mtime match."""
    stat = path.stat()
    known = index.get(str(path))
    if known and known[:2] == [stat.st_size, stat.st_mtime_ns]:
        return known[2]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**24), b""):
            digest.update(block)
    index[str(path)] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
    return index[str(path)][2]


def folder_identity(
    folder: str | os.PathLike, subfolders: Iterable[str], digest_index: str | os.PathLike | None = None
) -> str:
    """Identity of model files on disk without loading them: the sha256 of every file of `subfolders`.

    A weight file is hashed whole once; its digest is remembered by path, size and mtime in the JSON file
    `digest_index` (when given) and in this process, so later runs read only the file's size and mtime.
    """
    index_path = Path(digest_index) if digest_index else None
    index: dict[str, list] = {}
    if index_path is not None and index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):  # a damaged index is only a lost memo: every file is hashed again
            index = {}
    known = dict(index)
    index.update(_FOLDER_DIGESTS)
    digest = hashlib.sha256()
    for sub in subfolders:
        base = Path(folder) / sub
        if not base.is_dir():
            digest.update(f"{sub}:absent".encode())
            continue
        for path in sorted(base.rglob("*")):
            if not path.is_file():
                continue
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(file_digest(path.resolve(), index).encode())
    _FOLDER_DIGESTS.update(index)
    if index_path is not None and index != known:
        atomic_write_text(index_path, json.dumps(index, indent=1, sort_keys=True))
    return digest.hexdigest()[:24]


_FOLDER_DIGESTS: dict[str, list] = {}  # this process's memo of `file_digest`, by resolved path


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (any dtype)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


class DiskCache:
    """A folder of safetensors shards; `get(name)` reads one tensor, `writer()` appends new shards."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.index: dict[str, list[Path]] = {}  # name -> the shards holding it (a recomputed entry: more than one)
        self.digests: dict[tuple[Path, str], str] = {}
        self.damaged: set[tuple[Path, str]] = set()  # copies `verify` found bad: never read, even after a refresh
        self._handles: dict[Path, object] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read the names (and checksums) held by every shard on disk (reads the headers only)."""
        self.index, self.digests = {}, {}
        if not self.folder.is_dir():
            return
        for shard in sorted(self.folder.glob(f"*{SHARD_SUFFIX}")):
            try:
                with safe_open(str(shard), framework="pt") as handle:
                    names, metadata = list(handle.keys()), handle.metadata() or {}
            except Exception:  # a foreign or damaged file: its entries are simply recomputed
                continue
            for name in names:
                if (shard, name) in self.damaged:
                    continue
                self.index.setdefault(name, []).append(shard)
                if name in metadata:
                    self.digests[(shard, name)] = metadata[name]

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def get(self, name: str) -> torch.Tensor:
        """The tensor stored under `name` (a fresh CPU tensor)."""
        return self._read(self.index[name][0], name)

    def _read(self, shard: Path, name: str) -> torch.Tensor:
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(shard), framework="pt")
        return handle.get_tensor(name)

    def verify(self, names: Iterable[str]) -> int:
        """Check each of `names` against its checksum and for NaN / infinity; a copy that fails is dropped (reported
        once per shard on stderr), so the name counts as missing and is computed again. Returns the copies dropped."""
        dropped: dict[Path, list[str]] = {}
        for name in names:
            for shard in list(self.index.get(name, ())):
                if not self._intact(shard, name):
                    self.index[name].remove(shard)
                    self.damaged.add((shard, name))
                    dropped.setdefault(shard, []).append(name)
            if name in self.index and not self.index[name]:
                del self.index[name]
        for shard, bad in dropped.items():
            print(f"[kontext-lora] warning: cache shard {shard}: {len(bad)} entries fail their checksum or hold "
                  "NaN/inf; computing them again", file=sys.stderr)  # fmt: skip
        return sum(len(bad) for bad in dropped.values())

    def _intact(self, shard: Path, name: str) -> bool:
        expected = self.digests.get((shard, name))
        if expected is None:  # a shard without checksums cannot be trusted
            return False
        try:
            tensor = self._read(shard, name)
        except Exception:  # safetensors' errors (a cut shard) are not one class
            return False
        if tensor_digest(tensor) != expected:
            return False
        return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())

    @contextmanager
    def writing(self, enabled: bool = True) -> Iterator[None]:
        """Hold the cache's `.lock` while this run fills it (another run waits), and remove the temp files that an
        interrupted writer left. `enabled=False` (the other processes of one distributed run) does nothing."""
        if not enabled:
            yield
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"[kontext-lora] waiting for another run filling the cache {self.folder}", file=sys.stderr)
                fcntl.flock(handle, fcntl.LOCK_EX)
            for leftover in self.folder.glob("*.tmp"):
                leftover.unlink(missing_ok=True)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def writer(self, prefix: str = "shard") -> ShardWriter:
        return ShardWriter(self, prefix)

    def __getstate__(self) -> dict:  # DataLoader workers: open handles do not pickle, each worker reopens
        return {**self.__dict__, "_handles": {}}


class ShardWriter:
    """Collects tensors and writes them as shards of at most SHARD_MAX_BYTES (atomically: temp file + rename)."""

    def __init__(self, cache: DiskCache, prefix: str) -> None:
        self.cache, self.prefix = cache, prefix
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= SHARD_MAX_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        self.cache.folder.mkdir(parents=True, exist_ok=True)
        path = self.cache.folder / f"{self.prefix}-{uuid.uuid4().hex[:16]}{SHARD_SUFFIX}"
        digests = {name: tensor_digest(tensor) for name, tensor in self.pending.items()}
        with atomic_path(path) as tmp:  # its temp name ends in .tmp: `lock` removes those an interrupted run left
            save_file(self.pending, str(tmp), metadata=digests)
            os.chmod(tmp, umask_mode())  # safetensors creates files 0600
        for name in self.pending:
            self.cache.index.setdefault(name, []).insert(0, path)
            self.cache.digests[(path, name)] = digests[name]
        self.pending, self.pending_bytes = {}, 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()  # also on KeyboardInterrupt: what was computed is kept
