"""Classifier-free guidance and Wan 2.2 expert (MoE) switching, in one place.

:func:`make_velocity_fn` turns one model, or a (high-noise, low-noise) pair of experts, plus
the conditional and unconditional inputs into the ``velocity_fn(x, t)`` that
:func:`wan_core.sampling.sample` integrates. Models are callables

    model(x [B, C, F, H, W], t [B] or per-token [B, L], context, clip_fea=None, y=None) -> velocity

(the ``wan_core`` DiT signature); ``context`` is [B, L, D] or a list of [L_i, D].
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..ops.streaming import place, unstream
from .schedule import NUM_TRAIN_TIMESTEPS

Model = Callable[..., torch.Tensor]
Cond = Mapping[str, Any]  # {"context": ..., "clip_fea": ... or None, "y": ... or None, ...}


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, official form: ``uncond + scale * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


class OffloadIdleExpert:
    """Offload hook keeping only the active expert on ``device``: the idle one goes first (so
    two are never resident), then the active one is brought in. An idle expert that can be
    ``release()``d (``wan_core.loading.on_demand.OnDemandDiT``) is dropped from memory and
    re-read from its file when needed; any other goes to ``idle_device``. Works with anything
    that has ``.to(device)`` (``torch.nn.Module``)."""

    def __init__(self, device: Union[str, torch.device],
                 idle_device: Union[str, torch.device] = "cpu"):
        self.device, self.idle_device = torch.device(device), torch.device(idle_device)

    def __call__(self, active: Model, idle: Optional[Model]) -> None:
        if idle is not None:
            release = getattr(idle, "release", None)
            if release is not None:
                release()
            else:
                unstream(idle)
                idle.to(self.idle_device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if hasattr(active, "release"):
            active.to(self.device)
        else:
            place(active, self.device)          # honours the model's block streaming


def _pair(value, count: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} needs {count} value(s), one per model (got {len(value)})")
        return tuple(value)
    return (value,) * count


def _concat_contexts(cond, uncond):
    if isinstance(cond, (list, tuple)) and isinstance(uncond, (list, tuple)):
        return list(cond) + list(uncond)
    if not (torch.is_tensor(cond) and torch.is_tensor(uncond)):
        raise TypeError("cond and uncond context must both be tensors [B, L, D] or both lists")
    # Zero-pad text to a common length: exact for the Wan DiT, which zero-pads text to its
    # 512-token length before embedding it anyway.
    length = max(cond.shape[1], uncond.shape[1])
    cond, uncond = (F.pad(c, (0, 0, 0, length - c.shape[1])) for c in (cond, uncond))
    return torch.cat([cond, uncond])


# Inputs the DiT broadcasts over the batch (a batch of 1 serves both CFG halves): VACE control
# latents (a tensor, or a list of them for several controls) and their scales.
_SHARED_KEYS = ("vace_context", "vace_scale")


def _batch_conds(cond: Cond, uncond: Cond) -> dict:
    """One model-input dict with the conditional rows first, the unconditional rows second."""
    batched = {}
    for key in cond.keys() | uncond.keys():
        a, b = cond.get(key), uncond.get(key)
        if a is None and b is None:
            batched[key] = None
        elif key in _SHARED_KEYS and a is b:
            batched[key] = a
        elif a is None or b is None:
            raise ValueError(f"{key!r} is given for only one of cond / uncond")
        elif key == "context":
            batched[key] = _concat_contexts(a, b)
        elif torch.is_tensor(a):
            batched[key] = torch.cat([a, b])
        elif isinstance(a, (list, tuple)):
            batched[key] = list(a) + list(b)
        elif a == b:
            batched[key] = a  # plain settings shared by both halves (e.g. a sequence length)
        else:
            raise ValueError(f"{key!r} differs between cond and uncond and cannot be batched")
    return batched


def make_velocity_fn(models: Union[Model, Sequence[Model]], cond: Cond,
                     uncond: Optional[Cond] = None,
                     guide_scale: Union[float, Sequence[float]] = 5.0,
                     boundary: Optional[float] = None, *, batch_cfg: bool = True,
                     offload: Optional[Callable[[Model, Optional[Model]], None]] = None,
                     timestep_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                     cache=None, cfg_split: Optional[Callable] = None):
    """Build ``velocity_fn(x, t)`` for :func:`wan_core.sampling.sample`.

    models: one model, or ``(high_noise, low_noise)`` Wan 2.2 experts.
    cond / uncond: model inputs besides x and t: ``context`` (required), ``clip_fea``, ``y``
        (any other key is passed through). Keys missing from ``uncond`` are taken from ``cond``
        (Wan's CFG changes only the text), so ``uncond`` is usually ``{"context": negative}``.
        ``uncond=None`` disables guidance.
    guide_scale: one scale, or one per expert ordered like ``models`` (high, low) -- note the
        official configs list them the other way round, (low, high).
    boundary: with two experts, the high-noise one runs while ``t >= boundary * 1000``
        (0.875 for T2V-A14B, 0.900 for I2V-A14B), the low-noise one after.
    batch_cfg: evaluate cond and uncond as one batch of 2B (faster, more memory) instead of
        two forwards. A scale of exactly 1 skips the unconditional forward.
    offload: ``offload(active, idle)`` called whenever the expert in use changes (and before
        the first forward), e.g. :class:`OffloadIdleExpert` (only one expert resident).
    timestep_fn: maps t [B] to the model's timestep argument (per-token [B, L] for TI2V).
    cache: a step cache for this run (``CacheSettings.start_run(sigmas, experts)``, see
        :mod:`wan_core.sampling.cache`): asked before every step whether to reuse a velocity
        instead of evaluating the model (one decision for both CFG halves), told the velocity
        of every evaluated step. ``velocity_fn`` must then be called once per step, in order.
    cfg_split: CFG parallelism (``wan_core.parallel.ParallelContext.cfg_split``):
        ``cfg_split(run_cond, run_uncond) -> (v_cond, v_uncond)`` runs one of the two passes on
        this process and receives the other from its partner; None runs both here.
    """
    experts = tuple(models) if isinstance(models, (list, tuple)) else (models,)
    if len(experts) not in (1, 2):
        raise ValueError(f"expected one model or a (high_noise, low_noise) pair, "
                         f"got {len(experts)}")
    if len(experts) == 2 and boundary is None:
        raise ValueError("two experts need a boundary (e.g. 0.875 for Wan 2.2 T2V-A14B)")
    if boundary is not None and not 0.0 <= boundary <= 1.0:
        raise ValueError(f"boundary is a fraction of the 1000 training timesteps, in [0, 1] "
                         f"(got {boundary})")
    scales = _pair(guide_scale, len(experts), "guide_scale")
    if "context" not in cond:
        raise ValueError("cond needs a 'context' (text embeddings)")
    cond = dict(cond)
    paired = None
    if uncond is not None:
        uncond = {**cond, **uncond}
        if batch_cfg:
            paired = _batch_conds(cond, uncond)
    switch_at = None if len(experts) == 1 else boundary * NUM_TRAIN_TIMESTEPS
    active = [None]  # index of the expert currently in use

    def select(t: torch.Tensor) -> int:
        index = 0 if switch_at is None or float(t.reshape(-1)[0]) >= switch_at else 1
        if index != active[0]:
            if offload is not None:
                offload(experts[index], experts[1 - index] if len(experts) == 2 else None)
            active[0] = index
        return index

    def velocity_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        index = select(t)
        model, scale = experts[index], scales[index]
        model_t = t if timestep_fn is None else timestep_fn(t)
        if cache is not None:
            reused = cache.lookup(x, model_t, index, model)
            if reused is not None:
                return reused
        velocity = evaluate(model, scale, x, model_t)
        if cache is not None:
            cache.store(x, velocity)
        return velocity

    def evaluate(model: Model, scale: float, x: torch.Tensor, model_t: torch.Tensor):
        if uncond is None or scale == 1.0:
            return model(x, model_t, **cond)
        if cfg_split is not None:
            v_cond, v_uncond = cfg_split(lambda: model(x, model_t, **cond),
                                         lambda: model(x, model_t, **uncond))
        elif batch_cfg:
            both = model(torch.cat([x, x]), torch.cat([model_t, model_t]), **paired)
            v_cond, v_uncond = both.chunk(2)
        else:
            v_cond = model(x, model_t, **cond)
            v_uncond = model(x, model_t, **uncond)
        return guide(v_cond, v_uncond, scale)

    return velocity_fn
