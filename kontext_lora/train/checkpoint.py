"""Resumable checkpoints: step-NNNNNN/ folders written atomically, with nothing pickled.

A checkpoint folder holds the adapter (diffusers format, as every save), and the training state:

    training_state.safetensors + training_state.json   optimizer, scheduler, EMA, grad scaler, data position
    rng_<rank>.safetensors + rng_<rank>.json             noise generator, torch / CUDA / numpy / python RNGs
    checkpoint.json                                      written last: the folder is complete, with the sha256
                                                         of every other file in it

Why not accelerate's `save_state` / `load_state`: they pickle the optimizer, scheduler and RNG states
(`torch.save` of Python objects), which the project forbids (a pickle runs code when loaded), and they know
nothing of our data position or metrics log. Here every tensor goes to safetensors and every other value to JSON;
`encode_state` / `decode_state` split any nested state dict (optimizer, scheduler, ...) into the two.

Atomicity: everything is written into `.tmp-step-NNNNNN/` beside the final folder, each file fsync'ed, the
completion marker written last, then the folder is renamed into place (an atomic rename on POSIX). A crash at
any moment leaves either the previous checkpoints untouched plus a temp folder (ignored, removed at the next
start) or the new complete folder. `latest_checkpoint` only ever returns folders that hold the marker.

Integrity: a resume checks every file of the checkpoint against the checksums in its marker. A damaged checkpoint
(a file cut, changed or missing) is never loaded: `train.resume=latest` reports it in one line and takes the
previous good one; a checkpoint named explicitly stops the run with one line naming the damaged file.

The run folder: `RunLock` holds `.run.lock` (an flock, with the holder's pid) for as long as a run writes there, so a
second run into the same output.dir stops at once; `claim_run_folder` refuses a folder that holds another run
unless the user resumes it or asks to overwrite it. The names of the run folder's files are defined here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from kontext_lora.atomic import remove_leftovers
from kontext_lora.errors import UserError
from kontext_lora.export.diffusers_format import WEIGHT_NAME, save_safetensors
from kontext_lora.run_files import (  # noqa: F401  (the run folder's names, re-exported for the loop)
    BEST_DIR,
    BEST_JSON,
    CARD_NAME,
    CONFIG_NAME,
    LOCK_NAME,
    LOGS_DIR,
    METRICS_NAME,
    PREFLIGHT_NAME,
    STATE_NAME,
    VALIDATION_DIR,
)
from kontext_lora.run_files import CHECKPOINT_MARKER as MARKER
from kontext_lora.run_files import EMA_ADAPTER_NAME as EMA_WEIGHT_NAME

FORMAT_VERSION = 2  # 2: the marker holds a sha256 of every file ("files"); 1 had none (loaded unchecked)
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Test hook: seconds to sleep after the files are written and before the marker and rename, so a test can
# SIGKILL the production code path while a checkpoint is half written. Unset in normal use.
WRITE_DELAY_ENV = "KONTEXT_LORA_TEST_CHECKPOINT_DELAY"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint folder cannot be used; the message names the folder."""


# --------------------------------------------------------------------------------- nested state <-> files


