"""Sweeps handed to other schedulers: printed commands, a slurm array script, `accelerate launch` runs, wandb."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kontext_lora.cli import main
from kontext_lora.config import ConfigError, load_config
from kontext_lora.sweep.execute import prepare_runs
from kontext_lora.sweep.schedulers import wandb_sweep_config, write_wandb_sweep
from kontext_lora.sweep.spec import load_sweep

from ..conftest import REPO
from .test_execute import base_config


def test_slurm_task_and_accelerate_launcher_train_the_runs_the_printed_commands_name(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    missing = tmp_path / "no-such-data"
    sweep_file = tmp_path / "two.yaml"
    sweep_file.write_text(
        f"runs:\n  - {{name: ok, train.steps: 2}}\n  - {{name: no_data, data.datasets: [{{path: {missing}}}]}}\n"
    )
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "--config",
        str(base_config(tmp_path, tiny_model_dir)),
        "--sweep",
        str(sweep_file),
        "--dir",
        str(out),
    ]
    train_py = os.path.relpath(REPO / "train.py")
    expected = [f"accelerate launch -q {train_py} --config {out / name / 'config.yaml'}" for name in ("ok", "no_data")]

    assert main([*argv, "--print"]) == 0
    assert capsys.readouterr().out.splitlines() == expected
    assert main([*argv, "--slurm"]) == 0
    assert f"slurm array job of 2 runs written to {out / 'sweep.slurm'}" in capsys.readouterr().out
    script = (out / "sweep.slurm").read_text()
    assert "#SBATCH --array=0-1\n" in script and "#SBATCH --job-name=two\n" in script
    assert f"CONFIGS=(\n  {out / 'ok' / 'config.yaml'}\n  {out / 'no_data' / 'config.yaml'}\n)\n" in script
    assert f'exec accelerate launch -q {train_py} --config "${{CONFIGS[$SLURM_ARRAY_TASK_ID]}}"\n' in script

    # Slurm task 0, run by bash as slurm would: a real `accelerate launch train.py` of the first run.
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "0", "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    task = subprocess.run(["bash", str(out / "sweep.slurm")], env=env, capture_output=True, text=True, timeout=300)
    assert task.returncode == 0, task.stderr[-2000:]
    assert [json.loads(line)["step"] for line in (out / "ok" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (out / "ok" / "status.json").exists()  # the run's own files say it finished
    assert main([*argv, "--summary"]) == 1  # the summary sees it done from those files; no_data is pending
    assert "[sweep] 1/2 runs done" in (printed := capsys.readouterr().out) and "no_data: pending" in printed
    summary = (out / "sweep_summary.csv").read_text().splitlines()
    assert summary[1].startswith("ok,2,,done,2,") and summary[2].startswith("no_data,,")
    assert ",pending," in summary[2]

    # The finished run drops out of the printed commands; the sweep's accelerate launcher runs only the other one.
    assert main([*argv, "--print"]) == 0
    assert capsys.readouterr().out.splitlines() == expected[1:]
    adapter_time = (out / "ok" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    assert main([*argv, "--launcher", "accelerate"]) == 1  # no_data fails
    assert (out / "ok" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == adapter_time
    status = json.loads((out / "no_data" / "status.json").read_text())
    assert status["status"] == "failed" and f"dataset folder {missing} does not exist" in status["error"]
    assert "kontext-lora: error:" in (out / "no_data" / "train.log").read_text()  # the subprocess's own output
    rows = (out / "sweep_summary.csv").read_text().splitlines()
    assert rows[1].startswith("ok,2,,done,2,") and rows[2].startswith("no_data,,")


def test_wandb_sweep_file_gives_wandb_agents_the_same_run_configs(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """Each grid point, passed as wandb's agent passes it (${args_no_hyphens}), loads to the sweep's own config."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args, load_sweep_config

    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text("fixed: {train.steps: 3}\ngrid:\n  lora.rank: [4, 8]\n  train.lr: [1.0e-5, 3.0e-4]\n")
    base = base_config(tmp_path, tiny_model_dir)
    sweep = load_sweep(sweep_file, tmp_path / "sweep")
    path = write_wandb_sweep(sweep, base, ["lora.preset=attention"])
    config = load_sweep_config(str(path))  # how `wandb sweep` reads it
    assert config["method"] == "grid" and config["name"] == "grid"
    assert config["command"] == ["${env}", "accelerate", "launch", "-q", "${program}", "--config", str(base),
                                 "${args_no_hyphens}"]  # fmt: skip
    assert config["parameters"]["lora.rank"] == {"values": [4, 8]}
    grid_points = [
        {"lora.rank": rank, "train.lr": lr}
        for rank in config["parameters"]["lora.rank"]["values"]
        for lr in config["parameters"]["train.lr"]["values"]
    ]
    constants = {key: spec["value"] for key, spec in config["parameters"].items() if "value" in spec}
    prepared = prepare_runs(sweep, base, ["lora.preset=attention"])
    assert len(grid_points) == len(prepared) == 4
    for point, item in zip(grid_points, prepared, strict=True):
        args = create_sweep_command_args({"args": {k: {"value": v} for k, v in {**constants, **point}.items()}})
        monkeypatch.setenv("WANDB_RUN_ID", item.run.name)  # what the agent sets for each run
        agent_cfg = load_config(base, args["args_no_hyphens"])
        assert (agent_cfg.logging.report_to, agent_cfg.logging.wandb_mode) == ("wandb", "online")
        agent_cfg.logging = item.config.logging  # the sweep's own runs log where the base config says
        # A sweep retrains its own unfinished runs in place (output.overwrite); an agent's run has a new folder.
        agent_cfg.output.overwrite = item.config.output.overwrite
        assert agent_cfg == item.config

    random_file = tmp_path / "random.yaml"
    random_file.write_text(
        "random:\n  samples: 7\n  parameters:\n    train.lr: {min: 1.0e-5, max: 1.0e-3}\n"
        "    train.steps: {min: 2, max: 9}\n"
        "    lora.dropout: {min: 0.0, max: 0.2}\n    lora.rank: [4, 8]\n"
    )
    config = wandb_sweep_config(load_sweep(random_file), base)
    assert config["method"] == "random" and config["run_cap"] == 7
    assert config["parameters"]["train.lr"] == {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3}
    assert config["parameters"]["train.steps"] == {"distribution": "int_uniform", "min": 2, "max": 9}
    assert config["parameters"]["lora.dropout"] == {"distribution": "uniform", "min": 0.0, "max": 0.2}
    assert config["parameters"]["lora.rank"] == {"values": [4, 8]}
    listed = tmp_path / "listed.yaml"
    listed.write_text("runs: [{lora.rank: 4}]\n")
    with pytest.raises(ConfigError, match="--wandb-sweep needs a grid or random sweep"):
        wandb_sweep_config(load_sweep(listed), base)


def test_sweep_runs_share_a_wandb_group_named_after_the_sweep(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An offline wandb run of a sweep records the sweep's name as its group and the run's name as its name."""
    from wandb.proto import wandb_internal_pb2

    sweep_file = tmp_path / "wb.yaml"
    sweep_file.write_text("name: grouped\nruns:\n  - {lora.rank: 4}\n")
    out = tmp_path / "sweep"
    base = base_config(tmp_path, tiny_model_dir)
    overrides = ["train.steps=1", "logging.report_to=wandb", "logging.wandb_mode=offline"]
    assert main(["sweep", "--config", str(base), "--sweep", str(sweep_file), "--dir", str(out), *overrides]) == 0
    (log,) = (out / "rank4" / "wandb").glob("offline-run-*/run-*.wandb")
    runs = []
    for data in _wandb_records(log):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "run":
            runs.append(record.run)
    assert runs and {(run.run_group, run.display_name) for run in runs} == {("grouped", "rank4")}


def _wandb_records(path: Path):
    """The records of a wandb transaction log (.wandb: a LevelDB-style log of 32 KiB blocks after a 7-byte header).

    wandb >= 0.19 reads these files in its Go core only, so the few lines of the format are read here.
    """
    data, position, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            yield pending
            pending = b""
