"""The LoRA a run trains: injected into the transformer (lora.*), started from an existing file (lora.init_from)."""

from __future__ import annotations

import torch

from kontext_lora.config import Config
from kontext_lora.export.formats import read_adapter
from kontext_lora.model.lora import inject_lora, load_adapter_state
from kontext_lora.train.run_state import TrainingError


def add_adapter(transformer: torch.nn.Module, cfg: Config) -> None:
    """Inject the configured LoRA into `transformer` (in place), from lora.init_from's weights when one is set."""
    inject_lora(transformer, cfg.lora)
    if cfg.lora.init_from:
        init_from_file(transformer, cfg)


def init_from_file(transformer: torch.nn.Module, cfg: Config) -> None:
    """Load an existing LoRA (any supported format) into the freshly injected adapter.

    lora_A (rank, in) is taken as it is; lora_B (out, rank) is rescaled so each module's update
    (alpha / rank) * B @ A equals the file's under this config's alpha.
    """
    adapter = read_adapter(cfg.lora.init_from)
    config_scale = cfg.lora.alpha / cfg.lora.rank
    state = {}
    for module, lora in adapter.modules.items():
        if lora.rank != cfg.lora.rank or lora.extras:
            raise TrainingError(
                f"lora.init_from: {cfg.lora.init_from} has rank {lora.rank} at {module} (extras: "
                f"{sorted(lora.extras) or 'none'}); set lora.rank={lora.rank} and a plain LoRA to continue it"
            )
        state[f"{module}.lora_A.weight"] = lora.down.float()
        state[f"{module}.lora_B.weight"] = lora.up.float() * (lora.scale / config_scale)
    try:
        load_adapter_state(transformer, state)
    except ValueError as exc:
        raise TrainingError(f"lora.init_from: {cfg.lora.init_from}: {exc}") from None
