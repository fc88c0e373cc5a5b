"""The export / merge / resize entry points: files written, model card, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kontext_lora.export.card import model_card
from kontext_lora.export.cli import export_main, merge_main, resize_main
from kontext_lora.export.diffusers_format import KONTEXT_LORA_METADATA_KEY, read_lora_file, save_diffusers_lora
from kontext_lora.export.formats import read_adapter

from .conftest import AdapterCase, run_transformer, save_adapter_case


def test_export_all_writes_every_format_and_a_card(adapter_case: AdapterCase, tmp_path, capsys) -> None:
    out = tmp_path / "export"
    assert export_main(["--lora", str(adapter_case.path), "--format", "all", "--out", str(out), "--name", "edit"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "README.md",
        "edit_comfyui.safetensors",
        "edit_kohya.safetensors",
        "pytorch_lora_weights.safetensors",
    ]
    printed = capsys.readouterr().out
    assert "kohya: " in printed
    # alpha 8 / rank 4: the diffusers file would load at half strength in ComfyUI; the log and the card say which.
    assert f"ComfyUI: load {out / 'edit_comfyui.safetensors'}, whose tensors carry each module's alpha" in printed
    assert "(it would scale by 1, not alpha/r = 2)" in printed
    card = (out / "README.md").read_text()
    assert "## Use with ComfyUI\n\nComfyUI: load `edit_comfyui.safetensors`" in card and "not alpha/r = 2" in card
    for expected in ("`tiny-kontext`", "r = 4, alpha = 8", "update scale alpha/r = 2", "| Steps | 10 |", "```yaml",
                     "edit_comfyui.safetensors", "load_lora_weights"):  # fmt: skip
        assert expected in card, expected
    _, metadata = read_lora_file(out / "edit_kohya.safetensors")
    assert json.loads(metadata[KONTEXT_LORA_METADATA_KEY])["format"] == "kohya"
    assert "lora_adapter_metadata" not in metadata  # diffusers would apply it on top of the baked alphas


def test_card_copies_the_sample_grid(adapter_case: AdapterCase, tmp_path) -> None:
    tensors, metadata = read_lora_file(adapter_case.path)
    info = json.loads(metadata[KONTEXT_LORA_METADATA_KEY]) | {"sample_grid": "samples/grid.png"}
    config = {k.removeprefix("transformer."): v for k, v in json.loads(metadata["lora_adapter_metadata"]).items()}
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "grid.png").write_bytes(b"\x89PNG fake")
    state = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    path = save_diffusers_lora(run / "pytorch_lora_weights.safetensors", state, config, info)
    assert export_main(["--lora", str(path), "--format", "diffusers", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "grid.png").exists()
    assert "![validation samples](grid.png)" in (tmp_path / "out" / "README.md").read_text()


def test_model_card_reads_recorded_fields() -> None:
    metadata = {
        "lora_adapter_metadata": json.dumps({"transformer.r": 16, "transformer.lora_alpha": 8,
                                             "transformer.target_modules": ["to_q", "to_k"]}),
        KONTEXT_LORA_METADATA_KEY: json.dumps({"base_model": "black-forest-labs/FLUX.1-Kontext-dev", "step": 1500,
                                               "buckets": [[512, 512], [768, 512]],
                                               "control_resize": "same bucket as the target"}),
    }  # fmt: skip
    card = model_card(metadata, ["pytorch_lora_weights.safetensors"])
    for expected in ("base_model: black-forest-labs/FLUX.1-Kontext-dev", "alpha/r = 0.5", "`to_k`, `to_q`",
                     "| Steps | 1500 |", "512x512, 768x512", "same bucket as the target"):  # fmt: skip
        assert expected in card, expected
    assert "not recorded" in model_card({}) and "## Samples" not in model_card({})


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "make_args",
    [
        lambda tmp, case: ["--lora", str(tmp / "missing.safetensors"), "--format", "kohya", "--out", str(tmp)],
        lambda tmp, case: ["--lora", str(case.path), "--format", "onnx", "--out", str(tmp)],
        lambda tmp, case: ["--lora", str(case.path), "--out", str(tmp)],
    ],
    ids=["missing-file", "unknown-format", "missing-flag"],
)
def test_export_user_errors_are_one_line(adapter_case: AdapterCase, tmp_path, capsys, make_args) -> None:
    assert export_main(make_args(tmp_path, adapter_case)) == 2
    assert "error" in _one_error_line(capsys)


def test_export_refuses_unknown_keys_and_garbage(tmp_path, capsys) -> None:
    save_file({"model.something.weight": torch.ones(2, 2)}, tmp_path / "odd.safetensors")
    assert export_main(["--lora", str(tmp_path / "odd.safetensors"), "--format", "all", "--out", str(tmp_path)]) == 2
    assert "unrecognised LoRA layout" in _one_error_line(capsys)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert export_main(["--lora", str(tmp_path / "junk.safetensors"), "--format", "all", "--out", str(tmp_path)]) == 2
    assert "not a readable safetensors file" in _one_error_line(capsys)


def test_export_of_dora_to_kohya_fails_before_writing(tmp_path, capsys) -> None:
    case = save_adapter_case(tmp_path / "run", ["to_q"], use_dora=True)
    out = tmp_path / "out"
    assert export_main(["--lora", str(case.path), "--format", "all", "--out", str(out)]) == 2
    assert "DoRA" in _one_error_line(capsys)
    assert not out.exists()


def test_merge_main_writes_a_loadable_transformer(adapter_case: AdapterCase, tmp_path, capsys) -> None:
    from diffusers import FluxTransformer2DModel

    from kontext_lora.model.tiny import make_tiny_model

    base = make_tiny_model(tmp_path / "tiny", seed=0, pretrained=False)
    out = tmp_path / "merged"
    args = ["--base", str(base), "--lora", f"{adapter_case.path}:1.0", "--out", str(out), "--dtype", "float32"]
    assert merge_main(args) == 0
    merged = FluxTransformer2DModel.from_pretrained(out)
    assert (run_transformer(merged) - adapter_case.output).abs().max().item() < 1e-4
    bfl = tmp_path / "merged.safetensors"
    assert merge_main([*args[:-4], "--out", str(bfl), "--format", "bfl", "--dtype", "float32"]) == 0
    assert bfl.stat().st_size > 0
    capsys.readouterr()
    assert merge_main(["--base", str(tmp_path / "nowhere"), "--lora", str(adapter_case.path), "--out", str(out)]) == 2
    assert "not a folder" in _one_error_line(capsys)


def test_resize_main_prints_energy(adapter_case: AdapterCase, tmp_path, capsys) -> None:
    out = tmp_path / "small.safetensors"
    assert resize_main(["--lora", str(adapter_case.path), "--rank", "2", "--out", str(out)]) == 0
    assert "energy kept" in capsys.readouterr().out
    assert {lora.rank for lora in read_adapter(out).modules.values()} == {2}
    assert resize_main(["--lora", str(adapter_case.path), "--rank", "2", "--energy", "0.9", "--out", str(out)]) == 2
    assert "not allowed with" in _one_error_line(capsys)


def test_resize_refuses_a_rank_above_the_loras(adapter_case: AdapterCase, tmp_path, capsys) -> None:
    out = tmp_path / "big.safetensors"
    assert resize_main(["--lora", str(adapter_case.path), "--rank", "64", "--out", str(out)]) == 2
    message = _one_error_line(capsys)
    assert message.endswith("rank 64 is above this LoRA's rank 4: resizing can only lower a rank; give one below 4")
    assert not out.exists()
