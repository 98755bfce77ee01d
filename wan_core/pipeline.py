"""Video generation: text (+ image) embeddings -> latent, as the official Wan code does it.

One function, :func:`generate`, serves every task; the task is decided by the conditioning:

- T2V: ``VideoConditioning`` with only a size;
- 2.1 I2V / FLF2V: ``y`` (mask + image latent) and ``clip_fea`` (CLIP tokens);
- 2.2 I2V-A14B: ``y`` only;
- TI2V-5B: ``first_latent``, whose tokens get timestep 0 and which is re-imposed each step;
- VACE: ``vace`` control latents (and scales), with ``trim`` reference-image latent frames in
  front of the video that are sampled along and dropped from the result;
- vid2vid: ``init_latent`` with ``denoise`` < 1 (0: ``init_latent`` comes back unchanged).

``model`` is one DiT or a :class:`MoEModel` (Wan 2.2 high-noise + low-noise experts). Noise is
drawn on the CPU from ``seed``, so a seed gives the same video on every device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from .errors import require_finite
from .models.configs import DiTConfig, expert_pair_mismatch
from .conditioning import (VideoConditioning, check_video_size, latent_shape,
                           per_token_timesteps)
from .sampling import (CacheCalibration, CacheSettings, cache_settings,
                       check_sampling_settings, make_velocity_fn, noise_latent, sample,
                       solver_schedule)
from .sampling.windows import context_windows_for, slice_inputs, windowed_velocity_fn

log = logging.getLogger(__name__)

MOE_BOUNDARIES = {"t2v": 0.875, "i2v": 0.900}


@dataclass
class MoEModel:
    """Wan 2.2 A14B: two experts switched at ``boundary`` (a fraction of 1000 timesteps).

    ``guide_scales``: (high-noise, low-noise) CFG scales, or None to use the sampler's cfg for
    both. ``offload``: ``offload(active, idle)`` called when the expert in use changes.
    """
    high_noise: torch.nn.Module
    low_noise: torch.nn.Module
    boundary: float
    guide_scales: Optional[tuple] = None
    offload: Optional[Callable] = None

    def __post_init__(self):
        high, low = (getattr(e, "config", None) for e in self.experts)
        if isinstance(high, DiTConfig) and isinstance(low, DiTConfig):
            problem = expert_pair_mismatch(high, low)
            if problem:
                raise ValueError(problem)

    @property
    def config(self):
        return self.high_noise.config

    @property
    def experts(self) -> tuple:
        return (self.high_noise, self.low_noise)


@dataclass
class StepCached:
    """A model (one DiT or a :class:`MoEModel`) paired with sampling options, as the WanCore
    Step Cache and WanCore Context Windows nodes output it; :func:`generate` unwraps it. The
    model is shared, not copied. ``cache``: a ``wan_core.sampling.CacheSettings`` or None;
    ``windows``: a ``wan_core.sampling.ContextWindows`` or None."""
    model: Any
    cache: Any
    windows: Any = None

    @property
    def config(self):
        return self.model.config


def unwrap_cache(model) -> tuple:
    """``(model, cache settings or None)`` of a possibly :class:`StepCached` model."""
    if isinstance(model, StepCached):
        return model.model, model.cache
    return model, None


def unwrap_options(model) -> tuple:
    """``(model, cache settings or None, context windows or None)``."""
    if isinstance(model, StepCached):
        return model.model, model.cache, model.windows
    return model, None, None


def with_options(model, cache=None, windows=None):
    """``model`` carrying these sampling options (itself when there are none)."""
    return model if cache is None and windows is None else StepCached(model, cache, windows)


def default_boundary(model_type: str) -> float:
    """The official switch point for a Wan 2.2 expert pair of ``model_type``."""
    return MOE_BOUNDARIES["t2v" if model_type in ("t2v", "vace") else "i2v"]


def vae_stride_for(latent_channels: int) -> int:
    """Spatial VAE stride implied by the DiT's latent channels (48: Wan 2.2 VAE, else 2.1)."""
    return 16 if latent_channels == 48 else 8


def draw_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """float32 Gaussian noise ``[1, *shape]`` drawn on the CPU (device-independent seeds).

    Seeds below 2**32 give the official ``torch.randn(*shape, generator=seeded CPU generator)``.
    PyTorch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so seeds from 2**32
    on would repeat those videos (2**32 would equal 0): they draw from NumPy's PCG64 seeded with
    the whole number instead, so every seed in 0 .. 2**64-1 gives its own noise, the same on
    every machine."""
    seed = int(seed)
    if seed < 2**32:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(*shape, generator=generator, dtype=torch.float32)[None]
    rng = np.random.Generator(np.random.PCG64(seed))
    return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))[None]


