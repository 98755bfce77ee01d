"""Stage ``vace``: a tiny VACE module for the shipped demo T2V (issue 25), so that a silhouette
clip sets the object's path (``python -m wan_core demo --task vace --path diagonal``).

Model: the shipped ``dit_t2v.safetensors`` (6 blocks, dim 128), **frozen**, plus a VACE module
of ``VACE_BLOCKS`` blocks whose hints are added after main blocks 0, 2, 4
(``wan_core.models.configs.vace_plan``). As in the VACE paper, each VACE block starts as a copy
of the main block it pairs with, ``before_proj`` / ``after_proj`` start at zero (the model
starts as the plain T2V), and ``vace_patch_embedding`` starts with the main patch embedding on
the control video's latent channels (16:32) and zeros elsewhere. Only the module trains.

Data (``training/paths.py``): a training combination's object (caption from the training
split, its direction word drawn independently of the path, so the control has to win) moving
along a random path of one of four families (straight in any direction, Bezier arc, move then
stop, two legs with a corner), its centroid on the path. The control is the silhouette, white
over black on the same path: for half the clips the object's own shape (what the demo's
``--path`` draws from the prompt's shape), for the other half a disc of the object's half size
whatever its shape (a shape-agnostic control; the prompt picks the shape). The control latent is exactly ``conditioning.vace_context(vae, ..., video=
silhouette)`` (mask all ones: channels 0:16 the latent of a zero video, 16:32 the silhouette's
latent, 32:96 ones); checked against it when the cache is built. The cache holds the target and
silhouette latents of ``CLIPS`` clips, encoded with the shipped VAE, and the shipped text
encoder's captions.

Loss: the flow-matching loss of ``train_dit.py`` (shift ``SHIFT``, velocity MSE, caption
dropped with probability ``DROP``), with the control latent passed as ``vace_context``.

The module is tied to its base: retraining the demo T2V means retraining this stage. When it
ends it writes ``vace_module.safetensors`` (only the ``vace_*`` tensors, official names, bf16,
EMA weights) beside the other demo weights.
"""
from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from wan_core.conditioning import VACE_CHANNELS, fold_vace_mask, latent_frames, vace_context
from wan_core.demo import FILES, WEIGHTS_DIR, DemoModels
from wan_core.demo.paths import render_control
from wan_core.models.configs import vace_plan
from wan_core.models.dit import WanDiT

from . import dataset
from .paths import random_half, random_path, render_on_path
from .train_dit import DROP, SHIFT, sample_sigma
from .export import BUDGET_BYTES
from .training import EMA, atomic_save, cosine_lr, finished_already, load, train_loop

VACE_BLOCKS = 3         # hints after main blocks 0, 2, 4 of the 6
CLIPS = 6000            # cached training clips (random paths x training combinations)
FRAMES, SIZE = 17, 64
BATCH = 32
LR = 1e-3
WARMUP = 50
HELDOUT_SEED = 10**6    # held-out paths use seeds from here (training: 0 .. CLIPS - 1)
SHAPE_SILHOUETTE = 0.5  # share of training controls drawn in the object's shape (else a disc)


# ------------------------------------------------------------------------------ clips

def path_clip(seed: int, split: str = "train", family: str | None = None,
              silhouette: str | None = None, shape: str | None = None):
    """``(video, control, caption, path, half)`` of path clip ``seed``: video and control
    ``[3, T, H, W]`` float32 in [-1, 1]. The combination is drawn from ``split`` (among those
    of ``shape`` when given); its direction word has nothing to do with the path.
    ``silhouette``: ``"shape"`` (the object's own shape) or ``"disc"``; by default drawn from
    the seed, shape with probability ``SHAPE_SILHOUETTE``."""
    combos = [c for c in dataset.iter_combos(split) if shape is None or c.shape == shape]
    combo = combos[random.Random(f"vace-combo/{split}/{seed}").randrange(len(combos))]
    half = random_half(seed)
    path = random_path(seed, family, half)
    if silhouette is None:
        shaped = random.Random(f"vace-silhouette/{seed}").random() < SHAPE_SILHOUETTE
        silhouette = "shape" if shaped else "disc"
    if silhouette not in ("shape", "disc"):
        raise ValueError(f"silhouette must be 'shape' or 'disc' (got {silhouette!r})")
    video = render_on_path(combo, path, half, FRAMES, SIZE)
    control = render_control(path, FRAMES, SIZE, half,
                             combo.shape if silhouette == "shape" else None)

    def signed(x):
        return torch.from_numpy(x).permute(3, 0, 1, 2).contiguous() * 2.0 - 1.0

    return signed(video), signed(control), combo.caption, path, half


