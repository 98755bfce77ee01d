"""wan_core.sampling against the official Wan schedulers and diffusers' WanPipeline.

Run with ``-s`` to see the PARITY figures.
"""
import functools

import numpy as np
import pytest
import torch

from tests.reference import max_abs_err, official, report
from wan_core.sampling import (OFFICIAL_SIGMA_MAX, OffloadIdleExpert, SamplingCancelled,
                               Schedule, flow_schedule, flow_sigmas, make_velocity_fn,
                               noise_latent, sample, schedule_from_sigmas, shift_sigmas,
                               solver_schedule, timesteps_for)

SOLVER_BOUND = 1e-5
PIPELINE_BOUND = 1e-4


# --- helpers -------------------------------------------------------------------------------

def official_scheduler(solver: str, steps: int, shift: float):
    """The scheduler set up exactly as Wan2.2's text2video.py does for ``solver``."""
    if solver == "unipc":
        mod = official("utils.fm_solvers_unipc")
        sched = mod.FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1,
                                                use_dynamic_shifting=False)
        sched.set_timesteps(steps, device="cpu", shift=shift)
    else:
        mod = official("utils.fm_solvers")
        sched = mod.FlowDPMSolverMultistepScheduler(num_train_timesteps=1000, shift=1,
                                                    use_dynamic_shifting=False)
        mod.retrieve_timesteps(sched, device="cpu",
                               sigmas=mod.get_sampling_sigmas(steps, shift))
    return sched


def official_trajectory(sched, velocity_fn, x, begin=0):
    """The official loop: model at the integer timestep, then ``scheduler.step``."""
    if begin:
        sched.set_begin_index(begin)
    states = []
    for t in sched.timesteps[begin:]:
        v = velocity_fn(x, torch.stack([t]))
        x = sched.step(v, t, x, return_dict=False)[0]
        states.append(x)
    return states


def our_trajectory(velocity_fn, x, schedule, solver):
    states = []
    sample(velocity_fn, x, schedule, solver, callback=lambda i, n, xi, x0: states.append(xi))
    return states


def trajectory_err(ours, ref):
    assert len(ours) == len(ref)
    return max(max_abs_err(a, b) for a, b in zip(ours, ref))


def nonlinear_velocity(x, t):
    """A cheap deterministic velocity field that depends nonlinearly on x and t."""
    s = t.double().reshape(-1, 1, 1, 1, 1) / 1000
    return (0.7 * x + torch.sin(2.0 * x + 3.0 * s) * (1 + s)).to(x.dtype)


@pytest.fixture(scope="module")
def tiny_wan():
    """A tiny official WanModel (random weights, head re-initialised: the official init zeros
    it) wrapped as a velocity_fn on [1, 4, 3, 8, 8] latents."""
    mod = official("modules.model")
    gen = torch.Generator().manual_seed(1)
    model = mod.WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=4, dim=64,
                         ffn_dim=96, freq_dim=32, text_dim=24, out_dim=4, num_heads=2,
                         num_layers=2).eval()
    with torch.no_grad():
        model.head.head.weight.normal_(0.0, 0.1, generator=gen)
    context = [torch.randn(7, 24, generator=gen)]

    @torch.no_grad()
    def velocity_fn(x, t):
        return model([x[0]], t=t, context=context, seq_len=3 * 4 * 4)[0][None]

    return velocity_fn


# --- schedules -----------------------------------------------------------------------------

STEP_COUNTS = list(range(1, 61)) + [80, 100]
SHIFTS = [1.0, 2.0, 3.0, 5.0, 7.0, 8.0, 10.0, 12.0, 16.0, 3.5, 0.5]


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_grids_equal_official_exactly(solver):
    worst, mismatches = 0.0, []
    for steps in STEP_COUNTS:
        for shift in SHIFTS:
            sched = official_scheduler(solver, steps, shift)
            ours = solver_schedule(solver, steps, shift)
            assert ours.sigmas.dtype == sched.sigmas.dtype == torch.float32
            assert ours.timesteps.dtype == sched.timesteps.dtype == torch.int64
            err = max(max_abs_err(ours.sigmas, sched.sigmas),
                      max_abs_err(ours.timesteps, sched.timesteps))
            worst = max(worst, err)
            if err:
                mismatches.append((steps, shift))
    report(f"{solver} sigma/timestep grid, {len(STEP_COUNTS) * len(SHIFTS)} (steps, shift) pairs",
           worst, 0)
    assert not mismatches, mismatches


