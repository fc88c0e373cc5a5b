"""Each exported format, loaded by diffusers' own `FluxKontextPipeline.load_lora_weights` into a fresh pipeline,
adapts exactly the adapter's modules and reproduces its outputs (fp32, 1e-4)."""

from __future__ import annotations

import logging

import pytest
import torch

from kontext_lora.export.formats import read_adapter, write_format

from .conftest import (
    INNER,
    MLP,
    SINGLE_KINDS,
    AdapterCase,
    diffusers_at_tiny_width,
    fresh_pipeline,
    load_with_diffusers,
    run_transformer,
    save_adapter_case,
)

TOLERANCE = 1e-4


def _assert_reproduces(case: AdapterCase, path) -> None:
    loaded = load_with_diffusers(path)
    assert loaded.complaints == []
    assert loaded.modules == case.modules, (
        f"missing: {sorted(case.modules - loaded.modules)[:5]}, unexpected: {sorted(loaded.modules - case.modules)[:5]}"
    )
    assert (loaded.output - case.output).abs().max().item() < TOLERANCE


def test_diffusers_export_loads_exactly(adapter_case: AdapterCase, tmp_path) -> None:
    path = write_format(read_adapter(adapter_case.path), "diffusers", tmp_path / "out.safetensors")
    _assert_reproduces(adapter_case, path)


@pytest.mark.usefixtures("tiny_width_kohya_reader")
@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_bfl_format_loads_exactly(adapter_case: AdapterCase, fmt: str, tmp_path) -> None:
    path = write_format(read_adapter(adapter_case.path), fmt, tmp_path / f"{fmt}.safetensors")
    _assert_reproduces(adapter_case, path)


@pytest.mark.usefixtures("tiny_width_kohya_reader")
@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_partial_groups_and_uneven_ranks_load_exactly(fmt: str, tmp_path) -> None:
    """Single blocks without proj_mlp (the `attention` preset) and a q/k/v group of mixed rank and alpha."""
    targets = (
        r"^(transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)|single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v))$"
    )
    case = save_adapter_case(tmp_path, targets, rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 16.0})
    path = write_format(read_adapter(case.path), fmt, tmp_path / f"{fmt}.safetensors")
    loaded = load_with_diffusers(path)
    assert loaded.complaints == []
    # diffusers' reader gives every part of a fused module a LoRA, so the untrained proj_mlp comes back as zeros.
    padding = {m.replace("attn.to_q", "proj_mlp") for m in case.modules if m.startswith("single") and "to_q" in m}
    assert loaded.modules == case.modules | padding
    for name in padding:
        module = loaded.pipe.transformer.get_submodule(name)
        assert not any(layer.weight.any() for layer in module.lora_B.values())
    assert (loaded.output - case.output).abs().max().item() < TOLERANCE


@pytest.mark.usefixtures("tiny_width_kohya_reader")
def test_rslora_adapter_keeps_its_scale(tmp_path) -> None:
    """rsLoRA scales by alpha / sqrt(r); kohya has only alpha / r, so the exported alpha is alpha * sqrt(r)."""
    case = save_adapter_case(tmp_path, ["to_q", "to_k", "to_v", "proj_mlp"], use_rslora=True)
    _assert_reproduces(case, write_format(read_adapter(case.path), "kohya", tmp_path / "kohya.safetensors"))


def test_comfyui_lora_a_b_names_are_not_read_by_diffusers(adapter_case: AdapterCase, tmp_path) -> None:
    """Why the ComfyUI export writes lora_down/lora_up: with lora_A/lora_B under `diffusion_model.`, diffusers'
    loader adapts nothing (and only logs it), although ComfyUI reads both spellings."""
    from safetensors.torch import save_file

    from kontext_lora.export.formats import to_comfyui

    comfy = to_comfyui(read_adapter(adapter_case.path))
    renamed = {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v for k, v in comfy.items()}
    save_file(renamed, tmp_path / "ab.safetensors")
    loaded = load_with_diffusers(tmp_path / "ab.safetensors")
    assert loaded.modules == set() and any("No LoRA keys" in m for m in loaded.complaints)


def test_global_modules_diffusers_format_loads_exactly(global_case: AdapterCase, tmp_path) -> None:
    path = write_format(read_adapter(global_case.path), "diffusers", tmp_path / "out.safetensors")
    _assert_reproduces(global_case, path)


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")  # the oracle's own load
@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_global_modules_bfl_names_match_diffusers_reader(global_case: AdapterCase, fmt: str, tmp_path, caplog) -> None:
    """Embedders and the final layer (shift/scale swap, alpha baked) as diffusers' kohya converter maps them.

    `load_lora_weights` itself drops these modules from kohya/ComfyUI files (its converter returns them without the
    `transformer.` prefix); the export says so, and the mapping is checked by loading the converter's output.
    """
    from diffusers import FluxKontextPipeline

    with caplog.at_level(logging.WARNING, logger="kontext_lora.export.formats"):
        path = write_format(read_adapter(global_case.path), fmt, tmp_path / f"{fmt}.safetensors")
    assert "drops modules outside the double/single blocks" in caplog.text
    converted = FluxKontextPipeline.lora_state_dict(str(path))
    assert not any(key.startswith("transformer.") for key in converted)
    pipe = fresh_pipeline()
    pipe.transformer.load_lora_adapter({f"transformer.{k}": v for k, v in converted.items()}, prefix="transformer")
    assert (run_transformer(pipe.transformer) - global_case.output).abs().max().item() < TOLERANCE


