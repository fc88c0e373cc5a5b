"""Preflight on bad input: every case is reported with a one-line message naming the file, and nothing stops
half-way. All cases sit in one config so that one preflight run must survive every one of them."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kontext_lora.config import DataConfig, DatasetConfig, load_config
from kontext_lora.data.preflight import preflight, write_contact_sheet
from kontext_lora.data.triples import DataError

REPO = Path(__file__).resolve().parents[2]


def _image(path: Path, size: tuple[int, int] = (64, 48), mode: str = "RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"RGB": (200, 30, 30), "RGBA": (0, 0, 0, 0), "CMYK": (0, 255, 255, 0), "L": 90}.get(mode, 0)
    Image.new(mode, size, color).save(path, **save)
    return path


def _pair(root: Path, stem: str = "a", caption: str | None = "edit it") -> tuple[Path, Path]:
    control, target = _image(root / "control" / f"{stem}.png"), _image(root / "target" / f"{stem}.png")
    if caption is not None:
        (root / "target" / f"{stem}.txt").write_text(caption)
    return control, target


def _noise_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


# Each case builds a dataset under `root` and returns (level, the file the message must name, a phrase).
Case = Callable[[Path], tuple[str, Path, str]]


def truncated_jpeg(root: Path):
    _pair(root)
    bad = root / "target" / "a.png"
    bad.unlink()
    bad = root / "target" / "a.jpg"
    bad.write_bytes(_noise_jpeg()[:900])
    return "error", bad, "cannot read image"


def zero_byte(root: Path):
    _, target = _pair(root)
    target.write_bytes(b"")
    return "error", target, "empty (0-byte)"


def wrong_extension(root: Path):  # a text file named .png
    control, _ = _pair(root)
    control.write_text("this is not a picture")
    return "error", control, "cannot read image"


def cmyk(root: Path):
    _pair(root)
    path = _image(root / "target" / "a.jpg", mode="CMYK")
    (root / "target" / "a.png").unlink()
    return "note", path, "CMYK converted to RGB"


def sixteen_bit(root: Path):
    _, target = _pair(root)
    Image.fromarray(np.full((48, 64), 40000, dtype=np.uint16)).save(target)
    return "note", target, "16-bit image scaled"


def rgba(root: Path):
    _, target = _pair(root)
    _image(target, mode="RGBA")
    return "note", target, "alpha composited over white"


def palette(root: Path):
    control, _ = _pair(root)
    Image.new("RGB", (64, 48), (0, 200, 0)).convert("P", palette=Image.Palette.ADAPTIVE).save(control)
    return "note", control, "palette image"


def exif_rotated(root: Path):
    _pair(root)
    (root / "target" / "a.png").unlink()
    image = Image.new("RGB", (48, 64), (10, 20, 30))  # stored portrait, displayed landscape like the control
    exif = image.getexif()
    exif[0x0112] = 6
    path = root / "target" / "a.jpg"
    image.save(path, exif=exif)
    return "note", path, "EXIF orientation 6 applied"


def one_pixel(root: Path):
    _, target = _pair(root)
    _image(target, size=(1, 1))
    return "error", target, "only 1x1 pixels"


def huge(root: Path):  # over PIL's decompression-bomb limit (lowered for the test by the fixture below)
    _, target = _pair(root)
    _image(target, size=(400, 300))
    return "error", target, "is huge"


def missing_control(root: Path):
    _pair(root)
    lonely = _image(root / "target" / "b.png")
    return "error", lonely, "has no control image"


def duplicate_stem(root: Path):
    _pair(root)
    twin = _image(root / "target" / "a.jpg")
    return "error", twin, "two images share the stem"


def empty_caption_file(root: Path):
    _, target = _pair(root, caption="  \n")
    return "warning", target, "empty caption"


def caption_wrong_encoding(root: Path):
    _pair(root)
    caption = root / "target" / "a.txt"
    caption.write_bytes("caf\xe9".encode("latin-1"))
    return "error", caption, "not valid UTF-8"


def jsonl_bad_line(root: Path):
    _image(root / "c.png")
    _image(root / "t.png")
    metadata = root / "metadata.jsonl"
    metadata.write_text(json.dumps({"control": "c.png", "target": "t.png"}) + "\n{broken\n")
    return "error", metadata, "line 2: not valid JSON"


def csv_missing_column(root: Path):
    _image(root / "c.png")
    table = root / "metadata.csv"
    table.write_text("control,caption\nc.png,hi\n")
    return "error", table, "missing column 'target'"


def path_does_not_exist(root: Path):
    return "error", root, "does not exist"  # nothing is created at the dataset path


def empty_folder(root: Path):
    (root / "control").mkdir(parents=True)
    (root / "target").mkdir()
    return "error", root / "control", "no triples found"


def symlink_loop(root: Path):
    _pair(root)
    loop = root / "target" / "b.png"
    os.symlink(loop, loop)
    return "error", loop, "symlink loop"


def non_image_file(root: Path):
    _pair(root)
    stray = root / "control" / "notes.docx"
    stray.write_text("meeting notes")
    return "error", stray, "unsupported file"


def aspect_mismatch(root: Path):
    control, target = _pair(root)
    _image(control, size=(48, 64))  # portrait control for a landscape target
    return "warning", control, "aspect ratio 0.75"


def would_upscale(root: Path):
    _, target = _pair(root)
    _image(target, size=(20, 16))
    return "warning", target, "would be upscaled"


def hf_missing_column(root: Path):
    import datasets

    datasets.Dataset.from_dict({"a": [1]}).save_to_disk(str(root))
    return "error", root, "no column 'control'"


CASES: dict[str, Case] = {
    case.__name__: case
    for case in (
        truncated_jpeg, zero_byte, wrong_extension, cmyk, sixteen_bit, rgba, palette, exif_rotated, one_pixel, huge,
        missing_control, duplicate_stem, empty_caption_file, caption_wrong_encoding, jsonl_bad_line,
        csv_missing_column, path_does_not_exist, empty_folder, symlink_loop, non_image_file, aspect_mismatch,
        would_upscale, hf_missing_column,
    )
}  # fmt: skip


def _level(name: str) -> str:
    """The level a case expects (built in a throwaway folder: the cases only write files)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return CASES[name](Path(folder) / name)[0]


