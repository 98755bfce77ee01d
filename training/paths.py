"""Training data of the demo's VACE module: random motion paths and the clips it should make.

Four path families: ``line`` (straight, any direction, diagonals included), ``curve`` (a
quadratic Bezier arc), ``stop`` (straight, then standing still) and ``turn`` (two straight legs
with a corner). The paths, the silhouette renderer and ``parse_path`` the CLI uses are in the
library (``wan_core.demo.paths``); what only training needs lives here.
"""
from __future__ import annotations

import math
import random

import numpy as np

from wan_core.demo.clips import BACKGROUNDS, COLOURS, MARGIN, Combo
from wan_core.demo.paths import (DEMO_HALF, MotionPath, bezier_points, shape_at,
                                 waypoints_path)

FAMILIES = ("line", "curve", "stop", "turn")
MIN_LENGTH = 0.25            # shortest movement of a random path (fraction of the frame)


def _bounds(half: float) -> tuple[float, float]:
    """Range of centroid positions that keeps every shape of ``half`` inside the frame (the
    triangle's centroid sits half/3 below its box centre)."""
    lo = half * 4 / 3 + MARGIN
    return lo, 1.0 - lo


def random_path(seed: int, family: str | None = None, half: float = DEMO_HALF) -> MotionPath:
    """A random path of ``family`` (default: one of :data:`FAMILIES` drawn from the seed) that
    keeps an object of ``half`` in frame and moves it at least ``MIN_LENGTH``."""
    rng = random.Random(f"path/{seed}")
    family = family or FAMILIES[rng.randrange(len(FAMILIES))]
    lo, hi = _bounds(half)
    # the lengths were chosen for the objects of half-side 0.11-0.14 (room 0.63); a larger
    # object leaves less room (half 0.23: 0.35). Kept below 0.7 x room, the distance from any
    # point to the farthest corner, so that far_point always has somewhere to go
    room = hi - lo
    min_length, curve_length, turn_leg = (min(MIN_LENGTH, 0.5 * room), min(0.35, 0.6 * room),
                                          min(0.2, 0.4 * room))

    def point():
        return rng.uniform(lo, hi), rng.uniform(lo, hi)

    def far_point(p, min_length=min_length):
        while True:
            q = point()
            if math.dist(p, q) >= min_length:
                return q

    p0 = point()
    if family == "line":
        return waypoints_path([p0, far_point(p0)], family)
    if family == "curve":
        p2 = far_point(p0, curve_length)
        mid = ((p0[0] + p2[0]) / 2, (p0[1] + p2[1]) / 2)
        nx, ny = -(p2[1] - p0[1]), p2[0] - p0[0]             # perpendicular, |n| = |p2 - p0|
        for _ in range(100):
            bend = rng.choice((-1, 1)) * rng.uniform(0.4, 1.0)
            arc = bezier_points(p0, (mid[0] + bend * nx, mid[1] + bend * ny), p2)
            if all(lo <= v <= hi for q in arc for v in q):
                return waypoints_path(arc, family)
        return random_path(seed * 7919 + 1, family, half)     # no arc fits: another start
    if family == "stop":
        p1 = far_point(p0)
        t_stop = rng.uniform(0.3, 0.7)
        return MotionPath(((0.0, *p0), (t_stop, *p1), (1.0, *p1)), family)
    if family == "turn":
        p1 = far_point(p0, turn_leg)
        while True:
            p2 = far_point(p1, turn_leg)
            a = (p1[0] - p0[0], p1[1] - p0[1])
            b = (p2[0] - p1[0], p2[1] - p1[1])
            cos = (a[0] * b[0] + a[1] * b[1]) / (math.hypot(*a) * math.hypot(*b))
            if cos < 0.5:                                     # a real corner (> 60 degrees)
                break
        t_turn = rng.uniform(0.35, 0.65)
        return MotionPath(((0.0, *p0), (t_turn, *p1), (1.0, *p2)), family)
    raise ValueError(f"unknown path family {family!r}; known: {', '.join(FAMILIES)}")


def random_half(seed: int) -> float:
    from wan_core.demo import clips   # read at call time: --object-size may change it

    return random.Random(f"half/{seed}").uniform(*clips.HALF_SIZE)



def render_on_path(combo: Combo, path: MotionPath, half: float = DEMO_HALF, frames: int = 17,
                   size: int = 64) -> np.ndarray:
    """``combo``'s object (its direction word ignored) with its area centroid on ``path``, as
    ``[T, H, W, 3]`` float32 in 0..1: what the VACE demo is asked to make."""
    fg = np.asarray(COLOURS[combo.colour], np.float32) / 255.0
    bg = np.asarray(BACKGROUNDS[combo.background], np.float32) / 255.0
    out = np.empty((frames, size, size, 3), np.float32)
    for t, (x, y) in enumerate(path.positions(frames)):
        a = shape_at(combo.shape, float(x), float(y), half, size)
        out[t] = bg + a[..., None] * (fg - bg)
    return out
