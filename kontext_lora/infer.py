"""Inference: FluxKontextPipeline + `load_lora_weights` on one control image and prompt."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from kontext_lora.config import ModelConfig
from kontext_lora.data.triples import load_image
from kontext_lora.errors import UserError
from kontext_lora.model.device import device_limit_bytes
from kontext_lora.model.load import ModelError, load_pipeline
from kontext_lora.run_files import ADAPTER_NAME as LORA_WEIGHTS_NAME  # what load_lora_weights looks for

OFFLOADS = ("auto", "none", "model", "group")
# Held beside the weights while one ~1 MP edit runs: the transformer's no-grad activations and the VAE decode.
INFER_ACTIVATION_BYTES = 6 * 2**30


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
    offload: str = "auto",
) -> Path:
    """Edit `image` following `prompt` with the base model (+ LoRA at `scale`); writes and returns `out`.

    Without `size` the pipeline picks Kontext's preferred ~1 MP resolution for the image's aspect ratio;
    with `size` the output is size x size (useful for the tiny model). `offload` places the pipeline (`place_pipeline`).
    """
    _check_inputs(Path(model), None if lora is None else Path(lora))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_arguments(image, out, steps, guidance, scale, size)  # before the model loads: one line, at once
    if lora is not None:  # a folder holds its file under diffusers' name (_check_inputs has checked it is there)
        _check_lora_file(Path(lora) / LORA_WEIGHTS_NAME if Path(lora).is_dir() else Path(lora))
    pipe = load_pipeline(ModelConfig(pretrained=str(model), dtype=dtype))
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="kontext_lora")
        pipe.set_adapters(["kontext_lora"], adapter_weights=[scale])
    chosen = place_pipeline(pipe, torch.device(device), offload)
    if chosen != "none":
        print(f"[kontext-lora] offload: {chosen} (the pipeline does not fit the device whole)")
    pipe.set_progress_bar_config(disable=False)
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


def place_pipeline(pipe, device: torch.device, offload: str = "auto") -> str:
    """Put the pipeline on `device`: none (all of it there), model (each component there only while it runs:
    diffusers' model CPU offload), group (the transformer and T5 streamed block by block from CPU memory: diffusers'
    group offload) or auto (the first of these that fits the memory this process may use). Returns the choice."""
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {', '.join(OFFLOADS)}, not {offload!r}")
    limit = device_limit_bytes(device)
    if offload == "auto":
        sizes = {name: sum(p.numel() * p.element_size() for p in module.parameters())
                 for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}  # fmt: skip
        if limit is None or sum(sizes.values()) + INFER_ACTIVATION_BYTES <= limit:
            offload = "none"
        elif max(sizes.values()) + INFER_ACTIVATION_BYTES <= limit:
            offload = "model"
        else:
            offload = "group"
    if offload == "none":
        pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                                  num_blocks_per_group=1, use_stream=device.type == "cuda")  # fmt: skip
    return offload


def _check_inputs(model: Path, lora: Path | None) -> None:
    """Fail before the slow load, naming the argument: diffusers reads a missing LoRA path as a Hub repo id."""
    if not (model / "model_index.json").is_file():
        raise ModelError(
            f"--model {model}: not a diffusers pipeline folder (no model_index.json); give a local FLUX.1-Kontext-dev "
            f"folder, or build the tiny test model there with `kontext-lora make-tiny-model {model}`"
        )
    if lora is not None and not (lora.is_file() or (lora / LORA_WEIGHTS_NAME).is_file()):
        raise ModelError(f"--lora {lora}: no such file; give a LoRA .safetensors file (or a folder with one)")


class InferError(UserError, ValueError):
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
