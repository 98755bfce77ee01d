"""The demo's small Wan-VAE 2.1 (official architecture and key layout).

Shipped recipe (third run, end of this file): ``encoder_fit`` / ``decoder_fit`` / ``vae_fit``,
a VAE fitted to the fixed principal-component latent of ``latent_targets``. The first two
runs' end-to-end stages (``vae``, ``decoder``, ``decoder_long``, ``vae_long``) follow; they
collapse towards the mean image at the start (TRAINING.md) and are kept for comparison.

Stage ``vae`` (first run):

Training runs the same streamed encoder/decoder modules the loader builds (chunks of 1, 4, 4
frames, causal caches between chunks). Inputs: 5-frame windows (chunks 1 + 4) of 17-frame 64x64 clips, cropped
to 32x32 around the object (convolutions make crops valid), with a full 64x64 window every
``FULL_EVERY`` steps so the middle attention also sees the full latent size.

Loss: L1 + MSE on pixels, weighted ``1 + 4 |x - background|`` so the small object counts, plus a
small KL term on the posterior in the *normalised* latent space (official Wan 2.1 mean/std).
After training, :func:`standardise` folds per-channel statistics into the 1x1 convs ``conv1``
(to latent) and ``conv2`` (from latent) so that the loader's fixed 2.1 normalisation yields
zero-mean, unit-std latents on the demo data: an exact reparametrisation, decoding unchanged.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from wan_core.models.vae.blocks import Stream
from wan_core.models.vae.model import VAEConfig, WanVAE
from . import dataset
from .training import EMA, atomic_save, cosine_lr, finished, finished_already, load, train_loop

CONFIG = VAEConfig(version="2.1", dim=16, decoder_dim=16, z_dim=16, dim_mult=(1, 2, 4, 4),
                   num_res_blocks=1, temporal_downsample=(False, True, True))
FRAMES, WINDOW, CROP, BATCH, FULL_EVERY = 17, 5, 32, 4, 4
KL_WEIGHT = 1e-4
TEMPORAL = 4


def chunks(t: int):
    """Official chunking of a 1+4n frame clip: 1 frame, then 4 at a time."""
    yield slice(0, 1)
    for s in range(1, t, TEMPORAL):
        yield slice(s, s + TEMPORAL)


def encode_posterior(vae: WanVAE, video: torch.Tensor):
    """video [B, 3, 1+4n, H, W] -> raw (mu, logvar) [B, z, 1+n, H/8, W/8], differentiable."""
    stream = Stream()
    mus, logvars = [], []
    for part in chunks(video.shape[2]):
        h = vae.conv1(vae.encoder(video[:, :, part], stream))
        mu, logvar = h.chunk(2, dim=1)
        mus.append(mu)
        logvars.append(logvar)
        stream.end_chunk()
    return torch.cat(mus, 2), torch.cat(logvars, 2)


def decode_raw(vae: WanVAE, raw: torch.Tensor) -> torch.Tensor:
    """raw latent [B, z, T, h, w] -> video [B, 3, 1+4(T-1), 8h, 8w] (unclamped), differentiable."""
    stream = Stream()
    out = []
    for i in range(raw.shape[2]):
        out.append(vae.decoder(vae.conv2(raw[:, :, i:i + 1]), stream))
        stream.end_chunk()
    return torch.cat(out, 2)


def training_clip(seed: int, full: bool, window: int = None):
    """One training window ``[3, WINDOW, s, s]`` (s = 64 if full else CROP) and its background
    colour ``[3]`` in [-1, 1]."""
    rng = random.Random(f"vae/{seed}")
    video, _, spec = dataset.sample_clip(seed, frames=FRAMES, size=64)
    window = window or WINDOW
    start = rng.choice((0, 0, 4, 8, 12)) if window < FRAMES else 0
    video = video[:, start:start + window]
    bg = torch.tensor(dataset.BACKGROUNDS[spec.background], dtype=torch.float32) / 127.5 - 1
    if full:
        return video, bg
    dx, dy = dataset.DIRECTIONS[spec.direction]
    p = (start + window / 2) / (FRAMES - 1) * dataset.TRAVEL
    cx, cy = (spec.x0 + dx * p) * 64, (spec.y0 + dy * p) * 64
    left = int(min(max(cx - CROP / 2 + rng.uniform(-10, 10), 0), 64 - CROP))
    top = int(min(max(cy - CROP / 2 + rng.uniform(-10, 10), 0), 64 - CROP))
    return video[:, :, top:top + CROP, left:left + CROP], bg


def batch(step: int, seed: int):
    full = step % FULL_EVERY == FULL_EVERY - 1
    n = 1 if full else BATCH
    items = [training_clip(seed * 10**7 + step * BATCH + i, full) for i in range(n)]
    return torch.stack([v for v, _ in items]), torch.stack([b for _, b in items])


def vae_loss(vae: WanVAE, video: torch.Tensor, bg: torch.Tensor, sample: bool = True):
    recon, kl = autoencode(vae, video, sample)
    rec, mse, _ = pixel_loss(recon, video, bg)
    psnr = 10 * torch.log10(4 / mse)             # range [-1, 1]: peak-to-peak 2
    return rec + KL_WEIGHT * kl, {"rec": rec.detach(), "kl": kl.detach(), "psnr": psnr.detach()}


def pixel_loss(recon: torch.Tensor, video: torch.Tensor, bg: torch.Tensor,
               first_frame_weight: float = 1.0):
    """Weighted L1 + MSE ``(1 + 4 |x - background|) (|err| + err^2)`` of ``[B, 3, T, H, W]``
    clips, frame 0 weighted ``first_frame_weight``; returns (loss, mse of all, mse of frame 0)."""
    weight = 1 + 4 * (video - bg[:, :, None, None, None]).abs().mean(1, keepdim=True)
    if first_frame_weight != 1.0:
        weight[:, :, 0] *= first_frame_weight
    err = recon - video
    rec = (weight * (err.abs() + err.square())).mean()
    return rec, err.square().mean().clamp_min(1e-10), err[:, :, 0].square().mean().clamp_min(1e-10)


def latent_normalisation(vae: WanVAE) -> tuple[torch.Tensor, torch.Tensor]:
    """The loader's fixed normalisation as ``[1, z, 1, 1, 1]`` tensors: (mean, 1 / std);
    normalised latent = (raw - mean) * inv."""
    return vae.latent_mean.view(1, -1, 1, 1, 1), vae.latent_inv_std.view(1, -1, 1, 1, 1)


def posterior_kl(vae: WanVAE, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL of the posterior to N(0, 1) in the *normalised* latent space (mean over elements)."""
    mean, inv = latent_normalisation(vae)
    mn, var_n = (mu - mean) * inv, std.square() * inv.square()
    return 0.5 * (mn.square() + var_n - 1 - torch.log(var_n)).mean()


