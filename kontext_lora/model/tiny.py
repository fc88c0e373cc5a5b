"""The embedded tiny FLUX.1-Kontext pipeline: every real component class, built offline.

It exists so the real loading code (`from_pretrained` on a local diffusers folder) runs end to end with
nothing downloaded: the example job, the tests and CI all use it. Two variants:
- the pretrained editor (`build_tiny_editor`, the default of `make_tiny_model`): weights shipped in tiny_editor/,
  made by scripts/pretrain_tiny.py; like FLUX.1-Kontext-dev it already follows its control image, so a LoRA only
  has to teach it a new edit (the example job's "make it black and white");
- the random one (`build_tiny_pipeline`): smaller and instant, for unit tests that need speed, not learning.
Tokenizers are constructed from a small character vocabulary instead of the hub's files.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

# Character vocabulary shared by both tokenizers: enough for English captions.
_CHARS = string.ascii_lowercase + string.digits + ".,!?'-:;()/&"

TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels x 2x2 patch, as in FLUX.1
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,  # Kontext-dev is guidance-distilled
    axes_dims_rope=(4, 14, 14),
)

# The random VAE: four resolution levels keep the real 8x spatial compression, so pixel sizes match the real
# model's rules.
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=8,
    sample_size=64,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

# The pretrained tiny editor (weights in tiny_editor/, made by scripts/pretrain_tiny.py): the random model's
# transformer, and a VAE deep enough to reconstruct 128^2 photos recognisably.
EDITOR_TRANSFORMER = dict(TINY_TRANSFORMER)
EDITOR_WEIGHTS = Path(__file__).resolve().parent / "tiny_editor"
EDITOR_COMPONENTS = ("vae", "transformer", "text_encoder", "text_encoder_2")  # one float16 .safetensors each
# No attention in its mid block: purely convolutional, it trains on small crops and works at any size. One norm
# group: a GroupNorm of one channel per group would normalise away each channel's mean, i.e. an image's colour.
EDITOR_VAE = {
    **TINY_VAE,
    "block_out_channels": (32, 32, 64, 64),
    "norm_num_groups": 1,
    "mid_block_add_attention": False,
    "sample_size": 128,
}


def _clip_tokenizer():
    """A byte-level BPE CLIP tokenizer with a character vocabulary and no merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    byte_chars = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for ch in byte_chars:
        vocab.setdefault(ch, len(vocab))
    for ch in byte_chars:
        vocab.setdefault(ch + "</w>", len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 77
    return tokenizer


def _t5_tokenizer():
    """A Unigram T5 tokenizer over single characters (with and without the word-start marker)."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in _CHARS] + [("▁" + c, -3.5) for c in _CHARS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def _calibrate_vae(vae, samples: int = 32, size: int = 64) -> None:
    """Set shift_factor/scaling_factor so latents have mean 0 and std 1, as FLUX.1's constants do for its VAE.

    A random VAE's raw latents have a small spread (std ~0.3); left unnormalised, the image content would be a
    small fraction of the flow-matching target (noise - x) and the control image would barely matter.
    Calibrated on smooth random colour images (seeded), so the result is deterministic.
    """
    generator = torch.Generator().manual_seed(1234)
    grid = torch.rand(samples, 3, 4, 4, generator=generator) * 2 - 1
    images = torch.nn.functional.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    with torch.no_grad():
        raw = vae.encode(images.clamp(-1, 1)).latent_dist.mode()
    vae.register_to_config(shift_factor=round(raw.mean().item(), 6), scaling_factor=round(1.0 / raw.std().item(), 6))


def build_tiny_pipeline(seed: int = 0, transformer_config: dict | None = None, vae_config: dict | None = None):
    """Construct a tiny random `FluxKontextPipeline` in memory (float32); the configs default to the fast random
    model's (TINY_TRANSFORMER, TINY_VAE)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**(transformer_config or TINY_TRANSFORMER))
    vae = AutoencoderKL(**(vae_config or TINY_VAE))
    _calibrate_vae(vae)
    tokenizer = _clip_tokenizer()
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(clip_config)
    tokenizer_2 = _t5_tokenizer()
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    text_encoder_2 = T5EncoderModel(t5_config)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
    )
    return FluxKontextPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def build_tiny_editor():
    """The tiny pretrained editor in memory (float32): the EDITOR_* architectures with the weights shipped in
    tiny_editor/ (scripts/pretrain_tiny.py made them). Its VAE decodes 128^2 images recognisably and its
    transformer follows the control image (copies, shifts and recolours it on caption), as FLUX.1-Kontext-dev does;
    it was never shown a black-and-white edit."""
    from safetensors import safe_open

    pipe = build_tiny_pipeline(0, EDITOR_TRANSFORMER, EDITOR_VAE)
    for name in EDITOR_COMPONENTS:
        with safe_open(str(EDITOR_WEIGHTS / f"{name}.safetensors"), "pt") as handle:
            state = {key: handle.get_tensor(key).float() for key in handle.keys()}  # noqa: SIM118
            metadata = handle.metadata() or {}
        getattr(pipe, name).load_state_dict(state, strict=True)
        if name == "vae":  # calibrated by the pretraining script: latents of mean 0 and std 1
            pipe.vae.register_to_config(
                shift_factor=float(metadata["shift_factor"]), scaling_factor=float(metadata["scaling_factor"])
            )
    return pipe


def make_tiny_model(directory: str | Path, seed: int = 0, pretrained: bool = True) -> Path:
    """Save the tiny pipeline in diffusers layout at `directory` (atomically: temp dir, rename): the pretrained
    editor (`build_tiny_editor`), or with pretrained=False the random one of `seed` (fast: for unit tests)."""
    from kontext_lora.atomic import atomic_directory

    directory = Path(directory)
    pipe = build_tiny_editor() if pretrained else build_tiny_pipeline(seed)
    with atomic_directory(directory) as tmp:
        pipe.save_pretrained(tmp)
        what = (
            "the tiny pretrained editor (weights from scripts/pretrain_tiny.py; it copies, shifts and recolours its "
            "control image)"
            if pretrained
            else f"random weights (seed {seed})"
        )
        (tmp / "KONTEXT_LORA_TINY.txt").write_text(
            f"Tiny FLUX.1-Kontext pipeline built by kontext-lora: {what}. For tests and examples only.\n"
        )
    return directory
