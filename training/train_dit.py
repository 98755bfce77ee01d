"""Stages ``latents``, ``dit``, ``i2v``, ``dit_mixed``, ``dit_focus``, ``i2v_focus`` and
``experts``: the tiny Wan DiTs, trained with flow matching on cached latents of 17-frame 64x64
clips (latent 16 x 5 x 8 x 8 = 80 tokens).

Objective (as Wan): ``x0`` = normalised latent, ``x1`` = Gaussian noise, ``sigma`` = shifted
uniform (shift ``SHIFT``), ``x_t = (1 - sigma) x0 + sigma x1``, ``t = 1000 sigma``, the model
predicts the velocity ``x1 - x0`` (MSE). Captions are dropped (replaced by the empty prompt,
the CFG negative) with probability ``DROP``.

- ``dit``: Wan 2.1 T2V layout, ``dim`` 128 = one head of 128 (the official head size, so the
  loader detects the heads without metadata).
- ``i2v``: Wan 2.2 I2V-A14B layout (in_dim 36, no CLIP branch), initialised from the T2V EMA
  with zero weights on the 20 new input channels; ``y`` = I2V mask + the latent of
  ``[first frame, gray frames]``, built as ``conditioning.build_i2v_conditioning`` builds it.
- ``dit_mixed``: Wan 2.1 T2V layout again, initialised from the I2V EMA (its
  16 latent input channels; the 20 conditioning channels dropped) and trained with *mixed
  per-frame noise levels* (``frame_sigmas``): a third of each batch at one level for all
  frames (as sampling uses), a third at independent levels per latent frame, a third with one
  random frame cleaner than the rest. Per-frame levels reach the model as per-token
  timesteps (the Wan 2.2 form of ``t``; the weights are the same). The partly clean frames
  make the direction word pay off in the loss, as the given first frame does for I2V.
- ``dit_focus``: the shipped T2V. ``dit_mixed`` fine-tuned the same way (lr ``FOCUS_LR``),
  with clips drawn in proportion to a per-background weight (``FOCUS``: white x12).
  ``dit_mixed`` moved objects the right way on black, gray and blue backgrounds (0.88-1.0 on
  training prompts) but not on white (0.3): its cross-attention sent white-background tokens
  to the pad token (the attention sink; layer 2 margin +10.5 logits, saturated, so almost no
  gradient reached that routing), and the direction word barely changed its prediction there
  (x0 error with the opposite word +5 % at sigma 0.9, vs +23-26 % on black and blue). With
  white clips twelve times as likely it learns the word there too (+20 %; white 0.92).
- ``i2v_focus``: the shipped I2V, ``i2v`` fine-tuned with the same weights for the same reason.
- ``experts``: Wan 2.2 T2V-A14B expert pair, both initialised from the final T2V EMA and
  fine-tuned on ``t >= 875`` (high noise) and ``t < 875`` (low noise), clips drawn as for
  ``dit_focus``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from wan_core.conditioning import i2v_mask, i2v_pixel_video, per_token_timesteps
from wan_core.models.configs import DiTConfig
from wan_core.models.dit import WanDiT
from . import dataset
from .steps import T2V_STAGES, final_stage
from .training import EMA, cosine_lr, finished, finished_already, load, train_loop

DIM, FFN, LAYERS, FREQ = 128, 512, 6, 256
FRAMES, SIZE = 17, 64
SHIFT = 3.0
DROP = 0.1
BATCH = 32
BOUNDARY = 0.875
QK_GAIN = 3.0
PLACEMENTS = 6          # cached clips per training combination
LR = 1e-3               # peak learning rate of the T2V and I2V stages
FIRST_FRAME_WEIGHT = 5.0  # I2V: the first latent frame must reproduce the given image
FOCUS = {"white": 12.0}   # dit_focus, i2v_focus: clip sampling weight per background (others 1)
FOCUS_LR = 3e-4
VAE_STAGE = "encoder_fit"  # whose encoder makes the cached latents (the shipped ``vae_fit``'s encoder)
SHAPE_VAE_STAGE = "vae_shape"  # issue 27: when finished, its encoder makes the latents instead


def dit_config(model_type: str = "t2v", patch: tuple = (1, 2, 2)) -> DiTConfig:
    return DiTConfig(model_type=model_type, dim=DIM, ffn_dim=FFN, num_heads=DIM // 128,
                     num_layers=LAYERS, in_dim=36 if model_type == "i2v" else 16, out_dim=16,
                     text_dim=128, freq_dim=FREQ, patch_size=patch)


def init_weights(model: WanDiT, seed: int) -> WanDiT:
    """The official initialisation (Xavier linears, small time embedding, zero head), except
    for the text embedding and the cross-attention query/key gains (below)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            torch.nn.init.zeros_(m.bias)
    torch.nn.init.xavier_uniform_(model.patch_embedding.weight.flatten(1))
    # The official N(0, 0.02) text embedding is sized for umT5-XXL's 4096 channels; on 128 it
    # shrinks the prompt ~20x (two layers of gain sqrt(128) * 0.02), and the text path stayed
    # starved: after 3200 steps the embedded tokens had rms 0.075 and cross-attention added
    # 2-18 % of the residual stream. Xavier keeps the tokens at unit scale.
    for m in model.time_embedding.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.02)
    for block in model.blocks:
        torch.nn.init.normal_(block.modulation, std=model.config.dim ** -0.5)
    torch.nn.init.normal_(model.head.modulation, std=model.config.dim ** -0.5)
    torch.nn.init.zeros_(model.head.head.weight)
    # Every prompt is padded with ~500 identical zero tokens, which take nearly all the
    # cross-attention at the start (logits of a few units against ln 500 = 6.2), so the text
    # signal is faint and is learnt slowly. A larger query/key-norm gain (logits x 9) lets the
    # few real tokens win the attention from the first steps.
    for block in model.blocks:
        block.cross_attn.norm_q.weight.data.fill_(QK_GAIN)
        block.cross_attn.norm_k.weight.data.fill_(QK_GAIN)
    return model


