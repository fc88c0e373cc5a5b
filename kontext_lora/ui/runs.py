"""The Runs and Sweeps pages' data: run folders as the trainer writes them, and the training processes started here.

A run is launched as `kontext-lora train --config <file> [key=value ...]` in a subprocess (an argv list, never a
shell line) with the root as its working folder, its output in `<output.dir>/train.log`. Stopping sends SIGTERM:
the loop saves a checkpoint at the next step boundary and exits (kontext_lora/train/stop.py); resuming starts
the same command on the run's resolved config.yaml with `train.resume=latest`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kontext_lora.config import load_config
from kontext_lora.run_files import (
    ADAPTER_NAME,
    BEST_DIR,
    BEST_JSON,
    CARD_NAME,
    CHECKPOINT_MARKER,
    CONFIG_NAME,
    LOG_NAME,
    METRICS_NAME,
    VALIDATION_DIR,
)
from kontext_lora.ui.paths import PathRefused, Root

_STEP_DIR = re.compile(r"^step-(\d+)$")
_SKIP = frozenset({"cache", "validation", "logs", "best", "control", "target", "__pycache__", "wandb"})


class LaunchRefused(ValueError):
    """A launch, stop or resume that cannot be done; the message says why."""


class Processes:
    """The training processes started from this UI, by run folder."""

    def __init__(self, root: Root) -> None:
        self.root = root
        self._running: dict[Path, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def command(self, config: Path, overrides: list[str]) -> list[str]:
        """The argv of `kontext-lora train --config <config> [overrides]`, run by this interpreter."""
        return [sys.executable, "-m", "kontext_lora.cli", "train", "--config", self.root.relative(config), *overrides]

    def launch(self, config: Path, overrides: list[str]) -> Path:
        """Check the config as `train` will, then start it; returns the run folder (output.dir)."""
        cfg = load_config(config, overrides)  # a ConfigError names the key before anything starts
        run_dir = self.root.resolve(self.root.path / cfg.output.dir, must_exist=False)
        with self._lock:
            if self.is_running(run_dir):
                raise LaunchRefused(f"a run is already training into {self.root.relative(run_dir)}; stop it first")
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / LOG_NAME, "a", encoding="utf-8")
            log.write(f"$ {shlex.join(['kontext-lora', *self.command(config, overrides)[3:]])}\n")
            log.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self._running[run_dir] = subprocess.Popen(
                self.command(config, overrides), cwd=self.root.path, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
            log.close()
        return run_dir

    def is_running(self, run_dir: Path) -> bool:
        process = self._running.get(run_dir)
        return process is not None and process.poll() is None

    def exit_code(self, run_dir: Path) -> int | None:
        process = self._running.get(run_dir)
        return None if process is None else process.poll()

    def stop(self, run_dir: Path) -> None:
        """Ask the run to checkpoint and exit (SIGTERM; see kontext_lora/train/stop.py)."""
        process = self._running.get(run_dir)
        if process is None or process.poll() is not None:
            raise LaunchRefused(
                f"{self.root.relative(run_dir)} is not training (only runs started here can be stopped)"
            )
        process.send_signal(signal.SIGTERM)

    def resume(self, run_dir: Path) -> Path:
        config = run_dir / CONFIG_NAME
        if not config.is_file():
            raise LaunchRefused(f"{self.root.relative(run_dir)} has no config.yaml to resume from")
        return self.launch(config, ["train.resume=latest"])

    def stop_all(self) -> None:
        for process in self._running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)


def find_runs(root: Root) -> list[Path]:
    """Run folders under the root: a config.yaml beside a metrics.jsonl or a train.log."""
    found = []
    for folder, dirs, files in root.walk(_SKIP):
        if _STEP_DIR.match(folder.name):
            dirs.clear()
            continue
        if CONFIG_NAME in files and (METRICS_NAME in files or LOG_NAME in files):
            found.append(folder)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def read_metrics(run_dir: Path) -> list[dict]:
    from kontext_lora.sweep.state import read_metrics as read

    return read(run_dir)


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete step-NNNNNN checkpoints (those with their completion marker), oldest first."""
    found = []
    for path in run_dir.glob("step-*"):
        match = _STEP_DIR.match(path.name)
        if match and (path / CHECKPOINT_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


@dataclass
class RunView:
    path: str
    name: str
    state: str  # training, done, stopped, failed, incomplete, pending
    step: int
    steps: int | None
    loss: float | None
    losses: list[tuple[int, float]]
    heldout: list[tuple[int, float]]
    grids: list[tuple[int, list[str]]]  # (step, root-relative images), newest first
    best: dict[str, Any] | None
    files: list[tuple[str, int]]  # (root-relative file, bytes): adapters, exports, model card
    card: str
    log_tail: str
    checkpoints: list[int]
    running: bool
    config: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _configured_steps(run_dir: Path) -> int | None:
    try:
        return int((yaml.safe_load((run_dir / CONFIG_NAME).read_text()) or {})["train"]["steps"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def view_run(root: Root, run_dir: Path, processes: Processes) -> RunView:
    from kontext_lora.sweep.state import read_status

    records = read_metrics(run_dir)
    losses = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    heldout = [(r["step"], r["heldout_loss"]) for r in records if isinstance(r.get("heldout_loss"), (int, float))]
    steps = _configured_steps(run_dir)
    step = losses[-1][0] if losses else 0
    running = processes.is_running(run_dir)
    saved = checkpoints(run_dir)
    log = run_dir / LOG_NAME
    log_tail = ""
    if log.is_file():
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - 4000))
            log_tail = handle.read().decode("utf-8", errors="replace").replace("\r", "\n")
    status = read_status(run_dir).get("status")
    if running:
        state = "training"
    elif (run_dir / ADAPTER_NAME).is_file() and (steps is None or step >= steps):
        state = "done"
    elif "kontext-lora: error: stopped by" in log_tail or status == "interrupted":
        state = "stopped"
    elif status == "failed" or "kontext-lora: error:" in log_tail or processes.exit_code(run_dir):
        state = "failed"
    else:
        state = "incomplete" if records else "pending"
    grids = []
    for folder in sorted((run_dir / VALIDATION_DIR).glob("step-*"), reverse=True):
        match = _STEP_DIR.match(folder.name)
        images = sorted(root.relative(p) for p in folder.glob("*.png"))
        if match and images:
            grids.append((int(match.group(1)), images))
    try:
        best = json.loads((run_dir / BEST_JSON).read_text())
    except (OSError, ValueError):
        best = None
    files = []
    for folder in (run_dir, run_dir / BEST_DIR):
        for path in sorted(folder.glob("*")):
            if path.is_file() and (path.suffix == ".safetensors" or path.name == CARD_NAME):
                files.append((root.relative(path), path.stat().st_size))
    card_path = run_dir / CARD_NAME
    card = card_path.read_text(errors="replace") if card_path.is_file() else ""
    return RunView(
        path=root.relative(run_dir), name=run_dir.name, state=state, step=step, steps=steps,
        loss=losses[-1][1] if losses else None, losses=losses, heldout=heldout, grids=grids, best=best,
        files=files, card=card, log_tail=log_tail[-2500:], checkpoints=[s for s, _ in saved], running=running,
        config=root.relative(run_dir / CONFIG_NAME),
    )  # fmt: skip


def find_sweeps(root: Root) -> list[Path]:
    """Sweep folders under the root: those holding a sweep_summary.csv."""
    return sorted(folder for folder, _, files in root.walk(_SKIP) if "sweep_summary.csv" in files)


def read_summary(sweep_dir: Path, sort: str = "", descending: bool = False) -> tuple[list[str], list[dict[str, str]]]:
    """The sweep's summary table (sweep_summary.csv as the sweep wrote it), sorted by one column."""
    with open(sweep_dir / "sweep_summary.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns, rows = list(reader.fieldnames or []), list(reader)
    if sort in columns:

        def key(row: dict[str, str]) -> tuple:
            text = row.get(sort, "")
            try:
                return (0, float(text), "")
            except ValueError:
                return (1 if text == "" else 0, float("inf"), text)  # empty cells last, either way

        rows.sort(key=key, reverse=descending)
        if descending:  # keep empty cells last
            rows.sort(key=lambda row: row.get(sort, "") == "")
    return columns, rows


def run_folder(root: Root, path: str) -> Path:
    folder = root.resolve(path)
    if not ((folder / CONFIG_NAME).is_file() or (folder / LOG_NAME).is_file()):  # a just launched run: the log
        raise PathRefused(f"{path} is not a run folder (no config.yaml or {LOG_NAME})")
    return folder
