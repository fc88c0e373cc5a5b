"""What the benchmark scripts share: the full-size random Kontext transformer, a cached-shaped batch, the
benchmarks' config, the project's training step as `fit` runs it, and running one child process per configuration.

The scripts import it as `_bench_common` (Python puts a script's own folder first on sys.path).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import torch

FULL = dict(
    in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
TEXT_TOKENS = 512
RANK = 16


def build_transformer(tiny: bool, device: torch.device) -> torch.nn.Module:
    """A randomly initialised Kontext transformer in bf16, built directly on `device` (no download)."""
    from diffusers import FluxTransformer2DModel

    from kontext_lora.model.tiny import TINY_TRANSFORMER

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**(TINY_TRANSFORMER if tiny else FULL))
    torch.set_default_dtype(torch.float32)
    return transformer.requires_grad_(False)


def make_batch(resolution: int, tiny: bool, device: torch.device):
    """A cached Kontext batch of one sample: latents (1, 16, R/8, R/8) for target and control, T5 (1, 512, 4096)."""
    from kontext_lora.train.objective import LatentBatch

    generator = torch.Generator().manual_seed(1)
    side = resolution // 8
    joint, pooled = (32, 32) if tiny else (FULL["joint_attention_dim"], FULL["pooled_projection_dim"])
    text = 16 if tiny else TEXT_TOKENS
    return LatentBatch(
        target_latents=torch.randn(1, 16, side, side, generator=generator),
        control_latents=torch.randn(1, 16, side, side, generator=generator),
        prompt_embeds=torch.randn(1, text, joint, generator=generator),
        pooled_embeds=torch.randn(1, pooled, generator=generator),
    ).to(device, torch.bfloat16)


def randomize_lora_b(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Draw every lora_B from N(0, 0.01^2) with a fixed CPU seed (same in every variant), so lora_A gets gradients."""
    generator = torch.Generator().manual_seed(2)
    params = []
    for name, param in sorted(transformer.named_parameters()):
        if "lora_" in name and param.requires_grad:
            params.append(param)
            if "lora_B" in name:
                param.data.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return params


def bench_config(overrides: list[str]):
    """The benchmarks' config: the full model's LoRA (rank 16, the attention+MLP preset), bf16 mixed precision, every
    block checkpointed, then `overrides`."""
    from kontext_lora.config import load_config

    return load_config(None, [
        "model.pretrained=unused", "data.datasets=[{path: unused}]", f"lora.rank={RANK}", f"lora.alpha={RANK}",
        "lora.preset=attention_mlp", "train.mixed_precision=bf16", "train.gradient_checkpointing=true",
        "train.lr=1e-4", *overrides,
    ])  # fmt: skip


def run_for_result(
    command: list[str], timeout: float, env: dict | None = None, cwd: Path | None = None
) -> tuple[dict | None, str]:
    """Run one benchmark child and return (its last `RESULT {json}` line parsed, or None; its output).

    The child runs in its own process group, killed whole on timeout (a launcher's workers too, so no orphan keeps
    holding a GPU for the next configuration); stdout and stderr come back interleaved as printed.
    """
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            start_new_session=True)  # fmt: skip
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0] + f"\nTIMEOUT after {timeout} s"
    found = [line for line in output.splitlines() if line.startswith("RESULT ")]
    return (json.loads(found[-1][len("RESULT ") :]) if found else None), output


def last_lines(output: str, count: int = 3) -> str:
    """The last `count` non-empty lines of a child's output, joined: the error a failed child's row records."""
    return " | ".join([line for line in output.splitlines() if line.strip()][-count:])


def ours_step_fn(transformer: torch.nn.Module, batch, device: torch.device, overrides: list[str]):
    """The project's path: inject_lora -> apply_memory_and_speed -> accelerate -> training_step, as `fit` runs them."""
    from accelerate import Accelerator

    from kontext_lora.model.lora import inject_lora
    from kontext_lora.model.speed import apply_memory_and_speed
    from kontext_lora.train.objective import training_step
    from kontext_lora.train.optim import build_optimizer

    cfg = bench_config(overrides)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    inject_lora(transformer, cfg.lora)
    params = randomize_lora_b(transformer)
    applied = apply_memory_and_speed(transformer, cfg, device)  # memory.base_quant, then speed.*, as fit() does
    print(f"applied: {applied}", flush=True)
    optimizer = build_optimizer(params, cfg)  # AdamW, fused where the device has it (cfg.optim)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    transformer.train()
    generator = torch.Generator(device).manual_seed(0)

    def step(grads_out: Path | None) -> torch.Tensor:
        loss = training_step(transformer, batch, cfg, generator)
        accelerator.backward(loss)
        if grads_out is not None:
            _save_first_step(grads_out, loss, params)
        accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _save_first_step(path: Path, loss: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
    from safetensors.torch import save_file

    grads = torch.cat([p.grad.detach().float().flatten() for p in params]).cpu()
    save_file({"loss": loss.detach().float().reshape(1).cpu(), "grads": grads}, str(path))
