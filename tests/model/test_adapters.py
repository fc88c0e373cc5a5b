"""Every adapter kind trains a few steps on the tiny model, has PEFT's parameter count, and loads back exactly.

LoRA kinds (plain, DoRA, rsLoRA, rank/alpha patterns, orthogonal init, a regex target) also load with diffusers'
own `load_lora_weights` and reproduce the trained model; LoHa/LoKr load back through `load_adapter_file`; PiSSA and
OLoRA, which rewrite the base weights, save a LoRA that reproduces the trained model on the original base.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import FluxKontextPipeline
from peft.tuners.lokr.layer import factorization
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from kontext_lora.config import ConfigError
from kontext_lora.export.formats import FormatError, write_exports
from kontext_lora.model.lora import adapter_state, inject_lora, load_adapter_file, lora_parameters
from kontext_lora.train.loop import fit
from kontext_lora.train.objective import predict_velocity
from tests.train.tiny_task import encoded_pair, fixed_eval, fresh_transformer, heldout_batch, negated, task_config

RANK, ALPHA = 4, 8.0
PATTERNS = ["lora.rank_pattern={'single_transformer_blocks.*': 2}", "lora.alpha_pattern={'ff.*': 3.0}"]
KINDS = {
    "lora": [],
    "dora": ["lora.use_dora=true"],
    "rslora": ["lora.use_rslora=true"],
    "patterns": PATTERNS,
    "orthogonal": ["lora.init_lora_weights=orthogonal"],
    "pissa": ["lora.init_lora_weights=pissa"],
    "olora": ["lora.init_lora_weights=olora", "lora.use_rslora=true"],
    "regex": [r"lora.target_regex='.*blocks\.\d+\.attn\.to_(q|v)'"],
    "loha": ["lora.adapter_type=loha", "lora.init_lora_weights=default"],
    "lokr": ["lora.adapter_type=lokr", "lora.init_lora_weights=default"],
}


@pytest.fixture(scope="module")
def task(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    train, heldout = encoded_pair(str(tiny_model_dir), str(tmp_path_factory.mktemp("tiny_task")))
    return negated(train), heldout_batch(negated(heldout))


def _expected_rank(kind: str, module: str) -> int:
    return 2 if kind == "patterns" and module.startswith("single_transformer_blocks") else RANK


def _expected_scale(kind: str, module: str) -> float:
    alpha = 3.0 if kind == "patterns" and (".ff." in module or ".ff_context." in module) else ALPHA
    rank = _expected_rank(kind, module)
    return alpha / math.sqrt(rank) if kind in ("rslora", "olora") else alpha / rank


def _expected_count(kind: str, modules: dict[str, torch.nn.Linear]) -> int:
    """The parameters PEFT's formulas give each adapted Linear (in -> out)."""
    total = 0
    for name, base in modules.items():
        fan_in, fan_out, r = base.in_features, base.out_features, _expected_rank(kind, name)
        if kind == "loha":  # hada_w1_a (out, r), hada_w1_b (r, in), and the same again for w2
            total += 2 * r * (fan_in + fan_out)
        elif kind == "lokr":  # kron(w1 (out_l, in_m), w2 (out_k, in_n)); w2 low-rank when r < max(out_k, in_n) / 2
            in_m, in_n = factorization(fan_in, -1)
            out_l, out_k = factorization(fan_out, -1)
            total += out_l * in_m + (r * (out_k + in_n) if r < max(out_k, in_n) / 2 else out_k * in_n)
        else:  # lora_A (r, in), lora_B (out, r); DoRA adds a magnitude per output row
            total += r * (fan_in + fan_out) + (fan_out if kind == "dora" else 0)
    return total


