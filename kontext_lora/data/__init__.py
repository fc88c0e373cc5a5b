"""Data layer: (control, target, caption) triples on disk -> tensors. Knows nothing of training."""

from kontext_lora.data.triples import (
    DataError,
    Triple,
    TripleDataset,
    collate_triples,
    discover_triples,
    image_to_tensor,
    load_image,
)

__all__ = [
    "DataError",
    "Triple",
    "TripleDataset",
    "collate_triples",
    "discover_triples",
    "image_to_tensor",
    "load_image",
]
