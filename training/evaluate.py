"""Held-out evaluation of the demo weights: prompt adherence and I2V first-frame PSNR.

    python -m training.evaluate --task t2v --steps 20 --cfg 4
    python -m training.evaluate --task i2v

Every held-out combination (never trained on) is generated through the normal pipeline and read
back with ``analysis.check_prompt`` (colour, direction, background; ``prompt`` = all three).
For I2V the first frame is a rendered held-out clip's first frame; its PSNR against frame 0 of
the generated video is reported.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from wan_core.demo import CFG, STEPS, DemoModels, generate_video
from . import analysis, dataset


def heldout_specs(count: int = 32, seed: int = 1):
    return list(dataset.iter_specs("heldout", seed=seed))[:count]


def evaluate(models: DemoModels, task: str = "t2v", count: int = 32, steps=None, cfg=None,
             seed: int = 0, verbose: bool = False, fast: bool = False, **sampler) -> dict:
    """Accuracy per attribute (and ``prompt``) over ``count`` held-out prompts; for i2v also
    ``psnr`` (mean first-frame PSNR, dB) and ``psnr_min``. ``sampler``: ``shift`` / ``solver``
    for ``generate_video``."""
    totals: dict = {}
    psnrs = []
    specs = heldout_specs(count)
    for i, spec in enumerate(specs):
        image = None
        if task == "i2v":
            image = dataset.sample_clip(spec)[0][:, 0]
        video = generate_video(models, spec.caption, task, image, steps=steps, cfg=cfg,
                               seed=seed + i, fast=fast, **sampler)
        frames = analysis.video_to_frames(video)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate")
    parser.add_argument("--task", choices=("t2v", "i2v", "moe"), default="t2v")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help=f"default {STEPS} (--fast: 4)")
    parser.add_argument("--cfg", type=float, default=None, help=f"default {CFG} (--fast: 1)")
    parser.add_argument("--fast", action="store_true",
                        help="the T2V with its distilled LoRA (4 steps, CFG 1, distilled sampler)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default=None, help="weights folder (default: shipped)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    result = evaluate(DemoModels(args.weights), args.task, args.count, args.steps, args.cfg,
                      args.seed, args.verbose, args.fast)
    print(f"{args.task}{' fast' if args.fast else ''} steps {args.steps} cfg {args.cfg}: " +
          " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                   for k, v in result.items()) +
          f" ({time.perf_counter() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
