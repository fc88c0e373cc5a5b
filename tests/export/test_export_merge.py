"""Merging LoRAs into the base (diffusers folder and BFL single file) and resizing a LoRA's rank by SVD."""

from __future__ import annotations

import pytest
import torch

from kontext_lora.export.formats import read_adapter
from kontext_lora.export.merge import diffusers_to_bfl_state_dict, merge_loras, resize_adapter, save_merged

from .conftest import (
    INNER,
    TINY_TRANSFORMER,
    AdapterCase,
    diffusers_at_tiny_width,
    fresh_pipeline,
    lora_modules,
    run_transformer,
)

TOLERANCE = 1e-4


def test_merged_transformer_equals_base_plus_lora(adapter_case: AdapterCase) -> None:
    transformer = fresh_pipeline().transformer
    merge_loras(transformer, [(read_adapter(adapter_case.path), 1.0)])
    assert lora_modules(transformer) == set()
    assert (run_transformer(transformer) - adapter_case.output).abs().max().item() < TOLERANCE


def test_dora_adapter_merges_exactly(tmp_path) -> None:
    from .conftest import save_adapter_case

    case = save_adapter_case(tmp_path, ["to_q", "proj_mlp", "norm1.linear"], use_dora=True)
    transformer = merge_loras(fresh_pipeline().transformer, [(read_adapter(case.path), 1.0)])
    assert (run_transformer(transformer) - case.output).abs().max().item() < TOLERANCE


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # the reference's second adapter
def test_merge_of_two_loras_with_scales(adapter_case: AdapterCase, global_case: AdapterCase) -> None:
    reference = fresh_pipeline()
    reference.load_lora_weights(str(adapter_case.path), adapter_name="first")
    reference.load_lora_weights(str(global_case.path), adapter_name="second")
    reference.set_adapters(["first", "second"], [0.5, 0.25])
    expected = run_transformer(reference.transformer)
    assert expected.abs().max() < 10  # a moderate output, so 1e-4 is well above fp32 rounding

    transformer = fresh_pipeline().transformer
    merge_loras(transformer, [(read_adapter(adapter_case.path), 0.5), (read_adapter(global_case.path), 0.25)])
    assert (run_transformer(transformer) - expected).abs().max().item() < TOLERANCE


def test_merged_saves_as_diffusers_folder(adapter_case: AdapterCase, tmp_path) -> None:
    from diffusers import FluxTransformer2DModel

    transformer = merge_loras(fresh_pipeline().transformer, [(read_adapter(adapter_case.path), 1.0)])
    folder = save_merged(transformer, tmp_path / "merged", "diffusers", {"loras": ["x"]})
    reloaded = FluxTransformer2DModel.from_pretrained(folder)
    assert (run_transformer(reloaded) - adapter_case.output).abs().max().item() < TOLERANCE


def test_merged_saves_as_bfl_file_that_diffusers_reads(adapter_case: AdapterCase, tmp_path) -> None:
    """The BFL file, read by diffusers' single-file converter (inner dim set to the tiny model's), is the merge."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    transformer = merge_loras(fresh_pipeline().transformer, [(read_adapter(adapter_case.path), 1.0)])
    path = save_merged(transformer, tmp_path / "merged.safetensors", "bfl", {"loras": ["x"]})
    bfl = load_file(path)
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.bias" in bfl
    assert "final_layer.adaLN_modulation.1.weight" in bfl
    convert = diffusers_at_tiny_width(
        convert_flux_transformer_checkpoint_to_diffusers, {"inner_dim = 3072": f"inner_dim = {INNER}"}
    )
    state = convert(dict(bfl))
    fresh = FluxTransformer2DModel(**TINY_TRANSFORMER)
    fresh.load_state_dict(state, strict=True)
    assert (run_transformer(fresh) - adapter_case.output).abs().max().item() < TOLERANCE


def test_bfl_names_at_full_width_match_unpatched_diffusers_reader() -> None:
    """Keys and shapes at FLUX.1's real size (meta tensors: no memory), read back by diffusers' unchanged converter."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = FluxTransformer2DModel(
            num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
        )  # fmt: skip
    state = model.state_dict()
    bfl = diffusers_to_bfl_state_dict(state)
    assert bfl["single_blocks.0.linear1.weight"].shape == (3 * 3072 + 12288, 3072)
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in state.items()}


def test_resize_reports_energy_and_full_rank_is_exact(adapter_case: AdapterCase) -> None:
    adapter = read_adapter(adapter_case.path)
    same, report = resize_adapter(adapter, rank=4)
    assert report.energy_kept == pytest.approx(1.0)
    for module, lora in adapter.modules.items():
        assert torch.allclose(same.modules[module].delta(), lora.delta(), atol=1e-6), module
        assert same.modules[module].scale == pytest.approx(lora.scale)

    smaller, report = resize_adapter(adapter, rank=2)
    assert {new for _, new in report.ranks.values()} == {2}
    assert 0.3 < report.energy_kept < 1.0
    assert all(0.0 < kept <= 1.0 for kept in report.kept.values())
    assert "energy kept" in report.summary() and "rank 2..4 -> 2" in report.summary()
    assert smaller.info["resized"]["energy_kept"] == pytest.approx(report.energy_kept, abs=1e-6)


def test_resize_by_energy_and_the_result_loads(adapter_case: AdapterCase, tmp_path) -> None:
    from kontext_lora.export.formats import write_format

    from .conftest import load_with_diffusers

    adapter = read_adapter(adapter_case.path)
    resized, report = resize_adapter(adapter, energy=0.6)
    assert all(kept >= 0.6 for kept in report.kept.values())
    assert any(new < old for old, new in report.ranks.values())
    loaded = load_with_diffusers(write_format(resized, "diffusers", tmp_path / "resized.safetensors"))
    assert loaded.complaints == [] and loaded.modules == adapter_case.modules
    full, _ = resize_adapter(adapter, energy=1.0)
    loaded = load_with_diffusers(write_format(full, "diffusers", tmp_path / "full.safetensors"))
    assert (loaded.output - adapter_case.output).abs().max().item() < TOLERANCE
