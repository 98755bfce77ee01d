"""Key layouts of Wan DiT checkpoints, renamed to the official names.

Layouts seen in the wild:
  * official bare keys (``blocks.0.self_attn.q.weight``);
  * the same with a ``model.diffusion_model.`` (or ``diffusion_model.``) prefix (ComfyUI);
  * diffusers ``WanTransformer3DModel`` names (``condition_embedder.*``, ``attn1.to_q``,
    ``scale_shift_table``, ``proj_out`` ...). In diffusers the affine cross-attention norm is
    called ``norm2`` (official ``norm3``); the affine-free norms have no weights.
    ``WanVACETransformer3DModel`` adds ``vace_blocks.N.*`` named like the main blocks, with
    ``proj_in`` / ``proj_out`` for the official ``before_proj`` / ``after_proj``.

Renaming never copies a tensor.
"""
from __future__ import annotations

import re
from typing import Mapping

from .checkpoint import MARKER_KEYS, strip_prefix

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")

# Top-level modules: diffusers name -> official name (longest match first).
_DIFFUSERS_TOP = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("proj_out.", "head.head."),
    ("patch_embedding.", "patch_embedding."),
    ("vace_patch_embedding.", "vace_patch_embedding."),
)
_DIFFUSERS_EXACT = {
    "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos",
    "scale_shift_table": "head.modulation",
}
# Inside blocks.N.: diffusers module -> official module.
_DIFFUSERS_BLOCK = {
    "attn1": "self_attn", "attn2": "cross_attn", "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2", "scale_shift_table": "modulation",
}
_DIFFUSERS_ATTN = {
    "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "add_k_proj": "k_img",
    "add_v_proj": "v_img", "norm_added_k": "norm_k_img", "norm_q": "norm_q", "norm_k": "norm_k",
}
_BLOCK_RE = re.compile(r"^(blocks|vace_blocks)\.(\d+)\.(.+)$")
# Inside vace_blocks.N. only: diffusers -> official.
_DIFFUSERS_VACE = {"proj_in": "before_proj", "proj_out": "after_proj"}
_ATTN_RE = re.compile(r"^(attn1|attn2)\.(.+?)\.(weight|bias|scale_weight|scale_input)$")


class LayoutError(ValueError):
    """A key could not be mapped to the official layout."""


def is_diffusers_layout(sd: Mapping) -> bool:
    return any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in sd)


def _diffusers_key(key: str) -> str:
    if key in MARKER_KEYS:
        return key
    if key in _DIFFUSERS_EXACT:
        return _DIFFUSERS_EXACT[key]
    m = _BLOCK_RE.match(key)
    if m:
        kind, n, rest = m.groups()
        a = _ATTN_RE.match(rest)
        if a:
            attn, module, leaf = a.groups()
            if module not in _DIFFUSERS_ATTN:
                raise LayoutError(f"unknown diffusers attention key '{key}'")
            return f"{kind}.{n}.{_DIFFUSERS_BLOCK[attn]}.{_DIFFUSERS_ATTN[module]}.{leaf}"
        if rest == "scale_shift_table":
            return f"{kind}.{n}.modulation"
        renames = dict(_DIFFUSERS_BLOCK, **(_DIFFUSERS_VACE if kind == "vace_blocks" else {}))
        for old, new in renames.items():
            if rest.startswith(old + "."):
                return f"{kind}.{n}.{new}{rest[len(old):]}"
        raise LayoutError(f"unknown diffusers block key '{key}'")
    for old, new in _DIFFUSERS_TOP:
        if key.startswith(old):
            return new + key[len(old):]
    raise LayoutError(f"unknown diffusers key '{key}'")


def diffusers_module_name(name: str) -> str:
    """The official name of a diffusers module or parameter (``blocks.0.attn1.to_q`` ->
    ``blocks.0.self_attn.q``), as LoRA files name them. Raises LayoutError when unknown."""
    if name in _DIFFUSERS_EXACT:
        return _DIFFUSERS_EXACT[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(3) == "scale_shift_table":
        return f"{m.group(1)}.{m.group(2)}.modulation"
    return _diffusers_key(name + ".weight")[: -len(".weight")]


def diffusers_to_official(sd: Mapping) -> dict:
    """Rename a diffusers ``WanTransformer3DModel`` state dict to official names."""
    return {_diffusers_key(k): v for k, v in sd.items()}


def to_official_layout(sd: Mapping) -> dict:
    """Strip a known prefix and convert diffusers names; official keys pass through."""
    sd = strip_prefix(dict(sd), PREFIXES)
    if is_diffusers_layout(sd):
        sd = diffusers_to_official(sd)
    return sd
