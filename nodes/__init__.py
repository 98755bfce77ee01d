"""ComfyUI nodes over wan_core. Each node module exports NODE_CLASS_MAPPINGS and
NODE_DISPLAY_NAME_MAPPINGS; this package merges them."""
from __future__ import annotations

from . import demo, extend, generation, loaders, vace, vae_nodes, video
from .schema import with_input_checks

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (loaders, generation, vace, vae_nodes, video, extend, demo):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
for _id, _cls in NODE_CLASS_MAPPINGS.items():  # every input checked before a node runs
    with_input_checks(_cls, NODE_DISPLAY_NAME_MAPPINGS.get(_id, _id))
