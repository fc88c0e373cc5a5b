"""Loading the Kontext pipeline parts from a local diffusers folder, and encoding images and captions."""

from __future__ import annotations

from pathlib import Path

import torch

from kontext_lora.config import ModelConfig
from kontext_lora.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(UserError, ValueError):
    """The model folder cannot be used; the message names the folder and the fix."""


def load_pipeline(cfg: ModelConfig, torch_dtype: torch.dtype | None = None):
    """`FluxKontextPipeline.from_pretrained` on the configured local folder (building the tiny model if asked)."""
    from diffusers import FluxKontextPipeline

    folder = Path(cfg.pretrained)
    if not folder.exists() and cfg.build_tiny_if_missing:
        from kontext_lora.model.tiny import make_tiny_model

        print(f"[kontext-lora] building the embedded tiny Kontext model at {folder}")
        make_tiny_model(folder)
    if not (folder / "model_index.json").is_file():
        raise ModelError(
            f"config key `model.pretrained`: {folder} is not a diffusers pipeline folder (no model_index.json); "
            "point it at a local FLUX.1-Kontext-dev folder, or set model.build_tiny_if_missing=true"
        )
    pipe = FluxKontextPipeline.from_pretrained(str(folder), dtype=torch_dtype or DTYPES[cfg.dtype])
    if not pipe.transformer.config.guidance_embeds:
        raise ModelError(
            f"{folder}/transformer: guidance_embeds is false; FLUX.1-Kontext-dev needs a guidance embedder"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_transformer(cfg: ModelConfig, device: torch.device | None = None):
    """Only the FluxTransformer2DModel of the configured folder (`transformer/` subfolder), in model.dtype, on
    `device` (None: left on the CPU, e.g. for `quantize_base` to move it layer by layer)."""
    from diffusers import FluxTransformer2DModel

    folder = Path(cfg.pretrained)
    if not (folder / "transformer" / "config.json").is_file():
        raise ModelError(f"config key `model.pretrained`: {folder} has no transformer/ folder of a diffusers pipeline")
    transformer = FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer", dtype=DTYPES[cfg.dtype])
    if not transformer.config.guidance_embeds:
        raise ModelError(
            f"{folder}/transformer: guidance_embeds is false; FLUX.1-Kontext-dev needs a guidance embedder"
        )
    return transformer.to(device) if device is not None else transformer


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> (B, 16, H/8, W/8) normalised latents (distribution mode, shift, scale)."""
    hook = getattr(vae, "_hf_hook", None)  # under model CPU offload the VAE sits on the CPU until encode() runs
    device = getattr(hook, "execution_device", None) or vae.device
    images = images.to(device=device, dtype=vae.dtype)
    latents = vae.encode(images).latent_dist.mode()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def encode_captions(pipe, captions: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (T5 sequence embeddings (B, L, 4096), CLIP pooled embeddings (B, 768)), via the pipeline."""
    prompt_embeds, pooled_embeds, _ = pipe.encode_prompt(
        prompt=captions, prompt_2=None, device=pipe.text_encoder.device, max_sequence_length=max_sequence_length
    )
    return prompt_embeds, pooled_embeds
