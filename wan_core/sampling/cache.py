"""Step caching: skip whole model evaluations where the velocity barely changes between steps.

A cache wraps the per-step model evaluation of :func:`wan_core.sampling.make_velocity_fn` (the
DiT itself is untouched). Before each step it estimates how far the model's output has drifted
since the last step it really evaluated; while that accumulated estimate stays below the
``threshold`` it returns a reused velocity instead of running the model (both CFG halves, or
the single pass at cfg 1, are skipped together: one decision per step). Three estimators:

- ``easycache`` (training-free): the output changes ``k`` times as fast as the input, with
  ``k = (|d v| / |v|) / (|d x| / |x|)`` measured between the last two evaluated steps;
  accumulate ``k * |x_i - x_{i-1}| / |x_{i-1}|`` (|.| = mean absolute value).
- ``magcache``: the velocity's magnitude curve ``log |v|(sigma)``, recorded once per model by
  :class:`CacheCalibration`; accumulate ``|1 - prod(ratio)|`` over the ratios of consecutive
  magnitudes since the last evaluation.
- ``teacache``: the relative L1 change of the model's projected time embedding ``e0``
  (``WanDiT.embed_time``) rescaled by a degree-4 polynomial per model (the published Wan 2.1
  coefficients, or fitted by :class:`CacheCalibration`); accumulate.

With ``sigma_weight`` p > 0 each step's estimate is multiplied by ``(sigma / (1 - sigma)) ** p``
(1 at sigma 0.5): an error made at high noise moves the video's layout and every later step
builds on it, one made near the end only touches detail, so the budget is spent late (README
"Step caching" has what it does on the demo: more skips at 50 steps, worse at 20; off by
default).

A skipped step returns the last evaluated velocity, extrapolated linearly in sigma from the last
two evaluations of the same expert (``reuse='extrapolate'``, the default) or unchanged
(``reuse='velocity'``). The velocity returned is the one the solver sees and stores, so the
multistep solvers (UniPC, DPM++) keep a history consistent with what they integrated. The
first ``start`` and the steps after ``end`` (fractions of the steps actually run, so vid2vid
counts from its first step) are always evaluated; at most ``max_skips`` steps are skipped in a
row; the Wan 2.2 expert switch drops all state (the first step of each expert is evaluated).
The high-noise expert of a pair can have its own ``high_noise_threshold`` and
``high_noise_max_skips``: it lays out the video, so a skip there costs more than one in the
low-noise expert (README "Step caching" has the measured trade-off).

    from wan_core.sampling import CacheSettings
    latent = generate(model, ctx, neg, cond, cache="easycache")                 # defaults
    latent = generate(model, ctx, neg, cond, cache=CacheSettings("easycache", threshold=0.1))
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

CACHE_METHODS = ("easycache", "magcache", "teacache")
REUSE_MODES = ("extrapolate", "velocity")
CALIBRATION_FILE = Path(__file__).with_name("cache_calibration.json")
"""Shipped calibration: the embedded demo models (MagCache curves, TeaCache fits) and the
published TeaCache coefficients of the Wan 2.1 models, keyed by :func:`calibration_key`."""


@dataclass(frozen=True)
class CacheSettings:
    """How a step cache decides (see the module docstring).

    method: one of :data:`CACHE_METHODS`.
    threshold: skip while the accumulated change estimate stays below this (> 0; larger =
        faster, less faithful).
    start / end: fractions of the steps actually run; steps before ``start * N`` and from
        ``end * N`` on are always evaluated.
    max_skips: at most this many steps skipped in a row (0 = never skip).
    reuse: what a skipped step returns, ``'extrapolate'`` or ``'velocity'``.
    sigma_weight: exponent p of the noise-level weight ``(sigma / (1 - sigma)) ** p`` on each
        step's estimate (0 = unweighted).
    calibration: MagCache / TeaCache data for the model: a dict as returned by
        :meth:`CacheCalibration.result`, or a JSON file written by :func:`save_calibration`;
        None looks the model up in :data:`CALIBRATION_FILE`.
    high_noise_threshold / high_noise_max_skips: ``threshold`` and ``max_skips`` inside the
        high-noise expert of a Wan 2.2 pair (the first of the two); None = the same as the
        rest. A single model ignores them.
    """

    method: str = "easycache"
    threshold: float = 0.3
    start: float = 0.2
    end: float = 1.0
    max_skips: int = 4
    reuse: str = "extrapolate"
    sigma_weight: float = 0.0
    calibration: Any = field(default=None, compare=False)
    high_noise_threshold: Optional[float] = None
    high_noise_max_skips: Optional[int] = None

    def __post_init__(self):
        if self.method not in CACHE_METHODS:
            raise ValueError(f"unknown cache method {self.method!r}; choose one of "
                             f"{', '.join(CACHE_METHODS)}")
        start, end = _number(self.start, "start"), _number(self.end, "end")
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"cache start and end are fractions of the steps with "
                             f"0 <= start <= end <= 1 (got start {self.start}, end {self.end})")
        optional = {"high_noise_threshold", "high_noise_max_skips"}
        for name in ("threshold", "high_noise_threshold"):
            value = getattr(self, name)
            if (value is not None or name not in optional) and not _number(value, name) > 0:
                raise ValueError(f"cache {name} must be a positive number (got {value})")
        for name in ("max_skips", "high_noise_max_skips"):
            value = getattr(self, name)
            if (value is None and name in optional) or (
                    isinstance(value, (int, float)) and not isinstance(value, bool)
                    and int(value) == value and value >= 0):
                continue
            raise ValueError(f"{name} must be a whole number >= 0 (got {value!r})")
        weight = _number(self.sigma_weight, "sigma_weight")
        if not 0.0 <= weight <= 4.0:
            raise ValueError(f"cache sigma_weight must be between 0 and 4 (got "
                             f"{self.sigma_weight})")
        if self.reuse not in REUSE_MODES:
            raise ValueError(f"reuse must be one of {', '.join(REUSE_MODES)} (got {self.reuse!r})")

    def start_run(self, sigmas: Sequence[float], experts: Sequence) -> "StepCache":
        """The per-run state for a schedule with ``sigmas`` [N + 1] and these model(s)."""
        return StepCache(self, sigmas, experts)

    def limits(self, expert: int, pair: bool) -> tuple:
        """``(threshold, max_skips)`` inside ``expert`` (its index; ``pair``: one of two)."""
        if pair and expert == 0:
            return (self.threshold if self.high_noise_threshold is None
                    else self.high_noise_threshold,
                    self.max_skips if self.high_noise_max_skips is None
                    else self.high_noise_max_skips)
        return self.threshold, self.max_skips


def _number(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"cache {name} must be a number (got {value!r})") from None
    if math.isnan(number):
        raise ValueError(f"cache {name} must be a number (got NaN)")
    return number


# Defaults: chosen on the embedded demo with benchmarks/cache.py (README "Step caching" has the
# measured speed and PSNR). Noise weighting (sigma_weight 0.5, threshold 0.5, start 0.1, at most
# 4 skips) skips more at 50 steps (2.8x fewer T2V evaluations against 2.45x on 32 held-out
# prompts) but loses more at 20, the demo's default: it stays an option, not the default.
DEFAULTS = {
    # max_skips 4 (was 3; issue 29): at 50 steps 3 capped the speed-up at 2.5x (10 steps kept
    # + one evaluation per 4 steps); at 20 steps the threshold binds first.
    "easycache": CacheSettings("easycache", threshold=0.3, start=0.2, max_skips=4),
    "magcache": CacheSettings("magcache", threshold=0.05, start=0.25, max_skips=2),
    "teacache": CacheSettings("teacache", threshold=0.1, start=0.25, max_skips=2),
}


def cache_settings(cache, threshold: Optional[float] = None) -> Optional[CacheSettings]:
    """Resolve a ``cache=`` argument: None (off), a name from :data:`CACHE_METHODS` (its
    defaults), a :class:`CacheSettings` or anything with ``start_run`` (e.g. a
    :class:`CacheCalibration`). ``threshold`` overrides the threshold of a named method."""
    if cache is None:
        return None
    if isinstance(cache, str):
        name = cache.strip().lower()
        if name not in DEFAULTS:
            raise ValueError(f"unknown cache method {cache!r}; choose one of "
                             f"{', '.join(CACHE_METHODS)}")
        settings = DEFAULTS[name]
        return settings if threshold is None else replace(settings, threshold=threshold)
    if threshold is not None and isinstance(cache, CacheSettings):
        return replace(cache, threshold=threshold)
    if not hasattr(cache, "start_run"):
        raise TypeError(f"cache must be None, a method name ({', '.join(CACHE_METHODS)}) or "
                        f"CacheSettings (got {type(cache).__name__})")
    return cache


# --- calibration data ------------------------------------------------------------------

def calibration_key(experts: Sequence) -> str:
    """The key calibration data is stored under: the detected variant of a known Wan model
    (e.g. ``wan2.1-t2v-1.3B``), else ``custom-<hash of its time-embedding weights>``; an
    expert pair joins its two keys with ``+``."""
    return "+".join(_model_key(model) for model in experts)


def _network(model):
    """The network behind ``model``: an on-demand model (``wan_core.loading.on_demand``) is
    loaded, anything else is itself."""
    return model.load() if hasattr(model, "load") and hasattr(model, "release") else model


def _model_key(model) -> str:
    variant = getattr(getattr(model, "config", None), "variant", "custom")
    if variant != "custom":
        return variant
    digest = hashlib.sha1()
    module = getattr(_network(model), "time_embedding", None)
    for tensor in (module.state_dict().values() if module is not None else ()):
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return f"custom-{digest.hexdigest()[:12]}"


def load_calibration(source=None) -> dict:
    """``{key: {"magcache": ..., "teacache": ...}}`` from a JSON file (default: the shipped
    :data:`CALIBRATION_FILE`), or a dict returned as is."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source) if source is not None else CALIBRATION_FILE
    if not path.exists():
        if source is None:
            return {}
        raise FileNotFoundError(f"cache calibration file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a cache calibration file (JSON written by "
                         f"--calibrate-cache / save_calibration): {e}") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path} is not a cache calibration file (its JSON is not a table)")
    return table


