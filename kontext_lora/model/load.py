"""Loading the Kontext pipeline parts from a local diffusers folder, and encoding images and captions."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from kontext_lora.config import ModelConfig
from kontext_lora.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(UserError, ValueError):
    """The model folder cannot be used; the message names the folder and the fix."""


PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def quiet_component_loading() -> None:
    """No per-model "Loading weights" bars from transformers: they nest inside diffusers' one bar over the pipeline's
    components, and each text encoder drew its own (process-wide, like the rest of transformers' logging)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def check_model_folder(folder: str | Path, parts: Iterable[str] = PIPELINE_PARTS) -> None:
    """Read every config file and safetensors header of `parts` (no weights): a missing, cut or unreadable file raises
    a ModelError naming it, before a loader fails on it with a traceback (or, for T5, without the file's name)."""
    folder = Path(folder)
    for part in parts:
        base = folder / part
        if not base.is_dir():
            raise ModelError(f"model folder {base} is missing; point model.pretrained at a whole diffusers pipeline")
        for path in sorted(base.iterdir()):
            if path.suffix == ".json":
                try:
                    json.loads(path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, ValueError) as exc:
                    raise ModelError(f"model file {path} is damaged ({type(exc).__name__}): replace it") from None
            elif path.suffix == ".safetensors":
                _check_safetensors(path)
        if part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            if not (base / "config.json").is_file():
                raise ModelError(f"model file {base / 'config.json'} is missing: replace it")
            if not any(base.glob("*.safetensors")):
                raise ModelError(f"model folder {base} holds no .safetensors weights: replace them")


def _check_safetensors(path: Path) -> None:
    """A safetensors file's header parses and the file is as long as the header says (a cut file is not)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        raise ModelError(f"model file {path} is damaged (unreadable header: {exc}); replace it") from None
    if size != 8 + length + end:
        raise ModelError(f"model file {path} is damaged ({size} bytes, its header describes {8 + length + end}); "
                         "it was cut short or appended to: replace it")  # fmt: skip


def prepare_model_folder(cfg: ModelConfig) -> Path:
    """The configured model folder, built first if missing and model.build_tiny_if_missing; its files are checked
    (`check_model_folder`), so a missing or damaged one fails in one line before any weight is read."""
    folder = Path(cfg.pretrained)
    if not folder.exists() and cfg.build_tiny_if_missing:
        from kontext_lora.atomic import remove_leftovers
        from kontext_lora.model.tiny import make_tiny_model

        remove_leftovers(folder)  # the temp folder of a build that was interrupted
        print(f"[kontext-lora] building the embedded tiny Kontext model at {folder}")
        make_tiny_model(folder)
    if not (folder / "model_index.json").is_file():
        raise ModelError(
            f"config key `model.pretrained`: {folder} is not a diffusers pipeline folder (no model_index.json); "
            "point it at a local FLUX.1-Kontext-dev folder, or set model.build_tiny_if_missing=true"
        )
    check_model_folder(folder)
    return folder


def load_pipeline(cfg: ModelConfig, torch_dtype: torch.dtype | None = None):
    """`FluxKontextPipeline.from_pretrained` on the configured local folder (building the tiny model if asked)."""
    from diffusers import FluxKontextPipeline

    folder = prepare_model_folder(cfg)
    quiet_component_loading()
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
    check_model_folder(folder, ("transformer",))
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