# ------------------------------------------------------------------------------ latent cache

def _load_vae(out: Path):
    """The VAE whose encoder makes the latents: ``SHAPE_VAE_STAGE``'s when it finished (the
    shape-carrying latent of issue 27), else ``VAE_STAGE``'s, else the shipped file (the same
    encoder as ``VAE_STAGE``'s)."""
    from .export import vae_state
    from wan_core import load_vae
    from wan_core.demo import WEIGHTS_DIR

    for stage in (SHAPE_VAE_STAGE, VAE_STAGE):
        if finished(Path(out) / stage) is not None:
            return load_vae(vae_state(out, stage), dtype=torch.float32)
    return load_vae(WEIGHTS_DIR / "vae.safetensors", dtype=torch.float32)


def _load_text(out: Path):
    from .export import text_state
    from wan_core import load_text_encoder
    from wan_core.demo import WEIGHTS_DIR

    if finished(Path(out) / "text") is None:
        return load_text_encoder(WEIGHTS_DIR / "text_encoder.safetensors", dtype=torch.float32)
    return load_text_encoder(text_state(out), dtype=torch.float32)


def cache_latents(out: Path, seed: int, resume: bool) -> dict:
    """Encode PLACEMENTS clips of every training combination (and their I2V ``y``) with the
    finished VAE, and every caption (and the empty prompt) with the finished text encoder."""
    path = Path(out) / "latents" / "cache.pt"
    if resume and path.exists():
        print("latents: cached already", flush=True)
        return load(path)
    import time

    started = time.perf_counter()
    vae, te = _load_vae(out), _load_text(out)
    captions = sorted({c.caption for c in dataset.iter_combos("all")}) + [""]
    text = dict(zip(captions, (e.float() for e in te.encode(captions))))
    specs = [spec for p in range(PLACEMENTS)
             for spec in dataset.iter_specs("train", seed=seed * 1000 + p)]
    lat_h = lat_w = SIZE // 8
    mask = i2v_mask(FRAMES, lat_h, lat_w)
    latents, ys = [], []
    for i in range(0, len(specs), 16):
        group = specs[i:i + 16]
        video = torch.stack([dataset.sample_clip(s, FRAMES, SIZE)[0] for s in group])
        cond = torch.cat([i2v_pixel_video(FRAMES, v[:, 0], None) for v in video])
        z = vae.encode(torch.cat([video, cond]))
        latents.append(z[:len(group)].half())
        ys.append(z[len(group):].half())
        if i % 160 == 0:
            print(f"latents: {i + len(group)}/{len(specs)} clips, "
                  f"{time.perf_counter() - started:.0f}s", flush=True)
    latents = torch.cat(latents)
    ys = torch.cat(ys)
    print(f"latents: {len(specs)} clips in {time.perf_counter() - started:.0f}s; normalised "
          f"latent mean {latents.float().mean():.3f} std {latents.float().std():.3f}", flush=True)
    cache = {"latents": latents, "image_latents": ys, "mask": mask,
             "captions": [s.caption for s in specs], "text": text,
             "seconds": time.perf_counter() - started}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(cache, path)
    return cache


