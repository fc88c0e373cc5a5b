"""Disk caches with the tiny real model: exactly the changed entries are recomputed, and items read back right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_lora.config import load_config
from kontext_lora.data.buckets import Transform, render
from kontext_lora.data.cache import DiskCache
from kontext_lora.data.plan import build_plan
from kontext_lora.data.preflight import preflight
from kontext_lora.data.triples import DataError, load_image
from kontext_lora.model.load import encode_images
from kontext_lora.train.encode import cache_folder, cached_dataset, load_encoders, plan_entries
from tests.tiny_config import tiny_model_overrides


def _write(root: Path, stem: str, seed: int, size=(80, 64), caption: str = "edit it") -> None:
    rng = np.random.default_rng(seed)
    for sub in ("control", "target"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(grid).resize(size, Image.BICUBIC).save(root / sub / f"{stem}.png")
    (root / "target" / f"{stem}.txt").write_text(caption)


def _cfg(tiny_model_dir: Path, tmp_path: Path, *extra: str):
    return load_config(
        None,
        [
            *tiny_model_overrides(tiny_model_dir),
            f"data.datasets=[{{path: {tmp_path / 'data'}}}]", "data.resolution=64",
            f"data.cache_dir={tmp_path / 'cache'}", f"output.dir={tmp_path / 'run'}", *extra,
        ],
    )  # fmt: skip


def _missing(cfg) -> tuple[int, int]:
    report = preflight(cfg.data, show_progress=False)
    images, texts = plan_entries(cfg, build_plan(cfg.data, report)).missing(DiskCache(cache_folder(cfg)))
    return len(images), len(texts)


def _fill(cfg, pipe):
    report = preflight(cfg.data, show_progress=False)
    return cached_dataset(cfg, build_plan(cfg.data, report), pipe, show_progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path):
    cfg = load_config(None, [f"model.pretrained={tiny_model_dir}", "model.dtype=float32", "data.datasets=[{path: x}]"])
    encoders = load_encoders(cfg)
    assert encoders.transformer is None  # caching never loads the transformer
    return encoders


def test_changed_image_caption_or_setting_recomputes_exactly_its_entries(tiny_model_dir, tmp_path, pipe) -> None:
    for i, stem in enumerate(["a", "b", "c"]):
        _write(tmp_path / "data", stem, seed=i)
    cfg = _cfg(tiny_model_dir, tmp_path)
    assert _missing(cfg) == (6, 2)  # 3 targets + 3 controls; one caption + the empty prompt
    dataset = _fill(cfg, pipe)
    assert _missing(cfg) == (0, 0)
    before = {name: dataset.cache.get(name) for name in dataset.cache.index}

    # Change one target image: only its latent is recomputed, and it encodes the new pixels.
    new_target = np.random.default_rng(99).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(new_target).resize((80, 64), Image.BICUBIC).save(tmp_path / "data" / "target" / "b.png")
    assert _missing(cfg) == (1, 0)
    dataset = _fill(cfg, pipe)
    b = next(i for i, sample in enumerate(dataset.plan) if sample.triple.stem == "b")
    new_pixels = render(load_image(tmp_path / "data" / "target" / "b.png"), dataset.plan[b].target_bucket, Transform())
    expected = encode_images(pipe.vae, new_pixels[None])
    torch.testing.assert_close(dataset[b]["target_latents"], expected[0])
    unchanged = [name for name in dataset.cache.index if name in before]
    assert len(unchanged) == len(before)  # nothing else was dropped
    for name in unchanged:
        assert torch.equal(dataset.cache.get(name), before[name])

    # A new caption: one text entry. Another resolution: every latent, no text.
    (tmp_path / "data" / "target" / "c.txt").write_text("something else")
    assert _missing(cfg) == (0, 1)
    assert _missing(_cfg(tiny_model_dir, tmp_path, "data.resolution=96")) == (6, 1)
    # Flip on: the unflipped latents are reused, the mirrored ones are new.
    flipped = _cfg(tiny_model_dir, tmp_path, "data.datasets=[{path: " + str(tmp_path / "data") + ", flip: true}]")
    assert _missing(flipped) == (6, 1)


def test_interrupted_caching_keeps_its_work_and_resumes(tiny_model_dir, tmp_path, pipe) -> None:
    for i, stem in enumerate(["a", "b", "c", "d"]):
        _write(tmp_path / "data", stem, seed=i, caption=f"caption {stem}")
    cfg = _cfg(tiny_model_dir, tmp_path)
    report = preflight(cfg.data, show_progress=False)
    plan = build_plan(cfg.data, report)
    (tmp_path / "data" / "target" / "d.png").write_bytes(b"broken after preflight")  # fails mid-way
    with pytest.raises(DataError, match="d.png"):
        cached_dataset(cfg, plan, pipe, show_progress=False)
    kept = DiskCache(cache_folder(cfg))
    assert len(kept.index) >= 2 * 5  # the 5 text entries (t5 + clip each) at least were flushed
    assert not list(cache_folder(cfg).glob("*.tmp"))

    _write(tmp_path / "data", "d", seed=3, caption="caption d")
    images, texts = _missing(cfg)
    assert texts == 0 and 0 < images <= 8  # only what was not finished
    _fill(cfg, pipe)
    assert _missing(cfg) == (0, 0)


def test_items_caption_lines_dropout_and_trigger_word(tiny_model_dir, tmp_path, pipe) -> None:
    _write(tmp_path / "data", "a", seed=0, size=(64, 128), caption="first way\nsecond way")
    ds = f"{{path: {tmp_path / 'data'}, trigger_word: zxq, caption_dropout: 0.5}}"
    cfg = _cfg(tiny_model_dir, tmp_path, f"data.datasets=[{ds}]")
    dataset = _fill(cfg, pipe)
    (sample,) = dataset.plan
    assert sample.captions == ("zxq, first way", "zxq, second way")
    item = dataset[0]
    assert item["target_latents"].shape[-2:] == (sample.target_bucket[0] // 8, sample.target_bucket[1] // 8)
    assert sample.target_bucket[0] > sample.target_bucket[1]  # a portrait image gets a portrait bucket
    assert item["prompt_embeds"].shape[0] == 8 and item["pooled_embeds"].dim() == 1
    assert item["control_latents"][0].shape == item["target_latents"].shape and "loss_mask" not in item
    empty = dataset.cache.get(f"{dataset.entries.empty_text}.t5")
    lines = {dataset.cache.get(f"{key}.t5").sum().item() for key in dataset.entries.samples[0]["texts"]}
    drawn = [dataset[(0, seed)]["prompt_embeds"] for seed in range(40)]
    dropped = sum(torch.equal(p, empty) for p in drawn)
    assert 8 <= dropped <= 32  # caption_dropout 0.5 substitutes the cached empty prompt
    assert {p.sum().item() for p in drawn if not torch.equal(p, empty)} == lines  # both caption lines are drawn
    assert torch.equal(dataset[(0, 3)]["prompt_embeds"], dataset[(0, 3)]["prompt_embeds"])  # seeded


def test_cache_command_fills_the_cache_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    for i, stem in enumerate(["a", "b"]):
        _write(tmp_path / "data", stem, seed=i)
    config = tmp_path / "job.yaml"
    config.write_text(
        f"model: {{pretrained: {tiny_model_dir}, dtype: float32, max_sequence_length: 8}}\n"
        f"data: {{datasets: [{{path: {tmp_path / 'data'}}}], resolution: 64, cache_dir: {tmp_path / 'cache'}}}\n"
    )
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "kontext_lora.cli", "cache", "--config", str(config)]
    first = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "6 entries computed, 0 reused" in first.stdout and "cache ready: 2 triples" in first.stdout
    second = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert "0 entries computed, 6 reused" in second.stdout
    assert not (tmp_path / "run").exists() and _missing(_cfg(tiny_model_dir, tmp_path)) == (0, 0)
