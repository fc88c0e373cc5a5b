"""Kontext's sequence layout (packing and position ids) agrees with diffusers' FluxKontextPipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxKontextPipeline

from kontext_lora.model.kontext import image_ids, kontext_inputs, pack_latents, unpack_latents
from kontext_lora.model.tiny import build_tiny_pipeline

CHANNELS = 16  # FLUX.1 VAE latent channels


def _latents(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, CHANNELS, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_pipeline(0)


@pytest.mark.parametrize(("height", "width"), [(2, 2), (8, 8), (8, 12), (16, 6)])
def test_pack_unpack_round_trip(height: int, width: int):
    latents = _latents(2, height, width)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, (height // 2) * (width // 2), 4 * CHANNELS)
    assert torch.equal(unpack_latents(tokens, height, width), latents)


def test_pack_groups_2x2_patches_channel_major():
    latents = torch.arange(CHANNELS * 4 * 6, dtype=torch.float32).reshape(1, CHANNELS, 4, 6)
    tokens = pack_latents(latents)  # (1, 2*3, 64)
    # Token 4 is patch row 1, col 1: latent rows 2..3, cols 2..3; its 64 values are (channel, dy, dx).
    expected = latents[0, :, 2:4, 2:4].reshape(-1)
    assert torch.equal(tokens[0, 4], expected)


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 8, 8), (3, 8, 12), (2, 12, 4)])
def test_pack_matches_diffusers(batch: int, height: int, width: int):
    latents = _latents(batch, height, width, seed=height * width)
    theirs = FluxKontextPipeline._pack_latents(latents, batch, CHANNELS, height, width)
    assert torch.equal(pack_latents(latents), theirs)


@pytest.mark.parametrize(("height", "width"), [(8, 8), (8, 12), (14, 6)])
def test_image_ids_match_diffusers(height: int, width: int):
    theirs = FluxKontextPipeline._prepare_latent_image_ids(1, height // 2, width // 2, "cpu", torch.float32)
    assert torch.equal(image_ids(height, width, index=0), theirs)
    theirs[..., 0] = 1  # what prepare_latents does for the control image
    assert torch.equal(image_ids(height, width, index=1), theirs)
    assert image_ids(height, width, index=0, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_kontext_inputs_puts_control_after_target_on_its_own_grid():
    target = _latents(2, 8, 8, seed=1)  # 4 x 4 = 16 tokens
    control = _latents(2, 8, 12, seed=2)  # 4 x 6 = 24 tokens
    hidden_states, ids, num_target = kontext_inputs(target, control)

    assert num_target == 16
    assert hidden_states.shape == (2, 16 + 24, 64) and ids.shape == (16 + 24, 3)
    assert torch.equal(hidden_states[:, :16], pack_latents(target))
    assert torch.equal(hidden_states[:, 16:], pack_latents(control))
    assert torch.equal(unpack_latents(hidden_states[:, :num_target], 8, 8), target)

    target_ids, control_ids = ids[:16], ids[16:]
    assert (target_ids[:, 0] == 0).all() and (control_ids[:, 0] == 1).all()
    assert torch.equal(target_ids, image_ids(8, 8, index=0))
    # The control's ids follow its own 4 x 6 grid, not the target's 4 x 4 one.
    assert control_ids[:, 1].max() == 3 and control_ids[:, 2].max() == 5
    assert torch.equal(control_ids[:6, 1:], torch.tensor([[0.0, c] for c in range(6)]))
    assert torch.equal(control_ids[6, 1:], torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize(("batch", "target_hw", "control_hw"), [(1, (8, 8), (8, 8)), (2, (8, 8), (8, 12))])
def test_kontext_inputs_match_pipeline_prepare_latents(tiny_pipe, batch, target_hw, control_hw):
    control = _latents(batch, *control_hw, seed=3)
    vae_scale = tiny_pipe.vae_scale_factor
    assert vae_scale == 8
    # A (B, 16, h, w) image is already in latent space: prepare_latents packs it instead of VAE-encoding it.
    latents, image_latents, latent_ids, control_ids = tiny_pipe.prepare_latents(
        image=control,
        batch_size=batch,
        num_channels_latents=tiny_pipe.transformer.config.in_channels // 4,
        height=target_hw[0] * vae_scale,
        width=target_hw[1] * vae_scale,
        dtype=torch.float32,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )
    noisy_target = unpack_latents(latents, *target_hw)  # the pipeline's packed noise, as (B, 16, h, w)

    hidden_states, ids, num_target = kontext_inputs(noisy_target, control)

    # The pipeline's denoising step feeds torch.cat([latents, image_latents], dim=1) and
    # torch.cat([latent_ids, image_ids], dim=0), and keeps the first latents.size(1) tokens of the output.
    assert num_target == latents.shape[1]
    assert torch.equal(hidden_states, torch.cat([latents, image_latents], dim=1))
    assert torch.equal(ids, torch.cat([latent_ids, control_ids], dim=0))


def test_multi_reference_layout_gives_each_control_its_own_index_and_grid():
    target = _latents(2, 8, 8, seed=1)  # 16 tokens
    first, second = _latents(2, 8, 12, seed=2), _latents(2, 4, 4, seed=3)  # 24 and 4 tokens
    hidden_states, ids, num_target = kontext_inputs(target, [first, second])

    assert num_target == 16 and hidden_states.shape == (2, 16 + 24 + 4, 64) and ids.shape == (44, 3)
    assert torch.equal(hidden_states[:, 16:40], pack_latents(first))
    assert torch.equal(hidden_states[:, 40:], pack_latents(second))
    assert torch.equal(ids[:16], image_ids(8, 8, index=0))
    assert torch.equal(ids[16:40], image_ids(8, 12, index=1))
    assert torch.equal(ids[40:], image_ids(4, 4, index=2))
    assert ids[40:, 0].eq(2).all() and ids[40:, 1].max() == 1 and ids[40:, 2].max() == 1  # its own 2 x 2 grid

    # One tensor is the one-control case; no controls is plain text-to-image (target tokens only).
    single, single_ids, _ = kontext_inputs(target, first)
    assert torch.equal(single, hidden_states[:, :40]) and torch.equal(single_ids, ids[:40])
    alone, alone_ids, n = kontext_inputs(target, [])
    assert n == 16 and torch.equal(alone, pack_latents(target)) and torch.equal(alone_ids, image_ids(8, 8, index=0))