def check_denoise(denoise) -> float:
    """``denoise`` as a float in [0, 1], else ValueError (NaN, a bool and text included)."""
    if not (isinstance(denoise, (int, float)) and not isinstance(denoise, bool)
            and 0.0 <= denoise <= 1.0):
        raise ValueError(f"denoise must be a number from 0 to 1 (got {denoise!r}): 1 generates "
                         "from noise, below 1 starts from an input video's latent (video-to-"
                         "video), 0 returns that latent unchanged")
    return float(denoise)


def denoise_start(steps: int, denoise: float,
                  max_total: Optional[int] = None) -> tuple[int, int]:
    """``(total, start)``: run the last ``steps`` of a ``total``-step grid, ComfyUI's KSampler
    rule: ``total = int(steps / denoise)`` (at least ``steps``), ``start = total - steps``.

    ``denoise`` 0 gives ``(steps, steps)``: no step runs. ``max_total`` caps ``total`` (the
    distilled grid is looked up on 1000 training timesteps, so it has at most 1000 steps)."""
    denoise = check_denoise(denoise)
    if denoise == 0.0:
        return steps, steps
    total = max(steps, int(steps / denoise))
    if max_total is not None:
        total = max(steps, min(total, max_total))
    return total, total - steps


def denoise_schedule(solver: str, steps: int, shift: float, denoise: float):
    """``(schedule, start)``: the ``steps`` steps a run at ``denoise`` (in (0, 1]) takes, the last
    ones of ``solver``'s ``total``-step grid (:func:`denoise_start`). The distilled solver keeps
    its own family of grids (its training timesteps ``1000 * (1 - i / total)`` shifted), capped
    at 1000 steps."""
    from .sampling.schedule import NUM_TRAIN_TIMESTEPS

    cap = NUM_TRAIN_TIMESTEPS if solver == "distilled" else None
    total, start = denoise_start(steps, denoise, cap)
    return solver_schedule(solver, total, shift).from_step(start), start


def input_latent(init_latent: Optional[torch.Tensor], shape: Sequence[int],
                 cond: VideoConditioning) -> torch.Tensor:
    """The vid2vid input latent as ``[1, *shape]`` float32 on the CPU (checked).

    With VACE reference images (``cond.trim`` leading latent frames) the input may cover the
    video only: the references' own latents (from the control) are put in front of it."""
    if init_latent is None:
        raise ValueError("denoise below 1 needs an input latent to start from (encode the "
                         "input video with the VAE: WanCore VAE Encode, or --video)")
    init = init_latent.detach().float().cpu()
    if init.dim() == 4:
        init = init[None]
    video = (shape[0], shape[1] - cond.trim, *shape[2:])
    if cond.trim and tuple(init.shape[1:]) == tuple(video):
        references = cond.vace[0][0][:1, :shape[0], :cond.trim].float().cpu()
        init = torch.cat([references, init], dim=2)
    if init.dim() != 5 or init.shape[0] != 1 or tuple(init.shape[1:]) != tuple(shape):
        stride = cond.height // shape[2]
        got = tuple(init.shape[1:]) if init.dim() == 5 else tuple(init.shape)
        hint = ""
        if init.dim() == 5 and init.shape[0] == 1:
            hint = (f" (a {init.shape[4] * stride}x{init.shape[3] * stride} input of "
                    f"{(init.shape[2] - 1) * 4 + 1} frames for a {cond.width}x{cond.height}, "
                    f"{cond.frames}-frame video: encode the input at the video's size and "
                    "frame count)")
        raise ValueError(f"input latent has shape {got}, but the video settings need "
                         f"{tuple(video)}{hint}")
    return init


def start_latent(noise: torch.Tensor, init_latent: Optional[torch.Tensor],
                 cond: VideoConditioning, denoise: float, schedule, start: int) -> torch.Tensor:
    """Where sampling starts: the noise (``denoise`` 1), else the input latent noised to the
    schedule's first sigma, ``(1 - sigma) * input + sigma * noise``."""
    if denoise >= 1.0:
        return noise
    init = input_latent(init_latent, noise.shape[1:], cond)
    if start == 0:
        log.warning("denoise %g with %d steps rounds to the whole schedule: the input is noised "
                    "to sigma %.3f and barely kept; use a lower denoise or more steps",
                    denoise, len(schedule), float(schedule.sigmas[0]))
    return noise_latent(init, noise, float(schedule.sigmas[0]))


def _model_device(model) -> torch.device:
    module = model.experts[0] if isinstance(model, MoEModel) else model
    if isinstance(getattr(module, "device", None), torch.device):   # an on-demand model
        return module.device
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _to(value, device):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [v.to(device) for v in value]
    return value.to(device)


