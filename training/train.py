"""Train the embedded demo model on 2 CPU cores (see TRAINING.md).

    python -m training.train all --out runs/demo --resume
    python -m training.train {text,encoder_fit,decoder_fit,vae_fit,latents,dit,i2v,dit_mixed,dit_focus,i2v_focus,experts,fast_lora,export,vace,all} --out DIR --resume
    python -m training.train {decoder_shape,vae_shape,dit_shape,i2v_shape,dit_fine,dit_pairs} --out DIR --resume   # issue 27

Stages write their checkpoints under ``DIR/<stage>/``; ``--resume`` continues an interrupted
stage from its last checkpoint and skips finished ones. ``export`` writes the shipped files to
``wan_core/demo/weights/`` (or ``--weights DIR``); ``vace`` (after ``export``: it trains a VACE
module for the T2V found there) writes ``vace_module.safetensors`` beside them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .training import setup_threads

STAGES = ("text", "encoder_fit", "decoder_fit", "vae_fit", "latents", "dit", "i2v", "dit_mixed",
          "dit_focus", "i2v_focus", "experts", "fast_lora", "export", "vace")
# issue 27's shape experiments (TRAINING.md, "Shape fidelity"), not part of ``all``
SHAPE_STAGES = ("decoder_shape", "vae_shape", "dit_shape", "i2v_shape", "dit_fine", "dit_pairs")
EARLIER = ("vae", "decoder", "decoder_long", "vae_long")   # the first runs' VAE stages (TRAINING.md)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES + SHAPE_STAGES + EARLIER + ("all",))
    parser.add_argument("--out", required=True, type=Path, help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue / skip finished stages")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the stage's steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: fastest on a shared 2-core machine, see TRAINING.md)")
    parser.add_argument("--weights", type=Path, default=None, help="export folder")
    parser.add_argument("--warm-start", action="store_true",
                        help="fast_lora, vace: start from the file already in the weights folder "
                             "(trained for an earlier T2V) instead of from scratch")
    parser.add_argument("--object-size", metavar="LO,HI", default=None,
                        help="issue 27 experiment: objects of half-side LO..HI (fractions of the "
                             "frame; shipped 0.18,0.23, before issue 27 0.11,0.14) in every clip drawn")
    parser.add_argument("--init", type=Path, default=None, metavar="FILE",
                        help="dit_shape: start from this demo T2V file (e.g. an earlier run's "
                             "export) instead of the shipped one; i2v_shape: start from this T2V "
                             "with the shipped I2V's image input channels")
    parser.add_argument("--shape-weight", type=float, default=None,
                        help="dit_shape: extra loss weight on the object's latent positions "
                             "(default: train_dit.SHAPE_WEIGHT)")
    parser.add_argument("--lr", type=float, default=None,
                        help="dit_shape: peak learning rate (default: train_dit.FOCUS_LR)")
    args = parser.parse_args(argv)
    if args.init is not None and not args.init.is_file():
        parser.error(f"--init {args.init}: no such file (give a dit_t2v.safetensors)")
    if args.init is not None and args.stage not in ("dit_shape", "i2v_shape"):
        parser.error("--init applies to the dit_shape and i2v_shape stages only")
    if (args.shape_weight is not None or args.lr is not None) and args.stage != "dit_shape":
        parser.error("--shape-weight and --lr apply to the dit_shape stage only")
    if args.lr is not None and not 0 < args.lr < 1:
        parser.error("--lr must be a learning rate between 0 and 1 (e.g. 6e-4)")
    if args.shape_weight is not None and not args.shape_weight >= 0:
        parser.error("--shape-weight must be a number >= 0")
    if args.object_size:
        from .dataset import set_object_size

        try:
            set_object_size(args.object_size)
        except ValueError as e:
            parser.error(str(e))
    setup_threads(args.threads)
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        run_stage(stage, args)
    return 0


def run_stage(stage: str, args) -> None:
    from . import steps as plan

    n = args.steps if args.steps is not None else plan.STEPS.get(stage, plan.SECOND_RUN.get(stage))
    if stage == "vae":
        from .train_vae import run
        run(args.out, n, args.seed, args.resume)
    elif stage == "decoder":
        from .train_vae import run_decoder
        run_decoder(args.out, n, args.seed, args.resume)
    elif stage == "decoder_long":
        from .train_vae import run_decoder_long
        run_decoder_long(args.out, n, args.seed, args.resume)
    elif stage == "vae_long":
        from .train_vae import run_vae_long
        run_vae_long(args.out, n, args.seed, args.resume)
    elif stage == "vae_shape":
        from .train_vae import run_decoder_shape
        run_decoder_shape(args.out, n, args.seed, args.resume, joint=True)
    elif stage in ("encoder_fit", "decoder_fit", "vae_fit", "decoder_shape"):
        from . import train_vae
        getattr(train_vae, "run_" + stage)(args.out, n, args.seed, args.resume)
    elif stage == "text":
        from .train_text import run
        run(args.out, n, args.seed, args.resume)
    elif stage == "latents":
        from .train_dit import cache_latents
        cache_latents(args.out, args.seed, args.resume)
    elif stage == "dit_shape":
        from . import train_dit
        extra = {k: v for k, v in (("shape_weight", args.shape_weight), ("lr", args.lr))
                 if v is not None}
        train_dit.run_dit_shape(args.out, n, args.seed, args.resume, init=args.init, **extra)
    elif stage == "i2v_shape":
        from . import train_dit
        train_dit.run_i2v_shape(args.out, n, args.seed, args.resume, init=args.init)
    elif stage in ("dit", "i2v", "dit_mixed", "dit_focus", "i2v_focus",
                   "dit_fine", "dit_pairs", "experts"):
        from . import train_dit
        getattr(train_dit, "run_" + stage)(args.out, n, args.seed, args.resume)
    elif stage == "fast_lora":
        from .train_fast import run_fast_lora
        run_fast_lora(args.out, n, args.seed, args.resume, args.weights, args.warm_start)
    elif stage == "vace":
        from .train_vace import run_vace
        run_vace(args.out, n, args.seed, args.resume, args.weights, args.warm_start)
    elif stage == "export":
        from .export import export
        export(args.out, args.weights)


if __name__ == "__main__":
    sys.exit(main())
