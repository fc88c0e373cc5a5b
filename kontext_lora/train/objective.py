"""The rectified-flow objective of FLUX.1-Kontext, on already-encoded latents.

noisy = (1 - sigma) * x + sigma * noise, the model predicts the velocity noise - x, and the loss is taken over the
target tokens only (the control tokens are context, not predicted). The timestep passed to the transformer is
sigma itself, as the pipeline passes t / 1000.

Sigma sampling (`sample_sigmas`), the per-sample sigma weighting, the element-wise loss (MSE / L1 / Huber) and the
region weights of target tokens (`token_weights`: loss mask, edit-region weighting) are configured by `LossConfig`.
`training_step` is one micro-batch of it, its noise and sigmas drawn from a generator seeded by `micro_batch_seed`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from kontext_lora.config import Config, LossConfig
from kontext_lora.model.kontext import kontext_inputs, pack_latents

# The scheduler config of FLUX.1-Kontext-dev (FlowMatchEulerDiscreteScheduler), which the pipeline feeds to
# calculate_shift at inference: mu grows linearly from 0.5 at 256 target tokens to 1.15 at 4096.
FLUX_SHIFT_ARGS = dict(base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15)


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
    batch_size: int,
    generator: torch.Generator,
    mean: float = 0.0,
    std: float = 1.0,
    device=None,
    *,
    loss: LossConfig | None = None,
    target_tokens: int | None = None,
) -> torch.Tensor:
    """Training sigmas (B,) in (0, 1], drawn from `generator` only (so a resumed run draws the same ones).

    Without `loss`: logit-normal, sigmoid of N(mean, std) (SD3 / FLUX training). With it: its timestep_sampling
    (mean / std are the logit-normal's), then its timestep_shift; `target_tokens` (h/2 * w/2) sets the flux shift.
    """
    loss = loss or LossConfig()
    scheme, logit_mean, logit_std = loss.timestep_sampling, mean, std
    if scheme == "sigmoid":  # kohya / ai-toolkit's "sigmoid": a logit-normal centred at 0 with std = scale
        scheme, logit_mean, logit_std = "logit_normal", 0.0, loss.sigmoid_scale
    sigmas = compute_density_for_timestep_sampling(
        scheme, batch_size, logit_mean, logit_std, loss.mode_scale, device=generator.device, generator=generator
    )
    sigmas = sigmas.clamp(1e-3, 1.0)  # uniform can draw exactly 0; sigma_sqrt weighting is 1/sigma^2
    if loss.timestep_shift == "constant":  # FlowMatchEulerDiscreteScheduler's static shift
        sigmas = loss.shift * sigmas / (1 + (loss.shift - 1) * sigmas)
    elif loss.timestep_shift == "flux":
        if target_tokens is None:
            raise ValueError("timestep_shift=flux needs the number of target tokens")
        mu = calculate_shift(target_tokens, **FLUX_SHIFT_ARGS)
        sigmas = flux_time_shift(mu, sigmas)
    return sigmas.to(device)


def flux_time_shift(mu: float, sigmas: torch.Tensor) -> torch.Tensor:
    """The scheduler's exponential time shift (sigma exponent 1): e^mu / (e^mu + 1/sigma - 1), sigmas (B,).

    Written out because diffusers has it only as a method of a scheduler instance (`time_shift`); the test checks
    both agree.
    """
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def input_dtype(transformer: torch.nn.Module) -> torch.dtype:
    """The dtype the transformer's inputs are cast to: its patch embedder's weight dtype, read through DDP /
    DeepSpeed wrappers (their `.module`); a model without one gives its `.dtype`.

    Why not accelerate's `extract_model_from_parallel(transformer).dtype`: diffusers' `ModelMixin.dtype` walks
    every module of the model looking for casting hooks (5,459 modules in the full model with its LoRA) and the
    unwrapping adds more, tens of ms of CPU before every forward while the GPU waits (scripts/trace_gaps.py shows
    such gaps). Both give this same dtype, the first floating parameter's: Flux's embedders are neither quantized
    nor cast apart from the rest.
    """
    module = transformer
    while not hasattr(module, "x_embedder") and isinstance(getattr(module, "module", None), torch.nn.Module):
        module = module.module
    embedder = getattr(module, "x_embedder", None)
    return embedder.weight.dtype if embedder is not None else module.dtype


def predict_velocity(
    transformer: torch.nn.Module, batch: LatentBatch, noisy_latents: torch.Tensor, sigmas: torch.Tensor, guidance: float
) -> torch.Tensor:
    """Run the transformer on [noisy target | control] tokens; return the prediction for the target tokens only.

    noisy_latents (B, 16, h, w), sigmas (B,) -> velocity tokens (B, h/2 * w/2, 64).
    """
    hidden_states, img_ids, num_target_tokens = kontext_inputs(noisy_latents, batch.control_latents)
    txt_ids = torch.zeros(batch.prompt_embeds.shape[1], 3, device=hidden_states.device, dtype=img_ids.dtype)
    guidance_vec = torch.full((noisy_latents.shape[0],), guidance, device=hidden_states.device, dtype=torch.float32)
    model_dtype = input_dtype(transformer)
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
    transformer: torch.nn.Module,
    batch: LatentBatch,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    guidance: float,
    loss: LossConfig | None = None,
) -> torch.Tensor:
    """Scalar loss between the predicted and true velocity (noise - x) over the target tokens, in float32.

    sigmas (B,), noise (B, 16, h, w) like batch.target_latents. Without `loss`: the plain MSE. With it: its
    element-wise loss, weighted per sample by sigma (`weighting`) and per token by `token_weights`, as a weighted
    mean over each sample's tokens.
    """
    loss = loss or LossConfig()
    latents = batch.target_latents.float()
    sigma = sigmas.float().view(-1, 1, 1, 1)
    noisy_latents = (1.0 - sigma) * latents + sigma * noise.float()  # (B, 16, h, w)
    prediction = predict_velocity(transformer, batch, noisy_latents, sigmas, guidance).float()  # (B, N_t, 64)
    velocity = pack_latents(noise.float() - latents)  # (B, N_t, 64)
    if loss.type == "mse":
        elementwise = (prediction - velocity) ** 2
    elif loss.type == "l1":
        elementwise = (prediction - velocity).abs()
    else:
        elementwise = F.huber_loss(prediction, velocity, reduction="none", delta=loss.huber_delta)
    per_token = elementwise.mean(dim=-1)  # (B, N_t)
    weights = token_weights(batch, loss)  # (B, N_t) or None
    if weights is None:
        per_sample = per_token.mean(dim=1)
    else:  # a weighted mean over each sample's tokens: the loss scale does not depend on how much is weighted
        per_sample = (weights * per_token).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-8)
    sigma_weights = compute_loss_weighting_for_sd3(loss.weighting, sigmas.float())  # (B,)
    return (sigma_weights * per_sample).mean()


def token_weights(batch: LatentBatch, loss: LossConfig) -> torch.Tensor | None:
    """Region weight of each target token (B, N_t), or None when every token weighs the same.

    Loss mask: inside 1, outside loss.mask_outside_weight (a token's mask value is the mean over its 2x2 latent
    patch). Edit weighting: floor + (1 - floor) * d / max(d), d a token's mean |target - control| latent change
    against the first control (resized to the target's grid when their sizes differ; no control: no edit weights).
    Both present: their product.
    """
    weights = None
    target = batch.target_latents.float()  # (B, 16, h, w)
    if batch.loss_mask is not None:
        if batch.loss_mask.shape[-2:] != target.shape[-2:] or batch.loss_mask.shape[1] != 1:
            raise ValueError(
                f"loss_mask has shape {tuple(batch.loss_mask.shape)}; expected (B, 1, {target.shape[-2]}, "
                f"{target.shape[-1]}), the target latents' grid"
            )
        inside = pack_latents(batch.loss_mask.float()).mean(dim=-1)  # (B, N_t)
        weights = loss.mask_outside_weight + (1.0 - loss.mask_outside_weight) * inside
    if loss.edit_weighting and batch.control_latents:  # text-to-image samples have no control: all tokens are new
        control = batch.control_latents[0].float()  # the first control is the image being edited
        if control.shape[-2:] != target.shape[-2:]:
            control = F.interpolate(control, size=target.shape[-2:], mode="bilinear", align_corners=False)
        change = pack_latents((target - control).abs()).mean(dim=-1)  # (B, N_t)
        relative = change / change.amax(dim=1, keepdim=True).clamp_min(1e-8)
        edit = loss.edit_floor + (1.0 - loss.edit_floor) * relative
        weights = edit if weights is None else weights * edit
    return weights


def micro_batch_seed(seed: int, global_index: int) -> int:
    """Seed of global micro-batch `global_index`'s noise and sigmas: the same whichever process draws it."""
    return int(np.random.SeedSequence([seed, global_index]).generate_state(1, np.uint64)[0])


def training_step(
    transformer: torch.nn.Module, batch: LatentBatch, cfg: Config, generator: torch.Generator
) -> torch.Tensor:
    """One micro-batch: draw noise (B, 16, h, w) and sigmas (B,) (cfg.loss) from `generator` only, return the
    loss (a scalar tensor)."""
    if cfg.speed.cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the last step's graph outputs may be overwritten
    noise = torch.randn(batch.target_latents.shape, generator=generator, device=generator.device)
    target_tokens = (noise.shape[-2] // 2) * (noise.shape[-1] // 2)  # the flux shift's mu counts target tokens
    sigmas = sample_sigmas(noise.shape[0], generator, cfg.train.logit_mean, cfg.train.logit_std, loss=cfg.loss,
                           target_tokens=target_tokens)  # fmt: skip
    return flow_matching_loss(
        transformer, batch, sigmas.to(batch.target_latents.device), noise.to(batch.target_latents.device),
        cfg.model.guidance, cfg.loss,
    )  # fmt: skip
