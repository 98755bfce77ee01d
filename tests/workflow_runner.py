"""Execute a UI-format ComfyUI workflow with this pack's nodes, without ComfyUI.

Nodes run in dependency order; widget values are mapped by position exactly as ComfyUI maps
them (``nodes.schema``); links feed outputs to inputs. The few native nodes the example
workflows use get stand-ins that behave as ComfyUI's (``LoadImage`` reads every frame of a file
in ``input_dir``; ``ImageToMask``, ``ImagePadForOutpaint``, ``ImageFromBatch``, ``ImageScale``);
notes are skipped. Nodes run under ``torch.inference_mode`` as in ComfyUI. ``overrides``
replaces widget values by name on every node, pack or native, that has that widget (the tests
shrink sizes, frames and steps for tiny models: ``SMALL``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from tests.conftest import load_pack

SKIPPED = {"Note", "MarkdownNote"}
# What the tests shrink every example workflow to for the tiny models, by widget name: 64x64
# (WanCore nodes and Upscale Image), 9 frames (and Image From Batch's length: the frames a
# video-to-video clip keeps), 2 steps, 9-frame extension segments.
SMALL = {"width": 64, "height": 64, "frames": 9, "length": 9, "steps": 2,
         "frames_per_segment": 9}


class LoadImageStandIn:
    """ComfyUI's LoadImage, as its ``load_image`` behaves: every frame of the file (an animated
    WebP / GIF / APNG gives a batch; MPO files give their first frame), EXIF-rotated, 16-bit
    ('I') images scaled down, frames of another size than the first skipped. IMAGE
    ``[N, H, W, 3]`` in 0..1; MASK ``[N, H, W]`` = 1 - alpha (transparent = 1) for frames with an
    alpha channel or a transparent palette colour, else a ``[1, 64, 64]`` block of zeros per
    frame (ComfyUI's placeholder, not the image size)."""

    def __init__(self, input_dir: Path):
        self.input_dir = input_dir

    def __call__(self, image, upload="image"):
        from PIL import Image, ImageOps, ImageSequence

        images, masks = [], []
        with Image.open(self.input_dir / image) as img:
            for frame in ImageSequence.Iterator(img):
                frame = ImageOps.exif_transpose(frame)
                if frame.mode == "I":
                    frame = frame.point(lambda v: v * (1 / 255))
                rgb = frame.convert("RGB")
                if images and rgb.size != (images[0].shape[1], images[0].shape[0]):
                    continue
                images.append(np.asarray(rgb, dtype=np.float32) / 255.0)
                if "A" in frame.getbands():
                    alpha = np.asarray(frame.getchannel("A"), dtype=np.float32) / 255.0
                elif frame.mode == "P" and "transparency" in frame.info:
                    alpha = np.asarray(frame.convert("RGBA").getchannel("A"),
                                       dtype=np.float32) / 255.0
                else:
                    alpha = None
                masks.append(np.zeros((64, 64), np.float32) if alpha is None else 1.0 - alpha)
            if len(images) > 1 and img.format == "MPO":
                images, masks = images[:1], masks[:1]
        return (torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)))


def image_to_mask(image, channel):
    """ComfyUI's ImageToMask (Convert Image to Mask): one channel of the IMAGE as a MASK."""
    return (image[..., ["red", "green", "blue", "alpha"].index(channel)],)


