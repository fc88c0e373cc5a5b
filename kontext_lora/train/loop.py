"""The training recipe: config -> data -> model + LoRA -> accelerate loop -> diffusers-format adapter.

`train` checks the data, fills the cache and loads the model; `fit` trains the LoRA on the cached encodings: its
setup functions build the adapter, the data stream, the optimizer and scheduler, and its loop runs the steps.
What a step computes is in objective.py, the data stream in batches.py, the run folder's state in run_state.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from torch.utils.data import Dataset

from kontext_lora.config import Config, to_dict, to_flat_dict, to_yaml
from kontext_lora.data.buckets import bucket_table
from kontext_lora.data.plan import build_plan
from kontext_lora.data.preflight import preflight, write_contact_sheet
from kontext_lora.data.triples import DataError
from kontext_lora.export.card import comfyui_note
from kontext_lora.export.diffusers_format import WEIGHT_NAME
from kontext_lora.export.formats import export_file_names
from kontext_lora.model.load import load_transformer, prepare_model_folder
from kontext_lora.model.lora import lora_parameters
from kontext_lora.model.quant import quantization_report
from kontext_lora.model.speed import apply_memory_and_speed, validation_mode
from kontext_lora.planner import apply_budget
from kontext_lora.progress import progress_bar
from kontext_lora.train import checkpoint, run_state
from kontext_lora.train.adapter import add_adapter
from kontext_lora.train.batches import set_deepspeed_batch_size, training_batches
from kontext_lora.train.ema import AdapterEMA
from kontext_lora.train.encode import cached_dataset, load_encoders, place_encoders, release_encoders
from kontext_lora.train.job import JOB_NAME, JobLog, JobOutOfMemory, peak_allocated_gib
from kontext_lora.train.objective import micro_batch_seed, training_step
from kontext_lora.train.optim import NonFiniteGuard, build_optimizer
from kontext_lora.train.run_state import RunState, TrainingError
from kontext_lora.train.stop import TrainingStopped, requested, stop_on_signal
from kontext_lora.train.validation import Validator, split_heldout, validation_items


def train(cfg: Config) -> Path:
    """Run a whole training job from the config; returns the path of the final adapter."""
    accelerator = _accelerator(cfg)
    set_seed(cfg.train.seed)

    # Data: preflight checks every file before any model is loaded, so bad input fails in seconds
    # (and leaves no run folder behind); warnings are printed and training goes on.
    main = accelerator.is_main_process
    report = preflight(cfg.data, show_progress=main)
    accelerator.print(report.table())
    report.raise_on_errors()
    plan = build_plan(cfg.data, report)
    items = None
    if cfg.validation.every:  # validation images are read now too, so a bad one fails before the model loads
        heldout: list = []
        if cfg.validation.heldout_count:
            plan, heldout = split_heldout(plan, cfg.validation.heldout_count, cfg.train.seed)
        items = validation_items(cfg, [sample.triple for sample in heldout])
    if not plan:
        raise DataError("no usable triples: every triple was skipped (see the preflight warnings above)")
    accelerator.print(f"[kontext-lora] {len(plan)} triples from {len(cfg.data.datasets)} dataset(s)")
    accelerator.print(bucket_table([sample.bucket_key for sample in plan]))
    # memory.budget_gib: the planner's knobs for the buckets in use, recorded in the run's config.yaml below.
    cfg = apply_budget(cfg, accelerator.print, bucket_keys=[sample.bucket_key for sample in plan])
    out_dir = Path(cfg.output.dir)
    with run_state.run_lock(out_dir, enabled=main):  # held until the run ends: one run per folder at a time
        run_state.resume_folder(cfg, out_dir)  # a bad train.resume fails now, not after the model has loaded
        if main:  # a missing or damaged model file too, before anything is written in the run folder
            prepare_model_folder(cfg.model)
        accelerator.wait_for_everyone()
        if main:
            run_state.claim(cfg, out_dir)
            (out_dir / checkpoint.CONFIG_NAME).write_text(to_yaml(cfg))
            write_contact_sheet(report, out_dir / checkpoint.PREFLIGHT_NAME, cfg.data.preflight_samples)
        return _load_and_fit(cfg, plan, items, accelerator)


def _load_and_fit(cfg: Config, plan: list, items: list | None, accelerator: Accelerator) -> Path:
    """Fill the cache, load the transformer and train (train()'s second half, inside the run folder's lock)."""
    main = accelerator.is_main_process
    out_dir = Path(cfg.output.dir)
    # Model: fill the disk cache with the encoders alone (memory.text_encoder places them), release them, and only
    # then load the transformer: T5 (9.5 GiB) and the transformer (22.4 GiB in bf16) are never on the device together.
    job = JobLog(out_dir / JOB_NAME, accelerator.device, write=main)
    with job.phase("cache"):
        pipe = load_encoders(cfg)
        place_encoders(pipe, cfg.memory.text_encoder, accelerator.device)
        encoded = cached_dataset(cfg, plan, pipe, accelerator, show_progress=main)
        validator = None
        if items is not None:  # encodes the validation prompts now; keeps the VAE for sampling
            validator = Validator(cfg, pipe, items, accelerator)
        release_encoders(pipe, keep_vae=validator is not None)
        if validator is not None:
            validator.vae.to(accelerator.device)
        del pipe
    # A quantized or partly swapped base goes to the device layer by layer in fit() (apply_memory_and_speed); a plain
    # one goes there now.
    on_cpu = cfg.memory.base_quant != "none" or cfg.memory.block_swap > 0
    with job.phase("load"):
        transformer = load_transformer(cfg.model, None if on_cpu else accelerator.device)
    return fit(cfg, transformer, encoded, accelerator, validator=validator, job=job)


def _accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator: mixed precision, gradient accumulation and the tracker from the config."""
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation,
        log_with=None if cfg.logging.report_to == "none" else cfg.logging.report_to,
        project_dir=cfg.output.dir,
    )


