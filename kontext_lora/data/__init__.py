"""Data layer: (control, target, caption) triples on disk -> checked, bucketed, cached. Knows nothing of training.

triples.py (files, image decoding), sources.py (folders, jsonl, csv, Hugging Face datasets), hf.py (a Hugging Face
dataset opened with its images left encoded, read by row), errors.py (DataError), buckets.py (sizes, paired
transforms, the bucket batch sampler), preflight.py (checks and report), cache.py (safetensors shards keyed by
content), plan.py (buckets + cache names per triple, the cached dataset).
"""

from kontext_lora.data.triples import (
    DataError,
    Triple,
    discover_triples,
    image_to_tensor,
    load_image,
)

__all__ = [
    "DataError",
    "Triple",
    "discover_triples",
    "image_to_tensor",
    "load_image",
]
