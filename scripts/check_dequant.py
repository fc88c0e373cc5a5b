"""The fused (compiled) NF4 dequantization against the eager one on this machine's accelerator, at FLUX.1's weight
shapes: bit equality and time per call. CPU equality is a test (tests/model/test_quant.py); this checks the CUDA
kernel, which is what training uses there. Usage: python scripts/check_dequant.py
"""

from __future__ import annotations

import torch
from torch.utils.benchmark import Timer

from kontext_lora.model.quant import NF4_BLOCK, NF4_SCALER_BLOCK, _nf4_flat, _nf4_flat_compiled

SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288), (18432, 3072), (9216, 3072), (3072, 15360)]  # FLUX.1's


def main() -> None:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    device = torch.device("cuda")
    print(f"card: {torch.cuda.get_device_name()}")
    print("| (out, in) | bit-equal | eager ms | fused ms | fused GB/s |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        weight = torch.randn(*shape, device=device, dtype=torch.bfloat16)
        nf4 = to_nf4(weight, NF4_BLOCK, NF4_SCALER_BLOCK)
        parts = (nf4.quantized_data, nf4.quantized_scalers, nf4.quantization_factor, nf4.scaler_mean, nf4.nf4)
        equal = torch.equal(_nf4_flat(*parts, torch.bfloat16), _nf4_flat_compiled(*parts, torch.bfloat16))
        times = [
            Timer("f(*p, torch.bfloat16)", globals={"f": f, "p": parts, "torch": torch}).blocked_autorange().median
            for f in (_nf4_flat, _nf4_flat_compiled)
        ]
        moved = sum(t.nbytes for t in parts) + weight.nbytes  # read the NF4 parts, write the bf16 weight
        print(f"| {shape} | {equal} | {times[0] * 1e3:.3f} | {times[1] * 1e3:.3f} | {moved / times[1] / 1e9:.0f} |")


if __name__ == "__main__":
    main()
