"""Refitting planner_calibration.json to measurements: `python -m kontext_lora.planner [--fit JSON ...] [--write]`.

Two kinds of measurement are read:
- train-step points (scripts/bench_memory.py's `rows`, and the `points` stored in the calibration): a config as
  overrides, the step's allocator peak and s/step; they fit the `memory` and `time` constants;
- whole-job tiers (scripts/bench_e2e.py's `tiers`): the run's resolved config and, per phase (cache, first_step,
  train, validation, infer, ...), the peak; they fit the `job` constants against each phase's reserved peak (the
  memory a per-process cap limits), `device_peak_gib` where no reserved peak was recorded.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from pathlib import Path

import yaml

from kontext_lora.atomic import atomic_write_text
from kontext_lora.config import Config, load_config
from kontext_lora.planner.count import GIB, count_encoders, count_model
from kontext_lora.planner.prediction import (
    CALIBRATION_PATH,
    Knobs,
    features,
    load_calibration,
    phase_terms,
    predict,
    predict_step,
    workload,
)

# The config every calibration point starts from: rank 16 on the 13 attention+MLP kinds, batch 1, bf16 base, square
# images (the step benchmarks feed square latents).
POINT_BASE = ["model.pretrained=unused", "data.datasets=[{path: unused}]", "lora.rank=16", "lora.alpha=16",
              "train.mixed_precision=bf16", "data.buckets=square"]  # fmt: skip
# A measured phase -> the predicted phase it checks (the first step and the steady steps are both `train`).
# `infer` runs in its own process under its own offload policy, not under the plan: it is not fitted.
MEASURED_PHASES = {"cache": "cache", "first_step": "train", "train": "train", "validation": "validation"}


def point_config(point: dict) -> Config:
    return load_config(None, [*POINT_BASE, *point["overrides"]])


def _ridge_fit(rows: list[tuple[dict, float, float]], constants: dict, scales: dict, ridge: float) -> dict:
    """Least squares of sum(feature x constant) = target on relative error (rows: (features, target, measured
    total)), constants in units of `scales`, pulled towards their current values by `ridge`."""
    import numpy as np

    names = sorted(constants)
    scale = np.array([scales[k] for k in names], dtype=float)
    prior = np.array([constants[k] for k in names], dtype=float) / scale
    a = np.array([[f.get(k, 0.0) * scale[j] / total for j, k in enumerate(names)] for f, _, total in rows])
    b = np.array([y / total for _, y, total in rows])
    u = np.linalg.solve(a.T @ a + ridge * np.eye(len(names)), a.T @ b + ridge * prior)
    return {k: float(u[j] * scale[j]) for j, k in enumerate(names)}


def fit(points: list[dict], calib: dict, ridge: float = 1e-3, tiers: list[dict] = ()) -> dict:
    """Refit the train step's memory and time constants to measured points (least squares on relative error, ridge
    towards the current constants so a constant no point informs stays where it was); returns the new calibration.
    The whole-job `tiers` add their steady s/step to the time fit: what a user's run measures, data and all."""
    calib = copy.deepcopy(calib)
    rows_mem, rows_time = [], []
    for tier in tiers:
        seconds = tier.get("metrics", {}).get("s_per_step")
        if seconds:
            cfg = tier_config(tier)
            count, knobs, work = count_model(cfg), Knobs.of(cfg), workload(cfg, tier.get("bucket_keys"))
            _, tim, _ = features(cfg, count, calib, knobs, work)
            _, time = predict_step(cfg, count, calib, knobs, work)
            rows_time.append((tim, seconds - time.get("swap", 0.0), seconds))
    for point in points:
        cfg = point_config(point)
        count = count_model(cfg)
        mem, tim, known = features(cfg, count, calib)
        _, time = predict_step(cfg, count, calib, Knobs.of(cfg), workload(cfg))
        if point.get("peak_gib"):
            fixed = known["weights"] + known["swap_buffers"] + known["lora"] + known["optimizer"]
            rows_mem.append((mem, point["peak_gib"] * GIB - fixed, point["peak_gib"] * GIB))
        if point.get("s_per_step"):
            rows_time.append((tim, point["s_per_step"] - time.get("swap", 0.0), point["s_per_step"]))
    for section, rows in (("memory", rows_mem), ("time", rows_time)):
        constants = calib[section]["constants"]
        if rows:
            fitted = _ridge_fit(rows, constants, constants, ridge)
            calib[section]["constants"] = {k: max(v, 0.05 * constants[k]) for k, v in fitted.items()}
    return calib


