"""Validation during training: sample edits, held-out flow-matching loss, edit metrics, best checkpoint.

Every `validation.every` steps (and at the end) the `Validator`
- takes the held-out flow-matching loss of the validation items that have a target, at the fixed
  `validation.sigmas` and a noise drawn once from `validation.seed` (so two calls on the same weights agree);
- samples each item (up to `validation.max_images`) with a FluxKontextPipeline built around the training
  transformer (LoRA active, eval mode) and the run's VAE and scheduler, and writes control | output | target grids
  to <output.dir>/validation/step-NNNNNN/ and to the trackers (tensorboard / wandb);
- measures the edit: `edit_l1` and `edit_psnr` of the output against the target (pixels in [0, 1]),
  `edit_outside_change`, the mean change of the output against the control outside the edit region (the item's
  mask, else the pixels where target and control differ by more than `EDIT_THRESHOLD`), and `edit_saturation`,
  the outputs' mean colour saturation (`saturation`: 0 for black and white);
- appends {"step", "heldout_loss", "edit_*"} to metrics.jsonl and keeps the best step by `validation.best_metric`
  in best/ (adapter) and best.json.

The prompts are encoded once here, so the text encoders (T5 is 9 GiB for the real model) are not kept for
validation: only the VAE stays.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from kontext_lora.atomic import atomic_save_image, atomic_write_text
from kontext_lora.config import Config
from kontext_lora.data.triples import DataError, Triple, discover_triples, image_to_tensor, load_image
from kontext_lora.export.formats import export_file_names
from kontext_lora.model.load import encode_captions, encode_images
from kontext_lora.progress import progress_bar
from kontext_lora.train import checkpoint, run_state
from kontext_lora.train.checkpoint import BEST_DIR, BEST_JSON, VALIDATION_DIR
from kontext_lora.train.objective import LatentBatch, flow_matching_loss

EDIT_THRESHOLD = 0.05  # |target - control| (mean over RGB, pixels in [0, 1]) above which a pixel counts as edited
_MAXIMISED = {"edit_psnr"}


@dataclass
class ValidationItem:
    """One validation edit; images are square crops at data.resolution."""

    name: str
    control: Image.Image
    prompt: str
    target: Image.Image | None = None
    mask: np.ndarray | None = None  # (R, R) bool, True inside the edit region


def split_heldout(triples: list, count: int, seed: int) -> tuple[list, list]:
    """Hold `count` triples (a pick seeded by `seed`) out of training: returns (training, held out), both sorted."""
    if count >= len(triples):
        raise DataError(
            f"config key `validation.heldout_count`: {count} held-out triples leave none of the {len(triples)} "
            "for training; lower it or use validation.heldout_path"
        )
    picked = set(random.Random(seed).sample(range(len(triples)), count))
    return [t for i, t in enumerate(triples) if i not in picked], [t for i, t in enumerate(triples) if i in picked]


def validation_items(cfg: Config, heldout: list[Triple] = ()) -> list[ValidationItem]:
    """Load the configured examples, the heldout_path triples and `heldout` (all images read now: bad files fail
    before training, naming the file)."""
    resolution = cfg.data.resolution
    crop = lambda path: _to_image(image_to_tensor(load_image(path), resolution))  # noqa: E731
    items = []
    for i, example in enumerate(cfg.validation.examples):
        mask = _mask(example.mask, resolution) if example.mask else None
        target = crop(example.target) if example.target else None
        items.append(ValidationItem(f"example-{i}-{Path(example.control).stem}", crop(example.control),
                                    example.prompt, target, mask))  # fmt: skip
    triples = list(heldout)
    if cfg.validation.heldout_path:
        triples += discover_triples(cfg.validation.heldout_path)
    for triple in (t for t in triples if t.control is not None):  # text-to-image pairs have nothing to edit
        mask_path = getattr(triple, "mask", None)  # datasets that carry edit masks
        mask = _mask(mask_path, resolution) if mask_path else None
        items.append(ValidationItem(f"heldout-{triple.stem}", crop(triple.control), triple.caption,
                                    crop(triple.target), mask))  # fmt: skip
    return items


class Validator:
    """Runs validation on the training transformer; see the module docstring."""

    def __init__(self, cfg: Config, pipe, items: list[ValidationItem], accelerator: Accelerator):
        from diffusers import FluxKontextPipeline

        if not items:
            raise ValueError("validation has no items: set validation.examples, heldout_path or heldout_count")
        self.cfg, self.items, self.accelerator = cfg, items, accelerator
        self.out_dir = Path(cfg.output.dir)
        self.pipeline_class = FluxKontextPipeline
        self.vae, self.scheduler = pipe.vae, pipe.scheduler
        prompts = [item.prompt for item in items]
        with torch.no_grad():
            prompt_embeds, pooled_embeds = encode_captions(pipe, prompts, cfg.model.max_sequence_length)
        self.prompt_embeds, self.pooled_embeds = prompt_embeds.cpu(), pooled_embeds.cpu()  # (N, L, 4096), (N, 768)

        # Held-out loss inputs: items with a target, with one fixed noise each (drawn once, on the CPU).
        self.loss_index = [i for i, item in enumerate(items) if item.target is not None]
        self.loss_batch: LatentBatch | None = None
        if self.loss_index:
            pixels = lambda images: torch.stack([_to_tensor(image) for image in images])  # noqa: E731
            with torch.no_grad():
                target_latents = encode_images(self.vae, pixels([items[i].target for i in self.loss_index])).cpu()
                control_latents = encode_images(self.vae, pixels([items[i].control for i in self.loss_index])).cpu()
            self.loss_batch = LatentBatch(target_latents, control_latents, self.prompt_embeds[self.loss_index],
                                          self.pooled_embeds[self.loss_index])  # fmt: skip
            generator = torch.Generator().manual_seed(cfg.validation.seed)
            self.loss_noise = torch.randn(target_latents.shape, generator=generator)  # (N_t, 16, h, w)
        self.best = _read_best(self.out_dir, cfg.validation.best_metric)
        self.records: list[dict[str, Any]] = []  # this run's records, in step order (for `summary`)

    # ----------------------------------------------------------------------------------------------- running

    def run(self, step: int, transformer: torch.nn.Module, save_adapter, ema=None) -> dict[str, Any]:
        """Validate the (unwrapped) transformer at `step`; returns the metrics record written to metrics.jsonl.

        Under DDP the loss chunks and the sampled items are shared out across the processes and the results gathered
        (`_share`); under FSDP2 (a collective forward) and DeepSpeed every process runs all of it. Either way every
        process ends with the same record, so the best-adapter save stays collective; only the main process writes.
        """
        use_ema = self.cfg.validation.use_ema and ema is not None
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), ema.applied() if use_ema else contextlib.nullcontext():
            record: dict[str, Any] = {"step": step}
            if self.loss_batch is not None:
                record["heldout_loss"] = self.heldout_loss(transformer)
            outputs = self.sample(transformer, desc=f"validation at step {step}")
        record.update(self._edit_metrics(outputs))
        if self.accelerator.is_main_process:
            self._write_grids(step, outputs)
            run_state.append_metrics(self.out_dir, record)
        self.accelerator.log({f"val/{k}": v for k, v in record.items() if k != "step" and v is not None}, step=step)
        self._update_best(step, record, save_adapter)
        self.records.append(record)
        return record

    def summary(self, adapter: Path) -> str:
        """A few lines for the end of a run: held-out loss and edit metrics at the first and the last validation of
        this run, and where the grids, the adapter and its exports are."""
        lines = []
        if self.records:
            first, last = self.records[0], self.records[-1]
            lines.append(f"validation, step {first['step']} -> {last['step']}:")
            for key in ("heldout_loss", "edit_psnr", "edit_l1", "edit_saturation"):
                if first.get(key) is not None and last.get(key) is not None:
                    change = f" ({last[key] / first[key] - 1:+.0%})" if first[key] else ""
                    lines.append(f"  {key:16s} {first[key]:9.4f} -> {last[key]:9.4f}{change}")
            grids = self.out_dir / VALIDATION_DIR
            lines.append(f"  grids (control | output | target): {grids}/step-{first['step']:06d}/ .. "
                         f"step-{last['step']:06d}/")  # fmt: skip
        lines.append(f"adapter: {adapter}")
        names = export_file_names(self.out_dir.name)
        exports = [str(self.out_dir / names[fmt]) for fmt in self.cfg.output.export_formats if fmt != "diffusers"]
        if exports:
            lines.append(f"exports: {', '.join(exports)} (and README.md, the model card)")
        if self.best is not None:
            lines.append(f"best ({self.best['metric']} {self.best['value']:.4f}, step {self.best['step']}): "
                         f"{self.out_dir / BEST_DIR}/")  # fmt: skip
        return "\n".join(lines)

    @property
    def _sharing(self) -> int:
        """How many processes share validation's work: all of them under DDP, where the unwrapped module's forward
        has no collective (so processes may run different counts); 1 otherwise (FSDP2's forward is collective)."""
        accelerator = self.accelerator
        return accelerator.num_processes if accelerator.distributed_type.name.startswith("MULTI_") else 1

    def _share(self, jobs: int) -> range:
        """The job indices (of `jobs`) this process runs: every N-th from its rank when N processes share."""
        return range(self.accelerator.process_index, jobs, self._sharing) if self._sharing > 1 else range(jobs)

    def _gather(self, results: list[tuple[int, Any]]) -> list[Any]:
        """Every process's (job index, result) pairs, on every process, as results in job order."""
        if self._sharing > 1:
            from accelerate.utils import gather_object

            results = sorted(gather_object(results), key=lambda pair: pair[0])
        return [result for _, result in results]

    @torch.no_grad()
    def heldout_loss(self, transformer: torch.nn.Module, chunk: int = 8) -> float:
        """Mean flow-matching loss over the held-out items x validation.sigmas, with the fixed noise; summed in the
        same (sigma, chunk) order however many processes share the chunks, so the value does not depend on N."""
        device, batch = self.accelerator.device, self.loss_batch
        jobs = [(s, start) for s in self.cfg.validation.sigmas for start in range(0, len(self.loss_noise), chunk)]
        results = []
        for job in self._share(len(jobs)):
            sigma, start = jobs[job]
            part = _rows(batch, start, start + chunk).to(device)
            noise = self.loss_noise[start : start + chunk].to(device)
            sigmas = torch.full((noise.shape[0],), float(sigma), device=device)
            with self.accelerator.autocast():
                loss = flow_matching_loss(transformer, part, sigmas, noise, self.cfg.model.guidance)
            results.append((job, (loss.item() * noise.shape[0], noise.shape[0])))
        total, count = 0.0, 0
        for weighted, size in self._gather(results):
            total, count = total + weighted, count + size
        return total / count

    @torch.no_grad()
    def sample(self, transformer: torch.nn.Module, desc: str = "validation") -> list[np.ndarray]:
        """Edit the first `max_images` items; returns (R, R, 3) float arrays in [0, 1]. A bar counts the denoising
        steps of this process's items (the pipeline's own bar, one per image, stays off)."""
        pipe = self.pipeline_class(scheduler=self.scheduler, vae=self.vae, text_encoder=None, tokenizer=None,
                                   text_encoder_2=None, tokenizer_2=None, transformer=transformer)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        size, device, outputs = self.cfg.data.resolution, self.accelerator.device, []
        items = self.items[: self.cfg.validation.max_images]
        mine = self._share(len(items))
        bar = progress_bar(total=len(mine) * self.cfg.validation.steps, desc=desc, unit="step",
                           show=self.accelerator.is_main_process)  # fmt: skip

        def count_step(pipe, index, timestep, tensors):
            bar.update(1)
            return tensors

        for i in mine:
            item = items[i]
            with self.accelerator.autocast():
                image = pipe(
                    image=item.control, prompt_embeds=self.prompt_embeds[i : i + 1].to(device),
                    pooled_prompt_embeds=self.pooled_embeds[i : i + 1].to(device), height=size, width=size,
                    max_area=size * size, _auto_resize=False, num_inference_steps=self.cfg.validation.steps,
                    guidance_scale=self.cfg.validation.guidance, output_type="np",
                    generator=torch.Generator().manual_seed(self.cfg.validation.seed + i),
                    callback_on_step_end=count_step,
                ).images[0]  # fmt: skip
            outputs.append((i, np.clip(image.astype(np.float32), 0.0, 1.0)))
        bar.close()
        return self._gather(outputs)

    # ------------------------------------------------------------------------------------------------ metrics

    def _edit_metrics(self, outputs: list[np.ndarray]) -> dict[str, float | None]:
        record = {"edit_saturation": float(np.mean([saturation(output) for output in outputs]))} if outputs else {}
        l1, mse, outside = [], [], []
        for item, output in zip(self.items, outputs, strict=False):
            if item.target is None:
                continue
            control, target = _to_array(item.control), _to_array(item.target)
            l1.append(float(np.abs(output - target).mean()))
            mse.append(float(((output - target) ** 2).mean()))
            edited = item.mask if item.mask is not None else np.abs(target - control).mean(axis=-1) > EDIT_THRESHOLD
            if (~edited).any():
                outside.append(float(np.abs(output - control)[~edited].mean()))
        if not l1:
            return record
        psnr = [10.0 * math.log10(1.0 / max(m, 1e-10)) for m in mse]
        return {
            "edit_l1": float(np.mean(l1)),
            "edit_psnr": float(np.mean(psnr)),
            "edit_outside_change": float(np.mean(outside)) if outside else None,
            **record,
        }

    def _write_grids(self, step: int, outputs: list[np.ndarray]) -> None:
        folder = self.out_dir / VALIDATION_DIR / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        images = {}
        for item, output in zip(self.items, outputs, strict=False):
            panels = [item.control, Image.fromarray((output * 255).round().astype(np.uint8))]
            panels += [item.target] if item.target is not None else []
            grid = Image.new("RGB", (sum(p.width for p in panels), panels[0].height))
            for i, panel in enumerate(panels):
                grid.paste(panel, (i * panels[0].width, 0))
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.name)
            atomic_save_image(grid, folder / f"{name}.png", "PNG")
            images[f"validation/{name}"] = np.asarray(grid)[None]  # (1, H, W, 3) uint8
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images(images, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images(images, step=step)

    def _update_best(self, step: int, record: dict[str, Any], save_adapter) -> None:
        """Keep the best step's adapter in best/ and its record in best.json (written after best/ is in place)."""
        metric = self.cfg.validation.best_metric
        value = record.get(metric)
        if metric == "none" or value is None:
            return
        if self.best is not None:
            better = value > self.best["value"] if metric in _MAXIMISED else value < self.best["value"]
            if not better:
                return
        tmp, final = self.out_dir / ".tmp-best", self.out_dir / BEST_DIR
        if self.accelerator.is_main_process:
            tmp.mkdir(parents=True, exist_ok=True)
        save_adapter(step, tmp)  # collective: every process reaches this line
        self.best = {"metric": metric, "value": value, "step": step, "adapter": f"{BEST_DIR}/"}
        if self.accelerator.is_main_process:
            checkpoint.replace_dir(tmp, final)
            atomic_write_text(self.out_dir / BEST_JSON, json.dumps(self.best, indent=2))


def saturation(image: np.ndarray) -> float:
    """Mean colour saturation of an (H, W, 3) image in [0, 1]: the chroma max - min over RGB, 0 for a grey pixel.

    Chroma rather than HSV's (max - min) / max, which blows up the noise of near-black pixels (dark photos)."""
    return float((image.max(axis=-1) - image.min(axis=-1)).mean())


def _read_best(out_dir: Path, metric: str) -> dict[str, Any] | None:
    """The best record of an earlier (resumed) run in this folder, if it ranks by the same metric."""
    try:
        best = json.loads((out_dir / BEST_JSON).read_text())
    except (OSError, ValueError):
        return None
    return best if best.get("metric") == metric and isinstance(best.get("value"), (int, float)) else None


def _to_image(pixels: torch.Tensor) -> Image.Image:
    """(3, R, R) in [-1, 1] -> RGB image."""
    array = ((pixels.permute(1, 2, 0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(array)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> (3, R, R) in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0  # (R, R, 3) in [0, 1]


def _mask(path: str | Path, resolution: int) -> np.ndarray:
    """A mask image cropped like the images; white (> 50%) marks the edit region. -> (R, R) bool."""
    return (image_to_tensor(load_image(path), resolution).mean(dim=0) > 0.0).numpy()


def _rows(batch: LatentBatch, start: int, end: int) -> LatentBatch:
    """Samples start:end of a batch (every control and the optional mask sliced alike)."""
    mask = None if batch.loss_mask is None else batch.loss_mask[start:end]
    return LatentBatch(batch.target_latents[start:end], [c[start:end] for c in batch.control_latents],
                       batch.prompt_embeds[start:end], batch.pooled_embeds[start:end], loss_mask=mask)  # fmt: skip
