"""Motion paths for the demo's VACE task: the object follows a path drawn as a silhouette clip.

The text model only moves the object in a straight line left, right, up or down at one speed
(``clips.py``). With the demo's VACE module (``vace_module.safetensors``) a *control clip* sets
the path instead: a white disc moving over black (the silhouette), which the VACE blocks read
while the prompt still sets shape, colour and background.

A :class:`MotionPath` is a list of keyframes ``(t, x, y)``: time 0..1 over the clip, position of
the object's centre (its area centroid) in fractions of the frame, x to the right, y down; the
position is interpolated linearly between keyframes. It renders at any size and frame count::

    path = parse_path("diagonal")                      # a named path
    path = parse_path("0.2,0.2:0.8,0.5:0.8,0.5")       # waypoints at equal time steps
    control = render_control(path, frames=17, size=64, shape="square")  # [T, H, W, 3] in 0..1

Waypoints given as ``x,y:x,y:...`` are reached at equal time intervals (the first at the first
frame, the last at the last frame), so a repeated waypoint is a pause. The random training paths and the clips the VACE demo is
trained to make are in ``training/paths.py``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .clips import HALF_SIZE, coverage

DEMO_HALF = sum(HALF_SIZE) / 2   # object half size of the CLI's paths: the middle of the trained sizes
SILHOUETTE = (1.0, 1.0, 1.0)  # the control clip: the object's shape (or a disc) in white on black


@dataclass(frozen=True)
class MotionPath:
    """Keyframes ``((t, x, y), ...)`` with t rising from 0 to 1; positions in frame fractions."""
    keys: tuple
    family: str = "custom"

    def position(self, t: float) -> tuple[float, float]:
        keys = self.keys
        if t <= keys[0][0]:
            return keys[0][1], keys[0][2]
        for (t0, x0, y0), (t1, x1, y1) in zip(keys, keys[1:]):
            if t <= t1:
                a = 0.0 if t1 == t0 else (t - t0) / (t1 - t0)
                return x0 + a * (x1 - x0), y0 + a * (y1 - y0)
        return keys[-1][1], keys[-1][2]

    def positions(self, frames: int) -> np.ndarray:
        """``[frames, 2]`` (x, y) in frame fractions, one per frame."""
        return np.asarray([self.position(i / max(frames - 1, 1)) for i in range(frames)],
                          np.float32)

    def pixels(self, frames: int, size: int) -> np.ndarray:
        """``[frames, 2]`` (x, y) in pixel coordinates (pixel i spans i - 0.5 .. i + 0.5), the
        frame of reference of ``training.analysis``' centroids."""
        return self.positions(frames) * size - 0.5


def waypoints_path(points, family: str) -> MotionPath:
    n = len(points)
    return MotionPath(tuple((i / (n - 1), float(x), float(y)) for i, (x, y) in enumerate(points)),
                      family)


def bezier_points(p0, p1, p2, count: int = 9) -> list:
    out = []
    for i in range(count):
        s = i / (count - 1)
        out.append(tuple((1 - s) ** 2 * a + 2 * (1 - s) * s * b + s * s * c
                         for a, b, c in zip(p0, p1, p2)))
    return out


NAMED = {
    "diagonal": waypoints_path([(0.22, 0.22), (0.78, 0.78)], "line"),
    "diagonal-up": waypoints_path([(0.22, 0.78), (0.78, 0.22)], "line"),
    "curve": waypoints_path(bezier_points((0.2, 0.72), (0.5, 0.05), (0.8, 0.72)), "curve"),
    "stop": MotionPath(((0.0, 0.22, 0.5), (0.5, 0.65, 0.5), (1.0, 0.65, 0.5)), "stop"),
    "turn": waypoints_path([(0.25, 0.25), (0.75, 0.25), (0.75, 0.75)], "turn"),
}
PATH_HELP = ("a named path (" + ", ".join(NAMED) + ") or waypoints 'x,y:x,y[:...]' in fractions "
             "of the frame (0..1, y down), reached at equal time intervals (repeat a point to "
             "pause), e.g. '0.2,0.8:0.5,0.2:0.8,0.8'")
_NUMBER = r"\s*[-+]?(?:\d+\.?\d*|\.\d+)\s*"
_POINT_RE = re.compile(rf"^({_NUMBER}),({_NUMBER})$")


def parse_path(spec: str) -> MotionPath:
    """A named path or ``x,y:x,y[:...]`` waypoints (see :data:`PATH_HELP`); ValueError with the
    reason for anything else."""
    text = str(spec).strip()
    if text.lower() in NAMED:
        return NAMED[text.lower()]
    parts = text.split(":")
    if len(parts) < 2:
        raise ValueError(f"--path {spec!r} is not a path: give {PATH_HELP}")
    points = []
    for part in parts:
        m = _POINT_RE.match(part)
        if m is None:
            raise ValueError(f"--path {spec!r}: waypoint {part!r} is not 'x,y' (two numbers "
                             f"0..1, e.g. 0.2,0.8); give {PATH_HELP}")
        x, y = float(m.group(1)), float(m.group(2))
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise ValueError(f"--path {spec!r}: waypoint {part.strip()!r} is outside the frame; "
                             f"x and y are fractions of the frame, 0..1")
        points.append((x, y))
    return waypoints_path(points, "custom")


# ------------------------------------------------------------------------------ rendering

def shape_at(shape: str, x: float, y: float, half: float, size: int) -> np.ndarray:
    """Coverage [size, size] of ``shape`` with its area centroid at (x, y) (the triangle's box
    centre sits half/3 above its centroid)."""
    lift = half / 3 if shape == "triangle" else 0.0
    return coverage(shape, x, y - lift, half, size)


def render_control(path: MotionPath, frames: int = 17, size: int = 64,
                   half: float = DEMO_HALF, shape: str | None = None) -> np.ndarray:
    """The silhouette clip ``[T, H, W, 3]`` float32 in 0..1: white on black, centred on the
    path: ``shape`` (circle, square, triangle) of half size ``half``, or with ``shape=None`` a
    disc of radius ``half`` (shape-agnostic: the prompt then picks the shape)."""
    out = np.zeros((frames, size, size, 3), np.float32)
    for t, (x, y) in enumerate(path.positions(frames)):
        out[t] = shape_at(shape or "circle", float(x), float(y), half, size)[..., None] * \
            np.asarray(SILHOUETTE, np.float32)
    return out
