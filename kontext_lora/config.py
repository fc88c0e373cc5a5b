"""The typed config schema: the single source of every key.

Each key is declared once below with its type, default and a one-line doc (``field(metadata={"doc": ...})``).
``load_config`` reads a YAML file (following ``extends:``), applies ``key=value`` overrides, and validates:
an unknown key fails naming the key and the nearest valid one; an ill-typed value names key, value and type;
a value outside its allowed set names the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from kontext_lora.errors import UserError


class ConfigError(UserError, ValueError):
    """A config problem a user can fix; the message names the key or file."""


def opt(default: Any, doc: str, choices: tuple[str, ...] | None = None) -> Any:
    """Declare a config key: default value, one-line doc and (for strings) the allowed values."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


@dataclass
class ModelConfig:
    pretrained: str = opt(MISSING, "Diffusers folder of FLUX.1-Kontext-dev (or of the embedded tiny model).")
    build_tiny_if_missing: bool = opt(
        False,
        "Build the embedded tiny Kontext pipeline (a pretrained editor) at `pretrained` if the folder does not exist.",
    )
    dtype: str = opt("bfloat16", "Dtype of the frozen weights.", ("float32", "bfloat16", "float16"))
    guidance: float = opt(1.0, "Constant guidance value fed to the guidance-distilled transformer during training.")
    max_sequence_length: int = opt(512, "T5 tokens per caption (Kontext-dev uses 512).")


@dataclass
class DatasetConfig:
    path: str = opt(
        MISSING,
        "Folder with control/ and target/ subfolders, a metadata.jsonl or metadata.csv, or a Hugging Face dataset "
        "(save_to_disk folder, parquet/arrow files, or an imagefolder with format=hf).",
    )
    default_caption: str = opt("", "Caption for a triple that has no .txt file or caption field.")
    format: str = opt(
        "auto",
        "How `path` is read; auto: metadata.jsonl, then metadata.csv, then a Hugging Face dataset, then folders.",
        ("auto", "folder", "jsonl", "csv", "hf"),
    )
    control_keys: list[str] = opt(
        ["control"],
        "Control images per target, in id order (1, 2, ...): subfolder names, or jsonl/csv/hf column names. "
        "[] makes a text-to-image dataset without controls.",
    )
    target_key: str = opt("target", "Target subfolder name, or jsonl/csv/hf column of the target image.")
    caption_key: str = opt("caption", "jsonl/csv/hf column of the caption (folders use target/<stem>.txt).")
    mask_key: str = opt(
        "mask", "Subfolder or column of optional loss masks (same stem as the target; white = edited region)."
    )
    split: str = opt("train", "Split of a Hugging Face dataset.")
    weight: float = opt(1.0, "Each triple of this dataset is drawn `weight` times as often per epoch (fractions ok).")
    repeats: int = opt(1, "Each triple appears this many times per epoch (multiplies `weight`).")
    resolution: int = opt(0, "Bucket area side for this dataset in pixels (0: data.resolution).")
    caption_dropout: float = opt(0.0, "Probability of training a sample on the empty prompt instead of its caption.")
    trigger_word: str = opt("", "Word put in front of every caption of this dataset (e.g. a rare token).")
    flip: bool = opt(False, "Paired horizontal flip (control and target together); off for left/right edits.")
    random_crop: bool = opt(False, "Paired random crop position instead of the center (control and target together).")


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = opt([], "One or more datasets of (control, target, caption) triples.")
    resolution: int = opt(512, "Buckets hold about resolution^2 pixels (side of the square bucket; multiple of 16).")
    num_workers: int = opt(
        0, "DataLoader worker processes (0 reads the cache fastest, see scripts/bench_data.py); also decode threads."
    )
    buckets: str = opt(
        "area",
        "Target sizes: area (aspect buckets of resolution^2 pixels, sides multiples of 16), kontext (FLUX.1 "
        "Kontext's 17 preferred ~1 MP resolutions), square (resolution x resolution center crop).",
        ("area", "kontext", "square"),
    )
    max_aspect_ratio: float = opt(2.5, "Most elongated area bucket (long side / short side).")
    control_bucket: str = opt(
        "target",
        "Size of each control: the target's bucket, or its own bucket (own aspect ratio and id grid).",
        ("target", "own"),
    )
    max_upscale: float = opt(2.0, "Images that would need more upscaling than this to fill their bucket are skipped.")
    aspect_tolerance: float = opt(0.05, "Preflight warns when control and target aspect ratios differ by more.")
    cache_dir: str = opt("", "Disk cache of latents and text embeddings (empty: <output.dir>/cache); share it.")
    crop_variants: int = opt(4, "Cached random-crop positions per image when a dataset has random_crop.")
    preflight_samples: int = opt(8, "Triples shown on the preflight contact sheet.")


