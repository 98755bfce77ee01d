"""The demo's procedural dataset, the frame analysis used as its quality check, the tokenizer."""
from __future__ import annotations

import math
from itertools import combinations, islice

import numpy as np
import pytest
import torch

from training import dataset
from training.analysis import analyse, check_prompt, psnr, video_to_frames
from training.dataset import Combo, iter_combos, iter_specs, parse_caption, sample_clip

ATTRS = ("colour", "direction", "background", "shape")


def _eval_specs():
    """48 clips: every held-out combination plus 16 training ones."""
    train = list(islice(iter_specs("train", seed=1), 0, None, 15))[:16]
    return list(iter_specs("heldout", seed=1)) + train


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] Gaussian blur along one axis with replicated edges, as a matrix."""
    r = math.ceil(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    m = np.zeros((n, n), np.float32)
    for i in range(n):
        np.add.at(m[i], np.clip(np.arange(i - r, i + r + 1), 0, n - 1), k / k.sum())
    return m


def _degrade(frames: np.ndarray, sigma: float, noise: float, wash: float, seed: int) -> np.ndarray:
    """Gaussian blur (sigma px), washed-out colours (mix toward grey), Gaussian noise -> uint8."""
    _, h, w, _ = frames.shape
    planes = frames.transpose(0, 3, 1, 2)                                   # [T, 3, H, W]
    x = (_blur_matrix(h, sigma) @ planes @ _blur_matrix(w, sigma).T).transpose(0, 2, 3, 1)
    x = x * (1 - wash) + 0.5 * wash + np.random.default_rng(seed).normal(0, noise, x.shape)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def _accuracy(specs, transform) -> dict:
    hits = dict.fromkeys(ATTRS + ("prompt",), 0)
    for i, spec in enumerate(specs):
        ok = check_prompt(transform(dataset.render(spec), i), spec)
        for k in hits:
            hits[k] += ok[k]
    return {k: v / len(specs) for k, v in hits.items()}


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------

def test_clips_are_deterministic_and_well_formed():
    video, caption, spec = sample_clip(5)
    again, caption2, spec2 = sample_clip(5)
    assert torch.equal(video, again) and caption == caption2 and spec == spec2
    assert torch.equal(sample_clip(spec)[0], video)
    assert not torch.equal(sample_clip(6)[0], video)
    assert video.shape == (3, 17, 64, 64) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert caption == spec.caption == parse_caption(caption).caption
    assert sample_clip(5, frames=9, size=32)[0].shape == (3, 9, 32, 32)


def test_object_moves_visibly_and_stays_in_frame():
    for spec in islice(iter_specs("all"), 0, None, 7):
        frames = dataset.render(spec)
        bg = np.asarray(dataset.BACKGROUNDS[spec.background], np.float32) / 255
        edge = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], 1)
        assert np.abs(edge - bg).max() < 1e-6, spec          # nothing touches the border
        found = analyse(frames)
        assert max(map(abs, found.displacement)) > 20, (spec, found.displacement)  # px in 17 frames


def test_captions_parse_back():
    for combo in iter_combos("all"):
        assert parse_caption(combo.caption) == combo
    assert parse_caption("A Red Circle moving LEFT on a Blue background.") == \
        Combo("circle", "red", "left", "blue")
    for bad in ("a red circle moving left", "a pink circle moving left on a blue background",
                "a blue circle moving left on a blue background"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_heldout_split_is_disjoint_covered_and_fixed():
    train, heldout = set(iter_combos("train")), set(iter_combos("heldout"))
    assert len(heldout) >= 24 and not train & heldout
    assert train | heldout == set(iter_combos("all"))
    assert all(c.colour != c.background for c in train | heldout)
    # Composition, not new words: every attribute pair of a held-out combo occurs in training.
    def pairs(c):
        return set(combinations(zip(ATTRS, (c.colour, c.direction, c.background, c.shape)), 2))
    seen = set().union(*map(pairs, train))
    assert all(pairs(c) <= seen for c in heldout)
    assert all(dataset.random_spec(s).combo in train for s in range(300))
    assert {dataset.random_spec(s, "heldout").combo for s in range(300)} <= heldout


# --------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------

def test_analysis_reads_clean_clips_exactly():
    specs = _eval_specs()
    assert len(specs) == 48
    acc = _accuracy(specs, lambda frames, i: frames)
    print(f"\nDEMO analysis accuracy, 48 clean clips: {acc}")
    assert all(v == 1.0 for v in acc.values()), acc


def test_analysis_accepts_uint8_float_and_dataset_videos():
    video, _, spec = sample_clip(11)
    frames = video_to_frames(video)
    as_uint8 = (frames * 255).round().astype(np.uint8)
    for f in (frames, as_uint8, torch.from_numpy(frames), torch.from_numpy(as_uint8)):
        assert all(check_prompt(f, spec).values())
    assert all(check_prompt(frames, spec.caption).values())
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        analyse(video)


@pytest.mark.parametrize("sigma, noise, wash, min_prompt, min_shape", [
    (1.5, 0.08, 0.0, 1.0, 1.0),
    (2.0, 0.10, 0.2, 1.0, 1.0),
    (3.0, 0.12, 0.3, 1.0, 0.0),   # a blob: shape is no longer readable, the prompt still is
])
def test_analysis_survives_blur_noise_and_washed_out_colours(sigma, noise, wash, min_prompt,
                                                             min_shape):
    acc = _accuracy(_eval_specs(), lambda f, i: _degrade(f, sigma, noise, wash, seed=i))
    print(f"\nDEMO analysis accuracy, 48 clips, blur {sigma} px, noise {noise}, wash {wash}: {acc}")
    assert acc["prompt"] >= min_prompt and acc["shape"] >= min_shape, acc


def test_blank_clip_has_no_object():
    frames = np.full((17, 64, 64, 3), 0.47, np.float32)
    found = analyse(frames)
    assert found.background == "gray" and found.colour is None and found.direction is None
    ok = check_prompt(frames, "a red circle moving up on a gray background")
    assert ok["background"] and not ok["colour"] and not ok["prompt"]


def test_psnr():
    a = np.zeros((2, 8, 8, 3), np.float32)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-4)
    img = (np.arange(192, dtype=np.uint8).reshape(8, 8, 3))
    assert psnr(img, img.astype(np.float32) / 255 + 0.01) == pytest.approx(40.0, abs=1e-3)
    assert psnr(img, img) == float("inf")          # single frames [H, W, 3] too
    with pytest.raises(ValueError):
        psnr(a, a[:1])


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spiece():
    pytest.importorskip("sentencepiece")
    from training.tokenizer_train import train_tokenizer

    return train_tokenizer()


def test_tokenizer_training_is_deterministic(spiece):
    from training.tokenizer_train import train_tokenizer

    assert train_tokenizer() == spiece
    assert len(spiece) < 16_000       # no large normalisation tables in the embedded file


def test_every_caption_tokenizes_without_unknown_pieces(spiece):
    import sentencepiece as spm

    from training.tokenizer_train import as_spiece_tensor
    from wan_core.models.tokenizer import UMT5Tokenizer

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(spiece)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)   # as umT5
    tok = UMT5Tokenizer.from_spiece_tensor(as_spiece_tensor(spiece))
    assert tok.vocab_size == sp.get_piece_size() and tok.eos_id == 1
    for combo in iter_combos("all"):
        ids = tok(combo.caption)
        assert sp.unk_id() not in ids and ids[-1] == 1
        assert len(ids) == len(combo.caption.split()) + 1       # one piece per word, then </s>
    assert tok("A Red CIRCLE moving left on a Blue background") == \
        tok("a red circle moving left on a blue background")
    assert sp.unk_id() not in tok("a zebra 42 ünï")             # byte fallback