def test_flow_sigmas_is_the_unipc_grid():
    sched = official_scheduler("unipc", 50, 5.0)
    sigmas = flow_sigmas(50, 5.0)
    assert sigmas.dtype == torch.float32 and len(sigmas) == 51 and sigmas[-1] == 0
    assert torch.equal(sigmas, sched.sigmas)
    assert OFFICIAL_SIGMA_MAX == 0.9990000128746033
    assert torch.equal(flow_schedule(50, 5.0).timesteps, sched.timesteps)


def test_timesteps_come_from_float64_sigmas():
    """float32(0.7) * 1000 truncates to 699; the official timestep is 700."""
    schedule = flow_schedule(10, 1.0, sigma_max=1.0)
    assert schedule.timesteps[3] == 700 and int(schedule.sigmas[3].double() * 1000) == 699


def test_user_sigmas_match_official_custom_sigmas():
    custom = [0.95, 0.8, 0.55, 0.3, 0.1]
    sched = official_scheduler("unipc", 4, 1.0)
    sched.set_timesteps(sigmas=np.array(custom), shift=1.0)
    ours = schedule_from_sigmas(custom + [0.0])
    assert torch.equal(ours.sigmas, sched.sigmas) and torch.equal(ours.timesteps, sched.timesteps)
    assert torch.equal(timesteps_for(custom), sched.timesteps)
    shifted = schedule_from_sigmas(list(shift_sigmas(custom, 3.0)) + [0.0])
    sched.set_timesteps(sigmas=np.array(custom), shift=3.0)
    assert torch.equal(shifted.sigmas, sched.sigmas)
    assert torch.equal(shifted.timesteps, sched.timesteps)


def test_schedule_validation():
    with pytest.raises(ValueError, match="strictly decreasing"):
        schedule_from_sigmas([0.5, 0.7, 0.0])
    with pytest.raises(ValueError, match="positive integer"):
        flow_schedule(0, 5.0)
    with pytest.raises(ValueError, match="unknown solver"):
        sample(nonlinear_velocity, torch.zeros(1, 1, 1, 1, 1), flow_schedule(2), "heun")
    tail = flow_schedule(10, 5.0).from_step(4)
    assert len(tail) == 6 and len(tail.sigmas) == 7


# --- solvers against the official schedulers -------------------------------------------------

@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_solvers_match_official_on_nonlinear_field(solver):
    worst = 0.0
    for steps, shift in [(1, 5.0), (2, 5.0), (3, 3.0), (4, 1.0), (7, 8.0), (13, 12.0),
                         (25, 5.0), (50, 5.0)]:
        noise = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(steps))
        ref = official_trajectory(official_scheduler(solver, steps, shift), nonlinear_velocity,
                                  noise)
        ours = our_trajectory(nonlinear_velocity, noise, solver_schedule(solver, steps, shift),
                              solver)
        worst = max(worst, trajectory_err(ours, ref))
    report(f"{solver} step-by-step, nonlinear field, 8 (steps, shift) pairs", worst, SOLVER_BOUND)
    assert worst < SOLVER_BOUND


@pytest.mark.parametrize("solver,steps,shift", [("unipc", 12, 5.0), ("unipc", 20, 12.0),
                                                ("dpm++", 12, 5.0), ("dpm++", 20, 12.0)])
