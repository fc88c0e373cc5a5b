"""How much accelerator memory this process may use: the number every plan (training, sampling, inference) fits."""

from __future__ import annotations

import torch


def device_limit_bytes(device: torch.device | str) -> int | None:
    """The memory this process may use on a CUDA device: its free memory, capped by the per-process fraction when
    one is set (torch.cuda.set_per_process_memory_fraction, as a card smaller than this one is emulated) plus what
    this process already holds; None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    held = torch.cuda.memory_reserved(index)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # PyTorch 2.6+
    fraction = get_fraction(index) if get_fraction is not None else 1.0
    return int(min(free + held, total * fraction))
