"""Video files: every format writes a playable file that decodes back to the same frames."""
import numpy as np
import pytest
import torch

from wan_core.video_io import frames_to_video, read_video, video_to_frames, write_video


@pytest.mark.parametrize("fmt", ["mp4", "webm", "webp"])
def test_write_and_read_back(tmp_path, fmt):
    t = torch.linspace(0, 1, 9)[:, None, None, None]
    frames = (t * torch.ones(9, 32, 48, 3)).clone()
    frames[..., 0] = 1 - frames[..., 0]
    path = write_video(tmp_path / f"clip.{fmt}", frames, fps=16)
    data, fps = read_video(path)
    assert data.shape == (9, 32, 48, 3)
    assert abs(fps - 16) < 0.5
    err = np.abs(data.astype(float) / 255 - frames.numpy()).mean()
    assert err < 0.03, err


def test_odd_sizes_are_padded_for_mp4(tmp_path):
    path = write_video(tmp_path / "odd.mp4", torch.rand(5, 31, 33, 3), fps=8)
    data, _ = read_video(path)
    assert data.shape == (5, 32, 34, 3)


def test_video_frame_layout_round_trip():
    video = torch.rand(3, 5, 8, 8) * 2 - 1
    assert torch.allclose(frames_to_video(video_to_frames(video)), video, atol=1e-6)


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="mp4, webm, webp"):
        write_video(tmp_path / "a.gif", torch.rand(2, 8, 8, 3))
