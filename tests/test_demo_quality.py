"""Quality of the shipped demo weights (issue 8): held-out prompt adherence, I2V first-frame
PSNR, the MoE expert pair, and the demo command end to end.

The weights were trained by ``python -m training.train all`` (TRAINING.md); every check
runs them through the normal loaders and ``wan_core.pipeline.generate``.
"""
import subprocess
import sys

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
GOAL_FAST_ADHERENCE = 0.90  # issue 18: the distilled LoRA at 4 steps, CFG 1; measured 0.938 / 0.969
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


def heldout_t2v(models, label: str, **kw) -> dict:
    """T2V held-out figures averaged over ``SEEDS`` (``kw``: evaluate's sampler options)."""
    runs = [evaluate(models, "t2v", count=PROMPTS, seed=seed, **kw) for seed in SEEDS]
    result = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
    print(f"\nDEMO {label} held-out adherence {result['prompt']:.3f} ({PROMPTS} prompts x "
          f"seeds {SEEDS}): {result}; per seed {[r['prompt'] for r in runs]}")
    return result


@pytest.fixture(scope="module")
def t2v_result(models):
    return heldout_t2v(models, f"t2v ({STEPS} steps)", steps=STEPS)


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


@pytest.fixture(scope="module")
def fast_result(models):
    return heldout_t2v(models, "fast (LoRA, 4 steps, cfg 1)", fast=True)


def test_fast_lora_heldout_prompt_adherence_goal(fast_result):
    assert fast_result["prompt"] >= GOAL_FAST_ADHERENCE


def test_the_lora_is_what_makes_4_steps_without_cfg_work(models, fast_result):
    """The base T2V sampled the same way (4 distilled steps, cfg 1, same prompts and seeds)
    without the LoRA follows the prompt clearly less often."""
    from wan_core.demo import FAST

    base = heldout_t2v(models, "base T2V at 4 distilled steps, cfg 1, no LoRA", **FAST)["prompt"]
    assert fast_result["prompt"] >= base + 0.10      # measured 0.656 -> 0.953


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
