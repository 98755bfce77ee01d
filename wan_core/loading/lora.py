"""LoRA files -> a patched copy of a Wan DiT: :func:`apply_loras`.

Every key layout published for Wan LoRAs is read, detected from the keys themselves:
  * ComfyUI / official names, bare or under ``diffusion_model.`` (``model.diffusion_model.``),
    pairs ``lora_down`` / ``lora_up`` or ``lora_A`` / ``lora_B`` (also ``.default.weight``),
    an optional ``.alpha``;
  * LightX2V full deltas: ``.diff`` (weight), ``.diff_b`` (bias), ``blocks.N.diff_m``
    (modulation);
  * kohya / musubi-tuner ``lora_unet_blocks_0_self_attn_q`` and the Wan-Fun ``lora_unet__``
    form (module names resolved against the model's own, so underscores inside names such as
    ``self_attn`` or ``k_img`` are never guessed);
  * diffusers / PEFT ``transformer.`` names (``attn1.to_q``, ``ffn.net.0.proj``, ``norm2`` ...)
    renamed with the same table as diffusers checkpoints (norm2 / norm3 swap included);
  * musubi-tuner / LyCORIS LoKr (``lokr_w1``, ``lokr_w2`` or their ``_a`` / ``_b`` factors) and
    LoHa (``hada_w1_a`` ...).

Scale: ``strength * alpha / rank`` (no alpha: ``strength``); LoKr divides by the rank of its
low-rank factor, as LyCORIS does.

How the deltas are applied (why not merged): the model passed in must keep computing what it
did (ComfyUI caches the loader's output and may run a second LoRA chain from it), and an fp8 or
quantised weight cannot hold a small delta without rounding it away. So the returned model
shares every base tensor with the input and differs only in (a) the Linear layers the LoRA
touches, which carry its factors as ``patches`` and add the delta to the dequantised weight in
float32 at call time (one layer's weight of extra memory, transiently), and (b) small
parameters (biases, norms, modulation, the patch embedding), which get new merged tensors.
Extra memory: the LoRA's own tensors plus those small parameters; no copy of the model.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections import defaultdict
from typing import Mapping, Sequence, Union

import torch
import torch.nn as nn

from ..models.dit import WanDiT
from ..ops import Linear
from ..ops.streaming import without_streaming_hooks
from ..ops.lora import Full, Hadamard, Kronecker, LowRank, WeightPatch
from .checkpoint import (CheckpointError, identify, load_state_dict, non_finite_keys,
                         source_name)
from .dit_layouts import LayoutError, diffusers_module_name, is_diffusers_layout

logger = logging.getLogger("wan_core.lora")

LoRASource = Union[str, os.PathLike, Mapping]

# Prefixes in front of the module names (after which the official or diffusers names follow).
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.",
            "model.")
KOHYA_PREFIXES = ("lora_unet__", "lora_unet_")

# Key suffix -> role, longest first so '.lora_A.default.weight' wins over '.weight'.
SUFFIXES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_mid.weight", "mid"),
    (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"), (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"), (".lokr_w1", "lokr_w1"), (".lokr_w2", "lokr_w2"),
    (".lokr_t2", "tucker"), (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"), (".hada_w2_b", "hada_w2_b"), (".hada_t1", "tucker"),
    (".hada_t2", "tucker"), (".dora_scale", "dora"), (".alpha", "alpha"),
    (".diff_b", "diff_b"), (".diff_m", "diff_m"), (".diff", "diff"),
)
# Which parameter of the module a role's delta lands on.
TARGET_LEAF = {"diff_b": "bias", "diff_m": "modulation"}


class LoRAError(CheckpointError):
    """A LoRA file cannot be applied to this model; the message says why."""


def _split_key(key: str):
    for suffix, role in SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None, None


def _strip(name: str) -> tuple[str, bool]:
    """Remove a known prefix; returns ``(name, is_kohya)``."""
    for prefix in KOHYA_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):], True
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):], False
    return name, False


class _ModuleNames:
    """Resolves a LoRA's module name to the official parameter it targets in ``model``."""

    def __init__(self, model: nn.Module, diffusers: bool):
        # parameter name -> logical shape (a GGUF Linear stores bytes; its weight_shape counts)
        self.params = {name: p.shape for name, p in model.named_parameters()}
        for name, module in model.named_modules():
            if isinstance(module, Linear):
                self.params[f"{name}.weight" if name else "weight"] = module.weight_shape
        self.diffusers = diffusers
        self.modules = {name.rsplit(".", 1)[0] for name in self.params} | set(self.params)
        self.kohya = {m.replace(".", "_"): m for m in self.modules}

    def module(self, raw: str) -> str | None:
        """The official module (or parameter) name, or None when the model has no such one."""
        name, kohya = _strip(raw)
        if kohya:
            return self.kohya.get(name)
        if self.diffusers:
            try:
                name = diffusers_module_name(name)
            except LayoutError:
                return None
        return name if name in self.modules else None

    def target(self, module: str, role: str) -> str | None:
        """The parameter name the delta of ``role`` on ``module`` is added to."""
        leaf = TARGET_LEAF.get(role, "weight")
        for name in (f"{module}.{leaf}", module if role in ("diff", "down", "up") else None):
            if name is not None and name in self.params:
                return name
        return None


