"""Flow-matching noise schedules: sigma grids and the integer timesteps the model sees.

Wan is trained as a rectified flow: ``x_sigma = (1 - sigma) * x0 + sigma * noise``, sigma in
[0, 1], and the DiT is conditioned on ``t = sigma * 1000``. The official samplers build their
grid in float64 and truncate ``t`` to an integer *before* the sigmas are rounded to float32, so
the integer timesteps cannot be recovered from float32 sigmas (``float32(0.7) * 1000`` truncates
to 699, not 700). A :class:`Schedule` therefore carries both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000

# The official UniPC scheduler starts from the largest training sigma, 1 - 1/1000, which it
# stores as float32 and reads back as a Python float: 0.9990000128746033, not 0.999.
OFFICIAL_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))

# The official `dpm++` path builds its grid with linspace(1, 0) (get_sampling_sigmas).
SIGMA_MAX_BY_SOLVER = {"unipc": OFFICIAL_SIGMA_MAX, "euler": OFFICIAL_SIGMA_MAX, "dpm++": 1.0}

# Step-distilled Wan LoRAs (LightX2V, Wan2.2-Lightning) were trained with Euler updates at these
# settings: 4 steps, shift 5, no CFG (the Wan 2.2 pairs switch experts after step 2).
DISTILLED_STEPS = 4
DISTILLED_SHIFT = 5.0
DISTILLED_CFG = 1.0

SigmaLike = Union[torch.Tensor, np.ndarray, Sequence[float]]


@dataclass(frozen=True)
class Schedule:
    """A sampling schedule of N steps.

    sigmas:    float32 [N + 1]; step i goes from sigmas[i] to sigmas[i + 1] (last is usually 0).
    timesteps: [N]; the model is evaluated at timesteps[i] during step i: int64 for the official
               grids, float32 for the step-distilled grid (:func:`distilled_schedule`).
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    def __post_init__(self):
        if self.sigmas.ndim != 1 or self.timesteps.ndim != 1:
            raise ValueError("sigmas and timesteps must be 1-D")
        if len(self.sigmas) != len(self.timesteps) + 1:
            raise ValueError(f"a schedule of N steps needs N + 1 sigmas and N timesteps "
                             f"(got {len(self.sigmas)} sigmas, {len(self.timesteps)} timesteps)")

    def __len__(self) -> int:
        return len(self.timesteps)

    def from_step(self, start: int) -> "Schedule":
        """The same grid without its first ``start`` steps (vid2vid / ``denoise`` < 1)."""
        if not 0 <= start < len(self):
            raise ValueError(f"start must be in [0, {len(self)}) for a {len(self)}-step schedule "
                             f"(got {start})")
        return Schedule(self.sigmas[start:], self.timesteps[start:])


def _float64(values: SigmaLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().to(torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def shift_sigmas(sigmas: SigmaLike, shift: float) -> np.ndarray:
    """Resolution shift ``s * sigma / (1 + (s - 1) * sigma)`` in float64 (shift > 1 spends more
    steps at high noise). Returns a float64 numpy array."""
    if shift <= 0:
        raise ValueError(f"shift must be positive (got {shift})")
    sigmas = _float64(sigmas)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def timesteps_for(sigmas: SigmaLike) -> torch.Tensor:
    """Integer timesteps ``trunc(sigma * 1000)`` (int64, one per given sigma), computed from the
    float64 value of each sigma as the official schedulers do."""
    return torch.from_numpy((_float64(sigmas) * NUM_TRAIN_TIMESTEPS).astype(np.int64))


def schedule_from_sigmas(sigmas: SigmaLike) -> Schedule:
    """A schedule from user-given sigmas, ComfyUI style: N + 1 values, the last one where
    sampling ends (0 for a clean result). No shift is applied; see :func:`shift_sigmas`."""
    values = _float64(sigmas)
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"need at least 2 sigmas (start and end of one step), got shape "
                         f"{tuple(values.shape)}")
    if not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 1:
        raise ValueError("flow-matching sigmas must lie in [0, 1]")
    if np.any(np.diff(values) >= 0):
        raise ValueError("sigmas must be strictly decreasing")
    return Schedule(torch.from_numpy(values.astype(np.float32)), timesteps_for(values[:-1]))


def flow_schedule(steps: int, shift: float = 1.0, sigma_max: float | None = None,
                  sigma_min: float = 0.0) -> Schedule:
    """The official grid: ``steps`` values evenly spaced from ``sigma_max`` towards
    ``sigma_min`` (the endpoint itself excluded), shifted, then a final sigma of 0.

    ``sigma_max`` defaults to :data:`OFFICIAL_SIGMA_MAX` (the official UniPC grid); the official
    dpm++ grid uses 1.0 (see :func:`solver_schedule`).
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer (got {steps})")
    top = OFFICIAL_SIGMA_MAX if sigma_max is None else float(sigma_max)
    if not 0 <= sigma_min < top <= 1:
        raise ValueError(f"need 0 <= sigma_min < sigma_max <= 1 (got {sigma_min}, {top})")
    levels = shift_sigmas(np.linspace(top, sigma_min, int(steps) + 1)[:-1], shift)
    sigmas = np.concatenate([levels, [0.0]]).astype(np.float32)
    return Schedule(torch.from_numpy(sigmas), timesteps_for(levels))


def flow_sigmas(steps: int, shift: float = 1.0, sigma_max: float | None = None,
                sigma_min: float = 0.0) -> torch.Tensor:
    """float32 [steps + 1] sigmas of :func:`flow_schedule` (last is 0). Pass the whole
    :class:`Schedule` to the sampler when exact official timesteps matter."""
    return flow_schedule(steps, shift, sigma_max, sigma_min).sigmas


def distilled_schedule(steps: int = DISTILLED_STEPS, shift: float = DISTILLED_SHIFT) -> Schedule:
    """The grid of the step-distilled Wan LoRAs: the training timesteps ``1000 * (1 - i/steps)``
    (4 steps: 1000, 750, 500, 250) looked up on a 1000-point float32 grid ``linspace(1, 0)``
    shifted by ``shift`` (4 steps at shift 5: t = 1000, 937.5, 833.3, 625), then a final 0.

    Unlike the official grids, the model is evaluated at these float timesteps (not truncated).
    """
    if int(steps) != steps or not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be an integer in [1, {NUM_TRAIN_TIMESTEPS}] (got {steps})")
    if not shift > 0:
        raise ValueError(f"shift must be positive (got {shift})")
    grid = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float32)[:-1]
    grid = shift * grid / (1 + (shift - 1) * grid)
    index = [NUM_TRAIN_TIMESTEPS - round(NUM_TRAIN_TIMESTEPS * (1 - i / steps))
             for i in range(int(steps))]
    levels = grid[index]
    return Schedule(torch.cat([levels, levels.new_zeros(1)]), levels * NUM_TRAIN_TIMESTEPS)


def solver_schedule(solver: str, steps: int, shift: float) -> Schedule:
    """The grid the official code pairs with ``solver`` (``unipc``: 0.999.. start; ``dpm++``:
    1.0 start). ``euler`` (not an official Wan solver) uses the UniPC grid; ``distilled`` is
    Euler on :func:`distilled_schedule`."""
    if solver == "distilled":
        return distilled_schedule(steps, shift)
    if solver not in SIGMA_MAX_BY_SOLVER:
        raise ValueError(f"unknown solver {solver!r}; choose one of "
                         f"{sorted(SIGMA_MAX_BY_SOLVER) + ['distilled']}")
    return flow_schedule(steps, shift, sigma_max=SIGMA_MAX_BY_SOLVER[solver])
