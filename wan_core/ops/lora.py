"""Weight deltas of LoRA-style adapters, computed in float32 from their factors.

Every adapter kind is one :class:`WeightPatch`: ``delta(shape, device)`` returns the full
float32 delta for a weight of ``shape``, already multiplied by its scale
(``strength * alpha / rank``). ``wan_core.ops.Linear`` adds the deltas of its ``patches`` at
call time; other parameters (biases, norms, modulation, the patch embedding) are small and get
the delta merged once into a new tensor by ``wan_core.loading.lora``.

Factor tensors are non-persistent buffers, kept in the file's dtype (usually bf16), so a
patched model holds the adapter at its file size and moves it with ``.to(device)``.

Kinds (``W`` the weight, ``s`` the scale):
  * :class:`LowRank`: LoRA, ``s * up @ down`` (up ``[out, r]``, down ``[r, in, *kernel]``);
  * :class:`Full`: a full delta, ``s * diff`` (LightX2V ``.diff`` / ``.diff_b`` / ``.diff_m``);
  * :class:`Kronecker`: LoKr, ``s * kron(w1, w2)``, each factor whole or low-rank (``a @ b``);
  * :class:`Hadamard`: LoHa, ``s * (w1a @ w1b) * (w2a @ w2b)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightPatch(nn.Module):
    """A delta for one weight: ``delta(shape, device) -> float32 tensor of shape``."""

    low_rank = False     # True: a Linear applies it to its activations (add_to_output)

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def _keep(self, **tensors: Optional[torch.Tensor]) -> None:
        for name, value in tensors.items():
            self.register_buffer(name, value, persistent=False)

    def full(self, device) -> torch.Tensor:
        """The unscaled delta in float32, in the factors' natural shape."""
        raise NotImplementedError

    def delta_shape(self) -> tuple:
        """The shape of the delta the factors make (checked against the target before any
        work); raises ValueError naming the factors when they do not fit each other."""
        raise NotImplementedError

    def fits(self, shape) -> bool:
        """Whether the delta can be added to a weight of ``shape``: the same shape (size-1
        dims aside), or ``[out, in * kernel]`` for a convolution kernel ``[out, in, *kernel]``.
        A transposed delta never fits (even where the element counts agree)."""
        mine, shape = tuple(self.delta_shape()), tuple(shape)
        if mine == shape or _squeezed(mine) == _squeezed(shape):
            return True
        return (len(mine) == 2 and len(shape) > 2 and mine[0] == shape[0]
                and mine[1] == math.prod(shape[1:]))

    def delta(self, shape, device=None) -> torch.Tensor:
        """The scaled float32 delta, reshaped to ``shape`` (a fresh tensor)."""
        d = self.full(device)
        if d.numel() != math.prod(shape):
            raise ValueError(f"delta of shape {tuple(d.shape)} does not fit a weight of shape "
                             f"{tuple(shape)}")
        return d.reshape(shape).mul_(self.scale)


def _squeezed(shape: tuple) -> tuple:
    return tuple(n for n in shape if n != 1)


def _matmul_shape(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> tuple:
    """``(rows of a, *b.shape[1:])`` for the product ``a.flatten(1) @ b.flatten(1)``; a
    ValueError when a's columns (after size-1 dims) and b's rows differ."""
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"{a_name} {list(a.shape)} and {b_name} {list(b.shape)} must both be "
                         "matrices")
    columns = a[0].numel()
    if columns != b.shape[0]:
        raise ValueError(f"{a_name} {list(a.shape)} has {columns} columns but {b_name} "
                         f"{list(b.shape)} has {b.shape[0]} rows; the two must agree (the "
                         "rank)")
    return (a.shape[0], *b.shape[1:])


def _f32(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device if device is not None else t.device, dtype=torch.float32)


def _product(a: torch.Tensor, b: torch.Tensor, device) -> torch.Tensor:
    """``a.flatten(1) @ b.flatten(1)`` in float32: ``[rows_a, cols_b]``."""
    return _f32(a, device).flatten(1) @ _f32(b, device).flatten(1)


