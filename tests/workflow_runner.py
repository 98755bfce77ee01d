"""Execute a UI-format ComfyUI workflow with this pack's nodes, without ComfyUI.

Nodes run in dependency order; widget values are mapped by position exactly as ComfyUI maps
them (``nodes.schema``); links feed outputs to inputs. The few native nodes the example
workflows use get minimal stand-ins (``LoadImage`` reads a PNG from ``input_dir``); notes are
skipped. Nodes run under ``torch.inference_mode`` as in ComfyUI. ``overrides`` replaces widget values by name on every node that has that widget (the
tests shrink sizes, frames and steps for tiny models).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from tests.conftest import load_pack

SKIPPED = {"Note", "MarkdownNote"}


class LoadImageStandIn:
    """ComfyUI's LoadImage: IMAGE [1, H, W, 3] in 0..1 and a MASK."""

    def __init__(self, input_dir: Path):
        self.input_dir = input_dir

    def __call__(self, image, upload="image"):
        from PIL import Image

        with Image.open(self.input_dir / image) as img:
            data = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        pixels = torch.from_numpy(data)[None]
        return (pixels, torch.zeros(pixels.shape[:3]))


def _bypass(node: dict, links: dict, run):
    """Outputs of a bypassed node: for each output, the first linked input of the same type."""
    for output in node.get("outputs", []):
        for socket in node.get("inputs", []):
            if socket.get("link") is not None and socket["type"] == output["type"]:
                origin, slot = links[socket["link"]]
                yield run(origin)[slot]
                break
        else:
            yield None


def run_workflow(path: Path, models_dir: Path, input_dir: Path, output_dir: Path,
                 overrides: dict | None = None) -> dict:
    """Run the workflow; returns ``{node id: outputs}`` (a node's ``ui`` dict under ``"ui"``)."""
    pack = load_pack()
    from comfyui_wancore_pack.nodes.schema import widget_kwargs

    os.environ["WANCORE_MODELS_DIR"] = str(models_dir)
    os.environ["WANCORE_OUTPUT_DIR"] = str(output_dir)
    workflow = json.loads(Path(path).read_text())
    links = {link[0]: (link[1], link[2]) for link in workflow["links"]}
    # mode 0: active; 4: bypassed (ComfyUI passes each output's same-typed input through);
    # 2 (muted) and others: not run
    nodes = {n["id"]: n for n in workflow["nodes"]
             if n["type"] not in SKIPPED and n.get("mode", 0) in (0, 4)}
    results: dict = {}

    def run(node_id: int):
        if node_id in results:
            return results[node_id]
        node = nodes[node_id]
        if node.get("mode", 0) == 4:
            results[node_id] = tuple(_bypass(node, links, run))
            return results[node_id]
        kwargs = {}
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                origin, slot = links[socket["link"]]
                kwargs[socket["name"]] = run(origin)[slot]
        if node["type"] == "LoadImage":
            out = LoadImageStandIn(input_dir)(*node["widgets_values"])
        else:
            cls = pack.NODE_CLASS_MAPPINGS[node["type"]]
            widget_values = widget_kwargs(cls, node.get("widgets_values", []))
            for name, value in (overrides or {}).items():
                if name in widget_values:
                    widget_values[name] = value
            kwargs = {**widget_values, **kwargs}
            instance = cls()
            with torch.inference_mode():  # as ComfyUI's executor runs every node
                ret = getattr(instance, cls.FUNCTION)(**kwargs)
            if isinstance(ret, dict):
                out = tuple(ret.get("result", ()))
                results[("ui", node_id)] = ret.get("ui")
            else:
                out = ret
        results[node_id] = out
        return out

    for node_id in sorted(nodes):
        run(node_id)
    return results