def save_calibration(data: Mapping, path) -> None:
    """Merge ``data`` (``{key: {...}}`` from :meth:`CacheCalibration.result`) into the JSON
    file at ``path`` (created if missing)."""
    path = Path(path)
    path.write_text(merged_calibration_json(data, path), encoding="utf-8")


def merged_calibration_json(data: Mapping, path) -> str:
    """The JSON text of the calibration file at ``path`` (if any) with ``data`` merged in."""
    path = Path(path)
    merged = load_calibration(path) if path.exists() else {}
    for key, value in data.items():
        merged.setdefault(key, {}).update(value)
    return json.dumps(merged, indent=1, sort_keys=True) + "\n"


def _lookup(settings: CacheSettings, keys: Sequence[str]):
    """The MagCache / TeaCache data of ``settings.method`` for models with calibration
    ``keys`` (one per expert), or None when the table has none."""
    table = load_calibration(settings.calibration)
    if settings.calibration is not None and settings.method in table:
        return table[settings.method]  # a single-model result passed directly
    entry = table.get("+".join(keys), {}).get(settings.method)
    if entry is None and len(keys) == 2 and settings.method == "teacache":
        parts = [table.get(key, {}).get("teacache") for key in keys]
        if all(p is not None for p in parts):
            entry = {"experts": parts}
    return entry


