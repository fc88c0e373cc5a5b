"""The sweep's summary, read back from each run's own files: sweep_summary.csv / .md and sweep_loss.png.

Columns, per run (definitions also written at the top of the .md):
  final_train_loss  mean of the logged train loss over the last 10% of steps (at least one step): one step's loss
                    is one random sigma and noise draw, far too noisy to compare runs by
  heldout_loss      `heldout_loss` of the last metrics.jsonl record that has one (empty: the run logged none)
  s_per_step        median seconds per optimizer step, leaving out the first 10% of steps (at least one) as warm-up
  peak_gib          the largest `peak_gib` logged (empty on CPU, where torch does not track memory)
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from kontext_lora.atomic import atomic_path, atomic_write_text
from kontext_lora.sweep.spec import Sweep, dotlist_value
from kontext_lora.sweep.state import CONFIG_NAME, read_metrics, read_status, run_state

CSV_NAME = "sweep_summary.csv"
MD_NAME = "sweep_summary.md"
PLOT_NAME = "sweep_loss.png"
TAIL_FRACTION = 0.1  # final loss: the last 10% of steps; s/step: all but the first 10%
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


@dataclass
class RunSummary:
    """One row of the summary, with the curves the plot draws."""

    name: str
    overrides: dict[str, Any]
    status: str
    steps: int | None = None  # last logged step
    final_train_loss: float | None = None
    heldout_loss: float | None = None
    s_per_step: float | None = None
    peak_gib: float | None = None
    seconds: float | None = None  # wall time of the run as the sweep measured it (load and encode included)
    error: str = ""
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss)
    heldout: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)


def final_train_loss(losses: list[float]) -> float | None:
    """Mean of the last 10% of the per-step losses (at least one)."""
    if not losses:
        return None
    return statistics.fmean(losses[-max(1, math.ceil(len(losses) * TAIL_FRACTION)) :])


def median_step_time(seconds: list[float]) -> float | None:
    """Median of the per-step times after the first 10% (at least one) of warm-up steps; all of them if only one."""
    if not seconds:
        return None
    warmup = min(len(seconds) - 1, max(1, len(seconds) // int(1 / TAIL_FRACTION)))
    return statistics.median(seconds[warmup:])


def summarize_run(run_dir: Path, name: str, overrides: dict[str, Any]) -> RunSummary:
    """A run's row from its status.json, config.yaml and metrics.jsonl."""
    records = read_metrics(run_dir)
    status_file = read_status(run_dir)
    steps = _configured_steps(run_dir)
    train_records = [r for r in records if isinstance(r.get("loss"), (int, float))]
    losses = [(int(r["step"]), float(r["loss"])) for r in train_records]
    heldout = [(int(r["step"]), float(r["heldout_loss"])) for r in records if _number(r.get("heldout_loss"))]
    peaks = [float(r["peak_gib"]) for r in train_records if _number(r.get("peak_gib"))]
    return RunSummary(
        name=name, overrides=overrides, status=run_state(run_dir, steps),
        steps=losses[-1][0] if losses else None,
        final_train_loss=final_train_loss([loss for _, loss in losses]),
        heldout_loss=heldout[-1][1] if heldout else None,
        s_per_step=median_step_time([float(r["s_per_step"]) for r in train_records if _number(r.get("s_per_step"))]),
        peak_gib=max(peaks) if peaks else None,
        seconds=status_file.get("seconds"), error=status_file.get("error", ""), losses=losses, heldout=heldout,
    )  # fmt: skip


def summarize(sweep: Sweep) -> list[RunSummary]:
    """Every run of the sweep, in the sweep's order, as its folder stands now."""
    return [summarize_run(sweep.dir / run.name, run.name, run.overrides) for run in sweep.runs]


def write_summary(sweep: Sweep, plot: bool = True) -> list[RunSummary]:
    """Write sweep_summary.csv, sweep_summary.md and (with `plot`) sweep_loss.png into the sweep folder."""
    rows = summarize(sweep)
    sweep.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep.dir / CSV_NAME, to_csv(sweep, rows))
    atomic_write_text(sweep.dir / MD_NAME, to_markdown(sweep, rows))
    if plot:
        plot_losses(sweep, rows, sweep.dir / PLOT_NAME)
    return rows


# ------------------------------------------------------------------------------------------------- tables

_METRIC_COLUMNS = ("status", "steps", "final_train_loss", "heldout_loss", "s_per_step", "peak_gib", "seconds", "error")


