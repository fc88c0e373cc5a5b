"""Counting the model without its weights: the transformer with its LoRA, the text encoders and the VAE.

Each part is built on the meta device from the model folder's config.json (diffusers / transformers, PEFT for the
LoRA), so every shape, adapter kind and rank pattern is counted as training will see it; FLUX.1-Kontext-dev's shapes
(kontext_lora/model/shapes.py) stand in where the folder is absent.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from kontext_lora.config import Config, ConfigError
from kontext_lora.model.shapes import CLIP_L_TEXT, FLUX_TRANSFORMER, FLUX_VAE, T5_XXL_ENCODER

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class BlockCount:
    """The frozen elements of one repeated block: its quantizable linear weights (out, in) and everything else."""

    linears: tuple[tuple[int, int], ...]  # applied to every image token (every token in a single block)
    context_linears: tuple[tuple[int, int], ...]  # a double block's text stream (add_*_proj, to_add_out, ff_context)
    modulation: tuple[tuple[int, int], ...]  # the adaLN linears (norm*.linear), applied once per sample
    other: int  # biases, norms and linears too small / oddly shaped to quantize


@dataclass(frozen=True)
class ModelCount:
    hidden: int  # heads x head_dim (3072 in FLUX.1)
    blocks: tuple[BlockCount, ...]  # execution order: double blocks, then single blocks
    outside: int  # frozen elements outside the blocks (embedders, final norm and projection)
    lora_elements: int  # trainable adapter elements
    lora_factored: int  # adafactor's state elements (rows + cols of each 2-D adapter tensor, all of a 1-D one)


@dataclass(frozen=True)
class EncoderCount:
    """What caching and sampling put on the device besides the transformer."""

    t5_bytes: int  # T5 encoder weights as loaded (model.dtype; transformers keeps `_keep_in_fp32_modules` in fp32)
    t5_width: int  # d_model
    clip_bytes: int
    vae_bytes: int


def _read_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _builds_tiny(cfg: Config) -> bool:
    return not Path(cfg.model.pretrained).exists() and cfg.model.build_tiny_if_missing


def transformer_config(cfg: Config) -> dict:
    """The transformer's shape: <model.pretrained>/transformer/config.json when present, the tiny model's when
    training will build it there (model.build_tiny_if_missing), else FLUX.1's."""
    if _builds_tiny(cfg):
        from kontext_lora.model.tiny import TINY_TRANSFORMER

        return dict(TINY_TRANSFORMER)
    found = _read_config(Path(cfg.model.pretrained) / "transformer" / "config.json")
    return found if found is not None else dict(FLUX_TRANSFORMER)


def count_model(cfg: Config, shape: dict | None = None) -> ModelCount:
    """Count the frozen and adapter elements of `cfg`'s transformer with its LoRA (meta device: no memory, ~1 s)."""
    shape = shape if shape is not None else transformer_config(cfg)
    # PiSSA / OLoRA (an SVD / QR of meta weights is impossible) give the default init's shapes; init_from is loaded
    # into the injected adapter later.
    lora_cfg = dataclasses.replace(cfg.lora, init_from="")
    if lora_cfg.init_lora_weights in ("pissa", "olora"):
        lora_cfg.init_lora_weights = "default"
    lora = json.dumps(dataclasses.asdict(lora_cfg), sort_keys=True)
    return _count(json.dumps(shape, sort_keys=True), lora)


def quantizable(module, name: str) -> bool:
    """Whether memory.base_quant stores this module's weight quantized: every frozen nn.Linear inside the repeated
    blocks (the base layers under the LoRA and the modulation linears), as model/quant.py's quantize_base takes them."""
    import torch

    return type(module) is torch.nn.Linear and "lora_" not in name


@functools.lru_cache(maxsize=8)
def _count(shape_json: str, lora_json: str) -> ModelCount:
    import torch
    from diffusers import FluxTransformer2DModel

    from kontext_lora.config import LoraConfig
    from kontext_lora.model.lora import inject_lora

    shape = json.loads(shape_json)
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(shape)
    inject_lora(model, LoraConfig(**json.loads(lora_json)))
    blocks = []
    in_blocks: set[int] = set()
    for block in list(model.transformer_blocks) + list(model.single_transformer_blocks):
        linears, context, modulation, other = [], [], [], 0
        quantized = set()
        for name, module in block.named_modules():
            if quantizable(module, name) and not module.weight.requires_grad:
                text_stream = any(key in name for key in ("add_", "ff_context"))
                kind = modulation if name.startswith("norm") else context if text_stream else linears
                kind.append(tuple(module.weight.shape))
                quantized.add(id(module.weight))
        for param in block.parameters():
            in_blocks.add(id(param))
            if not param.requires_grad and id(param) not in quantized:
                other += param.numel()
        blocks.append(BlockCount(tuple(linears), tuple(context), tuple(modulation), other))
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    outside = sum(p.numel() for p in frozen if id(p) not in in_blocks)
    trainable = [p for p in model.parameters() if p.requires_grad]
    factored = sum(sum(p.shape) if p.dim() == 2 else p.numel() for p in trainable)
    return ModelCount(
        hidden=shape["num_attention_heads"] * shape["attention_head_dim"],
        blocks=tuple(blocks),
        outside=outside,
        lora_elements=sum(p.numel() for p in trainable),
        lora_factored=factored,
    )