@dataclass
class LoraConfig:
    rank: int = opt(16, "LoRA rank r.")
    alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = opt(0.0, "Dropout on the LoRA input.")
    preset: str = opt(
        "attention_mlp",
        "Target preset: attention (q/k/v/out), attention_mlp (+ feed-forward), all (+ modulation).",
        ("attention", "attention_mlp", "all"),
    )
    target_modules: list[str] = opt([], "Explicit module-name suffixes to adapt; overrides `preset` when non-empty.")
    init_lora_weights: str = opt(
        "default",
        "PEFT init (lora): default (kaiming A, zero B), gaussian (normal A, zero B), orthogonal (start off the base: "
        "B @ A != 0; even rank), pissa (top singular vectors) / olora (QR): these move s*B0@A0 out of the base weight "
        "and save as the equivalent rank-2r LoRA on the original base.",
        ("default", "gaussian", "orthogonal", "pissa", "olora"),
    )
    init_from: str = opt(
        "", "Start from this LoRA file (ours, diffusers/ai-toolkit, kohya, ComfyUI, fal) instead of a fresh init."
    )
    adapter_type: str = opt(
        "lora",
        "PEFT adapter kind: lora (also DoRA / rsLoRA through the flags below), loha (Hadamard product), lokr "
        "(Kronecker product). LoHa/LoKr save with PEFT's own keys (diffusers-format file, no kohya/ComfyUI export).",
        ("lora", "loha", "lokr"),
    )
    use_dora: bool = opt(False, "DoRA: learn a per-output-row magnitude beside the LoRA direction (lora only).")
    use_rslora: bool = opt(False, "rsLoRA: scale the update by alpha / sqrt(rank) instead of alpha / rank (lora only).")
    target_regex: str = opt(
        "", "A regex over full module names (PEFT full match); overrides `preset` and `target_modules` when set."
    )
    rank_pattern: dict[str, int] = opt(
        {},
        "Per-module ranks {regex: rank} (PEFT rank_pattern; a key must match a whole name or a suffix after a dot), "
        "e.g. {'single_transformer_blocks.*': 8}.",
    )
    alpha_pattern: dict[str, float] = opt(
        {}, "Per-module alphas: {regex: alpha} (PEFT alpha_pattern), matched as rank_pattern."
    )


@dataclass
class TrainConfig:
    steps: int = opt(1000, "Optimizer steps to train.")
    batch_size: int = opt(1, "Samples per device per micro-batch.")
    gradient_accumulation: int = opt(1, "Micro-batches accumulated per optimizer step.")
    lr: float = opt(1e-4, "Peak learning rate of AdamW.")
    weight_decay: float = opt(0.0, "AdamW weight decay on the LoRA parameters.")
    scheduler: str = opt(
        "constant",
        "Learning-rate schedule (diffusers.optimization).",
        ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial"),
    )
    warmup_steps: int = opt(0, "Linear warm-up steps of the schedule.")
    seed: int = opt(0, "Seed of data order, LoRA init, noise and sigmas.")
    mixed_precision: str = opt("no", "accelerate mixed precision.", ("no", "bf16", "fp16"))
    gradient_checkpointing: bool = opt(False, "Recompute transformer block activations in backward to save memory.")
    max_grad_norm: float = opt(1.0, "Clip the LoRA gradient norm to this value (0 disables).")
    logit_mean: float = opt(0.0, "Mean of the logit-normal sigma sampler.")
    logit_std: float = opt(1.0, "Std of the logit-normal sigma sampler.")
    resume: str = opt(
        "", "Resume from `latest` (newest complete checkpoint in output.dir; fresh start if none) or a step-* folder."
    )


@dataclass
class OutputConfig:
    dir: str = opt("runs/example", "Run folder: adapters, resolved config, logs.")
    save_every: int = opt(0, "Also write the adapter every N steps (0: only at the end).")
    export_formats: list[str] = opt(
        [], "Also write these formats (kohya, comfyui) and a model card beside each saved adapter."
    )
    keep_last: int = opt(0, "Keep only the newest K step-NNNNNN checkpoints (0 keeps all).")
    overwrite: bool = opt(
        False,
        "Start over in an output.dir that holds another run: its adapters, checkpoints, metrics, best/ and validation/ "
        "are deleted first (the cache is kept). Without it such a folder is refused unless train.resume is set; a "
        "resume that finds a checkpoint continues it either way.",
    )


@dataclass
class LoggingConfig:
    report_to: str = opt("tensorboard", "Where metrics go.", ("tensorboard", "wandb", "none"))
    log_every: int = opt(1, "Log metrics every N optimizer steps.")
    wandb_project: str = opt("kontext-lora", "wandb project name.")
    wandb_mode: str = opt("offline", "wandb mode: offline needs no network.", ("online", "offline", "disabled"))
    wandb_group: str = opt("", "wandb run group (a sweep sets it to the sweep's name); empty: no group.")


@dataclass
class EmaConfig:
    enabled: bool = opt(False, "Keep an exponential moving average of the adapter weights (saved beside the adapter).")
    decay: float = opt(0.999, "EMA decay: ema = decay * ema + (1 - decay) * weights at each update.")
    every: int = opt(1, "Update the EMA every N optimizer steps.")
    ramp: bool = opt(
        True, "Ramp the decay as min(decay, n/(9+n)) at the n-th update (diffusers EMAModel); false: constant decay."
    )


