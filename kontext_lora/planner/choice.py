"""Choosing the knobs: candidate sets, the fastest that fits a budget, and the budget itself.

`memory.budget_gib` is `auto` (the default: the free memory of the CUDA device the run starts on, less
`auto_margin_gib` of the calibration; on a machine without CUDA, no plan), a number of GiB, or 0 (the keys as given).
The planner chooses every planner key (`Knobs.CONFIG_KEYS`) that is still at its schema default; a key set to any
other value is kept, and the plan is made around it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Hashable, Sequence

from kontext_lora.config import Config, ConfigError
from kontext_lora.planner.count import GIB, ModelCount, count_model
from kontext_lora.planner.prediction import (
    JOB_PHASES,
    Knobs,
    Prediction,
    load_calibration,
    predict,
    workload,
)

QUANT_LEVELS = ("none", "fp8", "nf4")  # in order of preference: the less the base is quantized, the closer the loss
# choose()'s order of preference: fp8 matmuls round activations and gradients too, so they rank after fp8 storage.
PRECISION_LEVELS = (("none", False), ("fp8", False), ("fp8", True), ("nf4", False))
FP8_MATMUL_BUDGETS = (1.0, 0.6, 0.5, 0.45)  # as measured; on a tie in s/step the first (least recompute) wins


def fixed_knobs(cfg: Config) -> dict[str, object]:
    """The knobs `cfg` sets to something other than the schema default: {Knobs field: value}, kept by the plan."""
    given, default = Knobs.of(cfg), Knobs.of(Config())
    fixed = {f.name: getattr(given, f.name) for f in dataclasses.fields(Knobs) if getattr(given, f.name) !=
             getattr(default, f.name)}  # fmt: skip
    if cfg.speed.fp8_base:  # fp8 matmuls are planned on an fp8-stored base: the key asks for them whatever the base
        fixed["fp8_matmuls"] = True
    return fixed


def _valid(knobs: Knobs, cfg: Config) -> bool:
    """Whether a knob set can run: fp8 matmuls need an fp8-stored, compiled base without swap and without
    checkpointed blocks (CUDA graphs: a checkpointed block frees tensors while a graph records, and the recording
    fails), and without gradient accumulation."""
    if not knobs.fp8_matmuls:
        return True
    return (knobs.base_quant == "fp8" and knobs.compile != "none" and knobs.block_swap == 0
            and not knobs.gradient_checkpointing and cfg.train.gradient_accumulation == 1)  # fmt: skip


def candidate_knobs(cfg: Config, blocks: int, fp8_matmuls: bool = False) -> list[Knobs]:
    """Every knob set the planner considers (block swap is chosen per set: the fewest blocks that fit), with the
    keys `cfg` fixes (`fixed_knobs`) kept. fp8_matmuls: add the fp8-matmul sets, as measured (compiled, no
    checkpointing, FP8_MATMUL_BUDGETS), where CUDA graphs can run (train.gradient_accumulation 1)."""
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
    fixed = fixed_knobs(cfg)
    if (fp8_matmuls or fixed.get("fp8_matmuls")) and compile_on:
        knobs += [Knobs("fp8", 0, False, 1.0, compile_on, budget, True) for budget in FP8_MATMUL_BUDGETS]
    out, seen = [], set()
    for k in knobs:
        k = dataclasses.replace(k, **fixed)
        if _valid(k, cfg) and dataclasses.astuple(k) not in seen:
            seen.add(dataclasses.astuple(k))
            out.append(k)
    return out


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
    bucket_keys: Sequence[Hashable] | None = None,
) -> list[Prediction]:
    """A prediction per candidate knob set, each with the fewest swapped blocks that fit `budget_gib` (or all;
    none when `swap` is false, nor for fp8 matmuls, which were never run with a swap; exactly memory.block_swap when
    the config sets it). fp8_matmuls: consider them (a GPU with fp8 tensor cores, a single process: CUDA graphs).
    Sorted: fitting first, fastest first."""
    count, calib = count or count_model(cfg), load_calibration()
    work = workload(cfg, bucket_keys)
    n = len(count.blocks)
    swap_fixed = "block_swap" in fixed_knobs(cfg)
    out = []
    for knobs in candidate_knobs(cfg, n, fp8_matmuls):
        # The fewest swapped blocks that fit (a scan: swapping the first double block can cost more than it frees).
        scan = [knobs.block_swap] if swap_fixed else range(n + 1 if swap and not knobs.fp8_matmuls else 1)
        for swapped in scan:
            pred = predict(cfg, count, calib, dataclasses.replace(knobs, block_swap=swapped), work=work)
            if pred.fits(budget_gib):
                break
        out.append(pred)
    return sorted(out, key=lambda p: (not p.fits(budget_gib), p.s_per_step))


def choose(
    preds: list[Prediction],
    budget_gib: float,
    exact_within: float = 1.25,
    kept: str = "",
    budget_name: str = "config key `memory.budget_gib`",
) -> Prediction:
    """The fastest fitting candidate, unless a less-quantized one fits within `exact_within` x its s/step (a
    quantized base changes the loss, so its speed must be worth it). `kept`: the keys the config fixed, named in the
    error when nothing fits; `budget_name`: what the error calls the budget (`kontext-lora plan` takes --vram)."""
    fitting = [p for p in preds if p.fits(budget_gib)]
    if not fitting:
        least = min(preds, key=lambda p: p.peak_gib)
        keeping = f" keeping {kept}" if kept else ""
        raise ConfigError(
            f"{budget_name}: nothing fits {budget_gib:g} GiB{keeping}; the smallest candidate "
            f"({least.knobs.label()}) needs {least.peak_gib:.3g} GiB in {least.binding}; lower data.resolution / "
            "train.batch_size / lora.rank" + (", unset the kept keys" if kept else "") + " or raise the budget"
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


def kept_keys(cfg: Config) -> str:
    """The config keys the plan keeps as given, as `key=value` text."""
    fixed = fixed_knobs(cfg)
    return ", ".join(f"{Knobs.CONFIG_KEYS[name]}={value}" for name, value in fixed.items())


def plan(
    cfg: Config,
    budget_gib: float,
    count: ModelCount | None = None,
    swap: bool = True,
    fp8_matmuls: bool = False,
    bucket_keys: Sequence[Hashable] | None = None,
) -> tuple[Config, Prediction]:
    """The cheapest knob set that fits `budget_gib`: (cfg with it applied, its prediction); ConfigError if none fits.
    `swap=False` leaves block swap out of the candidates; `fp8_matmuls` adds those sets (see `candidates`)."""
    preds = candidates(cfg, budget_gib, count, swap, fp8_matmuls, bucket_keys)
    chosen = choose(preds, budget_gib, kept=kept_keys(cfg))
    return chosen.knobs.apply(cfg), chosen


# --------------------------------------------------------------------------------------------- the budget


def auto_budget() -> tuple[float, str] | None:
    """(GiB, where from) for `memory.budget_gib: auto`: the free memory of this process's CUDA device (within a
    per-process memory fraction, if one is set), the least over the processes of a distributed run, less the
    calibration's `auto_margin_gib` (memory outside the caching allocator: kernels, library workspaces); None
    without CUDA."""
    import torch

    from kontext_lora.model.device import device_limit_bytes

    if not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    free = device_limit_bytes(torch.device("cuda", device))
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # one plan for every process
        value = torch.tensor([float(free)], device=f"cuda:{device}")
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        free = value.item()
    margin = load_calibration()["job"]["auto_margin_gib"]["value"]
    return free / GIB - margin, f"auto: free memory of {torch.cuda.get_device_name(device)}"


def resolve_budget(cfg: Config) -> tuple[float, str] | None:
    """memory.budget_gib as (GiB, where from), or None when the keys are used as given (0, or auto without CUDA)."""
    setting = str(cfg.memory.budget_gib).strip()
    if setting == "auto":
        return auto_budget()
    gib = float(setting)  # load_config has checked it
    return (gib, "memory.budget_gib") if gib > 0 else None


def plan_line(pred: Prediction, budget_gib: float, source: str) -> str:
    """The chosen plan in one line: its keys, the job's peak and the phase that binds, s/step."""
    return (f"[kontext-lora] plan for {budget_gib:.1f} GiB ({source}): {' '.join(pred.knobs.overrides())} -> peak "
            f"{pred.peak_gib:.1f} GiB ({pred.binding}; {pred.device_peak_gib:.1f} GiB on the device), "
            f"{pred.s_per_step:.2f} s/step")  # fmt: skip


