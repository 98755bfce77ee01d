"""Context windows (issue 28): the window partition and blend weights, the blended velocity
against a hand-written reference, equality with plain sampling when one window covers the
video, per-window conditioning slices and step-cache state, memory bounded by one window, and
the errors."""
from __future__ import annotations

import itertools

import pytest
import torch

from tests.dit_helpers import random_state_dict, tiny_config
from tests.reference import max_abs_err
from wan_core import load_dit
from wan_core.conditioning import VideoConditioning
from wan_core.pipeline import MoEModel, StepCached, generate
from wan_core.sampling import CacheSettings, ContextWindows
from wan_core.sampling.windows import blend_plan, plan_windows, windowed_velocity_fn


@pytest.mark.parametrize("schedule, blend", list(itertools.product(("static", "uniform"),
                                                                   ("linear", "pyramid"))))
def test_windows_cover_every_frame_and_weights_sum_to_1(schedule, blend):
    for frames, overlap in ((81, 16), (17, 8), (33, 4), (9, 0)):
        settings = ContextWindows(frames, overlap, schedule, blend)
        length, lap = settings.latent_frames, settings.latent_overlap
        for total in range(1, 4 * length):
            for step in (0, 1, 2):
                windows = settings.windows(total, step)
                assert windows[0][0] == 0 and windows[-1][0] + windows[-1][1] == total
                assert all(n == min(length, total) for _, n in windows)
                for (a, _), (b, _) in zip(windows, windows[1:]):
                    assert 0 < b - a <= length - lap        # overlap at least `lap`
                plan = blend_plan(windows, total, lap, blend)
                summed = torch.zeros(total, dtype=torch.float64)
                for start, n, w in plan:
                    assert bool((w > 0).all())
                    summed[start:start + n] += w
                assert torch.allclose(summed, torch.ones(total, dtype=torch.float64))


def test_static_windows_for_241_frames_of_81():
    # 61 latent frames in windows of 21 overlapping by 4: a stride of 17, the last one moved
    # to end at the last frame.
    assert ContextWindows(81, 16).windows(61) == [(0, 21), (17, 21), (34, 21), (40, 21)]
    assert plan_windows(61, 21, 4, shift=True) == [(0, 21), (9, 21), (26, 21), (40, 21)]


def test_blended_velocity_matches_a_hand_written_reference():
    """Two windows of 5 latent frames over 8, overlap 2 (linear): frames 3, 4 are shared;
    the first window's weights ramp 1, 2/3, 1/3... by hand."""
    settings = ContextWindows(17, 8, "static", "linear")         # 5 latent frames, overlap 2
    x = torch.randn(1, 2, 8, 2, 2)
    calls = []

    def make(start, length):
        def velocity(window, t):
            calls.append((start, window.shape[2]))
            return window * (start + 1)                          # a different field per window
        return velocity

    out = windowed_velocity_fn(settings, 8, 0, make)(x, torch.tensor([500.0]))
    assert calls == [(0, 5), (3, 5)]
    # window 0 covers 0..4, window 1 covers 3..7; shared frames 3, 4.
    w0 = torch.tensor([1, 1, 1, 2 / 3, 1 / 3], dtype=torch.float64)
    w1 = torch.tensor([1 / 3, 2 / 3, 1, 1, 1], dtype=torch.float64)
    total = torch.zeros(8, dtype=torch.float64)
    total[0:5] += w0
    total[3:8] += w1
    expected = torch.zeros_like(x)
    expected[:, :, 0:5] += x[:, :, 0:5] * 1 * (w0 / total[0:5]).float().view(1, 1, -1, 1, 1)
    expected[:, :, 3:8] += x[:, :, 3:8] * 4 * (w1 / total[3:8]).float().view(1, 1, -1, 1, 1)
    assert max_abs_err(out, expected) < 1e-6


@pytest.fixture(scope="module")
def t2v():
    cfg = tiny_config("t2v")
    return load_dit(random_state_dict(cfg, seed=1), num_heads=cfg.num_heads), cfg


def _texts(cfg, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(6, cfg.text_dim, generator=gen)], [torch.randn(3, cfg.text_dim,
                                                                       generator=gen)]


