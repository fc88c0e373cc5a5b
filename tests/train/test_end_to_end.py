"""Train on the shipped examples, then load the adapter into a fresh pipeline with diffusers' own loader."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from diffusers import FluxKontextPipeline
from peft import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open

from kontext_lora.config import load_config
from kontext_lora.data.triples import discover_triples
from kontext_lora.model.load import load_pipeline
from kontext_lora.train.loop import fit, train
from tests.square_crops import TripleDataset, encode_dataset
from tests.tiny_config import tiny_model_overrides

from ..conftest import EXAMPLES


def _config(tiny_model_dir: Path, out: Path, *extra: str):
    return load_config(
        None,
        [
            *tiny_model_overrides(tiny_model_dir, max_sequence_length=16),
            f"data.datasets=[{{path: {EXAMPLES}}}]", "data.resolution=64",
            "lora.rank=4", "lora.alpha=8", "train.steps=12", "train.batch_size=2", "train.lr=1e-2",
            f"output.dir={out}", "output.save_every=5", "logging.report_to=tensorboard", *extra,
        ],
    )  # fmt: skip


def _edit(pipe: FluxKontextPipeline, control: Image.Image) -> torch.Tensor:
    return pipe(
        image=control, prompt="make it black and white", height=64, width=64, max_area=64 * 64,
        _auto_resize=False, num_inference_steps=3, guidance_scale=2.5, max_sequence_length=16,
        generator=torch.Generator().manual_seed(0), output_type="pt",
    ).images  # fmt: skip


def test_trained_adapter_loads_into_a_fresh_pipeline_and_reproduces_the_trained_model(
    tiny_model_dir: Path, tmp_path: Path, caplog
) -> None:
    cfg = _config(tiny_model_dir, tmp_path / "run", "output.export_formats=[kohya,comfyui]")
    pipe = load_pipeline(cfg.model)
    pixels = TripleDataset(discover_triples(EXAMPLES), cfg.data.resolution)
    adapter_file = fit(cfg, pipe.transformer, encode_dataset(pipe, pixels, 16, show_progress=False))
    control = Image.open(EXAMPLES / "control" / "astronaut.jpg").convert("RGB").resize((64, 64))
    trained_output = _edit(pipe, control)

    # The run folder: final adapter, intermediate saves, tensorboard logs, no temp files left behind.
    run = tmp_path / "run"
    assert adapter_file == run / "pytorch_lora_weights.safetensors"
    assert (run / "step-000005" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "step-000010" / "pytorch_lora_weights.safetensors").is_file()
    assert list(run.rglob("events.out.tfevents.*"))
    assert not list(run.rglob("*.tmp"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))  # one line a step: the run's own log
    assert all(r["loss"] > 0 and r["s_per_step"] > 0 and r["peak_gib"] is None for r in records)
    for folder in (run, run / "step-000005"):  # other formats and a model card beside every save
        assert {"run_kohya.safetensors", "run_comfyui.safetensors", "README.md"} <= {p.name for p in folder.iterdir()}

    with safe_open(str(adapter_file), framework="pt") as f:
        saved = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    info = json.loads(metadata["kontext_lora"])
    assert info["step"] == 12 and info["rank"] == 4 and info["alpha"] == 8.0
    assert info["config"]["train"]["lr"] == 1e-2
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.lora_alpha"] == 8.0
    assert all(key.startswith("transformer.") for key in saved)
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # training moved B off zero

    fresh = FluxKontextPipeline.from_pretrained(str(tiny_model_dir))
    fresh.set_progress_bar_config(disable=True)
    base_output = _edit(fresh, control)
    with caplog.at_level(logging.WARNING):
        fresh.load_lora_weights(str(adapter_file), adapter_name="trained")
    # diffusers / PEFT say "unexpected keys" or "missing keys" when a tensor is not used or not found.
    assert not [r for r in caplog.records if re.search(r"(unexpected|missing)[_ ]keys", r.getMessage(), re.I)]

    # No saved tensor was dropped or left unused: the loaded adapter holds exactly the saved tensors.
    loaded = get_peft_model_state_dict(fresh.transformer, adapter_name="trained")
    assert set(loaded) == {key.removeprefix("transformer.") for key in saved}
    for key, value in loaded.items():
        torch.testing.assert_close(value, saved["transformer." + key], rtol=0, atol=0)
    scaling = {m.scaling["trained"] for m in fresh.transformer.modules() if hasattr(m, "scaling")}
    assert scaling == {8.0 / 4}  # alpha / rank came back from the metadata

    loaded_output = _edit(fresh, control)
    assert (loaded_output - base_output).abs().max() > 1e-3  # the adapter changes the edit
    torch.testing.assert_close(loaded_output, trained_output, rtol=0, atol=1e-5)  # and equals the trained model


def test_train_command_writes_config_and_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = _config(tiny_model_dir, tmp_path / "run2", "train.steps=3", "output.save_every=0",
                  "logging.report_to=none")  # fmt: skip
    path = train(cfg)
    assert path.is_file()
    resolved = load_config(tmp_path / "run2" / "config.yaml")
    assert resolved == cfg  # the run folder's config reproduces the run


def test_training_continues_from_a_kohya_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    """lora.init_from reads another trainer's format; with lr=0 the continued adapter equals the original."""
    from kontext_lora.export.formats import write_exports

    first = train(_config(tiny_model_dir, tmp_path / "first", "train.steps=3", "logging.report_to=none"))
    kohya = write_exports(first, tmp_path / "exported", ["kohya"], name="first", card=False)["kohya"]
    continued = train(
        _config(tiny_model_dir, tmp_path / "second", "train.steps=1", "train.lr=0", "lora.alpha=4",
                f"lora.init_from={kohya}", "logging.report_to=none")
    )  # fmt: skip
    with safe_open(str(first), framework="pt") as a, safe_open(str(continued), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            expected = a.get_tensor(key) * (2.0 if "lora_B" in key else 1.0)  # alpha 8 -> 4 at rank 4: B doubles
            torch.testing.assert_close(b.get_tensor(key), expected, rtol=1e-6, atol=1e-7)
