"""The config overrides every CPU test of the tiny Kontext model starts from."""

from __future__ import annotations

from pathlib import Path


def tiny_model_overrides(model_dir: Path | str, max_sequence_length: int = 8) -> list[str]:
    """The tiny model's folder, in float32 (exact CPU arithmetic), with T5 prompts of `max_sequence_length` tokens."""
    return [f"model.pretrained={model_dir}", "model.dtype=float32", f"model.max_sequence_length={max_sequence_length}"]