@stop_on_signal  # SIGTERM / SIGINT: checkpoint at the next step boundary, then TrainingStopped
def fit(cfg: Config, transformer: torch.nn.Module, encoded: Dataset, accelerator: Accelerator | None = None, *,
        pipeline=None, validator: Validator | None = None, job: JobLog | None = None) -> Path:  # fmt: skip
    """Inject the LoRA into `transformer` and train it on cached encodings; returns the final adapter's path.

    Validation (validation.every) needs a `validator` (see train()) or the FluxKontextPipeline whose transformer
    this is (`pipeline`: its VAE, scheduler and text encoders build one on validation.examples / heldout_path).
    """
    accelerator = accelerator or _accelerator(cfg)
    with run_state.run_lock(Path(cfg.output.dir), enabled=accelerator.is_main_process):
        return _fit(cfg, transformer, encoded, accelerator, pipeline, validator, job)


def _fit(cfg: Config, transformer: torch.nn.Module, encoded: Dataset, accelerator: Accelerator, pipeline,
         validator: Validator | None, job: JobLog | None) -> Path:  # fmt: skip
    out_dir = Path(cfg.output.dir)
    if accelerator.is_main_process:  # done by train() already; fit() may be called on its own (before the trackers)
        run_state.claim(cfg, out_dir)
    # The adapter's initial weights depend on train.seed alone, not on how many random numbers loading and
    # caching drew before (which differs between a cold and a warm cache, and between processes).
    set_seed(cfg.train.seed)
    job = job or JobLog(out_dir / JOB_NAME, accelerator.device, write=accelerator.is_main_process)
    _setup_model(cfg, transformer, accelerator, job)
    batches = training_batches(encoded, cfg, accelerator)
    optimizer, scheduler = _setup_optimizer(cfg, transformer, accelerator)
    set_deepspeed_batch_size(accelerator, cfg.train.batch_size)
    transformer, optimizer, scheduler = accelerator.prepare(transformer, optimizer, scheduler)
    params = lora_parameters(accelerator.unwrap_model(transformer))  # FSDP2 replaces them with sharded ones
    _setup_trackers(cfg, accelerator, out_dir)
    # Reseeded per micro-batch from its global index (micro_batch_seed): N processes draw the noise one would.
    noise_generator = torch.Generator(device=accelerator.device)
    ema = AdapterEMA(params, cfg.ema) if cfg.ema.enabled else None
    save = run_state.adapter_saver(accelerator, transformer, cfg, ema)
    guard = NonFiniteGuard(cfg.optim.nonfinite_limit)
    validator = _setup_validator(cfg, validator, pipeline, accelerator)
    state = RunState(accelerator, transformer, optimizer, scheduler, ema, batches, noise_generator)
    step = run_state.start_or_resume(cfg, out_dir, state)
    progress = progress_bar(total=cfg.train.steps, initial=step, desc="training", unit="step",
                            show=accelerator.is_main_process)  # fmt: skip
    if validator is not None and cfg.validation.at_start and step == 0:  # the base model, as the reference
        _validate(validator, transformer, 0, save, ema, job, accelerator, final=False)
    loss_sum, micro, tick, first = 0.0, 0, time.perf_counter(), step
    step_start = batches.consumed  # the data position a checkpoint written after an out-of-memory error records
    transformer.train()
    try:
        while step < cfg.train.steps:
            with job.phase("first_step" if step == first else "train"), accelerator.accumulate(transformer):
                batch = next(batches)
                noise_generator.manual_seed(micro_batch_seed(cfg.train.seed, batches.global_index))
                loss = training_step(transformer, batch, cfg, noise_generator)
                if guard.skip(loss, accelerator, step):
                    for param in params:  # drop this step's gradients (the wrapped optimizer zeroes only at sync)
                        param.grad = None
                    if not guard.exhausted:
                        continue
                    raise _nonfinite_error(loss, guard, step, out_dir, save)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum, micro = loss_sum + loss.detach().float().item(), micro + 1
            if not accelerator.sync_gradients:
                continue
            step, step_start = step + 1, batches.consumed
            if ema is not None:
                ema.update(step)
            _log_step(cfg, accelerator, progress, step, loss_sum / micro, scheduler, time.perf_counter() - tick)
            loss_sum, micro = 0.0, 0
            if validator is not None and step % cfg.validation.every == 0 and step < cfg.train.steps:
                _validate(validator, transformer, step, save, ema, job, accelerator, final=False)
            saved = cfg.output.save_every and (step % cfg.output.save_every == 0 or step == cfg.train.steps)
            if saved:  # the last step's too: a resume of a finished run is a no-op
                with job.phase("save"):
                    state.save(step, out_dir, save, cfg.output.keep_last)
            if step < cfg.train.steps and (signal_name := requested(accelerator)):
                if not saved:
                    state.save(step, out_dir, save, cfg.output.keep_last)
                accelerator.end_training()
                path = checkpoint.step_dir(out_dir, step)
                raise TrainingStopped(f"stopped by {signal_name} at step {step}; checkpoint {path} kept, continue "
                                      "with train.resume=latest")  # fmt: skip
            tick = time.perf_counter()  # s_per_step times the step itself: not the validation or the save after it
        progress.close()
        with job.phase("save"):
            final = save(step, out_dir)
        if validator is not None and step > first:  # after the final adapter is written: nothing is lost to it
            _validate(validator, transformer, step, save, ema, job, accelerator, final=True)
    except JobOutOfMemory as exc:
        loss = batch = None  # noqa: F841  (drop the failed step's graph before the checkpoint is written)
        raise TrainingError(state.save_after_oom(exc, step, step_start, out_dir, save, cfg.output.keep_last)) from None
    finally:
        progress.close()  # before any error line, which would otherwise land inside the bar
        job.flush()
    accelerator.end_training()
    _report(cfg, accelerator, final, validator)
    return final