@dataclass
class ValidationExample:
    control: str = opt(MISSING, "Control image to edit.")
    prompt: str = opt(MISSING, "Edit instruction.")
    target: str = opt("", "Expected result (optional): adds it to the grid, the held-out loss and the edit metrics.")
    mask: str = opt("", "Edit-region mask (optional, white = edited) for the outside-change metric.")


@dataclass
class ValidationConfig:
    every: int = opt(0, "Validate every N optimizer steps and at the end (0 disables validation).")
    at_start: bool = opt(False, "Also validate before the first step: the base model, as a reference for later steps.")
    examples: list[ValidationExample] = opt([], "Configured (control, prompt[, target, mask]) examples.")
    heldout_path: str = opt("", "A dataset folder of held-out triples (same layouts as data.datasets).")
    heldout_count: int = opt(0, "Hold this many triples (seeded pick by train.seed) out of training for validation.")
    max_images: int = opt(8, "Sample and save grids for at most this many validation items (all count for the loss).")
    steps: int = opt(28, "Inference steps of each validation sample.")
    guidance: float = opt(2.5, "Guidance scale of each validation sample.")
    seed: int = opt(0, "Seed of the sampling noise and of the held-out loss noise.")
    sigmas: list[float] = opt([0.25, 0.5, 0.75], "Fixed sigmas at which the held-out flow-matching loss is taken.")
    use_ema: bool = opt(False, "Validate (and pick the best) with the EMA weights instead of the raw adapter.")
    best_metric: str = opt(
        "heldout_loss",
        "Metric picking the best step (adapter in best/, record in best.json); edit_psnr maximised, others minimised.",
        ("heldout_loss", "edit_l1", "edit_psnr", "edit_outside_change", "none"),
    )


@dataclass
class LossConfig:
    timestep_sampling: str = opt(
        "logit_normal",
        "How sigmas are drawn: uniform, logit_normal (train.logit_mean/std), mode (loss.mode_scale), sigmoid "
        "(sigmoid of N(0, loss.sigmoid_scale)); diffusers' compute_density_for_timestep_sampling.",
        ("uniform", "logit_normal", "mode", "sigmoid"),
    )
    mode_scale: float = opt(1.29, "Scale of the `mode` sampler (SD3's default 1.29; 0 is uniform).")
    sigmoid_scale: float = opt(1.0, "Std of the normal that the `sigmoid` sampler squashes.")
    timestep_shift: str = opt(
        "none",
        "Shift applied to the drawn sigmas: none; constant (s*sigma/(1+(s-1)*sigma) with s = loss.shift); flux "
        "(mu from the target token count via the pipeline's calculate_shift, sigma -> e^mu/(e^mu + 1/sigma - 1)).",
        ("none", "constant", "flux"),
    )
    shift: float = opt(3.0, "s of timestep_shift=constant (>1 moves sigmas towards noise).")
    weighting: str = opt(
        "none",
        "Per-sample loss weight by sigma (diffusers' compute_loss_weighting_for_sd3).",
        ("none", "sigma_sqrt", "cosmap"),
    )
    type: str = opt("mse", "Element-wise loss between predicted and true velocity.", ("mse", "l1", "huber"))
    huber_delta: float = opt(1.0, "Delta of the Huber loss: quadratic below it, linear above.")
    mask_outside_weight: float = opt(
        0.0, "Weight of target tokens outside a triple's loss mask (inside weighs 1); used where masks are given."
    )
    edit_weighting: bool = opt(
        False,
        "Weight each target token by its latent change |target - control| (normalised per sample to [floor, 1]), so "
        "a small local edit is not drowned by the unchanged pixels.",
    )
    edit_floor: float = opt(0.1, "Lowest token weight of edit_weighting (the weight of unchanged tokens).")


@dataclass
class OptimConfig:
    optimizer: str = opt(
        "adamw",
        "adamw (torch, fused kernel where the device has one), adamw8bit (bitsandbytes), prodigy (prodigyopt; set "
        "train.lr=1.0), adafactor (transformers' Adafactor at a fixed lr). Learning rate and weight decay: train.lr, "
        "train.weight_decay.",
        ("adamw", "adamw8bit", "prodigy", "adafactor"),
    )
    betas: list[float] = opt([0.9, 0.999], "Adam betas (adamw, adamw8bit, prodigy).")
    eps: float = opt(1e-8, "Adam epsilon (adamw, adamw8bit, prodigy).")
    fused: bool = opt(True, "Use torch's fused AdamW kernel when every parameter's device supports it.")
    min_8bit_size: int = opt(4096, "adamw8bit: tensors with fewer elements keep 32-bit state (bitsandbytes).")
    prodigy_d_coef: float = opt(1.0, "Prodigy's d_coef: multiplies the estimated step size.")
    prodigy_safeguard_warmup: bool = opt(False, "Prodigy's safeguard_warmup (recommended with a warm-up).")
    nonfinite_limit: int = opt(
        5,
        "A NaN/inf loss skips its optimizer step with a warning; this many in a row save the adapter and stop.",
    )


