"""Handing a sweep's runs to something else: printed commands, a slurm array job, a wandb sweep file."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from kontext_lora.atomic import atomic_write_text
from kontext_lora.config import ConfigError, load_config
from kontext_lora.sweep.execute import (
    CACHE_NAME,
    TRAIN_SCRIPT,
    PreparedRun,
    _short_path,
    prepare_runs,
    train_command,
)
from kontext_lora.sweep.spec import Sweep, is_int_range, is_log_range
from kontext_lora.sweep.state import CONFIG_NAME, STATUS_NAME, write_status

SLURM_NAME = "sweep.slurm"
WANDB_NAME = "wandb_sweep.yaml"


def prepare_pending(sweep: Sweep, base_config: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> list:
    """Write the resolved config of every run not finished yet (the commands point at it) and return those runs.

    Their status.json is removed: from then on the run's own files (adapter, metrics.jsonl) tell whether it finished.
    A run whose values are rejected is recorded as failed and left out.
    """
    pending: list[PreparedRun] = []
    for item in prepare_runs(sweep, base_config, overrides):
        if item.error:
            write_status(item.dir, "failed", error=item.error, overrides=item.run.overrides, seconds=0.0)
            print(f"[sweep] {item.run.name}: left out, its config is rejected: {item.error}")
            continue
        if item.finished():
            continue
        atomic_write_text(item.dir / CONFIG_NAME, item.config_yaml)
        (item.dir / STATUS_NAME).unlink(missing_ok=True)
        pending.append(item)
    return pending


def commands(pending: list[PreparedRun]) -> list[str]:
    """One shell line per run: `accelerate launch -q train.py --config <sweep dir>/<run>/config.yaml`."""
    return [shlex.join(train_command(item.dir / CONFIG_NAME)) for item in pending]


def write_slurm_script(sweep: Sweep, pending: list[PreparedRun], path: Path | None = None) -> Path:
    """An array job: task i trains the i-th pending run (`sbatch <script>`; add your #SBATCH resource lines)."""
    path = path or sweep.dir / SLURM_NAME
    configs = [shlex.quote(str(item.dir / CONFIG_NAME)) for item in pending]
    command = train_command(Path("CONFIG"))[:-1]  # the config comes from the task's line below
    lines = [
        "#!/bin/bash",
        f"# Slurm array job of sweep {sweep.name}: one task per run not finished when it was written.",
        f"# Submit with: sbatch {shlex.quote(str(path))}   (resume: run `kontext-lora sweep ... --slurm` again)",
        f"#SBATCH --job-name={sweep.name}",
        f"#SBATCH --array=0-{len(pending) - 1}",
        f"#SBATCH --output={sweep.dir}/slurm-%A_%a.log",
        "# Add the resources your cluster needs, e.g.: #SBATCH --gres=gpu:1 --time=04:00:00 --partition=...",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        "CONFIGS=(",
        *(f"  {config}" for config in configs),
        ")",
        f'exec {shlex.join(command)} "${{CONFIGS[$SLURM_ARRAY_TASK_ID]}}"',
    ]
    if not pending:
        lines = lines[:3] + ["# Every run of the sweep has finished: nothing to submit.", "exit 0"]
    atomic_write_text(path, "\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


def wandb_sweep_config(
    sweep: Sweep, base_config: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """The same sweep as a wandb sweep config: `wandb sweep <file>` then `wandb agent <id>` on each machine.

    The agent calls `accelerate launch -q train.py --config <base> key=value ...` (${args_no_hyphens}); every run writes
    <sweep dir>/<wandb run id> and logs to wandb online. Ranges map to wandb distributions (log_uniform_values for
    log ranges); wandb does not round sampled floats to 3 digits as `kontext-lora sweep` does.
    """
    if sweep.method == "runs":
        raise ConfigError(f"{sweep.source}: --wandb-sweep needs a grid or random sweep (wandb cannot list run sets)")
    constants: dict[str, Any] = dict(sweep.fixed)
    for override in overrides:
        key, _, text = override.partition("=")
        constants[key] = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]  # type: ignore[index]
    constants["output.dir"] = f"{sweep.dir}/${{oc.env:WANDB_RUN_ID}}"  # the agent sets WANDB_RUN_ID for each run
    if "data.cache_dir" not in constants and not _configured_cache_dir(base_config, sweep.fixed_dotlist(), overrides):
        constants["data.cache_dir"] = str(sweep.dir / CACHE_NAME)  # one cache for the sweep, as its own runs share
    constants["logging.report_to"] = "wandb"
    constants["logging.wandb_mode"] = "online"  # a sweep's runs must reach the wandb server
    parameters = {key: {"value": value} for key, value in constants.items() if key not in sweep.parameters}
    for key, choice in sweep.parameters.items():
        parameters[key] = _wandb_distribution(key, choice)
    script = _short_path(TRAIN_SCRIPT) if TRAIN_SCRIPT.is_file() else "train.py"
    config: dict[str, Any] = {
        "name": sweep.name,
        "program": script,
        "method": sweep.method,
        "metric": {"name": "loss", "goal": "minimize"},
        "parameters": parameters,
        "command": [
            "${env}",
            "accelerate",
            "launch",
            "-q",
            "${program}",
            "--config",
            str(base_config),
            "${args_no_hyphens}",
        ],  # fmt: skip
    }
    if sweep.method == "random":
        config["run_cap"] = sweep.samples
    return config


def _configured_cache_dir(base_config: str | Path | None, fixed: list[str], overrides: list[str] | tuple) -> str:
    """data.cache_dir as the base config and the common overrides set it ("" where they leave it, or do not load:
    the runs' own values may supply what the base lacks)."""
    try:
        return load_config(base_config, [*fixed, *overrides]).data.cache_dir
    except ConfigError:
        return ""


def write_wandb_sweep(
    sweep: Sweep, base_config: str | Path | None, overrides: list[str] | tuple[str, ...] = (), path: Path | None = None
) -> Path:
    path = path or sweep.dir / WANDB_NAME
    config = wandb_sweep_config(sweep, base_config, overrides)
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False, width=120))
    return path


def _wandb_distribution(key: str, choice: Any) -> dict[str, Any]:
    if isinstance(choice, list):
        return {"values": choice}
    low, high = choice["min"], choice["max"]
    if is_int_range(choice):
        if is_log_range(key, choice):
            return {"distribution": "q_log_uniform_values", "min": low, "max": high, "q": 1}
        return {"distribution": "int_uniform", "min": low, "max": high}
    if is_log_range(key, choice):
        return {"distribution": "log_uniform_values", "min": float(low), "max": float(high)}
    return {"distribution": "uniform", "min": float(low), "max": float(high)}
