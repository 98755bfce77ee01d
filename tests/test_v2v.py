"""Video-to-video (issue 28 item 1): ``denoise`` truncates the schedule as ComfyUI's KSampler
does, 1 is plain generation, 0 returns the input; T2V, I2V, TI2V, MoE and the distilled grid;
the nodes' encode -> sample -> decode path; the CLI's ``--video`` / ``--denoise``; and the
demo's restyle fidelity."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import load_pack
from tests.test_bad_input import no_model_loads  # noqa: F401 - the fixture
from tests.tiny_models import TEXT_DIM, dit_state_dict, vae_state_dict
from wan_core import load_dit, load_vae
from wan_core.conditioning import VideoConditioning, i2v_mask
from wan_core.pipeline import MoEModel, denoise_schedule, denoise_start, draw_noise, generate
from wan_core.sampling import noise_latent, solver_schedule

W, H, FRAMES = 32, 32, 9          # latent [16, 3, 4, 4]
SHAPE = (16, 3, 4, 4)


def tiny(model_type="t2v", seed=1, **kw):
    return load_dit(dit_state_dict(model_type, seed, **kw), dtype="fp32")


class Spy(torch.nn.Module):
    """A DiT that records the timesteps it is called at (and can refuse to be called)."""

    def __init__(self, model=None, name="", log=None, refuse=False):
        super().__init__()
        self.model, self.name, self.refuse = model, name, refuse
        self.log = [] if log is None else log

    @property
    def config(self):
        return self.model.config

    def forward(self, x, t, context, **kw):
        if self.refuse:
            raise AssertionError("the model was evaluated")
        self.log.append((self.name, float(t.reshape(-1)[0])))
        return self.model(x, t, context, **kw)


def _ctx(seed=0):
    return [torch.randn(5, TEXT_DIM, generator=torch.Generator().manual_seed(seed))]


def _init(seed=3, shape=SHAPE):
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------- the truncation rule

def comfyui_ksampler_sigmas(full, steps, denoise):
    """ComfyUI's KSampler.set_steps, written out: denoise > 0.9999 keeps the whole grid;
    otherwise a grid of int(steps / denoise) steps is made and its last steps + 1 sigmas kept;
    denoise <= 0 gives no sigmas."""
    if denoise <= 0.0:
        return []
    if denoise > 0.9999:
        return full(steps)
    new_steps = int(steps / denoise)
    return full(new_steps)[-(steps + 1):]


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler", "distilled"])
def test_denoise_truncates_the_schedule_as_comfyui_ksampler(solver):
    for steps in (1, 2, 3, 4, 7, 10, 20, 40):
        for denoise in (0.05, 0.1, 0.25, 1 / 3, 0.3, 0.45, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9,
                        0.99, 1.0):
            if solver == "distilled" and int(steps / denoise) > 1000:
                continue
            reference = comfyui_ksampler_sigmas(
                lambda n: solver_schedule(solver, n, 5.0).sigmas.tolist(), steps, denoise)
            schedule, start = denoise_schedule(solver, steps, 5.0, denoise)
            assert len(schedule) == steps
            assert schedule.sigmas.tolist() == reference, (steps, denoise)
            total = len(schedule) + start
            assert torch.equal(schedule.timesteps,
                               solver_schedule(solver, total, 5.0).timesteps[-steps:])
    assert denoise_start(20, 0.0) == (20, 20)           # no step runs
    assert denoise_start(4, 0.5) == (8, 4) and denoise_start(20, 0.3) == (66, 46)


def test_denoise_outside_0_1_is_refused():
    for bad in (-0.1, 1.01, float("nan"), float("inf"), True, "0.5", None):
        with pytest.raises(ValueError, match="denoise must be a number from 0 to 1"):
            denoise_start(10, bad)
    with pytest.raises(ValueError, match="denoise must be a number from 0 to 1"):
        generate(tiny(), _ctx(), None, VideoConditioning(W, H, FRAMES), steps=2, denoise=1.5,
                 init_latent=_init())


def test_distilled_truncation_keeps_its_own_grid_and_is_capped():
    """The distilled grid is the training timesteps 1000 (1 - i / n) shifted: truncating it
    runs the last 4 steps of the 8-step grid at denoise 0.5 (its timesteps 833.3 and 625 are
    two of the 4-step grid's), and a tiny denoise caps the grid at 1000 steps instead of
    failing."""
    full, _ = denoise_schedule("distilled", 4, 5.0, 1.0)
    assert full.timesteps.tolist() == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=0.01)
    half, start = denoise_schedule("distilled", 4, 5.0, 0.5)
    assert start == 4
    assert half.timesteps.tolist() == pytest.approx([833.333, 750.0, 625.0, 416.667], abs=0.01)
    tiny_denoise, start = denoise_schedule("distilled", 4, 5.0, 0.001)
    assert start == 996 and len(tiny_denoise) == 4
    assert float(tiny_denoise.sigmas[0]) < 0.03 and float(tiny_denoise.sigmas[-1]) == 0.0


# ----------------------------------------------------------------------- the pipeline

def test_denoise_1_is_plain_generation_bit_for_bit():
    model, ctx, cond = tiny(), _ctx(), VideoConditioning(W, H, FRAMES)
    plain = generate(model, ctx, None, cond, steps=3, seed=5)
    with_input = generate(model, ctx, None, cond, steps=3, seed=5, denoise=1.0,
                          init_latent=_init())
    assert torch.equal(plain, with_input)


def test_denoise_0_returns_the_input_and_evaluates_nothing():
    init = _init()
    stats = {}
    out = generate(Spy(tiny(), refuse=True), _ctx(), None, VideoConditioning(W, H, FRAMES),
                   steps=3, denoise=0.0, init_latent=init, stats=stats)
    assert torch.equal(out, init) and out is not init
    assert stats == {"evaluated": 0, "skipped": 0, "steps": 0}
    with pytest.raises(ValueError, match="needs an input latent"):
        generate(tiny(), _ctx(), None, VideoConditioning(W, H, FRAMES), steps=3, denoise=0.0)
    with pytest.raises(ValueError, match=r"input latent has shape .*a 32x32 input of 5 frames "
                                         r"for a 32x32, 9-frame video"):
        generate(tiny(), _ctx(), None, VideoConditioning(W, H, FRAMES), steps=3, denoise=0.5,
                 init_latent=_init(shape=(16, 2, 4, 4)))


@pytest.mark.parametrize("task", ["t2v", "i2v", "ti2v"])
def test_vid2vid_starts_from_the_noised_input_on_the_truncated_grid(task):
    """T2V, I2V (image + video: the image conditioning is kept) and TI2V: the first model call
    sees the input noised to the first sigma of the truncated grid, at its timesteps."""
    init = _init()
    g = torch.Generator().manual_seed(4)
    if task == "t2v":
        model, cond = tiny(), VideoConditioning(W, H, FRAMES)
    elif task == "i2v":
        model = tiny("i2v", 6, in_dim=36)
        y = torch.cat([i2v_mask(FRAMES, 4, 4), torch.randn(*SHAPE, generator=g)])[None]
        cond = VideoConditioning(W, H, FRAMES, y=y)
    else:
        model = load_dit(dit_state_dict("ti2v", 8, out_dim=48), dtype="fp32")
        init = _init(shape=(48, 3, 2, 2))
        first = torch.randn(1, 48, 1, 2, 2, generator=g)
        cond = VideoConditioning(W, H, FRAMES, first_latent=first)
    seen = []

    class First(Spy):
        def forward(self, x, t, context, **kw):
            seen.append((x.clone(), t.clone(), kw.get("y")))
            return self.model(x, t, context, **kw)

    out = generate(First(model), _ctx(), None, cond, steps=3, seed=2, denoise=0.4,
                   init_latent=init, solver="euler")
    schedule, _ = denoise_schedule("euler", 3, 5.0, 0.4)
    x0 = noise_latent(init, draw_noise(init.shape[1:], 2), float(schedule.sigmas[0]))
    if task == "ti2v":
        x0[:, :, :1] = cond.first_latent
        assert torch.equal(out[:, :, :1], cond.first_latent)
    assert len(seen) == 3 and torch.equal(seen[0][0], x0)
    assert [float(t.reshape(-1)[0]) for _, t, _ in seen] == schedule.timesteps.float().tolist() \
        or task == "ti2v"
    if task == "i2v":
        assert torch.equal(seen[0][2], cond.y)
    low = generate(model, _ctx(), None, cond, steps=3, seed=2, denoise=0.05, init_latent=init,
                   solver="euler")
    high = generate(model, _ctx(), None, cond, steps=3, seed=2, denoise=0.9, init_latent=init,
                    solver="euler")
    assert (low - init).abs().mean() < (high - init).abs().mean()


def test_moe_switches_experts_at_the_same_timestep_as_on_the_whole_grid():
    """A Wan 2.2 pair at boundary 0.875: the truncated run uses exactly the experts the whole
    int(steps / denoise)-step run uses at those timesteps, so the switch is at the same one."""
    high, low = tiny("t2v", 4), tiny("t2v", 5)
    for steps, denoise in ((6, 0.7), (3, 0.6)):
        log_part, log_full = [], []
        part = MoEModel(Spy(high, "high", log_part), Spy(low, "low", log_part), 0.875)
        full = MoEModel(Spy(high, "high", log_full), Spy(low, "low", log_full), 0.875)
        total, start = denoise_start(steps, denoise)
        generate(part, _ctx(), None, VideoConditioning(W, H, FRAMES), steps=steps,
                 denoise=denoise, init_latent=_init(), shift=12.0)
        generate(full, _ctx(), None, VideoConditioning(W, H, FRAMES), steps=total, shift=12.0)
        assert log_part == log_full[start:]
        names = [name for name, _ in log_part]
        assert names[0] == "high" and "low" in names, (steps, denoise, names)
        switch = next(t for name, t in log_part if name == "low")
        assert switch == next(t for name, t in log_full if name == "low")


def test_vace_reference_frames_are_put_in_front_of_a_video_latent():
    """With VACE reference images the sampled latent has leading reference frames; an input
    latent of the video alone gets the references' latents in front (from the control)."""
    from wan_core.pipeline import input_latent

    control = torch.randn(1, 96, 1 + 3, 4, 4)
    cond = VideoConditioning(W, H, FRAMES, vace=((control, 1.0),), trim=1)
    init = _init()
    full = input_latent(init, (16, 4, 4, 4), cond)
    assert torch.equal(full[:, :, 1:], init) and torch.equal(full[:, :, :1], control[:, :16, :1])


# ----------------------------------------------------------------------- nodes

def test_nodes_encode_sample_decode_video_to_video():
    """The workflow path: WanCore VAE Encode -> WanCore Sampler (denoise 0.6) -> WanCore VAE
    Decode on an IMAGE batch; denoise 0 gives the input latent back unchanged."""
    pack = load_pack()
    nodes = {name: pack.NODE_CLASS_MAPPINGS[name]() for name in
             ("WanCoreVAEEncode", "WanCoreSampler", "WanCoreVAEDecode", "WanCoreEmptyVideo")}
    vae = load_vae(vae_state_dict("2.1", 9), dtype=torch.float32)
    model = tiny()
    t = torch.linspace(0, 1, FRAMES)[:, None, None, None]
    images = (0.5 + 0.4 * torch.sin(6 * t + torch.linspace(0, 3, W)[None, None, :, None])
              ).expand(FRAMES, H, W, 3).contiguous()
    (latent,) = nodes["WanCoreVAEEncode"].encode(vae, images)
    (cond,) = nodes["WanCoreEmptyVideo"].build(W, H, FRAMES)
    embeds = {"positive": _ctx(), "negative": _ctx(1)}
    (same,) = nodes["WanCoreSampler"].sample(model, embeds, cond, 0, 3, 1.0, 5.0, "euler", 0.0,
                                             latent)
    assert torch.equal(same["samples"], latent["samples"])
    (out,) = nodes["WanCoreSampler"].sample(model, embeds, cond, 0, 3, 1.0, 5.0, "euler", 0.6,
                                            latent)
    assert out["samples"].shape == latent["samples"].shape
    assert not torch.equal(out["samples"], latent["samples"])
    (frames,) = nodes["WanCoreVAEDecode"].decode(vae, out)
    assert frames.shape == (FRAMES, H, W, 3) and torch.isfinite(frames).all()
    with pytest.raises(ValueError, match="denoise < 1 needs a latent input"):
        nodes["WanCoreSampler"].sample(model, embeds, cond, 0, 3, 1.0, 5.0, "euler", 0.0)


# ----------------------------------------------------------------------- the demo

def _psnr(a, b):
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean()) / 4      # [-1, 1] -> 0..1
    return 10 * math.log10(1 / mse)


