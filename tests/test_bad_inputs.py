"""Bad input through the CLI, in one list: every case ends in one line naming the key or file, and writes nothing.

Each case runs `kontext_lora.cli.main` in this process and fails before any model weight is read, so the whole
list takes seconds. The train cases point output.dir at a folder that holds another run's config.yaml and
preflight.jpg: a failure must leave them (and everything else in the workspace) as they were.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_lora.cli import main
from kontext_lora.export.diffusers_format import save_diffusers_lora


@dataclass
class Workspace:
    root: Path
    model: Path  # a copy of the tiny model, intact
    data: Path
    job: Path  # a valid config: the tiny model, `data`, output.dir = `run`
    run: Path  # holds another run's config.yaml and preflight.jpg
    lora: Path  # a valid diffusers-format LoRA

    def case_dir(self, name: str) -> Path:
        folder = self.root / "cases" / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def _png(path: Path, seed: int, size: tuple[int, int] = (32, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _data(folder: Path) -> Path:
    for i, stem in enumerate(("a", "b")):
        _png(folder / "control" / f"{stem}.png", 2 * i)
        _png(folder / "target" / f"{stem}.png", 2 * i + 1)
        (folder / "target" / f"{stem}.txt").write_text("make it black and white")
    return folder


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Workspace:
    root = tmp_path_factory.mktemp("bad_inputs")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    data = _data(root / "data")
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text("the earlier run's config\n")
    _png(run / "preflight.jpg", 9)
    job = root / "job.yaml"
    job.write_text(
        f"model: {{pretrained: '{model}', dtype: float32, max_sequence_length: 8}}\n"
        f"data: {{datasets: [{{path: '{data}'}}], resolution: 32}}\n"
        f"lora: {{rank: 4, alpha: 4}}\ntrain: {{steps: 2}}\noutput: {{dir: '{run}'}}\nlogging: {{report_to: none}}\n"
    )
    lora = root / "lora.safetensors"
    generator = torch.Generator().manual_seed(0)
    state = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64, generator=generator),
             "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4, generator=generator)}  # fmt: skip
    save_diffusers_lora(lora, state, {"r": 4, "lora_alpha": 4, "target_modules": ["to_q"]}, {"step": 1})
    return Workspace(root, model, data, job, run, lora)


# --------------------------------------------------------------------------------------------- case builders


def _train(ws: Workspace, *overrides: str) -> list[str]:
    return ["train", "--config", str(ws.job), *overrides]


def _file(ws: Workspace, name: str) -> Path:
    path = ws.case_dir(name) / "a-file"
    path.write_text("not a folder")
    return path


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pickle(ws: Workspace, name: str) -> Path:
    path = ws.case_dir(name) / "weights.safetensors"
    path.write_bytes(pickle.dumps({"lora_A": [1.0, 2.0]}))
    return path


def _damaged_model(ws: Workspace, name: str, damage: Callable[[Path], None]) -> Path:
    model = ws.case_dir(name) / "model"
    shutil.copytree(ws.model, model)
    damage(model)
    return model


def _cut(relative: str) -> Callable[[Path], None]:
    def damage(model: Path) -> None:
        path = model / relative
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return damage


def _zero_header(relative: str) -> Callable[[Path], None]:
    def damage(model: Path) -> None:
        path = model / relative
        data = bytearray(path.read_bytes())
        data[:64] = bytes(64)
        path.write_bytes(bytes(data))

    return damage


def _remove(relative: str) -> Callable[[Path], None]:
    def damage(model: Path) -> None:
        path = model / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return damage


def _model_case(relative: str, damage: Callable[[str], Callable[[Path], None]], needle: str | None = None):
    def build(ws: Workspace, name: str) -> tuple[list[str], str]:
        model = _damaged_model(ws, name, damage(relative))
        return _train(ws, f"model.pretrained={model}"), needle or str(model / relative)

    return build


def _data_case(make: Callable[[Path], None], needle: str):
    def build(ws: Workspace, name: str) -> tuple[list[str], str]:
        folder = ws.case_dir(name) / "data"
        folder.mkdir()
        make(folder)
        return _train(ws, f"data.datasets=[{{path: '{folder}'}}]"), needle.format(data=folder)

    return build


def _missing_control(folder: Path) -> None:
    _png(folder / "target" / "a.png", 1)
    (folder / "control").mkdir()


def _corrupt_target(folder: Path) -> None:
    _png(folder / "control" / "a.png", 0)
    (folder / "target").mkdir()
    (folder / "target" / "a.png").write_bytes(np.random.default_rng(2).bytes(4096))


def _bad_metadata(folder: Path) -> None:
    (folder / "metadata.jsonl").write_text('{"control": "c.png", "target": \n')


# (case id, builder -> (argv, the text the one line must contain)). A builder of plain overrides names the key.
_CONFIG_VALUES = [
    "train.lr=-1", "train.lr=nan", "train.lr=inf", "train.seed=-1", "train.seed=4294967296", "output.save_every=-1",
    "train.warmup_steps=-1", "train.steps=0", "train.batch_size=0", "train.gradient_accumulation=0",
    "train.weight_decay=-0.1", "train.max_grad_norm=-1", "train.logit_std=0", "train.logit_mean=nan", "lora.rank=0",
    "lora.alpha=0", "lora.alpha=nan", "lora.dropout=1", "lora.dropout=-0.1", "data.resolution=0",
    "data.resolution=100", "data.num_workers=-1", "data.max_aspect_ratio=0.5", "data.max_upscale=0.9",
    "data.aspect_tolerance=-1", "data.crop_variants=0", "data.preflight_samples=-1", "model.guidance=-1",
    "model.max_sequence_length=0", "output.keep_last=-1", "logging.log_every=0", "ema.decay=1.5", "ema.every=0",
    "validation.every=-1", "validation.heldout_count=-1", "validation.max_images=-1", "validation.steps=0",
    "validation.guidance=nan", "validation.seed=-1", "validation.sigmas=[0.0]", "validation.sigmas=[1.5]",
    "loss.mode_scale=-1", "loss.sigmoid_scale=0", "loss.shift=0", "loss.huber_delta=0",
    "loss.mask_outside_weight=2", "loss.edit_floor=-0.5", "optim.betas=[0.9,1.0]", "optim.betas=[0.9]",
    "optim.eps=0", "optim.min_8bit_size=-1", "optim.prodigy_d_coef=0", "optim.nonfinite_limit=0",
    "speed.checkpoint_fraction=1.5", "speed.activation_budget=-0.1", "memory.block_swap=-1", "memory.budget_gib=-1",
    "train.scheduler=cosin", "output.export_formats=[safetensors]", "validation.use_ema=true",
    "lora.target_modules=['']", "lora.target_regex='('", "model.pretrained=''", "output.dir=''",
]  # fmt: skip
_CONFIG_NEEDLES = {"validation.use_ema=true": "validation.use_ema", "optim.betas=[0.9]": "optim.betas"}


def _config_case(override: str):
    key = override.split("=")[0]

    def build(ws: Workspace, name: str) -> tuple[list[str], str]:
        return _train(ws, override), _CONFIG_NEEDLES.get(override, f"`{key}")

    return build


def _override(make_override: Callable[[Workspace, str], str], needle: str):
    def build(ws: Workspace, name: str) -> tuple[list[str], str]:
        return _train(ws, make_override(ws, name)), needle

    return build


def _command(make_argv: Callable[[Workspace, str], list[str]], needle: Callable[[Workspace, str], str] | str):
    def build(ws: Workspace, name: str) -> tuple[list[str], str]:
        argv = make_argv(ws, name)
        return argv, needle(ws, name) if callable(needle) else needle

    return build


def _infer(ws: Workspace, *extra: str, image: str | None = None) -> list[str]:
    image = image or str(ws.data / "control" / "a.png")
    args = {"--model": str(ws.model), "--image": image, "--prompt": "x", "--out": str(ws.root / "never.png")}
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        args[flag] = value
    return ["infer", *[item for pair in args.items() for item in pair]]


CASES: dict[str, Callable[[Workspace, str], tuple[list[str], str]]] = {
    **{f"config:{override}": _config_case(override) for override in _CONFIG_VALUES},
    "config:dataset_weight_0": _override(
        lambda ws, n: f"data.datasets=[{{path: '{ws.data}', weight: 0}}]", "`data.datasets[0].weight`"
    ),  # fmt: skip
    "config:dataset_repeats_0": _override(
        lambda ws, n: f"data.datasets=[{{path: '{ws.data}', repeats: 0}}]", "`data.datasets[0].repeats`"
    ),  # fmt: skip
    "config:dataset_resolution_17": _override(
        lambda ws, n: f"data.datasets=[{{path: '{ws.data}', resolution: 17}}]", "`data.datasets[0].resolution`"
    ),  # fmt: skip
    "config:dataset_caption_dropout": _override(
        lambda ws, n: f"data.datasets=[{{path: '{ws.data}', caption_dropout: 1.5}}]",
        "`data.datasets[0].caption_dropout`",
    ),
    "config:dataset_path_empty": _override(lambda ws, n: "data.datasets=[{path: ''}]", "`data.datasets[0].path`"),
    "config:dataset_control_keys": _override(
        lambda ws, n: f"data.datasets=[{{path: '{ws.data}', control_keys: [control, control]}}]",
        "`data.datasets[0].control_keys`",
    ),
    "config:rank_pattern_0": _override(lambda ws, n: "lora.rank_pattern={'to_q': 0}", "lora.rank_pattern['to_q']"),
    "config:alpha_pattern_regex": _override(lambda ws, n: "lora.alpha_pattern={'(': 4}", "lora.alpha_pattern['(']"),
    "config:output_dir_is_a_file": _override(lambda ws, n: f"output.dir={_file(ws, n)}", "`output.dir`"),
    "config:cache_dir_is_a_file": _override(lambda ws, n: f"data.cache_dir={_file(ws, n)}", "`data.cache_dir`"),
    "config:pretrained_is_a_file": _override(lambda ws, n: f"model.pretrained={_file(ws, n)}", "`model.pretrained`"),
    "config:init_from_missing": _override(
        lambda ws, n: f"lora.init_from={ws.root / 'none.safetensors'}", "`lora.init_from`"
    ),  # fmt: skip
    "config:resume_missing": _override(lambda ws, n: f"train.resume={ws.root / 'step-000004'}", "`train.resume`"),
    "config:resume_incomplete": _override(
        lambda ws, n: f"train.resume={_folder(ws.case_dir(n) / 'step-000004')}", "is not a complete checkpoint"
    ),
    "config:heldout_path_missing": _override(
        lambda ws, n: f"validation.heldout_path={ws.root / 'nowhere'}", "`validation.heldout_path`"
    ),  # fmt: skip
    "config:example_control_missing": _override(
        lambda ws, n: f"validation.examples=[{{control: '{ws.root / 'no.png'}', prompt: p}}]",
        "`validation.examples[0].control`",
    ),
    "config:unknown_key": _override(lambda ws, n: "train.lrr=1", "`train.lrr`"),
    "config:wrong_type": _override(lambda ws, n: "train.steps=abc", "`train.steps`"),
    "data:missing_folder": _override(lambda ws, n: f"data.datasets=[{{path: '{ws.root / 'no-data'}'}}]", "no-data"),
    "data:empty_folder": _data_case(lambda folder: None, "{data}"),
    "data:missing_control": _data_case(_missing_control, "{data}/target/a.png"),
    "data:corrupt_image": _data_case(_corrupt_target, "{data}/target/a.png"),
    "data:bad_metadata_line": _data_case(_bad_metadata, "{data}/metadata.jsonl"),
    "data:heldout_count_too_large": _command(
        lambda ws, n: _train(ws, "validation.every=1", "validation.heldout_count=5"), "validation.heldout_count"
    ),
    "model:missing_folder": _override(lambda ws, n: f"model.pretrained={ws.root / 'no-model'}", "no-model"),
    "model:transformer_cut": _model_case("transformer/diffusion_pytorch_model.safetensors", _cut),
    "model:transformer_header_zeroed": _model_case("transformer/diffusion_pytorch_model.safetensors", _zero_header),
    "model:vae_cut": _model_case("vae/diffusion_pytorch_model.safetensors", _cut),
    "model:t5_cut": _model_case("text_encoder_2/model.safetensors", _cut),
    "model:clip_cut": _model_case("text_encoder/model.safetensors", _cut),
    "model:transformer_config_cut": _model_case("transformer/config.json", _cut),
    "model:vae_config_cut": _model_case("vae/config.json", _cut),
    "model:tokenizer_cut": _model_case("tokenizer_2/tokenizer.json", _cut),
    "model:vae_folder_missing": _model_case("vae", _remove),
    "model:transformer_weights_missing": _model_case(
        "transformer/diffusion_pytorch_model.safetensors", _remove, "transformer"
    ),  # fmt: skip
    "model:model_index_missing": _model_case("model_index.json", _remove, "model_index.json"),
    "export:out_is_a_file": _command(
        lambda ws, n: ["export", "--lora", str(ws.lora), "--format", "kohya", "--out", str(_file(ws, n))], "a-file"
    ),
    "export:lora_missing": _command(
        lambda ws, n: [
            "export",
            "--lora",
            str(ws.root / "no.safetensors"),
            "--format",
            "all",
            "--out",
            str(ws.root / "never"),
        ],
        "no.safetensors",
    ),  # fmt: skip
    "export:lora_is_a_pickle": _command(
        lambda ws, n: ["export", "--lora", str(_pickle(ws, n)), "--format", "all", "--out", str(ws.root / "never")],
        "weights.safetensors",
    ),
    "export:unknown_format": _command(
        lambda ws, n: ["export", "--lora", str(ws.lora), "--format", "ckpt", "--out", str(ws.root / "never")],
        "--format",
    ),
    "resize:rank_0": _command(
        lambda ws, n: ["resize", "--lora", str(ws.lora), "--rank", "0", "--out", str(ws.root / "never.safetensors")],
        "rank",
    ),
    "resize:rank_negative": _command(
        lambda ws, n: ["resize", "--lora", str(ws.lora), "--rank", "-2", "--out", str(ws.root / "never.safetensors")],
        "rank",
    ),
    "resize:energy_1.5": _command(
        lambda ws, n: ["resize", "--lora", str(ws.lora), "--energy", "1.5", "--out", str(ws.root / "n.safetensors")],
        "energy",
    ),
    "resize:energy_nan": _command(
        lambda ws, n: ["resize", "--lora", str(ws.lora), "--energy", "nan", "--out", str(ws.root / "n.safetensors")],
        "energy",
    ),
    "resize:lora_is_a_pickle": _command(
        lambda ws, n: ["resize", "--lora", str(_pickle(ws, n)), "--rank", "2", "--out", str(ws.root / "n.safetensors")],
        "weights.safetensors",
    ),
    "resize:out_is_a_folder": _command(
        lambda ws, n: ["resize", "--lora", str(ws.lora), "--rank", "2", "--out", str(ws.case_dir(n))], "out_is_a_folder"
    ),
    "merge:base_missing": _command(
        lambda ws, n: [
            "merge",
            "--base",
            str(ws.root / "no-base"),
            "--lora",
            str(ws.lora),
            "--out",
            str(ws.root / "never"),
        ],
        "no-base",
    ),  # fmt: skip
    "merge:lora_missing": _command(
        lambda ws, n: [
            "merge",
            "--base",
            str(ws.model),
            "--lora",
            str(ws.root / "no.safetensors"),
            "--out",
            str(ws.root / "never"),
        ],
        "no.safetensors",
    ),  # fmt: skip
    "merge:lora_is_a_pickle": _command(
        lambda ws, n: ["merge", "--base", str(ws.model), "--lora", str(_pickle(ws, n)), "--out", str(ws.root / "nv")],
        "weights.safetensors",
    ),
    "merge:base_is_a_file": _command(
        lambda ws, n: ["merge", "--base", str(_file(ws, n)), "--lora", str(ws.lora), "--out", str(ws.root / "nv")],
        "a-file",
    ),
    "infer:lora_is_a_pickle": _command(lambda ws, n: _infer(ws, "--lora", str(_pickle(ws, n))), "weights.safetensors"),
    "infer:lora_missing": _command(lambda ws, n: _infer(ws, "--lora", str(ws.root / "typo.safetensors")), "typo"),
    "infer:image_missing": _command(lambda ws, n: _infer(ws, image=str(ws.root / "no.png")), "no.png"),
    "infer:steps_0": _command(lambda ws, n: _infer(ws, "--steps", "0"), "--steps"),
    "infer:size_100": _command(lambda ws, n: _infer(ws, "--size", "100"), "--size"),
    "infer:scale_nan": _command(lambda ws, n: _infer(ws, "--scale", "nan"), "--scale"),
    "infer:guidance_inf": _command(lambda ws, n: _infer(ws, "--guidance", "inf"), "--guidance"),
    "infer:out_unknown_type": _command(lambda ws, n: _infer(ws, "--out", str(ws.root / "x.nothing")), "x.nothing"),
    "infer:model_transformer_cut": _command(
        lambda ws, n: _infer(ws, "--model", str(_damaged_model(ws, n, _cut("transformer/config.json")))),
        lambda ws, n: str(ws.case_dir(n) / "model" / "transformer" / "config.json"),
    ),
    "infer:model_t5_cut": _command(
        lambda ws, n: _infer(ws, "--model", str(_damaged_model(ws, n, _cut("text_encoder_2/model.safetensors")))),
        lambda ws, n: str(ws.case_dir(n) / "model" / "text_encoder_2" / "model.safetensors"),
    ),
}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and mtime, and every folder: what a failed command must leave alone."""
    found: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        found.update({str(Path(dirpath) / name): (0, 0) for name in dirnames})
        for name in filenames:
            stat = (Path(dirpath) / name).stat()
            found[str(Path(dirpath) / name)] = (stat.st_size, stat.st_mtime_ns)
    return found


