"""Worker processes for multi-GPU sampling from a single-process host (ComfyUI).

ComfyUI runs every node in one process, but the multi-GPU code runs one process per GPU. A
:class:`WorkerPool` starts those processes once (``torch.multiprocessing``, spawn), joins them in
a torch.distributed group (NCCL on GPUs, gloo on the CPU) and keeps them alive between runs:

    pool = WorkerPool(PoolSettings(processes=4, cfg_parallel=True, dit_fsdp=True))
    latent = pool.run(job, progress=lambda step, total: ..., interrupted=lambda: False)

A :class:`SamplingJob` carries everything a run needs as plain data: the model *spec* (files,
load options and LoRAs, not weights: each worker reads its shards from the same files and keeps
the model between jobs, reloading only when the spec changes), the text embeddings, the video
conditioning and the sampler settings. Rank 0 reports progress and returns the latent. Cancelling
(``interrupted()`` returning True) stops every worker at the same step (rank 0's answer is
broadcast each step), and the pool stays usable. A worker that dies makes ``run`` raise
:class:`WorkerError`; the next ``run`` starts fresh processes.
"""
from __future__ import annotations

import os
import queue
import socket
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

POLL_S = 0.2
ORPHAN_CHECK_S = 2.0      # an idle worker checks this often that its host is still there


class WorkerError(RuntimeError):
    """A worker process failed or died; the message names the rank and the error."""


@dataclass(frozen=True)
class PoolSettings:
    """How the workers split the work: ``processes`` = ulysses x (2 with ``cfg_parallel``)."""
    processes: int
    cfg_parallel: bool = False
    dit_fsdp: bool = False
    device: Optional[str] = None           # 'cpu' forces gloo; default: one GPU per worker

    @property
    def ulysses_size(self) -> int:
        return self.processes // (2 if self.cfg_parallel else 1)


@dataclass
class OnWorkers:
    """A model (on-demand DiT, expert pair, or either step-cached) to be sampled by a
    :class:`WorkerPool` with ``settings``: what the WanCore Multi-GPU node outputs."""
    model: Any
    settings: PoolSettings

    @property
    def config(self):
        return self.model.config


@dataclass
class SamplingJob:
    """One sampling run as plain data (picklable). ``model``: a spec from :func:`model_spec`."""
    model: Any
    context: list
    negative_context: Optional[list]
    cond: Any
    kwargs: dict = field(default_factory=dict)       # steps, guide_scale, shift, solver, ...


# ------------------------------------------------------------------------------ model specs

def model_spec(model) -> tuple:
    """A picklable description of an on-demand DiT (``OnDemandDiT``), a ``MoEModel`` of them
    or a ``StepCached`` one, from which :func:`build_model` rebuilds it in a worker."""
    from ..pipeline import MoEModel, StepCached

    if isinstance(model, StepCached):
        return ("cached", model_spec(model.model), model.cache, model.windows)
    if isinstance(model, MoEModel):
        return ("moe", model_spec(model.high_noise), model_spec(model.low_noise),
                model.boundary, model.guide_scales)
    if not hasattr(model, "spec"):
        raise WorkerError("multi-GPU sampling needs a model from WanCore Load Diffusion Model "
                          "(a file the workers can read), not an in-memory model")
    return ("dit", model.spec())


def build_model(spec: tuple, prepare: Callable):
    """The model a spec describes, its experts loading on demand through ``prepare``."""
    from ..loading.on_demand import OnDemandDiT
    from ..pipeline import MoEModel, StepCached

    kind = spec[0]
    if kind == "cached":
        return StepCached(build_model(spec[1], prepare), spec[2], spec[3])
    if kind == "moe":
        high, low = build_model(spec[1], prepare), build_model(spec[2], prepare)
        return MoEModel(high, low, spec[3], spec[4], offload=_release_idle)
    handle = OnDemandDiT.from_spec(spec[1])
    handle.prepare = prepare
    return handle


def _release_idle(active, idle) -> None:
    if idle is not None:
        idle.release()


def _release(model) -> None:
    from ..pipeline import unwrap_cache

    model, _ = unwrap_cache(model)
    for expert in getattr(model, "experts", (model,)):
        expert.release()


# ------------------------------------------------------------------------------ the workers