def heldout_paths(count: int = 16, silhouette: str = "shape"):
    """``count`` held-out path clips: the path families and the shapes in turn, seeds from
    ``HELDOUT_SEED`` (never trained on), captions from the held-out combinations, controls
    drawn as ``silhouette``."""
    from .paths import FAMILIES

    out = []
    for i in range(count):
        family = FAMILIES[i % len(FAMILIES)]
        shape = dataset.SHAPES[i % len(dataset.SHAPES)]
        out.append((family, path_clip(HELDOUT_SEED + i, "heldout", family, silhouette, shape)))
    return out


# ------------------------------------------------------------------------------ cache

def control_parts(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """The constant channels of a silhouette's control latent (mask all ones): the latent of a
    zero video [16, F, h, w] and the folded mask [64, F, h, w]."""
    with torch.no_grad():
        inactive = vae.encode(torch.zeros(1, 3, FRAMES, SIZE, SIZE)).float()[0]
    mask = fold_vace_mask(torch.ones(FRAMES, SIZE, SIZE), 8, latent_frames(FRAMES))
    return inactive, mask


def cache_clips(out: Path, seed: int, resume: bool, weights: Path | None = None) -> dict:
    """Encode ``CLIPS`` path clips (target latent + silhouette latent, fp16) and every caption
    with the demo VAE and text encoder in ``weights`` (default: the shipped ones)."""
    path = Path(out) / "vace" / "cache.pt"
    if resume and path.exists():
        return load(path)
    started = time.perf_counter()
    models = DemoModels(weights)
    vae, te = models.get("vae"), models.get("text_encoder")
    inactive, mask = control_parts(vae)
    latents, controls, captions = [], [], []
    for start in range(0, CLIPS, 16):
        group = [path_clip(seed * 10**7 + i) for i in range(start, min(start + 16, CLIPS))]
        with torch.no_grad():
            z = vae.encode(torch.stack([g[0] for g in group] + [g[1] for g in group]))
        latents.append(z[:len(group)].half())
        controls.append(z[len(group):].half())
        captions += [g[2] for g in group]
        if start == 0:          # the cached control is exactly what vace_context builds
            c, _ = vace_context(vae, FRAMES, SIZE, SIZE, video=group[0][1][None])
            mine = torch.cat([inactive, z[len(group)].float(), mask])[None]
            if (c - mine).abs().max() > 1e-4:
                raise RuntimeError(f"cached control latent differs from vace_context by "
                                   f"{(c - mine).abs().max():.2e}")
        if start % 800 == 0:
            print(f"vace cache: {start + len(group)}/{CLIPS} clips, "
                  f"{time.perf_counter() - started:.0f}s", flush=True)
    names = sorted(set(captions)) + [""]
    text = dict(zip(names, (e.float() for e in te.encode(names))))
    cache = {"latents": torch.cat(latents), "controls": torch.cat(controls),
             "inactive": inactive, "mask": mask, "captions": captions, "text": text,
             "seconds": time.perf_counter() - started}
    print(f"vace cache: {CLIPS} clips in {cache['seconds']:.0f}s", flush=True)
    atomic_save(cache, path)
    return cache


def control_latent(cache: dict, idx: torch.Tensor) -> torch.Tensor:
    """The control latents [B, 96, F, h, w] of cached clips ``idx``."""
    reactive = cache["controls"][idx].float()
    b = reactive.shape[0]
    return torch.cat([cache["inactive"].expand(b, -1, -1, -1, -1), reactive,
                      cache["mask"].expand(b, -1, -1, -1, -1)], dim=1)


def make_batch(cache: dict, step: int, seed: int):
    """``(x_t, t, context, vace_context, target)``: as ``train_dit.make_batch``, plus the
    clips' control latents."""
    g = torch.Generator().manual_seed(seed * 10**7 + step)
    n = cache["latents"].shape[0]
    idx = torch.randint(n, (BATCH,), generator=g)
    x0 = cache["latents"][idx].float()
    sigma = sample_sigma(torch.rand(BATCH, generator=g), SHIFT)
    x1 = torch.randn(x0.shape, generator=g)
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * x1
    drop = torch.rand(BATCH, generator=g) < DROP
    context = [cache["text"]["" if d else cache["captions"][i]]
               for i, d in zip(idx.tolist(), drop.tolist())]
    return xt, sigma * 1000, context, control_latent(cache, idx), x1 - x0


# ------------------------------------------------------------------------------ model

def base_path(weights: Path | None = None) -> Path:
    return Path(weights or WEIGHTS_DIR) / FILES["t2v"]


def vace_model(weights: Path | None = None, blocks: int = VACE_BLOCKS) -> WanDiT:
    """The shipped T2V (frozen) with a fresh VACE module initialised as described above."""
    from wan_core import load_dit

    base = load_dit(base_path(weights), dtype="fp32")
    cfg = replace(base.config, model_type="vace", vace_in_dim=VACE_CHANNELS,
                  vace_layers=vace_plan(base.config.num_layers, blocks))
    model = WanDiT(cfg)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("vace_") for k in missing), (missing, unexpected)
    with torch.no_grad():
        for k, layer in enumerate(cfg.vace_layers):
            src = base.blocks[layer].state_dict()
            model.vace_blocks[k].load_state_dict(src, strict=False)
            model.vace_blocks[k].after_proj.weight.zero_()
            model.vace_blocks[k].after_proj.bias.zero_()
        model.vace_blocks[0].before_proj.weight.zero_()
        model.vace_blocks[0].before_proj.bias.zero_()
        patch = model.vace_patch_embedding
        patch.weight.zero_()
        patch.weight[:, 16:32] = base.patch_embedding.weight
        patch.bias.copy_(base.patch_embedding.bias)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("vace_"))
    return model