# ------------------------------------------------------------------------------ training

def sample_sigma(u: torch.Tensor, shift: float = SHIFT) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def u_range(expert: str | None) -> tuple[float, float]:
    """Range of the uniform draw whose shifted sigma falls on the expert's side of BOUNDARY."""
    if expert is None:
        return 0.0, 1.0
    u_b = BOUNDARY / (SHIFT - (SHIFT - 1) * BOUNDARY)
    return (u_b, 1.0) if expert == "high" else (0.0, u_b)


def frame_sigmas(sigma: torch.Tensor, frames: int, g: torch.Generator) -> torch.Tensor:
    """Mixed per-frame noise levels [B, F] from one level per sample ``sigma`` [B]: a random
    third of the samples keep ``sigma`` on every frame, a third get independent levels per
    frame, a third keep ``sigma`` except one random frame at ``sigma * U(0, 1)``."""
    batch = sigma.shape[0]
    out = sigma[:, None].expand(batch, frames).clone()
    kind = torch.randint(3, (batch,), generator=g)
    independent = sample_sigma(torch.rand(batch, frames, generator=g))
    out[kind == 1] = independent[kind == 1]
    frame = torch.randint(frames, (batch,), generator=g)
    cleaner = sigma * torch.rand(batch, generator=g)
    rows = torch.nonzero(kind == 2).flatten()
    out[rows, frame[rows]] = cleaner[rows]
    return out


def clip_weights(cache: dict, per_background: dict) -> torch.Tensor:
    """Sampling weight [N] of each cached clip: ``per_background[its background]``, else 1."""
    return torch.tensor([float(per_background.get(dataset.parse_caption(c).background, 1.0))
                         for c in cache["captions"]])


def make_batch(cache: dict, step: int, seed: int, image: bool, expert: str | None = None,
               mixed: bool = False, weights: torch.Tensor | None = None, clean: bool = False,
               patch: tuple = (1, 2, 2)):
    """``(x_t, t, context, y, target)`` (and the clean latent ``x0`` when ``clean``); ``t`` is
    [B], or [B, L] per token when ``mixed``. Clips are drawn uniformly, or in proportion to
    ``weights`` [N] when given."""
    g = torch.Generator().manual_seed(seed * 10**7 + step)
    n = cache["latents"].shape[0]
    if weights is None:
        idx = torch.randint(n, (BATCH,), generator=g)
    else:
        idx = torch.multinomial(weights, BATCH, replacement=True, generator=g)
    x0 = cache["latents"][idx].float()
    b, _, f, h, w = x0.shape
    lo, hi = u_range(expert)
    sigma = sample_sigma(lo + (hi - lo) * torch.rand(BATCH, generator=g))
    if mixed:
        sigma = frame_sigmas(sigma, f, g)                           # [B, F]
    x1 = torch.randn(x0.shape, generator=g)
    s = sigma.view(b, 1, -1, 1, 1)
    xt = (1 - s) * x0 + s * x1
    drop = torch.rand(BATCH, generator=g) < DROP
    context = [cache["text"]["" if d else cache["captions"][i]] for i, d in zip(idx.tolist(), drop.tolist())]
    y = None
    if image:
        mask = cache["mask"][None].expand(BATCH, -1, -1, -1, -1)
        y = torch.cat([mask, cache["image_latents"][idx].float()], dim=1)
    t = sigma * 1000
    if mixed:
        t = per_token_timesteps(t, f, h, w, first_frame_known=False, patch=patch[1])
    return (xt, t, context, y, x1 - x0) + ((x0,) if clean else ())


