"""VACE generation end to end (issue 25): one tiny generation against diffusers'
WanVACEPipeline with the same scheduler grid, the trim of reference frames, step caching and
Wan 2.2 expert pairs with VACE, the CLI (--task vace) and the WanCore VACE node."""
from __future__ import annotations

import functools
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import load_pack
from tests.dit_helpers import random_state_dict
from tests.reference import max_abs_err, report
from tests.test_vace_model import diffusers_vace, vace_config
from tests.tiny_models import FILES, diffusers_wan21_vae
from wan_core import load_dit
from wan_core.conditioning import build_vace_conditioning
from wan_core.pipeline import MoEModel, draw_noise, generate
from wan_core.sampling import OFFICIAL_SIGMA_MAX, CacheSettings, flow_schedule

diffusers = pytest.importorskip("diffusers")
Image = pytest.importorskip("PIL.Image")

PIPELINE_BOUND = 1e-4
FRAMES, H, W = 5, 32, 32


@pytest.fixture(scope="module")
def tiny():
    """(our VACE DiT, diffusers' WanVACETransformer3DModel, diffusers VAE, our VAE)."""
    cfg = vace_config()
    sd = random_state_dict(cfg, seed=21)
    ours = load_dit(sd, num_heads=cfg.num_heads)
    ref, _ = diffusers_vace(cfg, sd)
    vae_ref, vae = diffusers_wan21_vae(8)
    return cfg, ours, ref, vae_ref, vae


