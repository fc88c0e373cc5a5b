"""Every sampler, shift, sigma weighting, loss kind and optimizer trains: a few fit() steps on the tiny model's
learning task (tests/train/tiny_task.py) lower the held-out loss."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kontext_lora.train.encode import EncodedDataset
from kontext_lora.train.loop import TrainingError, fit

from .tiny_task import encoded_pair, fresh_transformer, heldout_batch, heldout_mse, negated, task_config


@pytest.fixture(scope="module")
def task(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    train, heldout = encoded_pair(str(tiny_model_dir), str(tmp_path_factory.mktemp("tiny_task")))
    heldout_set = heldout_batch(negated(heldout))
    base = heldout_mse(fresh_transformer(tiny_model_dir), heldout_set)
    return negated(train), heldout_set, base


FEATURES = {
    "uniform": ["loss.timestep_sampling=uniform"],
    "logit_normal": ["loss.timestep_sampling=logit_normal", "train.logit_mean=0.3", "train.logit_std=1.2"],
    "mode": ["loss.timestep_sampling=mode"],
    "sigmoid": ["loss.timestep_sampling=sigmoid", "loss.sigmoid_scale=1.5"],
    "constant_shift": ["loss.timestep_shift=constant", "loss.shift=3"],
    "flux_shift": ["loss.timestep_shift=flux"],
    "sigma_sqrt": ["loss.weighting=sigma_sqrt"],
    "cosmap": ["loss.weighting=cosmap"],
    "l1": ["loss.type=l1"],
    "huber": ["loss.type=huber", "loss.huber_delta=0.5"],
    "edit_weighting": ["loss.edit_weighting=true"],
    "adamw_unfused": ["optim.fused=false"],
    "adamw8bit": ["optim.optimizer=adamw8bit", "optim.min_8bit_size=0"],
    "prodigy": ["optim.optimizer=prodigy", "train.lr=1.0", "optim.prodigy_d_coef=2", "train.steps=20"],
    "adafactor": ["optim.optimizer=adafactor"],
    "accumulation_cosine_warmup": ["train.gradient_accumulation=2", "train.scheduler=cosine", "train.warmup_steps=2"],
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_feature_trains_and_lowers_the_heldout_loss(feature: str, task, tiny_model_dir: Path, tmp_path: Path) -> None:
    train, heldout, base = task
    package = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}.get(feature)
    if package:
        pytest.importorskip(package)  # optional extras ([optim]); CI installs them with [dev]
    transformer = fresh_transformer(tiny_model_dir)
    fit(task_config(tiny_model_dir, tmp_path, *FEATURES[feature]), transformer, train)
    trained = heldout_mse(transformer, heldout)
    print(f"{feature}: held-out loss {base:.3f} -> {trained:.3f}")
    assert trained < 0.9 * base, f"{feature}: held-out loss {base:.3f} -> {trained:.3f}"


def _with_nan(train: EncodedDataset, every: int) -> EncodedDataset:
    items = [dict(item) for item in train.items]
    for item in items[::every]:
        item["target_latents"] = torch.full_like(item["target_latents"], float("nan"))
    return EncodedDataset(items)


def test_nonfinite_losses_skip_their_steps_with_a_warning(task, tiny_model_dir: Path, tmp_path: Path, caplog) -> None:
    train, _, _ = task
    cfg = task_config(tiny_model_dir, tmp_path, "train.batch_size=1", "train.steps=20", "optim.nonfinite_limit=50")
    with caplog.at_level(logging.WARNING, logger="kontext_lora.train.optim"):
        path = fit(cfg, fresh_transformer(tiny_model_dir), _with_nan(train, every=3))  # a third of the samples
    skipped = [r for r in caplog.records if "non-finite loss" in r.getMessage()]
    assert skipped, "no step was skipped"
    state = load_file(str(path))
    assert all(torch.isfinite(v).all() for v in state.values())  # no NaN reached the weights
    assert any(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)  # the finite steps did train


def test_k_nonfinite_losses_in_a_row_save_and_stop(task, tiny_model_dir: Path, tmp_path: Path) -> None:
    train, _, _ = task
    cfg = task_config(tiny_model_dir, tmp_path, "train.steps=5", "optim.nonfinite_limit=3")
    with pytest.raises(TrainingError) as info:
        fit(cfg, fresh_transformer(tiny_model_dir), _with_nan(train, every=1))
    message = str(info.value)
    assert "\n" not in message and "3 non-finite in a row" in message and "step-000000" in message
    assert (tmp_path / "step-000000" / "pytorch_lora_weights.safetensors").is_file()
