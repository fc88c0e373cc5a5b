"""The fused dequantizations (kontext_lora/model/dequant_kernels.py, Triton: NF4 and fp8) against the eager ones, on
this machine's GPU at FLUX.1's weight shapes: bit equality, time per call and bandwidth. The kernels run only on
CUDA, so no CPU test can run them; training uses them there. A second table times one frozen linear's forward +
input-gradient backward at 1024^2's 8704 tokens, compiled as training compiles it: bf16, the fp8-stored weight
dequantized, and the fp8-stored weight multiplied in fp8 (speed.fp8_base). Usage: python scripts/check_dequant.py
"""

from __future__ import annotations

import torch
from torch.utils.benchmark import Timer

from kontext_lora.model import quant

SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288), (18432, 3072), (9216, 3072), (3072, 15360)]  # FLUX.1's
TOKENS = 8704  # a 1024^2 Kontext step: 4096 target + 4096 control + 512 text tokens


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
                times.append(_median_s("layer.dequantized_weight(torch.bfloat16)", layer=layer, torch=torch))
            stored = sum(p.nbytes for p in layer.parameters())
            moved = stored + linear.weight.nbytes  # the quantized weight read, the bf16 weight written
            print(f"| {layer_type.__name__} | {shape} | {torch.equal(*results)} | {times[0] * 1e3:.3f} | "
                  f"{times[1] * 1e3:.3f} | {moved / times[1] / 1e9:.0f} |")  # fmt: skip
    transpose_table(device)
    matmul_table(device)


def _median_s(statement: str, **names) -> float:
    # num_threads unchanged: Timer's default of 1 changes a global that torch.compile guards on (a recompile a call)
    timer = Timer(statement, globals=names, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.5).median


def transpose_table(device: torch.device) -> None:
    """The fp8 weight's transpose for the fp8 matmul's backward: Triton tiles against PyTorch's strided copy."""
    from kontext_lora.model.dequant_kernels import transpose_cuda

    print("\n| (out, in) uint8 | bit-equal | .t().contiguous() ms | Triton ms | Triton GB/s |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        weight = torch.randint(0, 255, shape, dtype=torch.uint8, device=device)
        equal = torch.equal(transpose_cuda(weight), weight.t().contiguous())
        eager = _median_s("weight.t().contiguous()", weight=weight)
        tiled = _median_s("transpose(weight)", weight=weight, transpose=transpose_cuda)
        print(f"| {shape} | {equal} | {eager * 1e3:.3f} | {tiled * 1e3:.3f} | {2 * weight.nbytes / tiled / 1e9:.0f} |")


def matmul_table(device: torch.device) -> None:
    """ms for out = layer(x); out.backward(g) with x (8704, in), compiled; relative error of out against bf16."""
    print("\n| (out, in) | bf16 ms | fp8 stored, dequantized ms | fp8 matmul ms | fp8 matmul TFLOP/s | err vs bf16 |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES[:3]:
        torch.manual_seed(0)
        linear = torch.nn.Linear(shape[1], shape[0], device=device, dtype=torch.bfloat16).requires_grad_(False)
        x = torch.randn(TOKENS, shape[1], device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(TOKENS, shape[0], device=device, dtype=torch.bfloat16)
        times, outputs = [], []
        for mode in ("bf16", "dequantize", "fp8"):
            layer = linear if mode == "bf16" else quant.Float8WeightLinear(linear)
            if mode == "fp8":
                assert quant.use_fp8_matmuls(layer) == 1
            compiled = torch.compile(layer, dynamic=False)

            def run(compiled=compiled, x=x, grad=grad):
                x.grad = None
                out = compiled(x)
                out.backward(grad)
                return out

            outputs.append(run().detach())
            times.append(_median_s("run()", run=run))
        flops = 4 * TOKENS * shape[0] * shape[1]  # forward + input gradient
        error = ((outputs[2].float() - outputs[0].float()).norm() / outputs[0].float().norm()).item()
        print(f"| {shape} | {times[0] * 1e3:.3f} | {times[1] * 1e3:.3f} | {times[2] * 1e3:.3f} | "
              f"{flops / times[2] / 1e12:.0f} | {error:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