def to_csv(sweep: Sweep, rows: list[RunSummary]) -> str:
    """One line per run: run, each swept key, then the metric columns (numbers at full precision, empty if none)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", *sweep.keys, *_METRIC_COLUMNS])
    for row in rows:
        values = [_cell(row.overrides[key]) if key in row.overrides else "" for key in sweep.keys]
        metrics = [getattr(row, column) for column in _METRIC_COLUMNS]
        writer.writerow([row.name, *values, *("" if m is None else m for m in metrics)])
    return buffer.getvalue()


def to_markdown(sweep: Sweep, rows: list[RunSummary]) -> str:
    counts = {state: sum(row.status == state for row in rows) for state in dict.fromkeys(r.status for r in rows)}
    lines = [
        f"# Sweep `{sweep.name}`",
        "",
        f"{len(rows)} runs ({sweep.method} over {', '.join(f'`{k}`' for k in sweep.keys) or 'nothing'}): "
        + ", ".join(f"{n} {state}" for state, n in counts.items())
        + ".",
        "",
        "- **final loss**: mean train loss over the last 10% of steps (at least one step).",
        "- **held-out loss**: the last `heldout_loss` the run logged"
        + ("." if any(r.heldout_loss is not None for r in rows) else "; empty: no run logged one (no validation)."),
        "- **s/step**: median seconds per optimizer step, leaving out the first 10% of steps as warm-up.",
        "- **peak GiB**: the largest accelerator memory peak logged"
        + ("." if any(r.peak_gib is not None for r in rows) else "; empty: CPU runs, where torch does not track it."),
        "",
        "| run | " + " | ".join(f"`{k}`" for k in sweep.keys) + (" | " if sweep.keys else "")
        + "status | steps | final loss | held-out loss | s/step | peak GiB | error |",
        "|" + "---|" * (len(sweep.keys) + 8),
    ]  # fmt: skip
    for row in rows:
        values = [_cell(row.overrides[key]) if key in row.overrides else "" for key in sweep.keys]
        numbers = [row.final_train_loss, row.heldout_loss, row.s_per_step, row.peak_gib]
        cells = [row.name, *values, row.status, "" if row.steps is None else str(row.steps)]
        cells += ["" if n is None else f"{n:.4g}" for n in numbers] + [row.error]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else dotlist_value(value)


# --------------------------------------------------------------------------------------------------- plot


def plot_losses(sweep: Sweep, rows: list[RunSummary], path: Path) -> Path | None:
    """Every run's train loss against step (faint: per step; solid: running mean over 10% of the steps), held-out
    losses as dots. Nothing is written while no run has logged a step."""
    curves = [row for row in rows if row.losses]
    if not curves:
        return None
    try:
        import matplotlib
    except ImportError:  # a declared dependency; without it the tables are still written
        print(f"[sweep] matplotlib is not installed, so {path.name} is not drawn (pip install matplotlib)")
        return None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(9, 5.5), dpi=100)
    labels = legend_labels(curves)
    for index, row in enumerate(curves):
        # Colour, line style and marker all vary, so curves that coincide still show as several (and the legend says
        # which): a sweep over a key that changes nothing early on draws one line otherwise.
        color, style = f"C{index % 10}", LINE_STYLES[index % len(LINE_STYLES)]
        marker = MARKERS[index % len(MARKERS)]
        steps, losses = zip(*row.losses, strict=True)
        axes.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        mean = _running_mean(list(losses))
        every = max(1, len(steps) // 8)
        axes.plot(steps, mean, color=color, linestyle=style, linewidth=1.6, marker=marker, markevery=every,
                  markersize=5, fillstyle="none", label=labels[row.name])  # fmt: skip
        if row.heldout:
            axes.plot(*zip(*row.heldout, strict=True), "o", color=color, markersize=4)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("step")
    axes.set_ylabel("train loss (dots: held-out)" if any(r.heldout for r in curves) else "train loss")
    axes.set_title(f"sweep {sweep.name}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png")
    finally:
        plt.close(figure)
    return path


def legend_labels(curves: list[RunSummary]) -> dict[str, str]:
    """`name (status)` per run, plus `same curve as <first>` where a run's losses equal an earlier run's."""
    labels: dict[str, str] = {}
    first_of: dict[str, str] = {}
    for row in curves:
        key = repr([(step, round(loss, 6)) for step, loss in row.losses])
        same = first_of.setdefault(key, row.name)
        labels[row.name] = f"{row.name} ({row.status})" + (f", same curve as {same}" if same != row.name else "")
    return labels


def _running_mean(values: list[float]) -> list[float]:
    window = max(1, math.ceil(len(values) * TAIL_FRACTION))
    return [statistics.fmean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def _configured_steps(run_dir: Path) -> int | None:
    try:
        return int(OmegaConf.load(run_dir / CONFIG_NAME).train.steps)
    except Exception:  # no or unreadable config (a run whose overrides were rejected): steps unknown
        return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
