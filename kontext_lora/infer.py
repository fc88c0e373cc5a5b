"""Inference: FluxKontextPipeline + `load_lora_weights` on one control image and prompt."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from kontext_lora.config import ModelConfig
from kontext_lora.data.triples import load_image
from kontext_lora.model.load import load_pipeline


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
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_arguments(image, out, steps, guidance, scale, size)  # before the model loads: one line, at once
    if lora is not None:
        _check_lora_file(Path(lora))
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


class InferError(ValueError):
    """An `infer` argument that cannot work; the message names it."""


def _check_arguments(image, out, steps: int, guidance: float, scale: float, size: int | None) -> None:
    if not Path(image).is_file():
        raise InferError(f"--image {image}: no such file")
    if Path(out).is_dir() or Path(out).suffix.lower() not in Image.registered_extensions():
        raise InferError(f"--out {out}: name an image file to write (.png, .jpg, ...)")
    if steps < 1:
        raise InferError(f"--steps must be >= 1, got {steps}")
    for name, value in (("--guidance", guidance), ("--scale", scale)):
        if not math.isfinite(value):
            raise InferError(f"{name} must be a finite number, got {value}")
    if size is not None and (size < 16 or size % 16):
        raise InferError(f"--size must be a positive multiple of 16, got {size}")


def _check_lora_file(path: Path) -> None:
    """`--lora` must be a LoRA file that one of our readers takes (a FormatError naming it otherwise): diffusers
    would fail on a damaged or foreign file with a traceback."""
    from kontext_lora.export.formats import read_adapter

    read_adapter(path)