CUDA_GRAPHS_WITH_SWAP = (
    "config key `speed.cuda_graphs`: does not combine with memory.block_swap > 0 (swapped weights get new memory "
    "every step; a CUDA graph replays fixed addresses)"
)


@dataclass
class SpeedConfig:
    attention_backend: str = opt(
        "auto",
        "SDPA kernel in training, set process-wide: auto (cuDNN on Hopper+ GPUs, else PyTorch's pick), flash, cudnn, "
        "efficient, math.",
        ("auto", "flash", "cudnn", "efficient", "math"),
    )
    compile: str = opt(
        "auto",
        "torch.compile: blocks (each repeated block, regional), none (eager), auto (blocks on CUDA, none on CPU).",
        ("auto", "blocks", "none"),
    )
    checkpoint_fraction: float = opt(
        1.0, "With train.gradient_checkpointing: fraction of the blocks recomputed in backward (1.0 = all)."
    )
    activation_budget: float = opt(
        1.0, "With compile: fraction of each block's activations kept for backward; the compiler recomputes the rest."
    )
    keep_attention: bool = opt(
        False, "With compile: never recompute the attention forward; an activation budget recomputes other work."
    )
    cuda_graphs: bool = opt(
        False,
        "With compile on CUDA: replay each compiled block as a CUDA graph (inductor's cudagraph trees), for steps the "
        "CPU's kernel launches limit (512^2 and below); needs train.gradient_accumulation=1.",
    )
    fuse_lora_inputs: bool = opt(
        False,
        "With compile: the LoRA down-projections that read the same input (q, k, v; a single block's MLP) run as one "
        "matmul, forward and backward.",
    )
    tune_kernels: bool = opt(
        False,
        "With compile: inductor times block-size choices for each generated Triton kernel (coordinate descent) while "
        "compiling; the first step takes minutes longer at full size.",
    )
    fp8_base: bool = opt(
        False,
        "fp8 matmuls for the frozen base linears (GPUs with fp8 tensor cores): with memory.base_quant=fp8 on the "
        "stored e4m3 weights, else torchao float8 on the bf16 base.",
    )
    fp8_fast_accum_backward: bool = opt(
        False,
        "With fp8_base on memory.base_quant=fp8: the input-gradient fp8 matmuls accumulate in the tensor cores' fast, "
        "less precise mode too (forward always does, as torchao's float8 recipes).",
    )


@dataclass
class MemoryConfig:
    base_quant: str = opt(
        "none",
        "Storage of the frozen transformer linears under the LoRA: none (model.dtype), fp8 (e4m3 weights with "
        "per-output-channel scales, about half of bf16), nf4 (4-bit NormalFloat, about a quarter).",
        ("none", "fp8", "nf4"),
    )
    block_swap: int = opt(
        0,
        "Transformer blocks whose frozen weights live in pinned CPU memory, prefetched on a side stream (0 = off); "
        "spread over the depth, always checkpointed whatever speed.checkpoint_fraction says (model/swap.py).",
    )
    text_encoder: str = opt(
        "device",
        "Where the text encoders run while the cache is filled: device, or cpu_offload (each model on the device "
        "only while it encodes).",
        ("device", "cpu_offload"),
    )
    budget_gib: str = opt(
        "auto",
        "Accelerator memory budget of the whole job (caching, training, validation): auto (the CUDA device's free "
        "memory at start; no plan without CUDA), a number of GiB, or 0 (use the keys as given). Training then sets "
        "the planner keys left at their defaults to the fastest plan that fits (`kontext-lora plan`); keys set to "
        "other values are kept.",
    )


@dataclass
class Config:
    model: ModelConfig = opt(ModelConfig(), "The base model.")
    data: DataConfig = opt(DataConfig(), "Training data.")
    lora: LoraConfig = opt(LoraConfig(), "The adapter.")
    train: TrainConfig = opt(TrainConfig(), "Optimisation.")
    output: OutputConfig = opt(OutputConfig(), "Where results go.")
    logging: LoggingConfig = opt(LoggingConfig(), "Metrics logging.")
    loss: LossConfig = opt(LossConfig(), "Sigma sampling, loss weighting and region-aware loss.")
    optim: OptimConfig = opt(OptimConfig(), "Optimizer and the non-finite loss guard.")
    ema: EmaConfig = opt(EmaConfig(), "Exponential moving average of the adapter.")
    validation: ValidationConfig = opt(ValidationConfig(), "Sampling and metrics during training.")
    speed: SpeedConfig = opt(SpeedConfig(), "Training fast path (docs/performance.md).")
    memory: MemoryConfig = opt(MemoryConfig(), "Low-memory training: quantized base, block swap, a budget planner.")


# --------------------------------------------------------------------------------------------- loading


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read one YAML file and, recursively, the file its `extends:` names (relative to it)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `extends` loops back to itself")
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.yaml"))[:3]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise ConfigError(f"config file {path} is a folder; give a YAML file{hint}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}{_yaml_problem(exc)}") from None
    except Exception as exc:  # unreadable bytes and friends: one line, naming the file
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    parent = node.pop("extends", None)
    if parent is None:
        return node
    base = _read_yaml(path.parent / str(parent), seen + (path,))
    return OmegaConf.merge(base, node)