def test_the_list_holds_over_80_cases() -> None:
    assert len(CASES) >= 80


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_ends_in_one_line_and_changes_nothing(name: str, ws: Workspace, capsys) -> None:
    argv, needle = CASES[name](ws, name.replace(":", "_"))
    before = _snapshot(ws.root)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[kontext-lora] warning")]
    assert lines and lines[-1].startswith("kontext-lora") and ": error: " in lines[-1], err
    assert needle in lines[-1], (needle, lines[-1])
    assert _snapshot(ws.root) == before  # nothing written, created or changed


def _numeric_keys(schema: type, prefix: str = "") -> list[tuple[str, type]]:
    """(range key, type) of every int / float key in the schema, list and dict items included."""
    import dataclasses
    import typing

    found = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind, key = hints[f.name], f"{prefix}{f.name}"
        args = typing.get_args(kind)
        if dataclasses.is_dataclass(kind):
            found += _numeric_keys(kind, f"{key}.")
        elif args and dataclasses.is_dataclass(args[0]):
            found += _numeric_keys(args[0], f"{key}[].")
        elif typing.get_origin(kind) is list and args[0] in (int, float):
            found.append((f"{key}[]", args[0]))
        elif typing.get_origin(kind) is dict and args[1] in (int, float):
            found.append((f"{key}{{}}", args[1]))
        elif kind in (int, float):
            found.append((key, kind))
    return found


def test_every_numeric_key_of_the_schema_has_a_range_and_refuses_nan() -> None:
    from kontext_lora.config import _RANGES, Config, ConfigError, load_config

    keys = _numeric_keys(Config)
    assert sorted(key for key, _ in keys) == sorted(_RANGES)
    required = ["model.pretrained=/models/kontext", "data.datasets=[{path: /data}]"]
    for key, kind in keys:
        if kind is not float or "[]" in key or "{}" in key:
            continue
        with pytest.raises(ConfigError, match=rf"`{key}`: must be a finite number"):
            load_config(None, [*required, f"{key}=nan"])
        low = _RANGES[key][0]
        if low is not None:  # just below the allowed range
            with pytest.raises(ConfigError, match=rf"`{key}`: must be"):
                load_config(None, [*required, f"{key}={low - 1e-3 if _RANGES[key][2] else low}"])
