"""Block swap (memory.block_swap) on the tiny Kontext transformer, CPU as the "device": the swapped blocks' frozen
weights are a separate CPU copy and the model's own storage is really freed; training is bit-identical to no swap."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from kontext_lora.config import load_config
from kontext_lora.data.triples import discover_triples
from kontext_lora.model.load import load_pipeline
from kontext_lora.model.lora import lora_parameters
from kontext_lora.model.speed import apply_speed, transformer_blocks
from kontext_lora.model.swap import enable_block_swap, swapped_block_indices
from kontext_lora.train.loop import fit, training_step
from kontext_lora.train.optim import build_optimizer
from tests.model.tiny_lora import BASE, tiny_batch, tiny_lora_model
from tests.square_crops import TripleDataset, encode_dataset
from tests.train.tiny_task import write_images

SWAP_BASE = ["train.lr=1e-2", "speed.compile=none"]
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(overrides: list[str], swap: int):
    """The tiny LoRA model, eager, with `swap` blocks swapped (tests/model/tiny_lora.py)."""
    return tiny_lora_model([*SWAP_BASE, *overrides], swap)


def _frozen_bytes(block: torch.nn.Module) -> int:
    return sum(p.untyped_storage().nbytes() for p in block.parameters() if not p.requires_grad)


def _train(overrides: list[str], swap: int, steps: int = 3):
    """fit()'s step under bf16 autocast, AdamW; returns [(loss, LoRA grads)] per step, the model, what was applied,
    and per step the frozen bytes each block holds between steps."""
    transformer, cfg, applied = _model(overrides, swap)
    params = lora_parameters(transformer)
    optimizer = build_optimizer(params, cfg)
    generator = torch.Generator().manual_seed(3)
    record, held = [], []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = training_step(transformer, tiny_batch(), cfg, generator)
        loss.backward()
        record.append((loss.item(), torch.cat([p.grad.flatten() for p in params]).clone()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        held.append([_frozen_bytes(block) for block in transformer_blocks(transformer)])
    return record, transformer, applied, held


@pytest.fixture(scope="module")
def baseline():
    """No swap, no checkpointing."""
    return _train(["train.gradient_checkpointing=false"], swap=0)[0]


@pytest.mark.parametrize("swap, swapped", [(1, [2]), (4, [0, 1, 2, 3])])
def test_swap_trains_bit_identically_and_frees_the_swapped_weights(baseline, swap: int, swapped: list[int]) -> None:
    record, transformer, applied, held = _train(["train.gradient_checkpointing=false"], swap)
    assert applied["swapped_blocks"] == swapped and applied["checkpointed_blocks"] == swap  # swapped: checkpointed
    for (loss, grads), (base_loss, base_grads) in zip(record, baseline, strict=True):
        assert loss == base_loss
        assert torch.equal(grads, base_grads) and grads.abs().max() > 0
    assert len({loss for loss, _ in record}) == 3  # the steps did train
    full = [_frozen_bytes(block) for block in _model(["train.gradient_checkpointing=false"], 0)[0].transformer_blocks]
    for step in held:  # between steps: the swapped blocks hold no bytes, the others all theirs
        assert [n == 0 for n in step] == [i in swapped for i in range(4)]
        assert step[:2] == [0 if i in swapped else full[i] for i in range(2)]
    assert all(p.untyped_storage().nbytes() > 0 for p in lora_parameters(transformer))  # LoRA stays put


def test_at_most_two_swapped_blocks_are_resident_and_the_running_one_is(baseline) -> None:
    """Every block call (forward, and the recompute in backward) sees its own weights and at most one other swapped
    block's (the prefetched one)."""
    transformer, cfg, _ = _model(["train.gradient_checkpointing=false"], 4)
    seen = []
    for block in transformer_blocks(transformer):
        block.register_forward_pre_hook(
            lambda module, args: seen.append(
                (_frozen_bytes(module) > 0, sum(_frozen_bytes(b) > 0 for b in transformer_blocks(transformer)))
            )
        )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = training_step(transformer, tiny_batch(), cfg, torch.Generator().manual_seed(3))
    loss.backward()
    assert loss.item() == baseline[0][0]
    assert len(seen) == 8  # 4 forward + 4 recomputed
    assert all(own for own, _ in seen) and max(count for _, count in seen) == 2


