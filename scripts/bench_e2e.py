"""The whole job on one card: the real CLI trains, validates, saves, exports and infers under an emulated memory cap.

For each tier (a card's memory and a resolution) this runs, each in its own process:
1. `kontext-lora train --config configs/examples/kontext_dev.yaml` on a model folder and data_examples/bw, the
   process capped with torch.cuda.set_per_process_memory_fraction before it allocates anything, and no memory
   settings unless --budget explicit (then memory.budget_gib=<cap>): the planner plans for the card;
2. `kontext-lora export --format all` on the adapter;
3. `kontext-lora infer` with the adapter, under the same cap;
and records each phase's wall time and peaks: the allocator's (from the run's job.json, see train/job.py) and the
device's (nvidia-smi's memory.used, sampled every 0.2 s and attributed to phases by their wall-clock spans).
It prints one table and writes JSON that `python -m kontext_lora.planner --fit` reads.

    python scripts/bench_e2e.py --build /tmp/kontext-full --out docs/bench/e2e-h200.json     # GPU, ~20 min
    python scripts/bench_e2e.py --model runs/tiny-kontext --tiers cpu --steps 4 \
        --infer-args="--size 64 --dtype float32"                                                 # the script itself

--build DIR makes the FLUX.1-Kontext-dev-shaped random pipeline there first (kontext_lora/model/full_random.py;
about a minute on an H200, 32 GB on disk) unless it exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "examples" / "kontext_dev.yaml"
DATA = REPO / "data_examples" / "bw"
GIB = 2**30

# name -> (memory cap in GiB or None, overrides of the example config for this tier)
TIERS = {
    "12gib-512": (12.0, ["data.resolution=512", "data.buckets=area"]),
    "16gib-1024": (16.0, []),
    "24gib-1024": (24.0, []),
    "44gib-1024": (44.0, []),
    "76gib-1024": (76.0, []),
    "cpu": (None, ["data.resolution=64", "data.buckets=area", "model.dtype=float32", "train.mixed_precision='no'",
                   "model.max_sequence_length=16"]),
}  # fmt: skip
PHASES = ("cache", "load", "setup", "first_step", "train", "validation", "save", "export", "infer")

# The child: cap this process's accelerator memory before anything allocates, then run the CLI with argv.
CHILD = """
import sys, torch
cap = float(sys.argv[1])
if cap > 0:
    torch.cuda.set_per_process_memory_fraction(cap * 2**30 / torch.cuda.get_device_properties(0).total_memory, 0)
from kontext_lora.cli import main
code = main(sys.argv[2:])
if torch.cuda.is_available():
    print(f"BENCH_PEAK {torch.cuda.max_memory_allocated() / 2**30:.3f} {torch.cuda.max_memory_reserved() / 2**30:.3f}")
sys.exit(code)
"""


class DeviceSampler:
    """nvidia-smi's memory.used (GiB above what was in use before) every `period` s, with wall-clock times."""

    def __init__(self, period: float = 0.2):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self.available = shutil.which("nvidia-smi") is not None
        self.baseline = self._read() if self.available else 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> float:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10).stdout  # fmt: skip
        return float(out.strip().splitlines()[0]) * 2**20 / GIB  # MiB -> GiB

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), self._read() - self.baseline))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(self.period)

    def __enter__(self) -> DeviceSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()

    def peak(self, spans: list[list[float]]) -> float | None:
        values = [used for t, used in self.samples if any(start <= t <= end for start, end in spans)]
        return round(max(values), 3) if values else None


