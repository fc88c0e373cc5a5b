"""EMA of the adapter: the saved EMA equals the EMA recurrence over the saved adapters, and diffusers loads it."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from diffusers import FluxKontextPipeline
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from kontext_lora.config import EmaConfig, load_config
from kontext_lora.data.triples import discover_triples
from kontext_lora.model.load import load_pipeline
from kontext_lora.train.ema import EMA_WEIGHT_NAME, AdapterEMA
from kontext_lora.train.loop import fit
from tests.square_crops import TripleDataset, encode_dataset
from tests.tiny_config import tiny_model_overrides

from ..conftest import EXAMPLES

DECAY = 0.8


pytestmark = pytest.mark.usefixtures("one_thread")


def test_saved_ema_is_the_recurrence_of_the_adapter_weights_and_loads(
    tiny_model_dir: Path, tmp_path: Path, caplog
) -> None:
    run = tmp_path / "run"
    cfg = load_config(
        None,
        [
            *tiny_model_overrides(tiny_model_dir),
            f"data.datasets=[{{path: {EXAMPLES}}}]", "data.resolution=32", "lora.rank=4", "train.steps=6",
            "train.batch_size=2", "train.lr=2e-2", f"output.dir={run}", "output.save_every=1",
            "logging.report_to=none", "ema.enabled=true", f"ema.decay={DECAY}", "ema.every=2", "ema.ramp=false",
        ],
    )  # fmt: skip
    pipe = load_pipeline(cfg.model)
    encoded = encode_dataset(pipe, TripleDataset(discover_triples(EXAMPLES)[:4], 32), 8, show_progress=False)
    final = fit(cfg, pipe.transformer, encoded)

    # The adapter after each step (step-N/ for N < 6, the final one for 6); the EMA averages steps 2, 4, 6.
    adapters = {step: load_file(run / f"step-{step:06d}" / final.name) for step in range(1, 6)} | {6: load_file(final)}
    assert any(not torch.equal(adapters[2][k], adapters[6][k]) for k in adapters[6])  # the weights did move
    ema = dict(adapters[2])  # the first update copies the weights
    for step in (4, 6):
        ema = {k: DECAY * ema[k] + (1 - DECAY) * adapters[step][k] for k in ema}
        saved = load_file((run / f"step-{step:06d}" if step < 6 else run) / EMA_WEIGHT_NAME)
        assert set(saved) == set(ema)
        for key in ema:
            torch.testing.assert_close(saved[key], ema[key], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(saved[k], adapters[6][k]) for k in saved)  # it is an average, not the last weights

    fresh = FluxKontextPipeline.from_pretrained(str(tiny_model_dir))
    with caplog.at_level(logging.WARNING):
        fresh.load_lora_weights(str(run / EMA_WEIGHT_NAME), adapter_name="ema")
    assert not [r for r in caplog.records if re.search(r"(unexpected|missing)[_ ]keys", r.getMessage(), re.I)]
    loaded = get_peft_model_state_dict(fresh.transformer, adapter_name="ema")
    assert set(loaded) == {key.removeprefix("transformer.") for key in saved}
    for key, value in loaded.items():
        assert torch.equal(value, saved["transformer." + key])


@pytest.mark.parametrize("ramp", [True, False])
def test_decay_schedule(ramp: bool) -> None:
    """Update n uses min(decay, n / (9 + n)) with the ramp (diffusers EMAModel), else the constant decay; the first
    update copies the weights."""
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA([weight], EmaConfig(enabled=True, decay=0.5, every=1, ramp=ramp))
    expected = None
    for n in range(1, 6):
        weight.data.fill_(float(n))
        ema.update(n)
        decay = 0.0 if n == 1 else (min(0.5, n / (9 + n)) if ramp else 0.5)
        expected = float(n) if expected is None else decay * expected + (1 - decay) * n
        with ema.applied():
            torch.testing.assert_close(weight.data, torch.full((3,), expected))
        assert torch.equal(weight.data, torch.full((3,), float(n)))  # restored after use