def flow_loss(model, cache, step, seed, image=False, expert=None, mixed=False, weights=None):
    """MSE of the velocity; for I2V the first latent frame (the given image) counts
    ``FIRST_FRAME_WEIGHT`` times."""
    xt, t, context, y, target = make_batch(cache, step, seed, image, expert, mixed, weights)
    pred = model(xt, t, context, y=y)
    err = (pred - target).square()
    if not image:
        return err.mean(), {}
    weight = torch.ones(err.shape[2])
    weight[0] = FIRST_FRAME_WEIGHT
    return (err.mean((0, 1, 3, 4)) * weight).sum() / weight.sum(), {"frame0": err[:, :, 0].mean().detach()}


def _train(stage: str, out: Path, make_model: Callable[[], WanDiT], steps: int, seed: int,
           resume: bool, lr: float, warmup: int, image=False, expert=None, mixed=False,
           per_background: dict | None = None) -> dict:
    """Run (or, with ``resume``, skip when finished) one DiT stage; ``make_model()`` builds
    its starting model only when it trains."""
    stage_dir = Path(out) / stage
    done = finished_already(stage_dir, steps, resume)
    if done is not None:
        return done
    model = make_model()
    cache = load(Path(out) / "latents" / "cache.pt")
    weights = clip_weights(cache, per_background) if per_background else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    ema = EMA(model, 0.998)
    return train_loop(stage_dir, model, opt,
                      lambda s: flow_loss(model, cache, s, seed, image, expert, mixed, weights),
                      steps, lambda s: cosine_lr(s, steps, lr, warmup, 0.1), resume=resume,
                      seed=seed, ema=ema, save_every=50)


def stage_ema(out: Path, stage: str) -> dict:
    done = finished(Path(out) / stage)
    if done is None:
        raise RuntimeError(f"train the '{stage}' stage first: python -m training.train "
                           f"{stage} --out {out} --resume")
    return done["ema"]


def _from_stage(out: Path, source: str, model_type: str) -> WanDiT:
    """A ``model_type`` DiT initialised from ``source``'s EMA; the patch embedding's input
    channels are cut to, or zero-padded to, the new ``in_dim`` (I2V: 16 latent + 20 ``y``)."""
    model = WanDiT(dit_config(model_type))
    sd = dict(stage_ema(out, source))
    w = sd["patch_embedding.weight"]
    in_dim = model.config.in_dim
    extra = w.new_zeros(w.shape[0], max(0, in_dim - w.shape[1]), *w.shape[2:])
    sd["patch_embedding.weight"] = torch.cat([w[:, :in_dim], extra], 1).contiguous()
    model.load_state_dict(sd)
    return model


def run_dit(out: Path, steps: int, seed: int, resume: bool) -> dict:
    return _train("dit", out, lambda: init_weights(WanDiT(dit_config("t2v")), seed), steps,
                  seed, resume, lr=LR, warmup=100)


def run_i2v(out: Path, steps: int, seed: int, resume: bool) -> dict:
    return _train("i2v", out, lambda: _from_stage(out, "dit", "i2v"), steps, seed + 1, resume,
                  lr=3e-4, warmup=30, image=True)


def run_dit_mixed(out: Path, steps: int, seed: int, resume: bool) -> dict:
    return _train("dit_mixed", out, lambda: _from_stage(out, "i2v", "t2v"), steps, seed + 11,
                  resume, lr=3e-4, warmup=50, mixed=True)


def run_dit_focus(out: Path, steps: int, seed: int, resume: bool) -> dict:
    return _train("dit_focus", out, lambda: _from_stage(out, "dit_mixed", "t2v"), steps,
                  seed + 12, resume, lr=FOCUS_LR, warmup=50, mixed=True, per_background=FOCUS)


def run_i2v_focus(out: Path, steps: int, seed: int, resume: bool) -> dict:
    return _train("i2v_focus", out, lambda: _from_stage(out, "i2v", "i2v"), steps, seed + 13,
                  resume, lr=FOCUS_LR, warmup=50, image=True, per_background=FOCUS)


def run_experts(out: Path, steps: int, seed: int, resume: bool) -> dict:
    results = {}
    for expert, share in (("high", 0.4), ("low", 0.6)):
        name = f"expert_{expert}"
        n = max(1, int(round(steps * share)))
        results[expert] = _train(name, out,
                                 lambda: _from_stage(out, final_stage(out, T2V_STAGES), "t2v"),
                                 n, seed + 2 + (expert == "low"), resume, lr=2e-4, warmup=20,
                                 expert=expert, per_background=FOCUS)
    return results