DEMO_SOURCE = "a red circle moving left on a blue background"
DEMO_RESTYLE = "a red square moving left on a blue background"


def test_demo_restyle_at_denoise_0_3_stays_within_25_db():
    """Issue 28's goal: at denoise 0.3 a restyle with the clip's own prompt keeps PSNR >= 25 dB
    to the input (measured 29.3 dB at 10 steps; README: worst 26.9 dB over 8 held-out clips at
    20 steps); denoise 0 gives the VAE's reconstruction (32.3 dB). A changed prompt (the circle
    becomes a square) must change the video more than its own prompt does (measured 25.0 dB):
    the restyle follows the prompt, so changed prompts are not held to 25 dB (README table)."""
    from wan_core.demo import CFG, SHIFT, WEIGHTS_DIR, FILES, DemoModels, generate_video

    if not (WEIGHTS_DIR / FILES["t2v"]).exists():
        pytest.skip("demo weights not shipped")
    torch.set_num_threads(1)
    models = DemoModels()
    source = generate_video(models, DEMO_SOURCE, steps=10, seed=0)
    vae, te = models.get("vae"), models.get("text_encoder")
    with torch.no_grad():
        z = vae.encode(source[None])
    results = {}
    for prompt, denoise in ((DEMO_SOURCE, 0.0), (DEMO_SOURCE, 0.3), (DEMO_RESTYLE, 0.3)):
        context, negative = te.encode([prompt, ""])
        latent = generate(models.get("t2v"), [context], [negative],
                          VideoConditioning(64, 64, 17), steps=10, guide_scale=CFG, shift=SHIFT,
                          seed=1, denoise=denoise, init_latent=z)
        with torch.no_grad():
            results[prompt.split()[2], denoise] = _psnr(vae.decode(latent, tile=False)[0],
                                                        source)
    print(f"\nDEMO v2v PSNR to the input: {results}")
    assert results["circle", 0.0] > 29.0             # the VAE round trip
    assert results["circle", 0.3] >= 25.0
    assert results["square", 0.3] < results["circle", 0.3] - 2.0