def test_solvers_match_official_on_tiny_wan(tiny_wan, solver, steps, shift):
    noise = torch.randn(1, 4, 3, 8, 8)
    ref = official_trajectory(official_scheduler(solver, steps, shift), tiny_wan, noise)
    ours = our_trajectory(tiny_wan, noise, solver_schedule(solver, steps, shift), solver)
    err = trajectory_err(ours, ref)
    report(f"{solver} {steps} steps shift {shift}, tiny official WanModel, every step", err,
           SOLVER_BOUND)
    assert err < SOLVER_BOUND
    final = max_abs_err(ours[-1], ref[-1])
    report(f"{solver} {steps} steps shift {shift}, tiny official WanModel, final latent", final,
           SOLVER_BOUND)


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_partial_schedule_matches_official_begin_index(tiny_wan, solver):
    """vid2vid: start at step 4 of 12 from a noised latent (official: set_begin_index and
    add_noise on the full grid)."""
    steps, shift, begin = 12, 5.0, 4
    latent, noise = torch.randn(2, 1, 4, 3, 8, 8)
    sched = official_scheduler(solver, steps, shift)
    sched.set_begin_index(begin)
    start_ref = sched.add_noise(latent, noise, sched.timesteps[begin:begin + 1])
    schedule = solver_schedule(solver, steps, shift).from_step(begin)
    start = noise_latent(latent, noise, schedule.sigmas[0])
    assert max_abs_err(start, start_ref) < 1e-6
    ref = official_trajectory(sched, tiny_wan, start, begin=begin)
    ours = our_trajectory(tiny_wan, start, schedule, solver)
    err = trajectory_err(ours, ref)
    report(f"{solver} from step {begin} of {steps} (vid2vid), tiny official WanModel", err,
           SOLVER_BOUND)
    assert err < SOLVER_BOUND


def test_euler_matches_diffusers_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = flow_schedule(9, 5.0)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(sigmas=schedule.sigmas[:-1].tolist())
    assert torch.equal(sched.sigmas, schedule.sigmas)
    noise = torch.randn(1, 4, 2, 4, 4)
    x, ref = noise, []
    for i, t in enumerate(sched.timesteps):  # evaluate at our integer timesteps on both sides
        v = nonlinear_velocity(x, schedule.timesteps[i:i + 1])
        x = sched.step(v, t, x, return_dict=False)[0]
        ref.append(x)
    err = trajectory_err(our_trajectory(nonlinear_velocity, noise, schedule, "euler"), ref)
    report("euler step-by-step vs diffusers FlowMatchEulerDiscreteScheduler", err, SOLVER_BOUND)
    assert err < SOLVER_BOUND


# --- loop behaviour ------------------------------------------------------------------------

def test_callback_called_once_per_step_with_progress():
    calls = []
    out = sample(nonlinear_velocity, torch.randn(1, 2, 1, 2, 2), flow_schedule(6, 3.0), "unipc",
                 callback=lambda i, n, x, x0: calls.append((i, n, x.shape, x0.shape)))
    assert [c[:2] for c in calls] == [(i, 6) for i in range(1, 7)]
    assert all(c[2] == c[3] == out.shape for c in calls)


def test_cancel_raises_between_steps():
    evaluations, checks = [], []

    def velocity(x, t):
        evaluations.append(int(t[0]))
        return nonlinear_velocity(x, t)

    def cancel():
        checks.append(1)
        return len(checks) > 3

    with pytest.raises(SamplingCancelled, match="before step 4 of 10"):
        sample(velocity, torch.randn(1, 2, 1, 2, 2), flow_schedule(10, 5.0), "dpm++",
               cancel=cancel)
    assert len(evaluations) == 3


def test_callback_exception_propagates():
    class Interrupted(Exception):
        pass

    def stop_after_two(i, n, x, x0):
        if i == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        sample(nonlinear_velocity, torch.randn(1, 2, 1, 2, 2), flow_schedule(5, 5.0), "euler",
               callback=stop_after_two)


def test_after_step_reimposes_known_frames():
    known = torch.randn(1, 2, 1, 2, 2)
    seen = []

    def velocity(x, t):
        seen.append(x[:, :, :1].clone())
        return nonlinear_velocity(x, t)

    def keep_first_frame(x):
        return torch.cat([known, x[:, :, 1:]], dim=2)

    start = keep_first_frame(torch.randn(1, 2, 3, 2, 2))
    out = sample(velocity, start, flow_schedule(5, 5.0), "unipc", after_step=keep_first_frame)
    assert torch.equal(out[:, :, :1], known) and all(torch.equal(s, known) for s in seen)


# --- CFG and MoE ---------------------------------------------------------------------------

def recording_model(name, log):
    def model(x, t, context, clip_fea=None, y=None):
        log.append((name, x.shape[0]))
        scale = 1.0 + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1)
        return torch.tanh(x) * scale + t.reshape(-1, 1, 1, 1, 1) / 1000
    return model


