"""The official Wan code (PyPI ``wan22``, module ``wan``) loaded for parity tests on CPU.

Importing the ``wan`` package runs its ``__init__``, which imports modules that need CUDA and
torchvision. Instead, the ``wan``, ``wan.modules`` and ``wan.utils`` packages are registered
as empty namespace stand-ins pointing at the installed folders, so only the module files a test
asks for are executed. The official ``flash_attention`` (CUDA only, casts to bf16) is replaced
by an SDPA stand-in that keeps the input dtype and masks keys beyond ``k_lens``.

Use:
    from tests.reference import official
    model_mod = official("modules.model")        # patched WanModel module
    WanModel = model_mod.WanModel
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


def wan_package_dir() -> Path | None:
    stub = sys.modules.get("wan")
    if stub is not None and getattr(stub, "_wancore_stub", False):
        return Path(stub.__path__[0])
    spec = importlib.util.find_spec("wan")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def sdpa_flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None,
                         q_scale=None, causal=False, window_size=(-1, -1), deterministic=False,
                         dtype=torch.bfloat16, version=None):
    """Drop-in for the official ``flash_attention``: q [B, Lq, N, C], k/v [B, Lk, N, C].

    Computes in the inputs' dtype (no bf16 cast). Keys at positions >= ``k_lens[b]`` are
    masked; query rows at positions >= ``q_lens[b]`` are returned as zeros.
    """
    assert window_size == (-1, -1), "sliding-window attention is not used by Wan"
    lq, lk = q.size(1), k.size(1)
    if q_scale is not None:
        q = q * q_scale
    mask = None
    if k_lens is not None:
        keep = torch.arange(lk, device=q.device)[None, :] < k_lens.to(q.device)[:, None]
        mask = keep[:, None, None, :]  # [B, 1, 1, Lk]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        dropout_p=dropout_p, is_causal=causal, scale=softmax_scale).transpose(1, 2)
    if q_lens is not None:
        rows = torch.arange(lq, device=q.device)[None, :] < q_lens.to(q.device)[:, None]
        out = out * rows[:, :, None, None]
    return out.contiguous()


def _register_namespace(name: str, path: Path) -> None:
    if name in sys.modules and getattr(sys.modules[name], "_wancore_stub", False):
        return
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    module._wancore_stub = True
    sys.modules[name] = module


def official(name: str):
    """Import ``wan.<name>`` (e.g. ``modules.model``, ``modules.vae2_1``,
    ``utils.fm_solvers_unipc``) without running the package ``__init__`` files.

    Skips the calling test when ``wan22`` is not installed. Attention is patched to
    ``sdpa_flash_attention`` in every module that imported ``flash_attention``.
    """
    root = wan_package_dir()
    if root is None:
        pytest.skip("the official Wan code is not installed: pip install --no-deps wan22")
    _register_namespace("wan", root)
    _register_namespace("wan.modules", root / "modules")
    _register_namespace("wan.utils", root / "utils")
    module = _import_without_cuda(f"wan.{name}")
    if hasattr(module, "flash_attention"):
        module.flash_attention = sdpa_flash_attention
    return module


def _import_without_cuda(module_name: str):
    """Import a module whose top level calls ``torch.cuda.current_device()`` (t5.py uses it as a
    default argument) on a machine without CUDA: that call returns ``"cpu"`` meanwhile."""
    if torch.cuda.is_available() or module_name in sys.modules:
        return importlib.import_module(module_name)
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        return importlib.import_module(module_name)
    finally:
        torch.cuda.current_device = original


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference, computed in float64; printed by parity tests with ``-s``."""
    return (a.detach().double() - b.detach().double()).abs().max().item()


def report(name: str, err: float, bound: float) -> None:
    """Print a parity figure in one greppable format (``pytest -s | grep PARITY``)."""
    print(f"PARITY {name}: max abs error {err:.3e} (bound {bound:.0e})")
