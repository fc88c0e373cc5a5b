"""Resumable checkpoints: step-NNNNNN/ folders written atomically, with nothing pickled.

A checkpoint folder holds the adapter (diffusers format, as every save), and the training state:

    training_state.safetensors + training_state.json   optimizer, scheduler, EMA, grad scaler, data position
    rng_<rank>.safetensors + rng_<rank>.json             noise generator, torch / CUDA / numpy / python RNGs
    checkpoint.json                                      written last: the folder is complete

Why not accelerate's `save_state` / `load_state`: they pickle the optimizer, scheduler and RNG states
(`torch.save` of Python objects), which the project forbids (a pickle runs code when loaded), and they know
nothing of our data position or metrics log. Here every tensor goes to safetensors and every other value to JSON;
`encode_state` / `decode_state` split any nested state dict (optimizer, scheduler, ...) into the two.

Atomicity: everything is written into `.tmp-step-NNNNNN/` beside the final folder, each file fsync'ed, the
completion marker written last, then the folder is renamed into place (an atomic rename on POSIX). A crash at
any moment leaves either the previous checkpoints untouched plus a temp folder (ignored, removed at the next
start) or the new complete folder. `latest_checkpoint` only ever returns folders that hold the marker.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

MARKER = "checkpoint.json"
STATE_NAME = "training_state"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Test hook: seconds to sleep after the files are written and before the marker and rename, so a test can
# SIGKILL the production code path while a checkpoint is half written. Unset in normal use.
WRITE_DELAY_ENV = "KONTEXT_LORA_TEST_CHECKPOINT_DELAY"


class CheckpointError(RuntimeError):
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
    save_file(tensors, str(folder / f"{name}.safetensors"))
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
    for path in tmp.rglob("*"):
        if path.is_file():
            _fsync_file(path)
    _write_json(tmp / MARKER, {"format": FORMAT_VERSION, **info})
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


def resolve_resume(resume: str, out_dir: Path) -> Path | None:
    """`train.resume` -> the checkpoint folder to load: '' none, 'latest' the newest complete one (None if no
    checkpoint exists yet, so the same command starts or continues a run), else the given folder."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(out_dir)
    folder = Path(resume)
    if not folder.is_dir():
        raise CheckpointError(f"config key `train.resume`: {folder} is not a folder; use `latest` or a step-* folder")
    if not is_complete(folder):
        raise CheckpointError(
            f"config key `train.resume`: {folder} is not a complete checkpoint (no {MARKER}); "
            "it was interrupted while being written or is an adapter-only save: pick an earlier step-* folder"
        )
    return folder


def read_marker(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / MARKER).read_text())


# ------------------------------------------------------------------------------------------------- helpers


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
