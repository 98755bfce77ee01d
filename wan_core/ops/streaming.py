"""Block streaming: run a model whose transformer blocks do not all fit on the compute device.

The first ``resident`` blocks (and every module outside the block list) live on the device; the
other blocks live in CPU memory (pinned, when the device is a GPU) and are copied to the device
just before they run and dropped right after. While one streamed block runs, the next one is
already being copied on a side CUDA stream (the compute stream waits for its event before
using it), so the copies overlap the compute. At most two streamed blocks are on the device at
any time: the one running and the one being prefetched (``BlockStreamer.peak_streamed``).

A streamed block computes with bit-identical tensors (copies of the same bytes), so streaming
never changes the output. It works with every kind of ``ops.Linear`` storage (fp8, scaled fp8,
GGUF bytes, LoRA patches): all parameters and buffers of a block travel together.

Models opt in with a :class:`BlockStreaming` setting stored as ``model.block_streaming``;
:func:`place` moves any model to a device honouring it (the sampler's expert switch, the
on-demand loader, the CLI and the nodes all use it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

GIB = 1024 ** 3
IN_FLIGHT = 2     # streamed blocks on the device at once: the running one and the next
BLOCK_LISTS = ("blocks", "vace_blocks")   # child module lists whose blocks are streamed


def streamed_blocks(model: nn.Module) -> list:
    """The transformer blocks of ``model`` in the order a forward runs them (a VACE model
    interleaves its VACE blocks, ``WanDiT.block_sequence``); the first ones stay resident."""
    sequence = getattr(model, "block_sequence", None)
    return list(sequence()) if callable(sequence) else list(model.blocks)


@dataclass(frozen=True)
class BlockStreaming:
    """How many transformer blocks stay on the compute device.

    resident: that many blocks stay (0 streams them all); or
    budget_gb: the most GiB of device memory the weights may use (the non-block weights, the
        resident blocks and the two in flight); the largest ``resident`` that fits is used.
        Activations come on top of it.
    """
    resident: Optional[int] = None
    budget_gb: Optional[float] = None

    def __post_init__(self):
        if (self.resident is None) == (self.budget_gb is None):
            raise ValueError("block streaming needs exactly one of resident (a block count) "
                             "or budget_gb (GiB of device memory for the weights)")
        if self.resident is not None and (isinstance(self.resident, bool) or
                                          int(self.resident) != self.resident or
                                          self.resident < 0):
            raise ValueError(f"resident blocks must be a whole number >= 0 "
                             f"(got {self.resident!r})")
        if self.budget_gb is not None and not (math.isfinite(self.budget_gb) and
                                               self.budget_gb > 0):
            raise ValueError(f"the VRAM budget must be a positive number of GiB "
                             f"(got {self.budget_gb!r})")

    def resident_blocks(self, model: nn.Module) -> int:
        """The number of blocks of ``model`` (which has ``.blocks``) kept on the device."""
        count = len(streamed_blocks(model))
        if self.resident is not None:
            return min(int(self.resident), count)
        return resident_blocks_for_budget(model, self.budget_gb * GIB)


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` (as stored: fp8 / GGUF stay small)."""
    return sum(t.numel() * t.element_size()
               for t in (*module.parameters(), *module.buffers()))


def resident_blocks_for_budget(model: nn.Module, budget_bytes: float) -> int:
    """The most blocks that can stay on the device within ``budget_bytes`` of weights, after
    the modules outside the blocks and ``IN_FLIGHT`` streamed blocks are counted."""
    blocks = streamed_blocks(model)
    if module_bytes(model) <= budget_bytes:
        return len(blocks)                   # everything fits: nothing to stream
    block_sizes = [module_bytes(b) for b in blocks]
    outside = module_bytes(model) - sum(block_sizes)
    largest = max(block_sizes, default=0)
    left = budget_bytes - outside - IN_FLIGHT * largest
    resident = 0
    for size in block_sizes:
        if left < size:
            break
        left -= size
        resident += 1
    return resident


def device_bytes(model: nn.Module, settings: Optional[BlockStreaming]) -> int:
    """Bytes of ``model``'s weights on the device when placed with ``settings`` (None: all)."""
    if settings is None:
        return module_bytes(model)
    sizes = [module_bytes(b) for b in streamed_blocks(model)]
    resident = settings.resident_blocks(model)
    return (module_bytes(model) - sum(sizes) + sum(sizes[:resident]) +
            min(IN_FLIGHT, len(sizes) - resident) * max(sizes[resident:], default=0))


def _tensor_slots(module: nn.Module) -> list:
    """``(owner, kind, name)`` for every parameter and buffer under ``module``."""
    slots = []
    for owner in module.modules():
        for name, value in owner._parameters.items():
            if value is not None:
                slots.append((owner, "param", name))
        for name, value in owner._buffers.items():
            if value is not None:
                slots.append((owner, "buffer", name))
    return slots