def autoencode(vae: WanVAE, video: torch.Tensor, sample: bool = True):
    """Posterior sample (or mean) -> reconstruction of ``video [B, 3, 1+4n, H, W]``;
    returns (recon, kl)."""
    mu, logvar = encode_posterior(vae, video)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    recon = decode_raw(vae, mu + std * torch.randn_like(mu) if sample else mu)
    return recon, posterior_kl(vae, mu, std)


def build(seed: int) -> WanVAE:
    torch.manual_seed(seed)
    vae = WanVAE(CONFIG)
    # Start the decoder-side 1x1 conv and the posterior conv near identity-friendly scales.
    return vae


@torch.no_grad()
def latent_statistics(vae: WanVAE, clips: int = 128, seed: int = 99):
    """Per-channel mean and std of the raw posterior means over full 17-frame clips."""
    vae.eval()
    mus = []
    for i in range(0, clips, 8):
        video = torch.stack([dataset.sample_clip(seed * 10**6 + i + j)[0] for j in range(8)])
        mus.append(encode_posterior(vae, video)[0])
    mu = torch.cat(mus)
    return mu.mean((0, 2, 3, 4)), mu.std((0, 2, 3, 4))


@torch.no_grad()
def standardise(vae: WanVAE, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Fold ``raw' = M + S (raw - mean) / std`` (M, S: the official 2.1 statistics) into
    ``conv1`` and its inverse into ``conv2``, so that normalised latents are ~N(0, 1)."""
    m_off = vae.latent_mean
    s_off = 1.0 / vae.latent_inv_std
    a = s_off / std                                   # per-channel gain
    z = CONFIG.z_dim
    w1, b1 = vae.conv1.weight, vae.conv1.bias         # [2z, 2z, 1, 1, 1]
    w1[:z] *= a.view(-1, 1, 1, 1, 1)
    b1[:z] = a * (b1[:z] - mean) + m_off
    b1[z:] += 2 * torch.log(a)                         # log-variance follows the gain
    w2, b2 = vae.conv2.weight, vae.conv2.bias         # [z, z, 1, 1, 1]: raw = mean + (raw'-M)/a
    inv = 1.0 / a
    b2 += (w2[:, :, 0, 0, 0] @ (mean - m_off * inv))
    w2 *= inv.view(1, -1, 1, 1, 1)


def run(out: Path, steps: int, seed: int, resume: bool) -> dict:
    stage = Path(out) / "vae"
    done = finished(stage, steps)
    if done is not None and resume and "final" in done:
        print("vae: finished already", flush=True)
        return done
    if done is not None and resume:
        result = done                     # trained; only the standardisation is missing
    else:
        vae = build(seed)
        opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
        ema = EMA(vae, 0.998)

        def loss_fn(step):
            video, bg = batch(step, seed)
            return vae_loss(vae, video, bg)

        result = train_loop(stage, vae, opt, loss_fn, steps,
                            lambda s: cosine_lr(s, steps, 2e-3, 30, 0.05), resume=resume,
                            seed=seed, ema=ema, save_every=50)
    final = WanVAE(CONFIG)
    final.load_state_dict(result["ema"])
    final.eval()
    mean, std = latent_statistics(final)
    print(f"vae: raw latent mean {mean.abs().mean():.3f} std {std.mean():.3f} (folded away)")
    standardise(final, mean, std)
    n_mean, n_std = (t for t in latent_statistics(final, seed=98))
    n_mean = (n_mean - final.latent_mean) * final.latent_inv_std
    n_std = n_std * final.latent_inv_std
    print(f"vae: normalised latent |mean| max {n_mean.abs().max():.3f}, std "
          f"{n_std.min():.3f}..{n_std.max():.3f}", flush=True)
    result["final"] = final.state_dict()
    torch.save(result, stage / "done.pt")
    return result


# ------------------------------------------------------------------------------ decoder stage

def decoder_loss(vae: WanVAE, video: torch.Tensor, bg: torch.Tensor):
    """Reconstruction loss through a frozen encoder (posterior samples), decoder side only."""
    with torch.no_grad():
        mu, logvar = encode_posterior(vae, video)
        raw = mu + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn_like(mu)
    rec, mse, _ = pixel_loss(decode_raw(vae, raw), video, bg)
    return rec, {"psnr": (10 * torch.log10(4 / mse)).detach()}


def decoder_batch(step: int, seed: int):
    """Mostly full 64x64 windows (the joint stage saw mostly object crops, and its decoder
    gets large flat backgrounds wrong), every third step a batch of object crops."""
    if step % 3 == 2:
        return batch(step * FULL_EVERY, seed)            # FULL_EVERY divides: crops
    items = [training_clip(seed * 10**7 + step * 2 + i, True) for i in range(2)]
    return torch.stack([v for v, _ in items]), torch.stack([b for _, b in items])


def _finetune_decoder(out: Path, stage_name: str, base_name: str, batch, steps: int, seed: int,
                      resume: bool, lr: float, warmup: int, ema_decay: float,
                      save_every: int) -> dict:
    """Train ``conv2`` and the decoder of the VAE finished by stage ``base_name`` with the
    encoder frozen: the latents (and so the DiTs trained on them) do not change.
    ``batch(step, seed)`` gives a list of ``(video, background)`` pairs."""
    stage = Path(out) / stage_name
    done = finished_already(stage, steps, resume)
    if done is not None:
        return done
    base = finished(Path(out) / base_name)
    if base is None:
        raise RuntimeError(f"run the '{base_name}' stage first: "
                           f"python -m training.train {base_name} ...")
    vae = WanVAE(CONFIG)
    vae.load_state_dict(base["final"])
    for name, p in vae.named_parameters():
        p.requires_grad_(name.startswith(("decoder.", "conv2.")))
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    ema = EMA(vae, ema_decay)

    def loss_fn(step):
        total, logs = 0.0, {}
        for i, (video, bg) in enumerate(batch(step, seed)):
            loss, psnr = decoder_loss(vae, video, bg)
            total = total + loss
            logs[f"psnr{i}"] = psnr["psnr"]
        return total, logs

    result = train_loop(stage, vae, opt, loss_fn, steps,
                        lambda s: cosine_lr(s, steps, lr, warmup, 0.1), resume=resume,
                        seed=seed, ema=ema, save_every=save_every)
    final = WanVAE(CONFIG)
    final.load_state_dict(result["ema"])
    result["final"] = final.eval().state_dict()
    torch.save(result, stage / "done.pt")
    return result


def run_decoder(out: Path, steps: int, seed: int, resume: bool) -> dict:
    """Stage ``decoder``: fine-tune the decoder of the finished, standardised VAE on 5-frame
    windows (runs alongside the DiT stages)."""
    return _finetune_decoder(out, "decoder", "vae", lambda *a: [decoder_batch(*a)], steps, seed + 7, resume,
                             lr=1e-3, warmup=20, ema_decay=0.998, save_every=50)


def long_batch(step: int, seed: int):
    """Whole 17-frame clips (five chunks: the decoder's caches after a full chunk are only
    trained here): a full 64x64 clip every 3rd step, else 2 object crops."""
    if step % 3 == 2:
        items = [training_clip(seed * 10**7 + step * 2, True, FRAMES)]
    else:
        items = [training_clip(seed * 10**7 + step * 2 + i, False, FRAMES) for i in range(2)]
    return torch.stack([v for v, _ in items]), torch.stack([b for _, b in items])


def run_decoder_long(out: Path, steps: int, seed: int, resume: bool) -> dict:
    """Stage ``decoder_long``: continue the ``decoder`` stage on whole 17-frame clips (the
    earlier stages saw 5-frame windows only, and later chunks came out washed out)."""
    return _finetune_decoder(out, "decoder_long", "decoder", lambda *a: [long_batch(*a)], steps, seed + 11,
                             resume, lr=5e-4, warmup=10, ema_decay=0.99, save_every=25)


# ------------------------------------------------------------------------------ joint long stage

FIRST_FRAME_WEIGHT = 2.0     # frame 0 is the I2V condition: its reconstruction bounds I2V PSNR
FIRST_FRAMES = 8             # extra single-frame (first chunk only) images per step


def first_frames(step: int, seed: int):
    """``FIRST_FRAMES`` first frames of full 64x64 clips as one-frame videos ``[B, 3, 1, 64, 64]``
    and their backgrounds ``[B, 3]``: the I2V condition is exactly this first chunk."""
    items = [training_clip(seed * 10**7 + step * FIRST_FRAMES + i, True, 1)
             for i in range(FIRST_FRAMES)]
    return torch.stack([v for v, _ in items]), torch.stack([b for _, b in items])


def joint_long_loss(vae: WanVAE, step: int, seed: int):
    """Encoder + decoder loss on whole 17-frame clips (:func:`long_batch`) plus a batch of
    single first frames (:func:`first_frames`), posterior samples, small KL."""
    video, bg = long_batch(step, seed)
    recon, kl = autoencode(vae, video)
    rec, mse, mse0 = pixel_loss(recon, video, bg, FIRST_FRAME_WEIGHT)
    image, image_bg = first_frames(step, seed)
    recon_image, kl_image = autoencode(vae, image)
    rec_image, mse_image, _ = pixel_loss(recon_image, image, image_bg, FIRST_FRAME_WEIGHT)
    loss = rec + rec_image + KL_WEIGHT * (kl + kl_image)
    return loss, {"psnr": (10 * torch.log10(4 / mse)).detach(),
                  "psnr0": (10 * torch.log10(4 / mse0)).detach(),
                  "psnr_image": (10 * torch.log10(4 / mse_image)).detach()}


def run_vae_long(out: Path, steps: int, seed: int, resume: bool, lr: float = 3e-4) -> dict:
    """Stage ``vae_long``: encoder and decoder together on whole 17-frame clips (five chunks,
    so the causal caches of both sides are trained as inference uses them) and on single
    first frames (the I2V condition), starting from ``decoder_long``. The result is
    re-standardised (the encoder moved)."""
    stage = Path(out) / "vae_long"
    done = finished(stage, steps)
    if done is not None and resume and "final" in done:
        print("vae_long: finished already", flush=True)
        return done
    base = finished(Path(out) / "decoder_long")
    if base is None:
        raise RuntimeError("run the 'decoder_long' stage first: "
                           "python -m training.train decoder_long ...")
    vae = WanVAE(CONFIG)
    vae.load_state_dict(base["final"])
    if done is not None and resume:
        result = done                     # trained; only the standardisation is missing
    else:
        opt = torch.optim.Adam(vae.parameters(), lr=lr)
        ema = EMA(vae, 0.99)
        result = train_loop(stage, vae, opt, lambda step: joint_long_loss(vae, step, seed + 13),
                            steps, lambda s: cosine_lr(s, steps, lr, 20, 0.1), resume=resume,
                            seed=seed, ema=ema, save_every=25)
    final = WanVAE(CONFIG)
    final.load_state_dict(result["ema"])
    final.eval()
    mean, std = latent_statistics(final)
    standardise(final, mean, std)
    result["final"] = final.state_dict()
    torch.save(result, stage / "done.pt")
    print_reconstruction(out, "vae_long")
    return result


def print_reconstruction(out: Path, stage: str) -> dict:
    """Load the finished VAE of ``stage`` through ``load_vae`` and print
    :func:`reconstruction_report` (held-out clips)."""
    from wan_core import load_vae
    from .export import vae_state

    report = reconstruction_report(load_vae(vae_state(out, stage), dtype=torch.float32))
    print(f"{stage}: held-out reconstruction " +
          " ".join(f"{k} {v:.3f}" for k, v in report.items()), flush=True)
    return report


@torch.no_grad()
def reconstruction_report(vae, count: int = 16, seed: int = 5) -> dict:
    """How well the loaded VAE (``wan_core.models.vae.WanVAE``) reproduces ``count`` held-out clips
    through ``decode(encode(clip))``: ``analysis.check_prompt`` accuracy per attribute and
    PSNR (dB, 0..1 range) over whole clips and over frame 0 (the I2V condition)."""
    from . import analysis

    specs = list(dataset.iter_specs("heldout", seed=seed))[:count]
    video = torch.stack([dataset.sample_clip(s)[0] for s in specs])
    recon = vae.decode(vae.encode(video))
    totals: dict = {}
    clip_psnr, first_psnr = [], []
    for original, rebuilt, spec in zip(video, recon, specs):
        got, want = analysis.video_to_frames(rebuilt), analysis.video_to_frames(original)
        for k, v in analysis.check_prompt(got, spec).items():
            totals[k] = totals.get(k, 0) + int(v) / count
        clip_psnr.append(analysis.psnr(got, want))
        first_psnr.append(analysis.psnr(got[:1], want[:1]))
    return {**totals, "psnr": sum(clip_psnr) / count, "psnr_min": min(clip_psnr),
            "psnr_frame0": sum(first_psnr) / count, "psnr_frame0_min": min(first_psnr)}


# ------------------------------------------------------------------------------ fitted latent
# The recipe that works (TRAINING.md): the encoder regresses the principal-component latent of
# ``latent_targets`` and the decoder learns to invert it, each on its own (two processes),
# then ``vae_fit`` joins the halves.

BASIS_CLIPS = 300
TARGET_NOISE = 0.05          # decoder inputs are jittered by this much (unit-variance latent)
LOGVAR_TARGET_STD = 0.05     # posterior std the encoder is fitted to, in normalised units


def target_basis(out: Path, seed: int) -> dict:
    """The principal-component basis (``latent_targets.fit_basis``) of ``BASIS_CLIPS`` training
    clips, computed once per run folder (``<out>/basis.pt``)."""
    from . import latent_targets

    path = Path(out) / "basis.pt"
    if path.exists():
        return load(path)
    clips = torch.stack([dataset.sample_clip(seed * 10**6 + i, frames=FRAMES, size=64)[0]
                         for i in range(BASIS_CLIPS)])
    basis = latent_targets.fit_basis(clips, CONFIG.z_dim)
    atomic_save(basis, path)
    return basis


def fit_batch(step: int, seed: int):
    """Whole 17-frame clips (:func:`long_batch`) and single first frames (:func:`first_frames`)."""
    return long_batch(step, seed), first_frames(step, seed)


@torch.no_grad()
def scale_posterior_conv(vae: WanVAE) -> None:
    """Rescale the fresh ``conv1`` (to mean, log-variance) so that its default-initialised
    output reads in *normalised* latent units: the raw official 2.1 statistics (std 1.1-3.3,
    mean -0.9..1.6) are folded in rather than learnt by the encoder (measured: rmse 0.70 vs
    0.93 after 120 steps of fitting first frames)."""
    std = 1 / vae.latent_inv_std
    vae.conv1.weight[:vae.config.z_dim] *= std.view(-1, 1, 1, 1, 1)
    vae.conv1.bias[:vae.config.z_dim] = vae.conv1.bias[:vae.config.z_dim] * std + vae.latent_mean


def encoder_fit_loss(vae: WanVAE, basis: dict, step: int, seed: int):
    """MSE between the encoder's normalised posterior mean and the target latent, plus the
    log-variance pulled to a small fixed posterior (``LOGVAR_TARGET_STD``)."""
    from . import latent_targets

    mean, inv = latent_normalisation(vae)
    logvar_target = 2 * torch.log(LOGVAR_TARGET_STD / inv)
    loss, logs = 0.0, {}
    for name, (video, _) in zip(("clip", "image"), fit_batch(step, seed)):
        mu, logvar = encode_posterior(vae, video)
        err = (mu - mean) * inv - latent_targets.encode(video, basis)
        loss = loss + err.square().mean() + 0.1 * (logvar - logvar_target).square().mean()
        logs[f"rmse_{name}"] = err.detach().square().mean().sqrt()
    return loss, logs


def decoder_fit_loss(vae: WanVAE, basis: dict, step: int, seed: int):
    """Pixel loss of the decoder on (jittered) target latents; frame 0 weighted as in ``vae_long``."""
    from . import latent_targets

    mean, inv = latent_normalisation(vae)
    loss, logs = 0.0, {}
    for name, (video, bg) in zip(("clip", "image"), fit_batch(step, seed)):
        z = latent_targets.encode(video, basis)
        z = z + TARGET_NOISE * torch.randn_like(z)
        rec, mse, _ = pixel_loss(decode_raw(vae, z / inv + mean), video, bg, FIRST_FRAME_WEIGHT)
        loss = loss + rec
        logs[f"psnr_{name}"] = (10 * torch.log10(4 / mse)).detach()
    return loss, logs


def _fit_half(out: Path, stage_name: str, prefixes: tuple, loss, steps: int, seed: int,
              resume: bool, lr: float, offset: int, prepare=None) -> dict:
    """Train the parameters under ``prefixes`` of a fresh VAE (seed ``seed + offset``, then
    ``prepare(vae)`` if given) with ``loss(vae, basis, step, seed + offset)``; both halves use
    the basis of ``seed + 17``."""
    stage = Path(out) / stage_name
    done = finished_already(stage, steps, resume)
    if done is not None:
        return done
    basis = target_basis(out, seed + 17)
    seed = seed + offset
    vae = build(seed)
    if prepare is not None:
        prepare(vae)
    for name, p in vae.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
    opt = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=lr)
    ema = EMA(vae, 0.995)
    result = train_loop(stage, vae, opt, lambda step: loss(vae, basis, step, seed), steps,
                        lambda s: cosine_lr(s, steps, lr, 20, 0.05), resume=resume, seed=seed,
                        ema=ema, save_every=25)
    result["final"] = spectrally_weighted(result["ema"], basis)
    torch.save(result, stage / "done.pt")
    return result


def spectrally_weighted(state: dict, basis: dict) -> dict:
    """``state`` (a VAE fitted to the unit-variance target) with its latent rescaled by
    ``latent_targets.spectral_weights`` (:func:`standardise`, an exact reparametrisation:
    ``conv1`` scales the posterior, ``conv2`` undoes it)."""
    from . import latent_targets

    vae = WanVAE(CONFIG)
    vae.load_state_dict(state)
    weights = latent_targets.spectral_weights(basis)
    standardise(vae, vae.latent_mean, 1 / (vae.latent_inv_std * weights))
    return vae.state_dict()


def run_encoder_fit(out: Path, steps: int, seed: int, resume: bool) -> dict:
    """Stage ``encoder_fit``: the encoder (and ``conv1``) regress the target latent."""
    return _fit_half(out, "encoder_fit", ("encoder.", "conv1."), encoder_fit_loss, steps,
                     seed, resume, lr=1e-3, offset=17, prepare=scale_posterior_conv)


def run_decoder_fit(out: Path, steps: int, seed: int, resume: bool) -> dict:
    """Stage ``decoder_fit``: ``conv2`` and the decoder reconstruct clips from target latents."""
    return _fit_half(out, "decoder_fit", ("decoder.", "conv2."), decoder_fit_loss, steps,
                     seed, resume, lr=1e-3, offset=19)


def merge_halves(out: Path) -> dict:
    """The EMA encoder of ``encoder_fit`` and the EMA decoder of ``decoder_fit`` in one VAE
    (``final``), written to ``<out>/vae_merge/done.pt`` (the base of ``vae_fit``)."""
    halves = {name: finished(Path(out) / name) for name in ("encoder_fit", "decoder_fit")}
    for name, done in halves.items():
        if done is None:
            raise RuntimeError(f"run the '{name}' stage first: python -m training.train {name} ...")
    encoder, decoder = halves["encoder_fit"]["final"], halves["decoder_fit"]["final"]
    final = {k: (decoder if k.startswith(("decoder.", "conv2.")) else encoder)[k].clone()
             for k in encoder}
    stage = Path(out) / "vae_merge"
    stage.mkdir(parents=True, exist_ok=True)
    result = {"final": final, "step": 0,
              "seconds": halves["encoder_fit"]["seconds"] + halves["decoder_fit"]["seconds"]}
    torch.save(result, stage / "done.pt")
    return result


def run_vae_fit(out: Path, steps: int, seed: int, resume: bool) -> dict:
    """Stage ``vae_fit``: the merged halves, then the decoder fine-tuned on the fitted
    encoder's own latents (whole clips and first frames): the shipped VAE. The encoder, and so
    the DiTs' latents, are those of ``encoder_fit``."""
    merge_halves(out)
    result = _finetune_decoder(out, "vae_fit", "vae_merge", fit_batch, steps, seed + 23, resume,
                               lr=3e-4, warmup=10, ema_decay=0.99, save_every=25)
    print_reconstruction(out, "vae_fit")
    return result


# ------------------------------------------------------------------ decoder_shape (issue 27)
# Measured before this stage (32 held-out clips, training.analysis.shape_fidelity): rendered
# clips fit their own shape best in 100 % of frames (soft IoU 0.97), but after a round trip
# through the shipped VAE squares did so in 30 % and triangles in 12 % (circles 100 %): the
# decoder drew every object as a soft blob. The encoder (and so every DiT's latents) stays.

EDGE_WEIGHT = 8.0            # extra pixel weight on the object's outline
GRADIENT_WEIGHT = 1.0        # weight of the L1 loss on spatial differences (crisp edges)


def outline(video: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, H, W]`` in 0..1: where the clip ``[B, 3, T, H, W]`` changes across a pixel
    (the object's outline, one pixel either side)."""
    dx = (video[..., :, 1:] - video[..., :, :-1]).abs().amax(1, keepdim=True)
    dy = (video[..., 1:, :] - video[..., :-1, :]).abs().amax(1, keepdim=True)
    edge = F.pad(dx, (0, 1)) + F.pad(dx, (1, 0)) + F.pad(dy, (0, 0, 0, 1)) + F.pad(dy, (0, 0, 1, 0))
    return (edge / 2).clamp(0, 1)


def shape_loss(recon: torch.Tensor, video: torch.Tensor, bg: torch.Tensor,
               first_frame_weight: float = 1.0):
    """:func:`pixel_loss` with the outline weighted ``EDGE_WEIGHT`` more, plus an L1 loss on
    horizontal and vertical pixel differences; returns (loss, mse)."""
    weight = 1 + 4 * (video - bg[:, :, None, None, None]).abs().mean(1, keepdim=True) \
        + EDGE_WEIGHT * outline(video)
    if first_frame_weight != 1.0:
        weight = weight.clone()
        weight[:, :, 0] *= first_frame_weight
    err = recon - video
    rec = (weight * (err.abs() + err.square())).mean()
    grad = sum((d(recon) - d(video)).abs().mean()
               for d in (lambda v: v[..., :, 1:] - v[..., :, :-1],
                         lambda v: v[..., 1:, :] - v[..., :-1, :]))
    return rec + GRADIENT_WEIGHT * grad, err.square().mean().clamp_min(1e-10)


def shipped_vae_base(out: Path) -> Path:
    """``<out>/vae_shipped/done.pt`` holding the VAE in the weights folder (the base of
    ``decoder_shape`` when the earlier VAE stages' checkpoints are gone)."""
    from safetensors.torch import load_file
    from wan_core.demo import WEIGHTS_DIR

    stage = Path(out) / "vae_shipped"
    if not (stage / "done.pt").exists():
        stage.mkdir(parents=True, exist_ok=True)
        sd = load_file(str(WEIGHTS_DIR / "vae.safetensors"))
        torch.save({"final": sd, "step": 0, "seconds": 0.0}, stage / "done.pt")
    return stage


ANCHOR_WEIGHT = 0.02         # vae_shape: pull of the encoder's mean towards the base latent


def run_decoder_shape(out: Path, steps: int, seed: int, resume: bool,
                      joint: bool = False) -> dict:
    """Stage ``decoder_shape``: the shipped VAE's decoder fine-tuned with :func:`shape_loss` on
    the frozen encoder's posterior samples (whole clips, object crops, first frames).
    ``joint`` (stage ``vae_shape``): the encoder trains too, its posterior mean pulled towards
    the base encoder's (``ANCHOR_WEIGHT``, normalised units), so the latent moves only where
    the shape needs it."""
    base = "vae_fit" if finished(Path(out) / "vae_fit") is not None else \
        shipped_vae_base(out).name
    stage = Path(out) / ("vae_shape" if joint else "decoder_shape")
    done = finished_already(stage, steps, resume)
    if done is not None:
        return done
    vae = WanVAE(CONFIG)
    vae.load_state_dict(finished(Path(out) / base)["final"])
    anchor = None
    if joint:
        anchor = WanVAE(CONFIG)
        anchor.load_state_dict(vae.state_dict())
        anchor.requires_grad_(False)
    for name, p in vae.named_parameters():
        p.requires_grad_(joint or name.startswith(("decoder.", "conv2.")))
    params = [p for p in vae.parameters() if p.requires_grad]
    lr = 3e-4
    opt = torch.optim.Adam(params, lr=lr)
    ema = EMA(vae, 0.99)
    mean, inv = latent_normalisation(vae)

    def loss_fn(step):
        total, logs = 0.0, {}
        for name, (video, bg) in zip(("clip", "image"), fit_batch(step, seed + 31)):
            with torch.set_grad_enabled(joint):
                mu, logvar = encode_posterior(vae, video)
                raw = mu + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn_like(mu)
            loss, mse = shape_loss(decode_raw(vae, raw), video, bg, FIRST_FRAME_WEIGHT)
            if joint:
                with torch.no_grad():
                    mu0, _ = encode_posterior(anchor, video)
                drift = ((mu - mu0) * inv).square().mean()
                loss = loss + ANCHOR_WEIGHT * drift + KL_WEIGHT * posterior_kl(
                    vae, mu, torch.exp(0.5 * logvar.clamp(-30.0, 20.0)))
                logs[f"drift_{name}"] = drift.detach()
            total = total + loss
            logs[f"psnr_{name}"] = (10 * torch.log10(4 / mse)).detach()
        return total, logs

    result = train_loop(stage, vae, opt, loss_fn, steps,
                        lambda s: cosine_lr(s, steps, lr, 10, 0.1), resume=resume,
                        seed=seed, ema=ema, save_every=25)
    final = WanVAE(CONFIG)
    final.load_state_dict(result["ema"])
    result["final"] = final.eval().state_dict()
    torch.save(result, stage / "done.pt")
    return result
