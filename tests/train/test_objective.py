"""The project's loss equals an independent recomputation from the formulas in KONTEXT.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import FluxKontextPipeline

from kontext_lora.model.tiny import build_tiny_pipeline
from kontext_lora.train.objective import LatentBatch, flow_matching_loss, sample_sigmas


def _reference_loss(transformer, batch: LatentBatch, sigmas, noise, guidance: float) -> torch.Tensor:
    """Written from the model facts, with the pipeline's own packing and id helpers."""
    b, c, h, w = batch.target_latents.shape
    _, _, hc, wc = batch.control_latents[0].shape
    sigma = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - sigma) * batch.target_latents + sigma * noise
    noisy_tokens = FluxKontextPipeline._pack_latents(noisy, b, c, h, w)
    control_tokens = FluxKontextPipeline._pack_latents(batch.control_latents[0], b, c, hc, wc)
    target_ids = FluxKontextPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    control_ids = FluxKontextPipeline._prepare_latent_image_ids(b, hc // 2, wc // 2, "cpu", torch.float32)
    control_ids[..., 0] = 1
    out = transformer(
        hidden_states=torch.cat([noisy_tokens, control_tokens], dim=1),
        timestep=sigmas,
        guidance=torch.full((b,), guidance),
        pooled_projections=batch.pooled_embeds,
        encoder_hidden_states=batch.prompt_embeds,
        txt_ids=torch.zeros(batch.prompt_embeds.shape[1], 3),
        img_ids=torch.cat([target_ids, control_ids], dim=0),
        return_dict=False,
    )[0]
    prediction = out[:, : noisy_tokens.shape[1]]
    target = FluxKontextPipeline._pack_latents(noise - batch.target_latents, b, c, h, w)
    return F.mse_loss(prediction, target)


def test_loss_matches_independent_recomputation() -> None:
    transformer = build_tiny_pipeline(0).transformer.eval()
    g = torch.Generator().manual_seed(0)
    batch = LatentBatch(
        target_latents=torch.randn(3, 16, 8, 6, generator=g),
        control_latents=torch.randn(3, 16, 4, 10, generator=g),  # another size: ids follow its own grid
        prompt_embeds=torch.randn(3, 7, 32, generator=g),
        pooled_embeds=torch.randn(3, 32, generator=g),
    )
    sigmas = torch.tensor([0.1, 0.5, 0.93])
    noise = torch.randn(3, 16, 8, 6, generator=g)
    with torch.no_grad():
        ours = flow_matching_loss(transformer, batch, sigmas, noise, guidance=2.5)
        reference = _reference_loss(transformer, batch, sigmas, noise, guidance=2.5)
    assert ours.item() > 0.1
    assert abs(ours.item() - reference.item()) < 1e-6


def test_loss_ignores_control_predictions() -> None:
    """Only target tokens enter the loss: the same loss whatever the model outputs on control positions."""
    transformer = build_tiny_pipeline(0).transformer.eval()
    g = torch.Generator().manual_seed(1)
    batch = LatentBatch(torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g),
                        torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g))  # fmt: skip
    sigmas, noise = torch.tensor([0.5]), torch.randn(1, 16, 4, 4, generator=g)
    with torch.no_grad():
        loss = flow_matching_loss(transformer, batch, sigmas, noise, 1.0)
        out = transformer(
            hidden_states=torch.cat([FluxKontextPipeline._pack_latents(0.5 * batch.target_latents + 0.5 * noise,
                                                                       1, 16, 4, 4),
                                     FluxKontextPipeline._pack_latents(batch.control_latents[0], 1, 16, 4, 4)], 1),
            timestep=sigmas, guidance=torch.ones(1), pooled_projections=batch.pooled_embeds,
            encoder_hidden_states=batch.prompt_embeds, txt_ids=torch.zeros(5, 3),
            img_ids=torch.cat([FluxKontextPipeline._prepare_latent_image_ids(1, 2, 2, "cpu", torch.float32),
                               FluxKontextPipeline._prepare_latent_image_ids(1, 2, 2, "cpu", torch.float32)
                               + torch.tensor([1.0, 0, 0])]),
            return_dict=False,
        )[0]  # fmt: skip
    assert out.shape[1] == 8  # 4 target + 4 control tokens went in
    full = F.mse_loss(out, torch.cat([FluxKontextPipeline._pack_latents(noise - batch.target_latents, 1, 16, 4, 4),
                                      torch.zeros(1, 4, 64)], 1))  # fmt: skip
    assert abs(loss.item() - full.item()) > 1e-3  # control positions are not part of the loss


def test_logit_normal_sigmas_have_the_right_moments() -> None:
    g = torch.Generator().manual_seed(0)
    sigmas = sample_sigmas(200_000, g, mean=0.0, std=1.0)
    assert 0.0 < sigmas.min() and sigmas.max() < 1.0
    logits = torch.logit(sigmas.double())
    assert abs(logits.mean().item()) < 0.01 and abs(logits.std().item() - 1.0) < 0.01
    shifted = torch.logit(sample_sigmas(200_000, g, mean=0.5, std=0.7).double())
    assert abs(shifted.mean().item() - 0.5) < 0.01 and abs(shifted.std().item() - 0.7) < 0.01


def test_input_dtype_is_the_models_dtype_through_wrappers_and_lora() -> None:
    """`input_dtype` reads the patch embedder's weight instead of diffusers' `.dtype` (a walk over every module, the
    GPU's idle time before each forward): it must give the same dtype, with a LoRA on the embedder, in bf16, and
    through a `.module` wrapper (DDP / DeepSpeed style); a model without the embedder falls back to `.dtype`."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from kontext_lora.model.tiny import TINY_TRANSFORMER
    from kontext_lora.train.objective import input_dtype

    class Wrapper(torch.nn.Module):
        def __init__(self, module: torch.nn.Module):
            super().__init__()
            self.module = module

    for dtype in (torch.float32, torch.bfloat16):
        transformer = FluxTransformer2DModel(**TINY_TRANSFORMER).to(dtype)
        transformer.add_adapter(LoraConfig(r=2, target_modules=["x_embedder", "to_q"]))  # fp32 adapters: autocast's
        assert input_dtype(transformer) == transformer.dtype == dtype
        assert input_dtype(Wrapper(Wrapper(transformer))) == dtype
    del transformer.x_embedder  # without the embedder: diffusers' `.dtype`, through the wrappers
    assert input_dtype(Wrapper(transformer.to(torch.float16))) == torch.float16
