"""Sweeps on the tiny model, end to end: a 2x2 grid, a failing run among good ones, a killed sweep resumed."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image
from safetensors import safe_open

from kontext_lora.cli import main
from kontext_lora.config import load_config
from kontext_lora.sweep.execute import prepare_runs
from kontext_lora.sweep.spec import load_sweep

from ..conftest import EXAMPLES, REPO


def base_config(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """The smallest real job: tiny model, two of the example triples at 32 px, 4 steps of 2 samples, no trackers."""
    data = tmp_path / "data"
    for stem in ("astronaut", "coffee"):
        for part in ("control/{}.jpg", "target/{}.jpg", "target/{}.txt"):
            (data / part.format(stem)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(EXAMPLES / part.format(stem), data / part.format(stem))
    path = tmp_path / "base.yaml"
    path.write_text(
        f"model: {{pretrained: {tiny_model_dir}, dtype: float32, max_sequence_length: 16}}\n"
        f"data: {{datasets: [{{path: {data}}}], resolution: 32}}\n"
        "lora: {rank: 4, alpha: 4}\n"
        "train: {steps: 4, batch_size: 2, lr: 1.0e-3}\n"
        "logging: {report_to: none}\n"
    )
    return path


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def _adapter_info(run: Path) -> dict:
    with safe_open(str(run / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["kontext_lora"])


def test_grid_2x2_runs_end_to_end_and_the_summary_matches_each_runs_log(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text("name: g\ngrid:\n  lora.rank: [4, 8]\n  train.lr: [1.0e-3, 1.0e-2]\n")
    out = tmp_path / "sweep"
    base = base_config(tmp_path, tiny_model_dir)
    assert main(["sweep", "--config", str(base), "--sweep", str(sweep_file), "--dir", str(out), "train.steps=4"]) == 0

    with open(out / "sweep_summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["run"] for row in rows] == ["rank4_lr1e-3", "rank4_lr1e-2", "rank8_lr1e-3", "rank8_lr1e-2"]
    markdown = (out / "sweep_summary.md").read_text()
    first_losses = set()
    for row in rows:
        run = out / row["run"]
        records = _metrics(run)
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        assert row["status"] == "done" and row["steps"] == "4" and row["error"] == ""
        # The summary's numbers are the run's own log: the last 10% of 4 steps is the last step; s/step leaves
        # out the first step; no held-out loss logged and no peak memory on CPU.
        assert float(row["final_train_loss"]) == records[-1]["loss"]
        assert float(row["s_per_step"]) == statistics.median(r["s_per_step"] for r in records[1:])
        assert row["heldout_loss"] == "" and row["peak_gib"] == ""
        assert f"| {row['run']} | {row['lora.rank']} | {row['train.lr']} | done | 4 | {records[-1]['loss']:.4g} |" in (
            markdown
        )
        # The swept values reached training: lr in the run's own log, rank in the adapter it wrote.
        assert all(r["lr"] == float(row["train.lr"]) for r in records)
        assert _adapter_info(run)["rank"] == int(row["lora.rank"]) and _adapter_info(run)["step"] == 4
        cfg = load_config(run / "config.yaml")  # the run's resolved config reproduces it
        assert (cfg.lora.rank, cfg.train.lr, cfg.train.steps) == (int(row["lora.rank"]), float(row["train.lr"]), 4)
        assert cfg.output.dir == str(run) and cfg.logging.wandb_group == "g"
        assert _status(run)["status"] == "done" and _status(run)["seconds"] > 0
        first_losses.add(records[0]["loss"])
    # Same seed everywhere: step 1 (before any update) has one loss for all four runs; the updates then differ.
    assert len(first_losses) == 1 and len({row["final_train_loss"] for row in rows}) == 4
    assert "empty: no run logged one" in markdown and "empty: CPU runs" in markdown
    with Image.open(out / "sweep_loss.png") as plot:
        assert plot.format == "PNG" and plot.size == (900, 550)
    assert (out / "sweep.yaml").read_text() == sweep_file.read_text()
    output = capsys.readouterr().out
    assert "[sweep] 4/4 runs done" in output
    # One cache for the whole sweep: the first run computes its triples' latents and texts, the others reuse them.
    caches = [line for line in output.splitlines() if line.startswith("[kontext-lora] cache ")]
    entries = int(caches[0].split(": ")[1].split()[0])
    assert entries > 0 and caches == [
        f"[kontext-lora] cache {out / 'cache'}: {entries} entries computed, 0 reused"
    ] + 3 * [f"[kontext-lora] cache {out / 'cache'}: 0 entries computed, {entries} reused"]
    assert not any((out / row["run"] / "cache").exists() for row in rows)


def test_a_failing_run_is_recorded_and_the_others_complete(tiny_model_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-data"
    sweep_file = tmp_path / "runs.yaml"
    sweep_file.write_text(
        "runs:\n"
        "  - {name: ok, train.steps: 2}\n"
        "  - {name: bad_value, train.lr: fast}\n"  # rejected by the config schema: never starts
        f"  - {{name: no_data, data.datasets: [{{path: {missing}}}]}}\n"  # fails inside train()
        # Another mixed precision than the runs before it: accelerate's process-wide state must not refuse it.
        "  - {name: ok_bf16, train.steps: 2, train.mixed_precision: bf16}\n"
    )
    out = tmp_path / "sweep"
    base = base_config(tmp_path, tiny_model_dir)
    assert main(["sweep", "--config", str(base), "--sweep", str(sweep_file), "--dir", str(out)]) == 1  # some failed

    assert _status(out / "ok")["status"] == "done" and _status(out / "ok_bf16")["status"] == "done"
    assert len(_metrics(out / "ok_bf16")) == 2 and _adapter_info(out / "ok_bf16")["step"] == 2
    bad = _status(out / "bad_value")
    assert bad["status"] == "failed" and bad["overrides"] == {"train.lr": "fast"}
    assert bad["error"].startswith("config key `train.lr`: value 'fast' (str) is not a valid float")
    assert not (out / "bad_value" / "config.yaml").exists()
    no_data = _status(out / "no_data")
    assert no_data["status"] == "failed" and str(missing) in no_data["error"] and "\n" not in no_data["error"]
    assert "Traceback" in (out / "no_data" / "error.txt").read_text()
    with open(out / "sweep_summary.csv", newline="") as handle:
        rows = {row["run"]: row for row in csv.DictReader(handle)}
    assert [rows[name]["status"] for name in ("ok", "bad_value", "no_data", "ok_bf16")] == [
        "done", "failed", "failed", "done"
    ]  # fmt: skip
    assert rows["bad_value"]["error"] == bad["error"] and rows["no_data"]["error"] == no_data["error"]
    assert rows["bad_value"]["final_train_loss"] == "" and rows["ok"]["final_train_loss"] != ""


def test_a_killed_sweep_started_again_runs_only_the_remaining_runs(tiny_model_dir: Path, tmp_path: Path) -> None:
    sweep_file = tmp_path / "three.yaml"
    sweep_file.write_text(
        "runs:\n  - {name: first}\n  - {name: second, lora.rank: 8}\n  - {name: third, train.steps: 2}\n"
    )
    out = tmp_path / "sweep"
    base = base_config(tmp_path, tiny_model_dir)
    argv = ["sweep", "--config", str(base), "--sweep", str(sweep_file), "--dir", str(out)]
    process = subprocess.Popen(
        [sys.executable, "-m", "kontext_lora.cli", *argv], env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:  # kill -9 the sweep as soon as its first run has finished
        deadline = time.monotonic() + 300
        while not (out / "first" / "status.json").is_file() or _status(out / "first")["status"] != "done":
            assert process.poll() is None and time.monotonic() < deadline, "the sweep ended before its first run"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "second" / "status.json").is_file() or _status(out / "second")["status"] == "running"
    assert not (out / "third").exists()
    first = _stamps(out / "first")

    assert main(argv) == 0
    assert _stamps(out / "first") == first  # the finished run was skipped: nothing of it rewritten
    assert [r["step"] for r in _metrics(out / "second")] == [1, 2, 3, 4]
    assert _adapter_info(out / "second")["rank"] == 8 and len(_metrics(out / "third")) == 2
    assert all(_status(out / name)["status"] == "done" for name in ("first", "second", "third"))

    # After an edit of the sweep file only the run whose resolved config changed trains again.
    before = {name: _stamps(out / name) for name in ("first", "second", "third")}
    sweep_file.write_text(sweep_file.read_text().replace("train.steps: 2", "train.steps: 3"))
    assert main(argv) == 0
    after = {name: _stamps(out / name) for name in before}
    assert after["first"] == before["first"] and after["second"] == before["second"]
    assert after["third"] != before["third"] and len(_metrics(out / "third")) == 3


def _stamps(run: Path) -> tuple[int, ...]:
    """Modification times (ns) of a run's metrics.jsonl, config.yaml and adapter."""
    names = ("metrics.jsonl", "config.yaml", "pytorch_lora_weights.safetensors")
    return tuple((run / name).stat().st_mtime_ns for name in names)


def test_a_bad_base_config_stops_the_sweep_at_once_but_runs_may_supply_what_the_base_lacks(
    tmp_path: Path, capsys
) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("model: {pretrained: /models/kontext}\n")  # no dataset: each run names its own
    sweep_file = tmp_path / "data.yaml"
    sweep_file.write_text("grid:\n  data.datasets: [[{path: /data/a}], [{path: /data/b}]]\n")
    prepared = prepare_runs(load_sweep(sweep_file, tmp_path / "sweep"), base)
    assert [item.run.name for item in prepared] == ["datasets-path-data-a", "datasets-path-data-b"]
    assert [item.config.data.datasets[0].path for item in prepared] == ["/data/a", "/data/b"]
    assert {item.config.logging.wandb_group for item in prepared} == {"data"}

    argv = ["sweep", "--config", str(base), "--sweep", str(sweep_file), "--dir", str(tmp_path / "sweep")]
    assert main([*argv, "train.stepz=3"]) == 2
    (error,) = capsys.readouterr().err.splitlines()  # one line, naming the key and the near miss
    assert error.startswith("kontext-lora: error: unknown config key `train.stepz`; did you mean `train.steps`?")
    assert not (tmp_path / "sweep").exists()  # nothing started
