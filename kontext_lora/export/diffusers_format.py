"""The diffusers LoRA file: `transformer.<module>.lora_A.weight / lora_B.weight` plus metadata.

This is the format `FluxKontextPipeline.load_lora_weights` reads. Written by hand rather than through
`FluxKontextPipeline.save_lora_weights` because that writes in place (a crash leaves a truncated file) and has
no room for our own metadata; the keys and the `lora_adapter_metadata` entry are exactly what it writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kontext_lora.atomic import atomic_path

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
KONTEXT_LORA_METADATA_KEY = "kontext_lora"
PREFIX = "transformer."


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path


def save_diffusers_lora(
    path: str | Path,
    peft_state_dict: dict[str, torch.Tensor],
    peft_config: dict[str, Any],
    info: dict[str, Any],
) -> Path:
    """Save a transformer LoRA in diffusers format.

    `peft_state_dict`: `get_peft_model_state_dict(transformer)` (keys `<module>.lora_A.weight`, no adapter name).
    `peft_config`: the PEFT `LoraConfig.to_dict()`; stored as diffusers does, each key prefixed `transformer.`,
    so the loader recovers rank, alpha and targets. `info`: our own record (base model, resolved config, step).
    """
    tensors = {PREFIX + key: value for key, value in peft_state_dict.items()}
    adapter_meta = {PREFIX + key: (sorted(v) if isinstance(v, set) else v) for key, v in peft_config.items()}
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(adapter_meta, indent=2, sort_keys=True, default=str),
        KONTEXT_LORA_METADATA_KEY: json.dumps(info, sort_keys=True, default=str),
    }
    return atomic_save_safetensors(tensors, path, metadata)


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read any LoRA safetensors file: (tensors, raw string metadata)."""
    tensors = {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    return tensors, metadata
