"""VACE control latent (wan_core.conditioning.vace_context): parity with diffusers'
WanVACEPipeline on a tiny random Wan 2.1 VAE, channel layout, bad input, chaining.

The diffusers side gets 8-bit PIL images (as its users pass them) at sizes its video processor
does not resize; our side gets the same 8-bit values as tensors in [-1, 1] (mask in [0, 1]).
Only ``preprocess_conditions``, ``prepare_video_latents`` and ``prepare_masks`` are run, which
need the VAE and the transformer's patch size only.

diffusers prepends each reference latent in front of the previous ones, so its frames come out in
reverse order of the list; the official VACE code (and ours) keeps the given order. The
two-reference comparisons therefore hand diffusers the list reversed.
"""
from __future__ import annotations

import logging
import types

import numpy as np
import pytest
import torch

from tests.reference import max_abs_err, report
from tests.tiny_models import diffusers_wan21_vae
from wan_core.conditioning import (VideoConditioning, VideoSizeError, build_vace_conditioning,
                                   fit_reference_image, vace_context)

diffusers = pytest.importorskip("diffusers")
Image = pytest.importorskip("PIL.Image")

BOUND = 1e-4
FRAMES, H, W = 9, 32, 32
LAT = (FRAMES - 1) // 4 + 1


@pytest.fixture(scope="module")
def vaes():
    """(diffusers AutoencoderKLWan, our WanVAE with the same weights, WanVACEPipeline)."""
    ref, ours = diffusers_wan21_vae(7)
    pipe = diffusers.WanVACEPipeline(tokenizer=None, text_encoder=None, vae=ref, scheduler=None,
                                     transformer=None)
    # only transformer.config.patch_size is read by the methods under test
    pipe.transformer = types.SimpleNamespace(config=types.SimpleNamespace(patch_size=(1, 2, 2)))
    return ref, ours, pipe


# ------------------------------------------------------------------------------- inputs

RNG_SEED = 3


def _inputs():
    """8-bit video [T, H, W, 3], mask [T, H, W] with values 0, 127, 128, 255 (binarisation at
    0.5 sits between 127 and 128), a wide reference (8x24, upscaled) and a tall one (40x16,
    downscaled)."""
    rng = np.random.default_rng(RNG_SEED)
    video = rng.integers(0, 256, (FRAMES, H, W, 3), dtype=np.uint8)
    mask = rng.choice(np.array([0, 127, 128, 255], dtype=np.uint8), (FRAMES, H, W))
    mask[:, 8:24, 4:20] = 255                                    # a solid edit region too
    wide = rng.integers(0, 256, (8, 24, 3), dtype=np.uint8)
    tall = rng.integers(0, 256, (40, 16, 3), dtype=np.uint8)
    return video, mask, [wide, tall]


def _video_tensor(u8):      # [T, H, W, 3] -> [1, 3, T, H, W] in [-1, 1]
    return (torch.from_numpy(u8).float() / 255 * 2 - 1).permute(3, 0, 1, 2)[None]


def _mask_tensor(u8):       # [T, H, W] -> [1, 1, T, H, W] in [0, 1]
    return (torch.from_numpy(u8).float() / 255)[None, None]


def _image_tensor(u8):      # [h, w, 3] -> [3, h, w] in [-1, 1]
    return (torch.from_numpy(u8).float() / 255 * 2 - 1).permute(2, 0, 1)


def _diffusers_context(pipe, video=None, mask=None, refs=None):
    """diffusers' control latent ``cat([video_latents, masks], 1)`` and its reference count."""
    video_pil = None if video is None else [Image.fromarray(f) for f in video]
    mask_pil = None if mask is None else [Image.fromarray(np.repeat(f[..., None], 3, -1))
                                          for f in mask]
    refs_pil = None if refs is None else [Image.fromarray(r) for r in refs]
    with torch.no_grad():
        v, m, r = pipe.preprocess_conditions(video_pil, mask_pil, refs_pil, batch_size=1,
                                             height=H, width=W, num_frames=FRAMES,
                                             dtype=torch.float32, device="cpu")
        latents = pipe.prepare_video_latents(v, m, r, None, "cpu")
        masks = pipe.prepare_masks(m, r, None)
    return torch.cat([latents, masks], dim=1), len(r[0])


