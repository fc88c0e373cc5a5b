"""The fused NF4 dequantization (kontext_lora/model/nf4_kernel.py, a Triton kernel) against the eager one, on this
machine's GPU at FLUX.1's weight shapes: bit equality, time per call and bandwidth. The kernel runs only on CUDA,
so no CPU test can run it; training uses it there. Usage: python scripts/check_dequant.py
"""

from __future__ import annotations

import torch
from torch.utils.benchmark import Timer

from kontext_lora.model import quant

SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288), (18432, 3072), (9216, 3072), (3072, 15360)]  # FLUX.1's


def main() -> None:
    device = torch.device("cuda")
    print(f"card: {torch.cuda.get_device_name()}")
    print("| (out, in) | bit-equal | eager ms | fused ms | fused GB/s |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        linear = torch.nn.Linear(shape[1], shape[0], bias=False, device=device, dtype=torch.bfloat16)
        layer = quant.NF4WeightLinear(linear)
        results, times = [], []
        for devices in (set(), {"cuda"}):  # eager, then the fused kernel that training uses on CUDA
            quant.FUSED_DEQUANT_DEVICES = devices
            results.append(layer.dequantized_weight(torch.bfloat16))
            timer = Timer("layer.dequantized_weight(torch.bfloat16)", globals={"layer": layer, "torch": torch})
            times.append(timer.blocked_autorange(min_run_time=0.5).median)
        moved = sum(t.nbytes for t in layer._parts()) + linear.weight.nbytes  # NF4 read, bf16 weight written
        equal = torch.equal(*results)
        print(f"| {shape} | {equal} | {times[0] * 1e3:.3f} | {times[1] * 1e3:.3f} | {moved / times[1] / 1e9:.0f} |")


if __name__ == "__main__":
    main()
