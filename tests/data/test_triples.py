"""Tests for kontext_lora.data.triples on real image files written to tmp_path."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from kontext_lora.data.triples import (
    DataError,
    Triple,
    discover_triples,
    image_to_tensor,
    load_image,
)
from tests.square_crops import TripleDataset, collate_triples

EXAMPLES = Path(__file__).resolve().parents[2] / "data_examples" / "bw"

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# --- helpers ---------------------------------------------------------------------------------------------------


def write_image(path: Path, color: tuple[int, int, int] = RED, size: tuple[int, int] = (32, 24)) -> Path:
    """Write a solid-colour RGB image (format from the extension) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_pair(root: Path, stem: str, control_ext: str = ".png", target_ext: str = ".png") -> tuple[Path, Path]:
    """Write root/control/<stem><ext> and root/target/<stem><ext>."""
    control = write_image(root / "control" / f"{stem}{control_ext}", RED)
    target = write_image(root / "target" / f"{stem}{target_ext}", BLUE)
    return control, target


def noise_jpeg_bytes(size: int = 64) -> bytes:
    """A real JPEG with enough entropy that its first half is missing most of the scan data."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def assert_one_line_naming(exc: pytest.ExceptionInfo[DataError], *names: str) -> str:
    """The DataError contract: one line, mentioning each of `names`."""
    message = str(exc.value)
    assert "\n" not in message and "\r" not in message, message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


def pixel(tensor: torch.Tensor, y: int, x: int) -> tuple[int, int, int]:
    """RGB at (y, x) of a (3, H, W) tensor in [-1, 1], back in 0..255."""
    return tuple(int(round(float(v))) for v in (tensor[:, y, x] + 1.0) * 127.5)


# --- discovery -------------------------------------------------------------------------------------------------


def test_folder_layout_pairs_by_stem_with_captions_and_default(tmp_path: Path) -> None:
    write_pair(tmp_path, "c")
    write_pair(tmp_path, "a", control_ext=".png", target_ext=".JPG")  # extensions differ and are case-insensitive
    write_pair(tmp_path, "b", control_ext=".webp", target_ext=".jpeg")
    (tmp_path / "target" / "a.txt").write_text("  turn the sky red \n", encoding="utf-8")
    (tmp_path / "target" / "c.txt").write_bytes("\ufeffadd a hat".encode())  # BOM from Windows editors
    (tmp_path / "control" / ".DS_Store").write_bytes(b"\x00\x01junk")  # hidden files are ignored

    triples = discover_triples(tmp_path, default_caption="a default")

    assert [t.stem for t in triples] == ["a", "b", "c"]
    assert [t.caption for t in triples] == ["turn the sky red", "a default", "add a hat"]
    a = triples[0]
    assert a == Triple(
        stem="a",
        control=tmp_path / "control" / "a.png",
        target=tmp_path / "target" / "a.JPG",
        caption="turn the sky red",
    )
    assert triples[1].control.name == "b.webp" and triples[1].target.name == "b.jpeg"
    assert all(t.control.is_absolute() and t.target.is_absolute() for t in triples)


def test_default_caption_defaults_to_empty(tmp_path: Path) -> None:
    write_pair(tmp_path, "x")
    assert discover_triples(str(tmp_path))[0].caption == ""


def test_jsonl_layout_relative_absolute_and_default_caption(tmp_path: Path) -> None:
    write_image(tmp_path / "imgs" / "z_in.png")
    write_image(tmp_path / "imgs" / "z_out.png")
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    abs_control = write_image(outside / "m_in.jpg")
    abs_target = write_image(outside / "m_out.jpg")
    # A folder layout is also present: metadata.jsonl must take precedence over it.
    write_pair(tmp_path, "ignored")
    lines = [
        json.dumps({"control": "imgs/z_in.png", "target": "imgs/z_out.png", "caption": " zoom "}),
        "",
        json.dumps({"control": str(abs_control), "target": str(abs_target), "extra": 1}),
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    triples = discover_triples(tmp_path, default_caption="fallback")

    assert [t.stem for t in triples] == ["imgs/z_out", "m_out"]  # sorted by stem, not by line
    assert triples[0].control == tmp_path / "imgs" / "z_in.png"
    assert triples[0].caption == "zoom"
    assert triples[1].control == abs_control and triples[1].target == abs_target
    assert triples[1].caption == "fallback"


# --- images and dataset ----------------------------------------------------------------------------------------


def test_dataset_items_shapes_dtypes_range_and_collate(tmp_path: Path) -> None:
    control_path = tmp_path / "control" / "p.png"
    control_path.parent.mkdir(parents=True)
    halves = np.zeros((40, 40, 3), dtype=np.uint8)  # black top half, white bottom half
    halves[20:] = 255
    Image.fromarray(halves).save(control_path)
    write_image(tmp_path / "target" / "p.jpg", WHITE, size=(50, 70))
    write_pair(tmp_path, "q")
    (tmp_path / "target" / "p.txt").write_text("brighten", encoding="utf-8")

    dataset = TripleDataset(discover_triples(tmp_path), resolution=16)
    dataset.verify()
    assert len(dataset) == 2
    item = dataset[0]
    assert set(item) == {"control", "target", "caption", "stem"}
    assert item["caption"] == "brighten" and item["stem"] == "p"
    for key in ("control", "target"):
        assert item[key].shape == (3, 16, 16)
        assert item[key].dtype == torch.float32
        assert item[key].min() >= -1.0 and item[key].max() <= 1.0
    assert torch.allclose(item["target"], torch.ones(3, 16, 16))  # white -> exactly +1
    assert item["control"][:, 0].eq(-1.0).all() and item["control"][:, -1].eq(1.0).all()  # black -1, white +1

    batch = collate_triples([dataset[0], dataset[1]])
    assert batch["control"].shape == (2, 3, 16, 16) and batch["target"].shape == (2, 3, 16, 16)
    assert batch["caption"] == ["brighten", ""] and batch["stem"] == ["p", "q"]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_triples)
    assert torch.equal(next(iter(loader))["target"], batch["target"])


def test_center_crop_keeps_the_middle_of_wide_and_tall_images() -> None:
    wide = np.zeros((30, 90, 3), dtype=np.uint8)  # red | green | blue thirds, shorter side 30
    wide[:, :30], wide[:, 30:60], wide[:, 60:] = RED, GREEN, BLUE
    crop = image_to_tensor(Image.fromarray(wide), 15)
    assert crop.shape == (3, 15, 15)
    for y in (0, 7, 14):
        for x in range(2, 13):
            assert pixel(crop, y, x) == GREEN
        # The bicubic kernel reaches a few source pixels past the crop, exactly as resize-then-crop would.
        for x in (0, 14):
            assert pixel(crop, y, x)[1] > 200

    tall = np.zeros((120, 40, 3), dtype=np.uint8)  # top half red, bottom half blue
    tall[:60], tall[60:] = RED, BLUE
    crop = image_to_tensor(Image.fromarray(tall), 20)
    assert pixel(crop, 0, 10) == RED and pixel(crop, 8, 10) == RED
    assert pixel(crop, 19, 10) == BLUE and pixel(crop, 11, 10) == BLUE

    half = np.zeros((20, 40, 3), dtype=np.uint8)  # left half red / right half blue: the crop straddles the seam
    half[:, :20], half[:, 20:] = RED, BLUE
    crop = image_to_tensor(Image.fromarray(half), 20)
    assert pixel(crop, 10, 0) == RED and pixel(crop, 10, 8) == RED
    assert pixel(crop, 10, 19) == BLUE and pixel(crop, 10, 11) == BLUE


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # landscape pixels: left red, right blue
    stored[:, :20], stored[:, 20:] = RED, BLUE
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    image.save(path, quality=95, exif=exif)

    upright = load_image(path)

    assert upright.size == (20, 40)  # portrait after the transpose
    top, bottom = np.asarray(upright)[5, 10].astype(int), np.asarray(upright)[35, 10].astype(int)
    assert np.abs(top - RED).max() < 30, top  # the stored left edge is now on top
    assert np.abs(bottom - BLUE).max() < 30, bottom


def test_rgba_is_composited_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 3, 4), dtype=np.uint8)
    rgba[0] = (0, 0, 0, 0)  # fully transparent black -> white
    rgba[1] = (255, 0, 0, 255)  # opaque red stays red
    rgba[2] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    rgba[3] = (0, 0, 255, 255)
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)

    image = load_image(path)

    assert image.mode == "RGB"
    pixels = np.asarray(image).astype(int)
    assert tuple(pixels[0, 0]) == WHITE
    assert tuple(pixels[1, 1]) == RED
    assert np.all(np.abs(pixels[2, 2] - 127) <= 1), pixels[2, 2]
    assert tuple(pixels[3, 2]) == BLUE


def test_palette_sixteen_bit_cmyk_and_grayscale_come_out_rgb(tmp_path: Path) -> None:
    palette = Image.new("RGB", (4, 4), GREEN).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(tmp_path / "palette.png")
    transparent_palette = Image.new("P", (2, 1), 0)
    transparent_palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    transparent_palette.putpixel((1, 0), 1)
    transparent_palette.save(tmp_path / "palette_alpha.png", transparency=0)
    sixteen = np.array([[0, 32896, 65535]], dtype=np.uint16)  # 32896 = 128 * 257
    Image.fromarray(sixteen).save(tmp_path / "sixteen.png")
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # CMYK red
    Image.new("L", (4, 4), 77).save(tmp_path / "gray.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")  # really a 16-bit file
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"

    images = {name: load_image(tmp_path / name) for name in ["palette.png", "palette_alpha.png", "sixteen.png"]}
    images |= {name: load_image(tmp_path / name) for name in ["cmyk.jpg", "gray.png"]}

    assert all(image.mode == "RGB" for image in images.values())
    assert tuple(np.asarray(images["palette.png"])[0, 0]) == GREEN
    assert [tuple(p) for p in np.asarray(images["palette_alpha.png"])[0]] == [WHITE, (200, 100, 50)]
    # Scaled, not clipped: a clipping conversion would turn everything above 255 white.
    assert [tuple(p) for p in np.asarray(images["sixteen.png"])[0]] == [(0, 0, 0), (128, 128, 128), WHITE]
    red = np.asarray(images["cmyk.jpg"])[2, 2].astype(int)
    assert red[0] > 200 and red[1] < 50 and red[2] < 50, red
    assert tuple(np.asarray(images["gray.png"])[1, 1]) == (77, 77, 77)


# --- errors ----------------------------------------------------------------------------------------------------


def test_missing_control(tmp_path: Path) -> None:
    write_pair(tmp_path, "ok")
    write_image(tmp_path / "target" / "lonely.png")
    with pytest.raises(DataError) as exc:
        discover_triples(tmp_path)
    assert_one_line_naming(exc, str(tmp_path / "target" / "lonely.png"), str(tmp_path / "control" / "lonely"))


def test_missing_target(tmp_path: Path) -> None:
    write_pair(tmp_path, "ok")
    write_image(tmp_path / "control" / "lonely.jpg")
    with pytest.raises(DataError) as exc:
        discover_triples(tmp_path)
    assert_one_line_naming(exc, str(tmp_path / "control" / "lonely.jpg"), str(tmp_path / "target" / "lonely"))


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), id="random-bytes"),
        pytest.param(b"", id="zero-bytes"),
        pytest.param(noise_jpeg_bytes()[: len(noise_jpeg_bytes()) // 2], id="truncated-jpeg"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, id="png-header-only"),
    ],
)
def test_unreadable_images_raise_data_error(tmp_path: Path, content: bytes) -> None:
    write_pair(tmp_path, "good")
    bad = tmp_path / "target" / "bad.jpg"
    write_image(tmp_path / "control" / "bad.png")
    bad.write_bytes(content)
    dataset = TripleDataset(discover_triples(tmp_path), resolution=8)  # discovery does not decode

    with pytest.raises(DataError) as exc:
        load_image(bad)
    assert assert_one_line_naming(exc, str(bad)).startswith("cannot read image")
    with pytest.raises(DataError) as exc:
        dataset.verify()
    assert_one_line_naming(exc, str(bad))
    with pytest.raises(DataError):
        dataset[0]


def test_truncated_jpeg_fails_even_if_pil_allows_truncation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = noise_jpeg_bytes()
    bad = tmp_path / "half.jpg"
    bad.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some third-party code does globally

    with pytest.raises(DataError) as exc:
        load_image(bad)
    assert_one_line_naming(exc, str(bad))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_missing_image_file_for_load_image(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        load_image(tmp_path / "nope.png")
    assert_one_line_naming(exc, str(tmp_path / "nope.png"))


def test_empty_folder_layout(tmp_path: Path) -> None:
    (tmp_path / "control").mkdir()
    (tmp_path / "target").mkdir()
    with pytest.raises(DataError) as exc:
        discover_triples(tmp_path)
    assert_one_line_naming(exc, str(tmp_path / "control"), "no triples")


def test_root_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(DataError) as exc:
        discover_triples(missing)
    assert_one_line_naming(exc, str(missing), "does not exist")


def test_root_is_a_file(tmp_path: Path) -> None:
    path = write_image(tmp_path / "single.png")
    with pytest.raises(DataError) as exc:
        discover_triples(path)
    assert_one_line_naming(exc, str(path), "not a folder")


def test_neither_layout_present(tmp_path: Path) -> None:
    write_image(tmp_path / "stray.png")
    with pytest.raises(DataError) as exc:
        discover_triples(tmp_path)
    assert_one_line_naming(exc, str(tmp_path), "metadata.jsonl", "control/")


def test_only_one_of_the_two_folders(tmp_path: Path) -> None:
    write_image(tmp_path / "control" / "a.png")
    with pytest.raises(DataError) as exc:
        discover_triples(tmp_path)
    assert_one_line_naming(exc, str(tmp_path / "target"))


def test_duplicate_stem_with_two_extensions(tmp_path: Path) -> None:
    write_pair(tmp_path, "dup")
    write_image(tmp_path / "target" / "dup.jpg")
    with pytest.raises(DataError) as exc:
        discover_triples(tmp_path)
    assert_one_line_naming(exc, str(tmp_path / "target" / "dup.png"), str(tmp_path / "target" / "dup.jpg"))


def test_jsonl_invalid_line_names_line_number(tmp_path: Path) -> None:
    write_image(tmp_path / "c.png")
    write_image(tmp_path / "t.png")
    good = json.dumps({"control": "c.png", "target": "t.png"})
    (tmp_path / "metadata.jsonl").write_text(f"{good}\n\n{{'control': 'c.png',\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        discover_triples(tmp_path)
    assert_one_line_naming(exc, str(tmp_path / "metadata.jsonl"), "line 3", "not valid JSON")


def test_jsonl_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "metadata.jsonl").write_text('["c.png", "t.png"]\n', encoding="utf-8")
    with pytest.raises(DataError) as exc:
        discover_triples(tmp_path)
    assert_one_line_naming(exc, str(tmp_path / "metadata.jsonl"), "line 1")


@pytest.mark.parametrize("missing", ["control", "target"])
def test_jsonl_missing_field(tmp_path: Path, missing: str) -> None:
    write_image(tmp_path / "c.png")
    write_image(tmp_path / "t.png")
    record = {"control": "c.png", "target": "t.png", "caption": "x"}
    del record[missing]
    (tmp_path / "metadata.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        discover_triples(tmp_path)
    assert_one_line_naming(exc, str(tmp_path / "metadata.jsonl"), "line 1", f"'{missing}'")


def test_jsonl_referenced_file_missing(tmp_path: Path) -> None:
    write_image(tmp_path / "c.png")
    lines = [
        json.dumps({"control": "c.png", "target": "c.png"}),
        json.dumps({"control": "c.png", "target": "gone.png"}),
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError) as exc:
        discover_triples(tmp_path)
    assert_one_line_naming(exc, str(tmp_path / "gone.png"), "line 2", "does not exist")


def test_jsonl_empty(tmp_path: Path) -> None:
    (tmp_path / "metadata.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        discover_triples(tmp_path)
    assert_one_line_naming(exc, str(tmp_path / "metadata.jsonl"), "no triples")


def test_non_utf8_caption(tmp_path: Path) -> None:
    write_pair(tmp_path, "latin")
    caption = tmp_path / "target" / "latin.txt"
    caption.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(DataError) as exc:
        discover_triples(tmp_path)
    assert_one_line_naming(exc, str(caption), "UTF-8")


@pytest.mark.parametrize("folder, name", [("control", "notes.md"), ("target", "photo.heic"), ("target", "a.png.part")])
def test_unknown_non_image_file(tmp_path: Path, folder: str, name: str) -> None:
    write_pair(tmp_path, "a")
    stray = tmp_path / folder / name
    stray.write_text("not an image", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        discover_triples(tmp_path)
    assert_one_line_naming(exc, str(stray), "png")


def test_caption_in_control_folder_and_orphan_caption(tmp_path: Path) -> None:
    write_pair(tmp_path, "a")
    misplaced = tmp_path / "control" / "a.txt"
    misplaced.write_text("caption in the wrong folder", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        discover_triples(tmp_path)
    assert_one_line_naming(exc, str(misplaced), str(tmp_path / "target" / "a.txt"))

    misplaced.unlink()
    orphan = tmp_path / "target" / "typo.txt"
    orphan.write_text("caption for a stem with no image", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        discover_triples(tmp_path)
    assert_one_line_naming(exc, str(orphan))


def test_data_error_is_a_value_error_and_flattens_newlines() -> None:
    error = DataError("cannot read image /x/a\nb.png: bad\n  thing")
    assert isinstance(error, ValueError)
    assert str(error) == "cannot read image /x/a b.png: bad thing"


# --- shipped example set ---------------------------------------------------------------------------------------


def test_shipped_black_and_white_examples_load() -> None:
    triples = discover_triples(EXAMPLES)
    assert len(triples) == 8
    assert {t.caption for t in triples} == {"make it black and white"}
    dataset = TripleDataset(triples, resolution=32)
    dataset.verify()
    for triple in triples:
        target = np.asarray(load_image(triple.target))
        control = np.asarray(load_image(triple.control)).astype(int)
        assert target.shape == control.shape == (256, 256, 3)
        assert np.array_equal(target[..., 0], target[..., 1]) and np.array_equal(target[..., 0], target[..., 2])
        assert np.abs(control[..., 0] - control[..., 2]).max() > 20, triple.stem  # the control really is colour
    item = dataset[0]
    assert item["target"].shape == (3, 32, 32) and item["caption"] == "make it black and white"
