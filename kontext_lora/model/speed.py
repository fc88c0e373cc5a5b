"""The training fast path: attention kernel, regional compilation, partial checkpointing, float8 base matmuls.

Each option is one config key (`speed.*`) and one function here; `apply_speed` applies them in the order that
matters (LoRA injected first, compile last). scripts/bench_step.py measures what each one buys.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils.checkpoint import checkpoint

from kontext_lora.config import CUDA_GRAPHS_WITH_SWAP, Config, ConfigError, SpeedConfig
from kontext_lora.model.quant import move_except_host_blocks, quantization_report, quantize_base, use_fp8_matmuls
from kontext_lora.model.swap import enable_block_swap, is_swapped, swapped_block_indices, swapped_bytes

# PyTorch's SDPA kernels, switched process-wide (see `set_attention_backend`).
_SDPA_FLAGS = {
    "flash": "enable_flash_sdp",
    "efficient": "enable_mem_efficient_sdp",
    "cudnn": "enable_cudnn_sdp",
    "math": "enable_math_sdp",
}


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """`auto` -> cuDNN on Hopper or newer CUDA GPUs (about 2x flash at Kontext's sequence lengths), else PyTorch's
    own choice; any other name is returned as is."""
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return "cudnn"
    return "default"


def set_attention_backend(name: str) -> None:
    """Allow only the named SDPA kernel (plus math as the fallback for shapes it refuses), process-wide.

    Process-wide flags rather than a `sdpa_kernel(...)` context around the forward: the backward of a checkpointed
    block recomputes the forward outside any such context, and must pick the kernel the forward picked.
    """
    if name == "default":
        for flag in _SDPA_FLAGS.values():
            getattr(torch.backends.cuda, flag)(True)
        return
    for kernel, flag in _SDPA_FLAGS.items():
        getattr(torch.backends.cuda, flag)(kernel in (name, "math"))


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; backward hands on the incoming gradient made contiguous."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _contiguous_grad_hook(module: torch.nn.Module, args, output):
    if isinstance(output, torch.Tensor):
        return _ContiguousGrad.apply(output)
    if isinstance(output, tuple):
        return tuple(_ContiguousGrad.apply(t) if isinstance(t, torch.Tensor) else t for t in output)
    return output


def contiguous_attention_grads(transformer: torch.nn.Module) -> list:
    """Make the gradient reaching every attention module's output contiguous; returns the hook handles.

    Why: in eager mode cuDNN's attention backward crashed inside the full Flux model with an illegal memory access
    (PyTorch 2.11, cuDNN 9.19, H200; also with diffusers' `_native_cudnn` backend). A single block concatenates the
    attention output with the MLP branch, so the gradient flowing back into SDPA is a strided slice (row stride
    5 * 3072, not 3072); with it made contiguous the full model trains on cuDNN and matches flash (docs/performance.md).
    Compiled blocks do not need it. The copy is one (tokens x 3072) tensor per single block.
    """
    return [
        module.register_forward_hook(_contiguous_grad_hook)
        for module in transformer.modules()
        if type(module).__name__ in ("FluxAttention", "Attention") and hasattr(module, "processor")
    ]


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks in execution order: 19 double then 38 single blocks in FLUX.1 (2 + 2 in the tiny model)."""
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def spread_indices(count: int, fraction: float) -> list[int]:
    """`fraction` of `count` indices (rounded up), spread evenly from index 0."""
    chosen = min(count, math.ceil(fraction * count - 1e-9))
    return sorted({int(i * count / chosen) for i in range(chosen)}) if chosen else []


def checkpointed_blocks(transformer: torch.nn.Module, fraction: float) -> list[int]:
    """Indices of the blocks to recompute in backward: `fraction` of them, spread evenly over the depth."""
    return spread_indices(len(transformer_blocks(transformer)), fraction)


def enable_checkpointing(transformer: torch.nn.Module, fraction: float = 1.0) -> list[int]:
    """Checkpoint `fraction` of the blocks through diffusers' own hook; returns the indices checkpointed.

    diffusers calls the hook for every block when checkpointing is on; ours recomputes only the chosen blocks and runs
    the others normally, which trades memory for speed in steps of one block. Swapped blocks (model/swap.py)
    checkpoint themselves, whatever the fraction: they are counted in, and called plainly here.
    """
    blocks = transformer_blocks(transformer)
    swapped = {i for i, block in enumerate(blocks) if is_swapped(block)}
    indices = sorted(set(checkpointed_blocks(transformer, fraction)) | swapped)
    chosen = {id(blocks[i]) for i in indices if i not in swapped}

    def some_blocks(block: torch.nn.Module, *args):
        if id(block) in chosen:
            return checkpoint(block.__call__, *fsdp_cast_inputs(block, args), use_reentrant=False)
        return block(*args)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=some_blocks)
    return indices


def fsdp_cast_inputs(block: torch.nn.Module, args: tuple) -> tuple:
    """Cast a block's floating inputs to its FSDP2 compute dtype (`MixedPrecisionPolicy.param_dtype`), as FSDP's
    own pre-forward hook does; other blocks' inputs are returned as they are.

    Why: the checkpoint recompute in backward calls the block again, and FSDP2 in PyTorch 2.11 skips its input cast
    during backward, so the recomputed tensors come out float32 where the forward's were bfloat16 and checkpoint
    refuses them (configs/accelerate/fsdp2_2gpu.yaml with checkpointing). Casting before the checkpoint makes both
    passes see the same inputs; FSDP's own cast is then a no-op.
    """
    get_state = getattr(block, "_get_fsdp_state", None)  # set on modules that fully_shard wrapped
    policy = getattr(get_state(), "_mp_policy", None) if get_state is not None else None
    dtype = getattr(policy, "param_dtype", None) if getattr(policy, "cast_forward_inputs", False) else None
    if dtype is None:
        return args

    def cast(value):
        return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    return tuple(torch.utils._pytree.tree_map(cast, args))


def compile_blocks(
    transformer: torch.nn.Module,
    activation_budget: float = 1.0,
    keep_attention: bool = False,
    cuda_graphs: bool = False,
    fuse_lora: bool = False,
    tune_kernels: bool = False,
) -> None:
    """torch.compile each repeated block (diffusers' regional compilation): one compile per block class, reused.

    activation_budget < 1 asks the compiler's partitioner to keep only that fraction of each block's activations
    for backward and recompute the cheapest rest (selective checkpointing decided by the compiler); keep_attention
    bans the attention forward from that recompute (`tag_attention_must_save`). cuda_graphs: inductor records each
    block's forward and backward as CUDA graphs and replays them (what torch.compile's mode="reduce-overhead" sets);
    each block has its own parameters, so each is recorded once (cudagraph trees re-record per static-input set).
    The training step marks each step's start (`training_step`). fuse_lora: `fuse_lora_inputs` on each block's graph.
    tune_kernels: inductor's coordinate-descent search over each Triton kernel's block sizes, timed on the device at
    compile time (about 1% of a 1024^2 step for minutes more of compiling at the first step: docs/performance.md).
    """
    configure_compiler(activation_budget, keep_attention, cuda_graphs, fuse_lora, tune_kernels)
    transformer.compile_repeated_blocks(fullgraph=False, dynamic=False)


def configure_compiler(
    activation_budget: float = 1.0,
    keep_attention: bool = False,
    cuda_graphs: bool = False,
    fuse_lora: bool = False,
    tune_kernels: bool = False,
) -> None:
    """Set the process-wide compiler switches that `compile_blocks` documents; called with no arguments, turn them
    all off (budget 1.0: keep every activation)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    # A private knob, but the only switch for the min-cut partitioner's memory budget (PyTorch 2.4+).
    functorch_config.activation_memory_budget = activation_budget
    inductor_config.joint_custom_pre_pass = keep_attention_pass() if keep_attention else None
    inductor_config.triton.cudagraphs = cuda_graphs
    inductor_config.pre_grad_custom_pass = fuse_lora_inputs_pass() if fuse_lora else None
    inductor_config.coordinate_descent_tuning = tune_kernels


ATTENTION_OPS = (
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)


def tag_attention_must_save(graph: torch.fx.Graph) -> int:
    """Mark every attention forward in a joint forward+backward graph MUST_SAVE (never recomputed); returns how many.

    Why (speed.keep_attention): under an activation budget the min-cut partitioner chooses to recompute the attention
    forward in backward (cuDNN's attention forward then runs twice a step), where
    recomputing the matmuls or the elementwise work would free as much memory for less time. A MUST_SAVE op is
    banned from recomputation, so the budget is met by the rest. torch.utils.checkpoint's selective policies set
    the same tag, but only inside a checkpoint region, which regional compilation does not give.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    marked = 0
    for node in graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] in ATTENTION_OPS:
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            marked += 1
    return marked


class _KeepAttentionPass(CustomGraphPass):
    """Inductor joint-graph pass: `tag_attention_must_save`. Module-level (not a local class) so inductor's FX graph
    cache can pickle it into its key: a local class made every compile miss the cache."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        tag_attention_must_save(graph)

    def uuid(self) -> str:
        return "kontext_lora.keep_attention.v1"


class _FuseLoraInputsPass(CustomGraphPass):
    """Inductor pre-grad pass: `fuse_lora_inputs`, counting merged groups in dynamo's counters. Module-level for the
    same reason as `_KeepAttentionPass`."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        from torch._dynamo.utils import counters

        counters["inductor"]["kontext_lora_fused_lora_groups"] += fuse_lora_inputs(graph)

    def uuid(self) -> str:
        return "kontext_lora.fuse_lora_inputs.v1"


def keep_attention_pass():
    """The inductor joint-graph pass that runs `tag_attention_must_save` before partitioning."""
    return _KeepAttentionPass()


LORA_FUSE_MAX_RANK = 128  # linears with more outputs than this are not LoRA down-projections: never concatenated
# Where dynamo's graph switches autocast or grad mode: linears on either side of one are never fused together.
_MODE_SWITCHES = (torch.amp.autocast_mode._enter_autocast, torch.amp.autocast_mode._exit_autocast,
                  torch._C._set_grad_enabled)  # fmt: skip


def _is_lora_down(node: torch.fx.Node) -> bool:
    """A bias-free `linear(x, A)` whose weight is trainable with at most LORA_FUSE_MAX_RANK rows: a LoRA A."""
    if node.op != "call_function" or node.target is not torch._C._nn.linear or len(node.args) < 2:
        return False
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    weight = getattr(node.args[1], "meta", {}).get("example_value")
    return (
        bias is None
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.requires_grad
        and weight.shape[0] <= LORA_FUSE_MAX_RANK
    )


def _cast_source(node: object) -> tuple[object, object]:
    """(tensor, dtype) when `node` is `tensor.to(dtype)` (PEFT casts the input to the adapter's dtype per adapter),
    else (node, None): two adapters whose inputs give the same pair read the same values."""
    if isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target == "to":
        args, kwargs = node.args, node.kwargs
        if len(args) == 1 and set(kwargs) == {"dtype"}:
            return args[0], kwargs["dtype"]
        if len(args) == 2 and isinstance(args[1], torch.dtype) and not kwargs:
            return args[0], args[1]
    return node, None


def fuse_lora_inputs(graph: torch.fx.Graph) -> int:
    """Merge the LoRA down-projections that read the same input into one matmul; returns how many groups merged.

    linear(x, A_q), linear(x, A_k), linear(x, A_v) -> split(linear(x, cat([A_q, A_k, A_v])), ranks). A dynamo graph
    pass (before autograd), so backward follows: one matmul for the input's gradient instead of one per adapter plus
    their sum, and one for the A gradients, each reading x once. Why: in a Flux single block q, k, v and proj_mlp
    share their input, in a double block q, k, v do per stream, and at 1024^2 each LoRA matmul is memory-bound on
    reading or writing an (8704, 3072) activation (docs/performance.md). Inductor's own `batch_linear_lhs` fusion
    does this for 2-D inputs only; the blocks' are 3-D.
    """
    region, groups = 0, {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _MODE_SWITCHES:
            region += 1
        elif _is_lora_down(node):
            groups.setdefault((region, *_cast_source(node.args[0])), []).append(node)
    merged = 0
    for members in (group for group in groups.values() if len(group) > 1):
        weights = [member.args[1] for member in members]
        ranks = [weight.meta["example_value"].shape[0] for weight in weights]
        with graph.inserting_before(members[0]):
            stacked = graph.call_function(torch.cat, (weights,), {"dim": 0})  # (sum of ranks, in)
            stacked.meta["example_value"] = torch.cat([w.meta["example_value"] for w in weights], dim=0)
            fused = graph.call_function(torch._C._nn.linear, (members[0].args[0], stacked))  # (..., sum of ranks)
            fused.meta["example_value"] = torch.cat([m.meta["example_value"] for m in members], dim=-1)
            parts = graph.call_function(torch.split, (fused, ranks), {"dim": -1})
            parts.meta["example_value"] = tuple(m.meta["example_value"] for m in members)
            for index, member in enumerate(members):
                part = graph.call_function(operator.getitem, (parts, index))
                part.meta["example_value"] = member.meta["example_value"]
                member.replace_all_uses_with(part)
        for member in members:
            cast = member.args[0]
            graph.erase_node(member)
            if isinstance(cast, torch.fx.Node) and not cast.users and _cast_source(cast)[1] is not None:
                graph.erase_node(cast)  # another adapter's copy of the same cast, now unused
        merged += 1
    return merged


def fuse_lora_inputs_pass():
    """The inductor pre-grad pass that runs `fuse_lora_inputs` and counts the merged groups in dynamo's counters
    (`counters["inductor"]["kontext_lora_fused_lora_groups"]`: whether it applied, for bench_step.py). With a uuid,
    inductor's caches key on it; a cache hit reuses the merged code without running the pass (the count stays 0)."""
    return _FuseLoraInputsPass()


def float8_base_layers(transformer: torch.nn.Module) -> int:
    """Swap the frozen base linears under the LoRA layers for torchao Float8Linear (fp8 e4m3 matmuls, dynamic
    per-tensor scales); returns how many were swapped. Needs a GPU with fp8 tensor cores (sm_89+) and torchao."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise ImportError("speed.fp8_base needs torchao (pip install torchao)") from None

    swapped = []

    def is_base_layer(module: torch.nn.Module, name: str) -> bool:
        # Only the frozen weights under LoRA; dims must be multiples of 16 for the fp8 GEMM.
        ok = name.endswith("base_layer") and isinstance(module, torch.nn.Linear)
        ok = ok and module.in_features % 16 == 0 and module.out_features % 16 == 0
        if ok:
            swapped.append(name)
        return ok

    convert_to_float8_training(transformer, config=Float8LinearConfig(), module_filter_fn=is_base_layer)
    return len(swapped)


FP8_MIN_CAPABILITY = (8, 9)  # compute capability with fp8 tensor cores (Ada, Hopper and newer): speed.fp8_base


def apply_speed(
    transformer: torch.nn.Module,
    cfg: SpeedConfig,
    gradient_checkpointing: bool,
    device: torch.device,
    block_swap: int = 0,
) -> dict[str, object]:
    """Apply the `speed.*` options (and `memory.block_swap`: that many blocks swapped, see model/swap.py) to a
    transformer whose LoRA is already injected (and base quantized); returns what was applied."""
    if cfg.cuda_graphs and block_swap:  # also checked at load; here for a block swap the planner chose
        raise ConfigError(CUDA_GRAPHS_WITH_SWAP)
    capability = torch.cuda.get_device_capability(device) if cfg.fp8_base and device.type == "cuda" else None
    if capability is not None and capability < FP8_MIN_CAPABILITY:
        major, minor = capability
        raise ConfigError(
            f"config key `speed.fp8_base`: needs a GPU with fp8 tensor cores (compute capability 8.9+: Ada, Hopper or "
            f"newer); {torch.cuda.get_device_name(device)} is {major}.{minor}"
        )
    applied: dict[str, object] = {}
    backend = resolve_attention_backend(cfg.attention_backend, device)
    set_attention_backend(backend)
    applied["attention"] = backend
    compiling = _wants_compile(cfg.compile, device)
    if backend == "cudnn" and not compiling:
        # Compiled blocks do not need the hooks, and their autograd.Function would turn AOTAutograd's cache off
        # ("Unsupported call_function target autograd_function_apply"): every run would compile from scratch.
        transformer._kontext_grad_hooks = contiguous_attention_grads(transformer)
    if cfg.fp8_base and (quantization_report(transformer) or {}).get("mode") == "fp8":
        # the stored e4m3 weights, multiplied in fp8
        applied["fp8_matmul_layers"] = use_fp8_matmuls(transformer, cfg.fp8_fast_accum_backward)
    elif cfg.fp8_base:
        applied["fp8_layers"] = float8_base_layers(transformer)
    if block_swap:  # after fp8_base (new modules), before checkpointing and compile; always checkpointed
        applied["swapped_blocks"] = enable_block_swap(transformer, block_swap, device)
        applied["swapped_gib"] = round(swapped_bytes(transformer) / 2**30, 3)
    if gradient_checkpointing or block_swap:
        fraction = cfg.checkpoint_fraction if gradient_checkpointing else 0.0
        applied["checkpointed_blocks"] = len(enable_checkpointing(transformer, fraction))
    if compiling:
        cuda_graphs = cfg.cuda_graphs and device.type == "cuda"
        compile_blocks(
            transformer, cfg.activation_budget, cfg.keep_attention, cuda_graphs, cfg.fuse_lora_inputs, cfg.tune_kernels
        )
        applied["compiled"] = True
        if cfg.keep_attention:
            applied["keep_attention"] = True
        if cuda_graphs:
            applied["cuda_graphs"] = True
        if cfg.fuse_lora_inputs:
            applied["fuse_lora_inputs"] = True
        if cfg.tune_kernels:
            applied["tune_kernels"] = True
    return applied


@contextmanager
def validation_mode(release_compiled: bool = False) -> Iterator[None]:
    """Run the compiled blocks eagerly inside the block (validation sampling and its held-out loss).

    Why: sampling calls the blocks without gradients and at other shapes than training, so through the compiled
    code each call recompiled (until dynamo's recompile limit) and, with speed.cuda_graphs, recorded CUDA graphs with
    memory pools of their own on top of training's. `release_compiled` (the last validation: no step follows) first
    drops the compiled code and its CUDA-graph pools, handing their memory to sampling.
    """
    if release_compiled:
        torch._dynamo.reset()  # also frees inductor's cudagraph trees and their private memory pools
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    with torch.compiler.set_stance("force_eager"):
        yield


def _wants_compile(setting: str, device: torch.device) -> bool:
    return setting == "blocks" or (setting == "auto" and device.type == "cuda")


def apply_memory_and_speed(transformer: torch.nn.Module, cfg: Config, device: torch.device) -> dict[str, object]:
    """`memory.base_quant` (quantize_base), then the `speed.*` options and `memory.block_swap` (apply_speed), in the
    order training needs: after inject_lora (PEFT must see the float weights), compile last. Returns apply_speed's
    record. fit() and the benchmark scripts all set a model up through this one function.

    A transformer that arrives on the CPU reaches the device block by block: the blocks memory.block_swap will swap
    keep their frozen weights in CPU memory throughout, so the device never holds more than the resident model.
    """
    swap = cfg.memory.block_swap
    host_blocks = frozenset(swapped_block_indices(swap, len(transformer_blocks(transformer)))) if swap else frozenset()
    if cfg.memory.base_quant != "none":
        quantize_base(transformer, cfg.memory.base_quant, device, host_blocks)
    else:
        move_except_host_blocks(transformer, device, host_blocks)
    return apply_speed(transformer, cfg.speed, cfg.train.gradient_checkpointing, device, swap)
