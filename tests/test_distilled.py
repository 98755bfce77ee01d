"""Step-distilled generation: the grid the LightX2V / Lightning LoRAs were trained with, the
Euler loop over it, CFG 1 without the unconditional pass, the MoE switch after step 2, and the
CLI's --lora / --solver distilled."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.dit_helpers import random_state_dict, tiny_config
from tests.reference import max_abs_err, report
from tests.test_pipeline import _cli as pipeline_cli
from wan_core import load_dit
from wan_core.conditioning import VideoConditioning
from wan_core.pipeline import MoEModel, draw_noise, generate
from wan_core.sampling import distilled_schedule


def published_grid(steps, shift):
    """The rule of the distilled schedulers, in float64: training timesteps 1000 (1 - i/N) on
    the 1000-point grid sigma = t / 1000, shifted: sigma' = s sigma / (1 + (s - 1) sigma)."""
    t = np.array([1000 * (1 - i / steps) for i in range(steps)], dtype=np.float64) / 1000
    return shift * t / (1 + (shift - 1) * t)


@pytest.mark.parametrize("steps, shift", [(4, 5.0), (4, 3.0), (8, 5.0), (2, 8.0)])
def test_distilled_grid_follows_the_published_rule(steps, shift):
    schedule = distilled_schedule(steps, shift)
    levels = published_grid(steps, shift)
    assert schedule.sigmas.dtype == torch.float32 and float(schedule.sigmas[-1]) == 0.0
    assert np.allclose(schedule.sigmas[:-1].double().numpy(), levels, atol=1e-6)
    # the model is evaluated at the float timesteps (4 steps, shift 5: 1000, 937.5, 833.3, 625)
    assert np.allclose(schedule.timesteps.double().numpy(), levels * 1000, atol=1e-3)
    assert schedule.timesteps.is_floating_point()


class Recorder(torch.nn.Module):
    """A DiT wrapper that records the batch size and timestep of every forward."""

    def __init__(self, dit, calls):
        super().__init__()
        self.dit, self.calls, self.config = dit, calls, dit.config

    def forward(self, x, t, context, **kw):
        self.calls.append((self.dit.tag, x.shape[0], float(t.reshape(-1)[0])))
        return self.dit(x, t, context, **kw)


def _tiny(seed=0):
    cfg = tiny_config("t2v")
    dit = load_dit(random_state_dict(cfg, seed=seed), num_heads=cfg.num_heads)
    return cfg, dit


def _texts(cfg):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(7, cfg.text_dim, generator=g)], [torch.randn(5, cfg.text_dim, generator=g)]


def test_distilled_sampler_is_euler_over_that_grid_and_cfg_1_skips_the_negative():
    cfg, dit = _tiny()
    dit.tag = "dit"
    calls = []
    model = Recorder(dit, calls)
    pos, neg = _texts(cfg)
    cond = VideoConditioning(32, 32, 9)
    out = generate(model, pos, neg, cond, steps=4, guide_scale=1.0, shift=5.0,
                   solver="distilled", seed=7)
    # one batch-1 forward per step: the negative prompt is never evaluated at cfg 1
    assert [(b, round(t, 3)) for _, b, t in calls] == \
        [(1, round(1000 * s, 3)) for s in published_grid(4, 5.0)]
    # reference: a hand-written Euler loop over the published grid
    sigmas = list(published_grid(4, 5.0)) + [0.0]
    x = draw_noise((16, 3, 4, 4), 7)
    with torch.no_grad():
        for i in range(4):
            v = dit(x, torch.tensor([1000 * sigmas[i]], dtype=torch.float32), pos)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    err = max_abs_err(out, x)
    report("distilled sampler vs hand-written Euler", err, 1e-5)
    assert err < 1e-5


@pytest.mark.parametrize("boundary", [0.875, 0.9])
def test_distilled_moe_switches_experts_after_step_2_without_cfg(boundary):
    cfg, high = _tiny(1)
    _, low = _tiny(2)
    high.tag, low.tag = "high", "low"
    calls = []
    pair = MoEModel(Recorder(high, calls), Recorder(low, calls), boundary, (1.0, 1.0))
    pos, neg = _texts(cfg)
    generate(pair, pos, neg, VideoConditioning(32, 32, 9), steps=4, shift=5.0,
             solver="distilled", seed=1)
    assert [(tag, b) for tag, b, _ in calls] == [("high", 1), ("high", 1), ("low", 1), ("low", 1)]


def test_cfg_above_1_still_runs_the_negative():
    cfg, dit = _tiny()
    dit.tag = "dit"
    calls = []
    pos, neg = _texts(cfg)
    generate(Recorder(dit, calls), pos, neg, VideoConditioning(32, 32, 9), steps=2,
             guide_scale=3.0, solver="distilled", seed=0)
    assert [b for _, b, _ in calls] == [2, 2]          # cond and uncond batched


# -- CLI --------------------------------------------------------------------------------------

HIGH = "diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"


def _cli(models, out, *extra):
    return pipeline_cli(models, out, *extra, dit=HIGH, steps=None)


def test_cli_runs_a_wan22_pair_with_a_lora_per_expert_in_4_distilled_steps(models, tmp_path):
    from safetensors.torch import load_file

    loras = models / "loras"
    base = _cli(models, tmp_path / "a.mp4", "--solver", "distilled", "--save-latents",
                str(tmp_path / "a.st"),
                "--dit-low-noise",
                str(models / "diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"))
    assert base.returncode == 0, base.stderr[-2000:]
    assert "4 steps, shift 5.0, cfg 1.0, solver distilled" in base.stdout
    run = _cli(models, tmp_path / "b.mp4", "--solver", "distilled", "--save-latents",
               str(tmp_path / "b.st"),
               "--dit-low-noise",
               str(models / "diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"),
               "--lora", str(loras / "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors"),
               "--lora-low-noise",
               f"{loras / 'wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors'}:0.5")
    assert run.returncode == 0, run.stderr[-2000:]
    a, b = load_file(str(tmp_path / "a.st"))["latent"], load_file(str(tmp_path / "b.st"))["latent"]
    assert torch.isfinite(b).all() and max_abs_err(a, b) > 1e-3      # the LoRAs took effect


def test_cli_lora_errors_are_early_and_clear(models, tmp_path):
    missing = _cli(models, tmp_path / "x.mp4", "--lora", str(tmp_path / "nope.safetensors:0.8"))
    assert missing.returncode == 2 and "LoRA file not found" in missing.stderr
    assert "nope.safetensors" in missing.stderr and "Traceback" not in missing.stderr
    vae_as_lora = _cli(models, tmp_path / "x.mp4", "--lora",
                       str(models / "vae/wan_2.1_vae.safetensors"))
    assert vae_as_lora.returncode == 2 and "is a Wan VAE, not a LoRA" in vae_as_lora.stderr
    lonely = _cli(models, tmp_path / "x.mp4", "--lora-low-noise",
                  str(models / "loras/wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors"))
    assert lonely.returncode == 2 and "needs --dit-low-noise" in lonely.stderr


def test_lora_option_parses_strength_and_keeps_colons_in_paths():
    from wan_core.__main__ import _lora

    assert _lora("a.safetensors") == ("a.safetensors", 1.0)
    assert _lora("dir/a.safetensors:0.75") == ("dir/a.safetensors", 0.75)
    assert _lora("C:\\loras\\a.safetensors") == ("C:\\loras\\a.safetensors", 1.0)
    assert _lora("C:\\loras\\a.safetensors:-1") == ("C:\\loras\\a.safetensors", -1.0)
