"""The process group of a multi-GPU run and what each rank does in it.

``init`` joins the group ``torchrun`` started (NCCL on GPUs, gloo on CPU; one or many machines
through torchrun's rendezvous), checks the layout and builds the sub-groups:

    world = ulysses_size x cfg_size          (cfg_size 2 with CFG parallelism, else 1)
    rank r: CFG half r // ulysses_size, sequence share r % ulysses_size

The ranks of one CFG half split the tokens (Ulysses, ``ulysses_group``); the two halves run the
conditional and the unconditional pass side by side and swap their velocities (``cfg_group``).
FSDP shards over all ranks. Every rank draws the same noise (CPU, from the seed), runs the same
schedule and makes the same step-cache decisions (its inputs are the gathered, identical
latents); only rank 0 prints and writes files (``is_main``).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600


class ParallelError(ValueError):
    """A multi-GPU setting that cannot work; the message says how to launch or what to use."""


def launched_by_torchrun() -> bool:
    """Whether the environment carries a torch.distributed rendezvous (torchrun sets these)."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def divisors(n: int, limit: Optional[int] = None) -> list:
    return [d for d in range(1, n + 1) if n % d == 0 and (limit is None or d <= limit)]


def check_heads(num_heads: int, ulysses_size: int, option: str = "--ulysses-size") -> None:
    """Ulysses gives each rank ``num_heads / ulysses_size`` heads: it must divide. ``option``
    names the setting in the message (the CLI's option, or the node's widgets)."""
    if num_heads % ulysses_size:
        sizes = ", ".join(str(d) for d in divisors(num_heads))
        raise ParallelError(f"{option} {ulysses_size} does not divide the model's "
                            f"{num_heads} attention heads; use one of {sizes}")


def check_layout(world_size: int, ulysses_size: int, cfg_parallel: bool) -> int:
    """The CFG group size; ParallelError unless world = ulysses x cfg."""
    if ulysses_size < 1:
        raise ParallelError(f"--ulysses-size must be at least 1 (got {ulysses_size})")
    cfg_size = 2 if cfg_parallel else 1
    if world_size != ulysses_size * cfg_size:
        want = f"--ulysses-size {ulysses_size}" + (" x 2 (--cfg-parallel)" if cfg_parallel else "")
        raise ParallelError(
            f"{world_size} processes were started but {want} uses {ulysses_size * cfg_size}; "
            f"start --nproc-per-node {ulysses_size * cfg_size} (times the nodes), or set "
            f"--ulysses-size {world_size // cfg_size if world_size % cfg_size == 0 else '?'}"
            + (" with --cfg-parallel" if cfg_parallel else ""))
    return cfg_size


@dataclass
class ParallelContext:
    """One rank's view of a multi-process generation (made by :func:`init`)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    ulysses_size: int = 1
    cfg_size: int = 1
    dit_fsdp: bool = False
    t5_fsdp: bool = False
    ulysses_group: Any = None
    cfg_group: Any = None
    _sequence: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that prints progress and writes files."""
        return self.rank == 0

    @property
    def cfg_rank(self) -> int:
        """0: this rank runs the conditional pass; 1: the unconditional one."""
        return self.rank // self.ulysses_size

    # -- models -----------------------------------------------------------------------------

    def check_config(self, config) -> None:
        """Refuse a model these settings cannot split (before its weights are read)."""
        check_heads(config.num_heads, self.ulysses_size)

    def prepare_dit(self, model):
        """Make ``model`` (a loaded ``WanDiT``) run on this rank: FSDP-shard its weights
        (``dit_fsdp``), attach the sequence-parallel hook (``ulysses_size`` > 1), move the
        rest to ``device``. Returns the model."""
        from ..ops.streaming import place
        from .fsdp import shard_dit
        from .ulysses import SequenceParallel

        self.check_config(model.config)
        if self.dit_fsdp:
            shard_dit(model, None, self.device)
        else:
            place(model, self.device)
        if self.ulysses_size > 1:
            if self._sequence is None:
                self._sequence = SequenceParallel(self.ulysses_group)
            model.sequence_parallel = self._sequence
        return model

    def prepare_text_encoder(self, encoder):
        """FSDP-shard the umT5 network (``t5_fsdp``), else move it to ``device``."""
        from .fsdp import shard_text_encoder

        if self.t5_fsdp:
            return shard_text_encoder(encoder, None, self.device)
        return encoder.to(self.device)

    # -- sampling ---------------------------------------------------------------------------

    def cfg_split(self) -> Optional[Callable]:
        """For ``make_velocity_fn(cfg_split=...)``: with CFG parallelism, a function that runs
        this rank's half (conditional or unconditional) and swaps the results with the other
        half; None without."""
        if self.cfg_size == 1:
            return None

        def split(run_cond: Callable, run_uncond: Callable):
            mine = (run_cond if self.cfg_rank == 0 else run_uncond)().contiguous()
            both = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(both, mine, group=self.cfg_group)
            return both[0], both[1]

        return split

    def barrier(self) -> None:
        dist.barrier()


