"""Validation during training on the tiny model: grids, held-out loss, edit metrics, best checkpoint, trackers."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kontext_lora.config import load_config
from kontext_lora.data.triples import discover_triples
from kontext_lora.model.load import load_pipeline
from kontext_lora.train.loop import _accelerator, fit
from kontext_lora.train.validation import Validator, split_heldout, validation_items
from tests.square_crops import TripleDataset, encode_dataset
from tests.tiny_config import tiny_model_overrides

from ..conftest import EXAMPLES

RES = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _heldout_folder(root: Path, stems: list[str]) -> Path:
    for sub in ("control", "target"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for stem in stems:
        shutil.copy(EXAMPLES / "control" / f"{stem}.jpg", root / "control" / f"{stem}.jpg")
        shutil.copy(EXAMPLES / "target" / f"{stem}.jpg", root / "target" / f"{stem}.jpg")
        shutil.copy(EXAMPLES / "target" / f"{stem}.txt", root / "target" / f"{stem}.txt")
    return root


def _config(tiny_model_dir: Path, tmp_path: Path, out: str, *extra: str):
    mask = tmp_path / "mask.png"
    Image.fromarray(np.tile((np.arange(64) < 32).astype(np.uint8) * 255, (64, 1))).save(mask)  # left half edited
    examples = (
        f"[{{control: {EXAMPLES}/control/astronaut.jpg, prompt: make it black and white, "
        f"target: {EXAMPLES}/target/astronaut.jpg, mask: {mask}}}, "
        f"{{control: {EXAMPLES}/control/coffee.jpg, prompt: make it black and white}}]"
    )
    return load_config(
        None,
        [
            *tiny_model_overrides(tiny_model_dir),
            f"data.datasets=[{{path: {EXAMPLES}}}]", f"data.resolution={RES}", "lora.rank=4", "train.steps=4",
            "train.batch_size=2", "train.lr=1e-2", f"output.dir={tmp_path / out}", "output.save_every=2",
            "logging.report_to=tensorboard", f"validation.examples={examples}",
            f"validation.heldout_path={_heldout_folder(tmp_path / 'heldout', ['chelsea'])}",
            "validation.every=2", "validation.steps=2", "validation.best_metric=heldout_loss", *extra,
        ],
    )  # fmt: skip


def test_validation_writes_grids_metrics_and_the_best_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = _config(tiny_model_dir, tmp_path, "run")
    pipe = load_pipeline(cfg.model)
    encoded = encode_dataset(pipe, TripleDataset(discover_triples(EXAMPLES), RES), 8, show_progress=False)
    accelerator = _accelerator(cfg)
    validator = Validator(cfg, pipe, validation_items(cfg), accelerator)
    torch.manual_seed(0)  # the LoRA init draws from the global RNG (train() seeds it; fit() is called directly)
    final = fit(cfg, pipe.transformer, encoded, accelerator, validator=validator)
    run = tmp_path / "run"

    # Grids: control | output | target (items without a target: control | output), at each validated step.
    names = {"example-0-astronaut": 3, "example-1-coffee": 2, "heldout-chelsea": 3}
    for step in (2, 4):
        folder = run / "validation" / f"step-{step:06d}"
        assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}.png" for n in names)
        for name, panels in names.items():
            with Image.open(folder / f"{name}.png") as grid:
                assert grid.size == (panels * RES, RES) and grid.mode == "RGB"
                assert np.asarray(grid)[:, :RES].std() > 0  # the control panel holds the photo
    # Metrics: one validation record per validated step, finite values, beside the training records.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in records if "heldout_loss" in r]
    assert [r["step"] for r in validation] == [2, 4]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    for record in validation:
        for key in ("heldout_loss", "edit_l1", "edit_psnr", "edit_outside_change"):
            assert math.isfinite(record[key]) and record[key] >= 0, (key, record)
        assert 0 < record["edit_l1"] < 1
    # Best: the step with the lowest held-out loss; best/ holds that step's adapter.
    best = json.loads((run / "best.json").read_text())
    winner = min(validation, key=lambda r: r["heldout_loss"])
    assert (best["metric"], best["step"], best["value"]) == ("heldout_loss", winner["step"], winner["heldout_loss"])
    at_best = final if best["step"] == 4 else run / f"step-{best['step']:06d}" / final.name
    expected, saved = load_file(at_best), load_file(run / "best" / final.name)
    assert set(saved) == set(expected) and all(torch.equal(saved[k], expected[k]) for k in saved)
    # The grids reached tensorboard.
    events = EventAccumulator(str(next(run.rglob("events.out.tfevents.*")).parent)).Reload()
    assert {f"validation/{n}" for n in names} <= set(events.Tags()["images"])

    # The held-out loss is deterministic: recomputed twice on the final weights it equals the step-4 record.
    pipe.transformer.eval()
    first, second = validator.heldout_loss(pipe.transformer), validator.heldout_loss(pipe.transformer)
    assert first == second == validation[-1]["heldout_loss"]

    # Validation draws no random numbers from training: without it the adapter is bit-identical.
    plain_cfg = _config(tiny_model_dir, tmp_path, "plain", "validation.every=0")
    plain_pipe = load_pipeline(plain_cfg.model)
    torch.manual_seed(0)
    plain = load_file(fit(plain_cfg, plain_pipe.transformer, encoded))
    trained = load_file(final)
    assert all(torch.equal(plain[k], trained[k]) for k in trained)


def test_fit_builds_the_validator_from_a_pipeline(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    cfg = _config(tiny_model_dir, tmp_path, "run", "train.steps=1", "validation.every=1", "logging.report_to=none",
                  "validation.heldout_path=''", "validation.best_metric=none", "output.save_every=0",
                  "output.export_formats=[comfyui]")  # fmt: skip
    pipe = load_pipeline(cfg.model)
    encoded = encode_dataset(pipe, TripleDataset(discover_triples(EXAMPLES)[:2], RES), 8, show_progress=False)
    fit(cfg, pipe.transformer, encoded, pipeline=pipe)
    grids = sorted(p.name for p in (tmp_path / "run" / "validation" / "step-000001").iterdir())
    assert grids == ["example-0-astronaut.png", "example-1-coffee.png"]
    assert not (tmp_path / "run" / "best.json").exists()
    # Sampling shows its progress: 2 images x validation.steps=2 denoising steps.
    output = capsys.readouterr()
    bars = output.err.replace("\r", "\n")
    assert "validation at step 1: 100%" in bars and " 4/4 " in bars, bars
    # The log points ComfyUI users at the file that carries alpha (alpha 16 / rank 4 is lost in the diffusers file).
    comfyui = tmp_path / "run" / "run_comfyui.safetensors"
    assert comfyui.is_file()
    assert f"[kontext-lora] ComfyUI: load {comfyui}, whose tensors carry each module's alpha" in output.out
    assert "(it would scale by 1, not alpha/r = 4)" in output.out


def test_heldout_split_is_seeded_and_disjoint() -> None:
    triples = discover_triples(EXAMPLES)
    train, heldout = split_heldout(triples, 2, seed=0)
    assert len(heldout) == 2 and len(train) == 6
    assert not {t.stem for t in train} & {t.stem for t in heldout}
    assert split_heldout(triples, 2, seed=0) == (train, heldout)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["validation.every=5"], "`validation.every`: list validation.examples"),
        (["validation.every=5", "validation.examples=[{control: a.png, prompt: p}]"], "`validation.best_metric`"),
        (["validation.use_ema=true"], "`validation.use_ema`: needs ema.enabled=true"),
        (["validation.best_metric=psnr"], "did you mean `edit_psnr`"),
        (["validation.sigmas=[0.0]"], "`validation.sigmas[0]`"),
        (["ema.decay=1.5"], "`ema.decay`"),
        (["output.keep_last=-1"], "`output.keep_last`"),
    ],
)
def test_config_errors_name_the_key(overrides: list[str], message: str) -> None:
    from kontext_lora.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["model.pretrained=x", "data.datasets=[{path: d}]", *overrides])


def test_at_start_validates_the_base_and_the_run_ends_with_a_summary(tiny_model_dir: Path, tmp_path: Path,
                                                                      capsys) -> None:  # fmt: skip
    cfg = _config(tiny_model_dir, tmp_path, "run", "train.steps=2", "validation.at_start=true", "output.save_every=0",
                  "logging.report_to=none", "output.export_formats=[kohya]")  # fmt: skip
    pipe = load_pipeline(cfg.model)
    encoded = encode_dataset(pipe, TripleDataset(discover_triples(EXAMPLES)[:2], RES), 8, show_progress=False)
    final = fit(cfg, pipe.transformer, encoded, pipeline=pipe)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in records if "heldout_loss" in r]
    assert [r["step"] for r in validation] == [0, 2]  # the base before the first step, then every 2 steps
    assert (run / "validation" / "step-000000" / "heldout-chelsea.png").is_file()
    for record in validation:
        assert 0 < record["edit_saturation"] < 1
    out = capsys.readouterr().out
    summary = out[out.index("validation, step 0 -> 2:") :]
    first, last = validation
    assert f"heldout_loss     {first['heldout_loss']:9.4f} -> {last['heldout_loss']:9.4f}" in summary
    assert f"adapter: {final}" in summary and str(run / "run_kohya.safetensors") in summary


def test_saturation_is_the_mean_chroma() -> None:
    from kontext_lora.train.validation import saturation

    grey = np.full((4, 4, 3), 0.3, dtype=np.float32)
    red = np.zeros((4, 4, 3), dtype=np.float32)
    red[..., 0] = 0.8
    assert saturation(grey) == 0.0 and saturation(red) == pytest.approx(0.8)
    assert saturation(np.concatenate([grey, red])) == pytest.approx(0.4)
