"""Memory / speed planner: predict a config's peak accelerator memory and s/step, and pick the cheapest knobs that fit.

`predict(cfg)` adds up, in bytes:
- resident frozen weights by storage (model.dtype, fp8 / nf4 with their scales), minus the blocks whose weights are
  swapped to pinned CPU memory, plus the swap's on-device buffers (two blocks);
- the adapter: fp32 LoRA params + fp32 grads + optimizer states (by optimizer type);
- activations: tokens x hidden x (bytes per token-block-hidden unit) summed over the blocks, by how each block
  keeps them for backward (checkpointed: its input only; compiled with an activation budget; eager), plus one
  block's activations recomputed in backward when any block is checkpointed;
- a fixed overhead (CUDA context, allocator, loss and embeddings).

and s/step = a per-step overhead + model FLOPs x seconds per TFLOP (compiled or eager) x (1 + recompute) + the
base weights' dequantization + the swap transfer that prefetching cannot hide.

fp8 matmuls (`speed.fp8_base` on an fp8-stored base) are a mode of their own, offered on GPUs with fp8 tensor cores
and only as they were measured (docs/performance.md): compiled, no block checkpointing or swap, the attention never
recomputed (`speed.keep_attention`) and CUDA graphs (`speed.cuda_graphs`, so single-process runs without gradient
accumulation). Their activations per activation budget and their seconds per TFLOP have constants of their own.

Parameter counts come from the model itself: `<model.pretrained>/transformer/config.json` (or FLUX.1's shape when
that folder is absent) is built on the meta device with diffusers and the LoRA injected by PEFT, so every adapter
kind / rank pattern is counted as training will see it. The fitted constants live in one file,
`planner_calibration.json` beside this module, with the measurements they were fitted to; refit it from
scripts/bench_memory.py's output with `python -m kontext_lora.planner --fit docs/bench/memory-*.json`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from kontext_lora.config import Config, ConfigError, load_config

GIB = 2**30
CALIBRATION_PATH = Path(__file__).with_name("planner_calibration.json")

# FLUX.1-Kontext-dev's transformer (used when model.pretrained has no transformer/config.json).
FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANT_LEVELS = ("none", "fp8", "nf4")  # in order of preference: the less the base is quantized, the closer the loss
# choose()'s order of preference: fp8 matmuls round activations and gradients too, so they rank after fp8 storage.
PRECISION_LEVELS = (("none", False), ("fp8", False), ("fp8", True), ("nf4", False))
FP8MM_FIXED_TOKENS = 4096  # the scale of the fp8-matmul activations' part that does not grow with the image
FP8_MATMUL_BUDGETS = (1.0, 0.6, 0.5, 0.45)  # as measured; on a tie in s/step the first (least recompute) wins
# Optimizer state bytes per trainable element (adafactor: factored second moment, counted per tensor below).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adafactor": 0}
# A plan keeps its predicted peak this fraction under the budget: the caching allocator's fragmentation counts against
# a per-process memory cap, and the prediction is within a few percent on the calibration points.
PLAN_HEADROOM = 0.05
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # torchao NF4Tensor's defaults: int8 block scales, one fp32 per 256 of them


# --------------------------------------------------------------------------------------------- counting the model


@dataclass(frozen=True)
class BlockCount:
    """The frozen elements of one repeated block: its quantizable linear weights (out, in) and everything else."""

    linears: tuple[tuple[int, int], ...]  # applied to every image token (every token in a single block)
    context_linears: tuple[tuple[int, int], ...]  # a double block's text stream (add_*_proj, to_add_out, ff_context)
    modulation: tuple[tuple[int, int], ...]  # the adaLN linears (norm*.linear), applied once per sample
    other: int  # biases, norms and linears too small / oddly shaped to quantize


@dataclass(frozen=True)
class ModelCount:
    hidden: int  # heads x head_dim (3072 in FLUX.1)
    blocks: tuple[BlockCount, ...]  # execution order: double blocks, then single blocks
    outside: int  # frozen elements outside the blocks (embedders, final norm and projection)
    lora_elements: int  # trainable adapter elements
    lora_factored: int  # adafactor's state elements (rows + cols of each 2-D adapter tensor, all of a 1-D one)


def transformer_config(cfg: Config) -> dict:
    """The transformer's shape: <model.pretrained>/transformer/config.json when present, the tiny model's when
    training will build it there (model.build_tiny_if_missing), else FLUX.1's."""
    folder = Path(cfg.model.pretrained)
    path = folder / "transformer" / "config.json"
    if not folder.exists() and cfg.model.build_tiny_if_missing:  # training will build the tiny model there
        from kontext_lora.model.tiny import TINY_TRANSFORMER

        return dict(TINY_TRANSFORMER)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        return {k: v for k, v in data.items() if not k.startswith("_")}
    return dict(FLUX_TRANSFORMER)