def _device_for(local_rank: int, device: Optional[str]) -> torch.device:
    if device is not None and torch.device(device).type == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ParallelError(f"local rank {local_rank} has no GPU: this machine has {count}; "
                                f"start at most {count} processes per node (--nproc-per-node)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if device is not None and torch.device(device).type == "cuda":
        raise ParallelError(f"--device {device}: this PyTorch ({torch.__version__}) has no CUDA "
                            "GPU; use --device cpu (gloo) or a CUDA build")
    return torch.device("cpu")


def init(ulysses_size: int = 1, cfg_parallel: bool = False, dit_fsdp: bool = False,
         t5_fsdp: bool = False, device: Optional[str] = None,
         timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelContext:
    """Join the process group started by ``torchrun`` (or one already initialised) and set up
    the sub-groups for ``ulysses_size`` x (2 if ``cfg_parallel`` else 1) ranks.

    ``device``: 'cpu' forces gloo on the CPU; by default each rank takes GPU ``LOCAL_RANK``
    (NCCL) when CUDA is available. ``timeout_s``: a collective that waits longer (a rank that
    died) raises instead of hanging. Raises :class:`ParallelError` for a layout that cannot
    work, with the fix."""
    if not dist.is_initialized():
        if not launched_by_torchrun():
            raise ParallelError(
                "multi-GPU options (--ulysses-size, --cfg-parallel, --dit-fsdp, --t5-fsdp) need "
                "one process per GPU started by torchrun: torchrun --nproc-per-node N -m "
                "wan_core generate ... (torchrun --nnodes M --rdzv-endpoint HOST:PORT for "
                "several machines)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device_for(local_rank, device)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg_size = check_layout(world, ulysses_size, cfg_parallel)
    kinds = [None] * world
    dist.all_gather_object(kinds, dev.type)
    if len(set(kinds)) > 1:
        raise ParallelError(f"the ranks use different devices ({', '.join(kinds)}); every rank "
                            "needs a GPU (or run all on the CPU with --device cpu)")
    # Every rank creates every sub-group, in the same order (torch.distributed requires it).
    ulysses_groups = [dist.new_group([c * ulysses_size + u for u in range(ulysses_size)])
                      for c in range(cfg_size)]
    cfg_groups = [dist.new_group([c * ulysses_size + u for c in range(cfg_size)])
                  for u in range(ulysses_size)]
    return ParallelContext(rank=rank, world_size=world, local_rank=local_rank, device=dev,
                           ulysses_size=ulysses_size, cfg_size=cfg_size, dit_fsdp=dit_fsdp,
                           t5_fsdp=t5_fsdp, ulysses_group=ulysses_groups[rank // ulysses_size],
                           cfg_group=cfg_groups[rank % ulysses_size])
