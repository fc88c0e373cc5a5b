"""Per-phase peak memory and s/step of a config with a knob set.

A training job runs three phases on the device, one after another: `cache` (text encoders and VAE fill the disk
cache), `train` (the steps) and `validation` (sampling with the training transformer, when validation.every is set).
`kontext-lora infer` is a fourth, in a process of its own. Each phase's peak is counted bytes (weights as stored,
adapter, optimizer states) plus activations sized from the tokens and pixels of the buckets actually used, with
constants from planner_calibration.json: the train step's (section `memory` / `time`, fitted to step benchmarks) and
the other phases' (section `job`, fitted to whole-job benchmarks). The job's peak is the largest phase's.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from kontext_lora.config import Config
from kontext_lora.planner.count import (
    DTYPE_BYTES,
    GIB,
    EncoderCount,
    ModelCount,
    count_encoders,
    count_model,
    step_tflops,
    weight_bytes,
)

CALIBRATION_PATH = Path(__file__).resolve().parent.parent / "planner_calibration.json"
FP8MM_FIXED_TOKENS = 4096  # the scale of the fp8-matmul activations' part that does not grow with the image
# Optimizer state bytes per trainable element (adafactor: factored second moment, counted per tensor below).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adafactor": 0}
# A plan keeps its predicted peak this fraction under the budget: the caching allocator's fragmentation counts against
# a per-process memory cap, and the prediction is within a few percent on the calibration points.
PLAN_HEADROOM = 0.05
VALIDATION_LOSS_CHUNK = 8  # held-out items per no-grad forward (train/validation.py's heldout_loss chunk)
JOB_PHASES = ("cache", "train", "validation")  # what `kontext-lora train` runs, in order


# --------------------------------------------------------------------------------------------- the knobs


@dataclass
class Knobs:
    """The settings the planner chooses; `CONFIG_KEYS` names the config key of each."""

    base_quant: str = "none"
    block_swap: int = 0
    gradient_checkpointing: bool = False
    checkpoint_fraction: float = 1.0
    compile: str = "none"
    activation_budget: float = 1.0
    fp8_matmuls: bool = False  # with base_quant fp8: speed.fp8_base, keep_attention (budget < 1) and cuda_graphs

    CONFIG_KEYS = {
        "base_quant": "memory.base_quant", "block_swap": "memory.block_swap",
        "gradient_checkpointing": "train.gradient_checkpointing", "checkpoint_fraction": "speed.checkpoint_fraction",
        "compile": "speed.compile", "activation_budget": "speed.activation_budget", "fp8_matmuls": "speed.fp8_base",
    }  # fmt: skip

    @classmethod
    def of(cls, cfg: Config) -> Knobs:
        fp8_mm = cfg.speed.fp8_base and cfg.memory.base_quant == "fp8"
        return cls(cfg.memory.base_quant, cfg.memory.block_swap, cfg.train.gradient_checkpointing,
                   cfg.speed.checkpoint_fraction, cfg.speed.compile, cfg.speed.activation_budget, fp8_mm)  # fmt: skip

    def settings(self) -> dict[str, object]:
        """The config keys these knobs set, {dotted key: value} (what `apply` and `overrides` write)."""
        keys: dict[str, object] = {self.CONFIG_KEYS[f.name]: getattr(self, f.name) for f in fields(self)}
        del keys["speed.fp8_base"]
        if self.fp8_matmuls:
            keys.update({"speed.fp8_base": True, "speed.cuda_graphs": True})
            if self.activation_budget < 1:
                keys["speed.keep_attention"] = True
        elif self.base_quant == "fp8":  # speed.fp8_base on an fp8-stored base would mean fp8 matmuls
            keys.update({"speed.fp8_base": False, "speed.fp8_fast_accum_backward": False})
        return keys

    def overrides(self) -> list[str]:
        """The knobs as `key=value` config overrides."""
        return [f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                for key, value in self.settings().items()]  # fmt: skip

    def apply(self, cfg: Config) -> Config:
        """A copy of `cfg` with these knobs set."""
        cfg = copy.deepcopy(cfg)
        for key, value in self.settings().items():
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
        return cfg

    def label(self) -> str:
        ckpt = f"ckpt {self.checkpoint_fraction:g}" if self.gradient_checkpointing else "no ckpt"
        compiled = f"compiled (budget {self.activation_budget:g})" if self.compile != "none" else "eager"
        return f"{self.quant_label}, swap {self.block_swap}, {ckpt}, {compiled}"

    @property
    def quant_label(self) -> str:
        return f"{self.base_quant} + fp8 matmuls" if self.fp8_matmuls else self.base_quant


# --------------------------------------------------------------------------------------------- what runs


@dataclass(frozen=True)
class Workload:
    """The sizes each phase runs at: tokens of the largest training sample, pixels the VAE encodes and decodes."""

    target: int  # target tokens of the largest training sample ((H/16) x (W/16))
    control: int  # its control tokens, all controls together
    text: int  # T5 tokens (model.max_sequence_length)
    cache_pixels: int  # pixels of one VAE encode while caching, the batch included
    cache_captions: int  # captions of one T5 encode while caching
    validation_tokens: int  # target + control + text tokens of one validation sample (data.resolution^2 images)
    validation_batch: int  # samples of validation's largest no-grad forward (the held-out loss chunk, or 1)
    validation_pixels: int  # pixels of one validation image (decoded by the VAE)
    infer_tokens: int  # target + control + text tokens of `kontext-lora infer` at Kontext's largest preferred size
    infer_pixels: int
    source: str  # where the training sizes come from: the data's buckets, or the worst case of the config

    @property
    def tokens(self) -> int:
        return self.target + self.control + self.text


def _tokens(bucket: tuple[int, int]) -> int:
    return (bucket[0] // 16) * (bucket[1] // 16)


def workload(cfg: Config, bucket_keys: Sequence[Hashable] | None = None) -> Workload:
    """The sizes of `cfg`'s job: from `bucket_keys` (the data plan's `PlannedSample.bucket_key`s: (target bucket,
    control buckets, masked)) when given, else the worst case of data.buckets over the datasets' resolutions."""
    from kontext_lora.data.buckets import bucket_list, kontext_buckets

    data = cfg.data
    if bucket_keys:
        samples = [(tuple(key[0]), tuple(tuple(c) for c in key[1])) for key in bucket_keys]
        source = f"the data's {len({s for s in samples})} bucket(s)"
    else:
        samples = []
        for ds in data.datasets or [None]:
            resolution = (ds.resolution if ds is not None else 0) or data.resolution
            largest = max(bucket_list(data.buckets, resolution, data.max_aspect_ratio), key=_tokens)
            controls = len(ds.control_keys) if ds is not None else 1
            samples.append((largest, (largest,) * controls))
        source = f"the largest data.buckets={data.buckets} bucket"
    target, controls = max(samples, key=lambda s: _tokens(s[0]) + sum(_tokens(c) for c in s[1]))
    images = [b for s in samples for b in (s[0], *s[1])]
    batch = max(1, cfg.train.batch_size)
    text = cfg.model.max_sequence_length
    # Validation samples square data.resolution^2 images; its set-up encodes every prompt, and every held-out target
    # and control, in one batch each (train/validation.py's Validator).
    val = cfg.validation
    side = data.resolution
    loss_items = (val.heldout_count + sum(bool(e.target) for e in val.examples)
                  + (VALIDATION_LOSS_CHUNK if val.heldout_path else 0)) if val.every else 0  # fmt: skip
    val_items = loss_items + sum(not e.target for e in val.examples) if val.every else 0
    infer = max(kontext_buckets(), key=_tokens)
    return Workload(
        target=_tokens(target),
        control=sum(_tokens(c) for c in controls),
        text=text,
        cache_pixels=max(batch * max(h * w for h, w in images), loss_items * side * side),
        cache_captions=max(batch, val_items),
        validation_tokens=2 * (side // 16) ** 2 + text,
        validation_batch=max(1, min(VALIDATION_LOSS_CHUNK, loss_items)),
        validation_pixels=side * side,
        infer_tokens=2 * _tokens(infer) + text,
        infer_pixels=infer[0] * infer[1],
        source=source,
    )


# --------------------------------------------------------------------------------------------- the train step


@dataclass
class Phase:
    """One phase's predicted peak: its parts in GiB (the peak is their sum)."""

    parts: dict[str, float]

    @property
    def gib(self) -> float:
        return sum(self.parts.values())


@dataclass
class Prediction:
    knobs: Knobs
    peak_gib: float  # the job's peak: the largest of its phases (`binding`)
    s_per_step: float
    memory_gib: dict[str, float] = field(default_factory=dict)  # the train step's peak, by component
    time_s: dict[str, float] = field(default_factory=dict)  # the step time's components
    phases: dict[str, Phase] = field(default_factory=dict)  # every phase, `infer` included
    binding: str = "train"  # the job phase with the largest peak
    context_gib: float = 0.0  # memory outside the caching allocator (the calibration's cuda_context_gib)

    @property
    def device_peak_gib(self) -> float:
        """What the device shows at the job's peak: the allocator's peak plus the CUDA context."""
        return self.peak_gib + self.context_gib

    @property
    def step_peak_gib(self) -> float:
        """The train step's allocator peak (what scripts/bench_step.py and bench_memory.py measure)."""
        return sum(self.memory_gib.values())

    def fits(self, budget_gib: float) -> bool:
        """The job's predicted peak within the budget less PLAN_HEADROOM (allocator fragmentation, prediction
        error)."""
        return self.peak_gib <= budget_gib * (1 - PLAN_HEADROOM)


@functools.lru_cache(maxsize=4)
def _read_calibration(path: str) -> str:
    return Path(path).read_text()


def load_calibration(path: Path = CALIBRATION_PATH) -> dict:
    """The fitted constants (and the points they were fitted to) from planner_calibration.json."""
    return json.loads(_read_calibration(str(path)))


def spread_blocks(count: int, fraction: float) -> set[int]:
    """Indices of the checkpointed blocks (kontext_lora.model.speed's rule)."""
    from kontext_lora.model.speed import spread_indices

    return set(spread_indices(count, fraction))


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


def features(
    cfg: Config,
    count: ModelCount | None = None,
    calib: dict | None = None,
    knobs: Knobs | None = None,
    work: Workload | None = None,
) -> tuple[dict[str, float], dict[str, float], dict]:
    """The linear features of the train step's peak memory and time: prediction = sum(feature * constant).

    Returns (memory features, time features, known terms in bytes that need no fitting, and the swap's).
    """
    calib = calib or load_calibration()
    count = count or count_model(cfg)
    knobs = knobs or Knobs.of(cfg)
    work = work or workload(cfg)
    n = len(count.blocks)
    batch = cfg.train.batch_size
    compiled = knobs.compile != "none"  # the planner predicts a CUDA run, where `auto` compiles
    fp8mm = compiled and knobs.fp8_matmuls  # measured compiled only; eager fp8 matmuls are predicted as fp8 storage
    swapped = swapped_blocks(n, knobs.block_swap)
    ckpt = (spread_blocks(n, knobs.checkpoint_fraction) if knobs.gradient_checkpointing else set()) | swapped
    live = n - len(ckpt)
    unit = batch * work.tokens * count.hidden  # token x hidden units of one block's activations

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

    flops = step_tflops(count, work.target + work.control, work.text, batch)
    mode = "fp8mm" if fp8mm else "compiled" if compiled else "eager"
    tim: dict[str, float] = {f"overhead_{mode}": 1.0, f"tflop_{mode}": flops, "recompute": flops * len(ckpt) / n}
    if compiled and not fp8mm:  # with the attention kept, fp8 matmuls measured flat over budgets 0.45-1.0
        # Every block pays: a checkpointed block's recompute in backward is compiled under the same budget.
        for key, w in _interp(calib["memory"]["budget_points"], knobs.activation_budget):
            tim[f"budget_cost:{key}"] = w * flops
    quantized = sum(
        out * inp for block in count.blocks for out, inp in block.linears + block.context_linears + block.modulation
    )
    if knobs.base_quant != "none" and not fp8mm:  # dequantized in forward, in the recompute and in backward
        passes = 2 + len(ckpt) / n
        tim[f"dequant_{knobs.base_quant}"] = quantized * passes / 1e9
    # Swap: each swapped block's weights cross twice a step (forward, backward); prefetching hides a transfer behind
    # the compute since the previous swapped block, so only what exceeds that shows, plus a fixed cost per transfer
    # (stream syncs, copy launches: the fitted constant swap_transfer).
    known["swap_transfer_bytes"] = sum(per_block[i] for i in swapped)
    known["swap_gbps"] = calib["swap_h2d_gbps"]["value"]
    if swapped:
        tim["swap_transfer"] = 2.0 * len(swapped)
    return mem, tim, known


def predict_step(
    cfg: Config, count: ModelCount, calib: dict, knobs: Knobs, work: Workload
) -> tuple[dict[str, float], dict[str, float]]:
    """The train step's peak by component (bytes) and its time by component (s)."""
    mem, tim, known = features(cfg, count, calib, knobs, work)
    constants = {**calib["memory"]["constants"], **calib["time"]["constants"]}
    memory = {"weights": known["weights"], "swap_buffers": known["swap_buffers"], "lora+grads": known["lora"],
              "optimizer": known["optimizer"]}  # fmt: skip
    memory["overhead"] = mem["overhead"] * constants["overhead"]
    memory["activations"] = sum(v * constants.get(k, 0.0) for k, v in mem.items() if k != "overhead")
    time = {k: v * constants.get(k, 0.0) for k, v in tim.items()}  # budget_cost:1.0 is 0 by definition
    compute = sum(v for k, v in time.items() if k != "swap_transfer")
    swapped = len(swapped_blocks(len(count.blocks), knobs.block_swap))
    if swapped:
        per_block_transfer = known["swap_transfer_bytes"] / swapped / (known["swap_gbps"] * 1e9)
        # A copy travels while the resident blocks up to the next swapped one compute (n / swapped of them).
        exposed = max(0.0, per_block_transfer - compute / swapped / 2)
        time["swap"] = 2 * swapped * exposed
    return memory, time


# --------------------------------------------------------------------------------------------- the job's phases


def phase_terms(
    cfg: Config,
    count: ModelCount,
    encoders: EncoderCount,
    calib: dict,
    knobs: Knobs,
    work: Workload,
    step_memory: dict[str, float],
) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    """Each phase's peak as (known bytes by part, features by `job` constant): peak = sum(known) + sum(feature x
    constant). Where a phase's peak is the larger of two sub-steps (T5 or the VAE, a forward or the VAE decode), the
    larger one at the current constants gives the features."""
    c = calib["job"]["constants"]
    dtype = DTYPE_BYTES[cfg.model.dtype]
    graphs = knobs.fp8_matmuls or cfg.speed.cuda_graphs
    compiled = knobs.compile != "none"
    validating = bool(cfg.validation.every)
    activations = step_memory["activations"]

    def larger(*options: tuple[dict, dict]) -> tuple[dict, dict]:
        return max(options, key=lambda o: sum(o[0].values()) + sum(v * c[k] for k, v in o[1].items()))

    t5_work = {"text_encode": work.cache_captions * work.text * encoders.t5_width}
    vae_work = {"vae_encode": work.cache_pixels}
    if cfg.memory.text_encoder == "cpu_offload":  # each model on the device only while it runs
        cache = larger(({"t5": encoders.t5_bytes}, t5_work), ({"clip": encoders.clip_bytes}, {}),
                       ({"vae": encoders.vae_bytes}, vae_work))  # fmt: skip
        cache = (cache[0], {**cache[1], "cache_overhead": 1.0})
    else:
        resident = {"t5": encoders.t5_bytes, "clip": encoders.clip_bytes, "vae": encoders.vae_bytes}
        cache = (resident, {**larger(({}, t5_work), ({}, vae_work))[1], "cache_overhead": 1.0})

    ema = count.lora_elements * 4 if cfg.ema.enabled else 0  # the EMA's fp32 shadow, on the device
    train_known = {**step_memory, "vae": encoders.vae_bytes if validating else 0, "ema": ema}
    train = (train_known, {"train_reserve": sum(step_memory.values()), "train_cuda_graphs": activations * graphs})

    phases = {"cache": cache, "train": train}
    if validating:
        # The training transformer as it is (weights as stored, swap buffers), the fp32 adapter and the optimizer
        # states (gradients are freed at the step's end), the VAE; then a no-grad forward or the VAE's decode.
        known = {k: step_memory[k] for k in ("weights", "swap_buffers", "optimizer")}
        known.update({"lora": count.lora_elements * 4 * (2 if cfg.lora.init_lora_weights in ("pissa", "olora") else 1),
                      "vae": encoders.vae_bytes, "ema": ema})  # fmt: skip
        forward = {"forward_nograd": work.validation_batch * work.validation_tokens * count.hidden}
        decode = {"vae_decode": work.validation_pixels}
        held = "held_cuda_graphs" if graphs else "held_compiled" if compiled else None
        extra = {held: activations} if held else {}
        phases["validation"] = (known, {**larger(({}, forward), ({}, decode))[1], **extra, "validation_overhead": 1.0})
    # `kontext-lora infer`: the whole pipeline in model.dtype on the device (infer.py), the LoRA loaded by PEFT.
    per_block, outside = weight_bytes(count, "none", dtype)
    infer_known = {"transformer": sum(per_block) + outside + count.lora_elements * dtype, "t5": encoders.t5_bytes,
                   "clip": encoders.clip_bytes, "vae": encoders.vae_bytes}  # fmt: skip
    forward = {"forward_nograd": work.infer_tokens * count.hidden}
    decode = {"vae_decode": work.infer_pixels}
    text = {"text_encode": work.text * encoders.t5_width}
    phases["infer"] = (infer_known, {**larger(({}, forward), ({}, decode), ({}, text))[1], "infer_overhead": 1.0})
    return phases


def predict(
    cfg: Config,
    count: ModelCount | None = None,
    calib: dict | None = None,
    knobs: Knobs | None = None,
    bucket_keys: Sequence[Hashable] | None = None,
    work: Workload | None = None,
) -> Prediction:
    """Predicted peaks (GiB) of every phase and s/step of `cfg` (with `knobs` instead of its own, if given) on the
    calibrated card; the job's peak is its largest phase's. `bucket_keys`: the data plan's, else the config's worst
    case (see `workload`)."""
    calib = calib or load_calibration()
    count = count or count_model(cfg)
    knobs = knobs or Knobs.of(cfg)
    work = work or workload(cfg, bucket_keys)
    memory, time = predict_step(cfg, count, calib, knobs, work)
    constants = calib["job"]["constants"]
    phases = {}
    for name, (known, feats) in phase_terms(cfg, count, count_encoders(cfg), calib, knobs, work, memory).items():
        parts = {k: v / GIB for k, v in known.items() if v}
        for key, value in feats.items():
            if value * constants[key]:
                parts[key] = value * constants[key] / GIB
        phases[name] = Phase(parts)
    binding = max((p for p in JOB_PHASES if p in phases), key=lambda p: phases[p].gib)
    return Prediction(
        knobs=knobs,
        peak_gib=phases[binding].gib,
        s_per_step=sum(time.values()),
        memory_gib={k: v / GIB for k, v in memory.items()},
        time_s=time,
        phases=phases,
        binding=binding,
        context_gib=calib["job"].get("cuda_context_gib", {}).get("value", 0.0),
    )