def run_child(cap: float | None, argv: list[str], log: Path, timeout: float) -> tuple[int, float, dict]:
    """Run the CLI in a capped child; returns (exit code, wall seconds, {"alloc_peak_gib", "reserved_peak_gib"})."""
    start = time.time()
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"$ kontext-lora {' '.join(argv)}\n")
        handle.flush()
        try:
            proc = subprocess.run([sys.executable, "-c", CHILD, str(cap or 0), *argv], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout, cwd=REPO,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
            code, output = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as exc:
            code, output = 124, (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        handle.write(output)
    peaks = {}
    for line in output.splitlines():
        if line.startswith("BENCH_PEAK "):
            alloc, reserved = map(float, line.split()[1:3])
            peaks = {"alloc_peak_gib": alloc, "reserved_peak_gib": reserved}
    return code, time.time() - start, peaks


def last_error(log: Path) -> str | None:
    lines = [line for line in log.read_text(encoding="utf-8").splitlines() if "error" in line.lower()]
    return lines[-1][-400:] if lines else None


def run_tier(name: str, args: argparse.Namespace, work: Path) -> dict:
    cap, tier_overrides = TIERS[name]
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    log = run_dir / "bench.log"
    overrides = [
        f"model.pretrained={args.model}", f"data.datasets=[{{path: {DATA}}}]", "data.max_upscale=4",
        f"data.cache_dir={run_dir / 'cache'}", f"output.dir={run_dir / 'run'}", f"train.steps={args.steps}",
        "output.save_every=0", f"validation.every={args.steps}", "validation.heldout_count=2", "validation.steps=4",
        "validation.examples=[]", "logging.report_to=none", *tier_overrides, *args.overrides,
    ]  # fmt: skip
    if args.budget == "explicit" and cap:
        overrides.append(f"memory.budget_gib={cap}")
    record: dict = {"tier": name, "cap_gib": cap, "overrides": overrides, "phases": {}}
    runs = 2 if args.repeat and name == args.repeat else 1
    job_path = run_dir / "run" / "job.json"
    with DeviceSampler() as sampler:
        for attempt in range(runs):  # a repeat: the second run's first step shows what inductor's caches saved
            if attempt:
                first = json.loads(job_path.read_text())["phases"].get("first_step", {}).get("wall_s")
                record["first_step_before_repeat_s"] = first
                shutil.rmtree(run_dir / "run")
            code, wall, _ = run_child(cap, ["train", "--config", str(CONFIG), *overrides], log, args.timeout)
        record["train_exit"] = code
        job = json.loads(job_path.read_text()) if job_path.is_file() else {"phases": {}}
        record["device"] = job.get("device")
        for phase, entry in job["phases"].items():
            record["phases"][phase] = {k: entry[k] for k in ("wall_s", "alloc_peak_gib", "reserved_peak_gib")}
            record["phases"][phase]["device_peak_gib"] = sampler.peak(entry["spans"])
            if "out_of_memory" in entry:
                record["phases"][phase]["out_of_memory"] = entry["out_of_memory"]
        record["metrics"] = _train_metrics(run_dir / "run" / "metrics.jsonl")
        if "train" in record["phases"]:
            record["phases"]["train"]["s_per_step"] = record["metrics"].get("s_per_step")
        config_path = run_dir / "run" / "config.yaml"
        record["config"] = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
        record["plan"] = _plan_line(log)
        record["predicted_device_peak_gib"] = _predicted_device_peak(record["plan"])
        adapter = run_dir / "run" / "pytorch_lora_weights.safetensors"
        if code == 0 and adapter.is_file():
            start = time.time()
            code, wall, _ = run_child(None, ["export", "--lora", str(adapter), "--format", "all", "--out",
                                             str(run_dir / "exports")], log, args.timeout)  # fmt: skip
            record["phases"]["export"] = {"wall_s": round(wall, 3), "exit": code}
            start = time.time()
            infer = ["infer", "--model", str(args.model), "--lora", str(adapter), "--image",
                     str(DATA / "control" / "coffee.jpg"), "--prompt", "make it black and white", "--out",
                     str(run_dir / "infer.png"), "--steps", str(args.infer_steps)]  # fmt: skip
            infer += shlex.split(args.infer_args)
            code, wall, peaks = run_child(cap, infer, log, args.timeout)
            record["phases"]["infer"] = {"wall_s": round(wall, 3), "exit": code, **peaks,
                                         "device_peak_gib": sampler.peak([[start, time.time()]])}  # fmt: skip
    record["status"] = "passed" if code == 0 and record["phases"].get("infer", {}).get("exit") == 0 else "failed"
    if record["status"] != "passed":
        record["error"] = last_error(log)
    peaks = [p.get("device_peak_gib") or 0.0 for p in record["phases"].values()]
    record["device_peak_gib"] = max(peaks) if peaks else None
    if record["device_peak_gib"] and record["predicted_device_peak_gib"]:  # the planner against the device
        record["prediction_error"] = round(record["predicted_device_peak_gib"] / record["device_peak_gib"] - 1, 3)
    return record


def _train_metrics(path: Path) -> dict:
    """Median s/step over all steps but the first 2, the first and last loss, validation records."""
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [row for row in rows if "s_per_step" in row]
    steady = [row["s_per_step"] for row in steps[2:]] or [row["s_per_step"] for row in steps]
    out = {"steps": len(steps), "validations": [row for row in rows if "heldout_loss" in row or "edit_l1" in row]}
    if steady:
        out["s_per_step"] = round(statistics.median(steady), 4)
    return out


def _plan_line(log: Path) -> str | None:
    lines = [
        line for line in log.read_text(encoding="utf-8").splitlines() if "plan" in line and "[kontext-lora]" in line
    ]
    return lines[-1] if lines else None


def _predicted_device_peak(line: str | None) -> float | None:
    """The device peak the planner predicted, from its plan line ("... GiB on the device")."""
    found = re.search(r"([\d.]+) GiB on the device", line or "")
    return float(found.group(1)) if found else None


def table(records: list[dict]) -> str:
    head = ["tier", "status", *PHASES, "s/step", "device peak", "predicted", "limit"]
    rows = [head]
    for rec in records:
        cells = [rec["tier"], rec["status"]]
        for phase in PHASES:
            entry = rec["phases"].get(phase)
            if entry is None:
                cells.append("-")
                continue
            peak = entry.get("device_peak_gib") or entry.get("reserved_peak_gib")
            cells.append(f"{entry['wall_s']:.1f}s" + (f" {peak:.1f}G" if peak else ""))
        cells.append(f"{rec['metrics'].get('s_per_step', float('nan')):.3f}")
        cells.append(f"{rec.get('device_peak_gib') or 0:.1f} GiB")
        error = rec.get("prediction_error")
        predicted = rec.get("predicted_device_peak_gib")
        cells.append(f"{predicted:.1f} GiB ({error:+.0%})" if predicted and error is not None else "-")
        cells.append(f"{rec['cap_gib']:g} GiB" if rec["cap_gib"] else "-")
        rows.append(cells)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a FLUX.1-Kontext-dev-shaped diffusers folder")
    parser.add_argument("--build", type=Path, help="build the full-size random pipeline here (if absent) and use it")
    parser.add_argument("--tiers", nargs="+", default=["12gib-512", "16gib-1024", "24gib-1024", "44gib-1024",
                                                       "76gib-1024"], choices=sorted(TIERS))  # fmt: skip
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--infer-steps", type=int, default=4)
    parser.add_argument("--infer-args", default="", help='extra `kontext-lora infer` arguments, e.g. "--size 64"')
    parser.add_argument("--budget", choices=("auto", "explicit"), default="auto",
                        help="auto: no memory settings (the run plans for the card it sees); explicit: "
                        "memory.budget_gib=<cap>")  # fmt: skip
    parser.add_argument("--repeat", help="run this tier's training twice (inductor's caches on the second)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kontext-bench-e2e"))
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--out", type=Path, help="JSON file for the records")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every training run")
    args = parser.parse_args(argv)
    if args.build:
        if not (args.build / "model_index.json").is_file():
            from kontext_lora.model.full_random import make_full_model

            start = time.time()
            make_full_model(args.build)
            print(f"built {args.build} in {time.time() - start:.0f} s", flush=True)
        args.model = args.build
    if args.model is None:
        parser.error("--model or --build is needed")
    records = []
    for name in args.tiers:
        records.append(run_tier(name, args, args.work))
        print(json.dumps({k: records[-1][k] for k in ("tier", "status", "device_peak_gib")}), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            card = next((rec["device"] for rec in records if rec.get("device")), None)
            args.out.write_text(json.dumps({"card": card, "tiers": records}, indent=1))
    print(table(records))
    return 0 if all(rec["status"] == "passed" for rec in records) else 1


if __name__ == "__main__":
    sys.exit(main())
