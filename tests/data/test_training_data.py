"""Training from the disk cache: mixed datasets (text-to-image, two controls with masks, own control buckets)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kontext_lora.config import load_config
from kontext_lora.data.buckets import BucketBatchSampler
from kontext_lora.data.plan import build_plan
from kontext_lora.data.preflight import preflight
from kontext_lora.train.encode import cached_dataset, collate_encoded, load_encoders
from kontext_lora.train.loop import train
from tests.tiny_config import tiny_model_overrides


def _photo(path: Path, seed: int, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(grid).resize(size, Image.BICUBIC).save(path)


def _datasets(root: Path) -> str:
    for i in range(3):  # text-to-image pairs, landscape
        _photo(root / "t2i" / "target" / f"p{i}.png", i, (96, 64))
        (root / "t2i" / "target" / f"p{i}.txt").write_text(f"a photo {i}")
    for i in range(4):  # two references (the second portrait, 64x112 -> its own 80x48 bucket) and a mask
        _photo(root / "multi" / "control" / f"m{i}.png", 10 + i, (64, 64))
        _photo(root / "multi" / "ref" / f"m{i}.png", 20 + i, (64, 112))
        _photo(root / "multi" / "target" / f"m{i}.png", 30 + i, (64, 64))
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[:, :32] = 255
        (root / "multi" / "mask").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "multi" / "mask" / f"m{i}.png")
    return (
        f"[{{path: {root / 't2i'}, control_keys: []}}, "
        f"{{path: {root / 'multi'}, control_keys: [control, ref], weight: 2, flip: true}}]"
    )


def _cfg(tiny_model_dir: Path, tmp_path: Path, *extra: str):
    return load_config(
        None,
        [
            *tiny_model_overrides(tiny_model_dir),
            f"data.datasets={_datasets(tmp_path / 'data')}", "data.resolution=64", "data.control_bucket=own",
            "lora.rank=4", "train.steps=4", "train.batch_size=2", "logging.report_to=none",
            f"output.dir={tmp_path / 'run'}", *extra,
        ],
    )  # fmt: skip


def test_mixed_batches_are_homogeneous_and_carry_masks(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_model_dir, tmp_path)
    plan = build_plan(cfg.data, preflight(cfg.data, show_progress=False))
    dataset = cached_dataset(cfg, plan, load_encoders(cfg), show_progress=False)
    sampler = BucketBatchSampler(dataset.bucket_keys(), 2, seed=0, weights=dataset.sample_weights())
    batches = list(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_encoded))
    assert sum(b.target_latents.shape[0] for b in batches) == 3 + 2 * 4  # weight 2 doubles the multi set
    kinds = {(len(b.control_latents), b.loss_mask is not None) for b in batches}
    assert kinds == {(0, False), (2, True)}
    for batch in batches:
        if batch.control_latents:
            assert batch.control_latents[0].shape[-2:] == (8, 8) and batch.control_latents[1].shape[-2:] == (10, 6)
            assert batch.loss_mask.shape == (batch.target_latents.shape[0], 1, 8, 8)
            for mask in batch.loss_mask:  # white left half, or right half when the sample was flipped
                left, right = mask[..., :4].mean().item(), mask[..., 4:].mean().item()
                assert {round(left), round(right)} == {0, 1}, (left, right)
        else:
            assert batch.target_latents.shape[-2:] == (6, 10) and batch.loss_mask is None  # 48 x 80 landscape


def test_train_runs_on_mixed_datasets_from_the_cache(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    adapter = train(_cfg(tiny_model_dir, tmp_path))
    out = capsys.readouterr().out
    assert adapter.is_file() and "preflight:" in out and "bucket (target HxW | controls)" in out
    assert "48x80 | no control" in out and "64x64 | 64x64, 80x48 +mask" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert (tmp_path / "run" / "preflight.jpg").is_file() and list((tmp_path / "run" / "cache").glob("*.safetensors"))
