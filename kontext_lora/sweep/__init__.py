"""Config sweeps: many training runs from one base config and a sweep file, resumable, with a summary.

`spec` reads the sweep file (grid / random / explicit runs) and names the runs; `execute` runs them one after
another (in this process or as `accelerate launch` subprocesses); `schedulers` hands them to `--print`, slurm or wandb
agents instead; `state` reads a run folder's status; `summary` reads each run's metrics.jsonl back into
sweep_summary.csv / .md and sweep_loss.png; `command` is the `kontext-lora sweep` subcommand.
"""

from kontext_lora.sweep.execute import prepare_runs, run_sweep
from kontext_lora.sweep.spec import Run, Sweep, load_sweep
from kontext_lora.sweep.summary import summarize, write_summary

__all__ = ["Run", "Sweep", "load_sweep", "prepare_runs", "run_sweep", "summarize", "write_summary"]
