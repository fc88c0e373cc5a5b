"""Multi-GPU training speed and memory of a full-size Kontext LoRA: 1 GPU against DDP and FSDP2 on N GPUs.

Each configuration runs in its own launch (a child process per GPU, with a timeout): the full-size random Kontext
transformer (scripts/_bench_common.py's `build_transformer`, bf16, built on each GPU), the project's LoRA, `apply_speed`
and `training_step` under `accelerator.prepare` with bf16 mixed precision — the path `fit()` runs — batch 1 per
GPU, eager (no compile), cuDNN attention. The multi-GPU launches use the repository's own accelerate config files
(configs/accelerate/ddp_2gpu.yaml, fsdp2_2gpu.yaml) with --num_processes N. NVLink multicast is switched off in
the children (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).

Reported per configuration: per-GPU seconds per optimizer step (median of the timed steps, slowest rank), global
samples/s, speed-up over 1 GPU, per-GPU peak memory during the training steps (measured after sharding) and the
memory the prepared model holds before the first step. Usage:

    python scripts/bench_multigpu.py --res 1024 --gpus 1 2 --modes ddp fsdp --out results.json
    python scripts/bench_multigpu.py --tiny            # CPU, gloo, tiny model shapes: checks the script end to end
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = {"ddp": "ddp_2gpu.yaml", "fsdp": "fsdp2_2gpu.yaml", "deepspeed": "deepspeed_zero2_2gpu.yaml"}
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
OVERRIDES = ["speed.attention_backend=cudnn", "speed.compile=none"]


def run_child(args: argparse.Namespace) -> None:
    """One process of one configuration: build, prepare, time; the main process prints one `RESULT {json}` line."""
    from _bench_common import bench_config, build_transformer, make_batch, randomize_lora_b
    from accelerate import Accelerator

    from kontext_lora.model.lora import inject_lora, lora_parameters
    from kontext_lora.model.speed import apply_speed
    from kontext_lora.train.batches import set_deepspeed_batch_size
    from kontext_lora.train.objective import micro_batch_seed, training_step
    from kontext_lora.train.optim import build_optimizer

    overrides = OVERRIDES if not args.tiny else ["speed.attention_backend=auto", "speed.compile=none"]
    cfg = bench_config(overrides)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    device = accelerator.device
    transformer = build_transformer(args.tiny, device)
    inject_lora(transformer, cfg.lora)
    randomize_lora_b(transformer)
    applied = apply_speed(transformer, cfg.speed, cfg.train.gradient_checkpointing, device)
    optimizer = build_optimizer(lora_parameters(transformer), cfg)
    set_deepspeed_batch_size(accelerator, cfg.train.batch_size)  # as fit() does: the loader is not prepared
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    params = lora_parameters(accelerator.unwrap_model(transformer))
    accelerator.print(f"[{args.child}] {accelerator.distributed_type}, {accelerator.num_processes} process(es), "
                      f"applied {applied}", flush=True)  # fmt: skip
    cuda = device.type == "cuda"
    if cuda:  # the full model was built on every GPU before FSDP sharded it: measure from here on
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) / 2**30 if cuda else float("nan")
    batch = make_batch(args.res, args.tiny, device)
    generator = torch.Generator(device)
    transformer.train()
    times, losses = [], []
    for index in range(args.warmup + args.steps):
        accelerator.wait_for_everyone()
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        generator.manual_seed(micro_batch_seed(0, index * accelerator.num_processes + accelerator.process_index))
        loss = training_step(transformer, batch, cfg, generator)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # waits for the step's GPU work
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        accelerator.print(f"  step {index}: {times[-1]:.3f} s loss {losses[-1]:.4f}", flush=True)
    median = statistics.median(times[args.warmup :])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    per_rank = accelerator.gather(torch.tensor([[median, peak, resident]], device=device)).cpu().tolist()
    if accelerator.is_main_process:
        result = {
            "mode": args.child, "gpus": accelerator.num_processes, "res": args.res,
            "s_per_step": max(row[0] for row in per_rank), "per_rank": per_rank,
            "peak_gib": max(row[1] for row in per_rank), "resident_gib": max(row[2] for row in per_rank),
            "first_step_s": times[0], "losses": losses, "applied": applied,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        }  # fmt: skip
        print("RESULT " + json.dumps(result), flush=True)
    accelerator.end_training()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(mode: str, gpus: int, args: argparse.Namespace) -> list[str]:
    """The command line of one configuration: a plain process for 1 GPU, accelerate launch (GPU) or torchrun (CPU)."""
    child = [str(Path(__file__).resolve()), "--child", mode, "--res", str(args.res), "--steps", str(args.steps),
             "--warmup", str(args.warmup)] + (["--tiny"] if args.tiny else [])  # fmt: skip
    if gpus == 1:
        return [sys.executable, *child]
    if args.tiny:  # accelerate launches CPU processes only through mpirun; torchrun + ACCELERATE_USE_CPU instead
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--master_addr",
                "127.0.0.1", "--master_port", str(_free_port()), *child]  # fmt: skip
    config = REPO / "configs" / "accelerate" / ACCELERATE_CONFIGS[mode]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
            str(gpus), "--main_process_port", str(_free_port()), *child]  # fmt: skip


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(mode, GPUs) to run: one 1-GPU baseline, then every mode on every larger GPU count."""
    runs = [("single", 1)] if 1 in args.gpus else []
    for gpus in sorted(g for g in args.gpus if g > 1):
        for mode in args.modes:
            if args.tiny and mode in ("fsdp", "deepspeed"):
                print(f"{mode}: skipped with --tiny (accelerate turns it on only for GPU processes)", flush=True)
                continue
            runs.append((mode, gpus))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=["ddp", "fsdp"], choices=sorted(ACCELERATE_CONFIGS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=int, help="seconds per configuration (default 150; 400 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (gloo): checks the script")
    parser.add_argument("--out", type=Path, default=Path("bench_multigpu.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)
    args.timeout = args.timeout or (400 if args.tiny else 150)

    from _bench_common import last_lines, run_for_result

    env = {**os.environ, **NO_MULTICAST}
    if args.tiny:
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    card = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu"
    print(f"card: {card}; torch {torch.__version__}; {torch.cuda.device_count()} GPU(s) visible", flush=True)
    rows = []
    for mode, gpus in plan(args):
        command = launch_command(mode, gpus, args)
        print(f"== {mode} on {gpus}: {' '.join(command)}", flush=True)
        started = time.perf_counter()
        row, output = run_for_result(command, args.timeout, env, cwd=REPO)
        if row is None:
            row = {"mode": mode, "gpus": gpus, "res": args.res, "error": last_lines(output)[-300:]}
        row["wall_s"] = time.perf_counter() - started
        if "error" in row:  # the launcher's own traceback comes last: show the workers' error lines too
            lines = [line for line in output.splitlines() if "Error" in line and "ChildFailedError" not in line]
            causes = list(dict.fromkeys(lines))  # each distinct line once, in order (every rank prints its own)
            row["error"] = " | ".join(causes)[-600:] or row["error"]
            print("\n".join(causes[:30]), flush=True)
        print(output[-1500:] if "error" in row else "\n".join(output.splitlines()[-3:]), flush=True)
        rows.append(row)
        args.out.write_text(json.dumps({"card": card, "rows": rows}, indent=1))
    print_table(rows, card)
    args.out.write_text(json.dumps({"card": card, "rows": rows}, indent=1))  # with samples/s and speed-ups


def print_table(rows: list[dict], card: str) -> None:
    """Markdown table: mode, GPUs, per-GPU s/step, samples/s, speed-up over 1 GPU, per-GPU peak and resident GiB."""
    base = next((r for r in rows if r["gpus"] == 1 and "error" not in r), None)
    print(f"\ncard: {card}")
    print("| mode | GPUs | res | per-GPU s/step | samples/s | speed-up vs 1 GPU | per-GPU peak GiB | model GiB/GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['mode']} | {row['gpus']} | {row['res']} | failed: {row['error']} |")
            continue
        samples = row["gpus"] / row["s_per_step"]  # batch 1 per GPU
        speedup = samples / (1 / base["s_per_step"]) if base else float("nan")
        row["samples_per_s"], row["speedup"] = samples, speedup
        print(f"| {row['mode']} | {row['gpus']} | {row['res']} | {row['s_per_step']:.3f} | {samples:.2f} | "
              f"{speedup:.2f}x | {row['peak_gib']:.1f} | {row['resident_gib']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
