"""Kontext's sequence layout: packing latents into tokens and building the position ids.

Mirrors `FluxKontextPipeline.prepare_latents` (diffusers), written as pure functions so the training step and
the tests can call them on any batch; `test_kontext_layout` checks they agree with the pipeline's own.
"""

from __future__ import annotations

import torch


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) tokens of 2x2 patches (diffusers `_pack_latents`)."""
    batch, channels, height, width = latents.shape
    tokens = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    tokens = tokens.permute(0, 2, 4, 1, 3, 5)
    return tokens.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) tokens -> (B, C, h, w) latents; inverse of `pack_latents` (h, w in latent pixels)."""
    batch, _, packed_channels = tokens.shape
    channels = packed_channels // 4
    latents = tokens.view(batch, height // 2, width // 2, channels, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels, height, width)


def image_ids(latent_height: int, latent_width: int, index: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids (h/2 * w/2, 3) of one packed image: [index, row, col]; index 0 = target, 1.. = controls."""
    rows, cols = latent_height // 2, latent_width // 2
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, 3)


def kontext_inputs(
    noisy_target_latents: torch.Tensor, control_latents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Build the transformer's image sequence.

    noisy_target_latents (B, 16, h, w) and control_latents (B, 16, h', w') ->
    hidden_states (B, N_t + N_c, 64) with the control tokens AFTER the target tokens, img_ids (N_t + N_c, 3)
    with control ids[..., 0] = 1, and N_t, the number of target tokens the output is sliced back to.
    """
    target_tokens = pack_latents(noisy_target_latents)  # (B, N_t, 64)
    control_tokens = pack_latents(control_latents)  # (B, N_c, 64)
    device = target_tokens.device
    target_ids = image_ids(*noisy_target_latents.shape[-2:], index=0, device=device)
    control_ids = image_ids(*control_latents.shape[-2:], index=1, device=device)
    hidden_states = torch.cat([target_tokens, control_tokens], dim=1)
    ids = torch.cat([target_ids, control_ids], dim=0)
    return hidden_states, ids, target_tokens.shape[1]