def _setup_model(cfg: Config, transformer: torch.nn.Module, accelerator: Accelerator, job: JobLog) -> None:
    """The LoRA injected (from lora.init_from when set), then the memory and speed settings applied to the model."""
    with job.phase("setup"):
        add_adapter(transformer, cfg)
        applied = apply_memory_and_speed(transformer, cfg, accelerator.device)
    accelerator.print(f"[kontext-lora] fast path: {applied}, base_quant: {quantization_report(transformer)}")


def _setup_optimizer(cfg: Config, transformer: torch.nn.Module, accelerator: Accelerator) -> tuple:
    """The optimizer over the LoRA parameters and its learning-rate schedule (counted in scheduler steps: accelerate
    steps a prepared scheduler once per process each optimizer step)."""
    optimizer = build_optimizer(lora_parameters(transformer), cfg)
    scheduler = get_scheduler(
        cfg.train.scheduler, optimizer, num_warmup_steps=cfg.train.warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.train.steps * accelerator.num_processes,
    )  # fmt: skip
    return optimizer, scheduler


def _setup_trackers(cfg: Config, accelerator: Accelerator, out_dir: Path) -> None:
    """logging.report_to's tracker (tensorboard / wandb), given the whole config as its hyperparameters."""
    if cfg.logging.report_to == "none":
        return
    wandb = cfg.logging.report_to == "wandb"
    accelerator.init_trackers(
        cfg.logging.wandb_project if wandb else "logs", config=to_flat_dict(to_dict(cfg)),
        init_kwargs={"wandb": {"mode": cfg.logging.wandb_mode, "dir": str(out_dir), "name": out_dir.name,
                               "group": cfg.logging.wandb_group or None}} if wandb else {},
    )  # fmt: skip


