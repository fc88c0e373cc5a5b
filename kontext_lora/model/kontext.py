"""Kontext's sequence layout: packing latents into tokens and building the position ids.

Mirrors `FluxKontextPipeline.prepare_latents` (diffusers), written as pure functions so the training step and
the tests can call them on any batch; `test_kontext_layout` checks they agree with the pipeline's own.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    noisy_target_latents: torch.Tensor, control_latents: torch.Tensor | Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Build the transformer's image sequence: [noisy target | control 1 | control 2 | ...].

    noisy_target_latents (B, 16, h, w) and control_latents, one (B, 16, h_i, w_i) tensor or a list of them
    (multi-reference; empty for text-to-image) -> hidden_states (B, N_t + sum N_i, 64), img_ids (N_t + sum N_i, 3)
    where control i's ids carry ids[..., 0] = i (1, 2, ...) on its own grid, and N_t, the number of target tokens
    the output is sliced back to.
    """
    controls = [control_latents] if isinstance(control_latents, torch.Tensor) else list(control_latents)
    target_tokens = pack_latents(noisy_target_latents)  # (B, N_t, 64)
    device = target_tokens.device
    tokens = [target_tokens]
    ids = [image_ids(*noisy_target_latents.shape[-2:], index=0, device=device)]
    for index, control in enumerate(controls, start=1):
        tokens.append(pack_latents(control))  # (B, N_i, 64)
        ids.append(image_ids(*control.shape[-2:], index=index, device=device))
    return torch.cat(tokens, dim=1), torch.cat(ids, dim=0), target_tokens.shape[1]
