"""The demo's training set: clips of ``wan_core.demo.clips`` drawn from integer seeds.

The world (shapes, colours, directions, backgrounds, captions, placement and rendering) is
defined in ``wan_core.demo.clips``; its names are re-exported here. Everything is derived from
integer seeds, so a clip is reproducible anywhere::

    video, caption, spec = sample_clip(7)               # a training clip
    video, caption, spec = sample_clip(spec)            # the same clip again
    # video: torch.float32 [3, T, H, W] in [-1, 1]
    # caption: "a red circle moving left on a blue background"

A fixed set of held-out combinations (``iter_combos("heldout")``) is never used for training;
every single attribute and every pair of attributes of a held-out combination still occurs in
training, so the held-out prompts test composition, not unseen words.
"""
from __future__ import annotations

import random
from itertools import product
from typing import Iterator, Union

import torch

from wan_core.demo.clips import (BACKGROUNDS, CAPTION, COLOURS, DIRECTIONS, HALF_SIZE, MARGIN,  # noqa: F401
                                 SHAPES, SUPERSAMPLE, TRAVEL, ClipSpec, Combo, coverage,
                                 parse_caption, place, render)


HELDOUT_COUNT = 32
HELDOUT_SEED = 2024


def set_object_size(text: str) -> tuple:
    """Draw every clip of this process with objects of half-side in ``"LO,HI"`` (fractions of
    the frame; the shipped demo: ``wan_core.demo.clips.HALF_SIZE``). An experiment knob
    (``--object-size`` of ``training.train`` / ``training.evaluate``): weights trained with
    another size expect it in the library's drawing too. ValueError when the path does not fit."""
    import sys

    from wan_core.demo import clips

    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--object-size takes two fractions LO,HI (got {text!r}); e.g. "
                         f"0.18,0.23") from None
    if not 0.02 <= lo <= hi or 1.0 - 2 * (hi + MARGIN) < TRAVEL:
        raise ValueError(f"--object-size {text}: need 0.02 <= LO <= HI and room for the path "
                         f"(HI <= {(1.0 - TRAVEL) / 2 - MARGIN:.3f})")
    for module in (clips, sys.modules[__name__], sys.modules.get("training.paths")):
        if module is not None:
            module.HALF_SIZE = (lo, hi)
    return lo, hi


# --------------------------------------------------------------------------------------------
# Combinations and the held-out split
# --------------------------------------------------------------------------------------------

def all_combos() -> list[Combo]:
    """Every valid combination (object colour never equals the background colour), sorted."""
    return sorted(Combo(s, c, d, b) for s, c, d, b in product(SHAPES, COLOURS, DIRECTIONS,
                                                             BACKGROUNDS) if c != b)


def _heldout_combos() -> frozenset:
    """HELDOUT_COUNT combinations drawn with a fixed seed, each chosen only while every
    attribute pair it contains is still covered by the remaining training combinations."""
    rng = random.Random(HELDOUT_SEED)
    pool = all_combos()
    rng.shuffle(pool)
    train = set(all_combos())
    heldout = []

    def pairs(c: Combo):
        v = (c.shape, c.colour, c.direction, c.background)
        return {(i, j, v[i], v[j]) for i in range(4) for j in range(i + 1, 4)}

    for combo in pool:
        if len(heldout) == HELDOUT_COUNT:
            break
        rest = train - {combo}
        covered = set().union(*(pairs(c) for c in rest))
        if pairs(combo) <= covered:
            heldout.append(combo)
            train = rest
    return frozenset(heldout)


_HELDOUT = _heldout_combos()


def iter_combos(split: str = "train") -> Iterator[Combo]:
    """Combinations of a split, sorted: 'train', 'heldout' or 'all'."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all' (got {split!r})")
    for combo in all_combos():
        if split == "all" or (combo in _HELDOUT) == (split == "heldout"):
            yield combo


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------

def random_spec(seed: int, split: str = "train") -> ClipSpec:
    """The clip of ``seed``: a combination of ``split`` chosen uniformly, then placed."""
    combos = list(iter_combos(split))
    combo = combos[random.Random(f"combo/{split}/{seed}").randrange(len(combos))]
    return place(combo, seed)


def iter_specs(split: str = "train", seed: int = 0) -> Iterator[ClipSpec]:
    """One placed spec per combination of ``split`` (sorted), placements drawn from ``seed``."""
    for i, combo in enumerate(iter_combos(split)):
        yield place(combo, seed * 100_003 + i)


def sample_clip(seed_or_spec: Union[int, ClipSpec, Combo], frames: int = 17, size: int = 64,
                split: str = "train"):
    """``(video, caption, spec)``: video float32 [3, T, H, W] in [-1, 1].

    ``seed_or_spec``: an int (a random clip of ``split``), a :class:`Combo` (placed with seed 0)
    or a :class:`ClipSpec`."""
    if isinstance(seed_or_spec, ClipSpec):
        spec = seed_or_spec
    elif isinstance(seed_or_spec, Combo):
        spec = place(seed_or_spec, 0)
    else:
        spec = random_spec(int(seed_or_spec), split)
    video = torch.from_numpy(render(spec, frames, size)).permute(3, 0, 1, 2) * 2.0 - 1.0
    return video.contiguous(), spec.caption, spec
