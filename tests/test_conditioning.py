"""Conditioning tensors equal what the official Wan code builds (wan/image2video.py,
wan/textimage2video.py, wan/utils/utils.py masks_like)."""
import pytest
import torch


from wan_core.conditioning import (VideoSizeError, check_video_size, i2v_mask, i2v_pixel_video,
                                   per_token_timesteps, prepare_image)


def official_i2v_mask(frames, lat_h, lat_w, last_known=False):
    """The construction in the official image2video.py (first frame known); FLF2V also
    marks the last pixel frame."""
    msk = torch.ones(1, frames, lat_h, lat_w)
    msk[:, 1:] = 0
    if last_known:
        msk[:, -1] = 1
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2)[0]


@pytest.mark.parametrize("frames", [1, 5, 17, 81])
def test_i2v_mask_equals_official(frames):
    assert torch.equal(i2v_mask(frames, 6, 10), official_i2v_mask(frames, 6, 10))
    if frames > 1:
        assert torch.equal(i2v_mask(frames, 6, 10, known=(0, frames - 1)),
                           official_i2v_mask(frames, 6, 10, last_known=True))


def test_ti2v_per_token_timesteps_equal_official_masks_like():
    f, h, w = 3, 8, 12
    noise = torch.randn(48, f, h, w)
    mask2 = torch.ones_like(noise)
    mask2[:, 0] = 0  # masks_like(zero=True) without a generator
    t = torch.tensor([937.0])
    official_ts = (mask2[0][:, ::2, ::2] * t).flatten()[None]
    assert torch.equal(per_token_timesteps(t, f, h, w, first_frame_known=True), official_ts)


def test_pixel_video_and_prepare_image():
    img = torch.rand(3, 32, 48) * 2 - 1
    assert torch.equal(prepare_image(img, 48, 32), img)
    out = prepare_image(img, 32, 32)  # cover then centre crop
    assert out.shape == (3, 32, 32)
    ref = torch.nn.functional.interpolate(img[None], size=(32, 48), mode="bicubic")[0]
    assert torch.equal(out, ref[:, :, 8:40])
    video = i2v_pixel_video(9, img, -img)
    assert video.shape == (1, 3, 9, 32, 48)
    assert torch.equal(video[0, :, 0], img) and torch.equal(video[0, :, -1], -img)
    assert video[0, :, 1:-1].abs().max() == 0


@pytest.mark.parametrize("w,h,f,fragment", [
    (832, 480, 80, "use 77 or 81"), (830, 480, 81, "width must be a multiple of 16"),
    (832, 470, 81, "use 464 or 480"), (832, 480, 0, "use 1 or 5"),
])
def test_size_errors_name_the_fix(w, h, f, fragment):
    with pytest.raises(VideoSizeError, match=fragment):
        check_video_size(w, h, f, spatial_stride=8)


def test_wan22_vae_needs_multiples_of_32():
    check_video_size(1280, 704, 121, spatial_stride=16)
    with pytest.raises(VideoSizeError, match="multiple of 32"):
        check_video_size(1280, 720, 121, spatial_stride=16)