def missing_calibration(settings: CacheSettings, keys: Sequence[str]) -> Optional[str]:
    """Why ``settings`` cannot run on models with calibration ``keys`` (a message naming the
    working choices), or None when it can (easycache always can)."""
    if settings.method == "easycache" or _lookup(settings, keys) is not None:
        return None
    where = "the shipped table" if settings.calibration is None else "the calibration given"
    return (f"{settings.method} needs calibration data for this model ({'+'.join(keys)}) and "
            f"{where} has none. Use easycache (training-free, needs none), or record the data "
            f"once: add --calibrate-cache FILE to a normal run (Python: "
            f"wan_core.pipeline.calibrate_cache), then use --cache {settings.method} "
            f"--cache-calibration FILE (Python: CacheSettings(calibration=FILE))")


def config_calibration_keys(configs: Sequence) -> Optional[list]:
    """The calibration keys of models known from their configs alone (released Wan variants);
    None when a model is custom (its key needs its weights, see :func:`calibration_key`)."""
    keys = [getattr(config, "variant", "custom") for config in configs]
    return None if "custom" in keys else keys


def check_calibration(settings, configs: Sequence) -> None:
    """Raise a ValueError (see :func:`missing_calibration`) when ``settings`` (None, a
    :class:`CacheSettings` or a recorder) cannot run on the models of ``configs``; checked
    before any model is loaded. Custom models are checked when sampling starts."""
    if not isinstance(settings, CacheSettings):
        return
    keys = config_calibration_keys(configs)
    problem = None if keys is None else missing_calibration(settings, keys)
    if problem:
        raise ValueError(problem)