def _yaml_problem(exc: yaml.YAMLError, with_line: bool = True) -> str:
    """`, line N: what is wrong` of a YAML error (PyYAML's message spans several lines and names the mapping)."""
    mark = getattr(exc, "problem_mark", None)
    where = f", line {mark.line + 1}" if mark is not None and with_line else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    duplicate = re.fullmatch(r"found duplicate key (.+)", problem)
    if duplicate:  # OmegaConf's loader refuses a repeated key (plain YAML would keep the last value silently)
        return f"{where}: duplicate key `{duplicate.group(1)}` (a key may appear once per section; remove one)"
    return f"{where}: not valid YAML ({problem})"


def _check_keys(node: Any, schema: type, prefix: str) -> None:
    """Fail on the first key not declared in the dataclass `schema`, suggesting the nearest declared one."""
    if not isinstance(node, DictConfig):
        return
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    for key in node.keys():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean `{(prefix + '.' if prefix else '') + near[0]}`?" if near else ""
            raise ConfigError(f"unknown config key `{full}`{hint} (valid here: {', '.join(names)})")
        child, child_type = node._get_node(key), hints[key]
        item_type = (typing.get_args(child_type) or [None])[0]
        if dataclasses.is_dataclass(child_type):
            _check_keys(child, child_type, full)
        elif isinstance(child, ListConfig) and dataclasses.is_dataclass(item_type):
            for i, item in enumerate(child):
                _check_keys(item, item_type, f"{full}[{i}]")


def _check_choices(cfg: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        full = f"{prefix}.{f.name}" if prefix else f.name
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            near = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"; did you mean `{near[0]}`?" if near else ""
            if value in ("True", "False"):  # YAML 1.1 reads on/off/yes/no as booleans
                hint = " (YAML reads on/off/yes/no as true/false)"
            raise ConfigError(f"config key `{full}`: {value!r} is not one of {', '.join(choices)}{hint}")
        if dataclasses.is_dataclass(value):
            _check_choices(value, full)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_choices(item, f"{full}[{i}]")


# Allowed range of every numeric key: (low, high, low included, high included); None leaves that side open. Keys of
# list items use `[]` (data.datasets[].weight). `_check_ranges` also refuses NaN and infinity for every float key,
# and a test asserts that each numeric key of the schema has a row here.
_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "model.guidance": (0, None, True, True),
    "model.max_sequence_length": (0, None, False, True),
    "data.datasets[].weight": (0, None, False, True),
    "data.datasets[].repeats": (0, None, False, True),
    "data.datasets[].resolution": (0, None, True, True),
    "data.datasets[].caption_dropout": (0, 1, True, True),
    "data.resolution": (0, None, False, True),
    "data.num_workers": (0, None, True, True),
    "data.max_aspect_ratio": (1, None, True, True),
    "data.max_upscale": (1, None, True, True),
    "data.aspect_tolerance": (0, None, True, True),
    "data.crop_variants": (0, None, False, True),
    "data.preflight_samples": (0, None, True, True),
    "lora.rank": (0, None, False, True),
    "lora.alpha": (0, None, False, True),
    "lora.dropout": (0, 1, True, False),
    "train.steps": (0, None, False, True),
    "train.batch_size": (0, None, False, True),
    "train.gradient_accumulation": (0, None, False, True),
    "train.lr": (0, None, True, True),
    "train.weight_decay": (0, None, True, True),
    "train.warmup_steps": (0, None, True, True),
    "train.seed": (0, 2**32 - 1, True, True),  # numpy's global seed (accelerate's set_seed) takes 32 bits
    "train.max_grad_norm": (0, None, True, True),
    "train.logit_mean": (None, None, True, True),
    "train.logit_std": (0, None, False, True),
    "output.save_every": (0, None, True, True),
    "output.keep_last": (0, None, True, True),
    "logging.log_every": (0, None, False, True),
    "ema.decay": (0, 1, True, True),
    "ema.every": (0, None, False, True),
    "validation.every": (0, None, True, True),
    "validation.heldout_count": (0, None, True, True),
    "validation.max_images": (0, None, True, True),
    "validation.steps": (0, None, False, True),
    "validation.guidance": (0, None, True, True),
    "validation.seed": (0, 2**32 - 1, True, True),
    "validation.sigmas[]": (0, 1, False, True),
    "loss.mode_scale": (0, None, True, True),
    "loss.sigmoid_scale": (0, None, False, True),
    "loss.shift": (0, None, False, True),
    "loss.huber_delta": (0, None, False, True),
    "loss.mask_outside_weight": (0, 1, True, True),
    "loss.edit_floor": (0, 1, True, True),
    "optim.betas[]": (0, 1, True, False),
    "optim.eps": (0, None, False, True),
    "optim.min_8bit_size": (0, None, True, True),
    "optim.prodigy_d_coef": (0, None, False, True),
    "optim.nonfinite_limit": (0, None, False, True),
    "speed.checkpoint_fraction": (0, 1, True, True),
    "speed.activation_budget": (0, 1, True, True),
    "memory.block_swap": (0, None, True, True),
    "lora.rank_pattern{}": (0, None, False, True),
    "lora.alpha_pattern{}": (0, None, False, True),
}


