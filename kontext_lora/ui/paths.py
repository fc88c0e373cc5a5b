"""The one place user-given paths are turned into files: everything must resolve inside the UI's root."""

from __future__ import annotations

import os
from pathlib import Path


class PathRefused(ValueError):
    """A requested path lies outside the root (or is not there); the message names it."""


class Root:
    """The folder the UI serves (`--root`); relative paths in configs are read from it, as the CLI run there."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder).resolve()

    def resolve(self, user_path: str | os.PathLike, must_exist: bool = True) -> Path:
        """`user_path` (relative to the root, or absolute) as an absolute path inside the root, symlinks followed.

        Raises PathRefused for anything that ends up outside the root, e.g. `../x` or a link pointing out.
        """
        text = str(user_path)
        if not text or "\x00" in text:
            raise PathRefused(f"path {text!r} is not a valid path")
        candidate = Path(text).expanduser()
        resolved = (candidate if candidate.is_absolute() else self.path / candidate).resolve()
        if not resolved.is_relative_to(self.path):
            raise PathRefused(f"path {text} is outside the UI's root {self.path}")
        if must_exist and not resolved.exists():
            raise PathRefused(f"path {text} does not exist under {self.path}")
        return resolved

    def relative(self, path: str | os.PathLike) -> str:
        """`path` as the root-relative string the pages show and send back."""
        text, prefix = os.fspath(path), f"{self.path}{os.sep}"
        if text.startswith(prefix) and f"{os.sep}..{os.sep}" not in text:  # already inside: no resolving (a page
            return text[len(prefix) :].replace(os.sep, "/")  # of 200 pairs names 400 files)
        resolved = Path(path).resolve() if Path(path).is_absolute() else (self.path / path).resolve()
        return resolved.relative_to(self.path).as_posix() if resolved.is_relative_to(self.path) else str(path)

    def walk(self, skip: frozenset[str] = frozenset(), max_depth: int = 6):
        """(folder, subfolder names, file names) under the root, hidden folders, `skip` names and links left out."""
        for folder, dirs, files in os.walk(self.path):
            depth = len(Path(folder).relative_to(self.path).parts)
            dirs[:] = sorted(
                d
                for d in dirs
                if not d.startswith(".")
                and d not in skip
                and depth < max_depth
                and not os.path.islink(Path(folder) / d)
            )
            yield Path(folder), dirs, files
