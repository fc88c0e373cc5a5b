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

# FLUX.1-Kontext-dev's transformer/config.json (guidance_embeds is True for the guidance-distilled dev model).
FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
# google/t5-v1_1-xxl, the encoder half (text_encoder_2/config.json of FLUX.1).
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
    tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)  # fmt: skip
# openai/clip-vit-large-patch14's text model (text_encoder/config.json of FLUX.1).
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
)  # fmt: skip
# vae/config.json of FLUX.1 (16 latent channels, 8x compression, its shift and scaling factors).
FLUX_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, act_fn="silu", scaling_factor=0.3611,
    shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
)  # fmt: skip


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
            clip = CLIPTextConfig(**CLIP_L, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            text_encoder = CLIPTextModel(clip)
            text_encoder_2 = T5EncoderModel(T5Config(**T5_XXL))
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
