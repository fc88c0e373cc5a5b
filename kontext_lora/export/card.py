"""The model card: README.md beside the weights, written from the LoRA file's metadata.

It reads the two metadata entries of a diffusers-format file: `lora_adapter_metadata` (the PEFT config: rank,
alpha, patterns, targets) and `kontext_lora` (our record). Keys read from the record, all optional:
`base_model`, `step` (or `steps`), `resolution`, `buckets`, `control_resize`, `sample_grid` (a path relative to the
run folder), `config` (the resolved training config), `merged` / `resized` (what export did to the adapter).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kontext_lora.export.diffusers_format import (
    KONTEXT_LORA_METADATA_KEY,
    LORA_ADAPTER_METADATA_KEY,
    PREFIX,
    WEIGHT_NAME,
)
from kontext_lora.run_files import CARD_NAME

NOT_RECORDED = "not recorded"


def _entry(metadata: Mapping[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(metadata.get(key) or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _yaml(tree: Any) -> str:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_yaml(OmegaConf.create(tree)).rstrip()
    except Exception:  # a value OmegaConf cannot hold: JSON says the same thing
        return json.dumps(tree, indent=2, sort_keys=True, default=str)


def _describe_files(files: Sequence[str]) -> list[str]:
    lines = []
    for name in files:
        if name.endswith("_kohya.safetensors"):
            what = "kohya naming (`lora_unet_*`, BFL module names, fused qkv/linear1), for kohya-based UIs"
        elif name.endswith("_comfyui.safetensors"):
            what = "ComfyUI (`diffusion_model.*`, BFL names): put it in `models/loras`, load with *LoraLoaderModelOnly*"
        elif name.endswith(".safetensors"):
            what = "diffusers/PEFT (`transformer.*`), for `FluxKontextPipeline.load_lora_weights` (not for ComfyUI)"
        elif name == CARD_NAME:
            continue
        else:
            what = "sample grid" if name.endswith((".png", ".jpg", ".webp")) else ""
        lines.append(f"- `{name}`" + (f": {what}" if what else ""))
    return lines


def comfyui_note(comfyui_file: str | None, rank: Any = None, alpha: Any = None) -> str:
    """Which file a ComfyUI user loads. The diffusers-format file keeps alpha in its metadata only, which ComfyUI
    does not read: it applies such a file's update at scale 1, not alpha/r (the `_comfyui` file carries alphas)."""
    scale = float(alpha) / float(rank) if rank and alpha is not None else None
    effect = (
        "here alpha = r, so it happens to load at its strength"
        if scale == 1
        else (f"it would scale by 1, not alpha/r{'' if scale is None else f' = {scale:g}'}")
    )
    why = f"{WEIGHT_NAME} keeps alpha in its metadata only, unread by ComfyUI ({effect})"
    if comfyui_file is None:
        return f"ComfyUI: export a file for it with `kontext-lora export --format comfyui`; {why}"
    return f"ComfyUI: load {comfyui_file}, whose tensors carry each module's alpha; {why}"


