"""Round trips diffusers -> kohya / ComfyUI -> diffusers are lossless, and import reads the other trainers' layouts."""

from __future__ import annotations

import pytest
import torch

from kontext_lora.export.formats import (
    Adapter,
    FormatError,
    detect_format,
    from_any,
    read_adapter,
    to_comfyui,
    to_diffusers,
    to_kohya,
    write_format,
)

from .conftest import INNER, AdapterCase, load_with_diffusers


def _assert_same_adapter(back: Adapter, original: Adapter) -> None:
    assert set(back.modules) == set(original.modules)
    for module, lora in original.modules.items():
        got = back.modules[module]
        assert torch.equal(got.down, lora.down), module
        assert torch.equal(got.up, lora.up), module
        assert got.alpha == pytest.approx(lora.alpha, rel=1e-6), module


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_round_trip_is_lossless(adapter_case: AdapterCase, fmt: str, tmp_path) -> None:
    original = read_adapter(adapter_case.path)
    assert {lora.alpha for lora in original.modules.values()} == {8.0, 2.0}  # alpha != rank, plus a per-module alpha
    assert {lora.rank for lora in original.modules.values()} == {4, 2}
    exported = write_format(original, fmt, tmp_path / f"{fmt}.safetensors")
    back = read_adapter(exported)
    assert back.source_format == fmt
    _assert_same_adapter(back, original)
    again = read_adapter(write_format(back, "diffusers", tmp_path / "back.safetensors"))
    _assert_same_adapter(again, original)


def test_round_trip_of_partial_group_drops_the_padding(tmp_path) -> None:
    from .conftest import save_adapter_case

    targets = r"^single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)$"
    case = save_adapter_case(tmp_path, targets)
    original = read_adapter(case.path)
    kohya = to_kohya(original)
    assert kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (16, INNER)  # q, k, v, zero proj_mlp
    _assert_same_adapter(from_any(kohya), original)


def test_final_layer_round_trip_bakes_scale(global_case: AdapterCase) -> None:
    """final_layer.* is written with alpha = rank (diffusers ignores alpha there): equal in effect, not in tensors."""
    original = read_adapter(global_case.path)
    back = from_any(to_comfyui(original))
    assert set(back.modules) == set(original.modules)
    for module, lora in original.modules.items():
        assert torch.allclose(back.modules[module].delta(), lora.delta(), atol=1e-6), module
    assert back.modules["proj_out"].alpha == back.modules["proj_out"].rank


def test_comfyui_lora_a_b_and_fal_layouts_import(adapter_case: AdapterCase) -> None:
    original = read_adapter(adapter_case.path)
    comfy = to_comfyui(original)
    renamed = {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v for k, v in comfy.items()}
    assert detect_format(renamed) == "comfyui"
    _assert_same_adapter(from_any(renamed), original)
    # fal: `base_model.model.` + BFL names, lora_A/B, no alpha (scale 1)
    fal = {
        k.replace("diffusion_model.", "base_model.model."): v for k, v in renamed.items() if not k.endswith(".alpha")
    }
    assert detect_format(fal) == "fal"
    back = from_any(fal)
    assert set(back.modules) == set(original.modules)
    for module, lora in original.modules.items():
        assert torch.equal(back.modules[module].up, lora.up) and back.modules[module].alpha == lora.rank


def test_ai_toolkit_layout_without_metadata_means_scale_one(adapter_case: AdapterCase, tmp_path) -> None:
    """ai-toolkit writes diffusers keys with no alphas; diffusers and we both read that as alpha = rank."""
    original = read_adapter(adapter_case.path)
    state, _ = to_diffusers(original)
    baked = {}
    for module, lora in original.modules.items():
        baked[f"transformer.{module}.lora_A.weight"] = lora.down * lora.scale
        baked[f"transformer.{module}.lora_B.weight"] = lora.up
    assert len(baked) == len(state)
    from safetensors.torch import save_file

    save_file(baked, tmp_path / "ai_toolkit.safetensors")
    adapter = read_adapter(tmp_path / "ai_toolkit.safetensors")
    assert all(lora.alpha == lora.rank for lora in adapter.modules.values())
    loaded = load_with_diffusers(tmp_path / "ai_toolkit.safetensors")
    assert loaded.modules == adapter_case.modules
    assert (loaded.output - adapter_case.output).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": 1}, "text-encoder"),
        ({"model.something.weight": 1}, "unrecognised LoRA layout"),
        ({}, "no tensors"),
    ],
)
def test_detect_format_refuses_what_it_cannot_read(keys: dict, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        detect_format(keys)


def test_unhandled_kinds_are_named_not_dropped(adapter_case: AdapterCase) -> None:
    kohya = to_kohya(read_adapter(adapter_case.path))
    kohya["lora_unet_double_blocks_0_img_attn_proj.dora_scale"] = torch.ones(1, 64)
    with pytest.raises(FormatError, match="dora_scale"):
        from_any(kohya)
    unknown_module = {"lora_unet_double_blocks_0_img_attn_foo.lora_down.weight": torch.ones(2, 64)}
    with pytest.raises(FormatError, match="not a FLUX transformer linear"):
        from_any(unknown_module)
