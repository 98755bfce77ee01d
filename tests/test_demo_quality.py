"""Quality of the shipped demo weights (issue 8): held-out prompt adherence, I2V first-frame
PSNR, the MoE expert pair, and the demo command end to end.

The weights were trained by ``python -m training.train all`` (TRAINING.md); every check
runs them through the normal loaders and ``wan_core.pipeline.generate``.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from wan_core.demo import WEIGHTS_DIR, FILES, DemoModels
from training.evaluate import evaluate

# The goals (TRAINING.md, "Results"), and regression floors set below the measured
# figures and above chance (colour 1/6, direction 1/4, background 1/4).
GOAL_ADHERENCE = 0.90       # measured 0.906 / 0.969 (32 held-out prompts, seeds 0 / 100)
GOAL_I2V_PSNR = 25.0        # measured 31.8 dB mean over 32 held-out first frames (20 steps)
FLOOR_BACKGROUND = 0.90     # measured 0.97 (t2v, i2v, moe; 32 prompts, 20 steps)
FLOOR_COLOUR = 0.70         # measured 0.97 (t2v, i2v, moe)
FLOOR_I2V_DIRECTION = 0.75  # measured 0.97 / 1.00 (32 prompts, 20 steps, two seeds)
FLOOR_T2V_DIRECTION = 0.75  # measured 0.94 / 1.00 (32 prompts, 20 steps, two seeds); chance 0.25
MIN_LORA_CHANGE = 0.003     # mean squared change the LoRA makes to the 4-step video (frames
                            # in 0..1): measured 0.0115 (seeds 0, 100); a no-op LoRA gives 0
                            # (LoRA / base vs the 20-step video: 0.013 / 0.012)
GOAL_FAST_ADHERENCE = 0.90  # issue 18: the distilled LoRA at 4 steps, CFG 1; measured 0.969 / 0.969
PROMPTS = 32                # held-out prompts per seed (the goal asks for at least 24)
SEEDS = (0, 100)            # the adherence figure is the mean over both
STEPS = 20                  # the demo's default

pytestmark = pytest.mark.skipif(not (WEIGHTS_DIR / FILES["t2v"]).exists(),
                                reason="demo weights not shipped")


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return DemoModels()


def test_weights_load_through_the_normal_loaders_and_fit_the_budget(models):
    total = sum((WEIGHTS_DIR / name).stat().st_size for name in FILES.values())
    assert total <= 40 * 1024 * 1024
    assert models.get("t2v").config.model_type == "t2v"
    assert models.get("i2v").config.model_type == "i2v"
    assert models.get("i2v").config.in_dim == 36 and not models.get("i2v").config.has_image_branch
    assert models.get("high_noise").config.model_type == "t2v"
    assert models.get("vae").config.z_dim == 16
    assert models.get("text_encoder").tokenizer.vocab_size <= models.get("text_encoder").config.vocab_size


def heldout_t2v(models, label: str, clips=None, **kw) -> dict:
    """T2V held-out figures averaged over ``SEEDS`` (``kw``: evaluate's sampler options;
    ``clips`` receives every ``(spec, frames)``)."""
    runs = [evaluate(models, "t2v", count=PROMPTS, seed=seed, clips=clips, **kw)
            for seed in SEEDS]
    result = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
    print(f"\nDEMO {label} held-out adherence {result['prompt']:.3f} ({PROMPTS} prompts x "
          f"seeds {SEEDS}): {result}; per seed {[r['prompt'] for r in runs]}")
    return result


T2V_CLIPS: list = []         # (spec, frames) of every clip t2v_result generated


@pytest.fixture(scope="module")
def t2v_result(models):
    return heldout_t2v(models, f"t2v ({STEPS} steps)", clips=T2V_CLIPS, steps=STEPS)


@pytest.fixture(scope="module")
def i2v_result(models):
    result = evaluate(models, "i2v", count=8, steps=STEPS)
    print(f"\nDEMO i2v first-frame PSNR {result['psnr']:.2f} dB (min {result['psnr_min']:.2f}), "
          f"adherence {result['prompt']:.3f}: {result}")
    return result


def test_t2v_heldout_background_and_colour_follow_the_prompt(t2v_result):
    assert t2v_result["background"] >= FLOOR_BACKGROUND
    assert t2v_result["colour"] >= FLOOR_COLOUR


def test_t2v_heldout_direction_follows_the_prompt_more_than_by_chance(t2v_result):
    assert t2v_result["direction"] >= FLOOR_T2V_DIRECTION


def test_t2v_heldout_prompt_adherence_goal(t2v_result):
    assert t2v_result["prompt"] >= GOAL_ADHERENCE


def test_i2v_first_frame_psnr_goal(i2v_result):
    assert i2v_result["psnr"] >= GOAL_I2V_PSNR


def test_i2v_follows_the_prompt(i2v_result):
    assert i2v_result["background"] >= FLOOR_BACKGROUND
    assert i2v_result["direction"] >= FLOOR_I2V_DIRECTION


def test_moe_expert_pair_runs(models):
    result = evaluate(models, "moe", count=8, steps=STEPS)
    print(f"\nDEMO moe held-out adherence {result['prompt']:.3f} (8 prompts): {result}")
    assert result["count"] == 8 and result["background"] >= FLOOR_BACKGROUND


FAST_CLIPS: list = []        # (spec, frames) of every clip fast_result generated


@pytest.fixture(scope="module")
def fast_result(models):
    return heldout_t2v(models, "fast (LoRA, 4 steps, cfg 1)", clips=FAST_CLIPS, fast=True)


def test_fast_lora_heldout_prompt_adherence_goal(fast_result):
    assert fast_result["prompt"] >= GOAL_FAST_ADHERENCE


def test_the_fast_path_runs_the_lora(models, t2v_result, fast_result):
    """``--fast`` samples with the LoRA: its 4-step video differs from the base T2V's 4-step
    video of the same prompt and noise (a LoRA that does nothing gives the same video). Since
    issue 27's T2V the base alone follows the prompt at 4 steps (0.969), so the LoRA's gain in
    adherence is no longer measurable; how close each is to the 20-step CFG video is printed."""
    from wan_core.demo import FAST

    base_clips = []
    heldout_t2v(models, "base T2V at 4 distilled steps, cfg 1, no LoRA", clips=base_clips, **FAST)

    def error(clips, to):
        assert [spec for spec, _ in clips] == [spec for spec, _ in to]
        return float(np.mean([np.mean((np.asarray(f) - np.asarray(t)) ** 2)
                              for (_, f), (_, t) in zip(clips, to)]))

    print(f"\nDEMO 4 steps vs the 20-step CFG video, mean squared error: LoRA "
          f"{error(FAST_CLIPS, T2V_CLIPS):.4f}, base {error(base_clips, T2V_CLIPS):.4f}; "
          f"LoRA vs base {error(FAST_CLIPS, base_clips):.4f}")
    assert error(FAST_CLIPS, base_clips) > MIN_LORA_CHANGE


def test_demo_command_writes_a_video(tmp_path):
    from wan_core.video_io import read_video

    out = tmp_path / "demo.mp4"
    cmd = [sys.executable, "-m", "wan_core", "demo", "--prompt",
           "a green square moving up on a black background", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    frames, _ = read_video(out)
    assert frames.shape == (17, 64, 64, 3)


def test_fast_demo_command_writes_a_video(tmp_path):
    from wan_core.video_io import read_video

    out = tmp_path / "fast.mp4"
    cmd = [sys.executable, "-m", "wan_core", "demo", "--fast", "--prompt",
           "a red circle moving left on a blue background", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    frames, _ = read_video(out)
    assert frames.shape == (17, 64, 64, 3)
    refused = subprocess.run(cmd[:4] + ["--task", "moe"] + cmd[4:], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--fast is the distilled text-to-video demo" in refused.stderr


# --- shape fidelity (issue 27) ---------------------------------------------------------------
# Every frame's object is fitted with each of the three shapes (centre and size free); the
# prompted shape should fit best, and fit well. This implementation is the test's own (the
# training analysis has another): the object map is the pixel's position between the
# background colour and the object colour (0..1); a shape's fit is the soft IoU
# sum(min) / sum(max) of that map with the shape's anti-aliased coverage, maximised by a
# shrinking pattern search from the map's moments.
# Issue 27's goals: right >= 0.90 of frames, mean fit >= 0.80; rendered clips score 1.00 / 0.97.
# Measured on the weights shipped before issue 27's retrain (64 clips, 20 steps): right 0.37
# (circle 0.85, square 0.06, triangle 0.00), fit 0.75; on the retrained demo: right
# 0.929 (0.91 / 0.92 / 1.00), fit 0.854.
# These floors catch a regression.
FLOOR_SHAPE_RIGHT = 0.80
FLOOR_SHAPE_FIT = 0.78
SUB = 3                      # template supersampling


def _coverage(shape, cx, cy, r, size):
    """Anti-aliased coverage [size, size] of ``shape`` centred at (cx, cy), half-side r (px)."""
    g = (np.arange(size * SUB) + 0.5) / SUB
    u, v = (g[None, :] - cx) / r, (g[:, None] - cy) / r
    inside = {"circle": lambda: np.hypot(u, v) <= 1,
              "square": lambda: np.maximum(abs(u), abs(v)) <= 1,
              "triangle": lambda: (v <= 1) & (2 * abs(u) <= v + 1)}[shape]()
    return inside.reshape(size, SUB, size, SUB).mean((1, 3))


def _best_fit(m, shape):
    size = m.shape[0]
    mass = m.sum()
    if mass < 1:
        return 0.0
    yy, xx = np.indices(m.shape) + 0.5
    cx, cy = (m * xx).sum() / mass, (m * yy).sum() / mass
    r = np.sqrt(mass / {"circle": np.pi, "square": 4.0, "triangle": 2.0}[shape])
    if shape == "triangle":
        cy -= r / 3

    def score(p):
        return np.minimum(m, c := _coverage(shape, *p, size)).sum() / np.maximum(m, c).sum()

    p, best = np.array([cx, cy, r]), None
    best = score(p)
    for step in (1.0, 0.5, 0.25):
        moved = True
        while moved:
            moved = False
            for axis in range(3):
                for sign in (1, -1):
                    q = p.copy()
                    q[axis] += sign * step * (0.5 if axis == 2 else 1)
                    if q[2] > 0.5 and (s := score(q)) > best + 1e-6:
                        p, best, moved = q, s, True
    return best


def shape_scores(frames, spec):
    """(share of frames where the prompted shape fits best, mean fit of the prompted shape)."""
    from wan_core.demo.clips import BACKGROUNDS, COLOURS

    bg = np.asarray(BACKGROUNDS[spec.background]) / 255
    fg = np.asarray(COLOURS[spec.colour]) / 255
    right, fits = 0, []
    for frame in np.asarray(frames, np.float64):
        m = np.clip((frame - bg) @ (fg - bg) / ((fg - bg) @ (fg - bg)), 0, 1)
        fit = {name: _best_fit(m, name) for name in ("circle", "square", "triangle")}
        right += max(fit, key=fit.get) == spec.shape
        fits.append(fit[spec.shape])
    return right / len(fits), float(np.mean(fits))


def test_shape_metric_scores_rendered_clips_near_one_and_wrong_shapes_low():
    """The metric itself: rendered clips of every shape score ~1 on their own shape, and a
    clip asked to be another shape scores wrong."""
    from dataclasses import replace
    from training.dataset import sample_clip
    from training.evaluate import heldout_specs

    by_shape = {}
    for spec in heldout_specs(32):
        by_shape.setdefault(spec.shape, spec)
    for shape, spec in by_shape.items():
        frames = (sample_clip(spec)[0].permute(1, 2, 3, 0).numpy() + 1) / 2
        right, fit = shape_scores(frames[::4], spec)
        assert right == 1.0 and fit >= 0.95, (shape, right, fit)
        other = next(s for s in by_shape if s != shape)
        wrong = replace(spec, combo=replace(spec.combo, shape=other))
        assert shape_scores(frames[::4], wrong)[0] == 0.0


def test_t2v_heldout_shapes(t2v_result):
    per_shape = {}
    for spec, frames in T2V_CLIPS:
        per_shape.setdefault(spec.shape, []).append(shape_scores(frames, spec))
    table = {k: tuple(np.mean(v, axis=0).round(3)) for k, v in per_shape.items()}
    right, fit = np.mean(sum(per_shape.values(), []), axis=0)
    print(f"\nDEMO t2v shape fidelity over {len(T2V_CLIPS)} clips: right {right:.3f} "
          f"fit {fit:.3f}; per shape (right, fit) {table}")
    assert len(T2V_CLIPS) == PROMPTS * len(SEEDS)
    assert right >= FLOOR_SHAPE_RIGHT and fit >= FLOOR_SHAPE_FIT