def count_model(cfg: Config, shape: dict | None = None) -> ModelCount:
    """Count the frozen and adapter elements of `cfg`'s transformer with its LoRA (meta device: no memory, ~1 s)."""
    shape = shape if shape is not None else transformer_config(cfg)
    # PiSSA / OLoRA (an SVD / QR of meta weights is impossible) give the default init's shapes; init_from is loaded
    # into the injected adapter later.
    lora_cfg = dataclasses.replace(cfg.lora, init_from="")
    if lora_cfg.init_lora_weights in ("pissa", "olora"):
        lora_cfg.init_lora_weights = "default"
    lora = json.dumps(dataclasses.asdict(lora_cfg), sort_keys=True)
    return _count(json.dumps(shape, sort_keys=True), lora)


def quantizable(module, name: str) -> bool:
    """Whether memory.base_quant stores this module's weight quantized: every nn.Linear inside the repeated blocks
    (the base layers under the LoRA and the frozen modulation linears) whose input width is a multiple of 64."""
    import torch

    return isinstance(module, torch.nn.Linear) and "lora_" not in name and module.in_features % NF4_BLOCK == 0


@functools.lru_cache(maxsize=8)
def _count(shape_json: str, lora_json: str) -> ModelCount:
    import torch
    from diffusers import FluxTransformer2DModel

    from kontext_lora.config import LoraConfig
    from kontext_lora.model.lora import inject_lora

    shape = json.loads(shape_json)
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(shape)
    inject_lora(model, LoraConfig(**json.loads(lora_json)))
    blocks = []
    in_blocks: set[int] = set()
    for block in list(model.transformer_blocks) + list(model.single_transformer_blocks):
        linears, context, modulation, other = [], [], [], 0
        quantized = set()
        for name, module in block.named_modules():
            if quantizable(module, name) and not module.weight.requires_grad:
                text_stream = any(key in name for key in ("add_", "ff_context"))
                kind = modulation if name.startswith("norm") else context if text_stream else linears
                kind.append(tuple(module.weight.shape))
                quantized.add(id(module.weight))
        for param in block.parameters():
            in_blocks.add(id(param))
            if not param.requires_grad and id(param) not in quantized:
                other += param.numel()
        blocks.append(BlockCount(tuple(linears), tuple(context), tuple(modulation), other))
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    outside = sum(p.numel() for p in frozen if id(p) not in in_blocks)
    trainable = [p for p in model.parameters() if p.requires_grad]
    factored = sum(sum(p.shape) if p.dim() == 2 else p.numel() for p in trainable)
    return ModelCount(
        hidden=shape["num_attention_heads"] * shape["attention_head_dim"],
        blocks=tuple(blocks),
        outside=outside,
        lora_elements=sum(p.numel() for p in trainable),
        lora_factored=factored,
    )


