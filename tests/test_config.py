"""The config schema and loader: examples load, `extends:` merges, overrides apply, and bad input fails clearly."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from kontext_lora.config import Config, ConfigError, describe_keys, load_config, to_yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
# What a config must set that has no default; a shared base file leaves these to the files that extend it.
REQUIRED = ["model.pretrained=/models/kontext", "data.datasets=[{path: /data/triples}]"]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _leaves(tree: dict, prefix: str = "") -> dict[str, typing.Any]:
    """{"train.lr": 1e-4, ...}: the scalar and list values of a YAML mapping, by dotted key."""
    out = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_leaves(value, full + "."))
        else:
            out[full] = value
    return out


def _value(cfg: Config, dotted: str) -> typing.Any:
    node: typing.Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    if isinstance(node, list):
        return [dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x for x in node]
    return node


def _dataset_defaults() -> dict[str, typing.Any]:
    """Every data.datasets[] key with its schema default (all but the required `path`)."""
    from kontext_lora.config import DatasetConfig

    return {f.name: _value(load_config(None, REQUIRED), "data.datasets")[0][f.name]
            for f in dataclasses.fields(DatasetConfig) if f.name != "path"}  # fmt: skip


def _chain(path: Path) -> list[dict]:
    """The raw YAML mappings of `path` and of the files it extends, base first."""
    raw = yaml.safe_load(path.read_text())
    parent = raw.pop("extends", None)
    return (_chain(path.parent / parent) if parent else []) + [raw]


def _error(overrides: list[str], path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, REQUIRED + overrides if path is None else overrides)
    return str(info.value)


# ------------------------------------------------------------------------------------------------ examples


def test_examples_exist():
    assert {p.name for p in EXAMPLE_FILES} >= {"base.yaml", "kontext_dev.yaml", "tiny_bw.yaml"}


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_every_example_loads_with_the_values_it_sets(path: Path):
    bases = {(p.parent / yaml.safe_load(p.read_text())["extends"]).resolve() for p in EXAMPLE_FILES
             if "extends" in yaml.safe_load(p.read_text())}  # fmt: skip
    if path.resolve() in bases:
        # A shared base is not a job by itself: it must fail only for want of the required keys.
        with pytest.raises(ConfigError, match="model.pretrained"):
            load_config(path)
        cfg = load_config(path, REQUIRED)
    else:
        cfg = load_config(path)
    expected: dict = {}
    for layer in _chain(path):  # later files win
        expected.update(_leaves(layer))
    assert expected
    for key, value in expected.items():
        if key == "data.datasets":
            value = [{**_dataset_defaults(), **item} for item in value]
        if key == "validation.examples":
            value = [{"target": "", "mask": "", **item} for item in value]
        assert _value(cfg, key) == value, key


def test_example_child_overrides_its_base():
    cfg = load_config(EXAMPLES / "tiny_bw.yaml")
    assert cfg.data.resolution == 128 and cfg.train.lr == pytest.approx(1e-3)  # set by tiny_bw.yaml
    assert cfg.lora.rank == 16 and cfg.lora.preset == "attention_mlp"  # kept from base.yaml
    assert cfg.train.mixed_precision == "no"  # schema default, set by neither


# ------------------------------------------------------------------------------------------------ extends


def test_extends_merges_child_over_base_and_resolves_relative_to_the_file(tmp_path: Path, monkeypatch):
    _write(tmp_path / "shared" / "root.yaml", "lora: {rank: 8, alpha: 4}\ntrain: {seed: 3}\n")
    _write(
        tmp_path / "shared" / "base.yaml",
        "extends: root.yaml\nlora: {rank: 4}\ntrain: {lr: 1.0e-3, steps: 7}\nmodel: {pretrained: /m}\n"
        "data: {datasets: [{path: /base}, {path: /base2}], resolution: 256}\n",
    )
    child = _write(
        tmp_path / "jobs" / "child.yaml",
        "extends: ../shared/base.yaml\ntrain: {lr: 5.0e-4}\ndata: {datasets: [{path: /child}]}\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # `extends` must not depend on the working directory

    cfg = load_config(child)
    assert cfg.train.lr == pytest.approx(5e-4)  # child wins
    assert cfg.train.steps == 7 and cfg.data.resolution == 256 and cfg.model.pretrained == "/m"  # base kept
    assert cfg.lora.rank == 4 and cfg.lora.alpha == 4.0 and cfg.train.seed == 3  # base over root, root kept
    assert [d.path for d in cfg.data.datasets] == ["/child"]  # a list is replaced, not appended to


def test_extends_loop_is_an_error(tmp_path: Path):
    a = _write(tmp_path / "a.yaml", "extends: b.yaml\ntrain: {lr: 1.0e-3}\n")
    _write(tmp_path / "b.yaml", "extends: a.yaml\ntrain: {steps: 2}\n")
    with pytest.raises(ConfigError, match="loops") as info:
        load_config(a)
    assert "a.yaml" in str(info.value)

    itself = _write(tmp_path / "self.yaml", "extends: self.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(itself)


def test_extends_missing_file_names_it(tmp_path: Path):
    child = _write(tmp_path / "child.yaml", "extends: nowhere.yaml\n")
    message = _error([], child)
    assert "config file not found" in message and str(tmp_path / "nowhere.yaml") in message


def test_missing_config_file_and_bad_yaml(tmp_path: Path):
    assert str(tmp_path / "absent.yaml") in _error([], tmp_path / "absent.yaml")
    bad = _write(tmp_path / "bad.yaml", "train: {lr: [1, 2\n")
    message = _error([], bad)
    assert str(bad) in message and "not valid YAML" in message
    listing = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    assert "top level must be a mapping" in _error([], listing)


# ------------------------------------------------------------------------------------------------ overrides


def test_dotlist_overrides_apply_over_the_file(tmp_path: Path):
    path = _write(tmp_path / "job.yaml", "model: {pretrained: /m}\ndata: {datasets: [{path: /a}, {path: /b}]}\n")
    cfg = load_config(path, ["train.lr=5e-5", "data.datasets=[{path: x}]", "lora.target_modules=[to_q, to_k]"])
    assert cfg.train.lr == pytest.approx(5e-5)
    assert [(d.path, d.default_caption) for d in cfg.data.datasets] == [("x", "")]
    assert cfg.lora.target_modules == ["to_q", "to_k"]
    assert cfg.model.pretrained == "/m"


def test_override_without_equals_fails():
    message = _error(["train.lr"])
    assert "'train.lr'" in message and "key=value" in message


@pytest.mark.parametrize("key", ["data.datasets[1].path", "data.datasets.1.path"])
def test_list_items_are_overridable_in_both_notations(tmp_path: Path, key: str):
    path = _write(tmp_path / "job.yaml", "model: {pretrained: /m}\ndata: {datasets: [{path: /a}, {path: /b}]}\n")
    cfg = load_config(path, [f"{key}=/x", key.replace("path", "flip") + "=true", "validation.sigmas[0]=0.3"])
    assert [(d.path, d.flip) for d in cfg.data.datasets] == [("/a", False), ("/x", True)]
    assert cfg.validation.sigmas == [0.3, 0.5, 0.75]
    # A whole item, its keys checked against the schema like the file's.
    cfg = load_config(path, ["data.datasets[0]={path: /z, weight: 2}"])
    assert [(d.path, d.weight) for d in cfg.data.datasets] == [("/z", 2.0), ("/b", 1.0)]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.datasets.5.path=x", "override 'data.datasets.5.path=x': `data.datasets` has 1 item(s), so [5] is past "
         "its end; add items in the YAML file, or set the whole list: data.datasets=[{...}, {...}]"),
        ("data.datasets.x.path=x", "override 'data.datasets.x.path=x': `data.datasets` is a list; name an item by "
         "position, e.g. data.datasets[0]"),
        ("data.datasets[0].pth=x", "unknown config key `data.datasets[0].pth`; did you mean `data.datasets[0].path`?"),
        ("data.datasets[0]={path: x, flp: true}", "unknown config key `data.datasets[0].flp`; did you mean"),
        ("data.datasets[0].weight=abc", "config key `data.datasets[0].weight`: value 'abc' (str) is not a valid float"),
        ("train.lr.x=1", "override 'train.lr.x=1': `train.lr` is a single value, not a section or a list"),
        ("train.lr=[1,", "override 'train.lr=[1,': not valid YAML (did not find expected node content)"),
    ],
)  # fmt: skip
def test_bad_list_item_override_is_one_clear_line(override: str, expected: str):
    message = _error([override])
    assert message.startswith(expected), message
    assert "\n" not in message


def test_yaml_errors_name_the_line(tmp_path: Path):
    bad = _write(tmp_path / "bad.yaml", "model:\n  pretrained: /m\ntrain: {lr: [1, 2\n")
    assert _error([], bad) == f"{bad}, line 4: not valid YAML (did not find expected ',' or ']')"
    twice = _write(tmp_path / "twice.yaml", "train:\n  lr: 1.0e-4\n  steps: 10\n  lr: 1.0e-3\n")
    message = _error([], twice)
    assert message == f"{twice}, line 4: duplicate key `lr` (a key may appear once per section; remove one)"


def test_config_path_that_is_a_folder(tmp_path: Path):
    _write(tmp_path / "job.yaml", "train: {lr: 1.0e-4}\n")
    assert _error([], tmp_path) == f"config file {tmp_path} is a folder; give a YAML file (it holds job.yaml)"


# ------------------------------------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
    ("override", "key", "suggestion"),
    [
        ("trian.lr=1", "trian", "train"),
        ("train.lrr=1", "train.lrr", "train.lr"),
        ("data.datasets=[{pth: x}]", "data.datasets[0].pth", "data.datasets[0].path"),
        ("lora.rnak=4", "lora.rnak", "lora.rank"),
    ],
)
def test_unknown_key_names_full_key_and_near_miss(override: str, key: str, suggestion: str):
    message = _error([override])
    assert message.startswith(f"unknown config key `{key}`")
    assert f"did you mean `{suggestion}`?" in message


def test_unknown_key_in_a_file(tmp_path: Path):
    path = _write(tmp_path / "job.yaml", "model: {pretrained: /m}\ndata: {datasets: [{path: /a, pth: /b}]}\n")
    message = _error([], path)
    assert "unknown config key `data.datasets[0].pth`" in message and "`data.datasets[0].path`" in message


def test_unknown_key_without_near_miss_lists_valid_keys():
    message = _error(["train.zzzzzz=1"])
    assert "did you mean" not in message
    assert "valid here: steps, batch_size" in message


# ------------------------------------------------------------------------------------------------ types and values


@pytest.mark.parametrize(
    ("override", "key", "value", "kind"),
    [
        ("train.steps=abc", "train.steps", "'abc'", "int"),
        ("train.lr=abc", "train.lr", "'abc'", "float"),
        ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing", "'maybe'", "bool"),
    ],
)
def test_wrong_type_names_key_value_and_type(override: str, key: str, value: str, kind: str):
    message = _error([override])
    assert f"`{key}`" in message and value in message and f"not a valid {kind}" in message


def test_choice_outside_allowed_set_names_them_and_suggests():
    message = _error(["train.mixed_precision=bf17"])
    assert "`train.mixed_precision`" in message and "'bf17'" in message
    assert "no, bf16, fp16" in message and "did you mean `bf16`?" in message


def test_export_formats_are_checked():
    assert "`output.export_formats`: 'kohyaa' is not one of diffusers, kohya, comfyui" in _error(
        ["output.export_formats=[comfyui,kohyaa]"]
    )


def test_choice_inside_lora_and_logging():
    assert "attention, attention_mlp, all" in _error(["lora.preset=attn_mlp"])
    assert "`logging.report_to`" in _error(["logging.report_to=tensorbord"])


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("lora.rank=0", "lora.rank", "must be > 0, got 0"),
        ("train.steps=-1", "train.steps", "must be > 0, got -1"),
        ("data.resolution=100", "data.resolution", "must be a multiple of 16, got 100"),
        ("lora.dropout=1.5", "lora.dropout", "must be in [0, 1), got 1.5"),
        ("lora.dropout=-0.1", "lora.dropout", "must be in [0, 1), got -0.1"),
    ],
)
def test_range_checks(override: str, key: str, expected: str):
    assert _error([override]) == f"config key `{key}`: {expected}"


def test_missing_pretrained():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.datasets=[{path: /d}]"])
    assert str(info.value) == "config key `model.pretrained` is required but not set"


def test_missing_dataset_path():
    with pytest.raises(ConfigError, match=r"`data\.datasets\.0\.path`|`data\.datasets\[0\]\.path`"):
        load_config(None, ["model.pretrained=/m", "data.datasets=[{default_caption: hi}]"])


def test_empty_datasets():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.pretrained=/m"])
    assert "`data.datasets`" in str(info.value) and "at least one dataset" in str(info.value)
    assert "`data.datasets`" in _error(["data.datasets=[]"])


# ------------------------------------------------------------------------------------------------ docs, round trip


def _declared_fields(schema: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    out = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        full = f"{prefix}{f.name}"
        out[full] = f
        kind = hints[f.name]
        item = (typing.get_args(kind) or [None])[0]
        if dataclasses.is_dataclass(kind):
            out.update(_declared_fields(kind, full + "."))
        elif dataclasses.is_dataclass(item):
            out.update(_declared_fields(item, full + "[]."))
    return out


def test_every_field_has_a_doc():
    fields = _declared_fields(Config)
    undocumented = [key for key, f in fields.items() if not str(f.metadata.get("doc", "")).strip()]
    assert undocumented == []

    rows = describe_keys()
    keys = [key for key, _, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert all(doc.strip() for _, _, _, doc in rows)
    sections = {f.name for f in dataclasses.fields(Config)}  # model, data, ...: described key by key
    assert set(keys) == set(fields) - sections
    assert {"train.lr", "data.datasets", "data.datasets[].path"} <= set(keys)
    by_key = {key: (kind, default, doc) for key, kind, default, doc in rows}
    assert by_key["train.lr"][:2] == ("float", 1e-4)
    assert by_key["train.mixed_precision"][2].endswith("One of: no, bf16, fp16.")


@pytest.mark.parametrize("overrides", [[], ["lora.target_modules=[to_q, proj_mlp]", "train.lr=3e-5"]])
def test_to_yaml_round_trips_through_a_file(tmp_path: Path, overrides: list[str]):
    cfg = load_config(
        EXAMPLES / "tiny_bw.yaml",
        ["data.datasets=[{path: /a}, {path: /b, default_caption: 'make it black and white'}]", *overrides],
    )
    saved = _write(tmp_path / "resolved.yaml", to_yaml(cfg))
    again = load_config(saved)
    assert again == cfg
    assert to_yaml(again) == saved.read_text()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.max_upscale=0.5", "data.max_upscale"),
        ("data.max_aspect_ratio=0.9", "data.max_aspect_ratio"),
        ("data.crop_variants=0", "data.crop_variants"),
        ("data.datasets=[{path: /d, caption_dropout: 1.5}]", "data.datasets[0].caption_dropout"),
        ("data.datasets=[{path: /d, resolution: 100}]", "data.datasets[0].resolution"),
        ("data.datasets=[{path: /d, weight: 0}]", "data.datasets[0].weight"),
        ("data.datasets=[{path: /d, control_keys: [target]}]", "data.datasets[0].control_keys"),
        ("data.buckets=aera", "data.buckets"),
        ("data.datasets=[{path: /d, format: parquet}]", "data.datasets[0].format"),
    ],
)
def test_data_key_ranges(override: str, key: str):
    assert f"`{key}" in _error([override])