def _scale_for(role_tensors: dict, alpha, strength: float, kind: str) -> float:
    if alpha is None:
        return strength
    alpha = float(alpha)
    if kind == "lora":
        rank = role_tensors["down"].shape[0]
    elif kind == "loha":
        rank = role_tensors["hada_w1_b"].shape[0]
    else:   # lokr: the rank of its low-rank factor (w2's when both are factored), else none
        factor = role_tensors.get("lokr_w2_b", role_tensors.get("lokr_w1_b"))
        if factor is None:
            return strength
        rank = factor.shape[0]
    return strength * alpha / rank


def _build_patches(module: str, roles: dict, strength: float, where: str) -> list:
    """``[(role, WeightPatch)]`` for one module's tensors (roles -> tensors)."""
    alpha = roles.pop("alpha", None)
    if "dora" in roles:
        raise LoRAError(f"{where}: {module} is a DoRA layer (dora_scale); DoRA LoRAs are not "
                        "supported yet. Use a plain LoRA of the same model.")
    if "tucker" in roles or "mid" in roles:
        raise LoRAError(f"{where}: {module} uses a Tucker / mid factor (lora_mid, lokr_t2, "
                        "hada_t1/t2), which Wan LoRAs do not use; this is not a Wan DiT LoRA.")
    out = []
    for role in ("diff", "diff_b", "diff_m"):
        if role in roles:
            out.append((role, Full(roles.pop(role), strength)))
    if "down" in roles or "up" in roles:
        if not ("down" in roles and "up" in roles):
            missing = "up" if "down" in roles else "down"
            raise LoRAError(f"{where}: {module} has no lora_{missing} tensor (an incomplete file)")
        scale = _scale_for(roles, alpha, strength, "lora")
        out.append(("down", LowRank(roles.pop("up"), roles.pop("down"), scale)))
    if any(r.startswith("lokr_") for r in roles):
        parts = {r[len("lokr_"):]: roles.pop(r) for r in list(roles) if r.startswith("lokr_")}
        if not ({"w1"} <= parts.keys() or {"w1_a", "w1_b"} <= parts.keys()) or \
                not ({"w2"} <= parts.keys() or {"w2_a", "w2_b"} <= parts.keys()):
            raise LoRAError(f"{where}: {module} has an incomplete LoKr factor set "
                            f"({', '.join(sorted(parts))})")
        scale = _scale_for({f"lokr_{k}": v for k, v in parts.items()}, alpha, strength, "lokr")
        out.append(("lokr", Kronecker(scale, **parts)))
    if any(r.startswith("hada_") for r in roles):
        parts = {r: roles.pop(r) for r in list(roles) if r.startswith("hada_")}
        if len(parts) != 4:
            raise LoRAError(f"{where}: {module} has an incomplete LoHa factor set "
                            f"({', '.join(sorted(parts))})")
        scale = _scale_for(parts, alpha, strength, "loha")
        out.append(("loha", Hadamard(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"],
                                     parts["hada_w2_b"], scale)))
    return out


