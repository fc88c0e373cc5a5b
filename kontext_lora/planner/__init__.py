"""Memory / speed planner: predict a job's peak accelerator memory per phase and its s/step, and pick the cheapest
knobs that fit a budget.

- `count`: the model counted on the meta device (transformer with its LoRA, text encoders, VAE).
- `prediction`: the peak of each phase of a job (cache, train, validation; infer beside it) and the step's time.
- `choice`: the candidate knob sets, the choice, and `memory.budget_gib` (auto, GiB, or 0) resolved into a plan.
- `calibrate`: refitting planner_calibration.json to step benchmarks and whole-job benchmarks (`python -m
  kontext_lora.planner --fit ...`).

The train step adds up, in bytes: resident frozen weights by storage (model.dtype, fp8 / nf4 with their scales), less
the blocks swapped to pinned CPU memory, plus the swap's on-device buffers (two blocks); the adapter (fp32 params +
fp32 grads + optimizer states); activations: tokens x hidden x (bytes per token-block-hidden unit) summed over the
blocks, by how each block keeps them for backward (checkpointed: its input only; compiled with an activation budget;
eager), plus one block recomputed in backward when any block is checkpointed; a fixed overhead. Its s/step = a
per-step overhead + model FLOPs x seconds per TFLOP (compiled or eager) x (1 + recompute) + the base weights'
dequantization + the swap transfer that prefetching cannot hide.

fp8 matmuls (`speed.fp8_base` on an fp8-stored base) are a mode of their own, offered on GPUs with fp8 tensor cores
and only as they were measured (docs/performance.md): compiled, no block checkpointing or swap, the attention never
recomputed (`speed.keep_attention`) and CUDA graphs (`speed.cuda_graphs`, so single-process runs without gradient
accumulation). Their activations per activation budget and their seconds per TFLOP have constants of their own.
"""

from kontext_lora.planner.calibrate import POINT_BASE, accuracy_rows, fit, fit_job, main, points_from_bench
from kontext_lora.planner.choice import (
    FP8_MATMUL_BUDGETS,
    apply_budget,
    candidate_knobs,
    candidates,
    choose,
    fixed_knobs,
    fp8_matmuls_available,
    kept_keys,
    phase_summary,
    plan,
    plan_line,
    plan_table,
    resolve_budget,
)
from kontext_lora.planner.count import GIB, ModelCount, count_encoders, count_model, transformer_config
from kontext_lora.planner.prediction import (
    CALIBRATION_PATH,
    PLAN_HEADROOM,
    Knobs,
    Prediction,
    load_calibration,
    predict,
    workload,
)

__all__ = [
    "CALIBRATION_PATH", "FP8_MATMUL_BUDGETS", "GIB", "PLAN_HEADROOM", "POINT_BASE", "Knobs", "ModelCount",
    "Prediction", "accuracy_rows", "apply_budget", "candidate_knobs", "candidates", "choose", "count_encoders",
    "count_model", "fit", "fit_job", "fixed_knobs", "fp8_matmuls_available", "kept_keys", "load_calibration", "main",
    "phase_summary", "plan", "plan_line", "plan_table", "points_from_bench", "predict", "resolve_budget",
    "transformer_config", "workload",
]  # fmt: skip
