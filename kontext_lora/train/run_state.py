"""A run's state on disk: what a checkpoint saves and a resume restores, the metrics log, the run folder's claim.

The loop (loop.py) drives training; this module owns reading and writing the run folder through it: `RunState`
saves step-NNNNNN/ checkpoints (the folder format and its verification: checkpoint.py) and restores them,
`start_or_resume` begins a run or continues one, `RunState.save_after_oom` keeps the last completed step when one
runs out of memory, `append_metrics` / `truncate_metrics` keep metrics.jsonl in step with the checkpoints
(`mean_over_processes`: the loss they record), and `adapter_saver` writes the adapter files. Under FSDP2 the
tensors are gathered whole for writing and sharded again like their parameters on restore.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from kontext_lora.atomic import atomic_write_text
from kontext_lora.config import Config, to_dict
from kontext_lora.errors import UserError
from kontext_lora.export.diffusers_format import WEIGHT_NAME, read_lora_file, save_diffusers_lora
from kontext_lora.export.formats import write_exports
from kontext_lora.model.lora import adapter_state, load_adapter_state
from kontext_lora.run_files import METRICS_NAME
from kontext_lora.train import checkpoint
from kontext_lora.train.ema import EMA_WEIGHT_NAME, AdapterEMA
from kontext_lora.train.job import JobOutOfMemory, free_accelerator_memory


class TrainingError(UserError, RuntimeError):
    """Training stopped for a reason the user can act on; the message says what was saved."""


def append_metrics(out_dir: Path, record: dict) -> None:
    """Append one JSON line to <output.dir>/metrics.jsonl: the run's own log that sweeps and tools read back."""
    with open(out_dir / METRICS_NAME, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def mean_over_processes(accelerator: Accelerator, value: float) -> float:
    """The mean of `value` over the processes (the step's loss over all its micro-batches, as one process logs)."""
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(torch.tensor([value], device=accelerator.device), reduction="mean").item()


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop metrics.jsonl records of steps after `step` (a resumed run writes them again), atomically."""
    path = out_dir / METRICS_NAME
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line torn by the kill that stopped the previous run
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def start_or_resume(cfg: Config, out_dir: Path, state: RunState) -> int:
    """Start fresh (a new metrics log) or restore the checkpoint train.resume names; returns the step to go on from."""
    accelerator = state.accelerator
    resume_from = resume_folder(cfg, out_dir)
    if resume_from is None:
        if accelerator.is_main_process:
            (out_dir / METRICS_NAME).unlink(missing_ok=True)
        return 0
    step = state.load(resume_from)
    accelerator.print(f"[kontext-lora] resumed from {resume_from} at step {step}")
    if accelerator.is_main_process:  # the log continues; records of steps past the checkpoint are written again
        truncate_metrics(out_dir, step)
    return step


@contextmanager
def run_lock(out_dir: Path, enabled: bool) -> Iterator[None]:
    """checkpoint.run_lock, its refusal as a TrainingError (one line at the command line)."""
    lock = checkpoint.run_lock(out_dir, enabled)
    try:
        lock.__enter__()
    except checkpoint.RunFolderError as exc:
        raise TrainingError(str(exc)) from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def claim(cfg: Config, out_dir: Path) -> None:
    try:
        checkpoint.claim_run_folder(out_dir, cfg.train.resume, cfg.output.overwrite)
    except checkpoint.RunFolderError as exc:
        raise TrainingError(str(exc)) from None


def resume_folder(cfg: Config, out_dir: Path) -> Path | None:
    try:
        return checkpoint.resolve_resume(cfg.train.resume, out_dir)
    except checkpoint.CheckpointError as exc:
        raise TrainingError(str(exc)) from None


class RunState:
    """Everything a checkpoint saves and a resume restores, besides the adapter file itself."""

    def __init__(self, accelerator, transformer, optimizer, scheduler, ema, batches, noise_generator):
        self.accelerator, self.transformer, self.optimizer, self.scheduler = (
            accelerator,
            transformer,
            optimizer,
            scheduler,
        )
        self.ema, self.batches, self.generators = ema, batches, {"noise": noise_generator}

    def save(self, step: int, out_dir: Path, save_adapter, keep_last: int) -> Path:
        """Write step-NNNNNN/ atomically (see checkpoint.py); every process writes its RNG state."""
        accelerator = self.accelerator
        tmp, final = checkpoint.temp_dir(out_dir, step), checkpoint.step_dir(out_dir, step)
        if accelerator.is_main_process:
            checkpoint.begin(out_dir, step)
        accelerator.wait_for_everyone()
        checkpoint.write_state(tmp, f"rng_{accelerator.process_index}", checkpoint.rng_state(self.generators))
        save_adapter(step, tmp)
        # Every process gathers the optimizer and EMA tensors (FSDP2 shards them; a collective), main writes them.
        # DeepSpeed's ZeRO optimizer state is partitioned in its own format: not kept (such a run cannot resume).
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        optimizer_state = None if deepspeed else full_tensors(self.optimizer.state_dict())
        ema_state = full_tensors(self.ema.state()) if self.ema is not None else None
        if accelerator.is_main_process:
            state = {
                "step": step,
                "micro_batches": self.batches.consumed,
                "num_processes": accelerator.num_processes,
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
            }
            if ema_state is not None:
                state["ema"] = ema_state
            if accelerator.scaler is not None:
                state["grad_scaler"] = accelerator.scaler.state_dict()
            checkpoint.write_state(tmp, checkpoint.STATE_NAME, state)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            checkpoint.commit(tmp, final, {"step": step})
            checkpoint.prune(out_dir, keep_last)
        accelerator.wait_for_everyone()
        return final

    def save_after_oom(self, exc: JobOutOfMemory, step: int, step_start: int, out_dir: Path, save_adapter,
                       keep_last: int) -> str:  # fmt: skip
        """Write a resumable checkpoint of the last completed step after an out-of-memory error in the step after
        it (whose micro-batches began at data position `step_start`); returns the message that says so."""
        for group in self.optimizer.param_groups:  # the failed step's gradients are not part of any step
            for param in group["params"]:
                param.grad = None
        free_accelerator_memory()
        if step == 0:
            return f"{exc}; nothing was trained yet"
        self.batches.consumed = step_start  # the failed step's micro-batches are drawn again on resume
        try:
            path = self.save(step, out_dir, save_adapter, keep_last)
        except torch.OutOfMemoryError:
            return f"{exc}; the checkpoint of step {step} could not be written either"
        return f"{exc}; step {step} was saved to {path} (train.resume=latest continues from it)"

    def load(self, folder: Path) -> int:
        """Restore adapter, optimizer, scheduler, EMA, data position and RNG states; returns the step."""
        accelerator = self.accelerator
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise TrainingError(
                f"train.resume: resuming under DeepSpeed is not supported yet; continue from the checkpoint's adapter "
                f"instead: lora.init_from={folder / WEIGHT_NAME}"
            )
        try:
            state = checkpoint.read_state(folder, checkpoint.STATE_NAME)
            rng = checkpoint.read_state(folder, f"rng_{accelerator.process_index}")
        except checkpoint.CheckpointError as exc:
            raise TrainingError(f"train.resume: {exc}") from None
        if state["optimizer"] is None:
            raise TrainingError(f"train.resume: {folder} was written under DeepSpeed and has no optimizer state")
        if state["num_processes"] != accelerator.num_processes:
            raise TrainingError(
                f"train.resume: {folder} was written by {state['num_processes']} processes, this run has "
                f"{accelerator.num_processes}; resume with the same number of processes"
            )
        tensors, _ = read_lora_file(folder / WEIGHT_NAME)
        try:
            adapter = {key.removeprefix("transformer."): value for key, value in tensors.items()}
            if self.ema is not None and "ema" not in state:
                raise ValueError("the checkpoint has no EMA state but ema.enabled=true")
            restore_training_tensors(accelerator.unwrap_model(self.transformer), self.optimizer, self.ema, adapter,
                                     state["optimizer"], state.get("ema"))  # fmt: skip
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise TrainingError(f"train.resume: {folder} does not fit this config: {exc}") from None
        if accelerator.scaler is not None and "grad_scaler" in state:
            accelerator.scaler.load_state_dict(state["grad_scaler"])
        self.batches.skip(state["micro_batches"])
        checkpoint.restore_rng_state(rng, self.generators)  # last: making the data iterator draws from the global RNG
        return int(state["step"])


def restore_training_tensors(
    transformer: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: AdapterEMA | None,
    adapter: dict[str, torch.Tensor],
    optimizer_state: dict,
    ema_state: dict | None,
) -> None:
    """Load a checkpoint's whole tensors (as `RunState.save` gathers them) into the (unwrapped) transformer's
    adapter, the optimizer and the EMA. Under FSDP2 each tensor is first sharded like the parameter it belongs to,
    every process keeping its own shard of the whole tensor it read (`shard_like`): no communication."""
    current, _ = adapter_state(transformer)  # PEFT key -> the live parameter (a DTensor under FSDP2)
    load_adapter_state(transformer, {k: shard_like(v, current[k]) if k in current else v for k, v in adapter.items()})
    params = [param for group in optimizer.param_groups for param in group["params"]]
    saved_ids = [index for group in optimizer_state["param_groups"] for index in group["params"]]
    by_id = dict(zip(saved_ids, params, strict=False))  # a mismatch in count is reported by load_state_dict
    state = {index: {key: shard_like(value, by_id[index]) if index in by_id else value for key, value in s.items()}
             for index, s in optimizer_state["state"].items()}  # fmt: skip
    optimizer.load_state_dict({**optimizer_state, "state": state})
    if ema is not None:
        shadow = [shard_like(t, p) for t, p in zip(ema_state["shadow_params"], ema.parameters, strict=False)]
        ema.load_state({**ema_state, "shadow_params": shadow})


def shard_like(tensor, reference: torch.Tensor):
    """`tensor` as a DTensor placed like `reference` when that is one of FSDP2's sharded parameters and `tensor` is
    a whole tensor of its shape (Adam's moments, an EMA shadow, a LoRA weight); anything else (a step count, a
    plain parameter's state) is returned as it is. The inverse of `full_tensors` for a restore."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(reference, DTensor) or not torch.is_tensor(tensor) or isinstance(tensor, DTensor):
        return tensor
    if tensor.shape != reference.shape or tensor.dim() == 0:
        return tensor
    return distribute_tensor(tensor.to(reference.device), reference.device_mesh,
                             reference.placements, src_data_rank=None)  # fmt: skip


def adapter_saver(accelerator: Accelerator, transformer: torch.nn.Module, cfg: Config, ema: AdapterEMA | None = None):
    """A function that writes the adapter (diffusers format, atomically) from the main process.

    With an EMA, its weights are written beside the adapter as pytorch_lora_weights_ema.safetensors.
    """

    def save(step: int, folder: Path) -> Path:
        path = folder / WEIGHT_NAME
        accelerator.wait_for_everyone()
        # Every process gathers (FSDP2 holds each LoRA tensor in shards); only the main one writes.
        state, peft_config = full_adapter_state(accelerator.unwrap_model(transformer))
        ema_state = None
        if ema is not None:
            with ema.applied():
                ema_state = full_adapter_state(accelerator.unwrap_model(transformer))[0]
        if accelerator.is_main_process:
            info = {
                "base_model": cfg.model.pretrained,
                "step": step,
                "rank": cfg.lora.rank,
                "alpha": cfg.lora.alpha,
                "targets": peft_config["target_modules"],
                "resolution": cfg.data.resolution,
                "config": to_dict(cfg),
            }
            save_diffusers_lora(path, state, peft_config, info)  # float32 already (full_adapter_state)
            if ema_state is not None:
                save_diffusers_lora(folder / EMA_WEIGHT_NAME, ema_state, peft_config, {**info, "ema": True})
            extra = [fmt for fmt in cfg.output.export_formats if fmt != "diffusers"]
            if extra:
                write_exports(path, folder, extra, name=Path(cfg.output.dir).name)
        return path

    return save


def full_adapter_state(transformer: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """adapter_state() with whole float32 tensors, on every process: a sharded (FSDP2 DTensor) LoRA tensor is
    gathered with `full_tensor()`, a collective, so every process must call this; the frozen base is never read."""
    state, peft_config = adapter_state(transformer)
    return {k: v.detach().float().clone() for k, v in full_tensors(state).items()}, peft_config


def full_tensors(tree):
    """`tree` (nested dicts / lists of tensors) with every DTensor gathered whole: a collective, so every process
    calls it in the same order; plain tensors and other values pass through."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        return tree.full_tensor()
    if isinstance(tree, dict):
        return {key: full_tensors(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(full_tensors(value) for value in tree)
    return tree
