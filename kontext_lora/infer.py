"""Inference: FluxKontextPipeline + `load_lora_weights` on one control image and prompt."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from kontext_lora.config import ModelConfig
from kontext_lora.data.triples import load_image
from kontext_lora.model.load import ModelError, load_pipeline

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights looks for in a folder


def run_inference(
    model: str,
    image: str | Path,
    prompt: str,
    out: str | Path,
    lora: str | Path | None = None,
    scale: float = 1.0,
    steps: int = 28,
    guidance: float = 2.5,
    seed: int = 0,
    dtype: str = "bfloat16",
    device: str | None = None,
    size: int | None = None,
) -> Path:
    """Edit `image` following `prompt` with the base model (+ LoRA at `scale`); writes and returns `out`.

    Without `size` the pipeline picks Kontext's preferred ~1 MP resolution for the image's aspect ratio;
    with `size` the output is size x size (useful for the tiny model).
    """
    _check_inputs(Path(model), None if lora is None else Path(lora))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(ModelConfig(pretrained=str(model), dtype=dtype)).to(device)
    pipe.set_progress_bar_config(disable=False)
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="kontext_lora")
        pipe.set_adapters(["kontext_lora"], adapter_weights=[scale])
    control = load_image(image)
    extra = {} if size is None else {"height": size, "width": size, "max_area": size * size, "_auto_resize": False}
    if size is not None:
        control = control.resize((size, size), Image.BICUBIC)
    result = pipe(
        image=control,
        prompt=prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator(device="cpu").manual_seed(seed),
        **extra,
    ).images[0]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out)
    return out


def _check_inputs(model: Path, lora: Path | None) -> None:
    """Fail before the slow load, naming the argument: diffusers reads a missing LoRA path as a Hub repo id."""
    if not (model / "model_index.json").is_file():
        raise ModelError(
            f"--model {model}: not a diffusers pipeline folder (no model_index.json); give a local FLUX.1-Kontext-dev "
            f"folder, or build the tiny test model there with `kontext-lora make-tiny-model {model}`"
        )
    if lora is not None and not (lora.is_file() or (lora / LORA_WEIGHTS_NAME).is_file()):
        raise ModelError(f"--lora {lora}: no such file; give a LoRA .safetensors file (or a folder with one)")
