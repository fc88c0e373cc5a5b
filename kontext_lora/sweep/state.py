"""What a run folder says about its run: status.json (written by the sweep) or, failing that, its own files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kontext_lora.atomic import atomic_write_text
from kontext_lora.run_files import ADAPTER_NAME, CONFIG_NAME, METRICS_NAME, STATUS_NAME  # noqa: F401

# done: finished, adapter written. failed: stopped with an error (status.json has it). running: started and never
# came back (killed). interrupted: Ctrl-C. incomplete: metrics but no finished adapter (killed outside the sweep).
# pending: never started.
STATES = ("done", "failed", "running", "interrupted", "incomplete", "pending")


def write_status(run_dir: Path, status: str, **fields: Any) -> None:
    atomic_write_text(run_dir / STATUS_NAME, json.dumps({"status": status, **fields}, indent=1) + "\n")


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATUS_NAME).read_text())
    except (OSError, ValueError):
        return {}


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records; a line cut short by a killed run is skipped."""
    records = []
    try:
        lines = (run_dir / METRICS_NAME).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def run_state(run_dir: Path, steps: int | None) -> str:
    """One of STATES. Without status.json (a run launched by slurm or --print), a run is done when its adapter
    exists and its metrics reach `steps`."""
    status = read_status(run_dir).get("status")
    adapter = (run_dir / ADAPTER_NAME).is_file()
    if status == "done":
        return "done" if adapter else "incomplete"
    if status in STATES:
        return status
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    if adapter and records and steps is not None and records[-1].get("step") == steps:
        return "done"
    return "incomplete" if records else "pending"