# ------------------------------------------------------------------ dit_shape (issue 27)
SHAPE_WEIGHT = 4.0      # extra loss weight on latent positions that hold the object


def object_weight(x0: torch.Tensor, shape_weight: float = SHAPE_WEIGHT) -> torch.Tensor:
    """``[B, 1, F, h, w]`` loss weight ``1 + shape_weight * objectness``: how far each latent
    position of the clean latent ``x0 [B, C, F, h, w]`` is from its frame's background (the
    spatial median), scaled to 0..1 per frame."""
    bg = x0.flatten(3).median(dim=3).values[..., None, None]
    dev = (x0 - bg).abs().mean(1, keepdim=True)
    dev = dev / dev.amax(dim=(3, 4), keepdim=True).clamp_min(1e-6)
    return 1 + shape_weight * dev


def shipped_dit(model_type: str = "t2v", path: Path | None = None) -> WanDiT:
    """The T2V (or I2V) in the weights folder, or the demo-sized DiT file ``path``, as a
    trainable fp32 :class:`WanDiT`."""
    from safetensors.torch import load_file
    from wan_core.demo import FILES, WEIGHTS_DIR

    model = WanDiT(dit_config(model_type))
    model.load_state_dict({k: v.float() for k, v in
                           load_file(str(path or WEIGHTS_DIR / FILES[model_type])).items()})
    return model


def shape_flow_loss(model, cache, step, seed, weights=None, shape_weight=SHAPE_WEIGHT):
    """:func:`flow_loss` (T2V, mixed noise levels) with the object's positions weighted by
    :func:`object_weight`."""
    xt, t, context, y, target, x0 = make_batch(cache, step, seed, False, None, True, weights,
                                               clean=True, patch=model.config.patch_size)
    pred = model(xt, t, context, y=y)
    weight = object_weight(x0, shape_weight)
    return ((pred - target).square() * weight).sum() / (weight.sum() * target.shape[1]), {}


def run_dit_shape(out: Path, steps: int, seed: int, resume: bool, init: Path | None = None,
                  shape_weight: float = SHAPE_WEIGHT, lr: float = FOCUS_LR) -> dict:
    """Stage ``dit_shape``: the shipped T2V (or the T2V file ``init``: continue an earlier
    run) fine-tuned with :func:`shape_flow_loss` (clips drawn as for ``dit_focus``) on the
    latents ``latents`` cached (after ``vae_shape``: the shape-carrying latent); ``lr``: the
    peak of the cosine schedule."""
    return _finetune("dit_shape", out, lambda: shipped_dit("t2v", init), steps, seed, resume,
                     lr,
                     lambda m, c, w: lambda s: shape_flow_loss(m, c, s, seed + 14, w, shape_weight))


def _finetune(stage: str, out: Path, make_model: Callable[[], WanDiT], steps: int, seed: int,
              resume: bool, lr: float, make_loss) -> dict:
    """Run (or, with ``resume``, skip when finished) a T2V fine-tune on the cached latents,
    clips drawn as for ``dit_focus``; ``make_loss(model, cache, weights)`` returns the
    ``step -> (loss, logs)`` function, built only when the stage trains."""
    stage_dir = Path(out) / stage
    done = finished_already(stage_dir, steps, resume)
    if done is not None:
        return done
    model = make_model()
    cache = load(Path(out) / "latents" / "cache.pt")
    weights = clip_weights(cache, FOCUS)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    ema = EMA(model, 0.998)
    return train_loop(stage_dir, model, opt, make_loss(model, cache, weights), steps,
                      lambda s: cosine_lr(s, steps, lr, 50, 0.1), resume=resume, seed=seed,
                      ema=ema, save_every=50)


def i2v_from_t2v(t2v: Path) -> WanDiT:
    """An I2V made of the demo T2V file ``t2v`` and the shipped I2V's image input: every
    weight is the T2V's except the patch embedding's ``y`` channels (mask + image latent,
    input channels 16..35), which are the shipped I2V's. With ``y`` all zero it is the T2V;
    the ``y`` weights start from what reads the image for the shipped T2V, the model the new
    T2V was fine-tuned from."""
    model = shipped_dit("i2v")
    sd = shipped_dit("t2v", t2v).state_dict()
    latent = sd["patch_embedding.weight"].shape[1]
    image = model.state_dict()["patch_embedding.weight"][:, latent:]
    sd["patch_embedding.weight"] = torch.cat([sd["patch_embedding.weight"], image], 1)
    model.load_state_dict(sd)
    return model


