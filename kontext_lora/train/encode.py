"""Encode every triple once (VAE latents of target AND control, T5 + CLIP embeddings) before training.

Training then never touches the VAE or the text encoders, which can leave the GPU. The encodings are kept in
memory here; persistent disk caches are a later step (see the issues).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from kontext_lora.data.triples import TripleDataset, collate_triples
from kontext_lora.model.load import encode_captions, encode_images
from kontext_lora.train.objective import LatentBatch


class EncodedDataset(Dataset):
    """Per-sample cached encodings; items are dicts of CPU tensors (see `LatentBatch` for shapes)."""

    def __init__(self, items: list[dict[str, torch.Tensor]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def collate_encoded(items: list[dict[str, torch.Tensor]]) -> LatentBatch:
    return LatentBatch(**{key: torch.stack([item[key] for item in items]) for key in items[0]})


@torch.no_grad()
def encode_dataset(
    pipe, dataset: TripleDataset, max_sequence_length: int, batch_size: int = 4, show_progress: bool = True
) -> EncodedDataset:
    """Run the VAE and both text encoders over the dataset once; returns CPU tensors in the pipeline's dtype."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_triples)
    items: list[dict[str, torch.Tensor]] = []
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
