"""A job's phases: wall time and accelerator memory of each, and out-of-memory errors a user can act on.

A training job is load -> cache -> setup (quantize, swap, compile set-up) -> first step (compiles) -> steps ->
validation -> save. `JobLog.phase(name)` times one phase and records the accelerator's allocator peaks in it,
accumulating over repeated entries (every training step enters "train"); the record is rewritten atomically to
<output.dir>/job.json after each phase, so a crashed job still shows how far it got and what each phase cost.
`scripts/bench_e2e.py` reads it, and the planner's whole-job prediction is calibrated on it.

Out of memory inside a phase becomes `JobOutOfMemory`, one line naming the phase, what the allocation needed
against what was in use and the limit, and the setting to change; the training loop saves a resumable checkpoint
before it reaches the user (train/loop.py).
"""

from __future__ import annotations

import gc
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kontext_lora.atomic import atomic_write_text
from kontext_lora.errors import UserError
from kontext_lora.model.device import device_limit_bytes
from kontext_lora.run_files import JOB_NAME  # noqa: F401  (imported from here by the loop and the bench)

GIB = 2**30

# What to change when a phase runs out of memory.
OOM_ADVICE = {
    "cache": "set memory.text_encoder=cpu_offload (each text encoder on the device only while it encodes)",
    "load": "set memory.budget_gib to your card's memory so the planner quantizes or swaps the base",
    "setup": "set memory.budget_gib lower, or memory.base_quant=fp8 / memory.block_swap=N",
    "first_step": "set memory.budget_gib lower (the planner recomputes more), or lower train.batch_size / the buckets",
    "train": "set memory.budget_gib lower (the planner recomputes more), or lower train.batch_size / the buckets",
    "validation": "lower validation.max_images, validation.every=0, or set memory.budget_gib lower",
    "save": "set memory.budget_gib lower",
    "infer": "use --offload group (blocks streamed from CPU memory)",
}


class JobOutOfMemory(UserError, RuntimeError):
    """The accelerator ran out of memory in a phase; the message says where, how much, and what to change."""


def oom_message(phase: str, exc: BaseException, device: torch.device) -> str:
    """One line: the phase, the failed allocation against the memory in use and the limit, and what to change."""
    asked = re.search(r"Tried to allocate ([0-9.]+ [KMGT]i?B)", str(exc))
    parts = [f"out of accelerator memory in {phase}"]
    if asked:
        parts.append(f"needed {asked.group(1)} more")
    if device.type == "cuda":
        in_use = torch.cuda.memory_reserved(device) / GIB
        limit = device_limit_bytes(device)
        parts.append(f"with {in_use:.1f} GiB in use" + (f" of {limit / GIB:.1f} GiB" if limit else ""))
    advice = OOM_ADVICE.get(phase, "set memory.budget_gib lower")
    return ", ".join(parts) + f"; {advice}"


def free_accelerator_memory() -> None:
    """Collect garbage and hand cached blocks back (after an out-of-memory error dropped its tensors)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_allocated_gib(device: torch.device) -> float | None:
    """Peak memory allocated on the accelerator since the current phase began (`JobLog.phase` resets it), in GiB;
    None on CPU, where torch does not track it."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return None


class JobLog:
    """Per-phase wall time and allocator peaks (GiB) of one job, written to `path` as JSON after every phase.

    {"device": "...", "limit_gib": 24.0, "phases": {"cache": {"wall_s", "alloc_peak_gib", "reserved_peak_gib",
    "entries", "spans": [[t0, t1], ...]}, ...}}; spans are wall-clock times (time.time()), merged when they touch,
    so a tool sampling the device's memory from outside can attribute its samples to phases.
    """

    def __init__(self, path: Path | None, device: torch.device, write: bool = True):
        self.path, self.device, self.write = path, device, write and path is not None
        limit = device_limit_bytes(device)
        self.record: dict = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "limit_gib": round(limit / GIB, 3) if limit else None,
            "phases": {},
        }

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase `name`; out of memory in it raises `JobOutOfMemory` (after freeing what it can)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start, failed = time.time(), None
        try:
            yield
        except torch.OutOfMemoryError as exc:
            failed = oom_message(name, exc, self.device)
        finally:
            self._add(name, start, time.time(), cuda, failed)
        if failed is not None:  # outside the except block: the error's frames (and their tensors) are released
            free_accelerator_memory()
            raise JobOutOfMemory(failed)

    def _add(self, name: str, start: float, end: float, cuda: bool, failed: str | None) -> None:
        entry = self.record["phases"].setdefault(
            name, {"wall_s": 0.0, "alloc_peak_gib": 0.0, "reserved_peak_gib": 0.0, "entries": 0, "spans": []}
        )
        entry["wall_s"] = round(entry["wall_s"] + end - start, 4)
        entry["entries"] += 1
        if cuda:
            alloc = torch.cuda.max_memory_allocated(self.device) / GIB
            reserved = torch.cuda.max_memory_reserved(self.device) / GIB
            entry["alloc_peak_gib"] = round(max(entry["alloc_peak_gib"], alloc), 3)
            entry["reserved_peak_gib"] = round(max(entry["reserved_peak_gib"], reserved), 3)
        spans = entry["spans"]
        if spans and start - spans[-1][1] < 1.0:
            spans[-1][1] = round(end, 3)
        else:
            spans.append([round(start, 3), round(end, 3)])
        if failed is not None:
            entry["out_of_memory"] = failed
        if name != "train" or failed is not None:  # steps are many: the loop flushes them at checkpoints
            self.flush()

    def flush(self) -> None:
        """Write the record now (the training loop calls this at checkpoints and at the end)."""
        if not self.write:
            return
        atomic_write_text(self.path, json.dumps(self.record, indent=1, sort_keys=True))


def read_job(path: str | Path) -> dict:
    """The JSON record a `JobLog` wrote."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
