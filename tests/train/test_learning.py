"""The trainer learns an edit that needs the control image.

Task: the target latent is the negated control latent (an "invert" edit in latent space), for smooth random colour
images encoded by the tiny model's real VAE. Without the control a model can only denoise, so both the 30% drop
against the base and the gap to shuffled controls show that the adapter reads the control tokens.
(An invert in pixel space is not used: through a random VAE it becomes an arbitrary non-linear latent map that
the tiny model needs far more steps to learn.)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kontext_lora.config import load_config
from kontext_lora.data.triples import discover_triples
from kontext_lora.model.load import load_pipeline
from kontext_lora.train.encode import collate_encoded
from kontext_lora.train.loop import fit
from kontext_lora.train.objective import LatentBatch
from tests.square_crops import TripleDataset, encode_dataset
from tests.tiny_config import tiny_model_overrides

from .tiny_task import heldout_mse, negated, write_images

RESOLUTION = 64  # 8x8 latents -> 16 target + 16 control tokens


def test_adapter_learns_an_edit_that_needs_the_control(tiny_model_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = load_config(
        None,
        [
            *tiny_model_overrides(tiny_model_dir),
            f"data.datasets=[{{path: {tmp_path}}}]", f"data.resolution={RESOLUTION}",
            "lora.rank=16", "lora.alpha=16", "lora.preset=all", "lora.init_lora_weights=gaussian",
            "train.steps=600", "train.batch_size=16", "train.lr=5e-3", "train.seed=0",
            "logging.report_to=none", f"output.dir={tmp_path / 'run'}",
        ],
    )  # fmt: skip
    pipe = load_pipeline(cfg.model)
    train_set = write_images(tmp_path / "train", 512, 0, RESOLUTION)
    heldout_set = write_images(tmp_path / "heldout", 32, 1, RESOLUTION)
    encode = lambda root: negated(  # noqa: E731
        encode_dataset(pipe, TripleDataset(discover_triples(root), RESOLUTION), 8, show_progress=False)
    )
    train_data, heldout = encode(train_set), collate_encoded(encode(heldout_set).items)

    # heldout_mse uses fixed sigmas and noise; the shuffled batch pairs each target with another's control.
    shuffled = LatentBatch(heldout.target_latents, [c.roll(1, dims=0) for c in heldout.control_latents],
                           heldout.prompt_embeds, heldout.pooled_embeds)  # fmt: skip

    base = heldout_mse(pipe.transformer, heldout)
    start = time.perf_counter()
    fit(cfg, pipe.transformer, train_data)
    seconds = time.perf_counter() - start
    trained = heldout_mse(pipe.transformer, heldout)
    trained_shuffled = heldout_mse(pipe.transformer, shuffled)

    report = f"base {base:.3f} trained {trained:.3f} shuffled {trained_shuffled:.3f} ({seconds:.0f} s)"
    print(report)
    assert trained < 0.7 * base, report  # >= 30% lower held-out loss than the base model
    assert trained_shuffled > 1.5 * trained, report  # wrong controls are clearly worse: the control matters