@pytest.fixture(scope="module")
def report_and_cases(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("preflight")
    expected, datasets = {}, []
    for name, build in CASES.items():
        expected[name] = build(root / name)
        datasets.append(DatasetConfig(path=str(root / name)))
    datasets.append(DatasetConfig(path=str(root / "good")))
    _pair(root / "good", "g1")
    _pair(root / "good", "g2")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 100_000  # 400x300 is "huge" here; a real 100 MP file would take seconds to write
    try:
        report = preflight(DataConfig(datasets=datasets, resolution=64), show_progress=False)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return report, expected


@pytest.mark.parametrize("name", list(CASES))
def test_each_bad_input_is_reported_naming_the_file(report_and_cases, name: str) -> None:
    report, expected = report_and_cases
    level, path, phrase = expected[name]
    index = list(CASES).index(name)
    issues = [i for i in report.issues if i.dataset == index and i.level == level]
    matching = [i for i in issues if str(path) in i.message and phrase in i.message]
    got = [i.message for i in report.issues if i.dataset == index]
    assert matching, f"{name}: no {level} naming {path} with {phrase!r}; got {got}"
    assert all("\n" not in i.message for i in issues)
    if level == "error":
        assert not report.usable[index]  # the bad triple is never trained on
    elif level == "note":
        assert len(report.usable[index]) == 1  # normalised on load: the triple is kept
    if name == "would_upscale":
        assert not report.usable[index]  # skipped, with a warning


def test_good_dataset_is_untouched_and_the_table_counts_everything(report_and_cases) -> None:
    report, _ = report_and_cases
    assert [t.stem for t in report.usable[-1]] == ["g1", "g2"]
    table = report.table()
    assert table.splitlines()[0] == "preflight:" and len(table.splitlines()) > len(CASES) + 2
    total = table.splitlines()[2 + len(CASES) + 1].split()
    assert total[0] == "total" and int(total[3]) == len(report.errors) == sum(1 for c in CASES if _level(c) == "error")
    with pytest.raises(DataError) as exc:
        report.raise_on_errors()
    assert f"and {len(report.errors) - 1} more errors" in str(exc.value)


def test_contact_sheet_shows_controls_target_and_caption(tmp_path: Path) -> None:
    for i in range(5):
        _pair(tmp_path / "data", f"s{i}", caption=f"caption {i}")
    report = preflight(DataConfig(datasets=[DatasetConfig(path=str(tmp_path / "data"))], resolution=64), False)
    sheet = write_contact_sheet(report, tmp_path / "out" / "sheet.jpg", samples=3, height=32)
    image = Image.open(sheet)
    assert image.size[1] == 3 * (32 + 8) + 8  # one row per sample
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_preflight_command_prints_the_table_and_fails_on_errors(tmp_path: Path) -> None:
    _pair(tmp_path / "data", "ok")
    (tmp_path / "data" / "target" / "ok.txt").write_text("")
    config = tmp_path / "job.yaml"
    config.write_text(
        f"model: {{pretrained: {tmp_path / 'none'}}}\n"
        f"data: {{datasets: [{{path: {tmp_path / 'data'}}}], resolution: 64}}\n"
        f"output: {{dir: {tmp_path / 'run'}}}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "kontext_lora.cli", "preflight", "--config", str(config), *extra],
        capture_output=True, text=True, env=env, timeout=120, cwd=REPO,
    )  # fmt: skip
    done = run()
    assert done.returncode == 0, done.stderr
    assert "preflight passed: 1 usable triples, 1 warning(s)" in done.stdout and "empty caption" in done.stdout
    assert (tmp_path / "run" / "preflight.jpg").is_file()

    (tmp_path / "data" / "control" / "ok.png").write_bytes(b"garbage")
    done = run()
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"kontext-lora: error: cannot read image {tmp_path}")
    assert load_config(config).data.datasets[0].path == str(tmp_path / "data")
