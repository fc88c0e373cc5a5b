"""The training fast path (speed.*) on the tiny Kontext transformer: same loss and LoRA gradients as eager bf16."""

from __future__ import annotations

import re

import pytest
import torch
import torch._dynamo
import torch._functorch.config as functorch_config
import torch._inductor.config

from kontext_lora.config import ConfigError, load_config
from kontext_lora.model.lora import lora_parameters
from kontext_lora.model.speed import (
    _ContiguousGrad,
    configure_compiler,
    fuse_lora_inputs,
    set_attention_backend,
    tag_attention_must_save,
    transformer_blocks,
)
from kontext_lora.train.loop import training_step
from tests.model.tiny_lora import BASE, tiny_batch, tiny_lora_model


@pytest.fixture(autouse=True)
def _restore_global_state():
    """apply_speed sets process-wide switches (SDPA kernels, the partitioner's budget, compiled code): undo them."""
    yield
    set_attention_backend("default")
    configure_compiler()
    torch._dynamo.reset()


def _step(transformer: torch.nn.Module, cfg) -> tuple[float, torch.Tensor]:
    """One training step of the tiny batch: (loss, the LoRA gradients flattened into one vector)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate's mixed_precision=bf16 wraps around forward
        loss = training_step(transformer, tiny_batch(), cfg, torch.Generator().manual_seed(3))
    loss.backward()
    return loss.item(), torch.cat([p.grad.float().flatten() for p in lora_parameters(transformer)])


def _loss_and_grads(overrides: list[str]) -> tuple[float, torch.Tensor, dict]:
    transformer, cfg, applied = tiny_lora_model(overrides)
    return *_step(transformer, cfg), applied


def _step_with_backend(backend) -> tuple[float, torch.Tensor]:
    """`_step` with the tiny model's blocks compiled by `backend` instead of apply_speed's inductor."""
    transformer, cfg, _ = tiny_lora_model(["speed.compile=none", "train.gradient_checkpointing=false"])
    transformer.compile_repeated_blocks(fullgraph=False, dynamic=False, backend=backend)
    try:
        return _step(transformer, cfg)
    finally:
        torch._dynamo.reset()


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
            "speed.keep_attention=true",
        ]  # fmt: skip
    )
    assert fast == {"attention": "cudnn", "checkpointed_blocks": 2, "compiled": True, "keep_attention": True}
    assert grads.abs().max() > 0 and torch.isfinite(fast_grads).all()
    assert abs(fast_loss - loss) / abs(loss) < 1e-2
    assert (fast_grads - grads).norm() / grads.norm() < 1e-2


def test_compiled_blocks_on_cudnn_keep_the_compile_cache_on() -> None:
    """The contiguous-gradient hooks (an autograd.Function) make AOTAutograd bypass its cache, so every run would
    compile from scratch: they are added for eager cuDNN only, where the backward needs them."""
    from torch._dynamo.utils import counters

    eager, _, applied = tiny_lora_model(["speed.compile=none", "speed.attention_backend=cudnn"])
    assert applied["attention"] == "cudnn" and len(eager._kontext_grad_hooks) == 4  # 2 double + 2 single blocks
    torch._dynamo.reset()  # an earlier test's compiled frames would otherwise be reused without AOTAutograd
    counters.clear()
    compiled, cfg, applied = tiny_lora_model(["speed.compile=blocks", "speed.attention_backend=cudnn"])
    assert applied["compiled"] and not hasattr(compiled, "_kontext_grad_hooks")
    loss, grads = _step(compiled, cfg)
    assert torch.isfinite(grads).all() and grads.abs().max() > 0
    assert counters["aot_autograd"]["autograd_cache_bypass"] == 0
    through_cache = counters["aot_autograd"]["autograd_cache_miss"] + counters["aot_autograd"]["autograd_cache_hit"]
    assert through_cache > 0  # the compiled blocks went through the cache (a hit when an earlier run filled it)


def _backward_graph_ops(keep_attention: bool, budget: float) -> tuple[list[str], float, torch.Tensor]:
    """Compile the tiny model's blocks through AOTAutograd's min-cut partitioner (as inductor does, without code
    generation), the attention tagged first if asked; returns the ops of the backward graphs, the loss, the grads."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    backward_ops: list[str] = []

    def partition(graph_module, inputs, **kwargs):
        if keep_attention:
            assert tag_attention_must_save(graph_module.graph) == 1  # one attention a block
        return min_cut_rematerialization_partition(graph_module, inputs, **kwargs)

    def backward_compiler(graph_module, inputs):
        backward_ops.extend(str(n.target) for n in graph_module.graph.nodes if n.op == "call_function")
        return make_boxed_func(graph_module.forward)

    backend = aot_autograd(
        fw_compiler=lambda graph_module, _: make_boxed_func(graph_module.forward),
        bw_compiler=backward_compiler,
        partition_fn=partition,
    )
    functorch_config.activation_memory_budget = budget
    return backward_ops, *_step_with_backend(backend)


