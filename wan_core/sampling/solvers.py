"""One sampling loop for flow-matching video latents, with pluggable single-step solvers.

The loop evaluates the model once per step, converts the velocity into a clean-latent
prediction ``x0 = x - sigma * v`` and hands it to a solver step. Solvers are short functions

    step(x, v, x0s, sigmas, i, memory) -> x at sigmas[i + 1]

with ``x0s`` the clean-latent predictions so far (newest last; the loop keeps the last 3),
``sigmas`` the schedule's noise levels as Python floats (their float32 values) and ``memory``
a dict the solver may use to carry state between its steps.

Solver maths is written in the flow parameterisation alpha = 1 - sigma, with the half
log-SNR lambda = log(alpha / sigma) as the ODE time (see the UniPC and DPM-Solver++ papers);
scalar coefficients are computed in float64.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .schedule import Schedule, SigmaLike, schedule_from_sigmas

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""velocity_fn(x [B, C, F, H, W], t [B] float32 integer timesteps) -> velocity like x."""


class SamplingCancelled(RuntimeError):
    """Raised between steps when the ``cancel`` callable passed to :func:`sample` returns True."""


def noise_latent(latent: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The flow-matching forward process: ``(1 - sigma) * latent + sigma * noise`` (vid2vid
    starts sampling from this at the first sigma of a shortened schedule)."""
    sigma = float(sigma)
    return (1.0 - sigma) * latent + sigma * noise


def _log_snr(sigma: float) -> float:
    """lambda = log((1 - sigma) / sigma), +inf at sigma 0 and -inf at sigma 1."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


# --- solvers -----------------------------------------------------------------------------

def euler_step(x, v, x0s, sigmas, i, memory):
    """First-order flow step ``x + (sigma_next - sigma) * v``."""
    return x + (sigmas[i + 1] - sigmas[i]) * v


def dpmpp_step(x, v, x0s, sigmas, i, memory):
    """DPM-Solver++ (2M, midpoint) on x0 predictions, as the official
    FlowDPMSolverMultistepScheduler runs it: first order on the first step of a run and on the
    last step (final sigma 0), second order in between."""
    s, s_next = sigmas[i], sigmas[i + 1]
    h = _log_snr(s_next) - _log_snr(s)
    coef = (1.0 - s_next) * math.expm1(-h)  # alpha_next * (e^-h - 1)
    x_next = (s_next / s) * x - coef * x0s[-1]
    if 0 < i < len(sigmas) - 2:
        ratio = (_log_snr(s) - _log_snr(sigmas[i - 1])) / h
        slope = (x0s[-1] - x0s[-2]) / ratio  # 0 when the previous sigma was 1 (ratio inf)
        x_next = x_next - 0.5 * coef * slope
    return x_next


def _unipc_corrector(x_prev, x0s, sigmas, i, order):
    """UniC (B(h) = e^h - 1, "bh2"): re-estimate the sample at sigmas[i] from the sample at
    sigmas[i - 1], now that the model's prediction at sigmas[i] (x0s[-1]) is known."""
    s_prev, s = sigmas[i - 1], sigmas[i]
    h = _log_snr(s) - _log_snr(s_prev)
    b_h = math.expm1(-h)
    alpha = 1.0 - s
    m_now, m_prev = x0s[-1], x0s[-2]
    base = (s / s_prev) * x_prev - alpha * b_h * m_prev
    if order == 1:
        return base - alpha * b_h * 0.5 * (m_now - m_prev)
    # order 2: solve [[1, 1], [r, 1]] @ (rho_older, rho_now) = (b1, b2)
    r = (_log_snr(sigmas[i - 2]) - _log_snr(s_prev)) / h
    phi2 = b_h / -h - 1.0
    phi3 = phi2 / -h - 0.5
    b1, b2 = phi2 / b_h, 2.0 * phi3 / b_h
    rho_older = (b1 - b2) / (1.0 - r)
    rho_now = b1 - rho_older
    older_slope = (x0s[-3] - m_prev) / r
    return base - alpha * b_h * (rho_older * older_slope + rho_now * (m_now - m_prev))


def _unipc_predictor(x, x0s, sigmas, i, order):
    """UniP (bh2): step from sigmas[i] to sigmas[i + 1] using x0s[-1] (and x0s[-2] at order 2)."""
    s, s_next = sigmas[i], sigmas[i + 1]
    h = _log_snr(s_next) - _log_snr(s)
    b_h = math.expm1(-h)
    alpha_next = 1.0 - s_next
    x_next = (s_next / s) * x - alpha_next * b_h * x0s[-1]
    if order == 2:
        r = (_log_snr(sigmas[i - 1]) - _log_snr(s)) / h
        x_next = x_next - alpha_next * b_h * 0.5 * (x0s[-2] - x0s[-1]) / r
    return x_next


def unipc_step(x, v, x0s, sigmas, i, memory):
    """UniPC as the official FlowUniPCMultistepScheduler runs it (bh2, solver order 2,
    x0 prediction): correct the current sample with the new prediction (from the second step
    of a run on), then predict the next one. Order 1 on the first step (warm-up) and on the
    last step (lower-order final)."""
    if "x" in memory:
        x = _unipc_corrector(memory["x"], x0s, sigmas, i, memory["order"])
    order = min(2, len(sigmas) - 1 - i, i + 1)
    memory["x"], memory["order"] = x, order
    return _unipc_predictor(x, x0s, sigmas, i, order)


# "distilled": Euler updates on the step-distilled grid (see schedule.distilled_schedule).
SOLVERS = {"euler": euler_step, "unipc": unipc_step, "dpm++": dpmpp_step, "distilled": euler_step}


# --- the loop ----------------------------------------------------------------------------

@torch.no_grad()
def sample(velocity_fn: VelocityFn, noise: torch.Tensor, sigmas: Schedule | SigmaLike,
           solver: str = "unipc", *,
           callback: Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]] = None,
           cancel: Optional[Callable[[], bool]] = None,
           after_step: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Integrate the flow ODE from ``sigmas[0]`` down to ``sigmas[-1]``.

    velocity_fn: ``velocity_fn(x, t)`` with x like ``noise`` and t a float32 [B] tensor of the
        schedule's timestep (what the DiT is conditioned on); returns the velocity.
        :func:`wan_core.sampling.make_velocity_fn` builds one with CFG and MoE switching.
    noise: [B, C, F, H, W] the starting latent, i.e. pure noise for sigmas[0] ~ 1, or
        :func:`noise_latent` of an input latent for a shortened (vid2vid) schedule.
    sigmas: a :class:`Schedule` (exact official timesteps, e.g. from ``flow_schedule``) or
        N + 1 sigma values (timesteps are then ``trunc(sigma * 1000)``).
    solver: ``"unipc"`` (official default), ``"dpm++"``, ``"euler"`` or ``"distilled"`` (Euler;
        pair it with :func:`wan_core.sampling.distilled_schedule`).
    callback: ``callback(step, total, x, x0)`` after each step, step = 1..total, with the new
        sample and the clean-latent prediction of that step (for progress and previews).
    cancel: checked before every model evaluation; when it returns True,
        :class:`SamplingCancelled` is raised. Exceptions raised by ``cancel`` or ``callback``
        themselves (e.g. a host's own interruption error) propagate unchanged.
    after_step: ``x = after_step(x)`` after every step, e.g. to re-impose known latent frames
        (TI2V); solver history is kept as computed.

    Returns the sample at sigmas[-1] (the clean latent when it is 0), in ``noise``'s dtype
    (keep latents float32, as the official code does). Runs without autograd.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    schedule = sigmas if isinstance(sigmas, Schedule) else schedule_from_sigmas(sigmas)
    step_fn = SOLVERS[solver]
    levels = [float(s) for s in schedule.sigmas]
    total = len(schedule)
    batch = noise.shape[0]
    x, x0s, memory = noise, [], {}
    for i in range(total):
        if cancel is not None and cancel():
            raise SamplingCancelled(f"sampling cancelled before step {i + 1} of {total}")
        t = schedule.timesteps[i].to(device=x.device, dtype=torch.float32).expand(batch)
        v = velocity_fn(x, t).to(x.dtype)
        x0 = x - levels[i] * v
        x0s = (x0s + [x0])[-3:]
        x = step_fn(x, v, x0s, levels, i, memory)
        if after_step is not None:
            x = after_step(x)
        if callback is not None:
            callback(i + 1, total, x, x0)
    return x
