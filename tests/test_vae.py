"""Wan-VAE 2.1 / 2.2: parity with the official code, tiling, loaders, errors, flat memory.

Tiny random VAEs (base width 8) in the official layout; every dimension is inferred by the
same loader a real Wan2.1_VAE.pth goes through.
"""
from __future__ import annotations

import pytest
import torch

from tests.reference import max_abs_err, official, report
from wan_core.loading.checkpoint import CheckpointError, identify
from wan_core import load_vae
from wan_core.loading.vae import diffusers_to_official
from wan_core.models.vae import blocks
from wan_core.models.vae.tiling import TilePlan, decode_tiled, plan_tiles

PARITY_BOUND = 1e-4
TINY = dict(dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
            temperal_downsample=[False, True, True])


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _official_vae(version: str):
    if version == "2.1":
        ref = official("modules.vae2_1").WanVAE_(z_dim=16, **TINY)
    else:
        ref = official("modules.vae2_2").WanVAE_(z_dim=48, dec_dim=12, **TINY)
    _randomise(ref, seed=1 if version == "2.1" else 2)
    return ref.eval()


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def pair(request):
    ref = _official_vae(request.param)
    return request.param, ref, load_vae(ref.state_dict())


def _video(vae, frames: int, h_lat: int = 2, w_lat: int = 3, seed: int = 0) -> torch.Tensor:
    s = vae.config.stride[1]
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, h_lat * s, w_lat * s, generator=g) * 2 - 1


# ------------------------------------------------------------------------------- parity