def encode_state(value: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Split a nested state into a JSON-able tree; tensors (and numpy arrays) move into `tensors` by key path."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, np.ndarray):
        tensors[prefix] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "ui" else value.copy())
        return {"__ndarray__": prefix, "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: encode_state(item, tensors, f"{prefix}.{key}") for key, item in value.items()}
        # int keys (optimizer state is keyed by parameter index): keep their type through JSON
        return {"__items__": [[key, encode_state(item, tensors, f"{prefix}.{key}")] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [encode_state(item, tensors, f"{prefix}.{i}") for i, item in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"cannot store a {type(value).__name__} at `{prefix}` without pickling it")


def decode_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `encode_state`."""
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return tensors[value["__ndarray__"]].numpy().astype(value["dtype"])
        if "__items__" in value:
            return {key: decode_state(item, tensors) for key, item in value["__items__"]}
        if "__tuple__" in value:
            return tuple(decode_state(item, tensors) for item in value["__tuple__"])
        return {key: decode_state(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [decode_state(item, tensors) for item in value]
    return value


def write_state(folder: Path, name: str, state: dict[str, Any]) -> None:
    """Write `state` as <name>.safetensors (its tensors) + <name>.json (everything else), both fsync'ed."""
    tensors: dict[str, torch.Tensor] = {}
    tree = encode_state(state, tensors)
    save_safetensors(tensors, folder / f"{name}.safetensors")
    _fsync_file(folder / f"{name}.safetensors")
    _write_json(folder / f"{name}.json", tree)


def read_state(folder: Path, name: str) -> dict[str, Any]:
    """Read a state written by `write_state` (tensors are loaded with safetensors, nothing is unpickled)."""
    try:
        with safe_open(str(folder / f"{name}.safetensors"), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        tree = json.loads((folder / f"{name}.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {folder}: cannot read {name} ({exc})") from None
    return decode_state(tree, tensors)


# --------------------------------------------------------------------------------------------- RNG states


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every random state a training step draws from: our generators, torch (CPU and CUDA), numpy, python."""
    state: dict[str, Any] = {
        "generators": {name: gen.get_state() for name, gen in generators.items()},
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    for name, gen in generators.items():
        gen.set_state(state["generators"][name])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ folders on disk


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"step-{step:06d}"


def temp_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f".tmp-step-{step:06d}"


def is_complete(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Complete step-NNNNNN checkpoint folders under `out_dir`, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for path in out_dir.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint under `out_dir` (half-written ones never count), or None."""
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def begin(out_dir: Path, step: int) -> Path:
    """Create an empty temp folder for the checkpoint of `step` (main process only)."""
    tmp = temp_dir(out_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, final: Path, info: dict[str, Any]) -> Path:
    """Finish a checkpoint: fsync, write the marker last, rename the temp folder into place (main process only)."""
    delay = float(os.environ.get(WRITE_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)
    files = {}
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            _fsync_file(path)
            files[path.relative_to(tmp).as_posix()] = _sha256(path)
    _write_json(tmp / MARKER, {"format": FORMAT_VERSION, **info, "files": files})
    _fsync_dir(tmp)
    replace_dir(tmp, final)
    return final


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the folder `tmp` to `final` by renames, replacing an existing `final` (e.g. an adapter-only save)."""
    trash = final.with_name(f".trash-{final.name}")
    if trash.exists():
        shutil.rmtree(trash)
    if final.exists():
        os.rename(final, trash)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if trash.exists():
        shutil.rmtree(trash)


def prune(out_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps all); returns the deleted folders."""
    if keep_last <= 0:
        return []
    old = complete_checkpoints(out_dir)[:-keep_last]
    for folder in old:
        # Renamed first, so a crash mid-delete cannot leave a partial folder that still holds its marker.
        doomed = folder.with_name(f".deleting-{folder.name}")
        os.rename(folder, doomed)
        shutil.rmtree(doomed)
    return old


def clean_stale(out_dir: Path) -> None:
    """Tidy up after a crash (main process, before training starts): remove temp and half-deleted folders, and put
    back a folder that `replace_dir` had moved aside when the crash came before its replacement was in place."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    for path in sorted(out_dir.iterdir()):
        if not path.is_dir():
            continue
        if path.name.startswith(".trash-"):
            original = path.with_name(path.name.removeprefix(".trash-"))
            if original.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, original)
        elif path.name.startswith((".tmp-step-", ".tmp-best", ".deleting-")):
            shutil.rmtree(path, ignore_errors=True)


def verify(folder: Path) -> None:
    """Check every file of a complete checkpoint against the sha256 its marker holds; CheckpointError names the first
    file that is missing or differs. A folder that verified is remembered per process, by its files' sizes and
    mtimes."""
    folder = Path(folder)
    try:
        memo = (str(folder), *sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()))
        if memo in _VERIFIED:
            return
        marker = read_marker(folder)
        files = marker.get("files", {}) if marker.get("format", 1) >= 2 else {}
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {folder} is damaged: {folder / MARKER} cannot be read ({exc})") from None
    if marker.get("format", 1) >= 2 and not files:
        raise CheckpointError(f"checkpoint {folder} is damaged: {folder / MARKER} lists no files")
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is damaged: {path} is missing")
        if _sha256(path) != digest:
            raise CheckpointError(f"checkpoint {folder} is damaged: {path} does not match its checksum")
    _VERIFIED.add(memo)


_VERIFIED: set[tuple] = set()
_REPORTED: set[str] = set()


def resolve_resume(resume: str, out_dir: Path) -> Path | None:
    """`train.resume` -> the checkpoint folder to load: '' none, 'latest' the newest complete one that verifies
    (a damaged one is reported on stderr and skipped; None if there is no checkpoint yet, so the same command
    starts or continues a run), else the given folder, which must verify."""
    if not resume:
        return None
    if resume == "latest":
        found = complete_checkpoints(out_dir)
        for folder in reversed(found):
            try:
                verify(folder)
                return folder
            except CheckpointError as exc:
                if str(exc) not in _REPORTED:  # once per process, though the resume is resolved twice
                    _REPORTED.add(str(exc))
                    print(f"[kontext-lora] warning: {exc}; skipped for the previous checkpoint", file=sys.stderr)
        if found:
            raise CheckpointError(
                f"config key `train.resume`: every checkpoint in {out_dir} is damaged (see the warnings above); "
                "resume from a copy, or start over with output.overwrite=true"
            )
        return None
    folder = Path(resume)
    if not folder.is_dir():
        raise CheckpointError(f"config key `train.resume`: {folder} is not a folder; use `latest` or a step-* folder")
    if not is_complete(folder):
        raise CheckpointError(
            f"config key `train.resume`: {folder} is not a complete checkpoint (no {MARKER}); "
            "it was interrupted while being written or is an adapter-only save: pick an earlier step-* folder"
        )
    try:
        verify(folder)
    except CheckpointError as exc:
        raise CheckpointError(f"config key `train.resume`: {exc}; pick another step-* folder") from None
    return folder


def read_marker(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / MARKER).read_text())


# ------------------------------------------------------------------------------------------ the run folder


class RunFolderError(UserError, RuntimeError):
    """output.dir cannot be used by this run (another run holds it, or it holds another run's files)."""


_HELD: dict[str, list] = {}  # resolved output.dir -> [file descriptor, depth]: the locks this process holds


@contextmanager
def run_lock(out_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold `.run.lock` in `out_dir` (created) while the block runs: an exclusive flock, which the kernel drops when
    the process ends however it ends, so a lock left by a killed run is free again. A second process gets a
    RunFolderError naming the holder's pid at once. Re-entrant within a process; `enabled=False` does nothing
    (the non-main processes of a distributed run)."""
    if not enabled:
        yield
        return
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    key = str(out_dir.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    path = out_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(
                f"output.dir {out_dir} is in use by another run (pid {_lock_holder(path)}); wait for it to finish or "
                "choose another output.dir"
            ) from None
        try:  # the holder before us unlinks the file as it lets go: a lock on that unlinked file does not count
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        path.unlink(missing_ok=True)
        os.close(fd)  # releases the flock
        if created and not any(out_dir.iterdir()):  # a run that failed before writing leaves no folder behind
            out_dir.rmdir()


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def run_files(out_dir: Path) -> list[Path]:
    """The files and folders of a run in `out_dir` (adapters, checkpoints, metrics, best, validation, logs,
    exports); the cache, config.yaml, preflight.jpg and a sweep's status files are not a run's results."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    names = {WEIGHT_NAME, EMA_WEIGHT_NAME, METRICS_NAME, BEST_DIR, BEST_JSON, VALIDATION_DIR, LOGS_DIR}
    found = []
    for path in sorted(out_dir.iterdir()):
        name = path.name
        if (name in names or _STEP_DIR.match(name) or name.endswith(("_kohya.safetensors", "_comfyui.safetensors"))
                or name.startswith((".tmp-step-", ".tmp-best", ".trash-", ".deleting-"))):  # fmt: skip
            found.append(path)
    if any(p.name.endswith(("_kohya.safetensors", "_comfyui.safetensors")) for p in found):
        found += [out_dir / CARD_NAME] if (out_dir / CARD_NAME).is_file() else []  # the exports' model card
    return found


def claim_run_folder(out_dir: Path, resume: str, overwrite: bool) -> None:
    """Make `out_dir` this run's, before anything is written there (main process, holding `run_lock`).

    A folder that holds another run is refused unless train.resume continues it or output.overwrite deletes its
    files first, so no run retrains over a finished one or leaves its best/ and best.json behind. A resume with no
    checkpoint yet (`latest` in a folder whose first attempt ended before one) starts over in the same way.
    Temp files of an interrupted write are removed.
    """
    out_dir = Path(out_dir)
    clean_stale(out_dir)
    for name in (WEIGHT_NAME, EMA_WEIGHT_NAME, METRICS_NAME, BEST_JSON, CONFIG_NAME, PREFLIGHT_NAME):
        remove_leftovers(out_dir / name)
    found = [p for p in run_files(out_dir) if not p.name.startswith(".")]
    if not found:
        return
    finished = (out_dir / WEIGHT_NAME).is_file()
    if resume and (resume != "latest" or complete_checkpoints(out_dir)):
        return  # continued: its files stay, metrics past the checkpoint are dropped at the resume
    if resume and finished and not overwrite:
        raise RunFolderError(
            f"output.dir {out_dir} holds a finished run and no checkpoint to continue from (output.save_every=0); "
            "set output.overwrite=true to train it again"
        )
    if not resume and not overwrite:
        kind = "a finished run" if finished else "an unfinished run"
        raise RunFolderError(
            f"output.dir {out_dir} holds {kind} ({', '.join(p.name for p in found[:3])}"
            f"{', ...' if len(found) > 3 else ''}); continue it with train.resume=latest, start over with "
            "output.overwrite=true (deletes its results, keeps the cache), or choose another output.dir"
        )
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


# ------------------------------------------------------------------------------------------------- helpers


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