def count_encoders(cfg: Config) -> EncoderCount:
    """Bytes of the T5 and CLIP text encoders and of the VAE as `cfg` loads them (model.dtype), from
    <model.pretrained>/{text_encoder_2,text_encoder,vae}/config.json, or FLUX.1-Kontext-dev's shapes where absent."""
    if _builds_tiny(cfg):  # the embedded tiny model's encoders: a few hundred kB, nothing to plan around
        return EncoderCount(0, 32, 0, 0)
    folder = Path(cfg.model.pretrained)
    parts = [_read_config(folder / sub / "config.json") or default for sub, default in
             (("text_encoder_2", T5_XXL_ENCODER), ("text_encoder", CLIP_L_TEXT), ("vae", FLUX_VAE))]  # fmt: skip
    return _count_encoders(*(json.dumps(p, sort_keys=True) for p in parts), cfg.model.dtype)


@functools.lru_cache(maxsize=4)
def _count_encoders(t5_json: str, clip_json: str, vae_json: str, dtype: str) -> EncoderCount:
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    size = DTYPE_BYTES[dtype]
    t5_config = T5Config(**json.loads(t5_json))
    with torch.device("meta"):
        t5 = T5EncoderModel(t5_config)
        clip = CLIPTextModel(CLIPTextConfig(**json.loads(clip_json)))
        vae = AutoencoderKL.from_config(json.loads(vae_json))
    # transformers loads T5's feed-forward output (`wo`) in fp32 under float16, for its range.
    kept = tuple(getattr(t5, "_keep_in_fp32_modules", None) or ()) if dtype == "float16" else ()
    t5_bytes = sum(p.numel() * (4 if any(k in n.split(".") for k in kept) else size) for n, p in t5.named_parameters())
    elements = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    return EncoderCount(t5_bytes, t5_config.d_model, elements(clip) * size, elements(vae) * size)


def weight_bytes(count: ModelCount, quant: str, dtype_bytes: int) -> tuple[list[int], int]:
    """(bytes of each block, bytes outside the blocks) as stored: linears in `quant`, the rest in model.dtype."""
    from kontext_lora.model.quant import NF4_BLOCK, NF4_GRANULE, NF4_SCALER_BLOCK

    per_block = []
    for block in count.blocks:
        linear = 0
        for out, inp in block.linears + block.context_linears + block.modulation:
            n = out * inp
            if quant == "fp8":  # e4m3 weights + one fp32 scale per output channel
                linear += n + 4 * out
            elif quant == "nf4" and n % NF4_GRANULE == 0:  # 4-bit codes + int8 block scales + fp32 per 256 scales
                blocks = n // NF4_BLOCK
                linear += n // 2 + blocks + 4 * math.ceil(blocks / NF4_SCALER_BLOCK)
            else:  # quantize_base keeps an nf4 layer whose size is not a multiple of the granule
                linear += n * dtype_bytes
        per_block.append(linear + block.other * dtype_bytes)
    return per_block, count.outside * dtype_bytes


def step_tflops(count: ModelCount, image_tokens: int, text_tokens: int, batch: int) -> float:
    """Model TFLOPs of one step (forward + input-gradient backward of the frozen base; recompute not counted).

    Linear FLOPs are 2 x frozen linear elements per token of the stream they act on, forward and again backward (no
    weight gradients); attention QK^T and PV are 4 N^2 d per block forward and twice that backward (as
    scripts/bench_step.py's `step_flops`, which this matches on FLUX.1).
    """
    tokens = image_tokens + text_tokens
    linear = 0
    for block in count.blocks:
        image = sum(out * inp for out, inp in block.linears)
        text = sum(out * inp for out, inp in block.context_linears)
        linear += image * (tokens if not text else image_tokens) + text * text_tokens
    forward = 2 * linear + 4 * tokens * tokens * count.hidden * len(count.blocks)
    backward = 2 * linear + 8 * tokens * tokens * count.hidden * len(count.blocks)
    return batch * (forward + backward) / 1e12