def test_config_inferred(pair):
    version, ref, vae = pair
    cfg = vae.config
    assert cfg.version == version
    assert cfg.dim == 8 and cfg.dim_mult == (1, 2, 4, 4) and cfg.num_res_blocks == 2
    assert cfg.temporal_downsample == (False, True, True)
    assert cfg.z_dim == (16 if version == "2.1" else 48)
    assert cfg.decoder_dim == (8 if version == "2.1" else 12)
    assert cfg.stride == ((4, 8, 8) if version == "2.1" else (4, 16, 16))


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_parity_with_official(pair, frames):
    version, ref, vae = pair
    scale = [vae.latent_mean, vae.latent_inv_std]
    video = _video(vae, frames)
    with torch.no_grad():
        z_ref = ref.encode(video, scale)
        x_ref = ref.decode(z_ref, scale).clamp(-1, 1)
    z = vae.encode(video)
    x = vae.decode(z_ref)
    assert z.shape == z_ref.shape == (1, vae.config.z_dim, 1 + (frames - 1) // 4, 2, 3)
    assert x.shape == x_ref.shape == video.shape
    # the comparison must not be decided by the clamp
    assert (x_ref.abs() < 0.999).float().mean() > 0.5
    enc_err, dec_err = max_abs_err(z, z_ref), max_abs_err(x, x_ref)
    report(f"vae {version} encode {frames} frames", enc_err, PARITY_BOUND)
    report(f"vae {version} decode {frames} frames", dec_err, PARITY_BOUND)
    assert enc_err < PARITY_BOUND and dec_err < PARITY_BOUND


def test_normalize_roundtrip_and_comfy_space(pair):
    _, _, vae = pair
    raw = torch.randn(1, vae.config.z_dim, 2, 2, 3)
    assert torch.allclose(vae.normalize(vae.denormalize(raw)), raw, atol=1e-5)
    # decoding raw latents directly equals decoding their normalised form
    assert torch.equal(vae.decode_raw_stream(vae.denormalize(vae.normalize(raw))),
                       vae.decode(vae.normalize(raw)))


# ------------------------------------------------------------------------------- tiling

def test_tile_larger_than_frame_is_untiled_exactly(pair):
    _, _, vae = pair
    z = torch.randn(1, vae.config.z_dim, 2, 4, 5)
    s = vae.config.stride[1]
    untiled = vae.decode(z, tile=False)
    assert torch.equal(vae.decode(z, tile=(64 * s, 64 * s)), untiled)
    # the tiling machinery itself, run with one tile covering the frame, changes nothing
    raw = vae.denormalize(z)
    assert torch.equal(decode_tiled(vae, raw, TilePlan([(0, 4)], [(0, 5)], 1)), untiled)


def test_tile_blending_is_a_partition_of_unity(pair, monkeypatch):
    """With a spatially local 'decoder' (nearest upsampling of a pointwise function), tiled
    decode equals untiled up to rounding: seams are placed and weighted correctly."""
    _, _, vae = pair
    s = vae.config.stride[1]

    def local_decode(raw, sink=None):
        frames = torch.tanh(raw[:, :3]).repeat_interleave(s, -1).repeat_interleave(s, -2)
        frames = torch.cat([frames[:, :, :1]] + [frames[:, :, i:i + 1].expand(-1, -1, 4, -1, -1)
                                                  for i in range(1, raw.shape[2])], dim=2)
        if sink is None:
            return frames.clone()
        sink(0, frames.clone())

    monkeypatch.setattr(vae, "decode_raw_stream", local_decode)
    raw = torch.randn(1, vae.config.z_dim, 3, 13, 17)
    plan = plan_tiles(vae, raw.shape, "decode", (6 * s, 8 * s), None)
    assert plan.count > 4
    err = max_abs_err(decode_tiled(vae, raw, plan), local_decode(raw))
    assert err < 1e-6


def test_real_tiles_shape_and_closeness(pair):
    version, _, vae = pair
    s = vae.config.stride[1]
    z = torch.randn(1, vae.config.z_dim, 2, 8, 8)
    untiled = vae.decode(z, tile=False)
    tiled = vae.decode(z, tile=(5 * s, 5 * s))
    assert tiled.shape == untiled.shape
    assert tiled.abs().max() <= 1.0
    diff = (tiled - untiled).abs()
    # Tiles see zero padding instead of their neighbours and attend only within themselves,
    # so they differ; the blend is a convex combination of tile outputs in [-1, 1].
    print(f"TILING vae {version} decode {8 * s}px square, {5 * s}px tiles (overlap {s}px): "
          f"max {diff.max():.3f} mean {diff.mean():.4f}")
    assert diff.mean() < 0.25
    # automatic tiling from an explicit memory budget
    plan = plan_tiles(vae, (1, vae.config.z_dim, 2, 20, 30), "decode", None, max_memory=1)
    assert plan is not None and plan.count > 1          # smallest automatic tiles
    assert plan_tiles(vae, (1, vae.config.z_dim, 2, 20, 30), "decode", None, 2**40) is None
    assert vae.decode(z, max_memory=1).shape == untiled.shape
    # encode tiling
    video = _video(vae, 5, 6, 6)
    enc_diff = (vae.encode(video, tile=(4 * s, 4 * s)) - vae.encode(video, tile=False)).abs()
    print(f"TILING vae {version} encode: max {enc_diff.max():.3f} mean {enc_diff.mean():.4f}")
    assert torch.isfinite(enc_diff).all()


# ------------------------------------------------------------------------------- loaders

def _outputs(vae, seed=0):
    z = torch.randn(1, vae.config.z_dim, 2, 2, 3, generator=torch.Generator().manual_seed(seed))
    return vae.decode(z), vae.encode(_video(vae, 5))


def test_layouts_give_identical_outputs(tmp_path):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from safetensors.torch import save_file

    ref = _official_vae("2.1")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    torch.save(sd, tmp_path / "Wan2.1_VAE.pth")
    save_file(sd, tmp_path / "wan_2.1_vae.safetensors")
    save_file({f"first_stage_model.{k}": v for k, v in sd.items()}, tmp_path / "prefixed.safetensors")
    diffusers_sd = convert_wan_vae_to_diffusers(dict(sd))
    assert "decoder.up_blocks.1.resnets.0.conv_shortcut.weight" in diffusers_sd
    save_file(diffusers_sd, tmp_path / "diffusion_pytorch_model.safetensors")
    expected = _outputs(load_vae(sd))
    for name in ("Wan2.1_VAE.pth", "wan_2.1_vae.safetensors", "prefixed.safetensors",
                 "diffusion_pytorch_model.safetensors"):
        got = _outputs(load_vae(tmp_path / name))
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), name


