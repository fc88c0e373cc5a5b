"""From checked triples to cache entries and the cached training dataset.

`build_plan` gives every usable triple its buckets and transform variants; `cache_entries` names (by content
hash) every tensor that training will read; `CachedDataset` serves them. The encoders themselves live in
`kontext_lora.train.encode`: this module knows nothing of models beyond their identity strings.
"""

from __future__ import annotations

import random
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from kontext_lora.config import DataConfig
from kontext_lora.data.buckets import (
    RENDER_VERSION,
    Bucket,
    Transform,
    bucket_list,
    nearest_bucket,
    transform_variants,
)
from kontext_lora.data.cache import DiskCache, content_digest, entry_key
from kontext_lora.data.preflight import PreflightReport
from kontext_lora.data.triples import ImageRef, Triple


@dataclass(frozen=True)
class PlannedSample:
    """One usable triple with its sizes, augmentation variants and caption settings."""

    triple: Triple
    dataset: int
    target_bucket: Bucket
    control_buckets: tuple[Bucket, ...]
    transforms: tuple[Transform, ...]
    captions: tuple[str, ...]  # trigger word applied; one is drawn per step
    caption_dropout: float
    weight: float  # draws per epoch (weight x repeats)

    @property
    def bucket_key(self) -> Hashable:
        """Samples with equal keys can share a batch: same target size, same number and sizes of controls."""
        return (self.target_bucket, self.control_buckets, self.triple.mask is not None)


def build_plan(data: DataConfig, report: PreflightReport) -> list[PlannedSample]:
    """Assign buckets and variants to every usable triple of the preflight report."""
    samples = []
    for index, (ds, triples) in enumerate(zip(data.datasets, report.usable, strict=True)):
        buckets = bucket_list(data.buckets, ds.resolution or data.resolution, data.max_aspect_ratio)
        for triple in triples:
            target_bucket = nearest_bucket(*report.sizes[triple.target], buckets)
            if data.control_bucket == "own":
                controls = tuple(nearest_bucket(*report.sizes[c], buckets) for c in triple.controls)
            else:
                controls = tuple(target_bucket for _ in triple.controls)
            captions = tuple(_with_trigger(line, ds.trigger_word) for line in triple.captions)
            samples.append(
                PlannedSample(
                    triple=triple,
                    dataset=index,
                    target_bucket=target_bucket,
                    control_buckets=controls,
                    transforms=tuple(transform_variants(triple.stem, ds.flip, ds.random_crop, data.crop_variants)),
                    captions=captions,
                    caption_dropout=ds.caption_dropout,
                    weight=ds.weight * ds.repeats,
                )
            )
    return samples


def _with_trigger(caption: str, trigger: str) -> str:
    if not trigger:
        return caption
    return f"{trigger}, {caption}" if caption else trigger


@dataclass(frozen=True)
class ImageJob:
    """One image to encode: the latent (or mask) stored under `name`."""

    name: str
    ref: ImageRef
    bucket: Bucket
    transform: Transform
    is_mask: bool = False


@dataclass
class CacheEntries:
    """Every tensor name training reads, and what computes each one."""

    samples: list[dict] = field(default_factory=list)  # per planned sample: names per variant / caption
    images: dict[str, ImageJob] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)  # text key -> caption
    empty_text: str = ""

    def missing(self, cache: DiskCache) -> tuple[list[ImageJob], dict[str, str]]:
        images = [job for name, job in self.images.items() if name not in cache]
        texts = {key: caption for key, caption in self.texts.items() if f"{key}.t5" not in cache}
        return images, texts


def text_key(caption: str, text_identity: str, max_sequence_length: int) -> str:
    return entry_key("text", caption, text_identity, max_sequence_length)


def cache_entries(
    plan: list[PlannedSample], vae_identity: str, text_identity: str, max_sequence_length: int
) -> CacheEntries:
    """Name every tensor by a hash of (file bytes, model identity, bucket, transform) or (caption, encoders)."""
    entries = CacheEntries()
    entries.empty_text = text_key("", text_identity, max_sequence_length)
    entries.texts[entries.empty_text] = ""  # caption dropout substitutes it at batch time
    for sample in plan:
        triple = sample.triple
        variants = []
        for transform in sample.transforms:
            names = {}
            images = [("target", triple.target, sample.target_bucket)]
            images += [
                (f"control{i}", ref, b)
                for i, (ref, b) in enumerate(zip(triple.controls, sample.control_buckets, strict=True))
            ]
            for role, ref, bucket in images:
                name = entry_key("latent", content_digest(ref), vae_identity, bucket, transform.key(), RENDER_VERSION)
                entries.images[name] = ImageJob(name, ref, bucket, transform)
                names[role] = name
            if triple.mask is not None:
                name = entry_key(
                    "mask", content_digest(triple.mask), sample.target_bucket, transform.key(), RENDER_VERSION
                )
                entries.images[name] = ImageJob(name, triple.mask, sample.target_bucket, transform, is_mask=True)
                names["mask"] = name
            variants.append(names)
        texts = []
        for caption in sample.captions:
            key = text_key(caption, text_identity, max_sequence_length)
            entries.texts[key] = caption
            texts.append(key)
        entries.samples.append({"variants": variants, "texts": texts, "controls": len(triple.controls)})
    return entries


class CachedDataset(Dataset):
    """Cached encodings of the planned samples. Items are dicts of CPU tensors (shapes as in `LatentBatch`).

    Index with `(index, draw_seed)` (what `BucketBatchSampler` yields): draw_seed picks the augmentation variant,
    the caption line and caption dropout. A plain int index takes the first variant and caption, no dropout.
    """

    takes_draw_seed = True

    def __init__(self, plan: list[PlannedSample], entries: CacheEntries, cache: DiskCache) -> None:
        self.plan, self.entries, self.cache = plan, entries, cache

    def __len__(self) -> int:
        return len(self.plan)

    def bucket_keys(self) -> list[Hashable]:
        return [sample.bucket_key for sample in self.plan]

    def sample_weights(self) -> list[float]:
        return [sample.weight for sample in self.plan]

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        index, draw_seed = index if isinstance(index, tuple) else (index, None)
        sample, names = self.plan[index], self.entries.samples[index]
        rng = random.Random(draw_seed)
        if draw_seed is None:
            variant, text = names["variants"][0], names["texts"][0]
        else:
            variant, text = rng.choice(names["variants"]), rng.choice(names["texts"])
            if rng.random() < sample.caption_dropout:
                text = self.entries.empty_text
        item = {
            "target_latents": self.cache.get(variant["target"]),  # (16, h, w)
            "control_latents": [self.cache.get(variant[f"control{i}"]) for i in range(names["controls"])],
            "prompt_embeds": self.cache.get(f"{text}.t5"),  # (L, 4096)
            "pooled_embeds": self.cache.get(f"{text}.clip"),  # (768,)
        }
        if "mask" in variant:
            item["loss_mask"] = self.cache.get(variant["mask"])  # (1, h, w) in [0, 1]
        return item


def bucket_keys_of(dataset: Dataset) -> list[Hashable]:
    """Bucket keys of any dataset of cached items: its own `bucket_keys()`, else from the items' shapes."""
    if hasattr(dataset, "bucket_keys"):
        return dataset.bucket_keys()
    keys = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        item = dataset[i]
        controls = item["control_latents"]
        controls = [controls] if isinstance(controls, torch.Tensor) else controls
        keys.append((tuple(item["target_latents"].shape), tuple(tuple(c.shape) for c in controls), "loss_mask" in item))
    return keys
