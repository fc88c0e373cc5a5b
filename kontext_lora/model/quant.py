"""A quantized frozen base under the LoRA (`memory.base_quant`): fp8 or nf4 storage of the block linears.

The 57 repeated blocks hold almost all of FLUX.1's 12B parameters (22.4 GiB in bf16). `quantize_base` replaces
each frozen `nn.Linear` inside them (PEFT's `*.base_layer` and the linears the LoRA does not target) by a module
that stores the weight quantized and dequantizes it on the fly, in forward AND again in backward, so that autograd
never keeps a full-precision copy of a weight alive between the passes:

- fp8: float8 e4m3 weights with one fp32 scale per output channel (`Float8WeightLinear`): 1 byte a weight.
- nf4: 4-bit NormalFloat as torchao's `to_nf4` quantizes it (blocks of 64 with double-quantized scales;
  QLoRA's format, as torchtune uses it) (`NF4WeightLinear`): about 0.52 bytes a weight.

Called after `inject_lora` (PEFT never sees a quantized weight: at injection it casts new adapter weights to the
base weight's dtype when that is a float type, and float8 is one) and before `apply_speed` (compile last).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kontext_lora.config import ConfigError

FP8_MAX = 448.0  # the largest finite float8_e4m3fn value
NF4_BLOCK = 64  # weights per NF4 scale (torchao / QLoRA default)
NF4_SCALER_BLOCK = 256  # NF4 scales per second-level scale
NF4_GRANULE = NF4_BLOCK * NF4_SCALER_BLOCK  # a weight's element count must be a multiple of this for to_nf4
MODES = ("fp8", "nf4")


def _frozen(tensor: torch.Tensor) -> torch.nn.Parameter:
    """A frozen parameter rather than a buffer: DDP re-broadcasts buffers before every forward (`broadcast_buffers`),
    which for the quantized weights would send the whole model each step; parameters are synced once."""
    return torch.nn.Parameter(tensor, requires_grad=False)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear runs in: autocast's when it is on (accelerate's mixed precision), else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# The dequantizing matmuls are custom ops (opaque to torch.compile) with their own autograd formula. Why not plain
# ops in an autograd.Function: compiled, AOTAutograd's min-cut partitioner sees the cast of the weight and chose to
# SAVE the dequantized bf16 weight for backward (tests/model/test_quant.py::test_compiled_blocks_save_no_dequantized_
# weight failed that way), which undoes the savings; as opaque ops, forward saves only what `_save_quantized` saves
# and backward dequantizes again. And why not torchao's weight-only fp8
# (`Float8WeightOnlyConfig`, torchao 0.18): it dequantizes inside its `F.linear` override, above autograd, so backward
# keeps every layer's dequantized weight alive too (checked with saved_tensors_hooks).


FUSED_DEQUANT_DEVICES = {"cuda"}  # where dequant_kernels.py's Triton kernels dequantize, in one pass a weight


def _fp8_weight(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(out, in) e4m3 bits as uint8, (out,) fp32 row scales -> the (out, in) weight in `dtype`: multiplied in
    float32 and rounded once, by one Triton kernel on CUDA (the same bits: scripts/check_dequant.py)."""
    if qweight.device.type in FUSED_DEQUANT_DEVICES:
        from kontext_lora.model.dequant_kernels import fp8_dequantize_cuda

        return fp8_dequantize_cuda(qweight, scale, dtype)
    return (qweight.view(torch.float8_e4m3fn).float() * scale[:, None]).to(dtype)


@torch.library.custom_op("kontext_lora::fp8_linear", mutates_args=())
def _fp8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(..., in) -> (..., out): x @ (Q * scale)^T, Q the (out, in) e4m3 weight stored as uint8, scale (out,) fp32."""
    return F.linear(x, _fp8_weight(qweight, scale, x.dtype))


@_fp8_linear.register_fake
def _(x, qweight, scale):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("kontext_lora::fp8_linear_grad_input", mutates_args=())
def _fp8_linear_grad_input(grad_out: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(..., out) -> (..., in): the gradient w.r.t. the input of `_fp8_linear`."""
    return grad_out @ _fp8_weight(qweight, scale, grad_out.dtype)


