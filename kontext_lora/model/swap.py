"""Block swap (`memory.block_swap`): the frozen weights of N transformer blocks live in (pinned) CPU memory.

A swapped block's frozen parameters and buffers keep their Parameter objects and device tensors (so PEFT, the
optimizer and torch.compile's guards see nothing change); only their storage is freed between uses
(`untyped_storage().resize_(0)`) and refilled from a CPU copy right before the block runs, as FSDP1 does with its
flat parameters. The LoRA parameters (requires_grad) stay on the device, untouched.

When a block's weights are on the device:
- forward: from just before the block runs until it returns; the next swapped block is copied on a side CUDA stream
  while this one computes (the first one when the transformer's forward starts);
- backward: a swapped block is always checkpointed (else autograd would keep its weights alive until backward), so
  its weights come back when the gradient reaches its outputs, stay for the recompute and the block's backward, and
  go when the gradient of its inputs is done; meanwhile the previous swapped block is copied.
So at most two swapped blocks are on the device at a time.

Why by hand: diffusers' group offloading and accelerate's `cpu_offload` are built for inference: they move every
parameter of a module (the LoRA's too) in hooks on the module's forward, which torch.compile'd blocks would trace,
and have no backward schedule (a block's weights are needed again in backward, in reverse order).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.checkpoint import checkpoint

_SWAP_ATTR = "_kontext_swap"


class _Storage:
    """One device storage of a swapped block and its CPU copy (`host`: a slice of the block's pinned buffer)."""

    def __init__(self, storage: torch.UntypedStorage, host: torch.Tensor):
        if not storage.resizable():
            raise ValueError("memory.block_swap needs resizable weight storage (not memory-mapped weights)")
        self.storage = storage
        self.nbytes = storage.nbytes()
        self.host = host
        self.host.copy_(self._bytes())
        self.storage.resize_(0)

    def _bytes(self) -> torch.Tensor:
        """The storage as a uint8 tensor (no copy)."""
        return torch.empty(0, dtype=torch.uint8, device=self.storage.device).set_(self.storage, 0, (self.nbytes,))

    def allocate(self) -> None:
        """Give the storage its memory back (on the current stream for CUDA), contents undefined."""
        self.storage.resize_(self.nbytes)

    def copy_in(self) -> None:
        """Copy the CPU bytes in, asynchronously from pinned memory, on the current stream."""
        self._bytes().copy_(self.host, non_blocking=True)

    def free(self) -> None:
        self.storage.resize_(0)


def _host_buffer(nbytes: int, device: torch.device, registered: list[int]) -> torch.Tensor:
    """CPU bytes for one block's weights; page-locked where the device is CUDA (asynchronous copies).

    Not `pin_memory()`: PyTorch's caching host allocator rounds each allocation up to a power of two, up to twice
    the RAM for 22 GiB of weights; registering a plain allocation (as torch.cuda._pin_memory_utils does) pins its
    exact size (its address is added to `registered`). Falls back to pin_memory() if registration fails.
    """
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if device.type != "cuda" or nbytes == 0:
        return buffer
    try:
        ok = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 1)) == 0  # Portable
    except (AttributeError, RuntimeError, TypeError):
        ok = False
    if ok and buffer.is_pinned():
        registered.append(buffer.data_ptr())
        return buffer
    if ok:
        _unregister([buffer.data_ptr()])
    return buffer.pin_memory()


def _unregister(pointers: list[int]) -> None:
    """Unpin registered host memory (before it is freed: the swap that owns it is being collected)."""
    for pointer in pointers:
        torch.cuda.cudart().cudaHostUnregister(pointer)


def _plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding `tensor`'s data: itself, or a subclass's inner tensors (`__tensor_flatten__`)."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
        if type(data) is not torch.Tensor:
            raise ValueError(
                f"memory.block_swap cannot swap a {type(data).__name__} weight (no __tensor_flatten__); "
                "use memory.block_swap=0 with this base_quant"
            )
        return [data]
    names, _ = tensor.__tensor_flatten__()
    return [inner for name in names for inner in _plain_tensors(getattr(tensor, name))]


