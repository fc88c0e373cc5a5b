"""Loss kinds, sigma weightings and region weights against independent recomputations on the tiny transformer."""

from __future__ import annotations

import math

import pytest
import torch

from kontext_lora.config import LossConfig
from kontext_lora.model.kontext import pack_latents
from kontext_lora.model.tiny import build_tiny_pipeline
from kontext_lora.train.encode import collate_encoded
from kontext_lora.train.objective import LatentBatch, flow_matching_loss, predict_velocity, token_weights


@pytest.fixture(scope="module")
def transformer():
    return build_tiny_pipeline(0).transformer.eval()


def _batch(seed: int = 0, mask: torch.Tensor | None = None) -> LatentBatch:
    g = torch.Generator().manual_seed(seed)
    return LatentBatch(torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 16, 8, 8, generator=g),
                       torch.randn(3, 5, 32, generator=g), torch.randn(3, 32, generator=g), mask)  # fmt: skip


def _residual(transformer, batch: LatentBatch, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """prediction - (noise - x) per target token and channel, (B, N_t, 64)."""
    sigma = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - sigma) * batch.target_latents + sigma * noise
    with torch.no_grad():
        prediction = predict_velocity(transformer, batch, noisy, sigmas, 1.0)
    return prediction - pack_latents(noise - batch.target_latents)


SIGMAS = torch.tensor([0.05, 0.5, 0.93])


@pytest.mark.parametrize("kind", ["mse", "l1", "huber"])
@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_loss_kind_and_sigma_weighting_match_their_formulas(transformer, kind: str, weighting: str) -> None:
    batch, noise = _batch(), torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(9))
    r = _residual(transformer, batch, SIGMAS, noise)
    delta = 0.3
    elementwise = {
        "mse": r**2,
        "l1": r.abs(),
        "huber": torch.where(r.abs() < delta, 0.5 * r**2, delta * (r.abs() - 0.5 * delta)),
    }[kind]
    sigma_weight = {  # SD3 (Esser et al. 2024): sigma_sqrt = 1 / sigma^2, cosmap = 2 / (pi (1 - 2s + 2s^2))
        "none": torch.ones(3),
        "sigma_sqrt": SIGMAS**-2,
        "cosmap": 2 / (math.pi * (1 - 2 * SIGMAS + 2 * SIGMAS**2)),
    }[weighting]
    expected = (sigma_weight * elementwise.mean(dim=(1, 2))).mean()
    with torch.no_grad():
        ours = flow_matching_loss(transformer, batch, SIGMAS, noise, 1.0, LossConfig(type=kind, weighting=weighting,
                                                                                   huber_delta=delta))  # fmt: skip
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_loss_mask_weights_inside_one_and_outside_the_configured_weight(transformer) -> None:
    mask = torch.zeros(3, 1, 8, 8)
    mask[:, :, :4, :] = 1.0  # top half of the latent grid: target tokens 0..7 of 16 (rows of 2x2 patches)
    mask[1, :, 4:6, 0:2] = 0.5  # a half-weight patch in sample 1: token 8
    batch, noise = _batch(1, mask), torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    cfg = LossConfig(mask_outside_weight=0.2)
    weights = token_weights(batch, cfg)
    expected = torch.full((3, 16), 0.2)
    expected[:, :8] = 1.0
    expected[1, 8] = 0.2 + 0.8 * 0.5
    torch.testing.assert_close(weights, expected)
    per_token = _residual(transformer, batch, SIGMAS, noise).pow(2).mean(-1)  # (B, 16)
    reference = ((expected * per_token).sum(1) / expected.sum(1)).mean()
    with torch.no_grad():
        ours = flow_matching_loss(transformer, batch, SIGMAS, noise, 1.0, cfg)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    # A mask that covers everything gives the plain loss back.
    full = LatentBatch(*list(vars(batch).values())[:4], torch.ones(3, 1, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            flow_matching_loss(transformer, full, SIGMAS, noise, 1.0, cfg),
            flow_matching_loss(transformer, full, SIGMAS, noise, 1.0),
            rtol=1e-6,
            atol=1e-7,
        )


def test_edit_weighting_puts_full_weight_on_the_changed_tokens_and_the_floor_elsewhere() -> None:
    g = torch.Generator().manual_seed(3)
    control = torch.randn(2, 16, 8, 8, generator=g)
    target = control.clone()
    target[0, :, 2:4, 4:6] += 3.0  # token (row 1, col 2) = 6 changes in sample 0
    target[1, :, 6:8, 0:2] -= 1.0  # token (3, 0) = 12 changes fully, token 13 by half as much
    target[1, :, 6:8, 2:4] -= 0.5
    batch = LatentBatch(target, control, torch.zeros(2, 1, 32), torch.zeros(2, 32))
    weights = token_weights(batch, LossConfig(edit_weighting=True, edit_floor=0.1))
    expected = torch.full((2, 16), 0.1)
    expected[0, 6], expected[1, 12], expected[1, 13] = 1.0, 1.0, 0.1 + 0.9 * 0.5
    torch.testing.assert_close(weights, expected)
    assert token_weights(batch, LossConfig()) is None  # no mask, no edit weighting: every token weighs the same


def test_edit_weighting_resizes_a_control_of_another_size() -> None:
    control = torch.ones(1, 16, 4, 4)
    target = torch.ones(1, 16, 8, 8)
    target[..., :2, :2] = 5.0
    weights = token_weights(LatentBatch(target, control, torch.zeros(1, 1, 32), torch.zeros(1, 32)),
                            LossConfig(edit_weighting=True, edit_floor=0.25))  # fmt: skip
    assert weights.shape == (1, 16) and weights[0, 0] == 1.0 and torch.all(weights[0, 1:] == 0.25)


def test_a_mask_of_the_wrong_size_is_refused_naming_the_expected_shape() -> None:
    batch = _batch(mask=torch.ones(3, 1, 64, 64))  # pixel resolution instead of latent resolution
    with pytest.raises(ValueError, match=r"expected \(B, 1, 8, 8\)"):
        token_weights(batch, LossConfig())


def test_latent_batch_moves_with_and_without_a_mask() -> None:
    items = [{"target_latents": torch.zeros(16, 4, 4), "control_latents": torch.zeros(16, 4, 4),
              "prompt_embeds": torch.zeros(3, 32), "pooled_embeds": torch.zeros(32)}] * 2  # fmt: skip
    batch = collate_encoded(items)
    assert batch.loss_mask is None and batch.to("cpu", torch.float64).loss_mask is None
    masked = collate_encoded([{**item, "loss_mask": torch.ones(1, 4, 4)} for item in items])
    moved = masked.to("cpu", torch.float64)
    assert moved.loss_mask.shape == (2, 1, 4, 4) and moved.loss_mask.dtype == torch.float64
