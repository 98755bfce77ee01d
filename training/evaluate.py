"""Held-out evaluation of the demo weights: prompt adherence, I2V first-frame PSNR, and how
closely the VACE demo follows a control path.

    python -m training.evaluate --task t2v --steps 20 --cfg 4
    python -m training.evaluate --task i2v
    python -m training.evaluate --task vace [--vace-scale 0] [--count 16]
    python -m training.evaluate --task t2v --shapes      # also shape fidelity (issue 27)
    python -m training.evaluate --task t2v --shapes --split train   # on training combinations
    python -m training.evaluate --task t2v --shapes --weights W --object-size 0.18,0.23

Every held-out combination (never trained on) is generated through the normal pipeline and read
back with ``analysis.check_prompt`` (colour, direction, background; ``prompt`` = all three).
For I2V the first frame is a rendered held-out clip's first frame; its PSNR against frame 0 of
the generated video is reported. For VACE (:func:`evaluate_vace`) every held-out path (seeds the
``vace`` stage never trained on, the four families in turn, held-out captions whose direction
word has nothing to do with the path) is drawn as a silhouette control clip; the generated
object's centroid is compared with the path in every frame (pixels at 64x64).
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import numpy as np

from wan_core.demo import CFG, STEPS, DemoModels, generate_video
from . import analysis, dataset


def heldout_specs(count: int = 32, seed: int = 1):
    return list(dataset.iter_specs("heldout", seed=seed))[:count]


def train_specs(count: int = 32, seed: int = 1):
    """``count`` training combinations (a fixed random choice), placed like the held-out ones:
    how well the model fits what it was trained on, against how it composes."""
    combos = random.Random(f"train-eval/{seed}").sample(list(dataset.iter_combos("train")), count)
    return [dataset.place(combo, seed * 100_003 + i) for i, combo in enumerate(combos)]


def shape_report(clips) -> dict:
    """Shape fidelity (``analysis.shape_fidelity``) of generated ``clips`` [(spec, frames)]:
    ``shape_right`` (share of frames whose best-fitting shape is the prompted one),
    ``shape_fit`` (mean soft IoU of the prompted shape) and ``right_<shape>`` per shape."""
    per: dict = {}
    fits = []
    for spec, frames in clips:
        found = analysis.shape_fidelity(frames, spec.shape, spec.background, spec.colour)
        per.setdefault(spec.shape, []).append(found["right"])
        fits.append(found["fit"])
    out = {"shape_right": float(np.mean(sum(per.values(), []))),
           "shape_fit": float(np.mean(fits))}
    out.update({f"right_{k}": float(np.mean(v)) for k, v in sorted(per.items())})
    return out


def evaluate(models: DemoModels, task: str = "t2v", count: int = 32, steps=None, cfg=None,
             seed: int = 0, verbose: bool = False, fast: bool = False, clips=None,
             split: str = "heldout", **sampler) -> dict:
    """Accuracy per attribute (and ``prompt``) over ``count`` held-out prompts; for i2v also
    ``psnr`` (mean first-frame PSNR, dB) and ``psnr_min``. ``sampler``: ``shift`` / ``solver``
    for ``generate_video``. ``clips``: a list that receives ``(spec, frames [T, H, W, 3])`` of
    every generated clip. ``split="train"``: training combinations instead (:func:`train_specs`)."""
    totals: dict = {}
    psnrs = []
    specs = heldout_specs(count) if split == "heldout" else train_specs(count)
    for i, spec in enumerate(specs):
        image = None
        if task == "i2v":
            image = dataset.sample_clip(spec)[0][:, 0]
        video = generate_video(models, spec.caption, task, image, steps=steps, cfg=cfg,
                               seed=seed + i, fast=fast, **sampler)
        frames = analysis.video_to_frames(video)
        if clips is not None:
            clips.append((spec, frames))
        ok = analysis.check_prompt(frames, spec)
        for k, v in ok.items():
            totals[k] = totals.get(k, 0) + int(v)
        if image is not None:
            first = analysis.video_to_frames(image[:, None])
            psnrs.append(analysis.psnr(frames[:1], first))
        if verbose:
            found = analysis.analyse(frames)
            print(f"{spec.caption:55s} -> {found.colour} {found.shape} {found.direction} "
                  f"{found.background}  {'ok' if ok['prompt'] else 'WRONG'}"
                  + (f"  psnr {psnrs[-1]:.1f}" if psnrs else ""), flush=True)
    result = {k: v / len(specs) for k, v in totals.items()}
    result["count"] = len(specs)
    if psnrs:
        result["psnr"] = float(np.mean(psnrs))
        result["psnr_min"] = float(np.min(psnrs))
    return result


MISSING_PX = 32.0    # VACE: the error counted for a frame where no object is found (half the frame)


def evaluate_vace(models: DemoModels, count: int = 16, steps=None, cfg=None, seed: int = 0,
                  vace_scale: float = 1.0, verbose: bool = False,
                  silhouette: str = "shape") -> dict:
    """Centroid error against the control path on ``count`` held-out paths, the controls drawn
    in the object's shape (as the demo's ``--path`` draws them) or, with ``silhouette="disc"``,
    as a shape-agnostic disc.

    Returns ``error`` (mean over clips of the mean per-frame distance, px, between the
    generated object's centroid and the path; a frame without an object counts
    ``MISSING_PX``), ``error_<family>`` per path family, ``found`` (share of frames with an
    object), and the share of clips with the prompt's ``colour``, ``background`` and ``shape``
    (``prompt``: colour and background; the caption's direction word is ignored, the path
    decides)."""
    from .train_vace import FRAMES, SIZE, heldout_paths

    totals: dict = {}
    per_family: dict = {}
    errors, found = [], []
    items = heldout_paths(count, silhouette)
    for i, (family, (_, control, caption, path, _)) in enumerate(items):
        video = generate_video(models, caption, "vace", steps=steps, cfg=cfg, seed=seed + i,
                               control=control, vace_scale=vace_scale)
        frames = analysis.video_to_frames(video)
        centres = analysis.object_centres(frames)
        dist = np.linalg.norm(centres - path.pixels(FRAMES, SIZE), axis=1)
        present = np.isfinite(dist)
        err = float(np.where(present, dist, MISSING_PX).mean())
        errors.append(err)
        found.append(float(present.mean()))
        per_family.setdefault(family, []).append(err)
        combo = dataset.parse_caption(caption)
        seen = analysis.analyse(frames)
        ok = {a: getattr(seen, a) == getattr(combo, a) for a in ("colour", "background", "shape")}
        ok["prompt"] = ok["colour"] and ok["background"]
        for k, v in ok.items():
            totals[k] = totals.get(k, 0) + int(v)
        if verbose:
            print(f"{family:5s} {caption:55s} -> {seen.colour} {seen.shape} {seen.background}  "
                  f"error {err:5.2f} px (max {np.nanmax(dist) if present.any() else MISSING_PX:5.1f}"
                  f", found {present.mean():.2f})", flush=True)
    result = {"error": float(np.mean(errors)), "error_max": float(np.max(errors))}
    result.update({f"error_{f}": float(np.mean(v)) for f, v in per_family.items()})
    result["found"] = float(np.mean(found))
    result.update({k: v / len(items) for k, v in totals.items()})
    result["count"] = len(items)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate")
    parser.add_argument("--task", choices=("t2v", "i2v", "moe", "vace"), default="t2v")
    parser.add_argument("--count", type=int, default=None, help="default 32 (vace: 16)")
    parser.add_argument("--vace-scale", type=float, default=1.0,
                        help="vace: strength of the control (0: the plain T2V)")
    parser.add_argument("--silhouette", choices=("shape", "disc"), default="shape",
                        help="vace: controls in the object's shape (as the demo draws them) or "
                             "a disc")
    parser.add_argument("--steps", type=int, default=None, help=f"default {STEPS} (--fast: 4)")
    parser.add_argument("--cfg", type=float, default=None, help=f"default {CFG} (--fast: 1)")
    parser.add_argument("--fast", action="store_true",
                        help="the T2V with its distilled LoRA (4 steps, CFG 1, distilled sampler)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default=None, help="weights folder (default: shipped)")
    parser.add_argument("--shapes", action="store_true",
                        help="t2v / i2v / moe: also report shape fidelity (shape_right, shape_fit)")
    parser.add_argument("--object-size", metavar="LO,HI", default=None,
                        help="weights trained with training.train --object-size: the same here")
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout",
                        help="t2v / i2v / moe: the held-out prompts, or as many training "
                             "combinations (a fixed random choice; fit vs generalisation)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.object_size:
        try:
            dataset.set_object_size(args.object_size)
        except ValueError as e:
            parser.error(str(e))
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    models = DemoModels(args.weights)
    if args.task == "vace":
        result = evaluate_vace(models, args.count or 16, args.steps, args.cfg, args.seed,
                               args.vace_scale, args.verbose, args.silhouette)
    else:
        clips = [] if args.shapes else None
        result = evaluate(models, args.task, args.count or 32, args.steps, args.cfg, args.seed,
                          args.verbose, args.fast, clips, args.split)
        if clips:
            result.update(shape_report(clips))
    vace = f" vace_scale {args.vace_scale:g} silhouette {args.silhouette}"
    print(f"{args.task}{' fast' if args.fast else ''}{vace if args.task == 'vace' else ''} steps "
          f"{args.steps} cfg {args.cfg}: " +
          " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                   for k, v in result.items()) +
          f" ({time.perf_counter() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