class _Enter(torch.autograd.Function):
    """Identity on a block's inputs; backward runs once the gradient of all of them is done: the block is finished."""

    @staticmethod
    def forward(ctx, swap: _BlockSwap, index: int, anchor: torch.Tensor, *inputs: torch.Tensor):
        ctx.swap, ctx.index = swap, index
        return tuple(t.view_as(t) for t in inputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        ctx.swap.free(ctx.index)
        return (None, None, None, *grads)


class _Exit(torch.autograd.Function):
    """Identity on a block's outputs; backward runs before the block's backward: bring its weights back."""

    @staticmethod
    def forward(ctx, swap: _BlockSwap, index: int, *outputs: torch.Tensor):
        ctx.swap, ctx.index = swap, index
        return tuple(t.view_as(t) for t in outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        ctx.swap.acquire(ctx.index, ctx.swap.previous(ctx.index))
        return (None, None, *grads)


class _BlockSwap:
    """The swapped blocks of one transformer and where each one's weights are (on the device, on the way, away)."""

    def __init__(self, blocks: dict[int, torch.nn.Module], device: torch.device):
        self.device = device
        self.order = sorted(blocks)
        self.blocks = blocks
        self.storages: dict[int, list[_Storage]] = {}
        self.ready: dict[int, torch.cuda.Event | None] = {}  # index -> copy done (None: done on CPU); absent: away
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # A swapped block's inputs may all be frozen (block 0); this leaf makes _Enter's outputs require grad, so
        # its backward runs after the block's (it receives no gradient itself).
        self.anchor = torch.zeros((), device=device, requires_grad=True)

    def next(self, index: int) -> int | None:
        later = [i for i in self.order if i > index]
        return later[0] if later else None

    def previous(self, index: int) -> int | None:
        earlier = [i for i in self.order if i < index]
        return earlier[-1] if earlier else None

    def prefetch(self, index: int | None) -> None:
        """Start copying block `index`'s weights to the device (no-op if there or on the way)."""
        if index is None or index in self.ready:
            return
        storages = self.storages[index]
        for storage in storages:  # on the compute stream: the memory is the compute stream's, no record_stream
            storage.allocate()
        if self.copy_stream is None:
            for storage in storages:
                storage.copy_in()
            self.ready[index] = None
            return
        # The new memory may be what compute-stream work still queued was using: copy only after that work.
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            for storage in storages:
                storage.copy_in()
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.ready[index] = event

    def acquire(self, index: int, then: int | None) -> None:
        """Make block `index`'s weights usable on the compute stream, and start copying block `then`."""
        self.prefetch(index)
        event = self.ready[index]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        self.prefetch(then)

    def free(self, index: int) -> None:
        """Release block `index`'s device memory (to the compute stream's pool, which used it last)."""
        if self.ready.pop(index, False) is False:
            return
        for storage in self.storages[index]:
            storage.free()

    def call(self, block: torch.nn.Module, index: int, run, args: tuple, kwargs: dict):
        """Run `run(*args, **kwargs)` (the block's own call) with its weights on the device; see the module doc."""
        self.acquire(index, self.next(index))
        if not torch.is_grad_enabled():
            try:
                return run(*args, **kwargs)
            finally:
                self.free(index)
        # Route every floating tensor argument through _Enter (so its backward marks the end of the block's):
        # positional when diffusers' checkpointing hook calls the block, keywords when it calls it directly.
        args, kwargs = list(args), dict(kwargs)
        slots = [(args, i) for i in range(len(args))] + [(kwargs, key) for key in kwargs]
        slots = [(box, k) for box, k in slots if isinstance(box[k], torch.Tensor) and box[k].is_floating_point()]
        entered = _Enter.apply(self, index, self.anchor, *(box[k] for box, k in slots))
        for (box, k), tensor in zip(slots, entered, strict=True):
            box[k] = tensor
        try:
            outputs = checkpoint(run, *args, use_reentrant=False, **kwargs)
        finally:
            self.free(index)
        single = isinstance(outputs, torch.Tensor)
        outputs = (outputs,) if single else tuple(outputs)
        positions = [i for i, o in enumerate(outputs) if isinstance(o, torch.Tensor) and o.requires_grad]
        exited = _Exit.apply(self, index, *(outputs[i] for i in positions))
        outputs = list(outputs)
        for position, tensor in zip(positions, exited, strict=True):
            outputs[position] = tensor
        return outputs[0] if single else tuple(outputs)


_SUBCLASSES: dict[type, type] = {}


def _swapped_class(cls: type) -> type:
    """A subclass of the block's class (same name: diffusers' compile_repeated_blocks matches by name) whose
    `__call__` brings the weights in and out around nn.Module's own call, outside any compiled region."""
    if cls not in _SUBCLASSES:

        def __call__(self, *args, **kwargs):
            swap, index = getattr(self, _SWAP_ATTR)
            return swap.call(self, index, lambda *a, **k: cls.__call__(self, *a, **k), args, kwargs)

        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _SUBCLASSES[cls]


def swapped_block_indices(count: int, total: int) -> list[int]:
    """`count` of `total` blocks, spread evenly over the depth (centred: the first is not block 0 unless all are).

    Spread rather than the last N: the copy of a swapped block is started when the previous swapped one runs, so
    the resident blocks between two swapped ones compute while it travels. A double block costs about as much
    compute per token as a single one but carries 2.4x its bytes; spreading mixes both.
    """
    count = max(0, min(count, total))
    return sorted({int((i + 0.5) * total / count) for i in range(count)}) if count else []


def _blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def enable_block_swap(transformer: torch.nn.Module, count: int, device: torch.device) -> list[int]:
    """Keep the frozen weights of `count` blocks (indices into double + single blocks, spread over the depth) in CPU
    memory, on `device` only while they run; returns the swapped indices (in execution order).

    Apply after LoRA injection and quantization, before checkpointing and compilation (apply_speed does). The
    blocks' frozen tensors may be on `device` (their storage is freed) or on the CPU (the Parameter gets an empty
    device tensor of the same shape). Swapped blocks are always checkpointed.
    """
    if count <= 0:
        return []
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if getattr(transformer, _SWAP_ATTR, None) is not None:
        raise ValueError("block swap is already enabled on this transformer")
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        raise ValueError("memory.block_swap is not supported with several processes (DDP broadcasts every weight)")
    blocks = _blocks(transformer)
    indices = swapped_block_indices(count, len(blocks))
    chosen = {i: blocks[i] for i in indices}
    # A storage that anything else also uses (a table shared by quantized tensors, tied weights) stays resident.
    owners: dict[int, set] = {}
    for name, module in transformer.named_children():
        if name not in ("transformer_blocks", "single_transformer_blocks"):
            for tensor in _frozen_plain(module):
                owners.setdefault(tensor.untyped_storage().data_ptr(), set()).add(-1)
    for index, block in enumerate(blocks):
        for tensor in _frozen_plain(block):
            owners.setdefault(tensor.untyped_storage().data_ptr(), set()).add(index)
    swap = _BlockSwap(chosen, device)
    registered: list[int] = []
    # One block at a time: a block still on the CPU is copied to the device and its storage freed into the pinned
    # buffer before the next one comes, so the device never holds more than the resident model and one block.
    for index, block in chosen.items():
        _to_device_tensors(block, device)
        own: dict[int, torch.UntypedStorage] = {}
        for tensor in _frozen_plain(block):
            storage = tensor.untyped_storage()
            # A pointer not seen above is a fresh copy from the CPU: this block's alone.
            if owners.get(storage.data_ptr(), {index}) == {index} and storage.nbytes() > 0:
                own.setdefault(storage.data_ptr(), storage)
        sizes = [storage.nbytes() for storage in own.values()]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        host = _host_buffer(sum(sizes), device, registered)
        swap.storages[index] = [
            _Storage(storage, host[offset : offset + size])
            for storage, offset, size in zip(own.values(), offsets, sizes, strict=True)
        ]
        for pointer in own:  # freed now: a later block's fresh copy may reuse the address
            owners.pop(pointer, None)
        setattr(block, _SWAP_ATTR, (swap, index))
        block.__class__ = _swapped_class(type(block))
    if registered:  # runs before the swap's host buffers are freed
        weakref.finalize(swap, _unregister, registered)
    transformer._kontext_swap = swap
    transformer._kontext_swap_hook = transformer.register_forward_pre_hook(
        lambda module, args: swap.prefetch(swap.order[0])
    )
    return indices


def swapped_bytes(transformer: torch.nn.Module) -> int:
    """Bytes of frozen weights that block swap keeps off the device (0 without swap)."""
    swap = getattr(transformer, _SWAP_ATTR, None)
    return sum(s.nbytes for storages in swap.storages.values() for s in storages) if swap else 0


def is_swapped(block: torch.nn.Module) -> bool:
    return getattr(block, _SWAP_ATTR, None) is not None


def _frozen_plain(module: torch.nn.Module) -> list[torch.Tensor]:
    """The plain tensors behind a module's frozen parameters and its buffers."""
    tensors = [p for p in module.parameters() if not p.requires_grad] + list(module.buffers())
    return [plain for tensor in tensors for plain in _plain_tensors(tensor)]


def _to_device_tensors(block: torch.nn.Module, device: torch.device) -> None:
    """Frozen plain tensors still on the CPU: give the Parameter/buffer a device tensor (same identity of the
    Parameter object) whose bytes are the CPU ones; the storage is freed right after by _Storage."""
    for module in block.modules():
        for param in list(module._parameters.values()):
            if param is not None and not param.requires_grad and param.device != device:
                if type(param.data) is not torch.Tensor:
                    raise ValueError(
                        f"memory.block_swap needs the quantized {type(param.data).__name__} weights on the device "
                        "before swapping (load the transformer to the device first)"
                    )
                param.data = param.data.to(device)
            if param is not None and not param.requires_grad and type(param.data) is torch.Tensor:
                if not param.data.untyped_storage().resizable():  # e.g. memory-mapped: give it its own memory
                    param.data = param.data.clone()
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and (buffer.device != device or not buffer.untyped_storage().resizable()):
                module._buffers[name] = buffer.to(device).clone()