def _numeric_values(node: Any, prefix: str = "") -> typing.Iterator[tuple[str, str, Any]]:
    """(range key, key as shown to the user, value) of every number in the config tree (bools excluded)."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _numeric_values(value, f"{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    for rule, shown, number in _numeric_values(item, f"{key}[]."):
                        yield rule, shown.replace(f"{key}[]", f"{key}[{i}]", 1), number
                elif isinstance(item, (int, float)) and not isinstance(item, bool):
                    yield f"{key}[]", f"{key}[{i}]", item
        elif isinstance(value, dict):
            for name, item in value.items():
                yield f"{key}{{}}", f"{key}[{name!r}]", item
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, key, value


def _check_ranges(cfg: Config) -> None:
    """Every number: finite, and inside its `_RANGES` row; the message names the key and the allowed range."""
    for rule, shown, value in _numeric_values(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key `{shown}`: must be a finite number, got {value}")
        low, high, low_in, high_in = _RANGES[rule]
        below = low is not None and (value < low or (value == low and not low_in))
        above = high is not None and (value > high or (value == high and not high_in))
        if below or above:
            if high is None:
                allowed = f"{'>=' if low_in else '>'} {low:g}"
            elif low is None:
                allowed = f"{'<=' if high_in else '<'} {high:g}"
            else:
                allowed = f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            raise ConfigError(f"config key `{shown}`: must be {allowed}, got {value}")


def _check_paths(cfg: Config) -> None:
    """Paths that must name a folder (or nothing yet) or a file, and texts that must not be empty."""
    if not cfg.model.pretrained.strip():
        raise ConfigError("config key `model.pretrained`: empty; give the diffusers folder of the model")
    for key, value in (("model.pretrained", cfg.model.pretrained), ("output.dir", cfg.output.dir),
                       ("data.cache_dir", cfg.data.cache_dir)):  # fmt: skip
        if value and Path(value).exists() and not Path(value).is_dir():
            raise ConfigError(f"config key `{key}`: {value} is a file, not a folder; name a folder")
    if not cfg.output.dir.strip():
        raise ConfigError("config key `output.dir`: empty; name the run folder")
    for i, ds in enumerate(cfg.data.datasets):
        if not ds.path.strip():
            raise ConfigError(f"config key `data.datasets[{i}].path`: empty; name the dataset folder or file")
        if not ds.target_key.strip() or any(not name.strip() for name in ds.control_keys):
            raise ConfigError(f"config key `data.datasets[{i}].target_key`/`control_keys`: names must not be empty")
    if cfg.lora.init_from and not Path(cfg.lora.init_from).is_file():
        raise ConfigError(f"config key `lora.init_from`: {cfg.lora.init_from} is not a file; name a LoRA file")
    resume = cfg.train.resume
    if resume and resume != "latest" and not Path(resume).is_dir():
        raise ConfigError(f"config key `train.resume`: {resume} is not a folder; use `latest` or a step-* folder")
    if cfg.validation.heldout_path and not Path(cfg.validation.heldout_path).exists():
        raise ConfigError(f"config key `validation.heldout_path`: {cfg.validation.heldout_path} does not exist")
    for i, example in enumerate(cfg.validation.examples):
        for name in ("control", "target", "mask"):
            value = getattr(example, name)
            if value and not Path(value).is_file():
                raise ConfigError(f"config key `validation.examples[{i}].{name}`: {value} is not a file")


def _check_patterns(cfg: Config) -> None:
    """lora.target_regex and the rank/alpha pattern keys are regexes: they must compile."""
    patterns = [("lora.target_regex", cfg.lora.target_regex)] if cfg.lora.target_regex else []
    patterns += [(f"lora.rank_pattern[{k!r}]", k) for k in cfg.lora.rank_pattern]
    patterns += [(f"lora.alpha_pattern[{k!r}]", k) for k in cfg.lora.alpha_pattern]
    for key, pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"config key `{key}`: {pattern!r} is not a valid regex ({exc})") from None
    if any(not name.strip() for name in cfg.lora.target_modules):
        raise ConfigError("config key `lora.target_modules`: names must not be empty")


def _check_values(cfg: Config) -> None:
    """Ranges, paths and cross-field checks that a type alone cannot express."""
    _check_ranges(cfg)
    _check_patterns(cfg)
    if cfg.data.resolution % 16:
        raise ConfigError(f"config key `data.resolution`: must be a multiple of 16, got {cfg.data.resolution}")
    _check_data_values(cfg)
    if not cfg.data.datasets:
        raise ConfigError("config key `data.datasets`: list at least one dataset (each with a `path`)")
    for fmt in cfg.output.export_formats:
        if fmt not in ("diffusers", "kohya", "comfyui"):
            raise ConfigError(f"config key `output.export_formats`: {fmt!r} is not one of diffusers, kohya, comfyui")
    val = cfg.validation
    has_targets = bool(val.heldout_path or val.heldout_count or any(e.target for e in val.examples))
    if val.every and not (has_targets or val.examples):
        raise ConfigError("config key `validation.every`: list validation.examples, a heldout_path or a heldout_count")
    if val.every and val.best_metric != "none" and not has_targets:
        raise ConfigError(
            f"config key `validation.best_metric`: {val.best_metric} needs items with a target (heldout_path, "
            "heldout_count or examples with `target`); or set it to none"
        )
    if cfg.validation.use_ema and not cfg.ema.enabled:
        raise ConfigError("config key `validation.use_ema`: needs ema.enabled=true")
    if cfg.memory.base_quant == "nf4" and importlib.util.find_spec("torchao") is None:
        raise ConfigError("config key `memory.base_quant`: nf4 needs torchao (pip install 'kontext-lora[memory]')")
    if cfg.memory.block_swap < 0:
        raise ConfigError(f"config key `memory.block_swap`: must be >= 0, got {cfg.memory.block_swap}")
    _check_budget(cfg.memory.budget_gib)
    if cfg.speed.cuda_graphs and (cfg.speed.compile == "none" or cfg.train.gradient_accumulation != 1):
        raise ConfigError(
            "config key `speed.cuda_graphs`: needs speed.compile=blocks or auto and train.gradient_accumulation=1 "
            "(a graph replay reuses the memory that an accumulated gradient would still hold)"
        )
    if cfg.speed.cuda_graphs and cfg.memory.block_swap:
        raise ConfigError(CUDA_GRAPHS_WITH_SWAP)
    if cfg.memory.base_quant == "nf4" and cfg.speed.fp8_base:
        raise ConfigError(
            "config key `speed.fp8_base`: fp8 matmuls need a bf16 or fp8 base, not memory.base_quant=nf4; set one"
        )
    if cfg.speed.fp8_fast_accum_backward and not (cfg.speed.fp8_base and cfg.memory.base_quant == "fp8"):
        raise ConfigError(
            "config key `speed.fp8_fast_accum_backward`: applies to fp8 matmuls on an fp8-stored base only; set "
            "speed.fp8_base=true and memory.base_quant=fp8 too"
        )
    if cfg.memory.base_quant != "none" and (cfg.lora.adapter_type != "lora" or cfg.lora.use_dora):
        raise ConfigError(
            f"config key `memory.base_quant`: a quantized base trains a plain LoRA only, not "
            f"{'DoRA' if cfg.lora.use_dora else cfg.lora.adapter_type} (they read the base weight itself)"
        )
    _check_training_features(cfg)
    _check_paths(cfg)  # last: a value that cannot work is named before a file that is not there


def _check_budget(value: str) -> None:
    try:
        valid = value.strip() == "auto" or float(value) >= 0
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError(f"config key `memory.budget_gib`: auto, 0 or a number of GiB, got {value!r}")


def _check_training_features(cfg: Config) -> None:
    """Adapter kinds and the options or exports they cannot take."""
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"config key `optim.betas`: two values in [0, 1), got {list(cfg.optim.betas)}")
    kind = cfg.lora.adapter_type
    if kind != "lora" and (cfg.lora.use_dora or cfg.lora.use_rslora or cfg.lora.init_lora_weights != "default"):
        raise ConfigError(
            f"config key `lora.adapter_type`: {kind} has no use_dora / use_rslora / init_lora_weights; "
            "leave them at their defaults or use adapter_type=lora"
        )
    if cfg.lora.init_lora_weights == "orthogonal" and cfg.lora.rank % 2:
        raise ConfigError(
            f"config key `lora.init_lora_weights`: orthogonal needs an even lora.rank, got {cfg.lora.rank}"
        )
    if kind != "lora" and cfg.lora.dropout:
        raise ConfigError(f"config key `lora.dropout`: LoRA's input dropout; {kind} has none, leave it at 0")
    if cfg.lora.init_lora_weights in ("pissa", "olora") and (cfg.lora.use_dora or cfg.lora.init_from):
        raise ConfigError(
            f"config key `lora.init_lora_weights`: {cfg.lora.init_lora_weights} rewrites the base weights, which "
            "DoRA's magnitudes and lora.init_from assume unchanged; use default or gaussian with them"
        )
    if kind != "lora" and cfg.lora.init_from:
        raise ConfigError(f"config key `lora.init_from`: continuing from a file needs adapter_type=lora, not {kind}")
    unsupported = "LoHa/LoKr" if kind != "lora" else "DoRA" if cfg.lora.use_dora else ""
    bfl = [fmt for fmt in cfg.output.export_formats if fmt in ("kohya", "comfyui")]
    if unsupported and bfl:
        raise ConfigError(
            f"config key `output.export_formats`: {bfl[0]} cannot hold {unsupported} adapters; "
            "drop it (the diffusers-format file holds them)"
        )


def _check_data_values(cfg: Config) -> None:
    """Data keys a range cannot express (bucket multiples, control names)."""
    for i, ds in enumerate(cfg.data.datasets):
        key = f"data.datasets[{i}]"
        if ds.resolution % 16:
            raise ConfigError(f"config key `{key}.resolution`: must be 0 or a multiple of 16, got {ds.resolution}")
        if len(set(ds.control_keys)) != len(ds.control_keys) or ds.target_key in ds.control_keys:
            raise ConfigError(f"config key `{key}.control_keys`: names must be distinct and differ from target_key")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load, merge and validate a config: YAML file (with `extends:`), then dotlist `key=value` overrides.

    An override may name a list item by position, `data.datasets[0].path=x` or `data.datasets.0.path=x`, or replace
    the whole list, `data.datasets=[{path: a}, {path: b}]`.
    """
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    layers = [_read_yaml(Path(path))] if path is not None else []
    for layer in layers:
        _check_keys(layer, Config, "")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), *layers)
        for override in overrides:
            _apply_override(merged, override)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe_omegaconf_error(exc)) from None
    _check_choices(cfg)
    _check_values(cfg)
    return cfg


