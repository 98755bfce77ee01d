"""attention='fp8': the Triton 8-bit flash-attention kernel against SDPA (on CPU through Triton's
interpreter), its fallbacks, and the rule that only the DiT's self-attention uses it.

The kernel runs in a subprocess (``tests/fp8_attention_interpreted.py``: ``TRITON_INTERPRET=1``
must be set before triton's first import, and two interpreter bugs are patched there) that
prints its errors; the tests here check them. Print them with ``pytest -s | grep FP8ATTN``.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings

import pytest
import torch

from tests.conftest import ROOT
from tests.dit_helpers import random_inputs, random_state_dict, tiny_config
from tests.fp8_attention_interpreted import DIMS, LENGTHS, SPREADS, qkv
from wan_core import load_dit
from wan_core.models import attention as attention_module
from wan_core.models import dit as dit_module
from wan_core.models.attention import (BACKENDS, AttentionBackendError, attention,
                                       cross_attention_backend)
from wan_core.ops import fp8_attention as fp8_ops

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed "
                                  "(pip install triton): the kernel runs under its interpreter")


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """The figures of ``python -m tests.fp8_attention_interpreted`` (one process, ~3 s)."""
    run = subprocess.run([sys.executable, "-m", "tests.fp8_attention_interpreted"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"\nFP8ATTN triton {res['triton']} interpreter: {res['total_s']:.1f} s for all "
          f"cases, {res['one_call_s']:.2f} s for one call (L=130, D=128, 2 heads); bf16 SDPA "
          f"itself: rel L2 {res['sdpa_bf16']:.4f}")
    return res


@needs_triton
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("length", LENGTHS)
def test_kernel_without_rounding_is_exact(interpreted, length, dim, dtype):
    """qk_format='none': every step but the 8-bit rounding (blocks, masks for L not a multiple
    of 64 / 128, scales, smoothing, online softmax) equals SDPA up to the 16-bit P and V."""
    err = interpreted["none"][f"{length}-{dim}-{dtype}"]
    print(f"FP8ATTN none L={length} D={dim} {dtype}: rel L2 {err:.2e}")
    assert err < (4e-3 if dtype == "bfloat16" else 1e-3)


@needs_triton
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("length", LENGTHS)
def test_fp8_error_against_sdpa(interpreted, length, dim):
    """e4m3 Q·K for q / k entries of RMS 0.5 and 1 (Wan's RMSNorm'd q / k at its initial norm
    weights); int8 Q·K alongside. e4m3's 3-bit mantissa costs ~3x int8's error here."""
    err = {(s, f): interpreted["formats"][f"{length}-{dim}-{s}-{f}"]
           for s in SPREADS for f in ("fp8", "int8")}
    print(f"FP8ATTN L={length} D={dim}: " + ", ".join(
        f"{f} spread {s}: {e:.4f}" for (s, f), e in err.items()))
    assert err[0.5, "fp8"] < 0.015 and err[0.5, "int8"] < 0.008
    assert err[1.0, "fp8"] < 0.05 and err[1.0, "int8"] < 0.02


@needs_triton
def test_smoothing_handles_a_common_offset_in_k(interpreted):
    """An offset of ~20 shared by every key (softmax ignores it) would take most of K's e4m3
    range; with the mean subtracted the error is that of the offset-free keys."""
    res = interpreted["offset"]
    print(f"FP8ATTN offset in K: smoothed {res['smoothed']:.4f} (no offset "
          f"{res['plain']:.4f}), without smoothing {res['unsmoothed']:.4f}")
    assert res["smoothed"] < 1.2 * res["plain"] + 1e-3 and res["smoothed"] < 0.015
    assert res["unsmoothed"] > 5 * res["smoothed"]


def test_kernel_rejects_bad_shapes():
    q = torch.zeros(1, 8, 2, 160)
    with pytest.raises(ValueError, match="head dim 160"):
        fp8_ops.fp8_attention(q, q, q)
    with pytest.raises(ValueError, match="qk_format"):
        fp8_ops.fp8_attention(q, q, q, qk_format="fp4")


# --------------------------------------------------------------------------------------------
# Selection and fallbacks (no triton needed)
# --------------------------------------------------------------------------------------------

def test_unknown_backend_lists_fp8():
    q = torch.zeros(1, 4, 1, 8)
    assert "fp8" in BACKENDS and "int8" in BACKENDS
    with pytest.raises(AttentionBackendError, match=r"choose one of .*fp8"):
        attention(q, q, q, backend="fp16-magic")


@pytest.fixture
def fresh_warnings():
    attention_module._warn_fallback.cache_clear()
    yield
    attention_module._warn_fallback.cache_clear()


def _calls_warn_once(q, k, v):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [attention(q, k, v, backend="fp8") for _ in range(3)]
    return outs, [w for w in caught if "attention='fp8'" in str(w.message)]


def test_cpu_tensors_fall_back_to_sdpa_with_one_warning(fresh_warnings):
    q, k, v = qkv(20, 16, torch.float32)
    outs, warned = _calls_warn_once(q, k, v)
    assert len(warned) == 1 and "CUDA" in str(warned[0].message)
    ref = attention(q, k, v, backend="sdpa")
    assert all(torch.equal(o, ref) for o in outs)


def test_missing_triton_and_old_gpus_give_reasons(monkeypatch, fresh_warnings):
    cuda = torch.device("cuda")
    monkeypatch.setitem(__import__("sys").modules, "triton", None)      # import triton fails
    assert "triton" in fp8_ops.fp8_attention_support(cuda, 128)
    monkeypatch.undo()
    if not HAS_TRITON:
        return
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA RTX 3090")
    reason = fp8_ops.fp8_attention_support(cuda, 128)
    assert "8.6" in reason and "8.9" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_ops.fp8_attention_support(cuda, 128) is None
    assert "head dim 256" in fp8_ops.fp8_attention_support(cuda, 256)


def test_a_reason_means_sdpa_and_one_warning(monkeypatch, fresh_warnings):
    """Whatever the reason (no triton, old GPU), attention() warns once and returns SDPA's
    exact result; the reason is passed on verbatim."""
    monkeypatch.setattr(fp8_ops, "fp8_attention_support",
                        lambda device, head_dim: "the 'triton' package is not installed")
    q, k, v = qkv(20, 16, torch.float32)
    outs, warned = _calls_warn_once(q, k, v)
    assert len(warned) == 1 and "triton" in str(warned[0].message)
    assert all(torch.equal(o, attention(q, k, v)) for o in outs)


def test_cross_attention_never_uses_fp8(monkeypatch, fresh_warnings):
    """An I2V model loaded with attention='fp8': self-attention asks for fp8, the text and
    image cross-attentions for sdpa; on CPU the output equals the sdpa model's."""
    assert cross_attention_backend("fp8") == "sdpa"
    assert cross_attention_backend("int8") == "sdpa"
    assert cross_attention_backend("sage") == "sage"
    cfg = tiny_config("i2v")
    sd = random_state_dict(cfg)
    inp = random_inputs(cfg)
    tokens = inp["x"].shape[2] * (inp["x"].shape[3] // 2) * (inp["x"].shape[4] // 2)
    calls = []

    def spy(q, k, v, backend="sdpa", bias=None):
        calls.append((backend, k.shape[1]))
        return attention(q, k, v, backend, bias=bias)

    monkeypatch.setattr(dit_module, "attention", spy)
    model = load_dit(sd, num_heads=cfg.num_heads, attention="fp8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            out = model(**inp)
    self_calls = [b for b, n in calls if n == tokens]
    cross_calls = [(b, n) for b, n in calls if n != tokens]
    assert self_calls and set(self_calls) == {"fp8"}
    assert cross_calls and {b for b, _ in cross_calls} == {"sdpa"}
    assert any(n == inp["clip_fea"].shape[1] for _, n in cross_calls)     # the image branch
    with torch.no_grad():
        ref = load_dit(sd, num_heads=cfg.num_heads)(**inp)
    assert torch.equal(out, ref)


def test_every_entry_point_offers_fp8():
    """load_dit (above), the loader node's widget and the CLI's --attention list the same
    backends as wan_core.models.attention."""
    from tests.conftest import load_pack
    from wan_core.__main__ import ATTENTION, build_parser

    widget = load_pack().NODE_CLASS_MAPPINGS["WanCoreModelLoader"].INPUT_TYPES()
    assert widget["required"]["attention"][0] == list(BACKENDS)
    assert ATTENTION == BACKENDS
    args = build_parser().parse_args(["generate", "--dit", "d", "--vae", "v", "--text-encoder",
                                      "t", "--prompt", "p", "--attention", "fp8"])
    assert args.attention == "fp8"
