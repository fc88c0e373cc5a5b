"""The training data stream: cached encodings -> one-bucket micro-batches, reproducible and resumable.

`training_batches` builds the loader: one bucket per batch, in an order fixed by (train.seed, epoch), so batch k
of a run is reproducible. With N processes, global micro-batch k goes to process k % N (`ShardedBatches`): the
loader is ours, not prepared by accelerate, whose per-epoch sharding pads uneven epochs with repeated batches.
`Batches` hands its micro-batches out endlessly and counts them: the data position a checkpoint records.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from kontext_lora.config import Config
from kontext_lora.data.buckets import BucketBatchSampler, ShardedBatches
from kontext_lora.data.plan import bucket_keys_of
from kontext_lora.train.encode import collate_encoded
from kontext_lora.train.objective import LatentBatch


class Batches:
    """Endless iterator over the loader that counts the micro-batches handed out: the data position.

    The loader's batch sampler is a `ShardedBatches`; resuming (`skip`) positions it after the consumed batches
    without reading them, so a resume costs nothing however large the cache. Batches (`LatentBatch`, every tensor
    (B, ...) of one bucket's shapes) come out on `device`.
    """

    def __init__(self, loader: DataLoader, device: torch.device, num_processes: int = 1, process_index: int = 0):
        self._loader, self._batches = loader, None  # ShardedBatches never ends: one iterator for the whole run
        self.device, self.num_processes, self.process_index = device, num_processes, process_index
        self.consumed = 0

    @property
    def global_index(self) -> int:
        """Index of the last micro-batch handed out, counted over all processes (see `ShardedBatches`)."""
        return (self.consumed - 1) * self.num_processes + self.process_index

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> LatentBatch:
        if self._batches is None:
            self._batches = iter(self._loader)
        self.consumed += 1
        return next(self._batches).to(self.device)

    def skip(self, count: int) -> None:
        """Continue after this process's first `count` micro-batches; only before the first batch is drawn."""
        if self.consumed:
            raise RuntimeError("Batches.skip must come before the first batch is drawn")
        self._loader.batch_sampler.skip(count)
        # The iterator is made now, as the interrupted run had made it by then: making one draws the loader's base
        # seed from the global RNG, which the resume restores afterwards.
        self._batches = iter(self._loader)
        self.consumed = count


def training_batches(encoded: Dataset, cfg: Config, accelerator: Accelerator) -> Batches:
    """This process's share of the micro-batches of `encoded` (cached encodings, see train/encode.py)."""
    sampler = BucketBatchSampler(
        bucket_keys_of(encoded), cfg.train.batch_size, cfg.train.seed,
        weights=encoded.sample_weights() if hasattr(encoded, "sample_weights") else None,
        with_draw_seed=getattr(encoded, "takes_draw_seed", False),
    )  # fmt: skip
    shard = ShardedBatches(sampler, accelerator.num_processes, accelerator.process_index)
    loader = DataLoader(
        encoded, batch_sampler=shard, collate_fn=collate_encoded, num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
    )  # fmt: skip
    return Batches(loader, accelerator.device, accelerator.num_processes, accelerator.process_index)


def set_deepspeed_batch_size(accelerator: Accelerator, batch_size: int) -> None:
    """DeepSpeed reads its micro-batch size from a prepared DataLoader; ours is not prepared, so it is set here."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