def _setup_validator(cfg: Config, validator: Validator | None, pipeline, accelerator: Accelerator) -> Validator | None:
    """The validator to use: the one given, else one built from `pipeline`; None when validation.every is 0."""
    if validator is None and pipeline is not None and cfg.validation.every:
        validator = Validator(cfg, pipeline, validation_items(cfg), accelerator)
    return validator if cfg.validation.every else None


def _log_step(cfg: Config, accelerator: Accelerator, progress, step: int, loss: float, scheduler,
              seconds: float) -> None:  # fmt: skip
    """Show step `step` (its mean micro-batch loss on this process: `loss`) on the progress bar, send it to the
    tracker every logging.log_every steps, and append it to metrics.jsonl."""
    logs = {"loss": run_state.mean_over_processes(accelerator, loss), "lr": scheduler.get_last_lr()[0],
            "s_per_step": seconds}  # fmt: skip
    progress.update(1)
    progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", s_step=f"{seconds:.2f}")
    if step % cfg.logging.log_every == 0:
        accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        record = {"step": step, **logs, "peak_gib": peak_allocated_gib(accelerator.device)}
        run_state.append_metrics(Path(cfg.output.dir), record)


def _nonfinite_error(loss: torch.Tensor, guard: NonFiniteGuard, step: int, out_dir: Path, save) -> TrainingError:
    """The error that ends a run after optim.nonfinite_limit non-finite losses in a row, the last good adapter saved."""
    folder = checkpoint.step_dir(out_dir, step)
    # A complete checkpoint of this step already holds this adapter: it is never written over.
    path = folder / WEIGHT_NAME if checkpoint.is_complete(folder) else save(step, folder)
    return TrainingError(
        f"loss is {loss.item()} at step {step + 1}, {guard.in_a_row} non-finite in a row (try a lower "
        f"train.lr or mixed_precision=no); the adapter of step {step} was saved to {path}"
    )


def _report(cfg: Config, accelerator: Accelerator, final: Path, validator: Validator | None) -> None:
    """Print where the adapter went, how to use its ComfyUI export, and the validation summary."""
    accelerator.print(f"[kontext-lora] adapter written to {final}")
    comfyui = final.parent / export_file_names(Path(cfg.output.dir).name)["comfyui"]
    if comfyui.is_file():
        accelerator.print(f"[kontext-lora] {comfyui_note(str(comfyui), cfg.lora.rank, cfg.lora.alpha)}")
    if validator is not None:
        accelerator.print(validator.summary(final))


def _validate(validator: Validator, transformer: torch.nn.Module, step: int, save, ema: AdapterEMA | None, job: JobLog,
              accelerator: Accelerator, final: bool) -> None:  # fmt: skip
    """Run validation in eval mode as its own job phase, on the eager model (`validation_mode`)."""
    transformer.eval()
    with job.phase("validation"), validation_mode(release_compiled=final):
        validator.run(step, accelerator.unwrap_model(transformer), save, ema)
    transformer.train()