def image_pad_for_outpaint(image, left, top, right, bottom, feathering):
    """ComfyUI's ImagePadForOutpaint (Pad Image for Outpainting): the image on a grey (0.5)
    canvas grown by the given pixels per side; one MASK ``[H, W]`` for the batch: 1 on the new
    border, 0 on the image, except a fade (squared ramp, up to 1 at the image edge) over
    ``feathering`` pixels inside each padded side when 2 * feathering fits the image."""
    n, h, w, c = image.shape
    canvas = torch.full((n, h + top + bottom, w + left + right, c), 0.5)
    canvas[:, top:top + h, left:left + w] = image
    mask = torch.ones(h + top + bottom, w + left + right)
    inner = torch.zeros(h, w)
    if 0 < feathering and 2 * feathering < h and 2 * feathering < w:
        rows = torch.arange(h, dtype=torch.float32)[:, None]
        cols = torch.arange(w, dtype=torch.float32)[None, :]
        far_h, far_w = torch.full_like(rows, h), torch.full_like(cols, w)
        distance = torch.minimum(
            torch.minimum(rows if top else far_h, (h - rows) if bottom else far_h),
            torch.minimum(cols if left else far_w, (w - cols) if right else far_w))
        ramp = (feathering - distance) / feathering
        inner = torch.where(distance < feathering, ramp * ramp, inner)
    mask[top:top + h, left:left + w] = inner
    return (canvas, mask)


def image_from_batch(image, batch_index, length):
    """ComfyUI's ImageFromBatch: ``length`` images from ``batch_index`` on, both clamped to the
    batch (an index past the end gives the last image; a length past the end stops there)."""
    start = min(batch_index, image.shape[0] - 1)
    return (image[start:start + min(length, image.shape[0] - start)].clone(),)


UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")


def image_scale(image, upscale_method, width, height, crop):
    """ComfyUI's ImageScale (Upscale Image): every image resized to ``width`` x ``height``; a 0
    takes that side from the aspect ratio (both 0: unchanged). ``crop`` center first cuts the
    middle of the image to the target aspect ratio (no stretching). lanczos resizes 8-bit
    copies with PIL; the other methods are torch's interpolation (no antialiasing)."""
    import torch.nn.functional as F

    assert upscale_method in UPSCALE_METHODS, upscale_method
    if width == 0 and height == 0:
        return (image,)
    n, h, w, c = image.shape
    if width == 0:
        width = max(1, round(w * height / h))
    elif height == 0:
        height = max(1, round(h * width / w))
    x = image.movedim(-1, 1)                       # [N, C, H, W]
    if crop == "center":
        ratio = (width / height) / (w / h)
        left = round((w - w * ratio) / 2) if ratio < 1 else 0
        top = round((h - h / ratio) / 2) if ratio > 1 else 0
        x = x[:, :, top:h - top, left:w - left]
    if upscale_method == "lanczos":
        from PIL import Image

        frames = []
        for frame in x:
            pixels = np.clip(255.0 * frame.movedim(0, -1).cpu().numpy(), 0, 255).astype(np.uint8)
            resized = Image.fromarray(pixels).resize((width, height), Image.Resampling.LANCZOS)
            frames.append(torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0))
        return (torch.stack(frames),)
    return (F.interpolate(x, size=(height, width), mode=upscale_method).movedim(1, -1),)


# Native ComfyUI nodes the example workflows use: widget names in saved order, and a stand-in
# (LoadImage's needs the input folder).
NATIVE_WIDGETS = {
    "LoadImage": ["image", "upload"],
    "ImageToMask": ["channel"],
    "ImagePadForOutpaint": ["left", "top", "right", "bottom", "feathering"],
    "ImageFromBatch": ["batch_index", "length"],
    "ImageScale": ["upscale_method", "width", "height", "crop"],
}
NATIVE = {"ImageToMask": image_to_mask, "ImagePadForOutpaint": image_pad_for_outpaint,
          "ImageFromBatch": image_from_batch, "ImageScale": image_scale}


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
        elif node["type"] in NATIVE:
            names = NATIVE_WIDGETS[node["type"]]
            values = node.get("widgets_values", [])
            assert len(values) == len(names), f"{node['type']} stores {values}, takes {names}"
            widget_values = dict(zip(names, values))
            widget_values.update({k: v for k, v in (overrides or {}).items()
                                  if k in widget_values})
            out = NATIVE[node["type"]](**widget_values, **kwargs)
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
