"""The rectified-flow objective of FLUX.1-Kontext, on already-encoded latents.

noisy = (1 - sigma) * x + sigma * noise, the model predicts the velocity noise - x, and the MSE is taken over the
target tokens only (the control tokens are context, not predicted). The timestep passed to the transformer is
sigma itself, as the pipeline passes t / 1000.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kontext_lora.model.kontext import kontext_inputs, pack_latents


@dataclass
class LatentBatch:
    """One training batch of cached encodings (one bucket: every sample has the same shapes)."""

    target_latents: torch.Tensor  # (B, 16, h, w) normalised VAE latents of the edited image
    # Each (B, 16, h_i, w_i): the input image(s); control i gets position-id index i + 1. [] for text-to-image.
    # A single tensor is accepted and wrapped into a one-element list.
    control_latents: list[torch.Tensor]
    prompt_embeds: torch.Tensor  # (B, L, 4096) T5 sequence
    pooled_embeds: torch.Tensor  # (B, 768) CLIP pooled
    loss_mask: torch.Tensor | None = None  # (B, 1, h, w) in [0, 1] at latent resolution

    def __post_init__(self) -> None:
        if isinstance(self.control_latents, torch.Tensor):
            self.control_latents = [self.control_latents]
        else:
            self.control_latents = list(self.control_latents)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LatentBatch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        return LatentBatch(
            move(self.target_latents), [move(c) for c in self.control_latents], move(self.prompt_embeds),
            move(self.pooled_embeds), None if self.loss_mask is None else move(self.loss_mask),
        )  # fmt: skip


def sample_sigmas(
    batch_size: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0, device=None
) -> torch.Tensor:
    """Logit-normal sigmas (B,) in (0, 1): sigmoid of N(mean, std) (SD3 / FLUX training)."""
    normal = torch.randn(batch_size, generator=generator, device=generator.device)
    return torch.sigmoid(mean + std * normal).to(device)


def predict_velocity(
    transformer: torch.nn.Module, batch: LatentBatch, noisy_latents: torch.Tensor, sigmas: torch.Tensor, guidance: float
) -> torch.Tensor:
    """Run the transformer on [noisy target | control] tokens; return the prediction for the target tokens only.

    noisy_latents (B, 16, h, w), sigmas (B,) -> velocity tokens (B, h/2 * w/2, 64).
    """
    hidden_states, img_ids, num_target_tokens = kontext_inputs(noisy_latents, batch.control_latents)
    txt_ids = torch.zeros(batch.prompt_embeds.shape[1], 3, device=hidden_states.device, dtype=img_ids.dtype)
    guidance_vec = torch.full((noisy_latents.shape[0],), guidance, device=hidden_states.device, dtype=torch.float32)
    model_dtype = transformer.dtype
    prediction = transformer(
        hidden_states=hidden_states.to(model_dtype),
        timestep=sigmas.to(model_dtype),
        guidance=guidance_vec,
        pooled_projections=batch.pooled_embeds.to(model_dtype),
        encoder_hidden_states=batch.prompt_embeds.to(model_dtype),
        txt_ids=txt_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]
    return prediction[:, :num_target_tokens]


def flow_matching_loss(
    transformer: torch.nn.Module, batch: LatentBatch, sigmas: torch.Tensor, noise: torch.Tensor, guidance: float
) -> torch.Tensor:
    """Scalar MSE between the predicted and true velocity (noise - x) over the target tokens, in float32.

    sigmas (B,), noise (B, 16, h, w) like batch.target_latents.
    """
    latents = batch.target_latents.float()
    sigma = sigmas.float().view(-1, 1, 1, 1)
    noisy_latents = (1.0 - sigma) * latents + sigma * noise.float()  # (B, 16, h, w)
    prediction = predict_velocity(transformer, batch, noisy_latents, sigmas, guidance)  # (B, N_t, 64)
    velocity = pack_latents(noise.float() - latents)  # (B, N_t, 64)
    return F.mse_loss(prediction.float(), velocity)
