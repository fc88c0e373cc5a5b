"""FSDP2 sharding of the Kontext transformer with a PEFT LoRA, on 2 CPU processes (gloo).

accelerate turns FSDP on only for GPU processes, so this applies torch's `fully_shard` itself, the way accelerate's
FSDP2 plugin does with configs/accelerate/fsdp2_2gpu.yaml (one unit per Flux double / single block, then the
root), on a bf16 base with float32 LoRA parameters. Each process trains on its own micro-batch; the adapter that
fit()'s saver gathers (`full_adapter_state`: DTensor.full_tensor() on the LoRA tensors only) and the gathered
optimizer state (`full_tensors`) must equal one unsharded process accumulating both micro-batches.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

STEPS = 3
# The base is bf16; sharded and unsharded runs compute the same bf16 matmuls, and the float32 LoRA gradients differ
# at most in summation order (reduce-scatter's mean against accumulating halves; measured: identical).
ATOL = 1e-4


def _setup(model_dir: Path):
    from diffusers import FluxTransformer2DModel

    from kontext_lora.config import load_config
    from kontext_lora.model.lora import inject_lora, lora_parameters

    cfg = load_config(None, ["model.pretrained=unused", "data.datasets=[{path: unused}]", "lora.rank=4",
                             "lora.alpha=4", "train.lr=1e-2", "train.max_grad_norm=0"])  # fmt: skip
    transformer = FluxTransformer2DModel.from_pretrained(model_dir / "transformer", torch_dtype=torch.bfloat16)
    torch.manual_seed(0)
    inject_lora(transformer, cfg.lora)
    for name, param in transformer.named_parameters():  # lora_B away from 0 so lora_A gets gradients at once
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    return cfg, transformer, lora_parameters


def _sharded(model_dir: Path):
    """`_setup` with each Flux block, then the root, wrapped by `fully_shard` (accelerate's FSDP2 units)."""
    from torch.distributed.fsdp import fully_shard

    from kontext_lora.model.speed import transformer_blocks

    cfg, transformer, lora_parameters = _setup(model_dir)
    for block in transformer_blocks(transformer):
        fully_shard(block)
    fully_shard(transformer)
    return cfg, transformer, lora_parameters(transformer)


def _spawn(worker, model_dir: Path, out: Path, join: bool = True):
    """Start `worker(rank, port, model_dir, out)` in 2 forked processes that meet over gloo on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return mp.start_processes(worker, args=(port, model_dir, out), nprocs=2, join=join, start_method="fork")


def _batch(index: int):
    from kontext_lora.train.objective import LatentBatch

    generator = torch.Generator().manual_seed(100 + index)
    return LatentBatch(torch.randn(2, 16, 4, 4, generator=generator), torch.randn(2, 16, 4, 4, generator=generator),
                       torch.randn(2, 8, 32, generator=generator), torch.randn(2, 32, generator=generator))  # fmt: skip


def _sharded_worker(rank: int, port: int, model_dir: Path, out: Path) -> None:
    from torch.distributed.tensor import DTensor

    from kontext_lora.train.loop import micro_batch_seed, training_step
    from kontext_lora.train.run_state import full_adapter_state, full_tensors

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg, transformer, params = _sharded(model_dir)
        assert all(isinstance(p, DTensor) and p.to_local().shape[0] < p.shape[0] for p in params)
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
        generator = torch.Generator()
        for step in range(STEPS):
            index = 2 * step + rank  # global micro-batch k goes to process k % 2
            generator.manual_seed(micro_batch_seed(0, index))
            training_step(transformer, _batch(index), cfg, generator).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state, _ = full_adapter_state(transformer)
        moments = full_tensors(optimizer.state_dict())["state"]
        if rank == 0:
            save_file({**state, **{f"exp_avg.{i}": v["exp_avg"] for i, v in moments.items()}}, str(out))
    finally:
        dist.destroy_process_group()


def _unsharded(model_dir: Path) -> dict[str, torch.Tensor]:
    from kontext_lora.train.loop import micro_batch_seed, training_step
    from kontext_lora.train.run_state import full_adapter_state

    cfg, transformer, lora_parameters = _setup(model_dir)
    params = lora_parameters(transformer)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    generator = torch.Generator()
    for step in range(STEPS):
        for index in (2 * step, 2 * step + 1):
            generator.manual_seed(micro_batch_seed(0, index))
            (training_step(transformer, _batch(index), cfg, generator) / 2).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state, _ = full_adapter_state(transformer)
    return {**state, **{f"exp_avg.{i}": v["exp_avg"] for i, v in optimizer.state_dict()["state"].items()}}


@pytest.mark.usefixtures("one_thread")
def test_fsdp2_sharded_lora_trains_and_gathers_like_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharded.safetensors"
    context = _spawn(_sharded_worker, tiny_model_dir, out, join=False)
    reference = _unsharded(tiny_model_dir)
    while not context.join(timeout=60):
        pass
    sharded = load_file(str(out))
    assert set(sharded) == set(reference)
    assert any("lora_A" in key for key in sharded) and not any("lora_" not in k for k in sharded if "exp" not in k)
    difference = max((sharded[key] - reference[key]).abs().max().item() for key in reference)
    print(f"max |FSDP2 2 processes - 1 process with accumulation| over adapter and Adam moments = {difference:.2e}")
    assert difference < ATOL
    assert all(reference[key].abs().max() > 0 for key in reference if key.startswith("exp_avg"))  # gradients flowed


def _resume_worker(rank: int, port: int, model_dir: Path, out: Path) -> None:
    """Sharded run A trains 3 steps; at step 2 its adapter, Adam and EMA state are gathered whole and written, as a
    checkpoint holds them. Run B, a fresh sharded model, reads and restores them (`restore_training_tensors`) and
    trains step 3. A and B must end identical."""
    from torch.distributed.tensor import DTensor

    from kontext_lora.config import EmaConfig
    from kontext_lora.train.checkpoint import read_state, write_state
    from kontext_lora.train.ema import AdapterEMA
    from kontext_lora.train.loop import micro_batch_seed, training_step
    from kontext_lora.train.run_state import full_adapter_state, full_tensors, restore_training_tensors

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def sharded_run():
        cfg, transformer, params = _sharded(model_dir)
        return cfg, transformer, params, torch.optim.AdamW(params, lr=cfg.train.lr), AdapterEMA(params, EmaConfig())

    def train(cfg, transformer, optimizer, ema, steps) -> None:
        generator = torch.Generator()
        for step in steps:
            index = 2 * step + rank
            generator.manual_seed(micro_batch_seed(0, index))
            training_step(transformer, _batch(index), cfg, generator).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(step + 1)

    try:
        cfg, model_a, params_a, optimizer_a, ema_a = sharded_run()
        train(cfg, model_a, optimizer_a, ema_a, range(2))
        state = {"adapter": full_adapter_state(model_a)[0], "optimizer": full_tensors(optimizer_a.state_dict()),
                 "ema": full_tensors(ema_a.state()), "rng": torch.get_rng_state()}  # fmt: skip
        folder = out.parent / f"checkpoint-{rank}"  # through the disk, as a checkpoint goes (no aliasing of A's state)
        folder.mkdir()
        write_state(folder, "state", state)
        train(cfg, model_a, optimizer_a, ema_a, [2])

        cfg, model_b, params_b, optimizer_b, ema_b = sharded_run()
        pairs = zip(params_a, params_b, strict=True)
        assert not any(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in pairs)  # B starts elsewhere
        state = read_state(folder, "state")
        restore_training_tensors(model_b, optimizer_b, ema_b, state["adapter"], state["optimizer"], state["ema"])
        torch.set_rng_state(state["rng"])
        moments = [s["exp_avg"] for s in optimizer_b.state.values()]
        assert moments and all(
            isinstance(m, DTensor) and m.placements == p.placements for m, p in zip(moments, params_b, strict=True)
        )
        train(cfg, model_b, optimizer_b, ema_b, [2])

        results = {}
        for name, model, optimizer, ema in (("a", model_a, optimizer_a, ema_a), ("b", model_b, optimizer_b, ema_b)):
            adapter = full_adapter_state(model)[0]
            exp_avg = full_tensors(optimizer.state_dict())["state"]
            shadow = full_tensors(ema.state())["shadow_params"]
            results.update({f"{name}.{k}": v for k, v in adapter.items()})
            results.update({f"{name}.exp_avg.{i}": v["exp_avg"] for i, v in exp_avg.items()})
            results.update({f"{name}.ema.{i}": v.float() for i, v in enumerate(shadow)})
        if rank == 0:
            save_file(results, str(out))
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_thread")
def test_fsdp2_resume_restores_the_sharded_adapter_optimizer_and_ema(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed.safetensors"
    _spawn(_resume_worker, tiny_model_dir, out)
    results = load_file(str(out))
    keys = [key[2:] for key in results if key.startswith("a.")]
    assert any("lora_A" in k for k in keys) and any("exp_avg" in k for k in keys) and any("ema" in k for k in keys)
    differ = sorted(key for key in keys if not torch.equal(results[f"a.{key}"], results[f"b.{key}"]))
    assert not differ, f"{len(differ)} of {len(keys)} differ, e.g. {differ[:3]}"
