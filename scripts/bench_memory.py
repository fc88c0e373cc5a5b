"""Peak memory, s/step and loss deviation of the low-memory modes under an emulated budget, against the planner.

Each configuration runs in its own process (an OOM or a crash is a row of the table, not the end of the run):
1. builds the full-size random FLUX.1-Kontext transformer in bf16 on the GPU (scripts/_bench_common.py's
   `build_transformer`: the whole bf16 model is on the device while it is built, BEFORE the budget is set);
2. takes the project's path as fit() does: seeded `inject_lora` -> `quantize_base` (memory.base_quant) ->
   `enable_block_swap` (memory.block_swap) -> `apply_speed` -> accelerate -> `training_step`;
3. frees the cache, caps the process at the budget (`torch.cuda.set_per_process_memory_fraction(budget / total)`)
   and resets the peak statistics, so the measured peak (max_memory_allocated) is that of training alone;
4. trains N steps from the same LoRA init, batch and noise as every other configuration, and records every loss and
   the median s/step after the warm-up steps.

The table gives predicted (kontext_lora.planner) against measured peak and s/step, and the loss deviation
(mean and max of |loss - loss_bf16| / |loss_bf16| per step) against the bf16 reference run at the same resolution.
To fit the whole run in a few GPU minutes, the 512^2 configurations train 50 steps (the loss deviation over 50
steps) and the 1024^2 ones 10 (deviation over 10; their s/step is the median of the last 7). Usage:

    python scripts/bench_memory.py --out docs/bench/memory-h100.json           # the default set, ~7 min on an H100
    python scripts/bench_memory.py --configs bf16-512 nf4-512@12 --out x.json   # a subset
    python scripts/bench_memory.py --tiny --out /tmp/m.json                     # CPU check on the tiny model's shapes
    python -m kontext_lora.planner --fit docs/bench/memory-h100.json --write   # refit the planner to the results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _bench_common import build_transformer, last_lines, make_batch, randomize_lora_b, run_for_result

from kontext_lora.atomic import atomic_write_text

GIB = 2**30
EAGER_CKPT = ["speed.compile=none", "train.gradient_checkpointing=true"]
COMPILED_CKPT = ["speed.compile=blocks", "train.gradient_checkpointing=true"]
# name -> resolution, budget GiB (0: none), knob overrides, steps. `swap=plan` takes the fewest swapped blocks the
# planner predicts to fit the budget with the other knobs as given. A `bf16-<res>` run is each resolution's reference.
CONFIGS: dict[str, dict] = {
    "bf16-1024": dict(res=1024, budget=0, overrides=EAGER_CKPT, steps=10),
    "fp8-1024@24": dict(res=1024, budget=24, overrides=[*EAGER_CKPT, "memory.base_quant=fp8"], steps=10),
    "fp8-compile-1024@24": dict(
        res=1024,
        budget=24,
        overrides=[*COMPILED_CKPT, "memory.base_quant=fp8"],
        steps=10,
    ),  # fmt: skip
    "bf16-swap-1024@24": dict(res=1024, budget=24, overrides=[*EAGER_CKPT, "memory.block_swap=plan"], steps=10),
    "bf16-512": dict(res=512, budget=0, overrides=EAGER_CKPT, steps=50),
    "nf4-512@12": dict(res=512, budget=12, overrides=[*EAGER_CKPT, "memory.base_quant=nf4"], steps=50),
    "fp8-swap-512@12": dict(
        res=512, budget=12, overrides=[*EAGER_CKPT, "memory.base_quant=fp8", "memory.block_swap=plan"], steps=50
    ),  # fmt: skip
    "nf4-compile-512@12": dict(
        res=512,
        budget=12,
        overrides=[*COMPILED_CKPT, "memory.base_quant=nf4"],
        steps=50,
    ),  # fmt: skip
    "bf16-ckpt50-512": dict(res=512, budget=0, overrides=[*EAGER_CKPT, "speed.checkpoint_fraction=0.5"], steps=10),
    # Not in the default set: the planner's own choice (compiles: about a minute more each).
    "plan-1024@24": dict(res=1024, budget=24, overrides=["memory.budget_gib=24"], steps=10),
    "plan-512@12": dict(res=512, budget=12, overrides=["memory.budget_gib=12"], steps=50),
}
DEFAULT = [name for name in CONFIGS if not name.startswith("plan-")]
TINY_RES = {1024: 64, 512: 32}  # --tiny: the tiny model at these sides instead


def config_overrides(name: str, tiny: bool) -> list[str]:
    """The config overrides of a configuration (swap=plan and budget_gib resolved by the planner), resolution
    included; relative to kontext_lora.planner.POINT_BASE, as the planner's --fit reads them."""
    import dataclasses

    from kontext_lora.planner import Knobs, count_model, plan, predict

    spec = CONFIGS[name]
    res = TINY_RES[spec["res"]] if tiny else spec["res"]
    overrides = [f"data.resolution={res}", *(["model.max_sequence_length=16"] if tiny else [])]
    overrides += [o for o in spec["overrides"] if o != "memory.block_swap=plan" and "budget_gib" not in o]
    cfg = _config(overrides)
    count = count_model(cfg, _shape(tiny))
    budget = 1e9 if tiny else spec["budget"]  # the tiny shapes fit anything; the planning still runs end to end
    if any("budget_gib" in o for o in spec["overrides"]):
        planned, _ = plan(cfg, budget, count)
        overrides += Knobs.of(planned).overrides()
    elif "memory.block_swap=plan" in spec["overrides"]:
        knobs, blocks = Knobs.of(cfg), len(count.blocks)
        fits = [n for n in range(blocks + 1) if predict(cfg, count, knobs=dataclasses.replace(knobs, block_swap=n))
                .fits(budget)]  # fmt: skip
        overrides.append(f"memory.block_swap={fits[0] if fits else blocks}")
    return overrides