# --------------------------------------------------------------------------------------------- whole-job tiers


def tier_config(tier: dict) -> Config:
    """A bench_e2e tier's resolved config (the run's config.yaml as a dict), loaded and validated."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(tier["config"]))
        return load_config(path)


def tiers_from_bench(paths: list[str]) -> list[dict]:
    """The tiers of scripts/bench_e2e.py JSON files that passed, each with its card and source file."""
    tiers = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for tier in data.get("tiers", []):
            if tier.get("status") == "passed":
                tiers.append({**tier, "card": data.get("card", "?"), "source": os.path.basename(path)})
    return tiers


def _stored_tier(tier: dict) -> dict:
    """What the calibration keeps of a tier: enough to refit and to show the accuracy, not its logs."""
    keep = ("tier", "card", "source", "cap_gib", "config", "bucket_keys")
    phases = {name: {k: v for k, v in p.items() if k.endswith("peak_gib")} for name, p in tier["phases"].items()}
    seconds = tier.get("metrics", {}).get("s_per_step")
    return {**{k: tier[k] for k in keep if k in tier}, "phases": phases, "metrics": {"s_per_step": seconds}}


def measured_peak(phase: dict) -> float | None:
    """A measured phase's peak in GiB: the reserved peak, else the device peak."""
    return phase.get("reserved_peak_gib") or phase.get("device_peak_gib") or None


def tier_rows(tier: dict, calib: dict) -> list[tuple[str, dict, float, float]]:
    """(phase, job features, measured bytes less the known ones, measured bytes) per measured phase of a tier.
    first_step and train both check the train phase; the larger of the two is the phase's peak."""
    cfg = tier_config(tier)
    count, knobs = count_model(cfg), Knobs.of(cfg)
    work = workload(cfg, tier.get("bucket_keys"))
    memory, _ = predict_step(cfg, count, calib, knobs, work)
    terms = phase_terms(cfg, count, count_encoders(cfg), calib, knobs, work, memory)
    measured: dict[str, float] = {}
    for name, phase in tier.get("phases", {}).items():
        peak = measured_peak(phase)
        target = MEASURED_PHASES.get(name)
        if peak and target in terms:
            measured[target] = max(measured.get(target, 0.0), peak * GIB)
    return [(name, terms[name][1], total - sum(terms[name][0].values()), total) for name, total in measured.items()]


def fit_job(tiers: list[dict], calib: dict, ridge: float = 1e-5, rounds: int = 3) -> dict:
    """Refit the `job` constants to the tiers' phase peaks (relative least squares, ridge towards the current
    constants: weak, since a few tiers determine each constant, yet a constant no tier informs stays). A phase whose
    peak is the larger of two sub-steps takes the features of the larger one at the current constants, so the fit
    is repeated `rounds` times."""
    calib = copy.deepcopy(calib)
    constants = calib["job"]["constants"]
    scales = {k: v["scale"] for k, v in calib["job"]["scales"].items()}
    for _ in range(rounds):
        rows = [(feats, y, total) for tier in tiers for _, feats, y, total in tier_rows(tier, calib)]
        if not rows:
            break
        constants = {k: max(0.0, v) for k, v in _ridge_fit(rows, constants, scales, ridge).items()}
        calib["job"]["constants"] = constants
    return calib


def tier_accuracy(tiers: list[dict], calib: dict | None = None) -> list[tuple[str, str, str, float, float]]:
    """(tier, card, phase, measured GiB, predicted GiB) of every measured phase of every tier."""
    calib = calib or load_calibration()
    rows = []
    for tier in tiers:
        pred = predict(tier_config(tier), calib=calib, bucket_keys=tier.get("bucket_keys"))
        for name, _, _, total in tier_rows(tier, calib):
            rows.append((tier.get("tier", "?"), tier["card"], name, total / GIB, pred.phases[name].gib))
    return rows


def print_tier_accuracy(tiers: list[dict], calib: dict | None = None) -> None:
    print("| tier | card | phase | peak GiB | predicted | error |")
    print("|---|---|---|---|---|---|")
    for tier, card, phase, peak, predicted in tier_accuracy(tiers, calib):
        print(f"| {tier} | {card} | {phase} | {peak:.2f} | {predicted:.2f} | {(predicted - peak) / peak:+.1%} |")