def test_dora_has_a_place_in_diffusers_format_only(tmp_path) -> None:
    from kontext_lora.export.formats import FormatError

    case = save_adapter_case(tmp_path, ["to_q", "proj_mlp"], use_dora=True)
    path = write_format(read_adapter(case.path), "diffusers", tmp_path / "dora.safetensors")
    _assert_reproduces(case, path)
    for fmt in ("kohya", "comfyui"):
        with pytest.raises(FormatError, match="DoRA"):
            write_format(read_adapter(case.path), fmt, tmp_path / f"{fmt}.safetensors")
    assert not (tmp_path / "kohya.safetensors").exists()


def test_real_width_fusion_matches_unpatched_diffusers_reader() -> None:
    """At FLUX.1's full widths, diffusers' kohya converter (unchanged) splits our fused tensors back exactly."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from kontext_lora.export.formats import Adapter, ModuleLora, from_kohya, to_kohya

    adapter = _full_width_adapter()
    kohya = to_kohya(adapter)
    assert kohya["lora_unet_single_blocks_37_linear1.lora_up.weight"].shape == (3 * 3072 + 12288, 16)
    converted = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted} == set(adapter.modules)
    for module, lora in adapter.modules.items():
        # alpha/rank = 2: diffusers bakes it into lora_A and leaves lora_B as is
        assert torch.equal(converted[f"transformer.{module}.lora_A.weight"], lora.down * 2)
        assert torch.equal(converted[f"transformer.{module}.lora_B.weight"], lora.up)
    back = from_kohya(kohya)
    assert isinstance(back, Adapter) and set(back.modules) == set(adapter.modules)
    for module, lora in adapter.modules.items():
        assert isinstance(back.modules[module], ModuleLora)
        assert torch.equal(back.modules[module].down, lora.down) and torch.equal(back.modules[module].up, lora.up)
        assert back.modules[module].alpha == lora.alpha


def _full_width_adapter():
    """Rank-4 LoRAs (alpha 8) at FLUX.1's shapes on every kind of double block 0 and single block 37."""
    from kontext_lora.export.formats import Adapter, ModuleLora

    d = 3072
    shapes = {
        "attn.to_q": (d, d), "attn.to_k": (d, d), "attn.to_v": (d, d), "attn.to_out.0": (d, d),
        "attn.add_q_proj": (d, d), "attn.add_k_proj": (d, d), "attn.add_v_proj": (d, d), "attn.to_add_out": (d, d),
        "ff.net.0.proj": (4 * d, d), "ff.net.2": (d, 4 * d), "ff_context.net.0.proj": (4 * d, d),
        "ff_context.net.2": (d, 4 * d), "norm1.linear": (6 * d, d), "norm1_context.linear": (6 * d, d),
    }  # fmt: skip
    single = {"attn.to_q": (d, d), "attn.to_k": (d, d), "attn.to_v": (d, d), "proj_mlp": (4 * d, d),
              "proj_out": (d, 5 * d), "norm.linear": (3 * d, d)}  # fmt: skip
    assert set(single) == {k for k in SINGLE_KINDS}
    generator = torch.Generator().manual_seed(3)
    modules = {}
    for prefix, table in (("transformer_blocks.0.", shapes), ("single_transformer_blocks.37.", single)):
        for kind, (out_features, in_features) in table.items():
            down = torch.randn(4, in_features, generator=generator)
            up = torch.randn(out_features, 4, generator=generator)
            modules[prefix + kind] = ModuleLora(down, up, 8.0)
    return Adapter(modules)


def test_tiny_width_patch_changes_only_the_widths() -> None:
    """The patched reader used above differs from diffusers' only in linear1's split sizes."""
    import inspect

    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    patched = diffusers_at_tiny_width(
        _convert_kohya_flux_lora_to_diffusers,
        {"dims=[3072, 3072, 3072, 12288]": f"dims=[{INNER}, {INNER}, {INNER}, {MLP}]"},
    )
    original = inspect.getsource(_convert_kohya_flux_lora_to_diffusers)
    assert patched.__code__.co_name == _convert_kohya_flux_lora_to_diffusers.__name__
    assert original.count("3072") == 3 and original.count("12288") == 1  # only the split sizes are widths
