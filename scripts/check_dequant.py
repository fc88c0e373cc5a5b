"""The fused dequantizations (kontext_lora/model/dequant_kernels.py, Triton: NF4 and fp8) against the eager ones, on
this machine's GPU at FLUX.1's weight shapes: bit equality, time per call and bandwidth. The kernels run only on
CUDA, so no CPU test can run them; training uses them there. Usage: python scripts/check_dequant.py
"""

from __future__ import annotations

import torch
from torch.utils.benchmark import Timer

from kontext_lora.model import quant

SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288), (18432, 3072), (9216, 3072), (3072, 15360)]  # FLUX.1's


def main() -> None:
    device = torch.device("cuda")
    print(f"card: {torch.cuda.get_device_name()}")
    print("| format | (out, in) | bit-equal | eager ms | fused ms | fused GB/s |")
    print("|---|---|---|---|---|---|")
    for layer_type in (quant.NF4WeightLinear, quant.Float8WeightLinear):
        for shape in SHAPES:
            torch.manual_seed(0)
            linear = torch.nn.Linear(shape[1], shape[0], bias=False, device=device, dtype=torch.bfloat16)
            layer = layer_type(linear)
            results, times = [], []
            for devices in (set(), {"cuda"}):  # eager, then the fused kernel that training uses on CUDA
                quant.FUSED_DEQUANT_DEVICES = devices
                results.append(layer.dequantized_weight(torch.bfloat16))
                timer = Timer("layer.dequantized_weight(torch.bfloat16)", globals={"layer": layer, "torch": torch})
                times.append(timer.blocked_autorange(min_run_time=0.5).median)
            stored = sum(p.nbytes for p in layer.parameters())
            moved = stored + linear.weight.nbytes  # the quantized weight read, the bf16 weight written
            print(f"| {layer_type.__name__} | {shape} | {torch.equal(*results)} | {times[0] * 1e3:.3f} | "
                  f"{times[1] * 1e3:.3f} | {moved / times[1] / 1e9:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