# ----------------------------------------------------------------------- the CLI

@pytest.fixture
def clip_file(tmp_path):
    from wan_core.video_io import write_video

    rng = np.random.default_rng(0)
    frames = (rng.random((11, 48, 64, 3)) * 0.2 + np.linspace(0.2, 0.8, 64)[None, None, :, None])
    path = tmp_path / "clip.webp"
    write_video(path, torch.from_numpy(frames).float(), fps=8)
    return path


def _cli(models, out, *extra):
    from tests.tiny_models import FILES
    from wan_core.__main__ import main

    return main(["generate", "--dit", str(models / FILES["dit_t2v"]),
                 "--vae", str(models / FILES["vae21"]),
                 "--text-encoder", str(models / FILES["umt5"]), "--prompt", "a red circle",
                 "--steps", "2", "--out", str(out), *extra])


def test_cli_video_to_video(models, tmp_path, clip_file, capsys):
    """--video sets --frames (its 4n+1 length: 9 of 11) and --size (64x48); --denoise runs
    video-to-video; another --size resizes the video with one line."""
    from wan_core.video_io import read_video

    assert _cli(models, tmp_path / "a.mp4", "--video", str(clip_file), "--denoise", "0.5") == 0
    out = capsys.readouterr().out
    assert "has 11 frames, not 4n+1: using its first 9" in out
    frames, _ = read_video(tmp_path / "a.mp4")
    assert frames.shape == (9, 48, 64, 3)
    assert _cli(models, tmp_path / "b.mp4", "--video", str(clip_file), "--denoise", "0",
                "--size", "32x32", "--frames", "5") == 0
    assert "--video: resized from 64x48 to 32x32" in capsys.readouterr().out
    frames, _ = read_video(tmp_path / "b.mp4")
    assert frames.shape == (5, 32, 32, 3)


