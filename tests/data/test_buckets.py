"""Buckets, paired transforms (checked on pixels) and the bucket batch sampler."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_lora.data.buckets import (
    BucketBatchSampler,
    ShardedBatches,
    Transform,
    area_buckets,
    bucket_list,
    crop_box,
    kontext_buckets,
    nearest_bucket,
    render,
    render_mask,
    transform_variants,
    upscale_factor,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.mark.parametrize("side", [64, 128, 512, 1024])
def test_area_buckets_are_multiples_of_16_near_the_area_within_the_aspect_limit(side: int) -> None:
    buckets = area_buckets(side, max_aspect_ratio=2.5)
    assert (side, side) in buckets
    for height, width in buckets:
        assert height % 16 == 0 and width % 16 == 0
        assert max(height / width, width / height) <= 2.5
        assert (width, height) in buckets  # portrait and landscape alike
        # Rounding to 16 px moves the area by at most half a step of the short side times the long side.
        assert abs(height * width - side * side) <= 8 * max(height, width) + 1
    if side >= 512:
        assert len(buckets) >= 15


def test_small_area_buckets_still_cover_common_aspects() -> None:
    buckets = area_buckets(64, 2.5)
    assert nearest_bucket(300, 200, buckets) != (64, 64)  # 3:2 gets a landscape bucket even at 64^2
    assert nearest_bucket(300, 200, buckets)[1] > nearest_bucket(300, 200, buckets)[0]


def test_kontext_buckets_are_the_preferred_resolutions() -> None:
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    buckets = kontext_buckets()
    assert len(buckets) == 17 and (1024, 1024) in buckets
    assert sorted((w, h) for h, w in buckets) == sorted(PREFERRED_KONTEXT_RESOLUTIONS)
    assert bucket_list("kontext", 512, 2.5) == buckets
    assert bucket_list("square", 96, 2.5) == [(96, 96)]
    # A 3:2 photo goes where the pipeline itself would resize it: the preferred size nearest its aspect ratio.
    width, height = 3000, 2000
    theirs = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    assert nearest_bucket(width, height, buckets) == (theirs[2], theirs[1])


def test_nearest_bucket_and_upscale_factor() -> None:
    buckets = [(64, 64), (48, 80), (80, 48)]
    assert nearest_bucket(200, 100, buckets) == (48, 80)  # landscape
    assert nearest_bucket(100, 200, buckets) == (80, 48)
    assert nearest_bucket(101, 100, buckets) == (64, 64)
    assert upscale_factor(32, 32, (64, 64)) == 2.0
    assert upscale_factor(256, 128, (48, 80)) == pytest.approx(max(80 / 256, 48 / 128))


def test_crop_box_covers_the_bucket_and_moves_with_the_crop_position() -> None:
    center = crop_box(200, 100, (64, 64), Transform())
    assert center == pytest.approx((50, 0, 150, 100))
    assert crop_box(200, 100, (64, 64), Transform(crop_x=0.0)) == pytest.approx((0, 0, 100, 100))
    assert crop_box(200, 100, (64, 64), Transform(crop_x=1.0)) == pytest.approx((100, 0, 200, 100))


def _halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2], pixels[:, width // 2 :] = RED, BLUE
    return Image.fromarray(pixels)


def _rgb(tensor: torch.Tensor, y: int, x: int) -> tuple[int, ...]:
    return tuple(int(round(float(v))) for v in (tensor[:, y, x] + 1) * 127.5)


def test_paired_flip_mirrors_control_and_target_alike_on_pixels() -> None:
    """Control and target of different sizes, one Transform: both come out mirrored, pixel for pixel."""
    control, target = _halves(64, 64), _halves(256, 256)
    variants = transform_variants("stem", flip=True, random_crop=False, crop_variants=4)
    assert [v.flip for v in variants] == [False, True]
    for transform in variants:
        c, t = render(control, (32, 32), transform), render(target, (32, 32), transform)
        left, right = (BLUE, RED) if transform.flip else (RED, BLUE)
        for image in (c, t):
            assert _rgb(image, 10, 2) == left and _rgb(image, 10, 29) == right
        assert torch.allclose(c[:, :, :12], t[:, :, :12], atol=1 / 127.5)  # away from the seam: identical


def test_paired_random_crop_takes_the_same_region_of_both_images() -> None:
    """A control at twice the target's pixel size, same scene: the same crop position selects the same content."""
    rng = np.random.default_rng(0)
    scene = Image.fromarray(rng.integers(0, 256, (8, 32, 3), dtype=np.uint8)).resize((256, 64), Image.NEAREST)
    small, large = scene.resize((128, 32), Image.NEAREST), scene
    variants = transform_variants("some_stem", flip=False, random_crop=True, crop_variants=4)
    assert len(variants) == 4 and variants[0] == Transform() and len({v.crop_x for v in variants}) == 4
    assert variants == transform_variants("some_stem", flip=False, random_crop=True, crop_variants=4)  # fixed
    for transform in variants:
        a, b = render(small, (32, 32), transform), render(large, (32, 32), transform)
        assert (a - b).abs().mean() < 0.05, transform
    shifted = render(large, (32, 32), Transform(crop_x=0.0))
    assert (shifted - render(large, (32, 32), Transform(crop_x=1.0))).abs().mean() > 0.2  # crops really differ