def test_swap_composes_with_partial_checkpointing(baseline) -> None:
    """checkpoint_fraction=0.25 picks block 0; swapping 1 block (block 2) adds it: 2 recomputed, same numbers."""
    overrides = ["train.gradient_checkpointing=true", "speed.checkpoint_fraction=0.25"]
    record, transformer, applied, _ = _train(overrides, 1, steps=1)
    assert applied["swapped_blocks"] == [2] and applied["checkpointed_blocks"] == 2
    assert record[0][0] == baseline[0][0] and torch.equal(record[0][1], baseline[0][1])
    calls = []
    for block in transformer_blocks(transformer):
        block.register_forward_pre_hook(lambda module, args: calls.append(module))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = training_step(
            transformer, tiny_batch(), load_config(None, [*BASE, *SWAP_BASE]), torch.Generator().manual_seed(3)
        )
    assert len(calls) == 4
    loss.backward()
    blocks = transformer_blocks(transformer)
    assert calls[4:] == [blocks[2], blocks[0]]  # backward recomputes the swapped and the checkpointed block


def test_no_grad_forward_with_swap_matches_and_frees() -> None:
    """Validation/inference: blocks are called without the checkpointing hook; swapped ones still come and go."""
    plain, _, _ = _model([], 0)
    swapped, _, _ = _model([], 2)
    batch = tiny_batch()
    inputs = dict(
        hidden_states=torch.randn(1, 32, 64, dtype=torch.bfloat16), encoder_hidden_states=batch.prompt_embeds,
        pooled_projections=batch.pooled_embeds, timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]),
        img_ids=torch.zeros(32, 3), txt_ids=torch.zeros(8, 3), return_dict=False,
    )  # fmt: skip
    with torch.no_grad():
        expected, actual = plain(**inputs)[0], swapped(**inputs)[0]
    assert torch.equal(actual, expected)
    assert [_frozen_bytes(b) == 0 for b in transformer_blocks(swapped)] == [False, True, False, True]


