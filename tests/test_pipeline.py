"""The generation pipeline against the official sampling loops, and the CLI end to end.

The official loops (wan/text2video.py, image2video.py, textimage2video.py of Wan2.2) are
re-driven here step by step with the official WanModel and FlowUniPCMultistepScheduler on tiny
random weights; our ``generate`` runs the same weights loaded through ``load_dit``.
"""
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.reference import max_abs_err, official, report
from wan_core.conditioning import VideoConditioning, i2v_mask
from wan_core import load_dit
from wan_core.pipeline import MoEModel, draw_noise, generate

BOUND = 1e-4
TINY = dict(patch_size=(1, 2, 2), text_len=512, dim=64, ffn_dim=96, freq_dim=32, text_dim=24,
            num_heads=2, num_layers=2)
W, H, FRAMES = 32, 32, 9          # latent 3 x 4 x 4 (Wan 2.1 VAE stride 8), 12 tokens per frame


def official_model(model_type, in_dim, out_dim, seed):
    torch.manual_seed(seed)
    model = official("modules.model").WanModel(model_type=model_type, in_dim=in_dim,
                                                out_dim=out_dim, **TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def ours(model):
    return load_dit({k: v.clone() for k, v in model.state_dict().items()}, num_heads=2)


def official_loop(experts, boundary, scales_low_high, ctx, ctx_null, noise, steps, shift,
                  y=None, first=None):
    """One official sampling loop: expert choice, CFG, per-token t, UniPC step, re-imposing."""
    sched = official("utils.fm_solvers_unipc").FlowUniPCMultistepScheduler(
        num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    sched.set_timesteps(steps, device="cpu", shift=shift)
    latent = noise.clone()
    _, f, h, w = noise.shape
    seq_len = f * h * w // 4
    mask2 = torch.ones_like(noise)
    if first is not None:
        mask2[:, 0] = 0
        latent = (1 - mask2) * first + mask2 * latent
    for t in sched.timesteps:
        high = len(experts) == 1 or t.item() >= boundary * 1000
        model = experts[0] if high else experts[1]
        scale = scales_low_high[1] if high else scales_low_high[0]
        timestep = torch.stack([t])
        if first is not None:
            timestep = (mask2[0][:, ::2, ::2] * timestep).flatten()[None]
        kw = dict(t=timestep, seq_len=seq_len, **({"y": [y]} if y is not None else {}))
        with torch.no_grad():
            cond = model([latent], context=[ctx], **kw)[0]
            uncond = model([latent], context=[ctx_null], **kw)[0]
        pred = uncond + scale * (cond - uncond)
        latent = sched.step(pred.unsqueeze(0), t, latent.unsqueeze(0), return_dict=False)[0][0]
        if first is not None:
            latent = (1 - mask2) * first + mask2 * latent
    return latent


def _texts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(7, TINY["text_dim"], generator=g), torch.randn(11, TINY["text_dim"], generator=g)


def test_t2v_equals_official_loop():
    ref = official_model("t2v", 16, 16, seed=1)
    ctx, neg = _texts()
    noise = draw_noise((16, 3, 4, 4), seed=42)[0]
    expected = official_loop([ref], None, (5.0, 5.0), ctx, neg, noise, steps=6, shift=5.0)
    got = generate(ours(ref), [ctx], [neg], VideoConditioning(W, H, FRAMES), steps=6,
                   guide_scale=5.0, shift=5.0, seed=42)
    err = max_abs_err(got[0], expected)
    report("pipeline t2v vs official loop", err, BOUND)
    assert err < BOUND


def test_moe_i2v_equals_official_image2video_loop():
    """Wan 2.2 I2V-A14B: two experts, boundary 0.9, y = mask + image latent, no CLIP."""
    high, low = official_model("i2v", 36, 16, seed=2), official_model("i2v", 36, 16, seed=3)
    ctx, neg = _texts(1)
    g = torch.Generator().manual_seed(5)
    y = torch.cat([i2v_mask(FRAMES, 4, 4), torch.randn(16, 3, 4, 4, generator=g)])
    noise = draw_noise((16, 3, 4, 4), seed=7)[0]
    expected = official_loop([high, low], 0.9, (3.0, 4.0), ctx, neg, noise, steps=8, shift=5.0,
                             y=y)
    moe = MoEModel(ours(high), ours(low), boundary=0.9, guide_scales=(4.0, 3.0))
    got = generate(moe, [ctx], [neg], VideoConditioning(W, H, FRAMES, y=y[None]), steps=8,
                   shift=5.0, seed=7)
    err = max_abs_err(got[0], expected)
    report("pipeline MoE i2v vs official loop", err, BOUND)
    assert err < BOUND


def test_ti2v_equals_official_textimage2video_loop():
    """TI2V-5B: 48 channels, first latent frame given, t = 0 on its tokens, re-imposed."""
    ref = official_model("ti2v", 48, 48, seed=4)
    ctx, neg = _texts(2)
    first = torch.randn(48, 1, 4, 4, generator=torch.Generator().manual_seed(9))
    noise = draw_noise((48, 3, 4, 4), seed=3)[0]
    expected = official_loop([ref], None, (5.0, 5.0), ctx, neg, noise, steps=5, shift=5.0,
                             first=first)
    # The Wan 2.2 VAE has stride 16: a 64x64 video has a 4x4 latent.
    cond = VideoConditioning(64, 64, FRAMES, first_latent=first[None])
    got = generate(ours(ref), [ctx], [neg], cond, steps=5, guide_scale=5.0, shift=5.0, seed=3)
    err = max_abs_err(got[0], expected)
    report("pipeline ti2v vs official loop", err, BOUND)
    assert err < BOUND
    assert torch.equal(got[0, :, :1], first)


def test_pipeline_errors_are_early_and_clear():
    t2v = ours(official_model("t2v", 16, 16, seed=1))
    i2v = ours(official_model("i2v", 36, 16, seed=2))
    ctx = [torch.randn(3, TINY["text_dim"])]
    with pytest.raises(ValueError, match="needs a start image"):
        generate(i2v, ctx, None, VideoConditioning(W, H, FRAMES), steps=1)
    with pytest.raises(ValueError, match="4n\\+1"):
        generate(t2v, ctx, None, VideoConditioning(W, H, 8), steps=1)
    with pytest.raises(ValueError, match="needs an input latent"):
        generate(t2v, ctx, None, VideoConditioning(W, H, FRAMES), steps=2, denoise=0.5)


def test_vid2vid_denoise_starts_from_the_input_latent():
    t2v = ours(official_model("t2v", 16, 16, seed=1))
    ctx = [torch.randn(3, TINY["text_dim"])]
    init = torch.randn(1, 16, 3, 4, 4)
    near = generate(t2v, ctx, None, VideoConditioning(W, H, FRAMES), steps=2, denoise=0.05,
                    init_latent=init, solver="euler")
    far = generate(t2v, ctx, None, VideoConditioning(W, H, FRAMES), steps=2, solver="euler")
    assert max_abs_err(near, init) < max_abs_err(far, init)


def _cli(models, out, *extra, dit="diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors",
         steps="3"):
    """Run ``python -m wan_core generate`` on the tiny models (``steps=None``: the default)."""
    cmd = [sys.executable, "-m", "wan_core", "generate", "--task", "t2v",
           "--dit", str(models / dit),
           "--vae", str(models / "vae/wan_2.1_vae.safetensors"),
           "--text-encoder", str(models / "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
           "--prompt", "a red circle moving left", "--size", "64x48", "--frames", "9",
           *(["--steps", steps] if steps else []), "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_writes_a_playable_video_and_is_deterministic(models, tmp_path):
    from safetensors.torch import load_file

    from wan_core.video_io import read_video

    runs = []
    for i in range(2):
        out = tmp_path / f"v{i}.mp4"
        result = _cli(models, out, "--seed", "5", "--save-latents", str(tmp_path / f"l{i}.st"))
        assert result.returncode == 0, result.stderr[-2000:]
        frames, fps = read_video(out)
        assert frames.shape == (9, 48, 64, 3) and fps == 16
        runs.append(load_file(str(tmp_path / f"l{i}.st"))["latent"])
    assert torch.equal(runs[0], runs[1])
    # same seed, same file: the encoder settings are fixed (issue 21)
    assert (tmp_path / "v0.mp4").read_bytes() == (tmp_path / "v1.mp4").read_bytes()


def test_cli_reports_bad_input_without_a_traceback(models, tmp_path):
    result = _cli(models, tmp_path / "x.mp4", "--frames", "8")
    assert result.returncode == 2
    assert "frames must be 4n+1" in result.stderr and "Traceback" not in result.stderr
