"""Atomic writes: a file or folder appears complete under its final name, or not at all.

A leaf module (standard library only), so every package may use it without breaking the one-way imports.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for the type hint only: this module stays standard library at run time
    from PIL.Image import Image


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file path beside `path`; write it, and on success it replaces `path` (os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique(path, ".tmp", lambda name: os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` through `atomic_path`: a reader sees the old file or the new one, never half of it."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def atomic_save_image(image: Image, path: str | os.PathLike, format: str, **options: Any) -> Path:
    """Save a PIL image to `path` through `atomic_path` (`image.save(tmp, format=format, **options)`): the format
    is named because the temp file's suffix says nothing of it."""
    with atomic_path(path) as tmp:
        image.save(tmp, format=format, **options)
    return Path(path)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; fill it, and on success it replaces the folder `path` by a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique(path, "", lambda name: os.mkdir(name, 0o777))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _unique(path: Path, suffix: str, create) -> Path:
    """Create `.<name>.<random><suffix>` beside `path` with `create` (which fails if it exists) and return it.

    Unlike tempfile's mkstemp / mkdtemp (modes 0600 / 0700), the file or folder gets the mode the user's umask
    gives, as one written in place would.
    """
    while True:
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate


def umask_mode(mode: int = 0o666) -> int:
    """`mode` as the user's umask leaves it: what a file created in place would get."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files and folders that an interrupted `atomic_path` / `atomic_directory` left beside `path`
    (`.<name>.<random>[.tmp]`); returns them. Call it only where no other writer of `path` can be running."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    found = [p for p in path.parent.glob(f".{glob.escape(path.name)}.*")]
    for leftover in found:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return found