def test_fit_with_block_swap_logs_it_and_trains_like_without(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    folder = write_images(tmp_path / "data", 4, seed=0)
    runs = {}
    for swap in (0, 2):
        cfg = load_config(None, [
            f"model.pretrained={tiny_model_dir}", "model.max_sequence_length=8", f"data.datasets=[{{path: {folder}}}]",
            "data.resolution=32", "lora.rank=4", "train.steps=3", "train.batch_size=2", "train.lr=1e-2",
            f"output.dir={tmp_path / str(swap)}", "logging.report_to=none", f"memory.block_swap={swap}",
        ])  # fmt: skip
        pipe = load_pipeline(cfg.model)
        encoded = encode_dataset(pipe, TripleDataset(discover_triples(folder), 32), 8, show_progress=False)
        torch.manual_seed(0)  # the LoRA init draws from the global RNG
        fit(cfg, pipe.transformer, encoded)
        lines = (tmp_path / str(swap) / "metrics.jsonl").read_text().splitlines()
        runs[swap] = [json.loads(line)["loss"] for line in lines]
    assert "'swapped_blocks': [1, 3]" in capsys.readouterr().out
    assert runs[2] == runs[0] and len(runs[0]) == 3


def test_swapped_block_indices_spread_over_the_depth() -> None:
    assert swapped_block_indices(1, 57) == [28]
    assert swapped_block_indices(3, 57) == [9, 28, 47]
    assert swapped_block_indices(57, 57) == list(range(57)) == swapped_block_indices(99, 57)
    assert swapped_block_indices(0, 57) == []


class _Opaque(torch.Tensor):
    """A tensor subclass that does not say what it holds (no __tensor_flatten__)."""


def test_an_unswappable_weight_type_is_refused_in_one_line() -> None:
    transformer, _, _ = _model([], 0)
    linear = transformer.single_transformer_blocks[0].proj_out.base_layer
    linear.weight = torch.nn.Parameter(torch.Tensor._make_subclass(_Opaque, linear.weight.data), requires_grad=False)
    message = "memory.block_swap cannot swap a _Opaque weight (no __tensor_flatten__); use memory.block_swap=0"
    with pytest.raises(ValueError, match=re.escape(message)):
        enable_block_swap(transformer, 4, CPU)


def _nf4_model(swap: int):
    """The tiny model with every single block's proj_mlp base weight stored as torchao NF4 (a tensor subclass)."""
    nf4_tensor = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    transformer, cfg, _ = _model([], 0)
    for block in transformer.single_transformer_blocks:
        linear = block.proj_mlp.base_layer
        linear.weight = torch.nn.Parameter(nf4_tensor.to_nf4(linear.weight.data, 64, 256), requires_grad=False)
    applied = apply_speed(transformer, cfg.speed, cfg.train.gradient_checkpointing, CPU, block_swap=swap)
    return transformer, cfg, applied


def test_nf4_weights_swap_through_their_inner_tensors() -> None:
    results = []
    for swap in (0, 4):
        transformer, cfg, _ = _nf4_model(swap)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = training_step(transformer, tiny_batch(), cfg, torch.Generator().manual_seed(3))
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in lora_parameters(transformer)])))
    assert results[1][0] == results[0][0] and torch.equal(results[1][1], results[0][1])
    weight = transformer.single_transformer_blocks[1].proj_mlp.base_layer.weight
    assert type(weight).__name__ == "NF4Tensor"
    assert weight.quantized_data.untyped_storage().nbytes() == 0 and weight.nf4.untyped_storage().nbytes() == 0


def test_enable_block_swap_alone_frees_after_backward_with_keyword_calls(baseline) -> None:
    """The plain entry point (no apply_speed, so diffusers calls the blocks with keywords, no checkpointing hook):
    same numbers, and the swapped weights are gone right after backward."""
    transformer, cfg, _ = _model(["train.gradient_checkpointing=false"], 0)
    assert enable_block_swap(transformer, 2, CPU) == [1, 3]
    assert not transformer.gradient_checkpointing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = training_step(transformer, tiny_batch(), cfg, torch.Generator().manual_seed(3))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in lora_parameters(transformer)])
    assert loss.item() == baseline[0][0] and torch.equal(grads, baseline[0][1])
    assert [_frozen_bytes(b) == 0 for b in transformer_blocks(transformer)] == [False, True, False, True]


def test_swap_setup_frees_each_block_before_taking_the_next(monkeypatch) -> None:
    """Enabling swap on a base that fits only once swapped: when block k's weights come to the device, every block
    swapped before it has already given its device memory back (its storage is empty)."""
    import kontext_lora.model.swap as swap_module

    cfg = load_config(None, [*BASE, *SWAP_BASE])
    torch.manual_seed(0)
    from diffusers import FluxTransformer2DModel

    from kontext_lora.model.lora import inject_lora
    from tests.model.tiny_lora import TINY_TRANSFORMER

    transformer = FluxTransformer2DModel(**TINY_TRANSFORMER).to(torch.bfloat16)
    inject_lora(transformer, cfg.lora)
    blocks = transformer_blocks(transformer)
    seen: list[int] = []
    still_held: list[int] = []
    original = swap_module._to_device_tensors

    def spy(block: torch.nn.Module, device: torch.device) -> None:
        still_held.append(sum(_frozen_bytes(blocks[i]) > 0 for i in seen))
        seen.append(next(i for i, b in enumerate(blocks) if b is block))
        original(block, device)

    monkeypatch.setattr(swap_module, "_to_device_tensors", spy)
    swapped = enable_block_swap(transformer, 3, CPU)
    assert seen == swapped and len(seen) == 3
    assert still_held == [0, 0, 0]
    assert all(_frozen_bytes(blocks[i]) == 0 for i in swapped)
