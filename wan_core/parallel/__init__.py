"""Generation on several processes, one per GPU, over torch.distributed (the engine the
official Wan code uses: NCCL on GPUs, gloo on the CPU, torchrun for one or many machines).

    torchrun --nproc-per-node 4 -m wan_core generate ... --ulysses-size 2 --cfg-parallel

or from Python, in every process torchrun starts::

    from wan_core import parallel
    ctx = parallel.init(ulysses_size=2, cfg_parallel=True, dit_fsdp=True)
    dit = ctx.prepare_dit(load_dit(path))            # sharded + the sequence-parallel hook
    latent = generate(dit, ctx_text, neg_text, cond, parallel=ctx, device=ctx.device, ...)
    if ctx.is_main: ...write the video...

Three independent splits: Ulysses sequence parallelism (:mod:`.ulysses`: tokens over the ranks,
all-to-all around self-attention), CFG parallelism (the conditional and the unconditional
pass on two halves of the ranks, :meth:`ParallelContext.cfg_split`) and FSDP2 weight sharding
of the DiT and the umT5 encoder (:mod:`.fsdp`). The layout: :mod:`.context`. A host that is
one process (ComfyUI) samples through persistent worker processes: :mod:`.pool`.
"""
from .context import (DEFAULT_TIMEOUT_S, ParallelContext, ParallelError, check_heads,
                      check_layout, init, launched_by_torchrun)
from .fsdp import FSDPError, local_bytes, shard_dit, shard_text_encoder
from .pool import OnWorkers, PoolSettings, SamplingJob, WorkerError, WorkerPool, model_spec
from .ulysses import SequenceParallel, TokenShard

__all__ = ["DEFAULT_TIMEOUT_S", "FSDPError", "OnWorkers", "ParallelContext", "ParallelError",
           "PoolSettings", "SamplingJob", "SequenceParallel", "TokenShard", "WorkerError",
           "WorkerPool", "check_heads", "check_layout", "init", "launched_by_torchrun",
           "local_bytes", "model_spec", "shard_dit", "shard_text_encoder"]