def print_tier_speed(tiers: list[dict], calib: dict | None = None) -> None:
    print("| tier | card | s/step | predicted | error |")
    print("|---|---|---|---|---|")
    for tier in tiers:
        seconds = tier.get("metrics", {}).get("s_per_step")
        if seconds:
            pred = predict(tier_config(tier), calib=calib, bucket_keys=tier.get("bucket_keys"))
            print(
                f"| {tier.get('tier', '?')} | {tier['card']} | {seconds:.3f} | {pred.s_per_step:.3f} | "
                f"{(pred.s_per_step - seconds) / seconds:+.1%} |"
            )


# --------------------------------------------------------------------------------------------- train-step points


def accuracy_rows(
    points: list[dict], calib: dict | None = None
) -> list[tuple[str, str, float | None, float, float | None, float]]:
    """(name, card, measured peak, predicted peak, measured s/step, predicted s/step) of each train-step point."""
    rows = []
    for point in points:
        pred = predict(point_config(point), None, calib)
        rows.append((point["name"], point.get("card", "?"), point.get("peak_gib"), pred.step_peak_gib,
                     point.get("s_per_step"), pred.s_per_step))  # fmt: skip
    return rows


def print_accuracy(points: list[dict], calib: dict | None = None) -> None:
    print("| point | card | peak GiB | predicted | error | s/step | predicted | error |")
    print("|---|---|---|---|---|---|---|---|")
    for name, card, peak, ppeak, sps, psps in accuracy_rows(points, calib):
        pe = f"{(ppeak - peak) / peak:+.1%}" if peak else ""
        te = f"{(psps - sps) / sps:+.1%}" if sps else ""
        print(f"| {name} | {card} | {peak or ''} | {ppeak:.1f} | {pe} | {sps or ''} | {psps:.3f} | {te} |")


def points_from_bench(paths: list[str]) -> list[dict]:
    """Calibration points from scripts/bench_memory.py JSON files (rows that ran: peak and s/step measured)."""
    points = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for row in data.get("rows", []):
            if row.get("status") == "ok" and not row.get("tiny"):
                points.append({"name": f"{row['name']}@{os.path.basename(path)}", "card": data.get("card", "?"),
                               "overrides": row["overrides"], "peak_gib": row["peak_gib"],
                               "s_per_step": row["s_per_step"], "source": path})  # fmt: skip
        if data.get("h2d_gbps"):
            calib_note = f"measured by {path} on {data.get('card')}"
            points.append({"name": "h2d", "h2d_gbps": data["h2d_gbps"], "source": calib_note})
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Show the planner's accuracy on its calibration points, or refit.")
    parser.add_argument(
        "--fit", nargs="*", metavar="JSON", help="refit on the stored points and tiers plus these bench outputs"
    )
    parser.add_argument("--job", action="store_true", help="also refit the job constants to the tiers' phase peaks")
    parser.add_argument("--write", action="store_true", help=f"write the refitted constants to {CALIBRATION_PATH.name}")
    args = parser.parse_args(argv)
    calib = load_calibration()
    points, tiers = list(calib["points"]), list(calib.get("tiers", []))
    print("calibration points, current constants:")
    print_accuracy(points, calib)
    if tiers:
        print_tier_accuracy(tiers, calib)
        print_tier_speed(tiers, calib)
    if args.fit is None:
        return 0
    new = points_from_bench(args.fit)
    for point in new:
        if "h2d_gbps" in point:
            calib["swap_h2d_gbps"] = {"value": point["h2d_gbps"], "source": point["source"]}
    names = {p["name"] for p in new}
    points = [p for p in points if p["name"] not in names] + [p for p in new if "overrides" in p]
    new_tiers = tiers_from_bench(args.fit)
    keys = {(t.get("tier"), t["source"]) for t in new_tiers}
    tiers = [t for t in tiers if (t.get("tier"), t["source"]) not in keys] + new_tiers
    step_points = [p for p in new if "overrides" in p]
    if step_points or new_tiers:  # the step's constants: only with new measurements of the step
        calib = fit(points, calib, tiers=tiers)
    if args.job:
        calib = fit_job(tiers, calib)
    calib["points"], calib["tiers"] = points, [_stored_tier(t) for t in tiers]
    print(f"\nrefitted on {len(points)} points and {len(tiers)} tiers:")
    if step_points:
        print_accuracy(points, calib)
    if tiers:
        print_tier_accuracy(tiers, calib)
        print_tier_speed(tiers, calib)
    print(json.dumps({s: calib[s]["constants"] for s in ("memory", "time", "job")}, indent=1))
    if args.write:
        atomic_write_text(CALIBRATION_PATH, json.dumps(calib, indent=1) + "\n")
        print(f"written to {CALIBRATION_PATH}")
    else:
        print("(not written: add --write)")
    return 0
