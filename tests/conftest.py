"""Shared fixtures: the tiny random Kontext pipeline saved once per test session, in diffusers layout."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "data_examples" / "bw"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kontext_lora.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-kontext", pretrained=False)


@pytest.fixture
def one_thread():
    """One intra-op thread: the tiny model gains nothing from more, and on a shared 2-core machine they thrash."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
