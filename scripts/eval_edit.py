"""Measure what a LoRA taught a Kontext model, from outside the trainer: the base against base + adapter.

Usage (after the README's example job):
  python scripts/eval_edit.py --model runs/tiny-kontext --lora runs/tiny_bw/pytorch_lora_weights.safetensors \
      --data data_examples/bw --heldout retina --size 128

The pipeline is loaded by `FluxKontextPipeline.from_pretrained`, the adapter by `load_lora_weights`; nothing of the
training run (its cache, its validator) is used. For the base and then with the adapter it reports, on the held-out
triples:
- `loss_own`: the Kontext flow-matching loss (kontext_lora/train/objective.py) at fixed sigmas (0.25, 0.5, 0.75)
  and fixed noise, each triple with its own control; `loss_other`: the same with the control of every other triple
  of --data in turn (mean), so `loss_other / loss_own` says how much the prediction depends on the right control;
- `saturation` (mean chroma of the sampled outputs, 0 for black and white) and `psnr` (dB, output against target),
  from edits sampled with fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kontext_lora.data.triples import discover_triples, image_to_tensor, load_image
from kontext_lora.model.load import encode_captions, encode_images
from kontext_lora.train.objective import LatentBatch, flow_matching_loss
from kontext_lora.train.validation import saturation

SIGMAS = (0.25, 0.5, 0.75)


@dataclass
class Pair:
    """One triple as square crops: pixels (3, R, R) in [-1, 1]."""

    name: str
    control: torch.Tensor
    target: torch.Tensor
    caption: str


def load_pairs(data: str | Path, size: int) -> list[Pair]:
    """Every triple of a dataset folder, cropped and resized as the trainer does."""
    pairs = []
    for triple in discover_triples(data):
        pixels = lambda ref: image_to_tensor(load_image(ref), size)  # noqa: E731
        pairs.append(Pair(triple.stem, pixels(triple.control), pixels(triple.target), triple.caption))
    return pairs


def _image(pixels: torch.Tensor) -> Image.Image:
    array = ((pixels.permute(1, 2, 0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(array)


@torch.no_grad()
def heldout_losses(pipe, heldout: list[Pair], others: list[Pair], max_sequence_length: int = 32) -> dict[str, float]:
    """Flow-matching loss of each held-out pair with its own control and with each of `others`' controls."""
    targets = encode_images(pipe.vae, torch.stack([p.target for p in heldout]))  # (N, 16, h, w)
    controls = encode_images(pipe.vae, torch.stack([p.control for p in heldout]))
    other_controls = encode_images(pipe.vae, torch.stack([p.control for p in others]))  # (M, 16, h, w)
    prompt_embeds, pooled_embeds = encode_captions(pipe, [p.caption for p in heldout], max_sequence_length)
    noise = torch.randn(targets.shape, generator=torch.Generator().manual_seed(123))

    def loss(control_latents: torch.Tensor) -> float:
        batch = LatentBatch(targets, [control_latents], prompt_embeds, pooled_embeds)
        return float(np.mean([flow_matching_loss(pipe.transformer, batch, torch.full((len(targets),), s), noise,
                                                 guidance=1.0).item() for s in SIGMAS]))  # fmt: skip

    own = loss(controls)
    other = float(np.mean([loss(other_controls[j : j + 1].expand_as(controls)) for j in range(len(others))]))
    return {"loss_own": own, "loss_other": other, "control_ratio": other / own}


@torch.no_grad()
def sampled_edits(
    pipe, heldout: list[Pair], size: int, steps: int = 8, guidance: float = 1.0, max_sequence_length: int = 32
) -> dict[str, float]:
    """Sample each held-out edit (seed i for pair i): mean output saturation and PSNR against the target."""
    saturations, psnrs = [], []
    for i, pair in enumerate(heldout):
        output = pipe(
            image=_image(pair.control), prompt=pair.caption, height=size, width=size, max_area=size * size,
            _auto_resize=False, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
            max_sequence_length=max_sequence_length, generator=torch.Generator().manual_seed(i),
        ).images[0]  # fmt: skip
        output = np.clip(output.astype(np.float32), 0.0, 1.0)  # (R, R, 3)
        target = (pair.target.permute(1, 2, 0).numpy() + 1.0) / 2.0
        saturations.append(saturation(output))
        psnrs.append(10.0 * math.log10(1.0 / max(float(((output - target) ** 2).mean()), 1e-10)))
    return {"saturation": float(np.mean(saturations)), "psnr": float(np.mean(psnrs))}


def evaluate(pipe, heldout: list[Pair], others: list[Pair], size: int, guidance: float, length: int) -> dict:
    """Losses and sampled-edit figures; `length`: the T5 sequence length (model.max_sequence_length of training)."""
    return {**heldout_losses(pipe, heldout, others, length),
            **sampled_edits(pipe, heldout, size, guidance=guidance, max_sequence_length=length)}  # fmt: skip


def compare(
    model: str | Path,
    lora: str | Path,
    heldout: list[Pair],
    others: list[Pair],
    size: int,
    guidance: float = 1.0,
    length: int = 32,
) -> dict:
    """{"base": figures, "adapter": figures} for the model folder without and with the LoRA file."""
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(str(model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base = evaluate(pipe, heldout, others, size, guidance, length)
    pipe.load_lora_weights(str(lora))
    return {"base": base, "adapter": evaluate(pipe, heldout, others, size, guidance, length)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="diffusers folder of the base model")
    parser.add_argument("--lora", required=True, help="the adapter (diffusers format)")
    parser.add_argument("--data", required=True, help="dataset folder holding the held-out triples")
    parser.add_argument("--heldout", nargs="+", required=True, help="stems of the held-out triples in --data")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--max-sequence-length", type=int, default=32,
                        help="T5 tokens: the run's model.max_sequence_length (example: 32, real: 512)")  # fmt: skip
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="sampling guidance: 1.0 for the tiny model, 2.5 for FLUX.1-Kontext-dev")  # fmt: skip
    args = parser.parse_args()
    pairs = load_pairs(args.data, args.size)
    heldout = [p for p in pairs if p.name in args.heldout]
    others = [p for p in pairs if p.name not in args.heldout]
    if len(heldout) != len(args.heldout):
        raise SystemExit(f"--heldout: {sorted(set(args.heldout) - {p.name for p in heldout})} not in {args.data}")
    result = compare(args.model, args.lora, heldout, others, args.size, args.guidance, args.max_sequence_length)
    base, adapter = result["base"], result["adapter"]
    print(f"{'':14s} {'base':>9s} {'adapter':>9s}")
    for key in base:
        print(f"{key:14s} {base[key]:9.4f} {adapter[key]:9.4f}")
    print(f"held-out loss {adapter['loss_own'] / base['loss_own'] - 1:+.0%}, saturation "
          f"{adapter['saturation'] / base['saturation'] - 1:+.0%}, PSNR {adapter['psnr'] - base['psnr']:+.1f} dB, "
          f"another pair's control {adapter['control_ratio']:.2f}x the loss with its own")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