class LowRank(WeightPatch):
    """LoRA: ``scale * up @ down``; up ``[out, r]`` (or ``[out, r, 1, ...]``), down ``[r, in...]``.

    On a Linear it never builds the ``[out, in]`` delta: ``add_to_output`` adds
    ``scale * (x @ down^T) @ up^T`` in the activations' dtype (2 r (in + out) multiply-adds per
    token instead of rebuilding the weight)."""

    low_rank = True

    def __init__(self, up: torch.Tensor, down: torch.Tensor, scale: float):
        super().__init__(scale)
        self._keep(up=up, down=down)

    def add_to_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y + scale * (x @ down^T) @ up^T`` for a Linear's input x ``[..., in]``, output y."""
        down = self.down.to(device=x.device, dtype=x.dtype).flatten(1)
        up = self.up.to(device=x.device, dtype=x.dtype).flatten(1)
        update = F.linear(F.linear(x, down), up)
        if torch.is_grad_enabled():
            return y + update * self.scale
        return y.add_(update, alpha=self.scale)

    def full(self, device=None) -> torch.Tensor:
        return _product(self.up, self.down, device)

    def delta_shape(self) -> tuple:
        return _matmul_shape(self.up, self.down, "up", "down")


class Full(WeightPatch):
    """A full delta tensor (LightX2V ``diff`` files): ``scale * diff``."""

    def __init__(self, diff: torch.Tensor, scale: float):
        super().__init__(scale)
        self._keep(diff=diff)

    def full(self, device=None) -> torch.Tensor:
        return _f32(self.diff, device).clone()

    def delta_shape(self) -> tuple:
        return tuple(self.diff.shape)


class Kronecker(WeightPatch):
    """LoKr: ``scale * kron(w1, w2)``; each factor given whole (``w1``) or as ``w1_a @ w1_b``."""

    def __init__(self, scale: float, w1=None, w1_a=None, w1_b=None, w2=None, w2_a=None,
                 w2_b=None):
        super().__init__(scale)
        self._keep(w1=w1, w1_a=w1_a, w1_b=w1_b, w2=w2, w2_a=w2_a, w2_b=w2_b)

    def _factor(self, whole, a, b, device) -> torch.Tensor:
        return _f32(whole, device) if whole is not None else _product(a, b, device)

    def full(self, device=None) -> torch.Tensor:
        w1 = self._factor(self.w1, self.w1_a, self.w1_b, device)
        w2 = self._factor(self.w2, self.w2_a, self.w2_b, device)
        if w2.dim() > 2:                      # convolution kernels: w1 spans out x in only
            w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
        return torch.kron(w1, w2)

    def delta_shape(self) -> tuple:
        def factor_shape(whole, a, b, name):
            if whole is not None:
                if whole.dim() < 2:
                    raise ValueError(f"{name} {list(whole.shape)} must be a matrix")
                return tuple(whole.shape)
            return _matmul_shape(a, b, f"{name}_a", f"{name}_b")
        w1 = factor_shape(self.w1, self.w1_a, self.w1_b, "w1")
        w2 = factor_shape(self.w2, self.w2_a, self.w2_b, "w2")
        kernel = w2[2:] if self.w2 is not None else ()
        return (w1[0] * w2[0], math.prod(w1[1:]) * (w2[1] if kernel else math.prod(w2[1:])),
                *kernel)


class Hadamard(WeightPatch):
    """LoHa: ``scale * (w1_a @ w1_b) * (w2_a @ w2_b)``."""

    def __init__(self, w1_a, w1_b, w2_a, w2_b, scale: float):
        super().__init__(scale)
        self._keep(w1_a=w1_a, w1_b=w1_b, w2_a=w2_a, w2_b=w2_b)

    def full(self, device=None) -> torch.Tensor:
        return _product(self.w1_a, self.w1_b, device).mul_(_product(self.w2_a, self.w2_b, device))

    def delta_shape(self) -> tuple:
        first = _matmul_shape(self.w1_a, self.w1_b, "w1_a", "w1_b")
        second = _matmul_shape(self.w2_a, self.w2_b, "w2_a", "w2_b")
        if math.prod(first) != math.prod(second) or first[0] != second[0]:
            raise ValueError(f"w1_a @ w1_b makes {list(first)} but w2_a @ w2_b makes "
                             f"{list(second)}; the two products must have one shape")
        return first