def test_moe_switches_at_boundary_and_offloads_idle_expert():
    log, moves = [], []
    high, low = recording_model("high", log), recording_model("low", log)
    cond, uncond = {"context": torch.ones(1, 3, 4)}, {"context": torch.zeros(1, 3, 4)}
    schedule = flow_schedule(10, 5.0)
    velocity = make_velocity_fn((high, low), cond, uncond, guide_scale=(4.0, 1.0),
                                boundary=0.875, offload=lambda a, i: moves.append((a, i)))
    sample(velocity, torch.randn(1, 2, 1, 2, 2), schedule, "unipc")
    n_high = int((schedule.timesteps >= 875).sum())
    assert 0 < n_high < 10
    # high noise: one batched cond+uncond forward; low noise with scale 1: cond only
    assert log == [("high", 2)] * n_high + [("low", 1)] * (10 - n_high)
    assert moves == [(high, low), (low, high)]


def test_guidance_batched_equals_two_forwards():
    log = []
    model = recording_model("m", log)
    cond = {"context": torch.randn(1, 5, 4)}
    uncond = {"context": torch.randn(1, 3, 4)}  # different length: zero-padded when batched
    x, t = torch.randn(1, 2, 1, 2, 2), torch.full((1,), 800.0)
    batched = make_velocity_fn(model, cond, uncond, 5.0, batch_cfg=True)(x, t)
    padded = {"context": torch.nn.functional.pad(uncond["context"], (0, 0, 0, 2))}
    split = make_velocity_fn(model, cond, padded, 5.0, batch_cfg=False)(x, t)
    manual = model(x, t, **padded) + 5.0 * (model(x, t, **cond) - model(x, t, **padded))
    assert log[0] == ("m", 2) and log[1:3] == [("m", 1), ("m", 1)]
    assert max_abs_err(batched, split) < 1e-6 and max_abs_err(split, manual) == 0


def test_offload_idle_expert_moves_idle_first():
    events = []

    class Expert:
        def __init__(self, name):
            self.name = name

        def to(self, device):
            events.append((self.name, str(device)))
            return self

    OffloadIdleExpert("cpu", idle_device="meta")(Expert("low"), Expert("high"))
    assert events == [("high", "meta"), ("low", "cpu")]


def test_guidance_argument_checks():
    model = recording_model("m", [])
    with pytest.raises(ValueError, match="boundary"):
        make_velocity_fn((model, model), {"context": torch.zeros(1, 1, 4)})
    with pytest.raises(ValueError, match="one per model"):
        make_velocity_fn(model, {"context": torch.zeros(1, 1, 4)}, guide_scale=(1.0, 2.0))


def test_batched_cfg_with_official_list_inputs_and_per_token_t():
    """Official Wan 2.2 I2V-style CFG (y shared by both halves, only the text differs) on a
    tiny official i2v WanModel taking lists, with per-token timesteps (first latent frame at
    t = 0, as TI2V does): one batched forward equals the official two-forward formula."""
    mod = official("modules.model")
    net = mod.WanModel(model_type="i2v", patch_size=(1, 2, 2), text_len=16, in_dim=8, dim=64,
                       ffn_dim=96, freq_dim=32, text_dim=24, out_dim=4, num_heads=2,
                       num_layers=2).eval()
    with torch.no_grad():
        net.head.head.weight.normal_(0.0, 0.1)
    seq_len = 3 * 4 * 4

    def model(x, t, context, y=None, seq_len=None):
        return torch.stack(net(list(x.unbind(0)), t=t, context=context, seq_len=seq_len, y=y))

    def per_token(t):  # [B] -> [B, L], first latent frame (16 tokens) at t = 0
        return torch.cat([torch.zeros(t.shape[0], 16), t[:, None].expand(-1, seq_len - 16)], 1)

    x, y = torch.randn(1, 4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    cond = {"context": [torch.randn(7, 24)], "y": [y], "seq_len": seq_len}
    uncond = {"context": [torch.randn(5, 24)]}
    t = torch.full((1,), 937.0)
    with torch.no_grad():
        ours = make_velocity_fn(model, cond, uncond, 3.5, timestep_fn=per_token)(x, t)
        v_cond = net([x[0]], t=per_token(t), context=cond["context"], seq_len=seq_len, y=[y])[0]
        v_uncond = net([x[0]], t=per_token(t), context=uncond["context"], seq_len=seq_len,
                       y=[y])[0]
    err = max_abs_err(ours[0], v_uncond + 3.5 * (v_cond - v_uncond))
    report("batched CFG vs official two forwards (i2v lists, per-token t)", err, SOLVER_BOUND)
    assert err < SOLVER_BOUND


def diffusers_expert(seed):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
        out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32).eval()