def _parent_alive(pid: int) -> bool:
    """Whether the host that started this worker still runs (a worker outliving a killed
    ComfyUI would wait for jobs forever)."""
    if os.getppid() != pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _worker(rank: int, settings: PoolSettings, port: int, jobs, results, cancel,
            parent: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(settings.processes),
                      LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from ..pipeline import generate
    from ..sampling import SamplingCancelled
    from . import init

    try:
        ctx = init(settings.ulysses_size, settings.cfg_parallel, settings.dit_fsdp,
                   device=settings.device)
    except Exception as e:                                  # noqa: BLE001 - reported
        results.put(("error", rank, f"{type(e).__name__}: {e}"))
        return
    results.put(("ready", rank, str(ctx.device)))
    spec, model = None, None
    flag = torch.zeros(1, device=ctx.device)

    def cancelled() -> bool:        # every rank stops at the same step: rank 0 decides
        flag.fill_(1.0 if rank == 0 and cancel.is_set() else 0.0)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def progress(step, total, x, x0) -> None:
        if rank == 0:
            results.put(("progress", step, total))

    while True:
        try:
            job = jobs.get(timeout=ORPHAN_CHECK_S)
        except queue.Empty:
            if _parent_alive(parent):
                continue
            break
        if job is None:
            break
        try:
            if job.model != spec:
                if model is not None:
                    _release(model)
                model, spec = build_model(job.model, ctx.prepare_dit), job.model
                if rank == 0:
                    results.put(("loaded", rank, repr(spec[0])))
            latent = generate(model, job.context, job.negative_context, job.cond,
                              callback=progress, cancel=cancelled, device=ctx.device,
                              parallel=ctx, **job.kwargs)
            if rank == 0:
                results.put(("done", rank, latent))
        except SamplingCancelled:
            if rank == 0:
                results.put(("cancelled", rank, None))
        except Exception as e:                              # noqa: BLE001 - reported
            results.put(("error", rank, f"{type(e).__name__}: {e}\n"
                                        f"{traceback.format_exc()[-800:]}"))
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def _main_not_reimported():
    """Start spawned workers without re-running the host's main script: multiprocessing's
    spawn makes each child import the parent's ``__main__`` (ComfyUI's main.py, which sets up
    paths, memory management and every pack's start-up script). The workers need only
    wan_core, so the main module is hidden from the start-up data while they start."""
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__")
             if main is not None and hasattr(main, name)}
    try:
        if main is not None:
            main.__spec__ = None
            if "__file__" in saved:
                del main.__file__
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerPool:
    """``settings.processes`` workers in one process group, alive until :meth:`close`."""

    def __init__(self, settings: PoolSettings, start_timeout: float = 300.0):
        import torch.multiprocessing as mp

        if settings.processes < 1:
            raise ValueError(f"a worker pool needs at least 1 process (got {settings.processes})")
        self.settings = settings
        context = mp.get_context("spawn")
        self._jobs = [context.Queue() for _ in range(settings.processes)]
        self._results = context.Queue()
        self._cancel = context.Event()
        port = _free_port()
        self._procs = [context.Process(target=_worker, daemon=True, name=f"wancore-rank{r}",
                                       args=(r, settings, port, self._jobs[r], self._results,
                                             self._cancel, os.getpid()))
                       for r in range(settings.processes)]
        with _main_not_reimported():
            for p in self._procs:
                p.start()
        self.devices = {}
        self.loads = 0
        try:
            while len(self.devices) < settings.processes:
                kind, rank, detail = self._next(start_timeout)
                if kind == "error":
                    raise WorkerError(f"worker {rank} could not start: {detail}")
                self.devices[rank] = detail
        except BaseException:
            self.close()
            raise

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def _next(self, timeout: Optional[float] = None):
        """The next message from a worker; WorkerError when a worker died meanwhile."""
        waited = 0.0
        while True:
            try:
                return self._results.get(timeout=POLL_S)
            except queue.Empty:
                waited += POLL_S
                dead = [(r, p.exitcode) for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead:
                    self.close()
                    rank, code = dead[0]
                    raise WorkerError(f"worker {rank} died (exit code {code}); the workers are "
                                      "restarted on the next run") from None
                if timeout is not None and waited >= timeout:
                    self.close()
                    raise WorkerError(f"the workers did not answer within {timeout:.0f} s")

    def run(self, job: SamplingJob, progress: Optional[Callable[[int, int], None]] = None,
            interrupted: Optional[Callable[[], bool]] = None) -> torch.Tensor:
        """Sample ``job`` on every worker; returns rank 0's latent (float32, CPU). When
        ``interrupted()`` returns True the workers stop at the next step and
        ``SamplingCancelled`` is raised here."""
        from ..sampling import SamplingCancelled

        if not self.alive:
            raise WorkerError("the worker pool was closed or a worker died; make a new pool")
        self._cancel.clear()
        for jobs in self._jobs:
            jobs.put(job)
        while True:
            if interrupted is not None and not self._cancel.is_set():
                try:
                    stop = interrupted()
                except BaseException:
                    self._cancel.set()
                    self._drain()
                    raise
                if stop:
                    self._cancel.set()
            kind, a, b = self._next()
            if kind == "progress" and progress is not None:
                try:
                    progress(a, b)
                except BaseException:      # e.g. a host whose progress hook raises to cancel
                    self._cancel.set()
                    self._drain()
                    raise
            elif kind == "loaded":
                self.loads += 1
            elif kind == "done":
                return b
            elif kind == "cancelled":
                raise SamplingCancelled("sampling cancelled (every worker stopped)")
            elif kind == "error":
                # The other ranks may be waiting in a collective for the failed one: start
                # fresh processes next time rather than wait for their timeout.
                self.close()
                raise WorkerError(f"worker {a}: {b}")

    def _drain(self, timeout: float = 60.0) -> None:
        """After a cancel: wait for rank 0 to report the stop, so the next job starts clean."""
        try:
            while True:
                kind, _, _ = self._next(timeout)
                if kind in ("done", "cancelled", "error"):
                    return
        except WorkerError:
            return

    def close(self) -> None:
        """Stop the workers (they finish the current job first when they can)."""
        for jobs in self._jobs:
            try:
                jobs.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