@_fp8_linear_grad_input.register_fake
def _(grad_out, qweight, scale):
    return grad_out.new_empty((*grad_out.shape[:-1], qweight.shape[1]))


def _save_quantized(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[1:])  # the quantized weight's parts; never the input or a dequantized weight


def _fp8_backward(ctx, grad_out):
    return _fp8_linear_grad_input(grad_out, *ctx.saved_tensors), None, None  # the frozen weight gets no gradient


_fp8_linear.register_autograd(_fp8_backward, setup_context=_save_quantized)


# fp8 MATMULS on the stored weights (`speed.fp8_base` with `memory.base_quant: fp8`): instead of dequantizing the
# e4m3 weight to bf16 (a pass over the weight per call), the matmul reads it as it is stored, in fp8 on the tensor
# cores (torch._scaled_mm, row-wise scales: twice bf16's peak on Hopper). The activation is quantized per token
# (row-wise e4m3, in plain ops that the compiler fuses into whatever produced it); in backward the weight's row
# scales are folded into the incoming gradient, which is quantized per token the same way, and multiplied with the
# transposed e4m3 weight. Why not torchao's float8 training (`speed.fp8_base` on a bf16 base): it re-casts every
# bf16 weight to fp8 on each call (and its transpose in backward), every step, and it cannot start from weights
# already stored in fp8.
FP8_MATMUL_MULTIPLE = 16  # torch._scaled_mm needs both dimensions of the weight to be multiples of 16


