"""Build the shipped example dataset data_examples/bw/ ("make it black and white") from scikit-image's photos.

Usage: python scripts/make_data_examples.py [--out data_examples/bw]

Every photo used is public domain or CC0 (see data_examples/README.md for sources), ships inside the
scikit-image wheel (no download), and the output is byte-for-byte reproducible for a given Pillow/libjpeg.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

SIZE = 256
JPEG_QUALITY = 92
CAPTION = "make it black and white"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data_examples" / "bw"


def _hubble_detail() -> np.ndarray:
    """Top-left quadrant of the Hubble deep field: a zoomed-in view with different galaxies than the full frame."""
    full = skimage.data.hubble_deep_field()  # (872, 1000, 3)
    return full[: full.shape[0] // 2, : full.shape[0] // 2]


# stem -> loader returning an (H, W, 3) uint8 RGB photo; only images whose licence allows redistribution.
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": skimage.data.astronaut,  # public domain (NASA)
    "chelsea": skimage.data.chelsea,  # CC0, Stefan van der Walt
    "coffee": skimage.data.coffee,  # CC0, Rachel Michetti
    "hubble_deep_field": skimage.data.hubble_deep_field,  # public domain (NASA)
    "hubble_detail": _hubble_detail,  # public domain (NASA)
    "immunohistochemistry": skimage.data.immunohistochemistry,  # no known copyright restrictions (CMMI)
    "retina": skimage.data.retina,  # CC0, Mikael Häggström
    "rocket": skimage.data.rocket,  # public domain (SpaceX)
}


def square_photo(pixels: np.ndarray, size: int) -> Image.Image:
    """Center-crop an (H, W, 3) uint8 array to a square and resize it to size x size."""
    height, width = pixels.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = Image.fromarray(np.ascontiguousarray(pixels[top : top + side, left : left + side, :3]), mode="RGB")
    return crop.resize((size, size), resample=Image.Resampling.LANCZOS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (gets control/ and target/)")
    args = parser.parse_args()

    control_dir, target_dir = args.out / "control", args.out / "target"
    control_dir.mkdir(parents=True, exist_ok=True)
    target_dir.mkdir(parents=True, exist_ok=True)
    for stem, load in PHOTOS.items():
        control = square_photo(load(), SIZE)
        # Same recipe a user would apply: luminance only, stored as 3 equal channels like any RGB target.
        target = control.convert("L").convert("RGB")
        control.save(control_dir / f"{stem}.jpg", quality=JPEG_QUALITY)
        target.save(target_dir / f"{stem}.jpg", quality=JPEG_QUALITY)
        (target_dir / f"{stem}.txt").write_text(CAPTION + "\n", encoding="utf-8")
    print(f"wrote {len(PHOTOS)} triples to {args.out}")


if __name__ == "__main__":
    main()