def _apply_override(merged: DictConfig, override: str) -> None:
    """Set one `key=value` on the merged config, in place (OmegaConf's dotlist: the value is read as YAML).

    Applied to the merged config rather than merged in as a layer of its own: `OmegaConf.from_dotlist` builds dicts
    only, so the `0` of `datasets.0.path` became a dict key that cannot merge into the list. The walk here checks
    each key on the way against the schema first, for one-line errors (a near miss, an index past a list's end).
    """
    key, _, text = override.partition("=")
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]  # type: ignore[index]
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}{_yaml_problem(exc, with_line=False)}") from None
    parts = re.findall(r"[^.\[\]]+", key)
    if not parts:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    node: Any = merged
    prefix = ""
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, ListConfig):
            index = _list_index(node, part, prefix, override)
            if last and isinstance(value, dict) and dataclasses.is_dataclass(OmegaConf.get_type(node[index])):
                _check_keys(OmegaConf.create(value), OmegaConf.get_type(node[index]), f"{prefix}[{index}]")
            node, prefix = node[index], f"{prefix}[{index}]"
            continue
        if not isinstance(node, DictConfig):
            raise ConfigError(f"override {override!r}: `{prefix}` is a single value, not a section or a list")
        kind = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(kind):  # a schema section: the key (and keys inside the value) must be declared
            _check_keys(OmegaConf.create({part: value if last else None}), kind, prefix)
        elif not last and part not in node:
            raise ConfigError(f"override {override!r}: `{prefix}` has no key `{part}`")
        if not last:
            node, prefix = node._get_node(part), f"{prefix}.{part}" if prefix else part
    merged.merge_with_dotlist([f"{'.'.join(parts)}={text}"])


