"""The full-size random Kontext pipeline (for GPU whole-job measurements), built on the meta device: real shapes."""

from __future__ import annotations

import torch

from kontext_lora.model.full_random import build_full_pipeline


def _billions(module: torch.nn.Module) -> float:
    return sum(param.numel() for param in module.parameters()) / 1e9


def test_full_random_pipeline_has_flux_kontext_dev_sizes() -> None:
    pipe = build_full_pipeline("meta")
    assert abs(_billions(pipe.transformer) - 11.90) < 0.01  # FLUX.1's 12B transformer
    assert abs(_billions(pipe.text_encoder_2) - 4.76) < 0.01  # T5-XXL's encoder
    assert abs(_billions(pipe.text_encoder) - 0.123) < 0.001  # CLIP-L's text model
    assert abs(_billions(pipe.vae) - 0.0838) < 0.001
    assert pipe.transformer.config.guidance_embeds and pipe.vae.config.latent_channels == 16
    assert next(pipe.transformer.parameters()).dtype == torch.bfloat16
    ids = pipe.tokenizer_2("make it black and white").input_ids
    assert max(ids) < pipe.text_encoder_2.config.vocab_size
