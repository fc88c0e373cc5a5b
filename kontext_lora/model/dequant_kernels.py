"""Triton kernels for the frozen quantized weights of quant.py on CUDA: NF4 and fp8 dequantization, one pass each,
and the fp8 weight's transpose for the fp8 matmul's backward.

Why by hand. NF4: eager PyTorch needs six kernels with int32 and float intermediates several times the weight's
size, about twenty times the time of one pass (scripts/check_dequant.py compares them per layer); a
torch.compile'd dequantization, called from inside quant.py's opaque custom ops, costs more in per-call overhead
(guards and wrappers, about 1500 calls a step) than it saves. torchao's NF4Tensor dequantizes eagerly, and
bitsandbytes has another layout. fp8: eager, the cast and the row scale are two kernels, and scaling the matmul's
output instead reads and writes every activation once more. The transpose: PyTorch's `.t().contiguous()` of a uint8
matrix runs as a strided elementwise copy far below the memory bandwidth; tiles through shared memory reach it.
Triton is imported only when a kernel first runs, so CPU-only installs never need it.
"""

from __future__ import annotations

import functools

import torch

BYTES_PER_PROGRAM = 1024  # 2048 NF4 weights a program
FP8_PER_PROGRAM = 2048


@functools.cache
def _nf4_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequant(data, scalers, factors, mean, lut, out, n_bytes, BLOCK: tl.constexpr):
        # Byte i holds weights 2i (high nibble) and 2i+1; a scale covers 64 weights (32 bytes), a factor 256 scales.
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # byte indices
        mask = offsets < n_bytes
        byte = tl.load(data + offsets, mask=mask, other=0).to(tl.int32)
        block = offsets // 32
        scaler = tl.load(scalers + block, mask=mask, other=0).to(tl.float32)
        factor = tl.load(factors + block // 256, mask=mask, other=1).to(tl.float32)
        scale = tl.div_rn(scaler, factor) + tl.load(mean).to(tl.float32)  # IEEE division, as the eager path does
        high = tl.load(lut + (byte >> 4)).to(tl.float32) * scale
        low = tl.load(lut + (byte & 15)).to(tl.float32) * scale
        weights = tl.interleave(high, low).to(out.dtype.element_ty)  # (2 * BLOCK,): rounded once, to nearest even
        out_offsets = tl.program_id(0) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
        tl.store(out + out_offsets, weights, mask=out_offsets < 2 * n_bytes)

    return nf4_dequant


def nf4_dequantize_cuda(
    data: torch.Tensor,
    scalers: torch.Tensor,
    factors: torch.Tensor,
    mean: torch.Tensor,
    lut: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(numel/2,) uint8 codes, (numel/64,) int8 scalers, (numel/16384,) factors, () mean, (16,) lut -> (numel,) in
    `dtype`, equal bit for bit to the eager path of quant.py's `_nf4_weight` (float32 throughout, rounded once)."""
    out = torch.empty(2 * data.numel(), dtype=dtype, device=data.device)
    grid = (-(-data.numel() // BYTES_PER_PROGRAM),)
    _nf4_kernel()[grid](data, scalers, factors, mean, lut, out, data.numel(), BLOCK=BYTES_PER_PROGRAM)
    return out


@functools.cache
def _fp8_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def fp8_dequant(qweight, scale, out, n_elements, columns, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        q = tl.load(qweight + offsets, mask=mask, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        row_scale = tl.load(scale + offsets // columns, mask=mask, other=0.0)
        tl.store(out + offsets, (q * row_scale).to(out.dtype.element_ty), mask=mask)  # rounded once

    return fp8_dequant


def fp8_dequantize_cuda(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(out, in) uint8 e4m3 bits, (out,) fp32 row scales -> (out, in) in `dtype`: e4m3 x scale in float32, rounded
    once, equal bit for bit to quant.py's eager `_fp8_weight`."""
    out = torch.empty(qweight.shape, dtype=dtype, device=qweight.device)
    grid = (-(-qweight.numel() // FP8_PER_PROGRAM),)
    _fp8_kernel()[grid](qweight, scale, out, qweight.numel(), qweight.shape[1], BLOCK=FP8_PER_PROGRAM)
    return out


TRANSPOSE_TILE = 64


@functools.cache
def _transpose_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def transpose(src, dst, rows, columns, TILE: tl.constexpr):
        r = tl.program_id(0) * TILE + tl.arange(0, TILE)
        c = tl.program_id(1) * TILE + tl.arange(0, TILE)
        inside = (r[:, None] < rows) & (c[None, :] < columns)  # (TILE, TILE)
        tile = tl.load(src + r[:, None] * columns + c[None, :], mask=inside)
        tl.store(dst + c[:, None] * rows + r[None, :], tl.trans(tile), mask=tl.trans(inside))

    return transpose


def transpose_cuda(matrix: torch.Tensor) -> torch.Tensor:
    """(rows, columns) contiguous 1-byte matrix -> its (columns, rows) contiguous transpose, the same bits."""
    out = torch.empty((matrix.shape[1], matrix.shape[0]), dtype=matrix.dtype, device=matrix.device)
    grid = (-(-matrix.shape[0] // TRANSPOSE_TILE), -(-matrix.shape[1] // TRANSPOSE_TILE))
    _transpose_kernel()[grid](matrix.view(torch.uint8), out.view(torch.uint8), *matrix.shape, TILE=TRANSPOSE_TILE)
    return out