def _method_data(settings: CacheSettings, experts: Sequence):
    """The MagCache / TeaCache data for these models, or a ValueError saying how to get it."""
    keys = [_model_key(model) for model in experts]
    problem = missing_calibration(settings, keys)
    if problem:
        raise ValueError(problem)
    return _lookup(settings, keys)


# --- shared helpers --------------------------------------------------------------------

def _mean_abs(x: torch.Tensor) -> float:
    return float(x.abs().mean())


def _rel_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    """Relative L1 change ``mean|new - old| / mean|old|``."""
    return float((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12))


def _time_embedding(model, t: torch.Tensor) -> torch.Tensor:
    """The projected time embedding e0 [6, dim] float32 of the scalar timestep ``t[0]``
    (per-token TI2V timesteps [B, L] use their first row's largest value, the noisy tokens)."""
    value = t.reshape(t.shape[0], -1)[0].max().reshape(1)
    _, e0, _ = _network(model).embed_time(value, 1, 1)
    return e0[0].float()


def noise_weight(sigma: float, power: float) -> float:
    """``(sigma / (1 - sigma)) ** power``, sigma clamped to [0.001, 0.999]: how much a change
    estimate at noise level ``sigma`` counts (1 at sigma 0.5)."""
    sigma = min(max(float(sigma), 1e-3), 1.0 - 1e-3)
    return (sigma / (1.0 - sigma)) ** power


def teacache_rescale(coefficients: Sequence[float], distance: float) -> float:
    """TeaCache's estimate of the relative output change from the relative change of the time
    embedding: the polynomial ``coefficients`` (highest power first) at ``distance``."""
    return float(np.polyval(np.asarray(coefficients, dtype=np.float64), distance))


# --- the per-run cache -----------------------------------------------------------------

class StepCache:
    """One sampling run's cache state (made by :meth:`CacheSettings.start_run`).

    ``make_velocity_fn`` calls :meth:`lookup` before each step's model evaluation and
    :meth:`store` after it. ``evaluated`` / ``skipped`` count the steps.
    """

    def __init__(self, settings: CacheSettings, sigmas: Sequence[float], experts: Sequence):
        self.settings = settings
        self.sigmas = [float(s) for s in sigmas]
        self.total = len(self.sigmas) - 1
        self.first = math.ceil(settings.start * self.total - 1e-9)
        self.last = math.ceil(settings.end * self.total - 1e-9)  # steps >= last are evaluated
        self.method = settings.method
        self.pair = len(experts) == 2
        self.data = None if self.method == "easycache" else _method_data(settings, experts)
        if self.method == "magcache":
            curve = self.data
            order = np.argsort(curve["sigmas"])
            self._mag_sigmas = np.asarray(curve["sigmas"], dtype=np.float64)[order]
            self._mag_logs = np.asarray(curve["log_norms"], dtype=np.float64)[order]
        self.step = 0
        self.evaluated = 0
        self.skipped = 0
        self._reset(None)

    def _reset(self, expert: Optional[int]) -> None:
        self.expert = expert
        self.history: list = []      # [(sigma, x, v)] of the last two evaluated steps
        self.prev_x: Optional[torch.Tensor] = None   # input of the previous step
        self.error = 0.0
        self.ratio = 1.0
        self.run = 0                 # steps skipped in a row
        self.k: Optional[float] = None
        self.prev_e0: Optional[torch.Tensor] = None

    def _coefficients(self, expert: int) -> Sequence[float]:
        if "experts" in self.data:
            return self.data["experts"][expert]["coefficients"]
        if "per_expert" in self.data:
            return self.data["per_expert"][expert]
        return self.data["coefficients"]

    def _log_norm(self, sigma: float) -> float:
        return float(np.interp(sigma, self._mag_sigmas, self._mag_logs))

    def lookup(self, x: torch.Tensor, t: torch.Tensor, expert: int, model) -> Optional[torch.Tensor]:
        """The velocity to use at this step instead of evaluating ``model``, or None.

        x [B, C, F, H, W] the step's input; t the model's timestep ([B] or per-token [B, L]);
        expert the index of the active expert (0, or 1 after the Wan 2.2 switch)."""
        i = self.step
        if i >= self.total:
            raise RuntimeError("the step cache was used for more steps than its schedule has")
        self.step += 1
        sigma = self.sigmas[i]
        if expert != self.expert:
            self._reset(expert)
        threshold, max_skips = self.settings.limits(expert, self.pair)
        estimate = None
        if self.method == "teacache":
            e0 = _time_embedding(model, t)
            if self.prev_e0 is not None:
                estimate = teacache_rescale(self._coefficients(expert), _rel_l1(e0, self.prev_e0))
            self.prev_e0 = e0
        may_skip = (self.history and self.first <= i < self.last
                    and self.run < max_skips)
        if may_skip and self.method == "easycache":
            if self.k is not None and self.prev_x is not None:
                estimate = self.k * _rel_l1(x, self.prev_x)
        elif may_skip and self.method == "magcache":
            prev_sigma = self.sigmas[i - 1]
            self.ratio *= math.exp(self._log_norm(sigma) - self._log_norm(prev_sigma))
            estimate = abs(1.0 - self.ratio)
        self.prev_x = x
        if may_skip and estimate is not None and self.settings.sigma_weight:
            estimate *= noise_weight(sigma, self.settings.sigma_weight)
        if may_skip and estimate is not None and self.error + estimate < threshold:
            self.error += estimate
            self.run += 1
            self.skipped += 1
            return self._reuse(sigma, x)
        return None

    def _reuse(self, sigma: float, x: torch.Tensor) -> torch.Tensor:
        s1, _, v1 = self.history[-1]
        if self.settings.reuse == "velocity" or len(self.history) < 2:
            return v1
        s0, _, v0 = self.history[-2]
        if s0 == s1:
            return v1
        return v1 + (sigma - s1) / (s1 - s0) * (v1 - v0)

    def store(self, x: torch.Tensor, v: torch.Tensor) -> None:
        """Record the evaluated velocity ``v`` (like x) of the current step."""
        sigma = self.sigmas[self.step - 1]
        if self.method == "easycache" and self.history:
            _, x_old, v_old = self.history[-1]
            dx = _rel_l1(x, x_old)
            self.k = _rel_l1(v, v_old) / dx if dx > 0 else None
        self.history = (self.history + [(sigma, x, v)])[-2:]
        self.evaluated += 1
        self.error, self.ratio, self.run = 0.0, 1.0, 0