def run_i2v_shape(out: Path, steps: int, seed: int, resume: bool,
                  init: Path | None = None) -> dict:
    """Stage ``i2v_shape``: the shipped I2V (or, with ``init``, :func:`i2v_from_t2v` of that
    T2V file) fine-tuned as ``i2v_focus`` was, on the latents ``latents`` cached."""
    start = (lambda: i2v_from_t2v(init)) if init is not None else (lambda: shipped_dit("i2v"))
    return _train("i2v_shape", out, start, steps, seed + 15, resume,
                  lr=FOCUS_LR, warmup=50, image=True, per_background=FOCUS)


# ------------------------------------------------------------------ dit_fine (issue 27)
FINE_PATCH = (1, 1, 1)  # one token per latent position: 64 tokens a latent frame instead of 16
FINE_LR = 5e-4


def to_fine_patch(sd: dict, patch: tuple = (1, 2, 2)) -> dict:
    """A ``(1, 2, 2)``-patch DiT state dict as a ``FINE_PATCH`` one: the patch embedding of a
    1x1 token is the sum of the 2x2 kernel (a flat 2x2 patch embeds as before), the head's
    output for a position is the mean of its 2x2 sub-positions' rows (``unpatchify`` order
    ``(pt, ph, pw, C)``). Every other tensor is unchanged; positions (RoPE) now count latent
    pixels, so the copy is a starting point to fine-tune, not an equal model."""
    out = dict(sd)
    out["patch_embedding.weight"] = sd["patch_embedding.weight"].sum((2, 3, 4), keepdim=True)
    c = sd["head.head.weight"].shape[0] // (patch[0] * patch[1] * patch[2])
    out["head.head.weight"] = sd["head.head.weight"].reshape(-1, c, sd["head.head.weight"].shape[1]).mean(0)
    out["head.head.bias"] = sd["head.head.bias"].reshape(-1, c).mean(0)
    return out


def run_dit_fine(out: Path, steps: int, seed: int, resume: bool) -> dict:
    """Stage ``dit_fine``: the shipped T2V re-cut to one token per latent position
    (:func:`to_fine_patch`) and fine-tuned as ``dit_shape`` (object-weighted loss, mixed noise
    levels, white clips x12). The shipped T2V has 16 tokens a latent frame, so an object
    ~16 px wide is one token whose shape the linear head must draw; here it spans 4-9."""
    def make_model():
        model = WanDiT(dit_config("t2v", FINE_PATCH))
        model.load_state_dict(to_fine_patch(shipped_dit("t2v").state_dict()))
        return model

    return _finetune("dit_fine", out, make_model, steps, seed, resume, FINE_LR,
                     lambda m, c, w: lambda s: shape_flow_loss(m, c, s, seed + 16, w))


# ------------------------------------------------------------------ dit_pairs (issue 27)
PAIR_WEIGHT = 1.0       # weight of the paired shape-difference loss (relative, see pair_loss)


