"""Aspect-ratio buckets, paired transforms (crop position + flip), and the bucket batch sampler.

A bucket is a training size (height, width) in pixels, multiples of 16. Each image goes to the bucket nearest its
aspect ratio, is scaled to cover it and cropped; the crop position and the flip are a `Transform` shared by every
image of a triple, so control and target always see the same geometric change.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Sampler

Bucket = tuple[int, int]  # (height, width) in pixels, multiples of 16
MULTIPLE = 16  # VAE factor 8 x 2x2 patches: the smallest step of a Kontext image side
RENDER_VERSION = 1  # bump when the pixel pipeline changes: it is part of every latent cache key


def kontext_buckets() -> list[Bucket]:
    """FLUX.1 Kontext's 17 preferred ~1 MP resolutions as (height, width)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS  # (width, height)

    return sorted((height, width) for width, height in PREFERRED_KONTEXT_RESOLUTIONS)


def area_buckets(side: int, max_aspect_ratio: float = 2.5) -> list[Bucket]:
    """Sizes of about side^2 pixels with both sides multiples of 16, aspect ratios up to `max_aspect_ratio`.

    For every width on the 16-pixel grid the height that best keeps the area is taken; at small sizes (64^2)
    that gives few buckets, at 1024^2 about 40.
    """
    area = side * side
    buckets = set()
    for width in range(MULTIPLE, int(side * math.sqrt(max_aspect_ratio)) + MULTIPLE + 1, MULTIPLE):
        height = max(MULTIPLE, round(area / width / MULTIPLE) * MULTIPLE)
        if max(width / height, height / width) <= max_aspect_ratio + 1e-9:
            buckets.add((height, width))
            buckets.add((width, height))
    return sorted(buckets)