def module_params(model: WanDiT) -> list:
    return [p for name, p in model.named_parameters() if name.startswith("vace_")]


def run_vace(out: Path, steps: int, seed: int, resume: bool, weights: Path | None = None,
             warm_start: bool = False) -> dict:
    """Train (or skip when finished) and write ``vace_module.safetensors`` to ``weights``.
    ``warm_start``: start from the module already in the weights folder (trained for an
    earlier T2V) instead of the zero-projection initialisation."""
    result = _train_vace(out, steps, seed, resume, weights, warm_start)
    save_vace_module(out, weights)
    return result


def _train_vace(out: Path, steps: int, seed: int, resume: bool, weights: Path | None,
                warm_start: bool = False) -> dict:
    stage_dir = Path(out) / "vace"
    done = finished_already(stage_dir, steps, resume)
    if done is not None:
        return done
    cache = cache_clips(out, seed, resume=True, weights=weights)
    model = vace_model(weights)
    if warm_start:
        from safetensors.torch import load_file

        module = load_file(str(Path(weights or WEIGHTS_DIR) / FILES["vace_module"]))
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in module.items()},
                                                    strict=False)
        if unexpected or any(k.startswith("vace_") for k in missing):
            raise ValueError("the VACE module in the weights folder does not fit this base; "
                             "train without --warm-start")
    opt = torch.optim.AdamW(module_params(model), lr=LR, weight_decay=0.01)
    ema = EMA(model, 0.998)

    def loss_fn(step: int):
        xt, t, context, control, target = make_batch(cache, step, seed + 25)
        pred = model(xt, t, context, vace_context=control)
        return (pred - target).square().mean(), {}

    return train_loop(stage_dir, model, opt, loss_fn, steps,
                      lambda s: cosine_lr(s, steps, LR, WARMUP, 0.1), resume=resume,
                      seed=seed, ema=ema, save_every=50)


def vace_module_state(out: Path, checkpoint: bool = False) -> dict:
    """The trained module: ``vace_*`` tensors only, official names, bf16, EMA weights (of the
    finished stage, or with ``checkpoint`` of its latest ``ckpt.pt``)."""
    path = Path(out) / "vace" / ("ckpt.pt" if checkpoint else "done.pt")
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the 'vace' stage first")
    state = load(path)
    weights = state["ema"]["shadow"] if checkpoint else state["ema"]
    return {k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()
            if k.startswith("vace_")}


def file_sha256(path: Path) -> str:
    """The file's SHA-256 (hex): the module records its base T2V's, so a retrained T2V without a
    retrained module is caught (``tests/test_demo_vace.py``)."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_vace_module(out: Path, weights: Path | None = None, state: dict | None = None) -> Path:
    """Write the module beside the demo weights and check that it loads onto the shipped T2V
    as a VACE model (the stage's own export, like ``fast_lora``)."""
    from safetensors.torch import save_file

    from wan_core import load_dit

    folder = Path(weights or WEIGHTS_DIR)
    path = folder / FILES["vace_module"]
    save_file(state if state is not None else vace_module_state(out), str(path),
              metadata={"format": "pt", "source": "wan_core demo (python -m training.train vace)",
                        "base_sha256": file_sha256(base_path(folder))})
    path.chmod(0o644)
    model = load_dit(base_path(folder), vace_module=path)
    if model.config.model_type != "vace" or model.config.vace_layers != vace_plan(
            model.config.num_layers, VACE_BLOCKS):
        raise RuntimeError(f"{path} loads as {model.config.model_type} with vace_layers "
                           f"{model.config.vace_layers}")
    total = sum((folder / name).stat().st_size for name in FILES.values()
                if (folder / name).is_file())
    print(f"vace: wrote {path} ({path.stat().st_size / 1e6:.2f} MB; demo weights in all "
          f"{total / 1e6:.2f} MB)", flush=True)
    if total > BUDGET_BYTES:
        raise RuntimeError(f"the demo weights take {total} bytes, over the 40 MB budget")
    return path