def _predict(transformer, batch) -> torch.Tensor:
    sigmas, noise = fixed_eval(batch)
    noisy = (1 - sigmas.view(-1, 1, 1, 1)) * batch.target_latents + sigmas.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        return predict_velocity(transformer, batch, noisy, sigmas, 1.0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_adapter_kind_trains_counts_and_loads_back(kind: str, task, tiny_model_dir: Path, tmp_path: Path) -> None:
    train, heldout = task
    cfg = task_config(tiny_model_dir, tmp_path / "run", f"lora.rank={RANK}", f"lora.alpha={ALPHA}",
                      "train.steps=3", "train.lr=1e-2", *KINDS[kind])  # fmt: skip
    transformer = fresh_transformer(tiny_model_dir)
    base_prediction = _predict(transformer, heldout)
    path = fit(cfg, transformer, train)
    trained_prediction = _predict(transformer, heldout)
    assert (trained_prediction - base_prediction).abs().max() > 1e-4  # training changed the model

    adapted = {n: m.get_base_layer() for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)}
    if kind == "regex":
        assert {n.rsplit(".", 1)[-1] for n in adapted} == {"to_q", "to_v"} and len(adapted) == 8  # 2+2 blocks
    assert sum(p.numel() for p in lora_parameters(transformer)) == _expected_count(kind, adapted)
    if kind not in ("loha", "lokr"):
        scales = {n: m.scaling["default"] for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)}
        assert scales == pytest.approx({n: _expected_scale(kind, n) for n in adapted})

    if kind in ("pissa", "olora"):
        _check_saved_as_lora_on_the_original_base(transformer, path, tiny_model_dir, heldout, trained_prediction)
        return

    # Save -> load into a fresh injected transformer: tensor-equal state, the same predictions.
    trained_state, _ = adapter_state(transformer)
    with safe_open(str(path), framework="pt") as handle:
        peft_type = json.loads(handle.metadata()["lora_adapter_metadata"])["transformer.peft_type"]
    assert peft_type == {"loha": "LOHA", "lokr": "LOKR"}.get(kind, "LORA")
    fresh = fresh_transformer(tiny_model_dir)
    inject_lora(fresh, cfg.lora)
    load_adapter_file(fresh, path)
    loaded_state, _ = adapter_state(fresh)
    assert set(loaded_state) == set(trained_state)
    if kind == "dora":
        assert any("lora_magnitude_vector" in key for key in loaded_state)
    for key, value in trained_state.items():
        torch.testing.assert_close(loaded_state[key], value, rtol=0, atol=0)
    torch.testing.assert_close(_predict(fresh, heldout), trained_prediction, rtol=0, atol=1e-5)

    if kind in ("loha", "lokr"):
        return
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model_dir))  # diffusers' own loader reproduces it too
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(_predict(pipe.transformer, heldout), trained_prediction, rtol=0, atol=1e-5)


def _check_saved_as_lora_on_the_original_base(transformer, path, tiny_model_dir, heldout, trained_prediction):
    """PiSSA / OLoRA rewrote the base weights; the saved file is a rank-2r LoRA for the untouched base."""
    original = fresh_transformer(tiny_model_dir)
    name = "transformer_blocks.0.attn.to_q"
    mutated = dict(transformer.named_modules())[name].get_base_layer().weight
    assert (mutated - dict(original.named_modules())[name].weight).abs().max() > 1e-3  # the base was rewritten
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_tensor(f"transformer.{name}.lora_A.weight").shape[0] == 2 * RANK
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert config["transformer.r"] == 2 * RANK and config["transformer.init_lora_weights"] is True
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model_dir))  # the original base weights
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(_predict(pipe.transformer, heldout), trained_prediction, rtol=0, atol=1e-4)


def test_loha_file_refuses_kohya_export_and_config_refuses_it_up_front(task, tiny_model_dir: Path, tmp_path: Path):
    train, _ = task
    cfg = task_config(tiny_model_dir, tmp_path / "run", "train.steps=1", "lora.adapter_type=loha",
                      "lora.init_lora_weights=default")  # fmt: skip
    path = fit(cfg, fresh_transformer(tiny_model_dir), train)
    with pytest.raises(FormatError, match="LoHa/LoKr"):
        write_exports(path, tmp_path / "out", ["diffusers", "kohya"])
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert write_exports(path, tmp_path / "out2", ["diffusers"], card=False)["diffusers"].is_file()
    with pytest.raises(ConfigError, match="output.export_formats.*kohya cannot hold LoHa/LoKr"):
        task_config(tiny_model_dir, tmp_path, "lora.adapter_type=loha", "lora.init_lora_weights=default",
                    "output.export_formats=[kohya]")  # fmt: skip
    with pytest.raises(ConfigError, match="comfyui cannot hold DoRA"):
        task_config(tiny_model_dir, tmp_path, "lora.use_dora=true", "output.export_formats=[comfyui]")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.adapter_type=lokr", "lora.use_dora=true"], "lokr has no use_dora"),
        (["lora.init_lora_weights=orthogonal", "lora.rank=3"], "orthogonal needs an even lora.rank"),
        (["lora.adapter_type=lohaa"], "did you mean `loha`"),
        (["lora.adapter_type=loha", "lora.init_lora_weights=default", "lora.dropout=0.1"], "loha has none"),
    ],
)
def test_bad_adapter_settings_fail_naming_the_key(overrides, message, tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        task_config(tiny_model_dir, tmp_path, *overrides)
