"""A small learning task on the tiny model, shared by the training-feature tests (encoded once per session).

Smooth random colour images through the tiny model's real VAE, the target latent the
negated control latent (an edit only the control tokens can explain). 32 px images: 2x2 target tokens, so a few
training steps run in well under a second on a free CPU.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kontext_lora.config import Config, load_config
from kontext_lora.data.triples import discover_triples
from kontext_lora.train.encode import EncodedDataset, collate_encoded
from kontext_lora.train.objective import LatentBatch, flow_matching_loss
from tests.square_crops import TripleDataset, encode_dataset
from tests.tiny_config import tiny_model_overrides

RESOLUTION = 32


def write_images(folder: Path, count: int, seed: int, resolution: int = RESOLUTION) -> Path:
    """Smooth random colour images (a 4x4 colour grid, bicubic upsampled); control = target on disk."""
    rng = np.random.default_rng(seed)
    for sub in ("control", "target"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        grid = (rng.random((4, 4, 3)) * 255).astype("uint8")
        image = Image.fromarray(grid).resize((resolution, resolution), Image.BICUBIC)
        image.save(folder / "control" / f"{i:03d}.png")
        image.save(folder / "target" / f"{i:03d}.png")
        (folder / "target" / f"{i:03d}.txt").write_text("invert it")
    return folder


@functools.cache
def encoded_pair(model_dir: str, work_dir: str, resolution: int = RESOLUTION) -> tuple[EncodedDataset, EncodedDataset]:
    """(train, held-out) encodings of fresh images with target = control (the edit is applied by the caller)."""
    from kontext_lora.model.load import load_pipeline

    cfg = load_config(None, [f"model.pretrained={model_dir}", "model.dtype=float32", "data.datasets=[{path: x}]"])
    pipe = load_pipeline(cfg.model)
    root = Path(work_dir)

    def encode(folder: Path) -> EncodedDataset:
        return encode_dataset(pipe, TripleDataset(discover_triples(folder), resolution), 8, show_progress=False)

    train = encode(write_images(root / "train", 64, 0, resolution))
    return train, encode(write_images(root / "heldout", 16, 1, resolution))


def negated(encoded: EncodedDataset) -> EncodedDataset:
    return EncodedDataset([{**item, "target_latents": -item["control_latents"]} for item in encoded.items])


def task_config(model_dir: Path, out_dir: Path, *overrides: str) -> Config:
    return load_config(
        None,
        [
            *tiny_model_overrides(model_dir),
            f"data.datasets=[{{path: {out_dir}}}]", f"data.resolution={RESOLUTION}",
            "lora.rank=8", "lora.alpha=8", "lora.preset=all", "lora.init_lora_weights=gaussian",
            "train.steps=12", "train.batch_size=16", "train.lr=5e-3", "train.seed=0",
            "logging.report_to=none", f"output.dir={out_dir}", *overrides,
        ],
    )  # fmt: skip


def fresh_transformer(model_dir: Path):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(str(Path(model_dir) / "transformer"))


def fixed_eval(batch: LatentBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed sigmas (B,) and noise like the target latents, for comparable held-out losses."""
    sigmas = torch.tensor([0.3, 0.5, 0.7, 0.9]).repeat(batch.target_latents.shape[0] // 4 + 1)
    noise = torch.randn(batch.target_latents.shape, generator=torch.Generator().manual_seed(123))
    return sigmas[: batch.target_latents.shape[0]], noise


def heldout_mse(transformer, batch: LatentBatch) -> float:
    """The plain flow-matching MSE on `batch` with fixed sigmas and noise."""
    sigmas, noise = fixed_eval(batch)
    with torch.no_grad():
        return flow_matching_loss(transformer, batch, sigmas, noise, guidance=1.0).item()


def heldout_batch(encoded: EncodedDataset) -> LatentBatch:
    return collate_encoded(encoded.items)