def tokens_per_sample(cfg: Config) -> tuple[int, int, int]:
    """(target, control, text) tokens of the largest sample: (res/16)^2 per image at the largest resolution of the
    datasets (data.resolution, or a dataset's own), a control per control key (each the target's size), and
    model.max_sequence_length text tokens."""
    datasets = cfg.data.datasets
    resolution = max([ds.resolution or cfg.data.resolution for ds in datasets] or [cfg.data.resolution])
    image = (resolution // 16) ** 2
    controls = max([len(ds.control_keys) for ds in datasets] or [1])
    return image, image * controls, cfg.model.max_sequence_length


def step_tflops(count: ModelCount, image_tokens: int, text_tokens: int, batch: int) -> float:
    """Model TFLOPs of one step (forward + input-gradient backward of the frozen base; recompute not counted).

    Linear FLOPs are 2 x frozen linear elements per token of the stream they act on, forward and again backward (no
    weight gradients); attention QK^T and PV are 4 N^2 d per block forward and twice that backward (as
    scripts/bench_step.py's `step_flops`, which this matches on FLUX.1).
    """
    tokens = image_tokens + text_tokens
    linear = 0
    for block in count.blocks:
        image = sum(out * inp for out, inp in block.linears)
        text = sum(out * inp for out, inp in block.context_linears)
        linear += image * (tokens if not text else image_tokens) + text * text_tokens
    forward = 2 * linear + 4 * tokens * tokens * count.hidden * len(count.blocks)
    backward = 2 * linear + 8 * tokens * tokens * count.hidden * len(count.blocks)
    return batch * (forward + backward) / 1e12


# --------------------------------------------------------------------------------------------- the prediction


@dataclass
class Knobs:
    """The settings the planner chooses (each maps to one config key)."""

    base_quant: str = "none"
    block_swap: int = 0
    gradient_checkpointing: bool = False
    checkpoint_fraction: float = 1.0
    compile: str = "none"
    activation_budget: float = 1.0
    fp8_matmuls: bool = False  # with base_quant fp8: speed.fp8_base, keep_attention (budget < 1) and cuda_graphs

    @classmethod
    def of(cls, cfg: Config) -> Knobs:
        fp8_mm = cfg.speed.fp8_base and cfg.memory.base_quant == "fp8"
        return cls(cfg.memory.base_quant, cfg.memory.block_swap, cfg.train.gradient_checkpointing,
                   cfg.speed.checkpoint_fraction, cfg.speed.compile, cfg.speed.activation_budget, fp8_mm)  # fmt: skip

    def overrides(self) -> list[str]:
        """The knobs as `key=value` config overrides (what `apply` sets)."""
        keys = [f"memory.base_quant={self.base_quant}", f"memory.block_swap={self.block_swap}",
                f"train.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
                f"speed.checkpoint_fraction={self.checkpoint_fraction}", f"speed.compile={self.compile}",
                f"speed.activation_budget={self.activation_budget}"]  # fmt: skip
        if self.fp8_matmuls:
            keys += ["speed.fp8_base=true", "speed.cuda_graphs=true"]
            keys += ["speed.keep_attention=true"] if self.activation_budget < 1 else []
        elif self.base_quant == "fp8":  # speed.fp8_base on an fp8-stored base would mean fp8 matmuls
            keys += ["speed.fp8_base=false", "speed.fp8_fast_accum_backward=false"]
        return keys

    def label(self) -> str:
        ckpt = f"ckpt {self.checkpoint_fraction:g}" if self.gradient_checkpointing else "no ckpt"
        compiled = f"compiled (budget {self.activation_budget:g})" if self.compile != "none" else "eager"
        return f"{self.quant_label}, swap {self.block_swap}, {ckpt}, {compiled}"

    @property
    def quant_label(self) -> str:
        return f"{self.base_quant} + fp8 matmuls" if self.fp8_matmuls else self.base_quant

    def apply(self, cfg: Config) -> Config:
        cfg = copy.deepcopy(cfg)
        cfg.memory.base_quant, cfg.memory.block_swap = self.base_quant, self.block_swap
        cfg.train.gradient_checkpointing, cfg.speed.checkpoint_fraction = (
            self.gradient_checkpointing,
            self.checkpoint_fraction,
        )
        cfg.speed.compile, cfg.speed.activation_budget = self.compile, self.activation_budget
        if self.fp8_matmuls:
            cfg.speed.fp8_base = cfg.speed.cuda_graphs = True
            cfg.speed.keep_attention = cfg.speed.keep_attention or self.activation_budget < 1
        elif self.base_quant == "fp8":
            cfg.speed.fp8_base = cfg.speed.fp8_fast_accum_backward = False
        return cfg


@dataclass
class Prediction:
    knobs: Knobs
    peak_gib: float
    s_per_step: float
    memory_gib: dict[str, float] = field(default_factory=dict)  # the peak's components
    time_s: dict[str, float] = field(default_factory=dict)  # the step time's components

    def fits(self, budget_gib: float) -> bool:
        """Predicted peak within the budget less PLAN_HEADROOM (allocator fragmentation, prediction error)."""
        return self.peak_gib <= budget_gib * (1 - PLAN_HEADROOM)


@functools.lru_cache(maxsize=4)
def _read_calibration(path: str) -> str:
    return Path(path).read_text()


def load_calibration(path: Path = CALIBRATION_PATH) -> dict:
    """The fitted constants (and the points they were fitted to) from planner_calibration.json."""
    return json.loads(_read_calibration(str(path)))


def spread_blocks(count: int, fraction: float) -> set[int]:
    """Indices of `fraction` of `count` blocks spread evenly: kontext_lora.model.speed.checkpointed_blocks' rule."""
    chosen = min(count, math.ceil(fraction * count - 1e-9))
    return {int(i * count / chosen) for i in range(chosen)} if chosen else set()


def swapped_blocks(count: int, swap: int) -> set[int]:
    """Indices of the swapped blocks, spread over the depth as kontext_lora.model.swap chooses them."""
    from kontext_lora.model.swap import swapped_block_indices

    return set(swapped_block_indices(swap, count))


def _interp(keys: list[str], x: float) -> list[tuple[str, float]]:
    """Linear interpolation weights over points named by numbers-as-strings: [(key, weight), ...]."""
    keys = sorted(keys, key=float)
    x = min(max(x, float(keys[0])), float(keys[-1]))
    for lo, hi in zip(keys, keys[1:], strict=False):
        if float(lo) <= x <= float(hi):
            w = (x - float(lo)) / (float(hi) - float(lo))
            return [(lo, 1 - w), (hi, w)]
    return [(keys[0], 1.0)]


def weight_bytes(count: ModelCount, quant: str, dtype_bytes: int) -> tuple[list[int], int]:
    """(bytes of each block, bytes outside the blocks) as stored: linears in `quant`, the rest in model.dtype."""
    per_block = []
    for block in count.blocks:
        linear = 0
        for out, inp in block.linears + block.context_linears + block.modulation:
            n = out * inp
            if quant == "fp8":  # e4m3 weights + one fp32 scale per output channel
                linear += n + 4 * out
            elif quant == "nf4":  # 4-bit codes + int8 block scales + one fp32 per NF4_SCALER_BLOCK scales
                blocks = n // NF4_BLOCK
                linear += n // 2 + blocks + 4 * math.ceil(blocks / NF4_SCALER_BLOCK)
            else:
                linear += n * dtype_bytes
        per_block.append(linear + block.other * dtype_bytes)
    return per_block, count.outside * dtype_bytes


def features(
    cfg: Config, count: ModelCount | None = None, calib: dict | None = None, knobs: Knobs | None = None
) -> tuple[dict[str, float], dict[str, float], dict]:
    """The linear features of peak memory and of step time: prediction = sum(feature * constant).

    Returns (memory features, time features, known terms in bytes that need no fitting, and the swap's).
    """
    calib = calib or load_calibration()
    count = count or count_model(cfg)
    knobs = knobs or Knobs.of(cfg)
    n = len(count.blocks)
    target, control, text = tokens_per_sample(cfg)
    tokens = target + control + text
    batch = cfg.train.batch_size
    compiled = knobs.compile != "none"  # the planner predicts a CUDA run, where `auto` compiles
    fp8mm = compiled and knobs.fp8_matmuls  # measured compiled only; eager fp8 matmuls are predicted as fp8 storage
    swapped = swapped_blocks(n, knobs.block_swap)
    ckpt = (spread_blocks(n, knobs.checkpoint_fraction) if knobs.gradient_checkpointing else set()) | swapped
    live = n - len(ckpt)
    unit = batch * tokens * count.hidden  # token x hidden units of one block's activations

    mem: dict[str, float] = {"overhead": 1.0, "ckpt_input": unit * len(ckpt)}
    mode_blocks = live + (1 if ckpt else 0)  # + the one block recomputed in backward
    if fp8mm:
        # Under a budget < 1 the partitioner kept relatively more of a 512^2 block than of a 1024^2 one (23.0 against
        # 39.0 GiB at 0.45 on an H200): a part per block that does not shrink with the image, FP8MM_FIXED_TOKENS
        # tokens' worth, fitted beside the part per token.
        for key, w in _interp(calib["memory"]["fp8mm_budget_points"], knobs.activation_budget):
            mem[f"live_fp8mm:{key}"] = w * unit * mode_blocks
            mem[f"fixed_fp8mm:{key}"] = w * batch * FP8MM_FIXED_TOKENS * count.hidden * mode_blocks
    elif compiled:
        for key, w in _interp(calib["memory"]["budget_points"], knobs.activation_budget):
            mem[f"live_compiled:{key}"] = w * unit * mode_blocks
    else:
        mem["live_eager"] = unit * mode_blocks

    known: dict = {}
    per_block, outside = weight_bytes(count, knobs.base_quant, DTYPE_BYTES[cfg.model.dtype])
    known["weights"] = outside + sum(b for i, b in enumerate(per_block) if i not in swapped)
    # Swapped weights come onto the device one block ahead of use: at most two swapped blocks there at a time.
    known["swap_buffers"] = min(2, len(swapped)) * max((per_block[i] for i in swapped), default=0)
    optimizer = cfg.optim.optimizer
    states = (
        count.lora_factored * 4 if optimizer == "adafactor" else count.lora_elements * OPTIMIZER_STATE_BYTES[optimizer]
    )
    known["lora"] = count.lora_elements * 8  # fp32 params + fp32 grads
    if cfg.lora.init_lora_weights in ("pissa", "olora"):  # the initial adapter is kept to save a plain LoRA
        known["lora"] += count.lora_elements * 4
    known["optimizer"] = states

    flops = step_tflops(count, target + control, text, batch)
    mode = "fp8mm" if fp8mm else "compiled" if compiled else "eager"
    tim: dict[str, float] = {f"overhead_{mode}": 1.0, f"tflop_{mode}": flops, "recompute": flops * len(ckpt) / n}
    if compiled and not fp8mm:  # with the attention kept, fp8 matmuls measured flat over budgets 0.45-1.0
        for key, w in _interp(calib["memory"]["budget_points"], knobs.activation_budget):
            tim[f"budget_cost:{key}"] = w * flops * live / n
    quantized = sum(
        out * inp for block in count.blocks for out, inp in block.linears + block.context_linears + block.modulation
    )
    if knobs.base_quant != "none" and not fp8mm:  # dequantized in forward, in the recompute and in backward
        passes = 2 + len(ckpt) / n
        tim[f"dequant_{knobs.base_quant}"] = quantized * passes / 1e9
    # Swap: each swapped block's weights cross twice a step (forward, backward); prefetching hides a transfer behind
    # the compute since the previous swapped block, so only what exceeds that shows, plus a fixed cost per transfer
    # (stream syncs, copy launches: the fitted constant swap_transfer).
    gbps = calib["swap_h2d_gbps"]["value"]
    known["swap_transfer_bytes"] = sum(per_block[i] for i in swapped)
    known["swap_gbps"] = gbps
    if swapped:
        tim["swap_transfer"] = 2.0 * len(swapped)
    return mem, tim, known


def predict(
    cfg: Config, count: ModelCount | None = None, calib: dict | None = None, knobs: Knobs | None = None
) -> Prediction:
    """Predicted peak accelerator memory (GiB) and s/step of `cfg` (with `knobs` instead of its own, if given) on the
    calibrated card, with their components."""
    calib = calib or load_calibration()
    count = count or count_model(cfg)
    knobs = knobs or Knobs.of(cfg)
    mem, tim, known = features(cfg, count, calib, knobs)
    constants = {**calib["memory"]["constants"], **calib["time"]["constants"]}
    memory = {"weights": known["weights"], "swap_buffers": known["swap_buffers"], "lora+grads": known["lora"],
              "optimizer": known["optimizer"]}  # fmt: skip
    memory["overhead"] = mem["overhead"] * constants["overhead"]
    memory["activations"] = sum(v * constants.get(k, 0.0) for k, v in mem.items() if k != "overhead")
    time = {k: v * constants.get(k, 0.0) for k, v in tim.items()}  # budget_cost:1.0 is 0 by definition
    compute = sum(v for k, v in time.items() if k != "swap_transfer")
    n = len(count.blocks)
    swapped = len(swapped_blocks(n, knobs.block_swap))
    if swapped:
        per_block_transfer = known["swap_transfer_bytes"] / swapped / (known["swap_gbps"] * 1e9)
        # A copy travels while the resident blocks up to the next swapped one compute (n / swapped of them).
        exposed = max(0.0, per_block_transfer - compute / swapped / 2)
        time["swap"] = 2 * swapped * exposed
    return Prediction(
        knobs=knobs,
        peak_gib=sum(memory.values()) / GIB,
        s_per_step=sum(time.values()),
        memory_gib={k: v / GIB for k, v in memory.items()},
        time_s=time,
    )


# --------------------------------------------------------------------------------------------- planning


def candidate_knobs(cfg: Config, blocks: int, fp8_matmuls: bool = False) -> list[Knobs]:
    """Every knob set the planner considers (block swap is chosen per set: the fewest blocks that fit). fp8_matmuls:
    add the fp8-matmul sets, as measured (compiled, no checkpointing, FP8_MATMUL_BUDGETS), where CUDA graphs can
    run (train.gradient_accumulation 1)."""
    compile_on = cfg.speed.compile if cfg.speed.compile != "none" else None  # an explicit `none` is respected
    kinds: list[tuple[str, float]] = [("none", 1.0)]
    if compile_on:
        kinds += [(compile_on, budget) for budget in (1.0, 0.5, 0.3)]
    checkpointing = [(False, 1.0)] + [(True, f) for f in (0.25, 0.5, 0.75, 1.0)]
    knobs = [
        Knobs(quant, 0, ckpt, fraction, compiled, budget)
        for quant in QUANT_LEVELS
        for compiled, budget in kinds
        for ckpt, fraction in checkpointing
    ]
    if fp8_matmuls and compile_on and cfg.train.gradient_accumulation == 1:
        knobs += [Knobs("fp8", 0, False, 1.0, compile_on, budget, True) for budget in FP8_MATMUL_BUDGETS]
    return knobs


def fp8_matmuls_available() -> bool:
    """Whether this machine's GPU has the fp8 tensor cores that speed.fp8_base needs (apply_speed's threshold)."""
    import torch

    from kontext_lora.model.speed import FP8_MIN_CAPABILITY

    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= FP8_MIN_CAPABILITY


def candidates(
    cfg: Config,
    budget_gib: float,
    count: ModelCount | None = None,
    swap: bool = True,
    fp8_matmuls: bool = False,
) -> list[Prediction]:
    """A prediction per candidate knob set, each with the fewest swapped blocks that fit `budget_gib` (or all;
    none when `swap` is false, nor for fp8 matmuls, which were never run with a swap). fp8_matmuls: consider them
    (a GPU with fp8 tensor cores, a single process: CUDA graphs)."""
    count, calib = count or count_model(cfg), load_calibration()
    n = len(count.blocks)
    out = []
    for knobs in candidate_knobs(cfg, n, fp8_matmuls):
        # The fewest swapped blocks that fit (a scan: swapping the first double block can cost more than it frees).
        for swapped in range(n + 1 if swap and not knobs.fp8_matmuls else 1):
            pred = predict(cfg, count, calib, dataclasses.replace(knobs, block_swap=swapped))
            if pred.fits(budget_gib):
                break
        out.append(pred)
    return sorted(out, key=lambda p: (not p.fits(budget_gib), p.s_per_step))


def choose(
    preds: list[Prediction],
    budget_gib: float,
    exact_within: float = 1.25,
    budget_name: str = "config key `memory.budget_gib`",
) -> Prediction:
    """The fastest fitting candidate, unless a less-quantized one fits within `exact_within` x its s/step (a
    quantized base changes the loss, so its speed must be worth it). `budget_name` is what an error calls the budget
    (`kontext-lora plan` takes it as --vram)."""
    fitting = [p for p in preds if p.fits(budget_gib)]
    if not fitting:
        least = min(preds, key=lambda p: p.peak_gib)
        raise ConfigError(
            f"{budget_name}: nothing fits {budget_gib:g} GiB; the smallest candidate "
            f"({least.knobs.label()}) needs {least.peak_gib:.3g} GiB; lower data.resolution / train.batch_size / "
            "lora.rank or raise the budget"
        )
    fastest = min(fitting, key=lambda p: p.s_per_step)
    for quant, fp8_matmuls in PRECISION_LEVELS:
        same = [
            p
            for p in fitting
            if (p.knobs.base_quant, p.knobs.fp8_matmuls) == (quant, fp8_matmuls)
            and p.s_per_step <= exact_within * fastest.s_per_step
        ]
        if same:
            return min(same, key=lambda p: p.s_per_step)
    return fastest


def plan(
    cfg: Config, budget_gib: float, count: ModelCount | None = None, swap: bool = True, fp8_matmuls: bool = False
) -> tuple[Config, Prediction]:
    """The cheapest knob set that fits `budget_gib`: (cfg with it applied, its prediction); ConfigError if none fits.
    `swap=False` leaves block swap out of the candidates; `fp8_matmuls` adds those sets (see `candidates`)."""
    chosen = choose(candidates(cfg, budget_gib, count, swap, fp8_matmuls), budget_gib)
    return chosen.knobs.apply(cfg), chosen


def apply_budget(cfg: Config, log=print) -> Config:
    """memory.budget_gib > 0: `cfg` with the planned knobs (printed when they change anything); else `cfg`."""
    if cfg.memory.budget_gib <= 0:
        return cfg
    # Block swap refuses several processes (DDP broadcasts every weight, swapped ones too): plan without it there;
    # nor fp8 matmuls, measured on one GPU only (with CUDA graphs).
    single_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    fp8_matmuls = single_process and fp8_matmuls_available()
    planned, pred = plan(cfg, cfg.memory.budget_gib, swap=single_process, fp8_matmuls=fp8_matmuls)
    if Knobs.of(planned) != Knobs.of(cfg):
        log(f"[kontext-lora] memory plan for {cfg.memory.budget_gib:g} GiB: {pred.knobs.label()} -> predicted "
            f"{pred.peak_gib:.1f} GiB, {pred.s_per_step:.2f} s/step ({' '.join(pred.knobs.overrides())})")  # fmt: skip
    return planned


def plan_table(preds: list[Prediction], budget_gib: float, limit: int = 20, chosen: Prediction | None = None) -> str:
    """A markdown table of the candidates (the first `limit`, and `chosen` marked wherever it is): knobs, predicted
    peak and s/step, whether each fits."""
    lines = ["| quant | swap | checkpointing | compile | peak GiB | s/step | fits |", "|---|---|---|---|---|---|---|"]
    shown = preds[:limit] + ([chosen] if chosen is not None and chosen not in preds[:limit] else [])
    for p in shown:
        k = p.knobs
        ckpt = f"{k.checkpoint_fraction:g}" if k.gradient_checkpointing else "off"
        compiled = f"{k.compile} (budget {k.activation_budget:g})" if k.compile != "none" else "none"
        fits = ("yes" if p.fits(budget_gib) else "no") + (" (chosen)" if p is chosen else "")
        lines.append(f"| {k.quant_label} | {k.block_swap} | {ckpt} | {compiled} | {p.peak_gib:.1f} | "
                     f"{p.s_per_step:.3f} | {fits} |")  # fmt: skip
    if len(preds) > len(shown):
        lines.append(f"({len(preds) - len(shown)} more candidates not shown: --show N)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- calibration


# The config every calibration point starts from: rank 16 on the 13 attention+MLP kinds, batch 1, bf16 base.
POINT_BASE = ["model.pretrained=unused", "data.datasets=[{path: unused}]", "lora.rank=16", "lora.alpha=16",
              "train.mixed_precision=bf16"]  # fmt: skip


def point_config(point: dict) -> Config:
    return load_config(None, [*POINT_BASE, *point["overrides"]])


def fit(points: list[dict], calib: dict, ridge: float = 1e-3) -> dict:
    """Refit the memory and time constants to measured points (least squares on relative error, ridge towards the
    current constants so a constant no point informs stays where it was); returns the new calibration."""
    import numpy as np

    calib = copy.deepcopy(calib)
    rows_mem, rows_time = [], []
    for point in points:
        cfg = point_config(point)
        mem, tim, known = features(cfg, None, calib)
        pred = predict(cfg, None, calib)
        if point.get("peak_gib"):
            fixed = known["weights"] + known["swap_buffers"] + known["lora"] + known["optimizer"]
            rows_mem.append((mem, point["peak_gib"] * GIB - fixed, point["peak_gib"] * GIB))
        if point.get("s_per_step"):
            rows_time.append((tim, point["s_per_step"] - pred.time_s.get("swap", 0.0), point["s_per_step"]))
    for section, rows in (("memory", rows_mem), ("time", rows_time)):
        constants = calib[section]["constants"]
        names = sorted(constants)
        prior = np.array([constants[k] for k in names], dtype=float)
        if not rows:
            continue
        # Unknowns u = constant / prior (1 = unchanged); rows scaled by the measured total (relative error).
        a = np.array([[f.get(k, 0.0) * prior[j] / total for j, k in enumerate(names)] for f, _, total in rows])
        b = np.array([y / total for _, y, total in rows])
        u = np.linalg.solve(a.T @ a + ridge * np.eye(len(names)), a.T @ b + ridge * np.ones(len(names)))
        calib[section]["constants"] = {k: float(max(u[j], 0.05) * prior[j]) for j, k in enumerate(names)}
    return calib


def accuracy_rows(
    points: list[dict], calib: dict | None = None
) -> list[tuple[str, str, float | None, float, float | None, float]]:
    """(name, card, measured peak, predicted peak, measured s/step, predicted s/step) of each point."""
    rows = []
    for point in points:
        pred = predict(point_config(point), None, calib)
        rows.append((point["name"], point.get("card", "?"), point.get("peak_gib"), pred.peak_gib,
                     point.get("s_per_step"), pred.s_per_step))  # fmt: skip
    return rows


def print_accuracy(points: list[dict], calib: dict | None = None) -> None:
    print("| point | card | peak GiB | predicted | error | s/step | predicted | error |")
    print("|---|---|---|---|---|---|---|---|")
    for name, card, peak, ppeak, sps, psps in accuracy_rows(points, calib):
        pe = f"{(ppeak - peak) / peak:+.1%}" if peak else ""
        te = f"{(psps - sps) / sps:+.1%}" if sps else ""
        print(f"| {name} | {card} | {peak or ''} | {ppeak:.1f} | {pe} | {sps or ''} | {psps:.3f} | {te} |")


def points_from_bench(paths: list[str]) -> list[dict]:
    """Calibration points from scripts/bench_memory.py JSON files (rows that ran: peak and s/step measured)."""
    points = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for row in data["rows"]:
            if row.get("status") == "ok" and not row.get("tiny"):
                points.append({"name": f"{row['name']}@{os.path.basename(path)}", "card": data.get("card", "?"),
                               "overrides": row["overrides"], "peak_gib": row["peak_gib"],
                               "s_per_step": row["s_per_step"], "source": path})  # fmt: skip
        if data.get("h2d_gbps"):
            calib_note = f"measured by {path} on {data.get('card')}"
            points.append({"name": "h2d", "h2d_gbps": data["h2d_gbps"], "source": calib_note})
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Show the planner's accuracy on its calibration points, or refit.")
    parser.add_argument("--fit", nargs="*", metavar="JSON", help="refit on the points plus these bench_memory outputs")
    parser.add_argument("--write", action="store_true", help=f"write the refitted constants to {CALIBRATION_PATH.name}")
    args = parser.parse_args(argv)
    calib = load_calibration()
    points = list(calib["points"])
    print("calibration points, current constants:")
    print_accuracy(points, calib)
    if args.fit is None:
        return 0
    new = points_from_bench(args.fit)
    for point in new:
        if "h2d_gbps" in point:
            calib["swap_h2d_gbps"] = {"value": point["h2d_gbps"], "source": point["source"]}
    names = {p["name"] for p in new}
    points = [p for p in points if p["name"] not in names] + [p for p in new if "overrides" in p]
    calib = fit(points, calib)
    calib["points"] = points
    print(f"\nrefitted on {len(points)} points:")
    print_accuracy(points, calib)
    print(json.dumps({s: calib[s]["constants"] for s in ("memory", "time")}, indent=1))
    if args.write:
        from kontext_lora.atomic import atomic_path

        with atomic_path(CALIBRATION_PATH) as tmp:
            tmp.write_text(json.dumps(calib, indent=1) + "\n")
        print(f"written to {CALIBRATION_PATH}")
    else:
        print("(not written: add --write)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
