"""Exponential moving average of the adapter weights, on diffusers' `EMAModel` over the LoRA parameter list.

`EMAModel` does the averaging (decay ramp, store/copy_to/restore); this wrapper adds the update interval and a
pickle-free state (its `state_dict` holds the shadow tensors next to Python scalars: the checkpoint code stores
the tensors in safetensors and the scalars in JSON).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.training_utils import EMAModel

from kontext_lora.config import EmaConfig
from kontext_lora.train.checkpoint import EMA_WEIGHT_NAME

__all__ = ["EMA_WEIGHT_NAME", "AdapterEMA"]


class AdapterEMA:
    """EMA of the LoRA parameters, updated every `cfg.every` optimizer steps.

    Update n (counted from 1) uses decay d_n = min(decay, n / (9 + n)) with `ramp`, else d_n = decay; the first
    update copies the weights (d_1 = 0): ema_n = d_n * ema_{n-1} + (1 - d_n) * weights.
    """

    def __init__(self, parameters: list[torch.nn.Parameter], cfg: EmaConfig):
        self.parameters = list(parameters)
        self.every = cfg.every
        # min_decay = decay turns the ramp off (diffusers clamps the ramped value to [min_decay, decay]).
        self.model = EMAModel(self.parameters, decay=cfg.decay, min_decay=0.0 if cfg.ramp else float(cfg.decay))

    def update(self, step: int) -> None:
        """Call after optimizer step `step` (1-based); averages in the current weights every `every` steps."""
        if step % self.every == 0:
            self.model.step(self.parameters)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the adapter (for saving or validation); restores them after."""
        self.model.store(self.parameters)
        self.model.copy_to(self.parameters)
        try:
            yield
        finally:
            self.model.restore(self.parameters)

    def state(self) -> dict[str, Any]:
        """The EMA state: shadow tensors (list) and scalars; see `checkpoint.encode_state` for how it is stored."""
        state = self.model.state_dict()
        return {**state, "shadow_params": list(state["shadow_params"])}

    def load_state(self, state: dict[str, Any]) -> None:
        device = self.parameters[0].device
        shadow = [tensor.to(device) for tensor in state["shadow_params"]]
        if [t.shape for t in shadow] != [p.shape for p in self.parameters]:
            raise ValueError("the checkpoint's EMA does not match the adapter's parameters")
        self.model.load_state_dict({**state, "shadow_params": shadow})
