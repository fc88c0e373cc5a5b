"""The summary's definitions, on run folders in the layout the loop and the validation writer leave behind."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

from kontext_lora.sweep.spec import load_sweep
from kontext_lora.sweep.state import run_state
from kontext_lora.sweep.summary import legend_labels, summarize_run, to_csv, to_markdown, write_summary


def _write_run(run: Path, steps: int, peaks: bool, heldout: dict[int, float], config_steps: int) -> list[dict]:
    """metrics.jsonl as the loop writes it (one line a step) with held-out lines appended after some steps."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"train:\n  steps: {config_steps}\n")
    records, lines = [], []
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 1.0 / step + 0.01 * (step % 3), "lr": 1e-3, "s_per_step": 0.1 * (step % 4 + 1),
                  "peak_gib": 2.0 + step / 100 if peaks else None}  # fmt: skip
        records.append(record)
        lines.append(json.dumps(record))
        if step in heldout:
            lines.append(json.dumps({"step": step, "heldout_loss": heldout[step]}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return records


def test_summary_columns_follow_their_definitions(tmp_path: Path) -> None:
    records = _write_run(tmp_path / "gpu", 20, peaks=True, heldout={10: 0.5, 20: 0.25}, config_steps=20)
    (tmp_path / "gpu" / "pytorch_lora_weights.safetensors").write_bytes(b"")  # presence is what counts here
    row = summarize_run(tmp_path / "gpu", "gpu", {"lora.rank": 4})
    assert row.status == "done" and row.steps == 20  # no status.json: the adapter and all 20 steps say done
    assert row.final_train_loss == statistics.fmean(r["loss"] for r in records[-2:])  # last 10% = 2 steps
    assert row.s_per_step == statistics.median(r["s_per_step"] for r in records[2:])  # first 10% are warm-up
    assert row.peak_gib == 2.2 and row.heldout_loss == 0.25  # the largest peak; the last held-out loss
    assert row.heldout == [(10, 0.5), (20, 0.25)] and len(row.losses) == 20

    # A run killed mid-write: the cut last line is skipped; no adapter -> incomplete; CPU -> no peak.
    records = _write_run(tmp_path / "cpu", 3, peaks=False, heldout={}, config_steps=50)
    with open(tmp_path / "cpu" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "lo')
    row = summarize_run(tmp_path / "cpu", "cpu", {})
    assert row.status == "incomplete" and row.steps == 3 and row.peak_gib is None and row.heldout_loss is None
    assert row.final_train_loss == records[-1]["loss"]  # 10% of 3 steps rounds up to one step
    assert row.s_per_step == statistics.median([records[1]["s_per_step"], records[2]["s_per_step"]])
    assert run_state(tmp_path / "none", 5) == "pending"
    (tmp_path / "cpu" / "status.json").write_text(json.dumps({"status": "failed", "error": "loss is nan at step 4"}))
    assert summarize_run(tmp_path / "cpu", "cpu", {}).error == "loss is nan at step 4"


def test_tables_and_plot_of_a_sweep(tmp_path: Path) -> None:
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("runs:\n  - {name: a, lora.rank: 4}\n  - {name: b, train.lr: 0.01}\n  - {name: c}\n")
    sweep = load_sweep(sweep_file, tmp_path / "sweep")
    _write_run(tmp_path / "sweep" / "a", 10, peaks=False, heldout={10: 0.75}, config_steps=10)
    _write_run(tmp_path / "sweep" / "b", 5, peaks=False, heldout={}, config_steps=10)
    rows = write_summary(sweep)
    table = list(csv.DictReader(io.StringIO(to_csv(sweep, rows))))
    assert (tmp_path / "sweep" / "sweep_summary.csv").read_text() == to_csv(sweep, rows)
    assert [(r["run"], r["lora.rank"], r["train.lr"], r["status"]) for r in table] == [
        ("a", "4", "", "incomplete"), ("b", "", "0.01", "incomplete"), ("c", "", "", "pending")
    ]  # fmt: skip
    assert table[0]["heldout_loss"] == "0.75" and table[1]["heldout_loss"] == "" and table[2]["steps"] == ""
    markdown = to_markdown(sweep, rows)
    assert "3 runs (runs over `lora.rank`, `train.lr`): 2 incomplete, 1 pending." in markdown
    assert "| c |  |  | pending |  |  |  |  |  |  |" in markdown and "no validation" not in markdown
    assert (tmp_path / "sweep" / "sweep_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_legend_names_curves_that_coincide(tmp_path: Path) -> None:
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("runs:\n  - {name: a, lora.rank: 4}\n  - {name: b, lora.rank: 8}\n  - {name: c}\n")
    sweep = load_sweep(sweep_file, tmp_path / "sweep")
    for name in ("a", "b"):  # the same losses: a sweep over a key that changes nothing
        _write_run(tmp_path / "sweep" / name, 10, peaks=False, heldout={}, config_steps=10)
    _write_run(tmp_path / "sweep" / "c", 6, peaks=False, heldout={}, config_steps=10)
    rows = write_summary(sweep)
    assert legend_labels(rows) == {
        "a": "a (incomplete)", "b": "b (incomplete), same curve as a", "c": "c (incomplete)"
    }  # fmt: skip
    assert (tmp_path / "sweep" / "sweep_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