def lora_patches(sd: Mapping[str, torch.Tensor], model: nn.Module, strength: float,
                 name: str = "LoRA") -> dict:
    """Read one LoRA state dict against ``model``: ``{param name: [WeightPatch]}``.

    Raises :class:`LoRAError` for a file that is not a Wan DiT LoRA, whose shapes belong to
    another model size, or that uses an adapter kind not supported; warns (logging) with the
    count and the first keys that match no parameter of ``model``.
    """
    modules = defaultdict(dict)     # raw module name -> {role: tensor}
    keys = defaultdict(dict)        # raw module name -> {role: key in the file}
    unmatched = []
    for key, value in sd.items():
        raw, role = _split_key(key)
        if raw is None:
            unmatched.append(key)
            continue
        modules[raw][role] = value
        keys[raw][role] = key
    bad = non_finite_keys(sd)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise LoRAError(f"{name}: {', '.join(bad[:3])}{more} hold NaN or infinite values; the "
                        "LoRA is damaged (or was saved from a diverged training run) and would "
                        "make the whole video invalid. Use another copy of the file.")
    if not modules:
        kind = identify(sd)
        what = "holds no LoRA keys" if kind in ("unknown", "lora") else \
            f"is {_KIND_NAMES.get(kind, kind)}, not a LoRA"
        raise LoRAError(f"{name} {what}; it is not a Wan DiT LoRA. Load LoRAs made for Wan 2.1 "
                        "/ 2.2 diffusion models (models/loras).")

    stripped = [_strip(raw) for raw in modules]
    names = _ModuleNames(model, is_diffusers_layout({n: None for n, kohya in stripped
                                                     if not kohya}))
    patches = defaultdict(list)
    for raw, roles in modules.items():
        module = names.module(raw)
        built = [] if module is None else _build_patches(module, dict(roles), strength, name)
        for role, patch in built:
            target = names.target(module, role)
            if target is None:
                unmatched.append(f"{raw}{_suffix_of(role)}")
                continue
            _check_fits(patch, names.params[target], target, raw, roles, keys[raw], name)
            patches[target].append(patch)
        if module is None:
            unmatched.extend(f"{raw}{_suffix_of(r)}" for r in roles)
    if not patches:
        raise LoRAError(f"{name}: none of its {len(sd)} keys names a layer of this Wan DiT "
                        f"(first: {', '.join(sorted(sd)[:3])}); it is not a Wan DiT LoRA (a "
                        "LoRA for another model such as SDXL, Flux or a VAE?)")
    if unmatched:
        logger.warning("%s: %d of %d keys match no layer of this model and were not applied "
                       "(first: %s)", name, len(unmatched), len(sd), ", ".join(unmatched[:5]))
    return dict(patches)


_KIND_NAMES = {"dit": "a Wan diffusion model checkpoint", "vae": "a Wan VAE",
               "text_encoder": "a text encoder", "clip_vision": "a CLIP vision model"}


def _suffix_of(role: str) -> str:
    return next((s for s, r in SUFFIXES if r == role), "")


def _check_fits(patch: WeightPatch, shape, target: str, raw: str, roles: dict, keys: dict,
                name: str) -> None:
    """Refuse factors that do not fit each other or the layer, naming the keys and shapes."""
    keys = ", ".join(f"{keys[role]} {list(t.shape)}" for role, t in roles.items()
                     if isinstance(t, torch.Tensor) and t.dim() > 0)
    try:
        delta = tuple(patch.delta_shape())
    except ValueError as e:
        raise LoRAError(f"{name}: the factors of {raw} do not fit each other ({e}); the file is "
                        f"damaged or was written wrongly ({keys})") from None
    if patch.fits(shape):
        return
    shape = tuple(shape)
    if math.prod(delta) == math.prod(shape):
        why = ("the same number of values in another arrangement (transposed or reshaped "
               "factors): the file was written wrongly")
    else:
        why = "the LoRA was made for another model size or variant (e.g. 14B vs 1.3B, I2V vs T2V)"
    raise LoRAError(f"{name}: layer {target} has shape {shape} in this model but the LoRA's "
                    f"{keys} make a delta of shape {delta}: {why}")