def _list_index(items: ListConfig, part: str, prefix: str, override: str) -> int:
    """The position `part` names in the list at `prefix`; an index past the end is refused (as Hydra does)."""
    if not part.isdigit():
        raise ConfigError(f"override {override!r}: `{prefix}` is a list; name an item by position, e.g. {prefix}[0]")
    index = int(part)
    if index >= len(items):
        raise ConfigError(
            f"override {override!r}: `{prefix}` has {len(items)} item(s), so [{index}] is past its end; add items in "
            f"the YAML file, or set the whole list: {prefix}=[{{...}}, {{...}}]"
        )
    return index


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("\n")[0].split())


def _describe_omegaconf_error(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or "?"
    msg = _one_line(exc)
    if isinstance(exc, MissingMandatoryValue):  # its message says "missing mandatory value" (lower case)
        return f"config key `{key}` is required but not set"
    value = getattr(exc, "value", None)
    # ref_type is the dataclass holding the key, not the key's own type: look the declared type up there.
    parent = getattr(exc, "ref_type", None) or getattr(exc, "object_type", None)
    hints = typing.get_type_hints(parent) if dataclasses.is_dataclass(parent) else {}
    declared = hints.get(str(getattr(exc, "key", "")))
    if value is not None:
        kind = f"a valid {declared.__name__}" if isinstance(declared, type) else "of the declared type"
        return f"config key `{key}`: value {value!r} ({type(value).__name__}) is not {kind} ({msg})"
    return f"config key `{key}`: {msg}" if parent else f"config error at `{key}`: {msg}"


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what gets written to the run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_flat_dict(tree: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """`to_dict`'s tree as {"train.lr": 0.0001, ...}, every value a scalar (tensorboard's hparams take no other);
    a list or None becomes its str()."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(to_flat_dict(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def describe_keys(schema: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) of every declared key, for the docs and `kontext-lora keys`."""
    rows = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        full = f"{prefix}.{f.name}" if prefix else f.name
        kind = hints[f.name]
        item_type = (typing.get_args(kind) or [None])[0]
        if dataclasses.is_dataclass(kind):
            rows.extend(describe_keys(kind, full))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        doc = f.metadata.get("doc", "")
        if f.metadata.get("choices"):
            doc += f" One of: {', '.join(f.metadata['choices'])}."
        rows.append((full, getattr(kind, "__name__", str(kind)), default, doc))
        if dataclasses.is_dataclass(item_type):
            rows.extend(describe_keys(item_type, f"{full}[]"))
    return rows
