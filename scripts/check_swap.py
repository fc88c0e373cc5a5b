"""Block swap on the full-size Kontext transformer: same loss as no swap, step for step; time and peak memory.

Each config runs in its own process (peaks are per process; a crash cannot poison the next): it builds FLUX.1-Kontext's
transformer (12B, random bf16, scripts/_bench_common.py), injects the same LoRA (lora_B drawn with a fixed seed),
applies `memory.block_swap=N` through the project's own path (`ours_step_fn`: inject_lora -> apply_memory_and_speed ->
accelerate -> training_step, every block checkpointed, eager), then trains `--steps` steps at each resolution in
turn with the same noise. N=0 runs twice: its second run is the floor of the GPU's own nondeterminism, against which
the swapped runs' loss differences are judged (0 when the kernels are deterministic).

The model is built on the device and the swapped blocks' storage freed right after (their bytes go to pinned CPU
memory); the peak is measured from the first training step on (`reset_peak_memory_stats`), so it is the peak of
training with swap, not of building the random model. Usage (GPU, about 3 minutes on an H100):

    python scripts/check_swap.py --out check_swap.json
    python scripts/check_swap.py --tiny --out /tmp/check_swap.json     # CPU smoke run on the tiny model
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from kontext_lora.atomic import atomic_write_text

# Eager, flash attention, every block checkpointed: the same compute whatever N (swapped blocks are checkpointed).
OVERRIDES = ["speed.attention_backend=flash", "speed.compile=none", "train.gradient_checkpointing=true"]


def run_child(args: argparse.Namespace) -> None:
    """One config: build, swap, train `steps[i]` steps at each `res[i]`; print one `RESULT {json}` line."""
    from _bench_common import build_transformer, make_batch, ours_step_fn

    from kontext_lora.model.swap import swapped_bytes

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cuda = device.type == "cuda"
    transformer = build_transformer(args.tiny, device)
    batch = make_batch(args.res[0], args.tiny, device)
    overrides = [*OVERRIDES, f"memory.block_swap={args.child}"] + (["speed.compile=blocks"] if args.compile else [])
    step = ours_step_fn(transformer, batch, device, overrides)
    result = {"swap": args.child, "swapped_gib": swapped_bytes(transformer) / 2**30, "per_res": []}
    result["resident_gib"] = torch.cuda.memory_allocated(device) / 2**30 if cuda else float("nan")
    for res, steps in zip(args.res, args.steps, strict=True):
        batch_here = make_batch(res, args.tiny, device)
        for field in ("target_latents", "control_latents", "prompt_embeds", "pooled_embeds"):
            setattr(batch, field, getattr(batch_here, field))  # the step function holds `batch`: refill it
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        for index in range(steps):
            start = time.perf_counter()
            losses.append(step(None).item())  # synchronises
            times.append(time.perf_counter() - start)
            print(f"  {res}^2 step {index}: {times[-1]:.3f} s loss {losses[-1]:.6f}", flush=True)
        timed = times[2:] if len(times) > 3 else times[1:] or times
        result["per_res"].append({
            "res": res, "losses": losses, "times": times, "s_per_step": statistics.median(timed),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"),
        })  # fmt: skip
    result["device"] = torch.cuda.get_device_name(device) if cuda else "cpu"
    print("RESULT " + json.dumps(result), flush=True)


def print_table(rows: list[dict]) -> None:
    base = next((r for r in rows if r.get("swap") == 0 and "error" not in r), None)
    print(
        "\n| res | block_swap | swapped GiB | resident GiB | s/step | peak GiB | max loss diff vs 0 (steps) | step 1 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| | {row['label']} | failed: {row['error']} |")
            continue
        for index, per_res in enumerate(row["per_res"]):
            diffs = ["", ""]
            if base is not None and row is not base:
                ours, theirs = per_res["losses"], base["per_res"][index]["losses"]
                deltas = [abs(a - b) for a, b in zip(ours, theirs, strict=True)]
                diffs = [f"{max(deltas):.2e} ({len(deltas)})", f"{deltas[0]:.2e}"]
            print(f"| {per_res['res']} | {row['label']} | {row['swapped_gib']:.2f} | {row['resident_gib']:.2f} | "
                f"{per_res['s_per_step']:.3f} | "
                  f"{per_res['peak_gib']:.2f} | {diffs[0]} | {diffs[1]} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swap", type=int, nargs="+", default=[0, 0, 8, 24], help="block_swap counts (0 twice: floor)")
    parser.add_argument("--res", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 4], help="steps at each --res")
    parser.add_argument("--compile", action="store_true", help="speed.compile=blocks instead of eager")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per config")
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script, times nothing real")
    parser.add_argument("--out", type=Path, default=Path("check_swap.json"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if len(args.steps) != len(args.res):
        parser.error("--steps needs one count per --res")
    if args.child is not None:
        return run_child(args)

    from _bench_common import last_lines, run_for_result

    rows = []
    for index, swap in enumerate(args.swap):
        label = f"{swap}" + (" (again)" if swap in args.swap[:index] else "")
        command = [sys.executable, __file__, "--child", str(swap), "--res", *map(str, args.res),
                   "--steps", *map(str, args.steps)]  # fmt: skip
        command += ["--tiny"] if args.tiny else []
        command += ["--compile"] if args.compile else []
        print(f"== block_swap={label}", flush=True)
        started = time.perf_counter()
        row, output = run_for_result(command, args.timeout)
        if row is not None:
            print("\n".join(line for line in output.splitlines() if "step" in line or "applied" in line), flush=True)
        else:
            row = {"swap": swap, "error": last_lines(output)[-400:]}
            print(output[-3000:], flush=True)
        row.update(label=label, wall_s=time.perf_counter() - started)
        rows.append(row)
        record = {"overrides": OVERRIDES, "compile": args.compile, "rows": rows}
        atomic_write_text(args.out, json.dumps(record, indent=1))
    print_table(rows)


if __name__ == "__main__":
    main()
