"""Sharding weights over ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each transformer block (the DiT's main and VACE blocks, the umT5 encoder's blocks) becomes one
FSDP unit and the model itself the root unit for the remaining weights: every rank keeps 1/N of
every parameter, gathers a block's weights just before the block runs and frees them after it
(``reshard_after_forward``), so the weights resident on a rank are 1/N of the model plus the
block in use. fp8 / scaled-fp8 storage is sharded as stored (the gathered block is still fp8)
and LoRA patches stay whole on every rank (they are small buffers, not parameters). GGUF
weights (bytes with a per-layer quantisation type) and block streaming are refused.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class FSDPError(ValueError):
    """A model that cannot be sharded; the message says what to use instead."""


def _mesh(group, device: torch.device):
    from torch.distributed.device_mesh import DeviceMesh

    import torch.distributed as dist

    ranks = dist.get_process_group_ranks(group) if group is not None else \
        list(range(dist.get_world_size()))
    return DeviceMesh.from_group(group or dist.group.WORLD, device.type,
                                 mesh=torch.tensor(ranks))


def _refuse_unsupported(model: nn.Module, what: str) -> None:
    from ..ops import Linear

    if getattr(model, "block_streaming", None) is not None:
        raise FSDPError(f"{what}: block streaming and FSDP both split the weights; use one "
                        "(--dit-fsdp shards the blocks over the GPUs, --blocks-on-device streams "
                        "them from CPU memory)")
    if any(isinstance(m, Linear) and m.qtype is not None for m in model.modules()):
        raise FSDPError(f"{what}: GGUF-quantised weights cannot be sharded with FSDP; leave out "
                        "--dit-fsdp (each GPU then holds the whole quantised model, which is "
                        "small) or use a safetensors file")


def shard_blocks(model: nn.Module, blocks, group, device, what: str) -> nn.Module:
    """FSDP-shard ``model``: each module of ``blocks`` one unit, ``model`` the root."""
    from torch.distributed.fsdp import fully_shard

    _refuse_unsupported(model, what)
    mesh = _mesh(group, torch.device(device))
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def shard_dit(model: nn.Module, group, device) -> nn.Module:
    """Shard a ``WanDiT``: its main and VACE blocks, then the rest."""
    from ..ops.streaming import streamed_blocks

    return shard_blocks(model, streamed_blocks(model), group, device, "--dit-fsdp")


def shard_text_encoder(encoder, group, device):
    """Shard a ``TextEncoder``'s umT5 network (each encoder block one unit)."""
    network = encoder.model
    shard_blocks(network, list(network.blocks), group, device, "--t5-fsdp")
    return encoder


def local_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (its shards, or whole unsharded tensors)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
