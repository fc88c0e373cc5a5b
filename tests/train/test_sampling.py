"""Sigma samplers and shifts: the moments of what they draw, and that they draw from the passed generator only."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from kontext_lora.config import LossConfig
from kontext_lora.train.objective import flux_time_shift, sample_sigmas

N = 200_000


def _draw(seed: int = 0, mean: float = 0.0, std: float = 1.0, tokens: int | None = None, **loss) -> torch.Tensor:
    return sample_sigmas(N, torch.Generator().manual_seed(seed), mean, std, loss=LossConfig(**loss),
                         target_tokens=tokens).double()  # fmt: skip


def test_uniform_has_mean_one_half_and_variance_one_twelfth() -> None:
    sigmas = _draw(timestep_sampling="uniform")
    assert abs(sigmas.mean().item() - 0.5) < 0.003
    assert abs(sigmas.var().item() - 1 / 12) < 0.001
    assert sigmas.min() >= 1e-3 and sigmas.max() < 1.0


def test_logit_normal_logits_have_the_configured_mean_and_std() -> None:
    logits = torch.logit(_draw(mean=0.5, std=0.7, timestep_sampling="logit_normal"))
    assert abs(logits.mean().item() - 0.5) < 0.01 and abs(logits.std().item() - 0.7) < 0.01


def test_sigmoid_is_a_centred_logit_normal_of_the_given_scale() -> None:
    logits = torch.logit(_draw(mean=3.0, timestep_sampling="sigmoid", sigmoid_scale=1.6))  # mean is not used
    assert abs(logits.mean().item()) < 0.015 and abs(logits.std().item() - 1.6) < 0.015


def test_mode_sampler_matches_the_sd3_density() -> None:
    """SD3 (Esser et al. 2024, eq. 20): sigma = 1 - u - s * (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1)."""
    u = torch.linspace(0, 1, 100_001, dtype=torch.float64)  # the moments by quadrature over u
    for scale in (0.0, 1.29):
        mapped = 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        sigmas = _draw(timestep_sampling="mode", mode_scale=scale)
        assert abs(sigmas.mean().item() - mapped.mean().item()) < 0.003
        assert abs(sigmas.var().item() - mapped.var().item()) < 0.001
    assert _draw(timestep_sampling="mode", mode_scale=1.29).var() < 1 / 12 - 0.01  # mass moves to the middle


def test_constant_shift_moves_sigmas_towards_noise() -> None:
    means = [_draw(timestep_shift="constant", shift=s).mean().item() for s in (1.0, 2.0, 3.0, 6.0)]
    assert means[0] == pytest.approx(_draw().mean().item(), abs=1e-12)  # s = 1 changes nothing
    assert means == sorted(means) and means[-1] > means[0] + 0.2
    # The shift is monotone, so the median of a logit-normal(0, 1) goes from 1/2 to s / (s + 1).
    assert _draw(timestep_shift="constant", shift=3.0).median().item() == pytest.approx(0.75, abs=0.005)


def test_flux_shift_adds_mu_of_the_target_token_count_to_the_logit() -> None:
    """e^mu / (e^mu + 1/sigma - 1) is sigmoid(logit(sigma) + mu): the logits' mean moves by mu, their std stays."""
    for tokens, mu in ((256, 0.5), (4096, 1.15), (1024, 0.5 + 0.65 * 768 / 3840)):
        logits = torch.logit(_draw(timestep_shift="flux", tokens=tokens))
        assert abs(logits.mean().item() - mu) < 0.01 and abs(logits.std().item() - 1.0) < 0.01
    assert _draw(timestep_shift="flux", tokens=4096).mean() > _draw(timestep_shift="flux", tokens=256).mean() + 0.1


def test_flux_shift_is_the_schedulers_own_time_shift() -> None:
    sigmas = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    torch.testing.assert_close(flux_time_shift(0.8, sigmas), scheduler.time_shift(0.8, 1.0, sigmas))


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode", "sigmoid"])
def test_sampling_uses_only_the_generator(sampling: str) -> None:
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = _draw(seed=7, timestep_sampling=sampling, timestep_shift="flux", tokens=1024)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not touched
    assert torch.equal(first, _draw(seed=7, timestep_sampling=sampling, timestep_shift="flux", tokens=1024))
    assert not torch.equal(first, _draw(seed=8, timestep_sampling=sampling, timestep_shift="flux", tokens=1024))
