"""A FLUX.1-Kontext-dev-shaped pipeline with random weights: the real sizes, for measuring whole jobs on a GPU.

Every component has the real model's shape — the 12B FluxTransformer2DModel, the T5-XXL encoder (4.8B), CLIP-L's
text model and the FLUX VAE — so loading, caching, training, sampling and inference cost what they cost with the
real checkpoint; only the numbers they compute are meaningless. The tokenizers are the offline character
tokenizers of the tiny model (kontext_lora/model/tiny.py), so nothing is downloaded; the embedding tables keep the
real vocabulary sizes. `scripts/bench_e2e.py` builds one with `make_full_model` before it runs the CLI.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kontext_lora.model.shapes import CLIP_L_TEXT, FLUX_TRANSFORMER, FLUX_VAE, T5_XXL_ENCODER


def build_full_pipeline(device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16):
    """A random `FluxKontextPipeline` of FLUX.1-Kontext-dev's shape, built directly on `device` in `dtype`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from kontext_lora.model.tiny import _clip_tokenizer, _t5_tokenizer

    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)  # built in dtype: the 12B transformer never exists in float32
        with torch.device(device):
            transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER)
            vae = AutoencoderKL(**FLUX_VAE)
            ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            clip = CLIPTextConfig(**CLIP_L_TEXT, **ids)
            text_encoder = CLIPTextModel(clip)
            text_encoder_2 = T5EncoderModel(T5Config(**T5_XXL_ENCODER))
    finally:
        torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
        use_dynamic_shifting=True,
    )  # fmt: skip
    return FluxKontextPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, transformer=transformer,
    )  # fmt: skip


def make_full_model(directory: str | Path, device: str | torch.device = "cuda") -> Path:
    """Build the full-size random pipeline and save it in diffusers layout at `directory` (atomically)."""
    from kontext_lora.atomic import atomic_directory

    directory = Path(directory)
    pipe = build_full_pipeline(device)
    with atomic_directory(directory) as tmp:
        pipe.save_pretrained(tmp)
        (tmp / "KONTEXT_LORA_RANDOM.txt").write_text(
            "FLUX.1-Kontext-dev-shaped pipeline with random weights (kontext_lora.model.full_random): for measuring "
            "speed and memory only.\n"
        )
    return directory
