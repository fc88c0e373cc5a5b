"""Every source of triples: folders (several controls, masks, none), jsonl, csv and Hugging Face datasets."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kontext_lora.config import DatasetConfig
from kontext_lora.data.sources import discover_dataset
from kontext_lora.data.triples import DataError, RowImage, load_image


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`datasets` writes arrow caches of what it loads: keep them in the test's folder, not in ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _image(path: Path, value: int, size: tuple[int, int] = (40, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 7)).save(path)
    return path


def _png_bytes(value: int, size: tuple[int, int] = (40, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, 255 - value, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def _ds(path: Path, **keys) -> DatasetConfig:
    return DatasetConfig(path=str(path), **keys)


def test_folder_with_two_controls_and_masks(tmp_path: Path) -> None:
    for stem, value in (("a", 10), ("b", 20)):
        _image(tmp_path / "control" / f"{stem}.png", value)
        _image(tmp_path / "style" / f"{stem}.jpg", value + 1)
        _image(tmp_path / "target" / f"{stem}.png", value + 2)
    _image(tmp_path / "mask" / "a.png", 255)
    (tmp_path / "target" / "a.txt").write_text("first\nsecond line\n\n")

    triples = discover_dataset(_ds(tmp_path, control_keys=["control", "style"]))

    assert [t.stem for t in triples] == ["a", "b"]
    a, b = triples
    assert a.controls == (tmp_path / "control" / "a.png", tmp_path / "style" / "a.jpg")
    assert a.mask == tmp_path / "mask" / "a.png" and b.mask is None
    assert a.captions == ["first", "second line"] and b.captions == [""]


def test_folder_missing_second_control_names_the_file(tmp_path: Path) -> None:
    _image(tmp_path / "control" / "a.png", 1)
    _image(tmp_path / "style" / "other.png", 1)
    _image(tmp_path / "target" / "a.png", 1)
    with pytest.raises(DataError, match=str(tmp_path / "style" / "a")):
        discover_dataset(_ds(tmp_path, control_keys=["control", "style"]))


def test_text_to_image_folder_has_no_controls(tmp_path: Path) -> None:
    _image(tmp_path / "target" / "x.png", 3)
    (tmp_path / "target" / "x.txt").write_text("a cat")
    (triple,) = discover_dataset(_ds(tmp_path, control_keys=[]))
    assert triple.controls == () and triple.control is None and triple.caption == "a cat"


def test_jsonl_with_custom_fields_two_controls_and_a_mask(tmp_path: Path) -> None:
    for name in ("in1.png", "in2.png", "out.png", "m.png"):
        _image(tmp_path / name, 5)
    record = {"src": "in1.png", "ref": "in2.png", "dst": "out.png", "text": "edit", "m": "m.png"}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(record) + "\n")
    (triple,) = discover_dataset(
        _ds(tmp_path, control_keys=["src", "ref"], target_key="dst", caption_key="text", mask_key="m")
    )
    assert triple.controls == (tmp_path / "in1.png", tmp_path / "in2.png")
    assert triple.target == tmp_path / "out.png" and triple.mask == tmp_path / "m.png" and triple.caption == "edit"


def test_csv_layout(tmp_path: Path) -> None:
    for name in ("c1.png", "t1.png", "c2.png", "t2.png"):
        _image(tmp_path / "imgs" / name, 9)
    (tmp_path / "metadata.csv").write_text(
        'control,target,caption\nimgs/c2.png,imgs/t2.png,"make it red, then blue"\nimgs/c1.png,imgs/t1.png,\n'
    )
    triples = discover_dataset(_ds(tmp_path, default_caption="fallback"))
    assert [t.stem for t in triples] == ["imgs/t1", "imgs/t2"]
    assert triples[1].caption == "make it red, then blue"
    assert triples[0].caption == ""  # an empty cell is an empty caption, which preflight warns about
    assert triples[0].control == tmp_path / "imgs" / "c1.png"


def test_csv_missing_column_and_ragged_row(tmp_path: Path) -> None:
    _image(tmp_path / "c.png", 1)
    _image(tmp_path / "t.png", 1)
    (tmp_path / "metadata.csv").write_text("control,caption\nc.png,hi\n")
    with pytest.raises(DataError) as exc:
        discover_dataset(_ds(tmp_path))
    message = str(exc.value)
    assert str(tmp_path / "metadata.csv") in message and "missing column 'target'" in message and "\n" not in message

    (tmp_path / "metadata.csv").write_text("control,target,caption\nc.png,t.png,hi,extra\n")
    with pytest.raises(DataError, match=r"metadata\.csv row 2: has 4 fields but the header has 3"):
        discover_dataset(_ds(tmp_path))


def test_hf_imagefolder_with_control_column(tmp_path: Path) -> None:
    """An imagefolder whose metadata names a second image column (`control_file_name`), read by `datasets`."""
    root = tmp_path / "imagefolder"
    lines = []
    for i in range(3):
        _image(root / f"out{i}.png", 30 * i)
        _image(root / f"in{i}.png", 30 * i + 1)
        lines.append(json.dumps({"file_name": f"out{i}.png", "control_file_name": f"in{i}.png", "text": f"edit {i}"}))
    # Named metadata.jsonl as `datasets` wants it: format=hf makes it an imagefolder, not our own jsonl layout.
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    triples = discover_dataset(_ds(root, format="hf", target_key="image", caption_key="text"))

    assert [t.caption for t in triples] == ["edit 0", "edit 1", "edit 2"]
    assert all(isinstance(t.target, Path) and t.target.parent == root for t in triples)  # files on disk: paths
    assert {t.control.name for t in triples} == {"in0.png", "in1.png", "in2.png"}
    assert np.asarray(load_image(triples[1].target))[0, 0, 0] == 30


def _embedded_rows(n: int) -> dict:
    return {
        "control": [{"bytes": _png_bytes(10 * i), "path": None} for i in range(n)],
        "target": [{"bytes": _png_bytes(10 * i + 5), "path": None} for i in range(n)],
        "prompt": [f"caption {i}" for i in range(n)],
    }


def _hf_dataset(n: int):
    import datasets

    features = datasets.Features(
        {"control": datasets.Image(), "target": datasets.Image(), "prompt": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict(_embedded_rows(n), features=features)


def test_hf_parquet_with_embedded_images(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    _hf_dataset(4).to_parquet(str(tmp_path / "data" / "train-00000.parquet"))

    triples = discover_dataset(_ds(tmp_path, caption_key="prompt"))  # auto: a folder of parquet files

    assert len(triples) == 4 and [t.stem for t in triples][:2] == ["row000000", "row000001"]
    assert isinstance(triples[2].target, RowImage) and triples[2].caption == "caption 2"
    assert np.asarray(load_image(triples[2].target))[0, 0, 0] == 25
    assert np.asarray(load_image(triples[2].control))[0, 0, 0] == 20
    assert str(tmp_path) in str(triples[2].target)  # messages name the dataset and row


def test_hf_save_to_disk_folder_and_split(tmp_path: Path) -> None:
    import datasets

    datasets.DatasetDict({"train": _hf_dataset(2), "test": _hf_dataset(3)}).save_to_disk(str(tmp_path / "saved"))
    assert len(discover_dataset(_ds(tmp_path / "saved", caption_key="prompt"))) == 2
    assert len(discover_dataset(_ds(tmp_path / "saved", caption_key="prompt", split="test"))) == 3
    with pytest.raises(DataError, match="has no split 'valid'"):
        discover_dataset(_ds(tmp_path / "saved", split="valid"))


def test_hf_arrow_file_missing_column(tmp_path: Path) -> None:
    _hf_dataset(2).save_to_disk(str(tmp_path / "single"))
    (arrow,) = (tmp_path / "single").glob("*.arrow")
    with pytest.raises(DataError) as exc:
        discover_dataset(_ds(arrow, target_key="edited"))
    assert "no column 'edited'" in str(exc.value) and "prompt" in str(exc.value)
