"""The tiny Kontext transformer with a rank-4 LoRA and one fixed batch: what the model tests train and compare."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

from kontext_lora.config import load_config
from kontext_lora.model.lora import inject_lora
from kontext_lora.model.speed import apply_speed
from kontext_lora.model.tiny import TINY_TRANSFORMER
from kontext_lora.train.objective import LatentBatch

BASE = ["model.pretrained=unused", "data.datasets=[{path: unused}]", "lora.rank=4", "lora.alpha=4"]


def tiny_batch() -> LatentBatch:
    """One bf16 batch: 8x8 target and control latents (16 + 16 tokens), 8 text tokens of width 32."""
    generator = torch.Generator().manual_seed(1)
    return LatentBatch(
        target_latents=torch.randn(1, 16, 8, 8, generator=generator),
        control_latents=torch.randn(1, 16, 8, 8, generator=generator),
        prompt_embeds=torch.randn(1, 8, 32, generator=generator),
        pooled_embeds=torch.randn(1, 32, generator=generator),
    ).to("cpu", torch.bfloat16)


def randomize_lora_b(transformer: torch.nn.Module, scale: float) -> None:
    """Draw every lora_B from N(0, scale^2) with a fixed seed (so lora_A gets gradients and the adapter is non-zero)."""
    generator = torch.Generator().manual_seed(2)
    for name, param in sorted(transformer.named_parameters()):
        if "lora_B" in name:
            param.data.copy_(torch.randn(param.shape, generator=generator) * scale)


def tiny_lora_model(overrides: list[str], block_swap: int = 0):
    """A bf16 tiny transformer with a rank-4 LoRA (lora_B random) after `apply_speed`, as fit() prepares it.

    Returns (transformer, cfg, what apply_speed applied); cfg is BASE plus `overrides`."""
    cfg = load_config(None, [*BASE, *overrides])
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**TINY_TRANSFORMER).to(torch.bfloat16)
    inject_lora(transformer, cfg.lora)
    randomize_lora_b(transformer, 0.1)
    applied = apply_speed(
        transformer, cfg.speed, cfg.train.gradient_checkpointing, torch.device("cpu"), block_swap=block_swap
    )
    return transformer, cfg, applied