def test_diffusers_22_layout_converts_to_official():
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan(base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=[1, 2, 4, 4],
                             num_res_blocks=2, temperal_downsample=[False, True, True],
                             is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                             scale_factor_spatial=16)
    _randomise(model, seed=3)
    diffusers_sd = model.state_dict()
    converted = diffusers_to_official(diffusers_sd)
    ref = official("modules.vae2_2").WanVAE_(z_dim=48, dec_dim=12, **TINY)
    ref.load_state_dict(converted, strict=True)  # every key maps onto the official layout
    ours_from_diffusers, ours_from_official = load_vae(diffusers_sd), load_vae(ref.state_dict())
    assert ours_from_diffusers.config == ours_from_official.config
    a, b = _outputs(ours_from_diffusers), _outputs(ours_from_official)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    ref = _official_vae("2.1")
    vae32, vae16 = load_vae(ref.state_dict()), load_vae(ref.state_dict(), dtype=dtype)
    assert vae16.conv2.weight.dtype == dtype
    z = torch.randn(1, 16, 2, 2, 3)
    out = vae16.decode(z)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - vae32.decode(z)).abs().mean() < 0.05
    assert torch.isfinite(vae16.encode(_video(vae16, 5))).all()


def test_pickle_with_objects_is_refused(tmp_path):
    sd = _official_vae("2.1").state_dict()
    torch.save({"state_dict": sd, "note": _Unsafe()}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="other than tensors"):
        load_vae(tmp_path / "bad.pth")


class _Unsafe:
    pass