def test_keep_attention_stops_the_budgeted_partitioner_recomputing_the_attention() -> None:
    """Under a small activation budget the partitioner recomputes the attention forward in backward (on a GPU, the
    most expensive kernel of the step run twice); tagged MUST_SAVE, backward runs only the attention's own backward."""
    forward_attention = re.compile(r"_scaled_dot_product_\w*attention\w*(?<!backward)\.default$")
    free_ops, free_loss, free_grads = _backward_graph_ops(keep_attention=False, budget=0.1)
    kept_ops, kept_loss, kept_grads = _backward_graph_ops(keep_attention=True, budget=0.1)
    assert [op for op in free_ops if forward_attention.search(op)]  # recomputed: the case the tag exists for
    assert not [op for op in kept_ops if forward_attention.search(op)]
    assert [op for op in kept_ops if "attention" in op and "backward" in op]
    assert kept_loss == free_loss and torch.equal(kept_grads, free_grads)  # the same numbers, computed once


def test_keep_attention_through_apply_speed_runs_no_attention_forward_in_backward() -> None:
    """The same through inductor as training compiles it: under budget 0.1, which recomputes the attention forward
    without the tag (above), the backward pass of the compiled blocks calls only the attention's backward kernel."""
    transformer, cfg, applied = tiny_lora_model(
        [
            "speed.compile=blocks",
            "train.gradient_checkpointing=false",
            "speed.activation_budget=0.1",
            "speed.keep_attention=true",
        ]
    )
    assert applied["keep_attention"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = training_step(transformer, tiny_batch(), cfg, torch.Generator().manual_seed(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    ops = [event.name for event in prof.events() if "scaled_dot_product" in event.name]
    assert [op for op in ops if op.endswith("_backward")]  # the attention's backward ran, in the profiled pass
    assert not [op for op in ops if not op.endswith("_backward")]


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
        ("speed.cuda_graphs=true speed.compile=none", "speed.cuda_graphs`: needs speed.compile=blocks or auto"),
        ("speed.cuda_graphs=true train.gradient_accumulation=2", "and train.gradient_accumulation=1"),
        ("speed.cuda_graphs=true memory.block_swap=2", "does not combine with memory.block_swap > 0"),
    ],
)
def test_speed_keys_are_validated(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*BASE, *override.split()])


def test_cuda_graphs_mark_each_step_and_switch_inductor_on_cuda_only() -> None:
    """On CPU the option compiles as without it (inductor would skip graphs there anyway); every training step
    starts a new cudagraph-tree generation, so one step's graph outputs may be overwritten by the next step."""
    from torch._inductor import cudagraph_trees

    transformer, cfg, applied = tiny_lora_model(["speed.compile=blocks", "speed.cuda_graphs=true"])
    assert applied["compiled"] and "cuda_graphs" not in applied
    before = cudagraph_trees.MarkStepBox.mark_step_counter
    with torch.autocast("cpu", dtype=torch.bfloat16):
        training_step(transformer, tiny_batch(), cfg, torch.Generator().manual_seed(3)).backward()
    assert cudagraph_trees.MarkStepBox.mark_step_counter == before - 1  # mark_step_begin counts down


def test_apply_speed_refuses_cuda_graphs_with_a_block_swap_the_planner_chose() -> None:
    from kontext_lora.model.speed import apply_speed

    cfg = load_config(None, [*BASE, "speed.cuda_graphs=true"])  # valid as loaded: no swap asked for
    with pytest.raises(ConfigError, match="does not combine with memory.block_swap"):
        apply_speed(torch.nn.Linear(2, 2), cfg.speed, False, torch.device("cpu"), block_swap=2)