def apply_budget(
    cfg: Config, log: Callable[[str], object] = print, bucket_keys: Sequence[Hashable] | None = None
) -> Config:
    """`cfg` with the planned knobs for its memory.budget_gib (see the module docstring), the plan printed in one
    line through `log`; `cfg` itself when there is no budget. The returned config records the budget planned for."""
    resolved = resolve_budget(cfg)
    if resolved is None:
        return cfg
    budget, source = resolved
    # Block swap refuses several processes (DDP broadcasts every weight, swapped ones too): plan without it there;
    # nor fp8 matmuls, measured on one GPU only (with CUDA graphs).
    single_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    fp8_matmuls = single_process and fp8_matmuls_available()
    try:
        planned, pred = plan(cfg, budget, swap=single_process, fp8_matmuls=fp8_matmuls, bucket_keys=bucket_keys)
    except ConfigError as exc:
        raise ConfigError(f"{exc} ({source})") from None
    if source.startswith("auto"):  # the run records what it was planned for
        planned.memory.budget_gib = f"{budget:.2f}"
    log(plan_line(pred, budget, source))
    return planned


def phase_summary(pred: Prediction) -> str:
    """One line per phase: its predicted peak and parts; the binding phase marked."""
    lines = []
    for name, phase in pred.phases.items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in phase.parts.items())
        note = " (binds)" if name == pred.binding else "" if name in JOB_PHASES else " (own process, not planned)"
        lines.append(f"  {name:10s} {phase.gib:6.1f} GiB{note}: {parts}")
    return "\n".join(lines)


def plan_table(preds: list[Prediction], budget_gib: float, limit: int = 20, chosen: Prediction | None = None) -> str:
    """A markdown table of the candidates (the first `limit`, and `chosen` marked wherever it is): knobs, predicted
    job peak (and the phase that sets it) and s/step, whether each fits."""
    lines = ["| quant | swap | checkpointing | compile | peak GiB | phase | s/step | fits |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    shown = preds[:limit] + ([chosen] if chosen is not None and chosen not in preds[:limit] else [])
    for p in shown:
        k = p.knobs
        ckpt = f"{k.checkpoint_fraction:g}" if k.gradient_checkpointing else "off"
        compiled = f"{k.compile} (budget {k.activation_budget:g})" if k.compile != "none" else "none"
        fits = ("yes" if p.fits(budget_gib) else "no") + (" (chosen)" if p is chosen else "")
        lines.append(f"| {k.quant_label} | {k.block_swap} | {ckpt} | {compiled} | {p.peak_gib:.1f} | {p.binding} | "
                     f"{p.s_per_step:.3f} | {fits} |")  # fmt: skip
    if len(preds) > len(shown):
        lines.append(f"({len(preds) - len(shown)} more candidates not shown: --show N)")
    return "\n".join(lines)
