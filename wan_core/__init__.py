"""wan_core: a compact PyTorch implementation of the Wan 2.1 / 2.2 video models.

Pure PyTorch; never imports ComfyUI. Public API (see README):

    from wan_core import load_dit, load_vae, load_text_encoder, load_clip_vision

Loaders are imported lazily so ``import wan_core`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_dit": "wan_core.loading.dit",
    "load_vae": "wan_core.loading.vae",
    "load_text_encoder": "wan_core.loading.text_encoder",
    "load_clip_vision": "wan_core.loading.clip_vision",
    "apply_loras": "wan_core.loading.lora",
    "CheckpointError": "wan_core.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wan_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