def test_fp8_base_names_the_key_on_a_gpu_without_fp8_tensor_cores(monkeypatch) -> None:
    from kontext_lora.model.speed import apply_speed

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    cfg = load_config(None, [*BASE, "speed.fp8_base=true"])
    with pytest.raises(ConfigError, match=re.escape("speed.fp8_base`: needs a GPU with fp8 tensor cores")) as error:
        apply_speed(torch.nn.Linear(2, 2), cfg.speed, False, torch.device("cuda"))
    assert "A100-SXM4-80GB is 8.0" in str(error.value)


def _fused_lora_run(fuse: bool) -> tuple[float, torch.Tensor, int, list[int]]:
    """The tiny model's blocks compiled through AOTAutograd (no code generation), `fuse_lora_inputs` applied to each
    dynamo graph first if asked; returns the loss, the LoRA grads, the groups merged, and each graph's linear count."""
    from torch._dynamo.backends.debugging import aot_eager_decomp_partition

    merged, linears = [0], []

    def backend(graph_module, inputs):
        if fuse:
            merged[0] += fuse_lora_inputs(graph_module.graph)
            graph_module.recompile()
        linears.append(sum(n.target is torch._C._nn.linear for n in graph_module.graph.nodes))
        return aot_eager_decomp_partition(graph_module, inputs)

    loss, grads = _step_with_backend(backend)
    return loss, grads, merged[0], linears


def test_fuse_lora_inputs_merges_the_adapters_sharing_an_input_and_keeps_the_numbers() -> None:
    """A double block's graph has two groups (q, k, v of the image stream and of the text stream: 4 linears fewer),
    a single block's one (q, k, v and proj_mlp read the same normed input: 3 fewer). The loss and every LoRA
    gradient stay those of the unmerged graphs. (The first block of each kind is compiled twice: its input needs no
    gradient, the others' do: 4 graphs.)"""
    loss, grads, merged, linears = _fused_lora_run(fuse=False)  # lora.preset's default: attention_mlp
    fused_loss, fused_grads, fused_merged, fused_linears = _fused_lora_run(fuse=True)
    fewer = [a - b for a, b in zip(linears, fused_linears, strict=True)]
    assert merged == 0 and sorted(fewer) == [3, 3, 4, 4]
    assert fused_merged == sum(2 if n == 4 else 1 for n in fewer) == 6
    assert grads.abs().max() > 0
    assert abs(fused_loss - loss) / abs(loss) < 1e-3
    assert (fused_grads - grads).norm() / grads.norm() < 1e-2


def test_fuse_lora_inputs_runs_in_inductor_through_apply_speed() -> None:
    """speed.fuse_lora_inputs=true: apply_speed registers the pre-grad pass, inductor runs it on each block graph
    (6 groups merged over the 4 graphs, as above), and the compiled model's loss and gradients match eager bf16.
    speed.tune_kernels=true rides along: it tunes Triton kernels only, so on CPU it is applied and changes nothing."""
    from torch._dynamo.utils import counters

    loss, grads, _ = _loss_and_grads(["speed.compile=none", "train.gradient_checkpointing=false"])
    counters["inductor"].pop("kontext_lora_fused_lora_groups", None)
    # Compiled afresh: on a cache hit inductor reuses the code the pass shaped without running the pass again.
    with torch._inductor.config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        fused_loss, fused_grads, applied = _loss_and_grads(
            [
                "speed.compile=blocks",
                "train.gradient_checkpointing=false",
                "speed.fuse_lora_inputs=true",
                "speed.tune_kernels=true",
            ]
        )
    assert applied["fuse_lora_inputs"] is applied["tune_kernels"] is True
    assert counters["inductor"]["kontext_lora_fused_lora_groups"] == 6  # the pass ran on every block graph
    assert abs(fused_loss - loss) / abs(loss) < 1e-2
    assert (fused_grads - grads).norm() / grads.norm() < 1e-2


def test_graph_passes_pickle_so_inductor_caches_can_key_on_them() -> None:
    """Inductor's FX graph cache pickles the custom passes it finds in its key; a pass that does not pickle (a local
    class) bypassed the cache, so every run compiled from scratch. Each pass pickles and keeps its uuid."""
    import pickle

    from kontext_lora.model.speed import fuse_lora_inputs_pass, keep_attention_pass

    for graph_pass in (keep_attention_pass(), fuse_lora_inputs_pass()):
        assert pickle.loads(pickle.dumps(graph_pass)).uuid() == graph_pass.uuid()