# --------------------------------------------------------------------------------------------
# Applying
# --------------------------------------------------------------------------------------------

def shared_copy(model: nn.Module) -> nn.Module:
    """A new module tree that shares every parameter and buffer tensor with ``model``."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    streamer = getattr(model, "_block_streamer", None)
    if streamer is not None:
        memo[id(streamer)] = None
    patched = copy.deepcopy(model, memo)
    without_streaming_hooks(patched, model)
    return patched


def _attach(model: nn.Module, target: str, patches: Sequence[WeightPatch]) -> None:
    module_name, leaf = target.rsplit(".", 1) if "." in target else ("", target)
    module = model.get_submodule(module_name)
    if isinstance(module, Linear) and leaf == "weight":
        module.patches.extend(patches)
        return
    param = getattr(module, leaf)
    merged = param.detach().float()
    for patch in patches:
        merged = merged + patch.delta(param.shape, param.device)
    setattr(module, leaf, nn.Parameter(merged.to(param.dtype), requires_grad=False))


def _check_strength(strength) -> float:
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"LoRA strength must be a number (got {strength!r})") from None
    if not math.isfinite(value):
        raise ValueError(f"LoRA strength must be finite (got {strength!r})")
    return value


def read_lora(source: LoRASource) -> dict:
    """The state dict of a LoRA file (or the mapping itself). Non-finite values are refused by
    :func:`lora_patches`, so they are not warned about here."""
    return dict(source) if isinstance(source, Mapping) else load_state_dict(source, warn_non_finite=False)


def _check_against(structure: nn.Module, loras: Sequence) -> None:
    for source, strength in loras:
        name = source_name(source) if not isinstance(source, Mapping) else "the LoRA"
        lora_patches(read_lora(source), structure, _check_strength(strength) or 1.0, name)


def check_loras(config, loras: Sequence) -> None:
    """Check ``[(source, strength), ...]`` against a DiT of ``config`` (a ``DiTConfig``, e.g.
    read from a file header) without its weights: a LoRA for another model, with factors that
    do not fit, or with NaN values raises :class:`LoRAError` before any model is loaded."""
    with torch.device("meta"):
        structure = WanDiT(config)
    _check_against(structure, loras)


def apply_loras(model, loras: Sequence, expert: str = "both"):
    """A model that computes with ``loras`` applied; ``model`` itself is not changed.

    model: a Wan DiT, an on-demand one (``OnDemandDiT``: returns a new handle that applies the
        LoRAs whenever it loads), or an expert pair (``wan_core.pipeline.MoEModel``: anything with
        ``high_noise`` / ``low_noise``), whose experts named by ``expert`` ('both',
        'high_noise', 'low_noise') get the LoRAs.
    loras: ``[(path_or_state_dict, strength), ...]``; several files add their deltas.
    Returns a new model sharing all unpatched tensors with ``model`` (see the module docstring).
    """
    if expert not in ("both", "high_noise", "low_noise"):
        raise ValueError(f"expert must be 'both', 'high_noise' or 'low_noise' (got {expert!r})")
    if hasattr(model, "high_noise") and hasattr(model, "low_noise"):
        high, low = model.high_noise, model.low_noise
        if expert in ("both", "high_noise"):
            high = apply_loras(high, loras)
        if expert in ("both", "low_noise"):
            low = apply_loras(low, loras)
        return dataclasses.replace(model, high_noise=high, low_noise=low)
    checked = [(source, _check_strength(strength)) for source, strength in loras]
    if hasattr(model, "with_loras"):
        # An on-demand model (``wan_core.loading.on_demand``): check the LoRAs against its
        # structure now; they are applied each time its weights are read.
        _check_against(model.meta_model(), checked)
        return model.with_loras(checked)
    patched = shared_copy(model)
    for source, strength in checked:
        if strength == 0.0:
            continue
        name = source_name(source) if not isinstance(source, Mapping) else "the LoRA"
        patches = lora_patches(read_lora(source), patched, strength, name)
        for target, items in patches.items():
            _attach(patched, target, items)
    return patched