def test_generation_matches_diffusers_wan_vace_pipeline(tiny):
    """Control video + mask + one reference image, CFG, 6 UniPC steps on the official grid:
    our generate() against WanVACEPipeline given the same noise (reference frame included),
    the same embeddings (zero-padded to 512 tokens as the official model pads them) and the
    same sigmas. diffusers returns the latent with the reference frame (output_type latent);
    ours drops it."""
    cfg, ours, ref, vae_ref, vae = tiny
    steps, shift, guide, seed = 6, 3.0, 4.0, 11
    rng = np.random.default_rng(4)
    video = rng.integers(0, 256, (FRAMES, H, W, 3), dtype=np.uint8)
    mask = np.zeros((FRAMES, H, W), dtype=np.uint8)
    mask[:, 8:24, 8:28] = 255
    reference = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    gen = torch.Generator().manual_seed(5)
    prompt, negative = (torch.randn(1, n, cfg.text_dim, generator=gen) for n in (9, 4))

    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction",
                                              use_flow_sigmas=True, num_train_timesteps=1000,
                                              flow_shift=shift)
    unshifted = np.linspace(OFFICIAL_SIGMA_MAX, 0, steps + 1)[:-1]
    sched.set_timesteps = functools.partial(sched.set_timesteps, sigmas=unshifted)
    pipe = diffusers.WanVACEPipeline(tokenizer=None, text_encoder=None, vae=vae_ref,
                                     scheduler=sched, transformer=ref)
    shape = (16, 1 + (FRAMES - 1) // 4 + 1, H // 8, W // 8)     # one reference frame in front
    noise = draw_noise(shape, seed)
    pad = lambda t: F.pad(t, (0, 0, 0, cfg.text_len - t.shape[1]))     # noqa: E731
    with torch.no_grad():
        expected = pipe(video=[Image.fromarray(f) for f in video],
                        mask=[Image.fromarray(np.repeat(f[..., None], 3, -1)) for f in mask],
                        reference_images=[Image.fromarray(reference)],
                        prompt_embeds=pad(prompt), negative_prompt_embeds=pad(negative),
                        height=H, width=W, num_frames=FRAMES, num_inference_steps=steps,
                        guidance_scale=guide, latents=noise.clone(), output_type="latent",
                        return_dict=False)[0]
    assert torch.equal(sched.sigmas, flow_schedule(steps, shift).sigmas)

    cond = build_vace_conditioning(
        vae, W, H, FRAMES,
        video=(torch.from_numpy(video).float() / 255 * 2 - 1).permute(3, 0, 1, 2)[None],
        mask=(torch.from_numpy(mask).float() / 255)[None, None],
        reference_images=[(torch.from_numpy(reference).float() / 255 * 2 - 1).permute(2, 0, 1)])
    assert cond.trim == 1
    with torch.no_grad():
        out = generate(ours, [prompt[0]], [negative[0]], cond, steps=steps, guide_scale=guide,
                       shift=shift, solver="unipc", seed=seed)
    assert out.shape == (1, 16, (FRAMES - 1) // 4 + 1, H // 8, W // 8)
    err = max_abs_err(out, expected[:, :, 1:])
    report("vace generation vs diffusers WanVACEPipeline (video + mask + reference, CFG, "
           "UniPC)", err, PIPELINE_BOUND)
    assert err < PIPELINE_BOUND


def test_scale_zero_generation_equals_the_base_model_and_controls_chain(tiny):
    cfg, ours, _, _, vae = tiny
    base = load_dit({k: v for k, v in ours.state_dict().items() if not k.startswith("vace_")},
                    num_heads=cfg.num_heads)
    gen = torch.Generator().manual_seed(1)
    ctx = [torch.randn(6, cfg.text_dim, generator=gen)]
    video = torch.rand(1, 3, FRAMES, H, W, generator=gen) * 2 - 1
    off = build_vace_conditioning(vae, W, H, FRAMES, video=video, strength=0.0)
    from wan_core.conditioning import VideoConditioning

    kw = dict(steps=3, guide_scale=1.0, shift=3.0, seed=2)
    with torch.no_grad():
        plain = generate(base, ctx, None, VideoConditioning(W, H, FRAMES), **kw)
        assert max_abs_err(generate(ours, ctx, None, off, **kw), plain) < PIPELINE_BOUND
        one = build_vace_conditioning(vae, W, H, FRAMES, video=video, strength=0.7)
        two = build_vace_conditioning(vae, W, H, FRAMES, video=-video, strength=0.4,
                                      previous=one)
        assert len(two.vace) == 2
        chained = generate(ours, ctx, None, two, **kw)
        expected = ours_two_controls(ours, ctx, one, two, kw)
    assert max_abs_err(chained, expected) < PIPELINE_BOUND
    assert max_abs_err(chained, generate(ours, ctx, None, one, **kw)) > 1e-3
    with pytest.raises(ValueError, match="VACE controls need a VACE model"):
        generate(base, ctx, None, one, **kw)


def ours_two_controls(model, ctx, one, two, kw):
    """The chained conditioning equals calling the DiT with both controls as a list."""
    from wan_core.sampling import make_velocity_fn, sample, solver_schedule

    contexts = [c for c, _ in two.vace]
    scales = [s for _, s in two.vace]
    velocity = make_velocity_fn(
        lambda x, t, **c: model(x, t, **c, vace_context=contexts, vace_scale=scales),
        {"context": ctx}, None, 1.0)
    noise = draw_noise((16, (FRAMES - 1) // 4 + 1, H // 8, W // 8), kw["seed"])
    return sample(velocity, noise, solver_schedule("unipc", kw["steps"], kw["shift"]), "unipc")


def test_vace_with_an_expert_pair_and_the_step_cache(tiny):
    cfg, ours, _, _, vae = tiny
    low = load_dit(random_state_dict(cfg, seed=22), num_heads=cfg.num_heads)
    gen = torch.Generator().manual_seed(3)
    ctx, neg = [torch.randn(5, cfg.text_dim, generator=gen)], [torch.zeros(1, cfg.text_dim)]
    cond = build_vace_conditioning(vae, W, H, FRAMES,
                                   video=torch.rand(1, 3, FRAMES, H, W, generator=gen) * 2 - 1)
    pair = MoEModel(ours, low, 0.875)
    stats = {}
    with torch.no_grad():
        out = generate(pair, ctx, neg, cond, steps=12, guide_scale=3.0, shift=3.0, seed=1,
                       cache=CacheSettings("easycache", threshold=5.0, start=0.0),
                       stats=stats)
    assert stats["skipped"] > 0 and torch.isfinite(out).all()
    from wan_core.pipeline import default_boundary

    assert default_boundary("vace") == 0.875


# ---------------------------------------------------------------------------- CLI and nodes

@pytest.fixture
def vace_inputs(tmp_path):
    from wan_core.video_io import write_video

    write_video(tmp_path / "control.mp4", torch.rand(9, 48, 64, 3,
                                                     generator=torch.Generator().manual_seed(1)))
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (16, 12, 48, 36))
    mask.save(tmp_path / "mask.png")
    Image.new("RGB", (40, 30), (200, 20, 20)).save(tmp_path / "reference.png")
    return tmp_path


def _cli(models, out, *extra, dit=FILES["dit_vace"]):
    from wan_core.__main__ import main

    return main(["generate", "--task", "vace", "--dit", str(models / dit),
                 "--vae", str(models / FILES["vae21"]), "--text-encoder",
                 str(models / FILES["umt5"]), "--prompt", "a red circle", "--size", "64x48",
                 "--steps", "2", "--out", str(out), *extra])


def test_cli_vace_runs_with_every_input_and_with_a_module(models, vace_inputs, capsys):
    from safetensors.torch import load_file

    d = vace_inputs
    assert _cli(models, d / "a.mp4", "--control-video", str(d / "control.mp4"),
                "--control-mask", str(d / "mask.png"), "--reference-image", str(d / "reference.png"),
                "--vace-scale", "0.8", "--save-latents", str(d / "a.latent")) == 0
    out = capsys.readouterr().out
    assert "9 frames" in out and "1 reference image(s)" in out      # frames from the video
    assert load_file(str(d / "a.latent"))["latent"].shape == (1, 16, 3, 6, 8)   # trimmed
    assert _cli(models, d / "b.mp4", "--frames", "5", "--vace-module",
                str(models / FILES["vace_module"]), dit=FILES["dit_t2v"]) == 0


@pytest.mark.parametrize("extra, dit, needle", [
    ((), FILES["dit_t2v"], "--task vace needs a Wan VACE model: --dit is custom (t2v) without "
                           "VACE weights; give a VACE model, or its VACE module with "
                           "--vace-module"),
    (("--vace-module", "DIT_VACE"), FILES["dit_t2v"], "is not a VACE module"),
    (("--control-video", "BAD"), FILES["dit_vace"], "cannot be read as a video"),
    (("--control-mask", "MISSING"), FILES["dit_vace"], "--control-mask: file not found"),
])
def test_cli_vace_bad_input_is_refused_before_loading(models, vace_inputs, capsys, extra, dit,
                                                      needle, monkeypatch):
    import wan_core

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for name in ("load_dit", "load_vae", "load_text_encoder"):
        monkeypatch.setattr(wan_core, name, refuse)
    (vace_inputs / "bad.mp4").write_text("not a video")
    names = {"DIT_VACE": str(models / FILES["dit_vace"]), "BAD": str(vace_inputs / "bad.mp4"),
             "MISSING": str(vace_inputs / "missing.mp4")}
    extra = [names.get(e, e) for e in extra]
    assert _cli(models, vace_inputs / "v.mp4", *extra, dit=dit) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (vace_inputs / "v.mp4").exists()


def test_cli_control_options_need_task_vace(models, vace_inputs, capsys):
    from wan_core.__main__ import main

    assert main(["generate", "--dit", str(models / FILES["dit_t2v"]), "--vae",
                 str(models / FILES["vae21"]), "--text-encoder", str(models / FILES["umt5"]),
                 "--prompt", "x", "--control-video", str(vace_inputs / "control.mp4"),
                 "--out", str(vace_inputs / "v.mp4")]) == 2
    assert "error: --control-video needs --task vace" in capsys.readouterr().err


def test_vace_node_chain_sampler_and_loader_module(models, monkeypatch):
    pack = load_pack()
    nodes = pack.NODE_CLASS_MAPPINGS
    monkeypatch.setenv("WANCORE_MODELS_DIR", str(models))
    loader = nodes["WanCoreModelLoader"]()
    model = loader.load(FILES["dit_t2v"].split("/", 1)[1],
                        vace_module=FILES["vace_module"].split("/", 1)[1])["result"][0]
    assert model.config.model_type == "vace" and not model.loaded
    vae = nodes["WanCoreVAELoader"]().load("wan_2.1_vae.safetensors")["result"][0]
    te = nodes["WanCoreTextEncoderLoader"]().load(FILES["umt5"].split("/", 1)[1])[0]
    (embeds,) = nodes["WanCoreTextEncode"]().encode(te, "a red circle", "")
    gen = torch.Generator().manual_seed(4)
    video = torch.rand(9, 48, 64, 3, generator=gen)
    masks = torch.zeros(1, 48, 64)
    masks[:, 12:36, 16:48] = 1
    refs = torch.rand(2, 30, 40, 3, generator=gen)
    vace = nodes["WanCoreVACE"]()
    (first,) = vace.build(vae, 64, 48, 9, 1.0, control_video=video, control_masks=masks,
                          reference_images=refs)
    (both,) = vace.build(vae, 64, 48, 9, 0.5, control_video=video.flip(0),
                         reference_images=refs, video_cond=first)
    assert first.trim == 2 and len(both.vace) == 2
    (latent,) = nodes["WanCoreSampler"]().sample(model, embeds, both, 0, 2, 3.0, 5.0, "unipc",
                                                 1.0)
    assert latent["samples"].shape == (1, 16, 3, 6, 8)     # the reference frames dropped
    with pytest.raises(ValueError, match="chained VACE controls must use the same number"):
        vace.build(vae, 64, 48, 9, 1.0, control_video=video, video_cond=first)
    plain = loader.load(FILES["dit_t2v"].split("/", 1)[1])["result"][0]
    with pytest.raises(ValueError, match="VACE controls need a VACE model"):
        nodes["WanCoreSampler"]().sample(plain, embeds, first, 0, 2, 3.0, 5.0, "unipc", 1.0)
