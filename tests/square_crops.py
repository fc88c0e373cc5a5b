"""Square crops of (control, target) pairs, encoded once into memory: the small fixed datasets of the CPU tests.

Training itself goes through buckets and the disk cache (kontext_lora.data.plan, kontext_lora.train.encode); these
keep a test's data to one control per target at one square size.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kontext_lora.data.triples import Triple, image_to_tensor, load_image
from kontext_lora.model.load import encode_captions, encode_images
from kontext_lora.train.encode import EncodedDataset


class TripleDataset(torch.utils.data.Dataset):
    """Square crops of (control, target) pairs with their captions."""

    def __init__(self, triples: list[Triple], resolution: int) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        self.triples = list(triples)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.triples)

    def __getitem__(self, index: int) -> dict:
        """Return {"control": (3, R, R), "target": (3, R, R) float32 in [-1, 1], "caption": str, "stem": str}."""
        triple = self.triples[index]
        return {
            "control": image_to_tensor(load_image(triple.control), self.resolution),
            "target": image_to_tensor(load_image(triple.target), self.resolution),
            "caption": triple.caption,
            "stem": triple.stem,
        }

    def verify(self) -> None:
        """Decode every image once so an unreadable file raises DataError before training starts."""
        for triple in self.triples:
            load_image(triple.control)
            load_image(triple.target)


def collate_triples(items: list[dict]) -> dict:
    """Batch dataset items: control/target (B, 3, R, R); caption/stem as lists of B strings."""
    return {
        "control": torch.stack([item["control"] for item in items]),  # (B, 3, R, R)
        "target": torch.stack([item["target"] for item in items]),  # (B, 3, R, R)
        "caption": [item["caption"] for item in items],
        "stem": [item["stem"] for item in items],
    }


@torch.no_grad()
def encode_dataset(
    pipe, dataset: TripleDataset, max_sequence_length: int, batch_size: int = 4, show_progress: bool = True
) -> EncodedDataset:
    """Run the VAE and both text encoders over a square-crop dataset once; CPU tensors in the pipeline's dtype."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_triples)
    items: list[dict] = []
    for batch in tqdm(loader, desc="encoding triples", unit="batch", disable=not show_progress):
        target_latents = encode_images(pipe.vae, batch["target"])  # (B, 16, R/8, R/8)
        control_latents = encode_images(pipe.vae, batch["control"])
        prompt_embeds, pooled_embeds = encode_captions(pipe, batch["caption"], max_sequence_length)
        for i in range(target_latents.shape[0]):
            items.append(
                {
                    "target_latents": target_latents[i].cpu(),
                    "control_latents": control_latents[i].cpu(),
                    "prompt_embeds": prompt_embeds[i].cpu(),
                    "pooled_embeds": pooled_embeds[i].cpu(),
                }
            )
    return EncodedDataset(items)
