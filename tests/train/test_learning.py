"""The README's example job learns its edit: the embedded tiny editor learns "make it black and white".

The job is the one a user runs first (configs/examples/tiny_bw.yaml, through `train`, validation before the first
step and at the end); the figures are read from what it wrote (metrics.jsonl) and from outside the trainer (the saved
model folder loaded by `FluxKontextPipeline`, the adapter by `load_lora_weights`), on the held-out triple only.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from kontext_lora.config import load_config
from kontext_lora.data.triples import discover_triples, image_to_tensor, load_image
from kontext_lora.model.load import encode_captions, encode_images
from kontext_lora.train.loop import train
from kontext_lora.train.objective import LatentBatch, flow_matching_loss
from kontext_lora.train.validation import saturation, to_image

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "examples" / "tiny_bw.yaml"
DATA = REPO / "data_examples" / "bw"


@torch.no_grad()
def _heldout_figures(pipe, heldout: str, size: int) -> dict[str, float]:
    """The held-out triple, with the pipeline as it is: its sampled edit's saturation and PSNR against the target
    (8 steps, fixed seed, as validation samples), and its flow-matching loss at fixed sigmas and noise with its own
    control and (mean) with each other triple's control."""
    triples = {t.stem: t for t in discover_triples(DATA)}
    pixels = lambda ref: image_to_tensor(load_image(ref), size)[None]  # noqa: E731  (1, 3, size, size)
    output = pipe(
        image=to_image(pixels(triples[heldout].control)[0]), prompt=triples[heldout].caption,
        height=size, width=size, max_area=size * size, _auto_resize=False, num_inference_steps=8, guidance_scale=1.0,
        max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(0),
    ).images[0].clip(0.0, 1.0)  # fmt: skip
    target = (pixels(triples[heldout].target)[0].permute(1, 2, 0).numpy() + 1.0) / 2.0  # (size, size, 3)
    figures = {"saturation": saturation(output), "psnr": -10 * math.log10(float(((output - target) ** 2).mean()))}

    target_latents = encode_images(pipe.vae, pixels(triples[heldout].target))
    controls = {stem: encode_images(pipe.vae, pixels(t.control)) for stem, t in triples.items()}
    prompt_embeds, pooled_embeds = encode_captions(pipe, [triples[heldout].caption], 32)
    noise = torch.randn(target_latents.shape, generator=torch.Generator().manual_seed(0))

    def loss(control: torch.Tensor) -> float:
        batch = LatentBatch(target_latents, [control], prompt_embeds, pooled_embeds)
        return float(np.mean([flow_matching_loss(pipe.transformer, batch, torch.full((1,), s), noise, 1.0).item()
                              for s in (0.25, 0.5, 0.75)]))  # fmt: skip

    figures["loss_own"] = loss(controls[heldout])
    figures["loss_other"] = float(np.mean([loss(control) for stem, control in controls.items() if stem != heldout]))
    return figures


def test_example_job_learns_black_and_white_from_its_control(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_config(EXAMPLE, [f"model.pretrained={tmp_path / 'tiny-kontext'}", f"output.dir={out}",
                                "logging.report_to=none", "output.export_formats=[]"])  # fmt: skip
    start = time.perf_counter()
    adapter = train(cfg)
    seconds = time.perf_counter() - start

    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "heldout_loss" in r]
    first, last = records[0], records[-1]
    assert first["step"] == 0 and last["step"] == cfg.train.steps
    (heldout,) = [p.stem.removeprefix("heldout-") for p in (out / "validation" / "step-000000").glob("heldout-*")]
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(cfg.model.pretrained, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base = _heldout_figures(pipe, heldout, cfg.data.resolution)
    pipe.load_lora_weights(str(adapter))
    tuned = _heldout_figures(pipe, heldout, cfg.data.resolution)
    report = f"held-out {heldout}: base {base} -> adapter {tuned}; run {first} -> {last} ({seconds:.0f} s)"
    print(report)
    # The held-out triple's sampled edit turns black and white, towards its target ...
    assert tuned["saturation"] <= 0.2 * base["saturation"], report
    assert tuned["psnr"] >= base["psnr"] + 5.0, report
    # ... its loss falls, in the run's own record and from outside, and depends on its own control.
    assert last["heldout_loss"] <= 0.7 * first["heldout_loss"], report
    assert tuned["loss_own"] <= 0.7 * base["loss_own"], report
    assert tuned["loss_other"] >= 1.3 * tuned["loss_own"], report
