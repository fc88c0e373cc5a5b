"""Throughput of the training data path on this CPU: samples/s with disk caches and without (decode + resize).

With caches: a synthetic cache of N entries at 1024^2 shapes (target and control latents 16x128x128, T5 512x4096,
CLIP 768, all bf16, one distinct caption per sample: the worst case) written with the project's own shard writer,
read back through CachedDataset + BucketBatchSampler + DataLoader + collate_encoded exactly as training does.
Without caches: N control/target JPEG pairs at 1024^2 decoded, EXIF-transposed and resized to the bucket (no VAE).

    python scripts/bench_data.py --samples 300 --batch-size 1 --workers 0 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from kontext_lora.data.buckets import BucketBatchSampler, Transform, render
from kontext_lora.data.cache import DiskCache
from kontext_lora.data.plan import CachedDataset, CacheEntries, PlannedSample
from kontext_lora.data.triples import Triple, load_image
from kontext_lora.train.encode import collate_encoded

BUCKET = (1024, 1024)


def write_synthetic_cache(folder: Path, samples: int) -> CachedDataset:
    """A cache holding `samples` triples with 1024^2 shapes, and the dataset reading it."""
    cache = DiskCache(folder)
    entries, plan = CacheEntries(), []
    generator = torch.Generator().manual_seed(0)
    with cache.writer("bench") as writer:
        for i in range(samples):
            names = {"target": f"t{i}", "control0": f"c{i}"}
            writer.add(names["target"], torch.randn(16, 128, 128, generator=generator).bfloat16())
            writer.add(names["control0"], torch.randn(16, 128, 128, generator=generator).bfloat16())
            writer.add(f"text{i}.t5", torch.randn(512, 4096, generator=generator).bfloat16())
            writer.add(f"text{i}.clip", torch.randn(768, generator=generator).bfloat16())
            entries.samples.append({"variants": [names], "texts": [f"text{i}"], "controls": 1})
            triple = Triple(stem=f"s{i}", control=Path(f"c{i}.png"), target=Path(f"t{i}.png"), caption="")
            plan.append(PlannedSample(triple, 0, BUCKET, (BUCKET,), (Transform(),), ("",), 0.0, 1.0))
    entries.empty_text = "text0"
    return CachedDataset(plan, entries, DiskCache(folder))


class DecodeDataset(Dataset):
    """The no-cache path: decode both JPEGs and resize them to the bucket (what the VAE would then encode)."""

    def __init__(self, pairs: list[tuple[Path, Path]]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        control, target = self.pairs[index]
        return {
            "control": render(load_image(control), BUCKET, Transform()),
            "target": render(load_image(target), BUCKET, Transform()),
        }


def write_jpegs(folder: Path, samples: int) -> list[tuple[Path, Path]]:
    """Photo-like 1024^2 JPEGs (smooth colour fields plus grain, quality 90: ~200-400 KB like real photos)."""
    rng = np.random.default_rng(0)
    pairs = []
    base = [np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((1024, 1024), 3))
            for _ in range(4)]  # fmt: skip
    for i in range(samples):
        pair = []
        for role in ("control", "target"):
            grain = rng.integers(-12, 12, (1024, 1024, 3))
            pixels = np.clip(base[i % 4].astype(np.int64) + grain, 0, 255).astype(np.uint8)
            path = folder / f"{role}_{i}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            pair.append(path)
        pairs.append((pair[0], pair[1]))
    return pairs


def evict(folder: Path) -> None:
    """Drop our own files from the OS page cache (posix_fadvise DONTNEED), so the next read comes from disk."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_loader(loader: DataLoader, limit: int) -> float:
    """Samples/s over one pass (stops after `limit` samples)."""
    seen, start = 0, time.perf_counter()
    for batch in loader:
        seen += batch.target_latents.shape[0] if hasattr(batch, "target_latents") else len(batch)
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300, help="cache entries / JPEG pairs")
    parser.add_argument("--decode-samples", type=int, default=40, help="JPEG pairs for the no-cache path")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        dataset = write_synthetic_cache(Path(tmp) / "cache", args.samples)
        size = sum(f.stat().st_size for f in (Path(tmp) / "cache").iterdir()) / 2**30
        print(f"wrote a {size:.2f} GiB cache of {args.samples} samples in {time.perf_counter() - start:.0f} s")
        for workers in args.workers:
            for attempt in ("cold: evicted from page cache", "warm: in page cache"):
                if attempt.startswith("cold"):
                    evict(Path(tmp) / "cache")
                sampler = BucketBatchSampler(dataset.bucket_keys(), args.batch_size, seed=workers)
                loader = DataLoader(
                    dataset, batch_sampler=sampler, collate_fn=collate_encoded, num_workers=workers,
                    prefetch_factor=4 if workers else None,
                )  # fmt: skip
                rows.append((f"cached latents + T5 ({attempt})", workers, time_loader(loader, args.samples)))
        del dataset
        # The JPEGs below are read right after writing (in page cache): this row measures decode + resize only.
        pairs = write_jpegs(Path(tmp), args.decode_samples)
        for workers in args.workers:
            loader = DataLoader(
                DecodeDataset(pairs), batch_size=args.batch_size, num_workers=workers,
                collate_fn=lambda items: [i["target"] for i in items],
            )  # fmt: skip
            rows.append(("decode + resize 2 JPEGs, no cache", workers, time_loader(loader, args.decode_samples)))
    print(f"\n| data path at 1024^2 (batch {args.batch_size}) | workers | samples/s |\n|---|---|---|")
    for name, workers, rate in rows:
        print(f"| {name} | {workers} | {rate:.1f} |")


if __name__ == "__main__":
    main()
