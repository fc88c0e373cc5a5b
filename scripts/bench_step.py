"""Seconds per training step of a full-size Kontext LoRA: the diffusers-example loop against ours, one table.

Builds FLUX.1-Kontext's transformer (12B, random weights, bf16) on the GPU, feeds inputs shaped as a cached Kontext
batch (target + control latents of the same size, 512 T5 tokens), and runs each variant in its own process (a
failing kernel cannot poison the next variant; memory peaks are per variant):

- `reference`: the loop of diffusers' train_dreambooth_lora_flux_kontext.py: bf16 base, fp32 LoRA params under
  autocast, eager, every block checkpointed, foreach AdamW, PyTorch's default attention kernel.
- `ours-*`: the project's own `training_step` (the function `fit` runs) after `apply_memory_and_speed` with the
  variant's `speed.*` / `memory.*` / `train.*` overrides, under accelerate (bf16 mixed precision) as in training.

Every variant starts from the same LoRA (lora_B drawn at random so lora_A gets gradients too) and the same noise;
the first step's loss and LoRA gradients are saved, and the table gives their relative error against `ours-eager`
(the eager bf16 path). Usage:

    python scripts/bench_step.py --res 1024 512 --variants reference ours-eager ours-budget
    python scripts/bench_step.py --tiny --res 64            # a CPU smoke run on the tiny model's shapes
    python scripts/bench_step.py --res 1024 --variants ours-fp8mm-keepattn45-cg --trace traces   # + where the GPU waits
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
from _bench_common import (
    FULL,
    RANK,
    TEXT_TOKENS,
    build_transformer,
    last_lines,
    make_batch,
    ours_step_fn,
    randomize_lora_b,
    run_for_result,
)

# The diffusers example's default `--lora_layers` (14 module kinds; a suffix match, so it also adapts the final
# proj_out); ours is the `attention_mlp` preset: the same 13 kinds inside the blocks.
REFERENCE_TARGETS = [
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
]  # fmt: skip

# speed.* / memory.* / train.* overrides of each of our variants (docs/performance.md measures each): every block
# checkpointed unless a variant says otherwise (bench_config).
COMPILED_NO_CKPT = ["speed.attention_backend=cudnn", "speed.compile=blocks", "train.gradient_checkpointing=false"]
FP8_STORED = "memory.base_quant=fp8"  # the frozen base stored in e4m3: 11 GiB of weights instead of 22
FP8_MATMULS = [FP8_STORED, "speed.fp8_base=true"]  # ... and multiplied in fp8 (torch._scaled_mm on the stored weights)
CUDA_GRAPHS = "speed.cuda_graphs=true"
FAST_ACCUM, FUSE_LORA = "speed.fp8_fast_accum_backward=true", "speed.fuse_lora_inputs=true"
TUNE = "speed.tune_kernels=true"


def keep_attention(budget: float) -> list[str]:
    """An activation budget with the attention forward never recomputed (speed.keep_attention)."""
    return [f"speed.activation_budget={budget}", "speed.keep_attention=true"]


KEEP_ATTENTION_45 = keep_attention(0.45)  # under 40 GiB at 1024^2
VARIANTS: dict[str, list[str]] = {
    # bf16: each option alone, then together
    "ours-eager": ["speed.attention_backend=flash", "speed.compile=none"],
    "ours-cudnn": ["speed.attention_backend=cudnn", "speed.compile=none"],
    "ours-compile": ["speed.attention_backend=flash", "speed.compile=blocks"],
    "ours-compile-cudnn": ["speed.attention_backend=cudnn", "speed.compile=blocks"],
    "ours-ckpt50": ["speed.attention_backend=cudnn", "speed.compile=blocks", "speed.checkpoint_fraction=0.5"],
    "ours-nockpt": COMPILED_NO_CKPT,
    "ours-budget": [*COMPILED_NO_CKPT, "speed.activation_budget=0.5"],
    "ours-budget30": [*COMPILED_NO_CKPT, "speed.activation_budget=0.3"],
    "ours-budget50-ckpt25": [
        "speed.attention_backend=cudnn",
        "speed.compile=blocks",
        "speed.checkpoint_fraction=0.25",
        "speed.activation_budget=0.5",
    ],  # fmt: skip
    "ours-budget-cg": [*COMPILED_NO_CKPT, "speed.activation_budget=0.5", CUDA_GRAPHS],
    # torchao's float8 matmuls on the bf16 base; the base stored in fp8 and dequantized for each matmul
    "ours-fp8-budget": [*COMPILED_NO_CKPT, "speed.activation_budget=0.5", "speed.fp8_base=true"],
    "ours-fp8store-budget": [*COMPILED_NO_CKPT, "speed.activation_budget=0.5", FP8_STORED],
    # fp8 matmuls on the fp8-stored base, alone and with each option on top
    "ours-fp8mm-budget": [*COMPILED_NO_CKPT, "speed.activation_budget=0.5", *FP8_MATMULS],
    "ours-fp8mm-nockpt": [*COMPILED_NO_CKPT, *FP8_MATMULS],
    "ours-fp8mm-keepattn45": [*COMPILED_NO_CKPT, *KEEP_ATTENTION_45, *FP8_MATMULS],
    "ours-fp8mm-keepattn50": [*COMPILED_NO_CKPT, *keep_attention(0.5), *FP8_MATMULS],
    **{
        f"ours-fp8mm-{name}-cg": [*COMPILED_NO_CKPT, *FP8_MATMULS, CUDA_GRAPHS, *extra]
        for name, extra in [
            ("nockpt", []),
            ("keepattn45", KEEP_ATTENTION_45),
            # the planner's other fp8-matmul candidates (kontext_lora/planner/choice.py: FP8_MATMUL_BUDGETS)
            ("keepattn50", keep_attention(0.5)),
            ("keepattn60", keep_attention(0.6)),
            ("keepattn45-fastacc", [*KEEP_ATTENTION_45, FAST_ACCUM]),
            ("keepattn45-fastacc-fuse", [*KEEP_ATTENTION_45, FAST_ACCUM, FUSE_LORA]),
            # the fastest at 1024^2; the same with exact accumulation; the fastest at 512^2 (tune: minutes of compile)
            ("keepattn45-fastacc-fuse-tune", [*KEEP_ATTENTION_45, FAST_ACCUM, FUSE_LORA, TUNE]),
            ("keepattn45-fuse-tune", [*KEEP_ATTENTION_45, FUSE_LORA, TUNE]),
            ("nockpt-fuse-tune", [FUSE_LORA, TUNE]),
        ]
    },
}


def step_flops(target_tokens: int, control_tokens: int, text_tokens: int = TEXT_TOKENS, cfg: dict = FULL) -> float:
    """Model FLOPs of one training step (batch 1): forward + input-gradient backward of the frozen base, no recompute.

    Per token and block: 12 d^2 multiply-adds (double: qkv 3, out 1, MLP 8 per stream; single: linear1 7, linear2 5).
    Attention: QK^T and PV, 2 N^2 d multiply-adds forward, twice that backward. The base's weight gradients are not
    needed (frozen); LoRA's own FLOPs (rank 16) are under 1% and left out. Recompute is overhead, so not counted.
    """
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    blocks = cfg["num_layers"] + cfg["num_single_layers"]
    tokens = target_tokens + control_tokens + text_tokens
    linear = 2 * 12 * d * d * tokens * blocks  # forward FLOPs (2 per multiply-add)
    attention = 2 * 2 * tokens * tokens * d * blocks
    return (linear + attention) + (linear + 2 * attention)  # forward + backward


def reference_step_fn(transformer: torch.nn.Module, batch, device: torch.device):
    """The diffusers example's step (train_dreambooth_lora_flux_kontext.py), written out independently of ours."""
    from diffusers import FluxKontextPipeline
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                       target_modules=REFERENCE_TARGETS))  # fmt: skip
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # cast_training_params(transformer, dtype=torch.float32)
    params = randomize_lora_b(transformer)
    transformer.enable_gradient_checkpointing()
    # PyTorch 2.11 would pick cuDNN's attention here, whose backward crashes inside Flux blocks in eager mode (see
    # kontext_lora/model/speed.py); the diffusers-style loop runs with it off, i.e. on the flash kernel.
    torch.backends.cuda.enable_cudnn_sdp(False)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator(device).manual_seed(0)
    latents, control = batch.target_latents, batch.control_latents[0]  # one control: LatentBatch holds a list
    _, channels, h, w = latents.shape
    pack = FluxKontextPipeline._pack_latents
    image_ids = FluxKontextPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, latents.dtype)
    control_ids = image_ids.clone()
    control_ids[:, 0] = 1
    ids = torch.cat([image_ids, control_ids])
    txt_ids = torch.zeros(batch.prompt_embeds.shape[1], 3, device=device, dtype=latents.dtype)

    def step(grads_out: Path | None) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        sigmas = torch.sigmoid(torch.randn(1, generator=generator, device=device))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            sigma = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
            noisy = (1.0 - sigma) * latents + sigma * noise
            hidden = torch.cat([pack(noisy, 1, channels, h, w), pack(control, 1, channels, h, w)], dim=1)
            pred = transformer(
                hidden_states=hidden, timestep=sigmas, guidance=torch.ones(1, device=device),
                pooled_projections=batch.pooled_embeds, encoder_hidden_states=batch.prompt_embeds,
                txt_ids=txt_ids, img_ids=ids, return_dict=False,
            )[0][:, : (h // 2) * (w // 2)]  # fmt: skip
            target = pack(noise - latents, 1, channels, h, w)
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def run_child(args: argparse.Namespace) -> None:
    """Build, set up one variant, time it; print one `RESULT {json}` line."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    transformer = build_transformer(args.tiny, device)
    batch = make_batch(args.res[0], args.tiny, device)
    if args.child == "reference":
        step = reference_step_fn(transformer, batch, device)
    else:
        step = ours_step_fn(transformer, batch, device, VARIANTS[args.child])
    times, enqueued, losses = [], [], []
    for index in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        loss = step(Path(args.dump) if index == 0 and args.dump else None)
        enqueued.append(time.perf_counter() - start)  # the CPU's time to launch the step (no sync inside it)
        losses.append(loss.item())
        _sync(device)
        times.append(time.perf_counter() - start)
        print(f"  step {index}: {times[-1]:.3f} s (CPU {enqueued[-1]:.3f} s) loss {losses[-1]:.4f}", flush=True)
    timed = times[args.warmup :]
    profile = profile_step(step, device) if args.profile and device.type == "cuda" else None
    gaps = trace_step(step, device, Path(args.trace) / f"{args.child}-{args.res[0]}.json.gz") if args.trace else None
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    result = {
        "variant": args.child, "res": args.res[0], "s_per_step": statistics.median(timed),
        "spread": (max(timed) - min(timed)) if len(timed) > 1 else 0.0, "first_step_s": times[0],
        "cpu_s": statistics.median(enqueued[args.warmup :]), "peak_gib": peak, "losses": losses, "profile": profile,
        "gaps": gaps, "cudagraph_counters": _cudagraph_counters(), "fused_lora_groups": _fused_lora_groups(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)


def _cudagraph_counters() -> dict[str, int]:
    """inductor's CUDA-graph counters (skips name their reason): whether speed.cuda_graphs really replayed graphs."""
    from torch._dynamo.utils import counters

    return {key: value for key, value in counters["inductor"].items() if "cudagraph" in key}


def _fused_lora_groups() -> int:
    """LoRA input groups that speed.fuse_lora_inputs merged in the compiled graphs (0: off, or inductor's cache)."""
    from torch._dynamo.utils import counters

    return counters["inductor"].get("kontext_lora_fused_lora_groups", 0)


def profile_step(step, device: torch.device) -> dict[str, float]:
    """GPU time of one step by kernel family (ms): where the time goes, for the performance notes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step(None)
        _sync(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    # Attention first: cuDNN's fused attention kernels also carry "sm90" in their names.
    families = {"attention": ("sdpa", "fmha", "flash", "attention", "cudnn"), "matmul": ("gemm", "xmma", "cutlass",
                "sm90", "nvjet", "splitk"), "triton (fused elementwise)": ("triton",)}  # fmt: skip
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        time_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if not time_us or event.key.startswith(("ProfilerStep", "cudaDeviceSynchronize")):
            continue
        name = event.key.lower()
        family = next((f for f, keys in families.items() if any(k in name for k in keys)), "other")
        totals[family] = totals.get(family, 0.0) + time_us / 1e3
    top = sorted(((e.key[:60], (getattr(e, "device_time_total", 0) or 0) / 1e3) for e in prof.key_averages()),
                 key=lambda item: -item[1])[:8]  # fmt: skip
    totals["top kernels"] = "; ".join(f"{k}={v:.1f}" for k, v in top)
    # Kernel time against the step's wall time (profiled): well under 1, the GPU waits on the CPU (launch-bound).
    totals["gpu busy"] = f"{sum(v for v in totals.values() if isinstance(v, float)) / wall_ms:.0%} of {wall_ms:.0f} ms"
    return totals


def trace_step(step, device: torch.device, path: Path) -> dict | None:
    """Trace one step, CPU and GPU (torch.profiler), write the Chrome trace to `path` and return trace_gaps.py's
    summary: how long the GPU sat idle waiting on launches, and which CPU ops ran meanwhile."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    from trace_gaps import analyze, format_summary, load_trace  # beside this script

    path.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(None).item()
        _sync(device)
    prof.export_chrome_trace(str(path))
    summary = analyze(load_trace(path))
    print(format_summary(summary), flush=True)
    return summary


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device) -> float:
    """Measured bf16 matmul rate (8192^3, median of 10): the ceiling MFU is quoted against."""
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def compare(dump: Path, baseline: Path) -> tuple[float, float]:
    """Relative error of the first step's loss and LoRA gradient vector against the baseline's."""
    from safetensors.torch import load_file

    ours, base = load_file(str(dump)), load_file(str(baseline))
    loss_err = ((ours["loss"] - base["loss"]).abs() / base["loss"].abs()).item()
    grad_err = ((ours["grads"] - base["grads"]).norm() / base["grads"].norm()).item()
    return loss_err, grad_err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--res", type=int, nargs="+", default=[1024, 512])
    parser.add_argument("--variants", nargs="+", default=["reference", *VARIANTS])
    parser.add_argument("--steps", type=int, default=6, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    parser.add_argument("--profile", action="store_true", help="also profile one step by kernel family")
    parser.add_argument("--trace", help="trace one step (CPU + GPU) into this folder; report the idle gaps")
    parser.add_argument("--loss-baseline", default="ours-eager", help="variant the per-step losses are compared to")
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script, times nothing real")
    parser.add_argument("--out", type=Path, default=Path("bench_step.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)

    cuda = torch.cuda.is_available() and not args.tiny
    peak_tflops = matmul_tflops(torch.device("cuda")) if cuda else float("nan")
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"card: {card}; torch {torch.__version__}; measured bf16 matmul {peak_tflops:.0f} TFLOP/s", flush=True)
    dumps = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_step_grads"
    dumps.mkdir(parents=True, exist_ok=True)
    rows = []
    for res in args.res:
        for variant in args.variants:
            dump = dumps / f"{variant}-{res}.safetensors"
            dump.unlink(missing_ok=True)
            command = [sys.executable, __file__, "--child", variant, "--res", str(res), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--dump", str(dump)]  # fmt: skip
            command += ["--tiny"] if args.tiny else []
            command += ["--profile"] if args.profile else []
            command += ["--trace", args.trace] if args.trace else []
            print(f"== {variant} @ {res}^2", flush=True)
            started = time.perf_counter()
            row, output = run_for_result(command, args.timeout)
            if row is None:
                row = {"variant": variant, "res": res, "error": last_lines(output)[-300:]}
            row["wall_s"] = time.perf_counter() - started
            print(output[-3000:] if "error" in row else "\n".join(output.splitlines()[-4:]), flush=True)
            row["dump"] = str(dump) if dump.exists() else None
            rows.append(row)
            args.out.write_text(json.dumps({"card": card, "peak_tflops": peak_tflops, "rows": rows}, indent=1))
    print_table(rows, card, peak_tflops, args.tiny, args.loss_baseline)


def print_table(rows: list[dict], card: str, peak_tflops: float, tiny: bool, loss_baseline: str) -> None:
    print(f"\ncard: {card}")
    print("| res | variant | s/step | CPU s | spread | peak GiB | MFU | vs reference | loss rel err | grad rel err "
          f"| mean loss dev vs {loss_baseline} (steps) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['res']} | {row['variant']} | failed: {row['error']} |")
            continue
        same_res = {r["variant"]: r for r in rows if r["res"] == row["res"] and "error" not in r}
        reference = same_res.get("reference")
        baseline = same_res.get("ours-eager") or same_res.get(loss_baseline)  # first-step errors: eager bf16 if run
        tokens = (row["res"] // 16) ** 2
        flops = step_flops(tokens, tokens)
        mfu = flops / row["s_per_step"] / (peak_tflops * 1e12) if not tiny else float("nan")
        ratio = reference["s_per_step"] / row["s_per_step"] if reference else float("nan")
        errors = ("", "")
        if baseline and row["dump"] and baseline["dump"] and row["variant"] != "reference":
            errors = tuple(f"{e:.1e}" for e in compare(Path(row["dump"]), Path(baseline["dump"])))
        deviation = ""
        if loss_baseline in same_res and row["variant"] != loss_baseline:
            ours, base = row["losses"], same_res[loss_baseline]["losses"]
            n = min(len(ours), len(base))
            relative = [abs(a - b) / abs(b) for a, b in zip(ours[:n], base[:n], strict=True)]
            deviation = f"{statistics.mean(relative):.1e} ({n})"
        print(f"| {row['res']} | {row['variant']} | {row['s_per_step']:.3f} | {row.get('cpu_s', float('nan')):.3f} "
              f"| {row['spread']:.3f} | "
              f"{row['peak_gib']:.1f} | {mfu:.0%} | {ratio:.2f}x | {errors[0]} | {errors[1]} "
              f"| {deviation} |")  # fmt: skip
    for row in rows:
        if row.get("profile"):
            top, busy = row["profile"].pop("top kernels", ""), row["profile"].pop("gpu busy", "")
            families = ", ".join(f"{k} {v:.0f} ms" for k, v in sorted(row["profile"].items(), key=lambda kv: -kv[1]))
            print(f"profile {row['variant']} @ {row['res']}: {families}; GPU busy {busy}\n  top kernels (ms): {top}")


if __name__ == "__main__":
    main()
