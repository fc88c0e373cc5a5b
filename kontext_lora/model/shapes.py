"""FLUX.1-Kontext-dev's parts as config dicts: what the model folder's config.json files hold.

Used to count parameters and size activations without the weights (the planner), where a model folder is absent.
Keys are those of diffusers' `FluxTransformer2DModel` / `AutoencoderKL` and transformers' `CLIPTextConfig` /
`T5Config`.
"""

from __future__ import annotations

FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip

FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", mid_block_add_attention=True, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
    scaling_factor=0.3611, shift_factor=0.1159,
)  # fmt: skip

CLIP_L_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
)  # fmt: skip

T5_XXL_ENCODER = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
)  # fmt: skip