def bucket_list(mode: str, side: int, max_aspect_ratio: float) -> list[Bucket]:
    """The buckets of a `data.buckets` mode ("area", "kontext" or "square")."""
    if mode == "kontext":
        return kontext_buckets()
    if mode == "square":
        return [(side, side)]
    return area_buckets(side, max_aspect_ratio)


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest (in log space) to width/height; ties go to the larger area."""
    log_ratio = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[1] / b[0]) - log_ratio), 9), -b[0] * b[1]))


def upscale_factor(width: int, height: int, bucket: Bucket) -> float:
    """How much an image of width x height must be enlarged to cover `bucket` (< 1: it is shrunk)."""
    return max(bucket[1] / width, bucket[0] / height)


@dataclass(frozen=True)
class Transform:
    """Where the crop sits (0 = left/top edge, 0.5 = center, 1 = right/bottom edge) and whether to mirror."""

    crop_x: float = 0.5
    crop_y: float = 0.5
    flip: bool = False

    def key(self) -> tuple:
        return (round(self.crop_x, 6), round(self.crop_y, 6), self.flip)


def transform_variants(stem: str, flip: bool, random_crop: bool, crop_variants: int) -> list[Transform]:
    """The fixed set of augmentations a triple is cached and trained with (one is drawn per step).

    Random crops are `crop_variants` positions drawn once from a hash of the stem (the center first), so that they
    can be cached; a flip doubles the set.
    """
    positions = [(0.5, 0.5)]
    if random_crop:
        seed = int.from_bytes(hashlib.sha256(stem.encode()).digest()[:8], "little")
        rng = np.random.default_rng(seed)
        positions += [tuple(float(v) for v in rng.random(2)) for _ in range(crop_variants - 1)]
    flips = (False, True) if flip else (False,)
    return [Transform(x, y, f) for x, y in positions for f in flips]


def crop_box(width: int, height: int, bucket: Bucket, transform: Transform) -> tuple[float, float, float, float]:
    """The (left, top, right, bottom) region of a width x height image that scales onto `bucket`."""
    scale = upscale_factor(width, height, bucket)
    crop_w, crop_h = bucket[1] / scale, bucket[0] / scale
    left = (width - crop_w) * transform.crop_x
    top = (height - crop_h) * transform.crop_y
    return (left, top, left + crop_w, top + crop_h)


def render(img: Image.Image, bucket: Bucket, transform: Transform) -> torch.Tensor:
    """RGB image -> (3, H, W) float32 in [-1, 1] at `bucket`, cropped and flipped as `transform` says."""
    resized = _resize(img.convert("RGB") if img.mode != "RGB" else img, bucket, transform)
    pixels = torch.from_numpy(np.array(resized, dtype=np.float32))  # (H, W, 3) in [0, 255]
    return (pixels / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def render_mask(img: Image.Image, bucket: Bucket, transform: Transform, factor: int = 8) -> torch.Tensor:
    """Mask image -> (1, H/factor, W/factor) float32 in [0, 1] (white = 1) at latent resolution.

    Resized to the bucket like the target (so it lines up pixel for pixel), then averaged over each factor x factor
    cell: a latent pixel half inside the edited region gets weight 0.5.
    """
    resized = _resize(img.convert("L"), bucket, transform)
    pixels = torch.from_numpy(np.array(resized, dtype=np.float32) / 255.0)[None, None]  # (1, 1, H, W)
    return torch.nn.functional.avg_pool2d(pixels, factor)[0]


def _resize(img: Image.Image, bucket: Bucket, transform: Transform) -> Image.Image:
    # Cropping via `box` inside resize() avoids resizing pixels that are then thrown away; bicubic with
    # reducing_gap antialiases when downscaling and box-reduces huge photos first (fast, visually identical).
    box = crop_box(img.width, img.height, bucket, transform)
    out = img.resize((bucket[1], bucket[0]), resample=Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if transform.flip else out


def bucket_table(keys: Sequence[Hashable]) -> str:
    """A small table of how many samples each bucket holds (printed before training)."""
    counts: dict[Hashable, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    lines = [f"{'bucket (target HxW | controls)':44s} {'samples':>8s}"]
    for key, count in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0]))):
        lines.append(f"{describe_bucket_key(key):44s} {count:8d}")
    return "\n".join(lines)


def describe_bucket_key(key: Hashable) -> str:
    if isinstance(key, tuple) and len(key) == 3 and isinstance(key[0], tuple):
        target, controls, masked = key
        text = f"{target[0]}x{target[1]}"
        text += " | " + (", ".join(f"{h}x{w}" for h, w in controls) if controls else "no control")
        return text + (" +mask" if masked else "")
    return str(key)


class BucketBatchSampler(Sampler[list]):
    """Batches drawn from one bucket at a time, in an order fixed by (seed, epoch).

    Epoch e: every sample appears floor(w) times plus once more with probability frac(w) (w = its weight), the
    samples of each bucket are permuted and cut into batches (the last one may be smaller), and all batches are
    permuted. Each yielded element is `(index, draw_seed)` when `with_draw_seed`, where draw_seed picks the sample's
    augmentation variant, caption line and caption dropout reproducibly.

    Every call to `iter()` starts the next epoch, so micro-batch k of a run is the same whatever happened before:
    `skip(k)` positions the sampler there without loading any data (exact resume).
    """

    def __init__(
        self,
        bucket_keys: Sequence[Hashable],
        batch_size: int,
        seed: int,
        weights: Sequence[float] | None = None,
        with_draw_seed: bool = True,
    ) -> None:
        if not bucket_keys:
            raise ValueError("BucketBatchSampler needs at least one sample")
        self.batch_size, self.seed, self.with_draw_seed = batch_size, seed, with_draw_seed
        self.weights = np.asarray(weights if weights is not None else [1.0] * len(bucket_keys), dtype=np.float64)
        groups: dict[Hashable, list[int]] = {}
        for index, key in enumerate(bucket_keys):
            groups.setdefault(key, []).append(index)
        self.groups = list(groups.values())  # in order of first appearance: deterministic given the data
        self.epoch, self._offset = 0, 0
        self._cache: dict[int, list[list]] = {}

    def epoch_batches(self, epoch: int) -> list[list]:
        """The batches of one epoch (deterministic in seed and epoch)."""
        if epoch not in self._cache:
            self._cache = {epoch: self._build(epoch)}  # one epoch kept: a long run does not grow memory
        return self._cache[epoch]

    def _build(self, epoch: int) -> list[list]:
        rng = np.random.default_rng([self.seed, epoch])
        whole = np.floor(self.weights).astype(np.int64)
        copies = whole + (rng.random(len(self.weights)) < self.weights - whole)
        if copies.sum() == 0:  # all weights fractional and none drawn: keep the epoch non-empty
            copies[int(np.argmax(self.weights))] = 1
        batches = []
        for members in self.groups:
            pool = np.repeat(np.asarray(members), copies[members])
            pool = pool[rng.permutation(len(pool))]
            batches += [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        order = rng.permutation(len(batches))
        draw_seeds = rng.integers(0, 2**62, size=int(copies.sum()))
        out, used = [], 0
        for b in order:
            batch = [int(i) for i in batches[b]]
            if self.with_draw_seed:
                out.append([(i, int(s)) for i, s in zip(batch, draw_seeds[used : used + len(batch)], strict=True)])
            else:
                out.append(batch)
            used += len(batch)
        return out

    def skip(self, consumed: int) -> None:
        """Make the next `iter()` continue after `consumed` batches counted from the very first epoch."""
        epoch = 0
        while consumed >= len(self.epoch_batches(epoch)):
            consumed -= len(self.epoch_batches(epoch))
            epoch += 1
        self.epoch, self._offset = epoch, consumed

    def __iter__(self) -> Iterator[list]:
        epoch, offset = self.epoch, self._offset
        self.epoch, self._offset = epoch + 1, 0
        return iter(self.epoch_batches(epoch)[offset:])

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch)) - self._offset


class ShardedBatches(Sampler[list]):
    """A `BucketBatchSampler`'s batches, epoch after epoch without end, dealt round-robin to the processes.

    Global micro-batch k (counted over all epochs from the start) goes to process k % num_processes. So each sample
    is seen once per epoch across the processes, buckets stay whole, and every process gets the same number of
    batches (no process waits in a collective the others never enter). N processes with accumulation 1 see exactly
    the micro-batches one process with accumulation N sees, in the same order. Written here because accelerate's
    BatchSamplerShard shards one epoch at a time and pads an epoch's uneven end with repeated batches (a sample
    seen twice, and an order one process would not see); here a step may span two epochs, as with accumulation.
    """

    def __init__(self, sampler: BucketBatchSampler, num_processes: int = 1, process_index: int = 0) -> None:
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is not in [0, {num_processes})")
        self.sampler, self.num_processes, self.process_index = sampler, num_processes, process_index
        self._skip = 0

    def skip(self, consumed: int) -> None:
        """Make the next `iter()` continue after this process's first `consumed` batches (consumed x N global ones),
        without reading any data: the exact resume position."""
        self._skip = consumed

    def __iter__(self) -> Iterator[list]:
        target = self._skip * self.num_processes  # global index of the first batch not yet consumed by any process
        epoch, first = 0, 0  # `first`: the global index of the epoch's first batch
        while True:
            batches = self.sampler.epoch_batches(epoch)
            if first + len(batches) > target:  # epochs wholly consumed are only counted
                start = (self.process_index - first) % self.num_processes
                if target > first:  # this process's first unconsumed batch in the epoch
                    start += -(-(target - first - start) // self.num_processes) * self.num_processes
                yield from batches[start :: self.num_processes]
            epoch, first = epoch + 1, first + len(batches)