class FrameCounter(torch.nn.Module):
    """A model wrapper recording the most latent frames one forward saw."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.most = model, model.config, 0

    def forward(self, x, t, context, **kwargs):
        self.most = max(self.most, x.shape[2])
        return self.model(x, t, context, **kwargs)


def test_one_window_covering_the_video_is_plain_sampling(t2v):
    model, cfg = t2v
    ctx, neg = _texts(cfg)
    cond = VideoConditioning(32, 32, 17)
    kw = dict(steps=4, guide_scale=3.0, shift=3.0, seed=1)
    plain = generate(model, ctx, neg, cond, **kw)
    windowed = generate(model, ctx, neg, cond, context_windows=ContextWindows(17, 8), **kw)
    assert torch.equal(plain, windowed)
    carried = generate(StepCached(model, None, ContextWindows(21, 8)), ctx, neg, cond, **kw)
    assert torch.equal(plain, carried)


def test_windows_bound_the_model_input_and_keep_one_cache_per_window(t2v):
    model, cfg = t2v
    counter = FrameCounter(model)
    ctx, neg = _texts(cfg)
    cond = VideoConditioning(32, 32, 61)                   # 16 latent frames
    stats = {}
    settings = ContextWindows(17, 8)                       # windows of 5 latent frames
    cache = CacheSettings("easycache", threshold=3.0, start=0.0)
    out = generate(counter, ctx, neg, cond, steps=6, guide_scale=3.0, shift=3.0, seed=1,
                   context_windows=settings, cache=cache, stats=stats)
    windows = settings.windows(16)
    assert counter.most == 5 and out.shape[2] == 16 and torch.isfinite(out).all()
    assert stats["steps"] == 6 * len(windows) and stats["skipped"] > 0
    with pytest.raises(ValueError, match="use schedule 'static' with a step cache"):
        generate(model, ctx, neg, cond, steps=2, context_windows=ContextWindows(17, 8,
                                                                               "uniform"),
                 cache=cache)
    uniform = generate(model, ctx, neg, cond, steps=4, guide_scale=3.0, shift=3.0, seed=1,
                       context_windows=ContextWindows(17, 8, "uniform", "pyramid"))
    assert torch.isfinite(uniform).all() and not torch.equal(uniform[:, :, :5], out[:, :, :5])


def test_window_conditioning_slices_i2v_and_vace_and_moe():
    """Each window sees its own frames of the I2V ``y`` and of the VACE control (VACE
    reference frames in every window), an expert pair switches inside every window."""
    from tests.test_vace_model import vace_config

    i2v_cfg = tiny_config("i2v")
    i2v = load_dit(random_state_dict(i2v_cfg, seed=3), num_heads=i2v_cfg.num_heads)
    seen = []

    class Spy(FrameCounter):
        def forward(self, x, t, context, **kwargs):
            seen.append({k: (v.shape[2] if torch.is_tensor(v) else
                             [u.shape[2] for u in v] if isinstance(v, list) and v and
                             torch.is_tensor(v[0]) and v[0].dim() == 5 else None)
                         for k, v in kwargs.items() if k in ("y", "vace_context")})
            return super().forward(x, t, context, **kwargs)

    ctx, neg = _texts(i2v_cfg)
    y = torch.randn(1, 20, 10, 4, 4)
    clip = torch.randn(1, 5, i2v_cfg.image_dim)
    cond = VideoConditioning(32, 32, 37, y=y, clip_fea=clip)
    out = generate(Spy(i2v), ctx, neg, cond, steps=2, guide_scale=3.0, shift=3.0, seed=1,
                   context_windows=ContextWindows(17, 8))
    assert out.shape[2] == 10 and {s["y"] for s in seen} == {5}

    vcfg = vace_config()
    vace = load_dit(random_state_dict(vcfg, seed=4), num_heads=vcfg.num_heads)
    low = load_dit(random_state_dict(vcfg, seed=5), num_heads=vcfg.num_heads)
    seen.clear()
    control = torch.randn(1, 96, 12, 4, 4)                   # 2 reference frames + 10
    cond = VideoConditioning(32, 32, 37, vace=((control, 1.0),), trim=2)
    pair = MoEModel(Spy(vace), Spy(low), 0.875)
    out = generate(pair, ctx, neg, cond, steps=4, guide_scale=3.0, shift=3.0, seed=1,
                   context_windows=ContextWindows(17, 8))
    assert out.shape[2] == 10                                # the references dropped
    assert {tuple(s["vace_context"]) for s in seen} == {(7,)}  # 2 refs + 5 frames


def test_bad_context_windows_are_refused():
    with pytest.raises(ValueError, match="must be 4n\\+1"):
        ContextWindows(80, 16)
    with pytest.raises(ValueError, match="multiple of 4"):
        ContextWindows(81, 10)
    with pytest.raises(ValueError, match="must be smaller than the window"):
        ContextWindows(17, 16)
    with pytest.raises(ValueError, match="schedule must be one of static, uniform"):
        ContextWindows(81, 16, "looped")
    with pytest.raises(ValueError, match="blend must be one of linear, pyramid"):
        ContextWindows(81, 16, "static", "gaussian")


def test_context_windows_node_survives_step_cache_lora_and_moe_nodes(models, monkeypatch):
    from tests.conftest import load_pack
    from tests.tiny_models import FILES
    from wan_core.pipeline import unwrap_options

    nodes = load_pack().NODE_CLASS_MAPPINGS
    monkeypatch.setenv("WANCORE_MODELS_DIR", str(models))
    loader = nodes["WanCoreModelLoader"]()
    high = loader.load(FILES["dit_t2v_high"].split("/", 1)[1])["result"][0]
    low = loader.load(FILES["dit_t2v_low"].split("/", 1)[1])["result"][0]
    (windowed,) = nodes["WanCoreContextWindows"]().apply(high, 17, 8, "static", "pyramid")
    (cached,) = nodes["WanCoreStepCache"]().apply(windowed, "easycache", 0.3, 0.2, 1.0)
    (patched,) = nodes["WanCoreLoRA"]().apply(cached, FILES["lora_t2v_high"].split("/", 1)[1],
                                              0.5)
    (pair,) = nodes["WanCoreMoE"]().combine(patched, low, 0.0, 4.0, 3.0)
    _, cache, windows = unwrap_options(pair)
    assert cache.method == "easycache" and windows == ContextWindows(17, 8, "static", "pyramid")
    te = nodes["WanCoreTextEncoderLoader"]().load(FILES["umt5"].split("/", 1)[1])[0]
    (embeds,) = nodes["WanCoreTextEncode"]().encode(te, "a red circle", "")
    (cond,) = nodes["WanCoreEmptyVideo"]().build(64, 48, 41)
    (latent,) = nodes["WanCoreSampler"]().sample(pair, embeds, cond, 0, 3, 4.0, 5.0, "unipc",
                                                 1.0)
    assert latent["samples"].shape == (1, 16, 11, 6, 8)
    with pytest.raises(ValueError, match="must be smaller than the window"):
        nodes["WanCoreContextWindows"]().apply(high, 17, 16)


def _object_track(video: torch.Tensor) -> torch.Tensor:
    """Per frame, the centroid (x, y) of the pixels far from the clip's background colour (the
    median pixel of the whole clip): ``[T, 2]``, NaN where nothing stands out. video [3, T, H, W]
    in [-1, 1]."""
    background = video.flatten(1).median(dim=1).values[:, None, None, None]
    mask = ((video - background).abs().amax(dim=0) > 0.4).float()        # [T, H, W]
    ys, xs = torch.meshgrid(torch.arange(video.shape[2]), torch.arange(video.shape[3]),
                            indexing="ij")
    area = mask.sum(dim=(1, 2))
    track = torch.stack([(mask * xs).sum(dim=(1, 2)), (mask * ys).sum(dim=(1, 2))], dim=1)
    return torch.where(area[:, None] > 4, track / area.clamp_min(1)[:, None], float("nan"))


def test_demo_longer_than_its_training_length_samples_windows_and_keeps_moving():
    """`demo --frames 65`: six 25-frame windows overlapping by 20; the object moves the
    prompted way overall. Measured on 16 held-out prompts (README): 95 % (worst 82 %) of the
    object's movement goes the prompted way, with small backward steps where windows meet (the
    issue's goal of no reversal is not met); the floor here catches a video that stalls or runs
    the wrong way."""
    from wan_core.demo import DemoModels, demo_context_windows, generate_video

    assert demo_context_windows(25) is None
    assert demo_context_windows(29) == demo_context_windows(65) == ContextWindows(25, 20)
    calls = []
    models = DemoModels()
    model = models.dit("t2v")
    handle = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[2]))
    try:
        video = generate_video(models, "a red circle moving right on a black background",
                               frames=65, seed=0)
    finally:
        handle.remove()
    assert video.shape == (3, 65, 64, 64) and bool(torch.isfinite(video).all())
    assert max(calls) == 7                       # the model never sees more than 25 frames
    x = _object_track(video)[:, 0]
    moves = torch.diff(x[~torch.isnan(x)])
    forward, backward = float(moves.clamp_min(0).sum()), float((-moves).clamp_min(0).sum())
    assert forward > 20 and forward > 1.5 * backward, (forward, backward)
    assert float((-moves).clamp_min(0).max()) < 2.0   # no visible jump back (measured 0.5 px)