def generate(model: Union[torch.nn.Module, MoEModel], context, negative_context,
             cond: VideoConditioning, *, steps: int = 50, guide_scale: float = 5.0,
             shift: float = 5.0, solver: str = "unipc", seed: int = 0, denoise: float = 1.0,
             init_latent: Optional[torch.Tensor] = None, callback=None, cancel=None,
             batch_cfg: bool = True, device: Optional[torch.device] = None,
             cache=None, stats: Optional[dict] = None, parallel=None,
             context_windows=None) -> torch.Tensor:
    """Sample a normalised latent ``[1, C, F_lat, h, w]`` (float32, on the CPU).

    model: a DiT, a :class:`MoEModel`, or either wrapped in :class:`StepCached` (its cache
        settings apply unless ``cache`` is given).
    context / negative_context: text embeddings, a list with one ``[L, 4096]`` tensor (or a
        ``[1, L, 4096]`` tensor); ``negative_context=None`` disables CFG.
    cond: size and image conditioning (see the module docstring).
    guide_scale: CFG scale; for a :class:`MoEModel` its own ``guide_scales`` win when set.
    denoise / init_latent: video-to-video. Below 1, sampling starts from ``init_latent`` (the
        normalised latent of the input video, ``[1, C, F_lat, h, w]``) noised to the first
        sigma of the last ``steps`` steps of an ``int(steps / denoise)``-step grid (ComfyUI's
        KSampler rule; MoE experts switch at the same timesteps as on that grid). 0: no step
        runs and ``init_latent`` is returned unchanged (nothing is evaluated). 1: plain
        generation from noise (``init_latent`` is ignored).
    callback: ``callback(step, total, x, x0)``; cancel: returns True to stop (raises
        ``SamplingCancelled``).
    cache: step caching (:mod:`wan_core.sampling.cache`): None (off), a name from
        ``CACHE_METHODS`` (its default settings), a ``CacheSettings``, or a
        ``CacheCalibration`` (records MagCache / TeaCache data; skips nothing). Its step
        fractions count the steps actually run (vid2vid: from its first step). Logs
        "skipped K of N model evaluations" after sampling.
    stats: a dict that receives ``{"evaluated": N - K, "skipped": K, "steps": N}``.
    context_windows: a ``wan_core.sampling.ContextWindows`` (or the one the model carries):
        sample the latent as overlapping windows of the model's length, each with its own
        conditioning slice and step-cache state (see :mod:`wan_core.sampling.windows`).
    parallel: a ``wan_core.parallel.ParallelContext`` (multi-GPU): the model(s) must have been
        prepared with ``parallel.prepare_dit``; the CFG halves run on two rank groups when it
        has CFG parallelism. Every rank returns the same latent.
    """
    check_sampling_settings(steps=steps, cfg=guide_scale, shift=shift, seed=seed)
    denoise = check_denoise(denoise)
    model, carried, carried_windows = unwrap_options(model)
    settings = cache_settings(cache if cache is not None else carried)
    windows = context_windows_for(context_windows if context_windows is not None
                                  else carried_windows)
    config = model.config
    channels = config.out_dim
    stride = vae_stride_for(channels)
    check_video_size(cond.width, cond.height, cond.frames, stride)
    if config.model_type in ("i2v", "flf2v") and cond.y is None:
        raise ValueError(
            f"this is an image-to-video model ({getattr(config, 'variant', config.model_type)}): "
            "it needs a start image; use WanCore Image To Video (or --image) instead of an empty "
            "video")
    if getattr(config, "has_image_branch", False) and cond.clip_fea is None:
        raise ValueError("this Wan 2.1 I2V / FLF2V model needs CLIP vision image tokens: connect "
                         "a CLIP vision model (clip_vision_h) to WanCore Image To Video")
    if config.model_type in ("t2v", "vace") and cond.y is not None:
        raise ValueError("this is a text-to-video model; it cannot use a start image "
                         "(load an I2V model, or use WanCore Empty Video / WanCore VACE)")
    if cond.vace and not getattr(config, "is_vace", False):
        raise ValueError(f"VACE controls need a VACE model, and this is "
                         f"{getattr(config, 'variant', config.model_type)} "
                         f"({config.model_type}): load a Wan VACE model, or attach a VACE module "
                         "to this base model")

    device = device or _model_device(model)
    shape = latent_shape(channels, cond.frames, cond.height, cond.width, stride)
    if cond.trim:               # VACE reference images: latent frames in front of the video
        shape = (shape[0], shape[1] + cond.trim, *shape[2:])
    noise = draw_noise(shape, seed)

    if denoise == 0.0:        # no step runs: the input latent comes back unchanged
        if stats is not None:
            stats.update(evaluated=0, skipped=0, steps=0)
        return input_latent(init_latent, shape, cond)[:, :, cond.trim:].clone()
    schedule, start = denoise_schedule(solver, steps, shift, denoise)
    x = start_latent(noise, init_latent, cond, denoise, schedule, start)

    first = cond.first_latent
    if first is None:
        after_step = timestep_fn = None
    else:
        # TI2V: the given first latent frame is clean (timestep 0 for its tokens) and is put
        # back after every step, as the official loop does.
        first = first.to(device=device, dtype=torch.float32)
        x[:, :, :1] = first.cpu()
        f_lat, h, w = shape[1:]

        def after_step(latent):
            latent[:, :, :1] = first
            return latent

        def timestep_fn(t):
            return per_token_timesteps(t, f_lat, h, w, first_frame_known=True)

    extra = {"clip_fea": _to(cond.clip_fea, device), "y": _to(cond.y, device)}
    if cond.vace:
        extra["vace_context"] = [context.to(device) for context, _ in cond.vace]
        extra["vace_scale"] = [scale for _, scale in cond.vace]
    cond_inputs = {"context": _to(context, device), **extra}
    uncond_inputs = None if negative_context is None else {"context": _to(negative_context, device)}
    if isinstance(model, MoEModel):
        experts, boundary, offload = model.experts, model.boundary, model.offload
        scales = model.guide_scales or (guide_scale, guide_scale)
    else:
        experts, boundary, offload, scales = model, None, None, guide_scale
    experts_list = experts if isinstance(experts, tuple) else (experts,)
    cfg_split = None if parallel is None else parallel.cfg_split()
    caches = []

    def velocity_for(cond_part, uncond_part):
        step_cache = None if settings is None else settings.start_run(schedule.sigmas,
                                                                      experts_list)
        if step_cache is not None:
            caches.append(step_cache)
        return make_velocity_fn(experts, cond_part, uncond_part, scales, boundary,
                                batch_cfg=batch_cfg, offload=offload, timestep_fn=timestep_fn,
                                cache=step_cache, cfg_split=cfg_split)

    if windows is None:
        velocity_fn = velocity_for(cond_inputs, uncond_inputs)
    else:
        check_windows(windows, settings, first is not None)
        velocity_fn = windowed_velocity_fn(
            windows, shape[1] - cond.trim, cond.trim,
            lambda start, length: velocity_for(
                slice_inputs(cond_inputs, start, length, cond.trim),
                None if uncond_inputs is None else slice_inputs(uncond_inputs, start, length,
                                                                cond.trim)))
    out = sample(velocity_fn, x.to(device), schedule, solver, callback=callback, cancel=cancel,
                 after_step=after_step)
    if caches:
        skipped = sum(c.skipped for c in caches)
        evaluated = sum(c.evaluated for c in caches)
        log.info("step cache (%s): skipped %d of %d model evaluations",
                 getattr(settings, "method", "calibration"), skipped, skipped + evaluated)
        if stats is not None:
            stats.update(evaluated=evaluated, skipped=skipped, steps=skipped + evaluated)
    elif stats is not None:
        stats.update(evaluated=len(schedule), skipped=0, steps=len(schedule))
    out = out.float().cpu()[:, :, cond.trim:]
    require_finite(out, "the sampled latent")
    return out


