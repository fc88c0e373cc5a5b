"""Config sweeps: many training runs from one base config and a sweep file, resumable, with a summary.

`spec` reads the sweep file (grid / random / explicit runs) and names the runs; `execute` runs them (in this
process or as `accelerate launch` subprocesses) or hands them to slurm / wandb agents; `summary` reads each run's
metrics.jsonl back into sweep_summary.csv / .md and sweep_loss.png.
"""

from kontext_lora.sweep.execute import prepare_runs, run_sweep
from kontext_lora.sweep.spec import Run, Sweep, load_sweep
from kontext_lora.sweep.summary import summarize, write_summary

__all__ = ["Run", "Sweep", "load_sweep", "prepare_runs", "run_sweep", "summarize", "write_summary"]