def quantize_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (M, K) float8 e4m3, (M, 1) fp32 scales: one scale per row (token), amax / 448."""
    wide = tensor.float()
    scale = (wide.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (wide / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


@torch.library.custom_op("kontext_lora::fp8_matmul_grad_input", mutates_args=())
def _fp8_matmul_grad_input(
    grad_q: torch.Tensor, grad_scale: torch.Tensor, qweight: torch.Tensor, out_dtype: torch.dtype, fast_accum: bool
) -> torch.Tensor:
    """(M, out) e4m3 gradient with (M, 1) fp32 row scales, (out, in) uint8 e4m3 weight -> (M, in) in `out_dtype`;
    fast_accum: the tensor cores' fast accumulation (by default exact, as torchao's recipes keep the gradients).

    An opaque op because of the transpose: _scaled_mm wants its second operand contiguous along the reduced
    dimension (out), which the stored (out, in) weight is not; written as plain ops, the compiler's partitioner may
    move that transpose into forward and SAVE a transposed copy of every weight for backward (torchao's float8
    training had to force the recompute for the same reason). Here it is made per layer in backward and dropped.
    """
    if qweight.device.type in FUSED_DEQUANT_DEVICES:
        from kontext_lora.model.dequant_kernels import transpose_cuda

        weight_t = transpose_cuda(qweight).view(torch.float8_e4m3fn)  # (in, out), tiled: dequant_kernels.py says why
    else:
        weight_t = qweight.view(torch.float8_e4m3fn).t().contiguous()  # (in, out)
    ones = grad_scale.new_ones(1, weight_t.shape[0])  # the weight's row scales are already in the gradient
    return torch._scaled_mm(grad_q, weight_t.t(), grad_scale, ones, out_dtype=out_dtype, use_fast_accum=fast_accum)


@_fp8_matmul_grad_input.register_fake
def _(grad_q, grad_scale, qweight, out_dtype, fast_accum):
    return grad_q.new_empty((grad_q.shape[0], qweight.shape[1]), dtype=out_dtype)


class _Fp8Matmul(torch.autograd.Function):
    """(M, in) x -> (M, out) x @ (Q * scale)^T with both operands in e4m3 (x quantized per row here).

    The gradient passes the quantization straight through (d out / d x as if x were not rounded), as fp8 training
    recipes do; only the frozen weight's parts are saved, never x (the base weight gets no gradient)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, fast_accum_backward: bool = False
    ) -> torch.Tensor:
        x_q, x_scale = quantize_rows(x)
        ctx.save_for_backward(qweight, scale)
        ctx.dtype, ctx.fast_accum_backward = x.dtype, fast_accum_backward
        weight = qweight.view(torch.float8_e4m3fn).t()  # (in, out), column-major as _scaled_mm wants it
        # Fast accumulation in forward, as torchao's float8 recipes do; the input gradient accumulates exactly unless
        # speed.fp8_fast_accum_backward (faster, rounds the gradient more: docs/performance.md).
        return torch._scaled_mm(x_q, weight, x_scale, scale[None, :], out_dtype=x.dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qweight, scale = ctx.saved_tensors
        grad_q, grad_scale = quantize_rows(grad * scale)  # (M, out): the weight's row scales folded in
        return _fp8_matmul_grad_input(grad_q, grad_scale, qweight, ctx.dtype, ctx.fast_accum_backward), None, None, None


def use_fp8_matmuls(transformer: torch.nn.Module, fast_accum_backward: bool = False) -> int:
    """Make every fp8-stored linear (quantize_base "fp8") whose dimensions allow it multiply in fp8; returns how many.
    The others keep dequantizing. fast_accum_backward: the input-gradient matmuls accumulate in fast mode too."""
    count = 0
    for layer in transformer.modules():
        if isinstance(layer, Float8WeightLinear):
            dims = (layer.in_features, layer.out_features)
            layer.fp8_matmul = all(d % FP8_MATMUL_MULTIPLE == 0 for d in dims)
            layer.fast_accum_backward = fast_accum_backward
            count += layer.fp8_matmul
    return count


class Float8WeightLinear(torch.nn.Module):
    """A frozen linear with an e4m3 weight and per-output-channel scales; computes in the input / autocast dtype.

    The weight is kept as uint8 (its float8 bits), so `module.to(dtype)` casts cannot silently turn it back into a
    wide float.
    """

    def __init__(self, linear: torch.nn.Linear, device: torch.device | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to(device)  # (out, in)
        with torch.no_grad():
            qweight, scale = quantize_rows(weight)  # per output channel: a weight row is a "row" as a token is
        self.qweight = _frozen(qweight.view(torch.uint8))  # (out, in)
        self.scale = _frozen(scale.squeeze(1))  # (out,) fp32
        bias = linear.bias
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(device), requires_grad=False)
        self.fp8_matmul = False  # True: multiply in fp8 (`use_fp8_matmuls`); False: dequantize to the compute dtype
        self.fast_accum_backward = False  # with fp8_matmul: the input gradient's matmul accumulates in fast mode too

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight this layer computes with, in `dtype` (a new tensor)."""
        return _fp8_weight(self.qweight, self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.fp8_matmul and dtype == torch.bfloat16:  # row-wise _scaled_mm gives bf16 only; (..., in) -> (M, out)
            x2d = x.to(dtype).reshape(-1, self.in_features)
            out = _Fp8Matmul.apply(x2d, self.qweight, self.scale, self.fast_accum_backward)
            out = out.view(*x.shape[:-1], self.out_features)
        else:
            out = _fp8_linear(x.to(dtype), self.qweight, self.scale)  # (..., out)
        return out + bias if bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3 per-channel"


def _nf4_weight(
    data: torch.Tensor,
    scalers: torch.Tensor,
    factors: torch.Tensor,
    mean: torch.Tensor,
    lut: torch.Tensor,
    shape: tuple[int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantize NF4 (torchao's layout, see `NF4WeightLinear`) -> the (out, in) = `shape` weight in `dtype`.

    scalers (numel/64,) int8 block scales, double-quantized with factors (numel/64/256,) and mean (). On CUDA one
    Triton kernel does it all; elsewhere six eager kernels do; both compute in float32 and round once, and agree bit
    for bit (scripts/check_dequant.py on a GPU). torchao's `get_original_weight` rounds the scales to the
    model's dtype first: it differs by that rounding.
    """
    if data.device.type in FUSED_DEQUANT_DEVICES:
        from kontext_lora.model.dequant_kernels import nf4_dequantize_cuda

        return nf4_dequantize_cuda(data, scalers, factors, mean, lut, dtype).view(shape)
    block_scales = (scalers.view(factors.shape[0], -1) / factors.float()[:, None]).view(-1, 1) + mean.float()
    lut = lut.float()
    codes = torch.stack([lut[(data >> 4).int()], lut[(data & 15).int()]], dim=-1)  # (numel/2, 2): interleaved
    return (codes.view(block_scales.shape[0], -1) * block_scales).to(dtype).view(shape)  # rounded once


@torch.library.custom_op("kontext_lora::nf4_linear", mutates_args=())
def _nf4_linear(
    x: torch.Tensor,
    data: torch.Tensor,
    scalers: torch.Tensor,
    factors: torch.Tensor,
    mean: torch.Tensor,
    lut: torch.Tensor,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """(..., in) -> (..., out): x @ W^T with W dequantized from NF4 (see `_nf4_weight`) for this call only."""
    return F.linear(x, _nf4_weight(data, scalers, factors, mean, lut, (out_features, in_features), x.dtype))


@_nf4_linear.register_fake
def _(x, data, scalers, factors, mean, lut, out_features, in_features):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("kontext_lora::nf4_linear_grad_input", mutates_args=())
def _nf4_linear_grad_input(
    grad_out: torch.Tensor,
    data: torch.Tensor,
    scalers: torch.Tensor,
    factors: torch.Tensor,
    mean: torch.Tensor,
    lut: torch.Tensor,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """(..., out) -> (..., in): the gradient w.r.t. the input of `_nf4_linear`."""
    return grad_out @ _nf4_weight(data, scalers, factors, mean, lut, (out_features, in_features), grad_out.dtype)


@_nf4_linear_grad_input.register_fake
def _(grad_out, data, scalers, factors, mean, lut, out_features, in_features):
    return grad_out.new_empty((*grad_out.shape[:-1], in_features))


def _save_nf4(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[1:6])  # the NF4 parts only
    ctx.shape = inputs[6:]


def _nf4_backward(ctx, grad_out):
    return (_nf4_linear_grad_input(grad_out, *ctx.saved_tensors, *ctx.shape),) + (None,) * 7


_nf4_linear.register_autograd(_nf4_backward, setup_context=_save_nf4)


class NF4WeightLinear(torch.nn.Module):
    """A frozen linear with a 4-bit NormalFloat weight, quantized by torchao's `to_nf4` (QLoRA's double-quantized
    format, blocks of 64); computes in the input / autocast dtype.

    It keeps the NF4Tensor's plain inner tensors rather than the NF4Tensor: an NF4Tensor parameter inside a compiled
    Flux block fails in torch 2.13 ("output aliasing ... unsupported if there are any subclass outputs").
    """

    _PARTS = ("nf4_data", "nf4_scalers", "nf4_factors", "nf4_mean", "nf4_lut")

    def __init__(self, linear: torch.nn.Linear, device: torch.device | None = None):
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
        except ImportError:
            raise ImportError("memory.base_quant=nf4 needs torchao: pip install 'kontext-lora[memory]'") from None

        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        nf4 = to_nf4(linear.weight.detach().to(device).contiguous(), NF4_BLOCK, NF4_SCALER_BLOCK)  # (out, in)
        inner = (nf4.quantized_data, nf4.quantized_scalers, nf4.quantization_factor, nf4.scaler_mean, nf4.nf4)
        for name, tensor in zip(self._PARTS, inner, strict=True):
            setattr(self, name, _frozen(tensor))
        bias = linear.bias
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(device), requires_grad=False)

    def _parts(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self._PARTS)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight this layer computes with, in `dtype` (a new tensor)."""
        return _nf4_weight(*self._parts(), (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        out = _nf4_linear(x.to(dtype), *self._parts(), self.out_features, self.in_features)  # (..., out)
        return out + bias if bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block {NF4_BLOCK}"


QUANTIZED = (Float8WeightLinear, NF4WeightLinear)


def _frozen_block_linears(transformer: torch.nn.Module) -> list[tuple[int, torch.nn.Module, str]]:
    """(block index, parent, attribute) of every frozen nn.Linear inside the repeated blocks (adapter layers
    excluded); blocks are numbered double then single, as model/swap.py numbers them."""
    found = []
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    for index, block in enumerate(blocks):
        for parent in block.modules():
            for name, child in parent.named_children():
                if type(child) is torch.nn.Linear and not child.weight.requires_grad:
                    found.append((index, parent, name))
    return found


def quantize_base(
    transformer: torch.nn.Module,
    mode: str,
    device: torch.device | None = None,
    host_blocks: frozenset[int] = frozenset(),
) -> int:
    """Store the frozen linears of the transformer's repeated blocks in fp8 or nf4; returns how many were converted.

    Layer by layer: each bf16 weight is moved to `device` (when given), quantized there and dropped, so the device's
    peak is about the quantized model plus one layer, whether the model arrives on the CPU or already on the device.
    The fp8 layers of `host_blocks` (the blocks memory.block_swap will keep in CPU memory) go back to the CPU at
    once, so a base that fits the device only once swapped never has to be there whole (nf4 layers, whose tensor
    subclass the swap cannot take from the CPU, stay on the device until it swaps them). The rest of the model
    (embedders, norms, the LoRA) is moved to `device` at the end. nf4 needs a weight's element count to be a multiple
    of 64 * 256; layers that are not stay unquantized (counted in `quantization_report`).
    """
    if mode not in MODES:
        raise ConfigError(f"config key `memory.base_quant`: {mode!r} is not one of none, {', '.join(MODES)}")
    converted = kept = 0
    for index, parent, name in _frozen_block_linears(transformer):
        linear = getattr(parent, name)
        if mode == "nf4" and linear.weight.numel() % NF4_GRANULE:
            kept += 1
            linear.to(device)
            continue
        quantized = (Float8WeightLinear if mode == "fp8" else NF4WeightLinear)(linear, device)
        if index in host_blocks and mode == "fp8":
            quantized.to("cpu")
        setattr(parent, name, quantized)  # the bf16 Linear (and its weight) is freed once `linear` is rebound
        del linear, quantized
        converted += 1
    if device is not None:
        move_except_host_blocks(transformer, device, host_blocks if mode == "fp8" else frozenset())
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the freed bf16 weights back, so the reserved memory shows the quantized size
    transformer._kontext_base_quant = {"mode": mode, "linears": converted, "kept": kept}
    return converted


def move_except_host_blocks(transformer: torch.nn.Module, device: torch.device, host_blocks: frozenset[int]) -> None:
    """Move the transformer to `device`, except the frozen tensors of the blocks in `host_blocks` (their trainable
    LoRA parameters move too): those stay in CPU memory for memory.block_swap, which copies them in as they run."""
    if not host_blocks:
        transformer.to(device)
        return
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    host = {id(module) for index in host_blocks for module in blocks[index].modules()}
    for module in transformer.modules():
        keep_frozen = id(module) in host
        for name, param in module._parameters.items():
            if param is None or (keep_frozen and not param.requires_grad):
                continue
            moved = param.data.to(device)
            if torch._has_compatible_shallow_copy_type(param.data, moved):  # as Module._apply: same Parameter object
                param.data = moved
            else:
                module._parameters[name] = torch.nn.Parameter(moved, requires_grad=param.requires_grad)
        if not keep_frozen:
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)


def quantization_report(transformer: torch.nn.Module) -> dict[str, object] | None:
    """{"mode", "linears" converted, "kept" unquantized, "gib" of the quantized weights}, or None if not quantized."""
    report = getattr(transformer, "_kontext_base_quant", None)
    if report is None:
        return None
    return {**report, "gib": round(quantized_nbytes(transformer) / 2**30, 3)}


def quantized_nbytes(module: torch.nn.Module) -> int:
    """Bytes held by the quantized linears under `module`: weights and their scales (biases excluded)."""
    total = 0
    for layer in module.modules():
        if isinstance(layer, Float8WeightLinear):
            total += layer.qweight.nbytes + layer.scale.nbytes
        elif isinstance(layer, NF4WeightLinear):
            total += sum(t.nbytes for t in layer._parts())
    return total
