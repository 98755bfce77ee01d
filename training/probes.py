"""Probes of where the demo loses a prompt attribute (issue 27: the shape).

    python -m training.probes [--weights DIR] [--count 48]

- :func:`latent_contrast`: how far the VAE latent moves on the object when one attribute of a
  clip changes (same placement), in the normalised latent the DiT sees. A small shape contrast
  means the latent hardly carries the shape.
- :func:`word_sensitivity`: whether the T2V *uses* a caption word. Training clips are noised
  to ``sigma`` and denoised in one model call with the right caption and with the attribute
  changed; the ratio of the object's x0 errors (wrong / right) is 1.00 when the word is
  ignored and grows with how much the model relies on it (colour: well above 1).

- :func:`word_attention`: how much cross-attention the object's tokens give each word of the
  caption (and the pad token, the attention sink), per block: a word the model routes to the
  object gets more than the filler words ("a", "on").

All weight latent positions by how much they hold the object (``train_dit.object_weight``).
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


def word_attention(models: DemoModels, specs, sigma: float = 0.5, seed: int = 0) -> list:
    """Per T2V block, the mean cross-attention probability ``[words + 2]`` that the object's
    tokens give each caption token (the caption pattern's words in order, the end token, then
    the pad token), at noise level ``sigma``; object tokens weighted by ``object_weight``
    pooled over each 2x2 patch. Captions must tokenise to one token per word (the demo's do)."""
    import torch.nn.functional as F

    vae, te, dit = models.get("vae"), models.get("text_encoder"), models.dit("t2v", False)
    x0 = _encode(vae, specs)
    contexts = te.encode([s.caption for s in specs])
    patch = dit.config.patch_size[1]
    probs: list = []

    def hook(module, args, _out):
        x, text = args[0], args[1]
        heads = module.num_heads
        q = module.norm_q(module.q(x)).unflatten(-1, (heads, -1)).transpose(1, 2)
        k = module.norm_k(module.k(text.tokens)).unflatten(-1, (heads, -1)).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        if text.bias is not None:
            logits = logits + text.bias
        probs.append(logits.softmax(-1).mean(1))                     # [B, L, M]

    handles = [b.cross_attn.register_forward_hook(hook) for b in dit.blocks]
    g = torch.Generator().manual_seed(seed)
    sums = None
    try:
        for i, spec in enumerate(specs):
            z = x0[i:i + 1]
            w = object_weight(z)[0, 0] - 1                              # [F, h, w]
            w = F.avg_pool2d(w, patch).flatten()
            w = w / w.sum().clamp_min(1e-8)
            n = len(spec.caption.split()) + 2                           # words, end, pad
            if contexts[i].shape[0] + 1 != n:
                raise ValueError(f"{spec.caption!r} does not tokenise to one token per word")
            probs.clear()
            xt = (1 - sigma) * z + sigma * torch.randn(z.shape, generator=g)
            with torch.no_grad():
                dit(xt, torch.tensor([sigma * 1000.0]), [contexts[i]])
            rows = torch.stack([(p[0] * w[:, None]).sum(0)[:n] for p in probs])
            sums = rows if sums is None else sums + rows
    finally:
        for h in handles:
            h.remove()
    return (sums / len(specs)).tolist()


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
    words = dataset.CAPTION.replace("{", "").replace("}", "").split() + ["</s>", "<pad>"]
    print("cross-attention of the object's tokens per caption token (sigma 0.5): " + " ".join(words))
    for block, row in enumerate(word_attention(models, specs)):
        print(f"  block {block}: " + " ".join(f"{p:.2f}" for p in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