def test_cli_video_to_video_bad_input(models, tmp_path, clip_file, capsys, no_model_loads):
    from PIL import Image

    odd = tmp_path / "odd.webp"
    Image.new("RGB", (60, 44)).save(odd, save_all=True,
                                    append_images=[Image.new("RGB", (60, 44))] * 4)
    cases = [
        (("--video", str(clip_file), "--denoise", "1.5"), "--denoise: must be from 0 to 1"),
        (("--video", str(clip_file), "--denoise", "nan"), "--denoise: must be from 0 to 1"),
        (("--video", str(clip_file), "--denoise", "-0.2"), "--denoise: must be from 0 to 1"),
        (("--denoise", "0.5",), "--denoise restyles an input video: give --video FILE"),
        (("--video", str(clip_file)), "--video needs --denoise X"),
        (("--video", str(clip_file), "--denoise", "0.5", "--frames", "13"),
         "has 11 frames but --frames is 13: give --frames 9 or less"),
        (("--video", str(tmp_path / "missing.mp4"), "--denoise", "0.5"), "not found"),
        (("--video", str(odd), "--denoise", "0.5"),
         "is 60x44, not a size this model takes (width and height multiples of 16): give "
         "--size, e.g. --size 48x32"),
        (("--video", str(clip_file), "--denoise", "0.5", "--out", str(clip_file),
          "--overwrite"), "is the input file of --video"),
    ]
    for extra, needle in cases:
        assert _cli(models, tmp_path / "v.mp4", *extra) == 2, extra
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "v.mp4").exists()
