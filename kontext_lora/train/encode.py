"""Encode triples once (VAE latents of targets AND controls, T5 + CLIP embeddings) into the disk cache.

Training then never touches the VAE or the text encoders, which leave the GPU after caching. `fill_cache` computes
only the entries the cache lacks (see `kontext_lora.data.cache` for the keys), and splits them across processes.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from kontext_lora.config import Config
from kontext_lora.data.buckets import render, render_mask
from kontext_lora.data.cache import DiskCache, folder_identity
from kontext_lora.data.plan import CachedDataset, CacheEntries, ImageJob, PlannedSample, cache_entries
from kontext_lora.data.triples import DataError, load_image
from kontext_lora.model.load import (
    DTYPES,
    PIPELINE_PARTS,
    check_model_folder,
    encode_captions,
    encode_images,
    load_pipeline,
    quiet_component_loading,
)
from kontext_lora.progress import progress_bar
from kontext_lora.train.objective import LatentBatch

DIGEST_INDEX = "file_digests.json"  # in the cache folder: the model files' sha256 by path, size and mtime
VAE_PARTS = ("vae",)
TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


class EncodedDataset(Dataset):
    """Per-sample encodings held in memory; items are dicts of CPU tensors (see `LatentBatch` for shapes)."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        return self.items[index[0] if isinstance(index, tuple) else index]


def collate_encoded(items: list[dict]) -> LatentBatch:
    """Stack same-bucket items into a LatentBatch; `control_latents` may be one tensor or a list per item."""
    controls = [item["control_latents"] for item in items]
    controls = [[c] if isinstance(c, torch.Tensor) else list(c) for c in controls]
    if len({len(c) for c in controls}) != 1:
        raise ValueError("a batch mixes samples with different numbers of controls; batch by bucket")
    masks = [item.get("loss_mask") for item in items]
    if any(m is None for m in masks) and not all(m is None for m in masks):
        raise ValueError("a batch mixes samples with and without loss masks; batch by bucket")
    return LatentBatch(
        target_latents=torch.stack([item["target_latents"] for item in items]),  # (B, 16, h, w)
        control_latents=[torch.stack(group) for group in zip(*controls, strict=True)],  # each (B, 16, h_i, w_i)
        prompt_embeds=torch.stack([item["prompt_embeds"] for item in items]),  # (B, L, 4096)
        pooled_embeds=torch.stack([item["pooled_embeds"] for item in items]),  # (B, 768)
        loss_mask=None if masks[0] is None else torch.stack(masks),  # (B, 1, h, w)
    )


# ---------------------------------------------------------------------------------------------------------------
# Disk caches
# ---------------------------------------------------------------------------------------------------------------


def model_identities(cfg: Config) -> tuple[str, str]:
    """(VAE identity, text-encoders identity) from the model files and dtype: part of every cache key."""
    folder, index = Path(cfg.model.pretrained), cache_folder(cfg) / DIGEST_INDEX
    return (
        f"{folder_identity(folder, VAE_PARTS, index)}-{cfg.model.dtype}",
        f"{folder_identity(folder, TEXT_PARTS, index)}-{cfg.model.dtype}",
    )


def cache_folder(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.output.dir) / "cache"


def plan_entries(cfg: Config, plan: list[PlannedSample]) -> CacheEntries:
    vae_identity, text_identity = model_identities(cfg)
    return cache_entries(plan, vae_identity, text_identity, cfg.model.max_sequence_length)


class _RenderJobs(Dataset):
    """Decode + resize + crop/flip one image job (runs in DataLoader workers)."""

    def __init__(self, jobs: list[ImageJob]):
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> torch.Tensor:
        job = self.jobs[index]
        image = load_image(job.ref)
        return (
            render_mask(image, job.bucket, job.transform) if job.is_mask else render(image, job.bucket, job.transform)
        )


