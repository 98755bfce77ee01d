"""Probes of where the demo loses a prompt attribute (issue 27: the shape).

    python -m training.probes [--weights DIR] [--count 48]

- :func:`latent_contrast`: how far the VAE latent moves on the object when one attribute of a
  clip changes (same placement), in the normalised latent the DiT sees. A small shape contrast
  means the latent hardly carries the shape.
- :func:`word_sensitivity`: whether the T2V *uses* a caption word. Training clips are noised
  to ``sigma`` and denoised in one model call with the right caption and with the attribute
  changed; the ratio of the object's x0 errors (wrong / right) is 1.00 when the word is
  ignored and grows with how much the model relies on it (colour: well above 1).

Both weight latent positions by how much they hold the object (``train_dit.object_weight``).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from wan_core.demo import DemoModels
from . import dataset
from .train_dit import object_weight

SIGMAS = (0.05, 0.15, 0.3, 0.5, 0.8)
ATTRIBUTES = ("shape", "colour", "direction", "background")


def changed(spec: dataset.ClipSpec, attribute: str) -> dataset.ClipSpec:
    """``spec`` with ``attribute`` replaced by the next valid value (same placement)."""
    from wan_core.demo.clips import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES

    names = {"shape": SHAPES, "colour": tuple(COLOURS), "direction": tuple(DIRECTIONS),
             "background": tuple(BACKGROUNDS)}[attribute]
    value = getattr(spec.combo, attribute)
    for k in range(1, len(names)):
        combo = replace(spec.combo, **{attribute: names[(names.index(value) + k) % len(names)]})
        if combo.colour != combo.background:
            return replace(spec, combo=combo)
    raise ValueError(f"no other {attribute} for {spec.caption!r}")


def _encode(vae, specs) -> torch.Tensor:
    video = torch.stack([dataset.sample_clip(s)[0] for s in specs])
    with torch.no_grad():
        return torch.cat([vae.encode(video[i:i + 16]) for i in range(0, len(specs), 16)])


def _object_mse(diff: torch.Tensor, weight: torch.Tensor) -> float:
    return float((diff.square() * weight).sum() / (weight.sum() * diff.shape[1]))


def latent_contrast(models: DemoModels, specs) -> dict:
    """``{attribute: object-weighted MSE between the latents of each clip and of the clip with
    that attribute changed}`` (normalised latent units)."""
    vae = models.get("vae")
    x0 = _encode(vae, specs)
    weight = object_weight(x0) - 1
    return {a: _object_mse(_encode(vae, [changed(s, a) for s in specs]) - x0, weight)
            for a in ATTRIBUTES}


def word_sensitivity(models: DemoModels, specs, attribute: str = "shape",
                     sigmas=SIGMAS, seed: int = 0) -> dict:
    """``{sigma: (x0 error with the right caption, with ``attribute`` changed)}``: one T2V call
    on the clips' latents noised to ``sigma`` (object-weighted MSE of the x0 prediction)."""
    vae, te, dit = models.get("vae"), models.get("text_encoder"), models.dit("t2v", False)
    x0 = _encode(vae, specs)
    weight = object_weight(x0) - 1
    contexts = (te.encode([s.caption for s in specs]),
                te.encode([changed(s, attribute).caption for s in specs]))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for sigma in sigmas:
        xt = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=g)
        t = torch.full((len(specs),), sigma * 1000.0)
        errors = []
        with torch.no_grad():
            for context in contexts:
                v = torch.cat([dit(xt[i:i + 16], t[i:i + 16], context[i:i + 16])
                               for i in range(0, len(specs), 16)])
                errors.append(_object_mse(xt - sigma * v - x0, weight))
        out[sigma] = tuple(errors)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.probes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="weights folder (default: shipped)")
    parser.add_argument("--count", type=int, default=48, help="training clips probed")
    parser.add_argument("--attributes", default="shape,colour",
                        help="comma-separated, of " + ", ".join(ATTRIBUTES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = DemoModels(args.weights)
    specs = list(dataset.iter_specs("train", seed=7))[:args.count]
    contrast = latent_contrast(models, specs)
    print("latent contrast (object-weighted MSE when the attribute changes): " +
          ", ".join(f"{a} {v:.3f}" for a, v in contrast.items()))
    for attribute in args.attributes.split(","):
        rows = word_sensitivity(models, specs, attribute)
        print(f"{attribute} word: " + ", ".join(
            f"sigma {s}: {right:.4f} -> {wrong:.4f} (x{wrong / right:.2f})"
            for s, (right, wrong) in rows.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
