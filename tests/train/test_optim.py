"""The optimizer builder: each optimizer is the library's, configured as asked (training with each one is in
test_training_features.py)."""

from __future__ import annotations

import sys

import pytest
import torch

from kontext_lora.config import ConfigError, load_config
from kontext_lora.train.optim import build_optimizer

REQUIRED = ["model.pretrained=/m", "data.datasets=[{path: /d}]"]


def _cfg(*overrides: str):
    return load_config(None, [*REQUIRED, "train.lr=0.01", *overrides])


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64, 8, generator=g)), torch.nn.Parameter(torch.zeros(8, 64))]


def _steps(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], count: int = 3) -> None:
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    for _ in range(count):
        loss = ((x @ params[0] @ params[1] - x) ** 2).mean() + (params[0] ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_adamw_uses_the_fused_kernel_on_cpu_float32_unless_told_not_to() -> None:
    optimizer = build_optimizer(_params(), _cfg("optim.betas=[0.8, 0.95]", "optim.eps=1e-6"))
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["fused"] is True and optimizer.defaults["betas"] == (0.8, 0.95)
    assert optimizer.defaults["eps"] == 1e-6 and optimizer.defaults["lr"] == 0.01
    assert not build_optimizer(_params(), _cfg("optim.fused=false")).defaults["fused"]


def test_adamw8bit_keeps_its_moments_in_8_bits() -> None:
    bnb = pytest.importorskip("bitsandbytes")  # an optional extra ([optim]); CI installs it with [dev]
    params = _params()
    optimizer = build_optimizer(params, _cfg("optim.optimizer=adamw8bit", "optim.min_8bit_size=0"))
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    before = params[1].detach().clone()
    _steps(optimizer, params)
    state = optimizer.state[params[0]]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert not torch.equal(params[1], before)


def test_prodigy_estimates_a_growing_step_size() -> None:
    prodigyopt = pytest.importorskip("prodigyopt")
    params = _params()
    optimizer = build_optimizer(params, _cfg("optim.optimizer=prodigy", "train.lr=1.0", "optim.prodigy_d_coef=2"))
    assert isinstance(optimizer, prodigyopt.Prodigy) and optimizer.param_groups[0]["d_coef"] == 2.0
    d0 = optimizer.param_groups[0]["d"]
    _steps(optimizer, params, 5)
    assert optimizer.param_groups[0]["d"] > 10 * d0


def test_adafactor_moves_a_zero_initialised_parameter_by_about_lr() -> None:
    """A fixed lr, not scaled by the parameter's RMS: lora_B starts at zero and must still move."""
    from transformers.optimization import Adafactor

    params = _params()
    optimizer = build_optimizer(params, _cfg("optim.optimizer=adafactor"))
    assert isinstance(optimizer, Adafactor)
    _steps(optimizer, params, 1)
    rms = params[1].detach().pow(2).mean().sqrt().item()
    assert 0.002 < rms <= 0.01 + 1e-6  # the first update's RMS is lr (clipped at 1), whatever the parameter's RMS


def test_a_missing_optional_package_names_the_key_and_the_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # what Python does for a package that is not installed
    with pytest.raises(ConfigError, match=r"`optim.optimizer`: prodigy needs the `prodigyopt` package.*pip install"):
        build_optimizer(_params(), _cfg("optim.optimizer=prodigy"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.optimizer=adam", "did you mean `adamw`"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("optim.nonfinite_limit=0", "optim.nonfinite_limit"),
        ("loss.timestep_sampling=logitnormal", "did you mean `logit_normal`"),
        ("loss.edit_floor=1.5", "loss.edit_floor"),
        ("loss.shift=0", "loss.shift"),
    ],
)
def test_bad_optim_and_loss_keys_fail_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(override)
