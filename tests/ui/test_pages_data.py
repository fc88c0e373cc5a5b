"""What the UI's pages are made of, without a browser: the schema form, saving YAML, dataset edits on disk, the
root's refusals, the curves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kontext_lora.config import describe_keys, load_config, to_dict
from kontext_lora.ui import datasets, forms
from kontext_lora.ui.paths import PathRefused, Root
from kontext_lora.ui.plots import curves_svg

from ..conftest import EXAMPLES, REPO

TINY = REPO / "configs" / "examples" / "tiny_bw.yaml"


def _form(values: dict) -> dict[str, str]:
    """What the browser sends for an untouched form."""
    return {f.key: forms.show(values.get(f.key, f.default), f.kind) for f in forms.schema_fields()}


def test_the_form_has_a_field_for_every_key_with_its_doc_and_choices() -> None:
    fields = {f.key: f for f in forms.schema_fields()}
    assert set(fields) == {key for key, *_ in describe_keys() if "[]" not in key}
    assert fields["lora.preset"].choices == ("attention", "attention_mlp", "all")
    assert fields["lora.rank"].kind == "int" and fields["lora.rank"].doc == "LoRA rank r."
    assert "path" in dict(forms.item_docs()["data.datasets"])


def test_an_untouched_form_is_the_file_and_a_change_is_one_override() -> None:
    values, error = forms.file_values(TINY)
    assert error == ""
    assert values["lora.rank"] == 16 and values["train.steps"] == 300  # base.yaml through extends:, then the file
    form = _form(values)
    assert forms.overrides_from_form(form, values) == []
    form.update({"lora.rank": "8", "output.dir": "123", "ema.enabled": "true"})
    overrides = forms.overrides_from_form(form, values)
    assert overrides == ["lora.rank=8", "output.dir='123'", "ema.enabled=true"]
    assert load_config(TINY, overrides).output.dir == "123"  # kept a string


def test_an_error_is_put_at_the_key_it_names() -> None:
    values, _ = forms.file_values(TINY)
    form = {**_form(values), "lora.rank": "0"}
    error = forms.load_error(TINY, forms.overrides_from_form(form, values))
    fields, left = forms.fields_for(values, form, error)
    assert left == ""
    assert {f.key: f.error for f in fields if f.error} == {"lora.rank": "config key `lora.rank`: must be > 0, got 0"}
    fields, _ = forms.fields_for(values, form, "config key `data.datasets[0].path` is required but not set")
    assert [f.key for f in fields if f.error] == ["data.datasets"]
    bad = forms.load_error(TINY, ["lora.rank_pattern={a: &"])
    assert bad.startswith("config key `lora.rank_pattern`: ") and "\n" not in bad


def test_saved_yaml_keeps_extends_and_loads_as_the_form(tmp_path: Path) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    source = tmp_path / "configs" / "examples" / "tiny_bw.yaml"
    destination = tmp_path / "mine" / "job.yaml"
    overrides = ["lora.rank=4", "train.lr=0.0003", "data.datasets=[{path: data_examples/bw, repeats: 2}]"]
    text = forms.save_yaml(source, destination, overrides)
    assert text.startswith("extends: ../configs/examples/base.yaml\n")
    assert to_dict(load_config(destination)) == to_dict(load_config(source, overrides))
    assert [p.name for p in forms.extends_chain(destination)] == ["job.yaml", "base.yaml"]


def test_dataset_rows_edits_and_drops_go_to_the_files(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES, tmp_path / "bw")
    root = Root(tmp_path)
    view = datasets.view_dataset(root, "bw", 128, "area", ["control"])
    assert len(view.rows) == 8 and view.errors == []
    coffee = next(row for row in view.rows if row.stem == "coffee")
    assert coffee.controls == ["bw/control/coffee.jpg"] and coffee.target == "bw/target/coffee.jpg"
    assert coffee.bucket == "128x128 | 128x128" and view.buckets == {"128x128 | 128x128": 8}

    written = datasets.write_caption(root, "bw", "coffee", "  make it monochrome \r\n", ["control"])
    assert written.read_text() == "make it monochrome\n"
    datasets.set_flag(root, "bw", "chelsea", True)
    view = datasets.view_dataset(root, "bw", 128, "area", ["control"])
    assert [row.stem for row in view.rows if row.flagged] == ["chelsea"]
    assert next(row for row in view.rows if row.stem == "coffee").caption == "make it monochrome"

    moved = datasets.drop_pair(root, "bw", "coffee", ["control"])
    assert sorted(p.relative_to(tmp_path / "bw").as_posix() for p in moved) == [
        ".dropped/control/coffee.jpg", ".dropped/target/coffee.jpg", ".dropped/target/coffee.txt"]  # fmt: skip
    view = datasets.view_dataset(root, "bw", 128, "area", ["control"])
    assert "coffee" not in [row.stem for row in view.rows] and len(view.rows) == 7 and view.errors == []


def test_a_jsonl_caption_is_edited_in_its_line(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    shutil.copytree(EXAMPLES, folder)
    stems = ("coffee", "chelsea")
    lines = [{"control": f"control/{s}.jpg", "target": f"target/{s}.jpg", "caption": "bw"} for s in stems]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    root = Root(tmp_path)
    stem = {row.target: row.stem for row in datasets.view_dataset(root, "set", 128, "area", ["control"]).rows}
    assert len(stem) == 2  # the metadata lines, not the folders beside them

    datasets.write_caption(root, "set", stem["set/target/chelsea.jpg"], "make the cat grey", ["control"])
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in records] == ["bw", "make the cat grey"]
    datasets.drop_pair(root, "set", stem["set/target/coffee.jpg"], ["control"])
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["target"] for r in records] == ["target/chelsea.jpg"]
    assert json.loads((folder / ".dropped" / "metadata.jsonl").read_text())["target"] == "target/coffee.jpg"


def test_the_root_refuses_paths_outside_it(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "secret").write_text("x")
    (tmp_path / "root" / "link").symlink_to(tmp_path / "secret")
    root = Root(tmp_path / "root")
    for path in ("..", "../secret", str(tmp_path / "secret"), "link", "", "a\x00b"):
        with pytest.raises(PathRefused):
            root.resolve(path)
    assert root.resolve(".") == root.path
    assert root.resolve("new/file.yaml", must_exist=False) == root.path / "new" / "file.yaml"


def test_curves_are_drawn_from_the_points() -> None:
    assert curves_svg({"loss": []}) == ""
    svg = curves_svg({"train loss": [(1, 2.0), (2, 1.0), (3, 0.5)], "held-out": [(3, 0.7)]})
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and svg.count("<circle") == 4
    assert "train loss (last 0.5)" in svg


def test_a_multi_reference_pair_shows_its_controls_in_id_order(tmp_path: Path) -> None:
    folder = tmp_path / "refs"
    shutil.copytree(EXAMPLES, folder)
    shutil.copytree(folder / "control", folder / "style")
    view = datasets.view_dataset(Root(tmp_path), "refs", 128, "area", ["control", "style"])
    coffee = next(row for row in view.rows if row.stem == "coffee")
    assert coffee.controls == ["refs/control/coffee.jpg", "refs/style/coffee.jpg"]
    assert coffee.bucket == "128x128 | 128x128, 128x128"
