"""One Triton kernel that dequantizes an NF4 weight (torchao's layout) on CUDA.

Why by hand: eager PyTorch needs six kernels with int32 and float intermediates several times the weight's size
(about 0.7 s a 512^2 step on an H100), and a torch.compile'd dequantization, called from inside the opaque custom
ops of quant.py, costs more in per-call Python overhead (guards, wrappers: ~0.2 ms each, 1482 calls a step) than it
saves (measured: 1.90 s against 1.62 s a step). Neither torchao (its NF4Tensor dequantizes eagerly) nor
bitsandbytes (not installed on the GPU machines, another weight layout) gives this one. Triton is imported only
when the kernel first runs, so CPU-only installs never need it.
"""

from __future__ import annotations

import functools

import torch

BYTES_PER_PROGRAM = 1024  # 2048 weights a program


@functools.cache
def _kernel():
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
    `dtype`, equal bit for bit to quant.py's eager `_nf4_blocks` with the scales it computes (float32 throughout)."""
    out = torch.empty(2 * data.numel(), dtype=dtype, device=data.device)
    grid = (-(-data.numel() // BYTES_PER_PROGRAM),)
    _kernel()[grid](data, scalers, factors, mean, lut, out, data.numel(), BLOCK=BYTES_PER_PROGRAM)
    return out
