"""`kontext-lora sweep`: run a sweep, or print / write it for another scheduler, or just rebuild its summary."""

from __future__ import annotations

from pathlib import Path

from kontext_lora.sweep.spec import load_sweep


def sweep_command(
    config: str,
    sweep_file: str,
    overrides: list[str],
    out_dir: str | None = None,
    launcher: str = "inprocess",
    print_commands: bool = False,
    slurm: bool = False,
    wandb_sweep: bool = False,
    summary_only: bool = False,
) -> int:
    """Exit code: 0 when every run is done (or the files were written), 1 when some run failed or is unfinished."""
    sweep = load_sweep(sweep_file, out_dir)
    if print_commands or slurm or wandb_sweep:
        from kontext_lora.sweep import schedulers

        if wandb_sweep:
            path = schedulers.write_wandb_sweep(sweep, config, overrides)
            print(f"[sweep] wandb sweep written to {path}; start it with: wandb sweep {path}")
        if print_commands or slurm:
            pending = schedulers.prepare_pending(sweep, config, overrides)
            if print_commands:
                print("\n".join(schedulers.commands(pending)))
            if slurm:
                path = schedulers.write_slurm_script(sweep, pending)
                print(f"[sweep] slurm array job of {len(pending)} runs written to {path}; submit with: sbatch {path}")
        return 0
    if summary_only:
        from kontext_lora.sweep.summary import write_summary

        rows = write_summary(sweep)
    else:
        from kontext_lora.sweep.execute import run_sweep

        rows = run_sweep(sweep, config, overrides, launcher=launcher)
    not_done = [row for row in rows if row.status != "done"]
    print(f"[sweep] {len(rows) - len(not_done)}/{len(rows)} runs done; summary: {Path(sweep.dir) / 'sweep_summary.md'}")
    for row in not_done:
        print(f"[sweep]   {row.name}: {row.status}{': ' + row.error if row.error else ''}")
    return 1 if not_done else 0