def _shape(tiny: bool) -> dict | None:
    from kontext_lora.model.tiny import TINY_TRANSFORMER

    return dict(TINY_TRANSFORMER) if tiny else None


def _config(overrides: list[str]):
    from kontext_lora.config import load_config
    from kontext_lora.planner import POINT_BASE

    return load_config(None, [*POINT_BASE, *overrides])


def setup_memory_and_speed(transformer: torch.nn.Module, cfg, device: torch.device) -> dict:
    """fit()'s own set-up (`apply_memory_and_speed`), with the count of quantized linears added to the record."""
    from kontext_lora.model.quant import quantization_report
    from kontext_lora.model.speed import apply_memory_and_speed

    applied = apply_memory_and_speed(transformer, cfg, device)
    report = quantization_report(transformer)
    return {"quantized": report["linears"], **applied} if report else applied


def run_child(args: argparse.Namespace) -> None:
    """One configuration: build, set up, cap memory, train; print one `RESULT {json}` line."""
    from accelerate import Accelerator

    from kontext_lora.model.lora import inject_lora
    from kontext_lora.train.objective import training_step
    from kontext_lora.train.optim import build_optimizer

    overrides = json.loads(args.overrides)
    cfg = _config(overrides)
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    result: dict = {"status": "error"}
    try:
        transformer = build_transformer(args.tiny, device)
        batch = make_batch(cfg.data.resolution, args.tiny, device)
        torch.manual_seed(0)  # the same lora_A init in every configuration
        inject_lora(transformer, cfg.lora)
        params = randomize_lora_b(transformer)
        result["applied"] = setup_memory_and_speed(transformer, cfg, device)
        print(f"applied: {result['applied']}", flush=True)
        accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, device_placement=False)
        optimizer = build_optimizer(params, cfg)
        transformer, optimizer = accelerator.prepare(transformer, optimizer)
        transformer.train()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            if args.budget > 0:
                total = torch.cuda.get_device_properties(device).total_memory
                fraction = min(1.0, args.budget * GIB / total)
                torch.cuda.set_per_process_memory_fraction(fraction, torch.cuda.current_device())
            torch.cuda.reset_peak_memory_stats(device)
        generator = torch.Generator(device).manual_seed(0)
        times, losses = [], []
        for index in range(args.steps):
            start = time.perf_counter()
            loss = training_step(transformer, batch, cfg, generator)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())  # syncs
            times.append(time.perf_counter() - start)
            print(f"  step {index}: {times[-1]:.3f} s loss {losses[-1]:.5f}", flush=True)
        timed = times[min(args.warmup, len(times) - 1) :]
        result.update(status="ok", s_per_step=statistics.median(timed), losses=losses, first_step_s=times[0],
                      peak_gib=torch.cuda.max_memory_allocated(device) / GIB if cuda else None)  # fmt: skip
    except torch.OutOfMemoryError as exc:
        result.update(status="OOM", error=str(exc).splitlines()[0][:200])
        if cuda:
            result["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    except ImportError as exc:  # e.g. nf4 without torchao
        result.update(status="error", error=f"ImportError: {exc}")
    except RuntimeError as exc:  # an OOM raised inside a compiled graph can arrive wrapped
        if "out of memory" not in str(exc).lower():
            raise
        result.update(status="OOM", error=str(exc).splitlines()[0][:200])
    print("RESULT " + json.dumps(result), flush=True)


def h2d_gbps(size_gib: float = 1.0) -> float:
    """Pinned host -> device copy rate (GB/s), median of 5 copies of `size_gib`: what block swap moves at."""
    host = torch.empty(int(size_gib * GIB), dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    rates = []
    for _ in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        rates.append(host.numel() / (time.perf_counter() - start) / 1e9)
    del host, dev
    torch.cuda.empty_cache()  # the parent keeps no device memory while the configurations run
    return statistics.median(rates[1:])


def deviation(losses: list[float], reference: list[float]) -> tuple[float, float, int]:
    """(mean, max) of |loss - reference| / |reference| over the steps both ran, and that step count."""
    n = min(len(losses), len(reference))
    relative = [abs(a - b) / abs(b) for a, b in zip(losses[:n], reference[:n], strict=True)]
    return statistics.mean(relative), max(relative), n


def print_table(rows: list[dict], card: str) -> None:
    print(f"\ncard: {card}")
    print("| config | budget GiB | peak GiB | predicted | error | s/step | predicted | loss dev mean | max (steps) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ref = next((r for r in rows if r["name"] == f"bf16-{row['res']}" and r.get("status") == "ok"), None)
        budget = f"{row['budget_gib']:g}" if row["budget_gib"] else "-"
        if row.get("status") != "ok":
            status = row.get("status", "error")
            detail = row.get("error", "")[:120]
            print(f"| {row['name']} | {budget} | {status} | {row['predicted_peak_gib']:.1f} | | | "
                  f"{row['predicted_s_per_step']:.3f} | {detail} | |")  # fmt: skip
            continue
        peak = row.get("peak_gib")
        err = f"{(row['predicted_peak_gib'] - peak) / peak:+.1%}" if peak else ""
        dev = ("", "")
        if ref is not None and ref is not row:
            mean, worst, n = deviation(row["losses"], ref["losses"])
            dev = (f"{mean:.2e}", f"{worst:.2e} ({n})")
        print(f"| {row['name']} | {budget} | {peak if peak is None else f'{peak:.2f}'} | "
              f"{row['predicted_peak_gib']:.2f} | {err} | {row['s_per_step']:.3f} | {row['predicted_s_per_step']:.3f} "
              f"| {dev[0]} | {dev[1]} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT, choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, help="steps of every configuration (default: each one's own)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the median s/step")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per configuration")
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU, no budget: checks the script")
    parser.add_argument("--out", type=Path, default=Path("bench_memory.json"))
    parser.add_argument("--report", nargs="+", type=Path, help="print the table of saved --out files (one card)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)
    if args.report:  # runs split over several calls (each call has a time limit): one table, one card
        saved = [json.loads(path.read_text()) for path in args.report]
        cards = {payload["card"] for payload in saved}
        if len(cards) > 1:
            raise SystemExit(f"--report: the files come from different cards ({', '.join(sorted(cards))})")
        return print_table([row for payload in saved for row in payload["rows"]], cards.pop())

    from kontext_lora.planner import count_model, predict

    cuda = torch.cuda.is_available() and not args.tiny
    card = torch.cuda.get_device_name() if cuda else "cpu"
    rate = h2d_gbps() if cuda else None
    total = torch.cuda.get_device_properties(0).total_memory / GIB if cuda else None
    print(f"card: {card} ({total and round(total, 1)} GiB); torch {torch.__version__}; pinned host->device copy "
          f"{rate and round(rate, 1)} GB/s", flush=True)  # fmt: skip
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # less fragmentation under a cap
    rows = []
    for name in args.configs:
        spec = CONFIGS[name]
        overrides = config_overrides(name, args.tiny)
        cfg = _config(overrides)
        pred = predict(cfg, count_model(cfg, _shape(args.tiny)))
        steps = args.steps or spec["steps"]
        budget = 0.0 if args.tiny else float(spec["budget"])
        command = [sys.executable, __file__, "--child", name, "--overrides", json.dumps(overrides), "--budget",
                   str(budget), "--steps", str(steps), "--warmup", str(args.warmup)]  # fmt: skip
        command += ["--tiny"] if args.tiny else []
        print(f"== {name}: {' '.join(overrides)}; predicted {pred.step_peak_gib:.2f} GiB, {pred.s_per_step:.3f} s/step",
              flush=True)  # fmt: skip
        started = time.perf_counter()
        row, output = run_for_result(command, args.timeout, env)
        if row is None:
            row = {"status": "timeout" if "TIMEOUT" in output else "crash", "error": last_lines(output)[-300:]}
        row.update(name=name, res=spec["res"], budget_gib=budget, overrides=overrides, steps=steps, tiny=args.tiny,
                   predicted_peak_gib=pred.step_peak_gib, predicted_s_per_step=pred.s_per_step,
                   predicted_memory_gib=pred.memory_gib, wall_s=time.perf_counter() - started)  # fmt: skip
        print("\n".join(output.splitlines()[-3:]) if row["status"] == "ok" else output[-2000:], flush=True)
        rows.append(row)
        payload = {"card": card, "total_gib": total, "h2d_gbps": rate, "rows": rows}
        atomic_write_text(args.out, json.dumps(payload, indent=1))  # a run cut short still leaves a readable file
    print_table(rows, card)


if __name__ == "__main__":
    main()