def cache_shape_triples(out: Path, seed: int, resume: bool) -> dict:
    """Every clip of the latent cache (same specs, same order as :func:`cache_latents`) drawn
    in all three shapes at the same placement: ``latents [N, 3, C, F, h, w]`` (fp16, shape
    order ``dataset.SHAPES``) and ``valid [N, 3]`` (False where that shape's combination is
    held out: never encoded, never trained on)."""
    path = Path(out) / "latents" / "triples.pt"
    if resume and path.exists():
        return load(path)
    from dataclasses import replace

    vae = _load_vae(out)
    train = set(dataset.iter_combos("train"))
    specs = [spec for p in range(PLACEMENTS)
             for spec in dataset.iter_specs("train", seed=seed * 1000 + p)]
    shapes = dataset.SHAPES
    latents = torch.zeros(len(specs), len(shapes), 16, 5, SIZE // 8, SIZE // 8, dtype=torch.half)
    valid = torch.zeros(len(specs), len(shapes), dtype=torch.bool)
    todo = [(i, k, replace(spec, combo=replace(spec.combo, shape=shape)))
            for i, spec in enumerate(specs) for k, shape in enumerate(shapes)
            if replace(spec.combo, shape=shape) in train]
    for start in range(0, len(todo), 16):
        group = todo[start:start + 16]
        video = torch.stack([dataset.sample_clip(s, FRAMES, SIZE)[0] for _, _, s in group])
        with torch.no_grad():
            z = vae.encode(video).half()
        for (i, k, _), zi in zip(group, z):
            latents[i, k], valid[i, k] = zi, True
    triples = {"latents": latents, "valid": valid,
               "captions": [[replace(s.combo, shape=shape).caption for shape in shapes]
                            for s in specs]}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(triples, path)
    return triples


def pair_batch(cache: dict, triples: dict, step: int, seed: int, weights=None):
    """``BATCH`` clips as ``BATCH // 2`` pairs: the same placement in two different shapes,
    noised with the same noise and levels (mixed per-frame levels, as ``dit_focus``), captions
    dropped together. Returns ``(x_t, t, context, target, x0)``; rows ``2p`` and ``2p + 1``
    are pair ``p``."""
    g = torch.Generator().manual_seed(seed * 10**7 + step)
    valid = triples["valid"]
    usable = valid.sum(1) >= 2
    w = (weights if weights is not None else torch.ones(len(valid))) * usable.float()
    idx = torch.multinomial(w, BATCH // 2, replacement=True, generator=g)
    rows, captions = [], []
    for i in idx.tolist():
        choices = torch.nonzero(valid[i]).flatten()
        a, b = choices[torch.randperm(len(choices), generator=g)[:2]].tolist()
        rows += [triples["latents"][i, a], triples["latents"][i, b]]
        captions += [triples["captions"][i][a], triples["captions"][i][b]]
    x0 = torch.stack(rows).float()
    n, _, f, h, w_ = x0.shape
    sigma = frame_sigmas(sample_sigma(torch.rand(n // 2, generator=g)), f, g)   # [P, F]
    sigma = sigma.repeat_interleave(2, 0)
    x1 = torch.randn(n // 2, *x0.shape[1:], generator=g).repeat_interleave(2, 0)
    s = sigma.view(n, 1, f, 1, 1)
    xt = (1 - s) * x0 + s * x1
    drop = (torch.rand(n // 2, generator=g) < DROP).repeat_interleave(2)
    context = [cache["text"]["" if d else c] for c, d in zip(captions, drop.tolist())]
    t = per_token_timesteps(sigma * 1000, f, h, w_, first_frame_known=False)
    return xt, t, context, x1 - x0, x0


def pair_loss(model, cache, triples, step, seed, weights=None):
    """:func:`shape_flow_loss`'s object-weighted velocity MSE plus ``PAIR_WEIGHT`` times the
    error of the *difference* between a pair's two predictions (same noise, same placement,
    different shape word), relative to the size of the true difference ``x0_b - x0_a``: the
    part of the target that only the shape word decides, which the plain loss weights ~10x
    less than colour."""
    xt, t, context, target, x0 = pair_batch(cache, triples, step, seed, weights)
    pred = model(xt, t, context)
    weight = object_weight(x0)
    flow = ((pred - target).square() * weight).sum() / (weight.sum() * target.shape[1])
    d_pred, d_target = pred[0::2] - pred[1::2], target[0::2] - target[1::2]
    pair = (d_pred - d_target).square().mean() / d_target.square().mean().clamp_min(1e-8)
    return flow + PAIR_WEIGHT * pair, {"pair": pair.detach()}


def run_dit_pairs(out: Path, steps: int, seed: int, resume: bool) -> dict:
    """Stage ``dit_pairs``: the shipped T2V fine-tuned with :func:`pair_loss` on shape
    triples (:func:`cache_shape_triples`, built on first use), clips drawn as for ``dit_focus``."""
    def make_loss(model, cache, weights):
        triples = cache_shape_triples(out, seed, resume=True)
        return lambda s: pair_loss(model, cache, triples, s, seed + 17, weights)

    return _finetune("dit_pairs", out, lambda: shipped_dit("t2v"), steps, seed, resume,
                     FOCUS_LR, make_loss)