def check_windows(windows, settings, first_frame_known: bool) -> None:
    """Context windows need a cache state per window and frame-aligned conditioning."""
    if first_frame_known:
        raise ValueError("context windows cannot split TI2V-5B's image-to-video run (its given "
                         "first frame belongs to one window); use text-to-video, or no windows")
    if settings is not None and not isinstance(settings, CacheSettings):
        raise ValueError("cache calibration records one run of the whole model: run it without "
                         "context windows")
    if settings is not None and windows.schedule != "static":
        raise ValueError("the step cache keeps one state per context window, so it needs the "
                         "windows to stay in place: use schedule 'static' with a step cache")


def calibrate_cache(model: Union[torch.nn.Module, MoEModel], context, negative_context,
                    cond: VideoConditioning, *, steps: int = 50, **kwargs) -> dict:
    """Record the MagCache magnitude curve and the TeaCache polynomial of ``model`` from one
    uncached run of :func:`generate` (same arguments; 50 steps by default). Deterministic.

    Returns ``{key: {"magcache": ..., "teacache": ...}}``: pass it as
    ``CacheSettings(method, threshold, calibration=result)`` or store it with
    ``wan_core.sampling.save_calibration(result, "my_calibration.json")``.
    """
    recorder = CacheCalibration()
    generate(model, context, negative_context, cond, steps=steps, cache=recorder, **kwargs)
    return recorder.result()