class DiffusersAsModel(torch.nn.Module):
    """A diffusers WanTransformer3DModel behind the wan_core model signature (a Module, so
    the offload hook can move it)."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, t, context, clip_fea=None, y=None):
        if y is not None:
            x = torch.cat([x, y], dim=1)
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=context,
                                encoder_hidden_states_image=clip_fea, return_dict=False)[0]


@pytest.fixture(scope="module")
def experts():
    return diffusers_expert(1), diffusers_expert(2)


@pytest.mark.parametrize("grid,scales,batch_cfg", [
    ("official", (4.0, 3.0), True),
    ("diffusers", (4.0, 3.0), False),
    ("official", (3.5, 1.0), True),
])
def test_cfg_moe_matches_diffusers_wan_pipeline(experts, grid, scales, batch_cfg):
    """Wan 2.2 MoE + CFG against diffusers' WanPipeline (transformer = high-noise expert,
    transformer_2 = low-noise, boundary_ratio, guidance_scale / guidance_scale_2).

    The pipeline uses diffusers' UniPCMultistepScheduler configured as the Wan 2.2 diffusers
    repos ship it (flow_prediction, use_flow_sigmas, flow_shift). Its own grid starts at
    sigma 1 - 1e-6 and differs from the official one by a few timesteps, so both sides are
    given the same grid: either the official one (diffusers' set_timesteps receives the
    unshifted official sigmas and applies flow_shift itself; we check it lands exactly on our
    schedule) or diffusers' own one (our sampler receives its sigmas and integer timesteps).
    The expert switch happens at the same step on both sides because both compare those
    integer timesteps with boundary_ratio * 1000. With a guidance scale of 1, diffusers still
    blends in the unconditional forward, we skip it (difference ~1e-7).
    """
    from diffusers import UniPCMultistepScheduler, WanPipeline

    high, low = experts
    steps, shift, boundary = 10, 5.0, 0.875
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                    num_train_timesteps=1000, flow_shift=shift)
    if grid == "official":
        unshifted = np.linspace(OFFICIAL_SIGMA_MAX, 0, steps + 1)[:-1]
        sched.set_timesteps = functools.partial(sched.set_timesteps, sigmas=unshifted)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=sched,
                       transformer=high, transformer_2=low, boundary_ratio=boundary)
    gen = torch.Generator().manual_seed(3)
    prompt, negative = torch.randn(2, 1, 12, 24, generator=gen)
    noise = torch.randn(1, 4, 2, 4, 4, generator=gen)  # 5 frames of 32x32 pixels
    with torch.no_grad():
        ref = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=32, width=32,
                   num_frames=5, num_inference_steps=steps, guidance_scale=scales[0],
                   guidance_scale_2=scales[1], latents=noise.clone(), output_type="latent",
                   return_dict=False)[0]

    if grid == "official":
        schedule = flow_schedule(steps, shift)
        assert torch.equal(sched.sigmas, schedule.sigmas)
        assert torch.equal(sched.timesteps, schedule.timesteps)
    else:
        schedule = Schedule(sched.sigmas.clone(), sched.timesteps.clone())
    assert 0 < int((schedule.timesteps >= boundary * 1000).sum()) < steps  # both experts run
    velocity = make_velocity_fn((DiffusersAsModel(high), DiffusersAsModel(low)),
                                {"context": prompt}, {"context": negative}, guide_scale=scales,
                                boundary=boundary, batch_cfg=batch_cfg,
                                offload=OffloadIdleExpert("cpu"))
    with torch.no_grad():
        ours = sample(velocity, noise, schedule, "unipc")
    err = max_abs_err(ours, ref)
    report(f"CFG+MoE vs diffusers WanPipeline ({grid} grid, scales {scales}, "
           f"batch_cfg={batch_cfg})", err, PIPELINE_BOUND)
    assert err < PIPELINE_BOUND