# --- calibration -----------------------------------------------------------------------

class CacheCalibration:
    """Pass as ``cache=`` to record what MagCache and TeaCache need from one uncached run
    (nothing is skipped, so the result is the uncached output); then :meth:`result`.

    Records, per step: the schedule's sigma, ``log mean|v|`` of the guided velocity (MagCache's
    magnitude curve) and, per expert, the relative L1 change of the time embedding e0 against
    that of the velocity (the points TeaCache's polynomial is fitted to). Deterministic: the
    same run gives the same numbers.
    """

    def __init__(self, degree: int = 4):
        self.degree = degree
        self.key: Optional[str] = None
        self.sigmas: list = []
        self.log_norms: list = []
        self.points: list = []    # per expert: [(embedding change, output change)]
        self.evaluated = self.skipped = 0

    def start_run(self, sigmas: Sequence[float], experts: Sequence) -> "CacheCalibration":
        self.key = calibration_key(experts)
        self._sigmas = [float(s) for s in sigmas]
        self.points = [[] for _ in experts]
        self.step, self._last = 0, None
        return self

    def lookup(self, x, t, expert, model):
        network = _network(model)
        self._e0 = _time_embedding(network, t) if hasattr(network, "embed_time") else None
        self._expert = expert
        self.step += 1
        return None

    def store(self, x, v):
        self.evaluated += 1
        self.sigmas.append(self._sigmas[self.step - 1])
        self.log_norms.append(math.log(max(_mean_abs(v), 1e-12)))
        last = self._last
        if last is not None and last[0] == self._expert and self._e0 is not None:
            self.points[self._expert].append((_rel_l1(self._e0, last[1]), _rel_l1(v, last[2])))
        self._last = (self._expert, self._e0, v)

    def result(self) -> dict:
        """``{key: {"magcache": {"sigmas", "log_norms"}, "teacache": {...}}}`` for
        :func:`save_calibration` or ``CacheSettings(calibration=...)``."""
        if self.key is None or len(self.sigmas) < 2:
            raise RuntimeError("run generate(..., cache=CacheCalibration()) first")
        entry = {"magcache": {"sigmas": self.sigmas, "log_norms": self.log_norms}}
        fits = []
        for points in self.points:
            if len(points) <= self.degree:
                fits = None
                break
            xs, ys = np.array(points, dtype=np.float64).T
            fits.append([float(c) for c in np.polyfit(xs, ys, self.degree)])
        if fits:
            entry["teacache"] = ({"coefficients": fits[0]} if len(fits) == 1
                                 else {"per_expert": fits})
        return {self.key: entry}
