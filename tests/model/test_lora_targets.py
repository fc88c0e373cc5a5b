"""Which modules each LoRA preset adapts in the (tiny, real) Kontext transformer, and how the adapter is trained."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft.tuners.tuners_utils import BaseTunerLayer

from kontext_lora.config import LoraConfig
from kontext_lora.model.lora import inject_lora, lora_parameters
from kontext_lora.model.tiny import TINY_TRANSFORMER

DOUBLE_BLOCKS = TINY_TRANSFORMER["num_layers"]
SINGLE_BLOCKS = TINY_TRANSFORMER["num_single_layers"]

# KONTEXT.md's module kinds, written out here rather than imported so the test does not restate the code.
DOUBLE_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]  # fmt: skip
DOUBLE_MLP = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
SINGLE_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_out"]
SINGLE_MLP = ["proj_mlp"]


def _names(double: list[str], single: list[str]) -> set[str]:
    return {f"transformer_blocks.{i}.{kind}" for i in range(DOUBLE_BLOCKS) for kind in double} | {
        f"single_transformer_blocks.{i}.{kind}" for i in range(SINGLE_BLOCKS) for kind in single
    }


EXPECTED = {
    "attention": _names(DOUBLE_ATTENTION, SINGLE_ATTENTION),
    "attention_mlp": _names(DOUBLE_ATTENTION + DOUBLE_MLP, SINGLE_ATTENTION + SINGLE_MLP),
    "all": _names(
        DOUBLE_ATTENTION + DOUBLE_MLP + ["norm1.linear", "norm1_context.linear"],
        SINGLE_ATTENTION + SINGLE_MLP + ["norm.linear"],
    ),
}


def _transformer(dtype: torch.dtype = torch.float32) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**TINY_TRANSFORMER).to(dtype)


def _adapted(model: torch.nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def _kind(name: str) -> str:
    """'transformer_blocks.3.attn.to_q' -> 'attn.to_q'."""
    return name.split(".", 2)[2]


@pytest.mark.parametrize("preset", ["attention", "attention_mlp", "all"])
def test_preset_adapts_exactly_its_modules(preset: str):
    model = _transformer()
    inject_lora(model, LoraConfig(preset=preset, rank=4))
    adapted = _adapted(model)
    assert adapted == EXPECTED[preset]
    assert "proj_out" not in adapted  # the model's final layer, whose name a suffix `proj_out` would also match
    assert not any(name.startswith(("x_embedder", "context_embedder", "time_text_embed", "norm_out"))
                   for name in adapted)  # fmt: skip


def test_attention_mlp_is_the_14_kinds_per_block():
    model = _transformer()
    inject_lora(model, LoraConfig(preset="attention_mlp"))
    adapted = _adapted(model)
    assert len({_kind(name) for name in adapted}) == 14
    for i in range(DOUBLE_BLOCKS):
        assert len([n for n in adapted if n.startswith(f"transformer_blocks.{i}.")]) == 12
    for i in range(SINGLE_BLOCKS):
        assert len([n for n in adapted if n.startswith(f"single_transformer_blocks.{i}.")]) == 5
    assert not {n for n in adapted if "norm" in n}


def test_all_adds_exactly_the_modulation_layers():
    model = _transformer()
    inject_lora(model, LoraConfig(preset="all"))
    added = _adapted(model) - EXPECTED["attention_mlp"]
    assert {_kind(name) for name in added} == {"norm1.linear", "norm1_context.linear", "norm.linear"}
    assert len(added) == 2 * DOUBLE_BLOCKS + SINGLE_BLOCKS


def test_explicit_target_modules_override_the_preset():
    model = _transformer()
    inject_lora(model, LoraConfig(preset="all", target_modules=["to_q"]))
    every_to_q = {name for name, _ in model.named_modules() if name.endswith("attn.to_q")}
    assert _adapted(model) == _names(["attn.to_q"], ["attn.to_q"]) == every_to_q


def test_unknown_explicit_target_names_the_key():
    with pytest.raises(ValueError, match="lora.target_modules"):
        inject_lora(_transformer(), LoraConfig(target_modules=["to_qq"]))


def test_only_lora_parameters_train_in_float32_over_a_bfloat16_base():
    model = _transformer(torch.bfloat16)
    inject_lora(model, LoraConfig(preset="attention_mlp", rank=4, alpha=8.0))

    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(trainable) == 2 * len(EXPECTED["attention_mlp"])
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in trainable.values()}
    frozen = [p for name, p in model.named_parameters() if "lora_" not in name]
    assert frozen and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)

    layer = model.transformer_blocks[0].attn.to_q
    assert layer.lora_A["default"].weight.shape == (4, layer.base_layer.in_features)
    assert layer.lora_B["default"].weight.shape == (layer.base_layer.out_features, 4)
    assert layer.scaling["default"] == pytest.approx(2.0)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # default init: the adapter starts as a no-op
