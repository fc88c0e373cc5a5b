"""The names of a run folder's files (`output.dir`), each defined once.

The training loop, checkpoints, validation, sweeps and the web UI all read a run folder by these names. The module
imports nothing, so the UI and the sweep read run folders without loading torch.
"""

from __future__ import annotations

ADAPTER_NAME = "pytorch_lora_weights.safetensors"  # the final adapter: diffusers' `load_lora_weights` file name
EMA_ADAPTER_NAME = "pytorch_lora_weights_ema.safetensors"  # the EMA adapter (`train.ema_decay`)
CONFIG_NAME = "config.yaml"  # the resolved config, the plan applied: what `train.resume` reads back
METRICS_NAME = "metrics.jsonl"  # one JSON line a logged step, and one a validation
JOB_NAME = "job.json"  # each phase's wall time and peaks (train/job.py)
LOG_NAME = "train.log"  # stdout + stderr of a run started by a sweep or the UI
STATUS_NAME = "status.json"  # {"status", "error", "overrides", "seconds"}: written by a sweep around each run
LOCK_NAME = ".run.lock"  # held while a process trains into the folder: one run owns it
CHECKPOINT_MARKER = "checkpoint.json"  # in step-NNNNNN/: written last, with each file's sha256
STATE_NAME = "training_state"  # in step-NNNNNN/: optimizer, scheduler, RNG and data position
VALIDATION_DIR = "validation"  # validation/step-NNNNNN/*.png: control | output | target grids
BEST_DIR = "best"  # the adapter of the best validation step
BEST_JSON = "best.json"  # that step and its metric
LOGS_DIR = "logs"  # tensorboard (accelerate's project_dir / "logs")
CARD_NAME = "README.md"  # the model card beside the adapter
PREFLIGHT_NAME = "preflight.jpg"  # the first batch as the model sees it
