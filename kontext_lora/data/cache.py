"""Disk caches of encodings: content-addressed safetensors shards.

Every cached tensor is named by a key: a hash of everything that determines it (the image file's bytes, the
model's identity, the bucket, the transform; or the caption text, the text encoders' identity and the sequence
length). A changed image, caption or setting therefore gets a new key and is recomputed; every other entry is
found again. Shards are written whole and renamed into place, so an interrupted run leaves complete shards only
and the next run computes just the missing keys (resumable), and several processes can fill one cache at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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


def folder_identity(folder: str | os.PathLike, subfolders: Iterable[str]) -> str:
    """Identity of model weights on disk without loading them: config files, and size + first/last MiB of weights.

    Cheap enough to run every time, and it changes when the weights do (even two random models of equal shapes).
    """
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
            size = path.stat().st_size
            digest.update(str(size).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read(2**20))
                if size > 2**21:
                    handle.seek(-(2**20), os.SEEK_END)
                    digest.update(handle.read())
    return digest.hexdigest()[:24]


class DiskCache:
    """A folder of safetensors shards; `get(name)` reads one tensor, `writer()` appends new shards."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.index: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read the names held by every shard on disk (reads the headers only)."""
        self.index = {}
        if not self.folder.is_dir():
            return
        for shard in sorted(self.folder.glob(f"*{SHARD_SUFFIX}")):
            try:
                with safe_open(str(shard), framework="pt") as handle:
                    names = list(handle.keys())
            except Exception:  # a foreign or damaged file: its entries are simply recomputed
                continue
            for name in names:
                self.index[name] = shard

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def get(self, name: str) -> torch.Tensor:
        """The tensor stored under `name` (a fresh CPU tensor)."""
        shard = self.index[name]
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(shard), framework="pt")
        return handle.get_tensor(name)

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
        tmp = path.with_suffix(".tmp")
        save_file(self.pending, str(tmp))
        os.replace(tmp, path)
        for name in self.pending:
            self.cache.index[name] = path
        self.pending, self.pending_bytes = {}, 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()  # also on KeyboardInterrupt: what was computed is kept
