"""The training fast path (speed.*) on the tiny Kontext transformer: same loss and LoRA gradients as eager bf16."""

from __future__ import annotations

import re

import pytest
import torch
import torch._dynamo
import torch._functorch.config as functorch_config

from kontext_lora.config import ConfigError, load_config
from kontext_lora.model.lora import lora_parameters
from kontext_lora.model.speed import _ContiguousGrad, set_attention_backend, transformer_blocks
from kontext_lora.train.loop import training_step
from tests.model.tiny_lora import BASE, tiny_batch, tiny_lora_model


@pytest.fixture(autouse=True)
def _restore_global_state():
    """apply_speed sets process-wide switches (SDPA kernels, the partitioner's budget, compiled code): undo them."""
    yield
    set_attention_backend("default")
    functorch_config.activation_memory_budget = 1.0
    torch._dynamo.reset()


def _loss_and_grads(overrides: list[str]) -> tuple[float, torch.Tensor, dict]:
    transformer, cfg, applied = tiny_lora_model(overrides)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate's mixed_precision=bf16 wraps around forward
        loss = training_step(transformer, tiny_batch(), cfg, torch.Generator().manual_seed(3))
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in lora_parameters(transformer)])
    return loss.item(), grads, applied


def test_fast_path_matches_the_eager_bf16_loss_and_lora_gradients() -> None:
    loss, grads, applied = _loss_and_grads(["speed.compile=none", "train.gradient_checkpointing=false"])
    assert applied == {"attention": "default"}
    fast_loss, fast_grads, fast = _loss_and_grads(
        [
            "speed.compile=blocks",
            "speed.attention_backend=cudnn",
            "train.gradient_checkpointing=true",
            "speed.checkpoint_fraction=0.5",
            "speed.activation_budget=0.5",
        ]  # fmt: skip
    )
    assert fast == {"attention": "cudnn", "checkpointed_blocks": 2, "compiled": True}
    assert grads.abs().max() > 0 and torch.isfinite(fast_grads).all()
    assert abs(fast_loss - loss) / abs(loss) < 1e-2
    assert (fast_grads - grads).norm() / grads.norm() < 1e-2


@pytest.mark.parametrize("fraction, recomputed", [(1.0, 4), (0.5, 2), (0.25, 1), (0.0, 0)])
def test_checkpoint_fraction_recomputes_that_many_blocks_in_backward(fraction: float, recomputed: int) -> None:
    transformer, _, applied = tiny_lora_model(
        ["speed.compile=none", "train.gradient_checkpointing=true", f"speed.checkpoint_fraction={fraction}"]
    )
    calls = []
    for block in transformer_blocks(transformer):
        block.register_forward_pre_hook(lambda module, args: calls.append(module))
    loss = training_step(transformer, tiny_batch(), load_config(None, BASE), torch.Generator().manual_seed(3))
    assert len(calls) == 4  # forward: every block once
    loss.backward()
    assert len(calls) - 4 == recomputed == applied["checkpointed_blocks"]  # backward: the checkpointed ones again


def test_contiguous_grad_hands_sdpa_a_dense_gradient_where_a_concat_slices_it() -> None:
    """A single block concatenates attention and MLP outputs: the attention's gradient is then a strided slice."""
    attention_out = torch.randn(1, 6, 8, requires_grad=True)
    seen = {}
    attention_out.register_hook(lambda grad: seen.update(plain=grad.is_contiguous()))
    torch.cat([attention_out, torch.randn(1, 6, 32)], dim=2).sum().backward()
    wrapped = torch.randn(1, 6, 8, requires_grad=True)
    wrapped.register_hook(lambda grad: seen.update(wrapped=grad.is_contiguous()))
    torch.cat([_ContiguousGrad.apply(wrapped), torch.randn(1, 6, 32)], dim=2).sum().backward()
    assert seen == {"plain": False, "wrapped": True}
    assert torch.equal(wrapped.grad, torch.ones(1, 6, 8))


@pytest.mark.parametrize(
    "override, message",
    [
        ("speed.checkpoint_fraction=1.5", "speed.checkpoint_fraction`: must be in [0, 1]"),
        ("speed.compile=on", "'True' is not one of auto, blocks, none (YAML reads on/off/yes/no as true/false)"),
        ("speed.attention_backend=cudn", "did you mean `cudnn`"),
    ],
)
def test_speed_keys_are_validated(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*BASE, override])