CASES = {
    "video+mask": dict(video=True, mask=True, refs=()),
    "grey, no mask": dict(video=False, mask=False, refs=()),
    "video, no mask": dict(video=True, mask=False, refs=()),
    "mask, no video": dict(video=False, mask=True, refs=()),
    "one wide ref": dict(video=False, mask=False, refs=(0,)),
    "two refs": dict(video=False, mask=False, refs=(0, 1)),
    "ref+video+mask": dict(video=True, mask=True, refs=(1, 0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(vaes, case):
    _, vae, pipe = vaes
    spec = CASES[case]
    video, mask, refs = _inputs()
    video = video if spec["video"] else None
    mask = mask if spec["mask"] else None
    chosen = [refs[i] for i in spec["refs"]]
    expected, n_refs = _diffusers_context(pipe, video, mask, chosen[::-1] if chosen else None)
    c, trim = vace_context(vae, FRAMES, H, W,
                           video=None if video is None else _video_tensor(video),
                           mask=None if mask is None else _mask_tensor(mask),
                           reference_images=[_image_tensor(r) for r in chosen] or None)
    assert trim == n_refs == len(chosen)
    assert c.dtype == torch.float32 and c.device.type == "cpu"
    assert c.shape == expected.shape == (1, 96, trim + LAT, H // 8, W // 8)
    err = max_abs_err(c, expected)
    report(f"vace context {case} vs diffusers", err, BOUND)
    assert err <= BOUND
    # the comparison is not decided by near-zero tensors
    assert c[:, :32].abs().max() > 0.1


def test_reference_order_and_channel_layout(vaes):
    """Layout checked piece by piece against direct VAE encodes and the pixel mask:
    [ref latents in given order | inactive | reactive] + [zeros | folded raw mask]."""
    _, vae, _ = vaes
    video_u8, mask_u8, refs_u8 = _inputs()
    video, mask = _video_tensor(video_u8), _mask_tensor(mask_u8)
    refs = [_image_tensor(r) for r in refs_u8]
    c, trim = vace_context(vae, FRAMES, H, W, video, mask, refs)
    assert trim == 2
    keep = (mask > 0.5).float()
    for i, r in enumerate(refs):
        lat = vae.encode(fit_reference_image(r, W, H)[None, :, None])[0, :, 0]
        assert max_abs_err(c[0, :16, i], lat) < 1e-5, f"reference {i} not at latent frame {i}"
        assert not c[0, 16:, i].any()          # no reactive latent and zero mask for references
    assert max_abs_err(c[0, :16, trim:], vae.encode(video * (1 - keep))[0]) < 1e-5
    assert max_abs_err(c[0, 16:32, trim:], vae.encode(video * keep)[0]) < 1e-5
    # mask channel 32 + 8 * row_offset + col_offset; latent frame k takes pixel frame
    # floor((k + 0.5) * 9 / 3) = 1, 4, 7; values are the raw mask (0.498 / 0.502 survive)
    for k, src in enumerate((1, 4, 7)):
        for i in range(8):
            for j in range(8):
                assert torch.equal(c[0, 32 + 8 * i + j, trim + k], mask[0, 0, src, i::8, j::8])
    assert set(torch.unique(c[0, 32:]).tolist()) == set(torch.unique(mask).tolist())


def test_reference_fit_on_white_canvas():
    """A 16x32 (h x w) image into 32x32: scaled by 1 (fits), centred, white above and below."""
    img = torch.linspace(-1, 0.5, 3 * 16 * 32).reshape(3, 16, 32)
    out = fit_reference_image(img, 32, 32)
    assert out.shape == (3, 32, 32)
    assert torch.equal(out[:, 8:24], img)
    assert (out[:, :8] == 1).all() and (out[:, 24:] == 1).all()
    # a tall 40x16 image: scale 0.8 -> 32x12 (int of 12.8), columns 10..21
    tall = torch.rand(3, 40, 16) * 2 - 1
    out = fit_reference_image(tall, 32, 32)
    assert (out[:, :, :10] == 1).all() and (out[:, :, 22:] == 1).all()
    assert (out[:, :, 10:22] != 1).any()


def test_batch_is_per_sample(vaes):
    _, vae, _ = vaes
    video = torch.rand(2, 3, FRAMES, H, W) * 2 - 1
    mask = (torch.rand(2, 1, FRAMES, H, W) > 0.5).float()
    c, _ = vace_context(vae, FRAMES, H, W, video, mask)
    assert c.shape == (2, 96, LAT, H // 8, W // 8)
    for b in range(2):
        single, _ = vace_context(vae, FRAMES, H, W, video[b:b + 1], mask[b:b + 1])
        assert max_abs_err(c[b], single[0]) < 1e-6
    assert max_abs_err(c[0], c[1]) > 0.01


# ------------------------------------------------------------------------------- bad input

class NoEncodeVAE:
    """Stands in for the VAE where every check must happen before any encode."""

    def __init__(self, config):
        self.config = config

    def encode(self, video):
        raise AssertionError("the VAE was called before the input was checked")


@pytest.fixture
def spy(vaes):
    return NoEncodeVAE(vaes[1].config)


def _video(frames=FRAMES, h=H, w=W, b=1):
    return torch.rand(b, 3, frames, h, w) * 2 - 1


def _mask(frames=FRAMES, h=H, w=W, b=1):
    return (torch.rand(b, 1, frames, h, w) > 0.5).float()


def _vace_warnings(caplog):
    return [r for r in caplog.records if r.name == "wan_core" and r.levelno == logging.WARNING]


def test_mask_not_single_channel(spy):
    with pytest.raises(ValueError, match=r"single-channel.*\(1, 3, 9, 32, 32\)"):
        vace_context(spy, FRAMES, H, W, mask=_mask().expand(-1, 3, -1, -1, -1))


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_mask_out_of_range(spy, bad):
    mask = _mask()
    mask[0, 0, 3, 5, 5] = bad
    with pytest.raises(ValueError, match=r"mask values must be in 0\.\.1") as info:
        vace_context(spy, FRAMES, H, W, mask=mask)
    assert ("NaN" if bad != bad else str(bad)) in str(info.value)


def test_video_out_of_range_names_image_mapping(spy):
    with pytest.raises(ValueError, match=r"\[-1, 1\].*IMAGE.*0\.\.1"):
        vace_context(spy, FRAMES, H, W, video=torch.rand(1, 3, FRAMES, H, W) * 2)


def test_video_not_rgb(spy):
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\].*\(1, 9, 32, 32, 3\)"):
        vace_context(spy, FRAMES, H, W, video=torch.zeros(1, FRAMES, H, W, 3))


@pytest.mark.parametrize("what", ["video", "mask"])
def test_too_few_frames(spy, what):
    kwargs = {"video": _video(frames=5)} if what == "video" else {"mask": _mask(frames=5)}
    with pytest.raises(ValueError, match=r"has 5 frames but frames is 9"):
        vace_context(spy, FRAMES, H, W, **kwargs)


@pytest.mark.parametrize("what", ["video", "mask"])
def test_extra_frames_cut_with_one_warning(vaes, caplog, what):
    _, vae, _ = vaes
    video, mask = _video(frames=13), (torch.rand(1, 1, 13, H, W) * 0.98 + 0.01)
    kwargs = {"video": video} if what == "video" else {"mask": mask}
    with caplog.at_level(logging.WARNING, logger="wan_core"):
        c, _ = vace_context(vae, FRAMES, H, W, **kwargs)
    warnings = _vace_warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "13 frames" in message and "frames is 9" in message and "\n" not in message
    cut = {k: v[:, :, :FRAMES] for k, v in kwargs.items()}
    expected, _ = vace_context(vae, FRAMES, H, W, **cut)
    assert torch.equal(c, expected)
    # and the cut is the first frames, not the last
    last = {k: v[:, :, -FRAMES:] for k, v in kwargs.items()}
    assert max_abs_err(c, vace_context(vae, FRAMES, H, W, **last)[0]) > 1e-3


def test_other_size_resized_and_cropped_with_one_warning(vaes, caplog):
    """A 2x-upscaled (pixel-doubled) video and mask come back exactly (bilinear at 1/2 averages
    equal pixel pairs, nearest-exact picks one of them); a wider 48x32 video is cropped to its
    centre 32 columns."""
    _, vae, _ = vaes
    video, mask = _video(), _mask()
    expected, _ = vace_context(vae, FRAMES, H, W, video, mask)
    double = lambda x: x.repeat_interleave(2, -1).repeat_interleave(2, -2)   # noqa: E731
    with caplog.at_level(logging.WARNING, logger="wan_core"):
        c, _ = vace_context(vae, FRAMES, H, W, double(video), double(mask))
    messages = [r.getMessage() for r in _vace_warnings(caplog)]
    assert len(messages) == 2, messages                      # one for the video, one for the mask
    assert all("64x64" in m and "32x32" in m for m in messages)
    assert max_abs_err(c, expected) < 1e-5

    caplog.clear()
    wide = torch.rand(1, 3, FRAMES, H, 48) * 2 - 1
    wide[..., 8:40] = video
    with caplog.at_level(logging.WARNING, logger="wan_core"):
        c, _ = vace_context(vae, FRAMES, H, W, wide, mask)
    messages = [r.getMessage() for r in _vace_warnings(caplog)]
    assert len(messages) == 1 and "48x32" in messages[0] and "32x32" in messages[0]
    assert max_abs_err(c, expected) < 1e-5


@pytest.mark.parametrize("size", [(8, 32, 32), (9, 40, 32), (9, 32, 24)])
def test_invalid_frames_or_size(spy, size):
    frames, height, width = size
    with pytest.raises(VideoSizeError):
        vace_context(spy, frames, height, width)


def test_too_many_reference_images(spy):
    refs = [torch.zeros(3, 16, 16)] * 4
    with pytest.raises(ValueError, match=r"4 VACE reference images.*at most 3"):
        vace_context(spy, FRAMES, H, W, reference_images=refs)


@pytest.mark.parametrize("shape", [(4, 16, 16), (16, 16), (1, 3, 16, 16)])
def test_reference_image_shape(spy, shape):
    with pytest.raises(ValueError, match=r"reference image 0 must be \[3, h, w\]"):
        vace_context(spy, FRAMES, H, W, reference_images=[torch.zeros(shape)])


def test_reference_image_range(spy):
    with pytest.raises(ValueError, match=r"reference image 1.*\[-1, 1\]"):
        vace_context(spy, FRAMES, H, W,
                     reference_images=[torch.zeros(3, 8, 8), torch.full((3, 8, 8), 3.0)])


def test_wan22_vae_rejected():
    cfg = types.SimpleNamespace(stride=(4, 16, 16), z_dim=48)
    with pytest.raises(ValueError, match=r"Wan 2\.1 VAE.*48 channels"):
        vace_context(NoEncodeVAE(cfg), FRAMES, H, W)


def test_batch_mismatch(spy):
    with pytest.raises(ValueError, match=r"batch"):
        vace_context(spy, FRAMES, H, W, _video(b=2), _mask(b=3))


# ------------------------------------------------------------------------------- conditioning

def test_build_and_chain(vaes):
    _, vae, _ = vaes
    refs = [torch.rand(3, 16, 24) * 2 - 1]
    first = build_vace_conditioning(vae, W, H, FRAMES, video=_video(), reference_images=refs)
    assert isinstance(first, VideoConditioning) and first.trim == 1
    assert len(first.vace) == 1 and first.vace[0][1] == 1.0
    assert first.vace[0][0].shape == (1, 96, 1 + LAT, H // 8, W // 8)
    second = build_vace_conditioning(vae, W, H, FRAMES, mask=_mask(), reference_images=refs,
                                     strength=[0.5, 0.25], previous=first)
    assert len(second.vace) == 2 and second.trim == 1
    assert second.vace[0][0] is first.vace[0][0] and second.vace[1][1] == (0.5, 0.25)
    assert len(first.vace) == 1                               # previous left untouched
    assert max_abs_err(second.vace[0][0], second.vace[1][0]) > 1e-3


def test_chain_mismatches(vaes, spy):
    _, vae, _ = vaes
    first = build_vace_conditioning(vae, W, H, FRAMES, reference_images=[torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError, match=r"0 reference images.*previous conditioning has 1"):
        build_vace_conditioning(spy, W, H, FRAMES, previous=first)
    with pytest.raises(ValueError, match=r"48x32, 9 frames.*32x32, 9 frames"):
        build_vace_conditioning(spy, 48, H, FRAMES, reference_images=[torch.zeros(3, 8, 8)],
                                previous=first)
    with pytest.raises(ValueError, match=r"32x32, 5 frames.*32x32, 9 frames"):
        build_vace_conditioning(spy, W, H, 5, reference_images=[torch.zeros(3, 8, 8)],
                                previous=first)


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), [1.0, float("nan")], [],
                                      "strong"])
def test_strength_validated(spy, strength):
    with pytest.raises(ValueError, match=r"strength"):
        build_vace_conditioning(spy, W, H, FRAMES, strength=strength)
