"""ComfyUI-WanCore: Wan 2.1 / 2.2 video generation nodes for ComfyUI.

ComfyUI imports this folder as a custom node package. The nodes live in ``nodes/`` (imported
relatively, so they never clash with ComfyUI's own top-level ``nodes`` module); the model code
lives in ``wan_core/``, which is made importable by putting this folder on ``sys.path``.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
