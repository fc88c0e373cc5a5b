"""Training a LoRA on a quantized base (memory.base_quant) and the low-memory train() path, on the tiny model (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxKontextPipeline
from safetensors import safe_open

from kontext_lora.model.lora import adapter_state, inject_lora
from kontext_lora.model.quant import QUANTIZED
from kontext_lora.train.loop import fit, train
from tests.tiny_config import tiny_model_overrides

from ..conftest import EXAMPLES
from .tiny_task import encoded_pair, fresh_transformer, heldout_batch, heldout_mse, negated, task_config


@pytest.fixture(scope="module")
def task(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    train_set, heldout = encoded_pair(str(tiny_model_dir), str(tmp_path_factory.mktemp("quant-images")))
    return negated(train_set), heldout_batch(negated(heldout))


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


@pytest.mark.parametrize("mode", ["fp8", "nf4"])
def test_lora_on_a_quantized_base_learns_and_loads_into_the_unquantized_pipeline(
    mode: str, task, tiny_model_dir: Path, tmp_path: Path, one_thread
) -> None:
    train_set, heldout = task
    cfg = task_config(tiny_model_dir, tmp_path / "run", f"memory.base_quant={mode}")
    transformer = fresh_transformer(tiny_model_dir)
    base_loss = heldout_mse(transformer, heldout)
    torch.manual_seed(0)  # the LoRA init draws from the global RNG
    path = fit(cfg, transformer, train_set)
    assert sum(isinstance(m, QUANTIZED) for m in transformer.modules()) == 40  # every block linear of the tiny model
    trained_loss = heldout_mse(transformer, heldout)
    assert trained_loss < 0.9 * base_loss, (base_loss, trained_loss)

    # The file is a plain LoRA: the keys and shapes of the same adapter on an unquantized model.
    saved = _adapter(path)
    plain = fresh_transformer(tiny_model_dir)
    inject_lora(plain, cfg.lora)
    expected = {f"transformer.{key}": tuple(value.shape) for key, value in adapter_state(plain)[0].items()}
    assert {key: tuple(value.shape) for key, value in saved.items()} == expected

    # diffusers loads it into the unquantized tiny pipeline, where it does about what it did on the quantized base.
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model_dir))
    pipe.load_lora_weights(str(path))
    loaded_loss = heldout_mse(pipe.transformer, heldout)
    print(f"{mode}: held-out loss base {base_loss:.4f} trained {trained_loss:.4f} loaded unquantized {loaded_loss:.4f}")
    assert abs(loaded_loss - trained_loss) < 0.01 * trained_loss, (trained_loss, loaded_loss)


def test_train_with_offloaded_encoders_and_an_fp8_base_runs_end_to_end(
    tiny_model_dir: Path, tmp_path: Path, capsys, one_thread
) -> None:
    from kontext_lora.config import load_config

    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            *tiny_model_overrides(tiny_model_dir, max_sequence_length=16),
            f"data.datasets=[{{path: {EXAMPLES}}}]", "data.resolution=64", "lora.rank=4", "lora.alpha=4",
            "train.steps=2", "train.batch_size=2", "train.lr=1e-2", f"output.dir={out}", "logging.report_to=none",
            "memory.text_encoder=cpu_offload", "memory.base_quant=fp8",
            "validation.every=2", "validation.heldout_count=1", "validation.steps=2", "validation.max_images=1",
        ],
    )  # fmt: skip
    path = train(cfg)
    assert path == out / "pytorch_lora_weights.safetensors" and path.is_file()
    printed = capsys.readouterr().out
    assert "base_quant: {'mode': 'fp8', 'linears': 40, 'kept': 0" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    heldout = [r["heldout_loss"] for r in records if "heldout_loss" in r]
    assert len(heldout) == 1 and heldout[0] > 0  # validation ran on the quantized transformer
    assert list((out / "validation" / "step-000002").glob("*.png"))
    assert any(value.abs().max() > 0 for key, value in _adapter(path).items() if "lora_B" in key)