def _get(slot) -> torch.Tensor:
    owner, kind, name = slot
    return (owner._parameters if kind == "param" else owner._buffers)[name]


def _set(slot, tensor: torch.Tensor) -> None:
    owner, kind, name = slot
    if kind == "param":
        owner._parameters[name].data = tensor
    else:
        owner._buffers[name] = tensor


class BlockStreamer:
    """Streams ``blocks[resident:]`` to ``device`` one at a time around their forward calls.

    ``attach()`` places the blocks (resident ones on the device, the others in CPU memory) and
    installs the hooks; ``detach()`` removes the hooks and leaves every block in CPU memory.
    ``peak_streamed`` is the most streamed blocks that were on the device at once.
    """

    def __init__(self, blocks: Sequence[nn.Module], device, resident: int):
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.resident = max(0, min(int(resident), len(self.blocks)))
        self.streamed = list(range(self.resident, len(self.blocks)))
        self.peak_streamed = 0
        self._storage: dict = {}        # block index -> [(slot, CPU tensor)]
        self._in_flight: dict = {}      # block index -> ([device tensors], CUDA event or None)
        self._hooks: list = []
        cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._pin = cuda

    # -- placement --------------------------------------------------------------------------

    def attach(self) -> "BlockStreamer":
        for i, block in enumerate(self.blocks):
            if i < self.resident:
                block.to(self.device)
                continue
            block.to("cpu")
            storage = []
            for slot in _tensor_slots(block):
                tensor = _get(slot).data
                if self._pin and not tensor.is_pinned():
                    tensor = tensor.pin_memory()
                    _set(slot, tensor)
                storage.append((slot, tensor))
            self._storage[i] = storage
            self._hooks.append(block.register_forward_pre_hook(
                lambda module, args, i=i: self._before(i)))
            self._hooks.append(block.register_forward_hook(
                lambda module, args, out, i=i: self._after(i)))
        return self

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for i in list(self._in_flight):
            self._after(i)          # e.g. a forward that raised: put the CPU tensors back

    # -- streaming --------------------------------------------------------------------------

    def _copy_in(self, i: int) -> None:
        """Start copying block ``i`` to the device (on the side stream for a GPU)."""
        tensors = [t for _, t in self._storage[i]]
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                copies = [t.to(self.device, non_blocking=True, copy=True) for t in tensors]
                event = torch.cuda.Event()
                event.record(self._stream)
        else:
            copies = [t.to(self.device, copy=True) for t in tensors]
            event = None
        self._in_flight[i] = (copies, event)
        self.peak_streamed = max(self.peak_streamed, len(self._in_flight))

    def _before(self, i: int) -> None:
        if i not in self._in_flight:
            self._copy_in(i)
        copies, event = self._in_flight[i]
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for copy in copies:
                copy.record_stream(current)     # keep the memory until this stream is done
        for (slot, _), copy in zip(self._storage[i], copies):
            _set(slot, copy)
        if len(self.streamed) > 1:
            position = self.streamed.index(i)
            upcoming = self.streamed[(position + 1) % len(self.streamed)]
            if upcoming not in self._in_flight:
                self._copy_in(upcoming)

    def _after(self, i: int) -> None:
        for slot, stored in self._storage[i]:
            _set(slot, stored)
        self._drop(i)

    def _drop(self, i: int) -> None:
        self._in_flight.pop(i, None)


def place(module, device) -> None:
    """Move ``module`` to ``device``; a model with a ``block_streaming`` setting gets its
    non-block modules and resident blocks moved there and its other blocks streamed. Placing
    again removes the previous streaming hooks first."""
    device = torch.device(device)
    unstream(module)
    settings = getattr(module, "block_streaming", None)
    if settings is None:
        module.to(device)
        return
    for name, child in module.named_children():
        if name not in BLOCK_LISTS:
            child.to(device)
    module._block_streamer = BlockStreamer(streamed_blocks(module), device,
                                           settings.resident_blocks(module)).attach()


def unstream(module) -> None:
    """Remove ``module``'s streaming hooks (its streamed blocks stay in CPU memory)."""
    streamer = getattr(module, "_block_streamer", None)
    if streamer is not None:
        streamer.detach()
        module._block_streamer = None


def without_streaming_hooks(copy: nn.Module, original: nn.Module) -> None:
    """Remove from ``copy`` (a ``copy.deepcopy`` of ``original``) the streaming hooks it
    inherited, which would drive ``original``'s streamer; place the copy to stream it."""
    streamer = getattr(original, "_block_streamer", None)
    copy.__dict__["_block_streamer"] = None
    if streamer is None:
        return
    ids = {handle.id for handle in streamer._hooks}
    for block in streamed_blocks(copy):
        for hooks in (block._forward_pre_hooks, block._forward_hooks):
            for key in ids & set(hooks):
                del hooks[key]
