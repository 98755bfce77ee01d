"""Sampling for flow-matching Wan models: schedules, solvers in one loop, CFG and MoE.

    from wan_core.sampling import flow_schedule, make_velocity_fn, sample
    schedule = flow_schedule(steps=50, shift=5.0)              # official UniPC grid
    velocity = make_velocity_fn(dit, {"context": pos}, {"context": neg}, guide_scale=5.0)
    latent = sample(velocity, noise, schedule, solver="unipc", callback=progress)

Step caching (``cache=`` of ``wan_core.pipeline.generate``): :mod:`wan_core.sampling.cache`.
"""
from .cache import (CACHE_METHODS, CacheCalibration, CacheSettings, StepCache, cache_settings,
                    calibration_key, check_calibration, load_calibration, save_calibration,
                    teacache_rescale)
from .guidance import OffloadIdleExpert, guide, make_velocity_fn
from .schedule import (DISTILLED_CFG, DISTILLED_SHIFT, DISTILLED_STEPS, NUM_TRAIN_TIMESTEPS,
                       OFFICIAL_SIGMA_MAX, Schedule, distilled_schedule, flow_schedule,
                       flow_sigmas, schedule_from_sigmas, shift_sigmas, solver_schedule,
                       timesteps_for)
from .settings import SEED_MAX, check_sampling_settings
from .solvers import SOLVERS, SamplingCancelled, noise_latent, sample
from .windows import BLENDS, SCHEDULES, ContextWindows

__all__ = [
    "CACHE_METHODS", "CacheCalibration", "CacheSettings", "StepCache", "cache_settings",
    "calibration_key", "check_calibration", "load_calibration", "save_calibration", "teacache_rescale",
    "DISTILLED_CFG", "DISTILLED_SHIFT", "DISTILLED_STEPS", "NUM_TRAIN_TIMESTEPS", "OFFICIAL_SIGMA_MAX", "OffloadIdleExpert", "SOLVERS",
    "SamplingCancelled", "Schedule", "flow_schedule", "flow_sigmas", "guide",
    "distilled_schedule", "make_velocity_fn", "noise_latent", "sample", "schedule_from_sigmas", "shift_sigmas",
    "solver_schedule", "timesteps_for", "SEED_MAX", "check_sampling_settings",
    "BLENDS", "SCHEDULES", "ContextWindows",
]