def test_mask_is_resized_like_the_target_and_reduced_to_latent_resolution() -> None:
    mask = np.zeros((100, 200), dtype=np.uint8)
    mask[:, 150:] = 255  # the right quarter is edited
    rendered = render_mask(Image.fromarray(mask), (64, 64), Transform())  # center crop keeps x in 50..150
    assert rendered.shape == (1, 8, 8) and rendered.min() >= 0 and rendered.max() <= 1
    assert rendered.max() < 0.2  # the edited strip lies outside the center crop (bicubic edge spill only)
    flipped = render_mask(Image.fromarray(mask), (64, 64), Transform(crop_x=1.0, flip=True))  # keeps 100..200
    assert torch.allclose(flipped[0, :, :4], torch.ones(8, 4), atol=0.02)  # right half edited -> left after flip
    assert flipped[0, :, 5:].max() < 0.05


def test_sampler_batches_are_single_bucket_and_deterministic_in_the_seed() -> None:
    keys = ["a"] * 7 + ["b"] * 5 + ["c"]
    sampler = BucketBatchSampler(keys, batch_size=3, seed=1)
    epoch0 = list(sampler)
    assert epoch0 == BucketBatchSampler(keys, batch_size=3, seed=1).epoch_batches(0)
    assert epoch0 != BucketBatchSampler(keys, batch_size=3, seed=2).epoch_batches(0)
    assert list(sampler) != epoch0  # the next iter() is the next epoch, in another order
    for batch in epoch0:
        assert len({keys[i] for i, _ in batch}) == 1
    assert sorted(i for batch in epoch0 for i, _ in batch) == list(range(13))  # each sample once per epoch
    assert len(epoch0) == 3 + 2 + 1


def test_sampler_skip_continues_exactly_where_a_run_stopped() -> None:
    keys = [i % 3 for i in range(20)]
    reference = BucketBatchSampler(keys, batch_size=4, seed=7)
    stream = [batch for _ in range(3) for batch in reference]  # three epochs, batch by batch
    for consumed in (0, 1, 5, len(reference.epoch_batches(0)), 13):
        resumed = BucketBatchSampler(keys, batch_size=4, seed=7)
        resumed.skip(consumed)
        again = [batch for _ in range(3) for batch in resumed]
        expected = stream[consumed : consumed + 10]
        assert again[: len(expected)] == expected


def test_sampler_weights_and_repeats_set_draws_per_epoch() -> None:
    keys = ["x"] * 10
    weights = [3.0] * 5 + [0.5] * 5
    sampler = BucketBatchSampler(keys, batch_size=4, seed=0, weights=weights)
    counts: Counter = Counter()
    epochs = 200
    for _ in range(epochs):
        counts.update(i for batch in sampler for i, _ in batch)
    assert all(counts[i] == 3 * epochs for i in range(5))
    assert all(math.isclose(counts[i] / epochs, 0.5, abs_tol=0.12) for i in range(5, 10))


def test_sampler_draw_seeds_differ_and_plain_mode_yields_ints() -> None:
    sampler = BucketBatchSampler(["k"] * 6, batch_size=6, seed=0)
    (batch,) = sampler.epoch_batches(0)
    assert len({seed for _, seed in batch}) == 6
    plain = BucketBatchSampler(["k"] * 6, batch_size=6, seed=0, with_draw_seed=False)
    assert all(isinstance(i, int) for i in plain.epoch_batches(0)[0])


@pytest.mark.parametrize("num_processes", [2, 3])
def test_sharded_batches_deal_the_global_stream_round_robin_without_padding(num_processes: int) -> None:
    # Three buckets of 5, 4 and 2 samples in batches of 2: 3 + 2 + 1 = 6 batches an epoch, the last of a bucket
    # smaller; with 2 or 3 processes the epochs end mid-round half the time.
    keys = ["a"] * 5 + ["b"] * 4 + ["c"] * 2
    sampler = BucketBatchSampler(keys, batch_size=2, seed=7, with_draw_seed=True)
    epochs = 5
    stream = [batch for epoch in range(epochs) for batch in sampler.epoch_batches(epoch)]  # one process's order
    per_rank = []
    for rank in range(num_processes):
        iterator = iter(ShardedBatches(sampler, num_processes, rank))
        per_rank.append([next(iterator) for _ in range(len(stream) // num_processes)])
    # Every process gets the same number of batches; interleaved they are exactly the one-process stream.
    dealt = [per_rank[k % num_processes][k // num_processes] for k in range(len(per_rank[0]) * num_processes)]
    assert dealt == stream[: len(dealt)] and len(dealt) == len(stream)
    # So each epoch's batches, across the processes, hold every sample exactly once, one bucket per batch, and
    # carry the draw seeds one process would use.
    first = 0
    for epoch in range(epochs):
        batches = dealt[first : first + len(sampler.epoch_batches(epoch))]
        first += len(batches)
        assert sorted(i for batch in batches for i, _ in batch) == list(range(len(keys)))
        assert all(len({keys[i] for i, _ in batch}) == 1 for batch in batches)
    with pytest.raises(ValueError, match="process_index 2"):
        ShardedBatches(sampler, 2, 2)


@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_sharded_batches_skip_resumes_each_process_where_it_stopped(num_processes: int) -> None:
    """After `skip(c)` a process's stream continues at its own batch c, across epoch ends, without reading data."""
    keys = ["a"] * 5 + ["b"] * 4 + ["c"] * 2  # 6 batches an epoch: epoch ends fall mid-round for 2 and 3 processes
    sampler = BucketBatchSampler(keys, batch_size=2, seed=3, with_draw_seed=True)
    for rank in range(num_processes):
        iterator = iter(ShardedBatches(sampler, num_processes, rank))
        uninterrupted = [next(iterator) for _ in range(20)]
        for consumed in (0, 1, 2, 3, 5, 7, 12):
            resumed = ShardedBatches(sampler, num_processes, rank)
            resumed.skip(consumed)
            iterator = iter(resumed)
            assert [next(iterator) for _ in range(20 - consumed)] == uninterrupted[consumed:], (rank, consumed)
