"""The diffusers LoRA file: `transformer.<module>.lora_A.weight / lora_B.weight` plus metadata.

This is the format `FluxKontextPipeline.load_lora_weights` reads. Written by hand rather than through
`FluxKontextPipeline.save_lora_weights` because that writes in place (a crash leaves a truncated file) and has
no room for our own metadata; the keys and the `lora_adapter_metadata` entry are exactly what it writes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kontext_lora.atomic import atomic_path, umask_mode
from kontext_lora.run_files import ADAPTER_NAME as WEIGHT_NAME  # noqa: F401  (diffusers' LoRA file name)

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
KONTEXT_LORA_METADATA_KEY = "kontext_lora"
PREFIX = "transformer."


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file via a temp file in the same folder and an atomic rename (see `save_safetensors`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_safetensors(tensors, tmp, metadata)
    return path


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """safetensors' `save_file`, then its JSON header rewritten with sorted keys: equal tensors and metadata give
    equal bytes. (safetensors keeps the metadata in a hash map, whose order changes from one process to the next.)
    The file gets the mode of the user's umask (safetensors creates it 0600)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    os.chmod(path, umask_mode())
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length:  # the same keys and values reordered: as long as before, or a little shorter
            handle.seek(8)
            handle.write(text + b" " * (length - len(text)))  # spaces pad the header, as safetensors itself pads it
            return
    # Longer (another JSON escaping of some value): a new header padded to 8 bytes, and the data copied after it.
    text += b" " * (-len(text) % 8)
    moved = Path(f"{path}.unsorted")
    Path(path).rename(moved)
    with open(moved, "rb") as source, open(path, "wb") as target:
        source.seek(8 + length)
        target.write(struct.pack("<Q", len(text)) + text)
        shutil.copyfileobj(source, target, 2**24)
    moved.unlink()
    os.chmod(path, umask_mode())


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
