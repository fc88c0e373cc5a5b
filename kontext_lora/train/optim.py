"""The optimizer (`optim.optimizer`) and the guard against non-finite losses.

Every optimizer comes from a library: torch (AdamW), transformers (Adafactor), bitsandbytes (AdamW8bit),
prodigyopt (Prodigy). The last two are optional extras (`pip install kontext-lora[optim]`); asking for one that is
not installed fails at the start of training with a ConfigError naming the key and the package.
"""

from __future__ import annotations

import importlib
import logging

import torch

from kontext_lora.config import Config, ConfigError

logger = logging.getLogger(__name__)


def build_optimizer(params: list[torch.nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    """The optimizer named by cfg.optim.optimizer over `params`, with cfg.train.lr / weight_decay."""
    name, lr, weight_decay, optim = cfg.optim.optimizer, cfg.train.lr, cfg.train.weight_decay, cfg.optim
    betas = (float(optim.betas[0]), float(optim.betas[1]))
    if name == "adamw":
        fused = optim.fused and _fused_supported(params)
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=optim.eps, weight_decay=weight_decay, fused=fused)
    if name == "adamw8bit":
        bnb = _optional("bitsandbytes", "adamw8bit")
        return bnb.optim.AdamW8bit(
            params, lr=lr, betas=betas, eps=optim.eps, weight_decay=weight_decay, min_8bit_size=optim.min_8bit_size
        )
    if name == "prodigy":
        prodigyopt = _optional("prodigyopt", "prodigy")
        return prodigyopt.Prodigy(
            params, lr=lr, betas=betas, eps=optim.eps, weight_decay=weight_decay, d_coef=optim.prodigy_d_coef,
            safeguard_warmup=optim.prodigy_safeguard_warmup,
        )  # fmt: skip
    if name == "adafactor":
        # transformers' Adafactor with a fixed lr, not torch.optim.Adafactor: torch's always scales each update by
        # the parameter's RMS, so a zero-initialised lora_B barely moves; scale_parameter=False turns that off.
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False, warmup_init=False
        )
    raise ConfigError(f"config key `optim.optimizer`: unknown optimizer {name!r}")


def _fused_supported(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch has a fused AdamW kernel for every parameter's device and dtype (CUDA, and CPU since 2.4)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    return all(p.device.type in devices and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)


def _optional(module: str, optimizer: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"config key `optim.optimizer`: {optimizer} needs the `{module}` package, which cannot be imported "
            f"({exc}); `pip install {module}` (or `pip install kontext-lora[optim]`), or choose adamw"
        ) from None


class NonFiniteGuard:
    """Counts non-finite losses in a row; `skip` says whether this micro-batch's step must be skipped.

    With several processes every one sees the same verdict (any process's NaN skips the step everywhere), so no
    process waits in an all-reduce the others never enter.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0

    def skip(self, loss: torch.Tensor, accelerator, step: int) -> bool:
        bad = ~torch.isfinite(loss.detach()).reshape(1)
        if accelerator.num_processes > 1:
            bad = accelerator.gather(bad).any().reshape(1)
        if not bool(bad):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        logger.warning(
            "non-finite loss (%s) at step %d: skipped this optimizer step (%d in a row, stopping at %d)",
            loss.item(), step + 1, self.in_a_row, self.limit,
        )  # fmt: skip
        return True

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.limit
