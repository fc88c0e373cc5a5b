"""Running a sweep: resolve each run's config, skip finished runs, train the rest one after another.

A run trains in this process (`train()` straight away, the model loaded anew each run) or as an
`accelerate launch train.py --config <run>/config.yaml` subprocess. A run that fails, for any reason, is recorded
in its folder's status.json (and error.txt) and the sweep goes on to the next one.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from kontext_lora.atomic import atomic_write_text
from kontext_lora.config import Config, ConfigError, load_config, to_yaml
from kontext_lora.run_files import LOG_NAME
from kontext_lora.sweep.spec import Run, Sweep
from kontext_lora.sweep.state import CONFIG_NAME, run_state, write_status

LAUNCHERS = ("inprocess", "accelerate")
ERROR_NAME = "error.txt"  # the full traceback of a failed run
CACHE_NAME = "cache"  # <sweep dir>/cache: the latents and embeddings every run of the sweep reads
TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "train.py"  # the repository's shim, when there is one


@dataclass
class PreparedRun:
    """A run with its folder and resolved config; `error` says why the config could not be resolved."""

    run: Run
    dir: Path
    config: Config | None
    error: str = ""

    @property
    def config_yaml(self) -> str:
        return to_yaml(self.config) if self.config is not None else ""

    def finished(self) -> bool:
        """Done before with this very config (a run whose resolved config changed since is run again)."""
        saved = self.dir / CONFIG_NAME
        return (
            self.config is not None
            and saved.is_file()
            and saved.read_text() == self.config_yaml
            and run_state(self.dir, self.config.train.steps) == "done"
        )


def prepare_runs(sweep: Sweep, base_config: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> list:
    """Resolve every run's config: base file, then the sweep's `fixed`, then `overrides`, then the run's own values,
    then output.dir = <sweep dir>/<run name> with output.overwrite; unless the config sets them, the wandb group is
    the sweep's name and every run shares one cache, <sweep dir>/cache.

    A run whose config is rejected comes back with `error` set, to be recorded as failed. When every run is rejected
    and the base config with the common overrides is rejected too, that one error is raised instead.
    """
    common = [*sweep.fixed_dotlist(), *overrides]
    prepared = []
    for run in sweep.runs:
        run_dir = sweep.dir / run.name
        # A run that is trained again (failed, killed, or its config changed) starts over in its own folder.
        own = [*common, *run.dotlist(), f"output.dir={run_dir}", "output.overwrite=true"]
        try:
            config = load_config(base_config, own)
            shared = []
            if not config.logging.wandb_group:
                shared.append(f"logging.wandb_group={sweep.name}")
            if not config.data.cache_dir:  # entries are content-keyed: runs that differ in a setting simply miss them
                shared.append(f"data.cache_dir={sweep.dir / CACHE_NAME}")
            if shared:
                config = load_config(base_config, [*own, *shared])
        except ConfigError as exc:
            prepared.append(PreparedRun(run, run_dir, None, str(exc)))
            continue
        prepared.append(PreparedRun(run, run_dir, config))
    if all(item.error for item in prepared):
        load_config(base_config, common)  # raises when the base itself is the problem (a typo, a missing file)
    return prepared


def run_sweep(
    sweep: Sweep,
    base_config: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    launcher: str = "inprocess",
) -> list:
    """Train every run not yet finished, in order; returns the summary rows (see `summary.summarize`)."""
    from kontext_lora.sweep.summary import write_summary

    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher: {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    prepared = prepare_runs(sweep, base_config, overrides)
    sweep.dir.mkdir(parents=True, exist_ok=True)
    if sweep.source is not None:
        atomic_write_text(sweep.dir / "sweep.yaml", sweep.source.read_text())  # the sweep file, kept with its runs
    try:
        for index, item in enumerate(prepared, 1):
            head = f"[sweep] {index}/{len(prepared)} {item.run.name}"
            if item.error:  # the run's values do not make a valid config: recorded, nothing else to do
                write_status(item.dir, "failed", error=item.error, overrides=item.run.overrides, seconds=0.0)
                print(f"{head}: failed: {item.error}", flush=True)
                continue
            if item.finished():
                print(f"{head}: finished before, skipped", flush=True)
                continue
            print(f"{head}: training ({' '.join(item.run.dotlist()) or 'base config'})", flush=True)
            _attempt(item, launcher)
            if index < len(prepared):  # the tables kept current, so a sweep killed later still has them
                write_summary(sweep, plot=False)
    finally:
        rows = write_summary(sweep)
    return rows


def _attempt(item: PreparedRun, launcher: str) -> str:
    """Train one run, recording running -> done / failed / interrupted in its status.json."""
    assert item.config is not None
    atomic_write_text(item.dir / CONFIG_NAME, item.config_yaml)
    (item.dir / ERROR_NAME).unlink(missing_ok=True)
    write_status(item.dir, "running", overrides=item.run.overrides)
    start = time.perf_counter()
    try:
        if launcher == "inprocess":
            _train_in_process(item.config)
        else:
            _train_subprocess(item)
    except KeyboardInterrupt:
        write_status(item.dir, "interrupted", overrides=item.run.overrides, seconds=time.perf_counter() - start)
        raise
    except Exception as exc:  # any failure is the run's, not the sweep's: record it and go on
        error = _one_line(exc)
        (item.dir / ERROR_NAME).write_text(traceback.format_exc())
        write_status(item.dir, "failed", error=error, overrides=item.run.overrides, seconds=time.perf_counter() - start)
        print(f"[sweep] {item.run.name}: failed: {error}", flush=True)
        return "failed"
    write_status(item.dir, "done", overrides=item.run.overrides, seconds=time.perf_counter() - start)
    return "done"


def _train_in_process(cfg: Config) -> None:
    import torch
    from accelerate.state import AcceleratorState, GradientState

    from kontext_lora.train.loop import train

    # accelerate keeps one process-wide state: without a reset, a run with another train.mixed_precision than the
    # first is refused, and a run that failed mid-accumulation would leave its gradient-sync flag to the next one.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    # speed.compile compiles each run's new transformer blocks: without a reset, dynamo's per-function cache limit
    # is reached after a few runs and later runs would silently train uncompiled (and time differently).
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # peak_gib must be this run's, not the sweep's so far
    try:
        train(cfg)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class LaunchError(RuntimeError):
    """An `accelerate launch` run exited non-zero; the message is its last error line."""


def _train_subprocess(item: PreparedRun) -> None:
    command = train_command(item.dir / CONFIG_NAME)
    if command[:2] == ["accelerate", "launch"]:  # the accelerate of this interpreter, whatever PATH says
        command[:2] = [sys.executable, "-m", "accelerate.commands.launch"]
    log = item.dir / LOG_NAME
    with open(log, "w", encoding="utf-8") as handle:
        returncode = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
    if returncode:
        raise LaunchError(f"{_last_error_line(log.read_text(errors='replace'))} (exit code {returncode}; see {log})")


def train_command(config_path: Path) -> list[str]:
    """`accelerate launch -q train.py --config <config>` (or `-m kontext_lora.cli train` where no train.py is)."""
    if TRAIN_SCRIPT.is_file():
        script = [_short_path(TRAIN_SCRIPT)]
    else:
        script = ["-m", "kontext_lora.cli", "train"]
    return ["accelerate", "launch", "-q", *script, "--config", str(config_path)]  # -q: no launcher traceback


def _short_path(path: Path) -> str:
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _last_error_line(log: str) -> str:
    lines = [line.strip() for line in log.replace("\r", "\n").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("kontext-lora: error:"):
            return line.removeprefix("kontext-lora: error:").strip()
    return lines[-1] if lines else "no output"


def _one_line(exc: BaseException) -> str:
    """The project's own errors already name the key or file; anything else also says what kind of error it was."""
    text = " ".join(str(exc).split()) or "(no message)"
    return text if type(exc).__module__.startswith("kontext_lora") else f"{type(exc).__name__}: {text}"