def model_card(metadata: Mapping[str, str], files: Sequence[str] = (), sample_grid: str | None = None) -> str:
    """README.md text for a LoRA from its file metadata; `files`: names written beside it; `sample_grid`: image name."""
    config = {k.removeprefix(PREFIX): v for k, v in _entry(metadata, LORA_ADAPTER_METADATA_KEY).items()}
    info = _entry(metadata, KONTEXT_LORA_METADATA_KEY)
    base = info.get("base_model") or NOT_RECORDED
    repo = base if base != NOT_RECORDED else "black-forest-labs/FLUX.1-Kontext-dev"  # for the front matter and snippet
    rank, alpha = config.get("r", info.get("rank")), config.get("lora_alpha", info.get("alpha"))
    rank_alpha = f"r = {rank}, alpha = {alpha}" if rank is not None else NOT_RECORDED
    if rank and alpha is not None:
        rank_alpha += f" (update scale alpha/r = {float(alpha) / float(rank):g}"
        rank_alpha += ", rsLoRA: alpha/sqrt(r))" if config.get("use_rslora") else ")"
    for key, label in (("rank_pattern", "rank"), ("alpha_pattern", "alpha")):
        if config.get(key):
            count = len(config[key])
            rank_alpha += f"; {count} module pattern{'s' if count != 1 else ''} with their own {label}"
    if config.get("use_dora"):
        rank_alpha += "; DoRA"
    targets = config.get("target_modules", info.get("targets"))
    if isinstance(targets, (list, tuple)):
        targets = ", ".join(f"`{t}`" for t in sorted(targets))
    elif targets:
        targets = f"`{targets}`"
    steps = info.get("step", info.get("steps"))
    buckets = info.get("buckets")
    if buckets is None and info.get("resolution"):
        buckets = f"square {info['resolution']} px crops"
    elif isinstance(buckets, (list, tuple)):
        buckets = ", ".join("x".join(str(v) for v in b) if isinstance(b, (list, tuple)) else str(b) for b in buckets)
    rows = [
        ("Base model", f"`{base}`" if base != NOT_RECORDED else base),
        ("Rank / alpha", rank_alpha),
        ("Targets", targets or NOT_RECORDED),
        ("Steps", steps if steps is not None else NOT_RECORDED),
        ("Buckets", buckets or NOT_RECORDED),
        ("Control image resize", info.get("control_resize") or NOT_RECORDED),
    ]
    for key, label in (("resized", "Rank resize"), ("merged", "Merged")):
        if info.get(key):
            rows.append((label, json.dumps(info[key], sort_keys=True)))

    lines = [
        "---",
        f"base_model: {repo}",
        "library_name: diffusers",
        "tags: [flux, flux-kontext, lora, image-editing, kontext-lora]",
        "---",
        "",
        "# FLUX.1-Kontext LoRA",
        "",
        "An image-editing LoRA for FLUX.1-Kontext-dev, trained with kontext-lora.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {label} | {value} |" for label, value in rows],
        "",
    ]
    file_lines = _describe_files(files)
    if file_lines:
        lines += ["## Files", "", *file_lines, ""]
    lines += [
        "## Use with diffusers",
        "",
        "```py",
        "import torch",
        "from diffusers import FluxKontextPipeline",
        "",
        f'pipe = FluxKontextPipeline.from_pretrained("{repo}", torch_dtype=torch.bfloat16)',
        'pipe.load_lora_weights("path/to/this/folder")',
        'image = pipe(image=control_image, prompt="...", guidance_scale=2.5).images[0]',
        "```",
        "",
    ]
    comfyui = next((name for name in files if name.endswith("_comfyui.safetensors")), None)
    lines += ["## Use with ComfyUI", "", comfyui_note(f"`{comfyui}`" if comfyui else None, rank, alpha) + ".", ""]
    if sample_grid:
        lines += ["## Samples", "", f"![validation samples]({sample_grid})", ""]
    if info.get("config"):
        lines += ["## Training config (resolved)", "", "```yaml", _yaml(info["config"]), "```", ""]
    return "\n".join(lines)


def write_model_card(
    directory: str | Path,
    metadata: Mapping[str, str],
    files: Sequence[str] = (),
    run_dir: str | Path | None = None,
) -> Path:
    """Write README.md into `directory`; a recorded sample grid (relative to `run_dir`) is copied beside it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    grid_name = None
    grid = _entry(metadata, KONTEXT_LORA_METADATA_KEY).get("sample_grid")
    if grid:
        source = Path(grid) if Path(grid).is_absolute() or run_dir is None else Path(run_dir) / grid
        if source.is_file():
            grid_name = source.name
            if source.resolve() != (directory / grid_name).resolve():
                shutil.copyfile(source, directory / grid_name)
    path = directory / CARD_NAME
    path.write_text(model_card(metadata, list(files) + ([grid_name] if grid_name else []), grid_name))
    return path