@torch.no_grad()
def fill_cache(
    pipe,
    entries: CacheEntries,
    cache: DiskCache,
    max_sequence_length: int,
    batch_size: int = 4,
    num_workers: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    show_progress: bool = True,
    missing: tuple[list[ImageJob], dict[str, str]] | None = None,
) -> int:
    """Compute this process's share of the missing entries and write them as shards; returns how many it wrote.

    `pipe` needs `vae` and the text encoders (the transformer may be None). Shards are flushed as they fill, so an
    interrupted run keeps its work. With several processes, pass `missing` as computed by every process BEFORE any
    of them starts writing, so that all split the same list.
    """
    images, texts = missing if missing is not None else entries.missing(cache)
    images = images[process_index::num_processes]
    text_items = sorted(texts.items())[process_index::num_processes]
    total = len(images) + len(text_items)
    if total == 0:
        return 0
    progress = progress_bar(total=total, desc="caching", unit="entry", show=show_progress)
    with cache.writer(f"p{process_index}") as writer:
        # One caption / image per encoder call: a batched convolution or matmul rounds differently from a single
        # one, so an entry's value would depend on which other entries happened to be missing with it. Encoded
        # alone, an entry recomputed after damage equals the one an uninterrupted run wrote, bit for bit.
        for key, caption in text_items:
            prompt_embeds, pooled_embeds = encode_captions(pipe, [caption], max_sequence_length)
            writer.add(f"{key}.t5", prompt_embeds[0])  # (L, 4096)
            writer.add(f"{key}.clip", pooled_embeds[0])  # (768,)
            progress.update(1)
        groups: dict[tuple, list[ImageJob]] = defaultdict(list)
        for job in images:
            groups[(job.bucket, job.is_mask)].append(job)
        for (_, is_mask), jobs in groups.items():
            loader = DataLoader(_RenderJobs(jobs), batch_size=batch_size, num_workers=num_workers)
            done = 0
            for pixels in loader:
                batch_jobs = jobs[done : done + len(pixels)]
                done += len(pixels)
                # (B, 16, H/8, W/8), each image encoded alone (see above)
                tensors = pixels if is_mask else torch.cat([encode_images(pipe.vae, p[None]) for p in pixels])
                for job, tensor in zip(batch_jobs, tensors, strict=True):
                    writer.add(job.name, tensor.to(pipe.vae.dtype) if not is_mask else tensor)
                progress.update(len(pixels))
    progress.close()
    return total


def load_encoders(cfg: Config):
    """The pipeline without its transformer: all that caching needs (the 12B transformer is never read)."""
    from diffusers import FluxKontextPipeline

    folder = Path(cfg.model.pretrained)
    if not (folder / "model_index.json").is_file():
        return load_pipeline(cfg.model)  # builds the tiny model if asked, or raises the ModelError naming the folder
    check_model_folder(folder, [part for part in PIPELINE_PARTS if part != "transformer"])
    quiet_component_loading()
    pipe = FluxKontextPipeline.from_pretrained(str(folder), transformer=None, dtype=DTYPES[cfg.model.dtype])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def place_encoders(pipe, placement: str, device: torch.device) -> None:
    """memory.text_encoder: `device` puts the VAE and text encoders on `device`; `cpu_offload` keeps them on the CPU
    and moves each onto `device` only while it runs (diffusers' model CPU offload)."""
    if placement == "cpu_offload":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)


def release_encoders(pipe, keep_vae: bool = False) -> None:
    """Move the VAE (unless `keep_vae`, for validation) and text encoders off the accelerator and drop them."""
    pipe.remove_all_hooks()  # model CPU offload's, if any
    for name in ("text_encoder", "text_encoder_2") if keep_vae else ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to("cpu")
            setattr(pipe, name, None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cached_dataset(cfg: Config, plan: list[PlannedSample], pipe, state=None, show_progress: bool = True):
    """Fill the disk cache for `plan` (split across the processes of `state`) and return the CachedDataset."""
    cache = DiskCache(cache_folder(cfg))
    index, count = (state.process_index, state.num_processes) if state is not None else (0, 1)
    with cache.writing(enabled=index == 0):  # another run filling this cache is waited for
        if state is not None:
            state.wait_for_everyone()
        entries = plan_entries(cfg, plan)
        cache.refresh()
        cache.verify([*entries.images, *(f"{key}.{kind}" for key in entries.texts for kind in ("t5", "clip"))])
        todo = entries.missing(cache)
        missing = sum(len(part) for part in todo)
        if state is not None:
            state.wait_for_everyone()  # every process has listed the same missing entries before any is written
        fill_cache(
            pipe, entries, cache, cfg.model.max_sequence_length, batch_size=max(1, cfg.train.batch_size),
            num_workers=cfg.data.num_workers, process_index=index, num_processes=count, show_progress=show_progress,
            missing=todo,
        )  # fmt: skip
        if state is not None:
            state.wait_for_everyone()
    cache.refresh()
    images, texts = entries.missing(cache)
    if images or texts:
        raise DataError(f"cache {cache.folder} still lacks {len(images) + len(texts)} entries after caching")
    if show_progress:
        reused = len(entries.images) + len(entries.texts) - missing
        print(f"[kontext-lora] cache {cache.folder}: {missing} entries computed, {reused} reused")
    return CachedDataset(plan, entries, cache)