def test_wrong_file_kind_is_named():
    dit_like = {"patch_embedding.weight": torch.zeros(1), "head.head.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="diffusion model"):
        load_vae(dit_like)
    prefixed = {f"first_stage_model.{k}": v for k, v in _official_vae("2.1").state_dict().items()}
    assert identify(prefixed) == "vae"
    image_vae = {"encoder.conv_in.weight": torch.zeros(1), "decoder.conv_out.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="not a Wan 2.1/2.2 video VAE"):
        load_vae(image_vae)


# ------------------------------------------------------------------------------- input errors

def test_frame_count_and_size_errors(pair):
    _, _, vae = pair
    s = vae.config.stride[1]
    with pytest.raises(ValueError, match=r"got 4; use 1 or 5"):
        vae.encode(torch.zeros(1, 3, 4, s, s))
    with pytest.raises(ValueError, match=r"got 80; use 77 or 81"):
        vae.check_video(torch.zeros(1, 3, 80, s, s))
    with pytest.raises(ValueError, match=f"multiples of {s}"):
        vae.encode(torch.zeros(1, 3, 1, s + 4, s))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(3, 1, s, s))
    with pytest.raises(ValueError, match=f"{vae.config.z_dim}"):
        vae.decode(torch.zeros(1, 5, 2, 2, 2))


# ------------------------------------------------------------------------------- memory

def test_decode_cache_does_not_grow_with_length(pair, monkeypatch):
    """The only state carried between chunks is each causal layer's last frames: its size is
    the same after every chunk from the third on, however long the clip."""
    _, _, vae = pair
    sizes = []
    original = blocks.Stream.end_chunk

    def record(self):
        sizes.append((len(self.history), self.cached_bytes()))
        original(self)

    monkeypatch.setattr(blocks.Stream, "end_chunk", record)
    vae.decode(torch.randn(1, vae.config.z_dim, 7, 2, 2))
    assert len(sizes) == 7
    assert len(set(sizes[2:])) == 1, sizes


def test_automatic_tiles_fit_the_budget():
    """Full-size 2.1 decoder (meta tensors): the planner picks the largest square tile whose
    estimate, weights copy included, fits the budget."""
    from wan_core.models.vae.model import VAEConfig, WanVAE
    from wan_core.models.vae.tiling import pass_peak_bytes

    cfg = VAEConfig("2.1", 96, 96, 16, (1, 2, 4, 4), 2, (False, True, True))
    with torch.device("meta"):
        vae = WanVAE(cfg)
    for budget_mb in (768, 1024, 2048):
        budget = budget_mb * 2**20
        plan = plan_tiles(vae, (1, 16, 21, 60, 104), "decode", None, budget)
        side = plan.ys[0][1] - plan.ys[0][0]
        assert pass_peak_bytes(vae, "decode", side, side) <= budget
        assert pass_peak_bytes(vae, "decode", side + 1, side + 1) > budget


def test_training_path_gradients_match_finite_differences():
    """The grad-enabled branches of the VAE blocks (used to train the demo VAE) give the
    gradient of what they compute: directional derivatives of an encode + decode through
    the causal streams agree with central finite differences."""
    from training.train_vae import decode_raw, encode_posterior
    from wan_core.models.vae.model import VAEConfig, WanVAE

    cfg = VAEConfig("2.1", 8, 8, 4, (1, 2, 2, 2), 1, (False, True, True))
    torch.manual_seed(0)
    vae = WanVAE(cfg)
    video = torch.randn(1, 3, 5, 16, 16)                          # first chunk + one of 4

    def objective(probe=None):
        out = decode_raw(vae, encode_posterior(vae, video)[0])
        return out if probe is None else (out * probe).sum()

    probe = torch.randn_like(objective().detach())
    objective(probe).backward()
    names = ["encoder.conv1.weight", "encoder.downsamples.3.time_conv.weight",
             "decoder.upsamples.0.residual.0.gamma", "decoder.upsamples.2.time_conv.weight"]
    params = dict(vae.named_parameters())
    for name in names:
        p = params[name]
        direction = torch.randn_like(p)
        analytic = float((p.grad * direction).sum())
        eps = 1e-2 / direction.norm()
        with torch.no_grad():
            p += eps * direction
            plus = objective(probe)
            p -= 2 * eps * direction
            minus = objective(probe)
            p += eps * direction
        numeric = float(plus - minus) / float(2 * eps)
        assert abs(analytic - numeric) <= 2e-2 * max(1.0, abs(numeric)), (name, analytic, numeric)


def test_gpu_conv_autotuning_leaves_cpu_runs_alone_and_is_restored(pair, monkeypatch):
    """cuDNN benchmark mode (issue 29 item 4) is switched on around encode / decode on CUDA
    only and put back afterwards, also when the call fails; a CPU decode never sees it and is
    bit-identical with the switch off."""
    from wan_core.models.vae import model as vae_model

    _, _, ours = pair
    z = torch.randn(1, ours.config.z_dim, 2, 4, 6, generator=torch.Generator().manual_seed(3))
    before = torch.backends.cudnn.benchmark
    seen = set()
    hook = ours.decoder.register_forward_pre_hook(
        lambda module, args: seen.add(torch.backends.cudnn.benchmark))
    try:
        on = ours.decode(z, tile=False)
        monkeypatch.setattr(vae_model, "CUDNN_BENCHMARK", False)
        off = ours.decode(z, tile=False)
    finally:
        hook.remove()
    assert torch.equal(on, off) and seen == {before}
    assert torch.backends.cudnn.benchmark == before

    monkeypatch.setattr(vae_model, "CUDNN_BENCHMARK", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with pytest.raises(RuntimeError, match="decode failed"):
        with vae_model.cudnn_autotuning(torch.device("cuda", 0)):
            assert torch.backends.cudnn.benchmark is True
            raise RuntimeError("decode failed")
    assert torch.backends.cudnn.benchmark is False
    with vae_model.cudnn_autotuning("cpu"):
        assert torch.backends.cudnn.benchmark is False
