"""The demo's world: one plain shape moving in a straight line over a plain background.

A clip is a :class:`ClipSpec`: *what* it shows (shape, colour, direction, background: the
:class:`Combo`, which the caption names) and *where* (start position, size), in fractions of the
frame so the same spec renders at any size. Over a clip the object travels ``TRAVEL`` of the
frame (about 29 px at 64 px) and always stays inside it.

The demo needs this to draw an I2V start image from a caption (``WanCore Demo First Frame``):

    frame = render(place(parse_caption("a red circle moving left on a blue background"), 0), 1)

The training set built from it (combinations, held-out split, clips) is ``training/dataset.py``.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
# Object colours sit near corners of the RGB cube so they stay apart after blur and noise.
COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 80, 240),
    "yellow": (245, 225, 30),
    "white": (245, 245, 245),
    "purple": (190, 40, 220),
}
BACKGROUNDS = {
    "black": (0, 0, 0),
    "gray": (120, 120, 120),
    "white": (255, 255, 255),
    "blue": (25, 45, 130),
}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y down

TRAVEL = 0.45                 # distance travelled over the whole clip, fraction of the frame
HALF_SIZE = (0.18, 0.23)      # half the bounding-box side, fraction of the frame (issue 27:
                              # 23-29 px on 64 px, about two DiT tokens; 0.11-0.14 before)
MARGIN = 0.02                 # gap kept between the object and the frame edge
SUPERSAMPLE = 4               # anti-aliasing factor of the renderer

CAPTION = "a {colour} {shape} moving {direction} on a {background} background"
_CAPTION_RE = re.compile(
    r"^\s*an? (?P<colour>\w+) (?P<shape>\w+) moving (?P<direction>\w+) "
    r"on an? (?P<background>\w+) background\s*\.?\s*$", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class Combo:
    """What a clip shows; the caption names exactly these four attributes."""
    shape: str
    colour: str
    direction: str
    background: str

    @property
    def caption(self) -> str:
        return CAPTION.format(**self.__dict__)


@dataclass(frozen=True)
class ClipSpec:
    """A fully determined clip: a :class:`Combo` plus placement (fractions of the frame).

    ``x0, y0``: the object's centre at the first frame; ``half``: half its bounding-box side.
    """
    combo: Combo
    x0: float
    y0: float
    half: float

    shape = property(lambda self: self.combo.shape)
    colour = property(lambda self: self.combo.colour)
    direction = property(lambda self: self.combo.direction)
    background = property(lambda self: self.combo.background)
    caption = property(lambda self: self.combo.caption)


# The caption pattern's own words; with the names below they are every word the demo knows.
PATTERN_WORDS = ("a", "an", "moving", "on", "background")


def vocabulary_help() -> str:
    """The words the demo knows and its caption pattern, for --help and warnings."""
    return (f"The demo knows one caption pattern, '{CAPTION}': shapes "
            f"{', '.join(SHAPES)}; colours {', '.join(COLOURS)}; directions "
            f"{', '.join(DIRECTIONS)}; backgrounds {', '.join(BACKGROUNDS)}.")


def unknown_words(prompt: str) -> list:
    """The words of ``prompt`` the demo model never saw in a caption (in order, once each)."""
    known = set(SHAPES) | set(COLOURS) | set(DIRECTIONS) | set(BACKGROUNDS) | \
        set(PATTERN_WORDS)
    words = re.findall(r"[a-z]+", prompt.lower())
    return list(dict.fromkeys(w for w in words if w not in known))


def parse_caption(caption: str) -> Combo:
    """The :class:`Combo` a caption names; ValueError when it is not a dataset caption."""
    m = _CAPTION_RE.match(caption)
    if m is None:
        raise ValueError(f"not a demo caption: {caption!r} (expected e.g. "
                         f"{Combo('circle', 'red', 'left', 'blue').caption!r})")
    combo = Combo(**{k: v.lower() for k, v in m.groupdict().items()})
    known = {"shape": SHAPES, "colour": COLOURS, "direction": DIRECTIONS,
             "background": BACKGROUNDS}
    for attr, names in known.items():
        if getattr(combo, attr) not in names:
            raise ValueError(f"unknown {attr} {getattr(combo, attr)!r} in {caption!r}; "
                             f"known: {', '.join(names)}")
    if combo.colour == combo.background:
        raise ValueError(f"the object and the background have the same colour in {caption!r}")
    return combo



def place(combo: Combo, seed: int) -> ClipSpec:
    """A random placement of ``combo`` (size and start point) that keeps the whole path in frame."""
    rng = random.Random(f"place/{seed}")
    half = rng.uniform(*HALF_SIZE)
    lo, hi = half + MARGIN, 1.0 - half - MARGIN
    dx, dy = DIRECTIONS[combo.direction]

    def start(d: int) -> float:
        if d > 0:
            return rng.uniform(lo, hi - TRAVEL)
        if d < 0:
            return rng.uniform(lo + TRAVEL, hi)
        return rng.uniform(lo, hi)

    x0 = start(dx)
    y0 = start(dy)
    return ClipSpec(combo, x0, y0, half)



def coverage(shape: str, cx: float, cy: float, half: float, size: int) -> np.ndarray:
    """Anti-aliased coverage [size, size] in 0..1 of a shape centred at (cx, cy) (fractions)."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    y, x = coords[:, None], coords[None, :]
    u, v = (x - cx) / half, (y - cy) / half      # -1..1 over the bounding box
    if shape == "circle":
        inside = u * u + v * v <= 1.0
    elif shape == "square":
        inside = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    elif shape == "triangle":                     # apex up, base at the bottom of the box
        inside = (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render(spec: ClipSpec, frames: int = 17, size: int = 64) -> np.ndarray:
    """The clip as float32 [T, H, W, 3] in 0..1."""
    combo = spec.combo
    fg = np.asarray(COLOURS[combo.colour], np.float32) / 255.0
    bg = np.asarray(BACKGROUNDS[combo.background], np.float32) / 255.0
    dx, dy = DIRECTIONS[combo.direction]
    out = np.empty((frames, size, size, 3), np.float32)
    for t in range(frames):
        p = t / max(frames - 1, 1) * TRAVEL
        a = coverage(combo.shape, spec.x0 + dx * p, spec.y0 + dy * p, spec.half, size)
        out[t] = bg + a[..., None] * (fg - bg)
    return out
