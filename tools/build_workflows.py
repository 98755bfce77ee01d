"""Write example_workflows/*.json (ComfyUI UI format) from compact specs.

    python tools/build_workflows.py          # rewrites example_workflows/

Each workflow is a list of nodes (type, widget values, inputs by link) laid out in columns, with
groups around the loaders, the conditioning, the sampling and the output, and a note that lists
the model files and where they go. Parameters are the official ones for each model.
Workflows are a public contract once released (see tests/test_workflows.py): change a released
file only with a migration.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "example_workflows"
sys.path.insert(0, str(ROOT))

from wan_core.prompts import OFFICIAL_NEGATIVE_PROMPT as NEGATIVE  # noqa: E402

UMT5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VAE21 = "wan_2.1_vae.safetensors"
VAE22 = "wan2.2_vae.safetensors"
CLIP = "clip_vision_h.safetensors"
INPUTS = "example_workflows/inputs"   # tools/make_vace_inputs.py: the VACE examples' inputs
DEMO = "wancore-demo"          # nodes/host.py EMBEDDED_FOLDER: the demo weights inside the pack

# (output names, output types) of each node type used here.
OUTPUTS = {
    "WanCoreModelLoader": [("model", "WANCORE_MODEL")],
    "WanCoreVAELoader": [("vae", "WANCORE_VAE")],
    "WanCoreTextEncoderLoader": [("text_encoder", "WANCORE_TEXT_ENCODER")],
    "WanCoreCLIPVisionLoader": [("clip_vision", "WANCORE_CLIP_VISION")],
    "WanCoreTextEncode": [("text_embeds", "WANCORE_TEXT_EMBEDS")],
    "WanCoreEmptyVideo": [("video_cond", "WANCORE_VIDEO_COND")],
    "WanCoreImageToVideo": [("video_cond", "WANCORE_VIDEO_COND")],
    "WanCoreMoE": [("model", "WANCORE_MODEL")],
    "WanCoreLoRA": [("model", "WANCORE_MODEL")],
    "WanCoreStepCache": [("model", "WANCORE_MODEL")],
    "WanCoreSampler": [("latent", "LATENT")],
    "WanCoreVAEDecode": [("images", "IMAGE")],
    "WanCoreSaveVideo": [],
    "WanCoreDemoFirstFrame": [("image", "IMAGE")],
    "WanCoreVACE": [("video_cond", "WANCORE_VIDEO_COND")],
    "WanCoreVAEEncode": [("latent", "LATENT")],
    "WanCoreExtendVideo": [("images", "IMAGE")],
    "WanCoreContextWindows": [("model", "WANCORE_MODEL")],
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "ImageToMask": [("MASK", "MASK")],
    "ImagePadForOutpaint": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "ImageFromBatch": [("IMAGE", "IMAGE")],
    "ImageScale": [("IMAGE", "IMAGE")],
    "MarkdownNote": [],
}
# (sockets, widget names) of the native ComfyUI nodes used here, as ComfyUI lays them out.
NATIVE = {
    "LoadImage": ([], ["image", "upload"]),
    "ImageToMask": ([("image", "IMAGE")], ["channel"]),
    "ImagePadForOutpaint": ([("image", "IMAGE")], ["left", "top", "right", "bottom",
                                                   "feathering"]),
    "ImageFromBatch": ([("image", "IMAGE")], ["batch_index", "length"]),
    "ImageScale": ([("image", "IMAGE")], ["upscale_method", "width", "height", "crop"]),
}
SIZES = {"WanCoreTextEncode": (420, 300), "WanCoreSampler": (320, 300),
         "WanCoreImageToVideo": (320, 260), "LoadImage": (300, 330), "MarkdownNote": (420, 300),
         "WanCoreSaveVideo": (360, 420), "WanCoreMoE": (320, 170),
         "WanCoreDemoFirstFrame": (420, 130), "WanCoreVACE": (340, 250),
         "ImageToMask": (300, 90), "ImagePadForOutpaint": (300, 220),
         "WanCoreExtendVideo": (340, 420), "WanCoreContextWindows": (320, 170),
         "ImageFromBatch": (300, 110), "ImageScale": (300, 170)}


@dataclass
class Node:
    key: str
    type: str
    widgets: list
    inputs: dict = field(default_factory=dict)   # input name -> (node key, output slot, type)
    column: int = 0
    group: str = ""
    title: str = ""
    mode: int = 0          # 0 = active, 4 = bypassed (inputs pass through)


def _pack_nodes() -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "comfyui_wancore_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.NODE_CLASS_MAPPINGS


def sockets_and_widgets(node_type: str) -> tuple[list, list]:
    if node_type in NATIVE:
        return NATIVE[node_type]
    if node_type not in PACK:
        return [], []
    from comfyui_wancore_pack.nodes.schema import sockets_and_widgets as layout

    return layout(PACK[node_type])


def build(name: str, title: str, nodes: list[Node], note: str) -> dict:
    ids = {n.key: i + 1 for i, n in enumerate(nodes)}
    links, out_links, socket_lists = [], {}, {}
    for n in nodes:
        sockets, widgets = sockets_and_widgets(n.type)
        if (n.type in PACK or n.type in NATIVE) and len(widgets) != len(n.widgets):
            raise ValueError(f"{name}: {n.type} takes widgets {widgets}, got {n.widgets}")
        socket_lists[n.key] = sockets
        names = [s for s, _ in sockets]
        for input_name, (src, slot, typ) in n.inputs.items():
            link_id = len(links) + 1
            links.append([link_id, ids[src], slot, ids[n.key], names.index(input_name), typ])
            out_links.setdefault((src, slot), []).append(link_id)
    # Each group gets its own band of columns, left to right in the order the groups first
    # appear, so no group overlaps another and every node sits inside its own group.
    column_x: dict = {}
    x = 0
    for group in dict.fromkeys(n.group for n in nodes):
        for column in sorted({n.column for n in nodes if n.group == group}):
            column_x[(group, column)] = x
            x += max(SIZES.get(n.type, (320, 130))[0] for n in nodes
                     if n.group == group and n.column == column) + 60
        x += 40
    column_y: dict = {}
    ui_nodes = []
    for order, n in enumerate(nodes):
        w, h = SIZES.get(n.type, (320, 130))
        x = column_x[(n.group, n.column)]
        y = column_y.get((n.group, n.column), 80)
        column_y[(n.group, n.column)] = y + h + 60
        node = {
            "id": ids[n.key], "type": n.type, "pos": [x, y], "size": [w, h], "flags": {},
            "order": order, "mode": n.mode,
            "inputs": [{"name": k, "type": t, "link": next(
                (l[0] for l in links if l[3] == ids[n.key] and l[4] == i), None)}
                for i, (k, t) in enumerate(socket_lists[n.key])],
            "outputs": [{"name": on, "type": ot, "slot_index": s,
                         "links": out_links.get((n.key, s), [])}
                        for s, (on, ot) in enumerate(OUTPUTS[n.type])],
            "properties": {"Node name for S&R": n.type},
            "widgets_values": n.widgets,
        }
        if n.title:
            node["title"] = n.title
        ui_nodes.append(node)
    note_node = {"id": len(nodes) + 1, "type": "MarkdownNote", "pos": [-480, 80],
                 "size": [420, 420], "flags": {}, "order": len(nodes), "mode": 0, "inputs": [],
                 "outputs": [], "title": "Read me", "properties": {},
                 "widgets_values": [note]}
    ui_nodes.append(note_node)
    groups = []
    members_of = [(group, [u for u, n in zip(ui_nodes, nodes) if n.group == group])
                  for group in dict.fromkeys(n.group for n in nodes if n.group)]
    members_of.append(("Read me", [note_node]))
    for gi, (group, members) in enumerate(members_of):
        x0 = min(m["pos"][0] for m in members) - 20
        y0 = min(m["pos"][1] for m in members) - 60
        x1 = max(m["pos"][0] + m["size"][0] for m in members) + 20
        y1 = max(m["pos"][1] + m["size"][1] for m in members) + 20
        groups.append({"id": gi + 1, "title": group, "bounding": [x0, y0, x1 - x0, y1 - y0],
                       "color": ["#3f789e", "#8A8", "#b06634", "#a1309b", "#444"][gi % 5],
                       "font_size": 22, "flags": {}})
    return {"last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": groups, "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [560, 60]}, "wancore_title": title},
            "version": 0.4}


def loaders(dit_files, vae, clip=False, text_encoder=UMT5):
    nodes = []
    for i, (key, file) in enumerate(dit_files):
        nodes.append(Node(key, "WanCoreModelLoader", [file, "default", "sdpa", -1, 0.0, "none"],
                          group="1. Models",
                          title={"high": "High-noise expert", "low": "Low-noise expert"}.get(key, "")))
    nodes.append(Node("vae", "WanCoreVAELoader", [vae], group="1. Models"))
    nodes.append(Node("te", "WanCoreTextEncoderLoader", [text_encoder, "default"], group="1. Models"))
    if clip:
        nodes.append(Node("clip", "WanCoreCLIPVisionLoader", [CLIP], group="1. Models"))
    return nodes


def tail(model_key, cond_key, sampler_widgets, fps, prefix, column=2, latent_key=None):
    latent = {"latent": (latent_key, 0, "LATENT")} if latent_key else {}
    return [
        Node("sampler", "WanCoreSampler", sampler_widgets,
             {"model": (model_key, 0, "WANCORE_MODEL"), "text_embeds": ("text", 0, "WANCORE_TEXT_EMBEDS"),
              "video_cond": (cond_key, 0, "WANCORE_VIDEO_COND"), **latent}, column=column,
             group="3. Sample"),
        Node("decode", "WanCoreVAEDecode", ["auto", 256],
             {"vae": ("vae", 0, "WANCORE_VAE"), "latent": ("sampler", 0, "LATENT")},
             column=column + 1, group="4. Output"),
        Node("save", "WanCoreSaveVideo", [float(fps), "mp4", prefix, 19],
             {"images": ("decode", 0, "IMAGE")}, column=column + 1, group="4. Output"),
    ]


def text(prompt, negative=NEGATIVE, column=1):
    return Node("text", "WanCoreTextEncode", [prompt, negative],
                {"text_encoder": ("te", 0, "WANCORE_TEXT_ENCODER")}, column=column,
                group="2. Prompt & video")


def note(title, files, tips, inputs=()):
    lines = [f"## {title}", ""]
    if files:
        lines += ["**Model files** (put them in ComfyUI/models/...):", ""]
        lines += [f"- `{folder}/{file}`" for folder, file in files]
    if inputs:
        lines += ["", f"**Input files** (copy them from this pack's `{INPUTS}/` into "
                      "ComfyUI/input):", ""]
        lines += [f"- `{name}`: {what}" for name, what in inputs]
    lines += ["", "**Tips**", ""] + [f"- {t}" for t in tips]
    return "\n".join(lines)


def sampler(steps, cfg, shift, seed=42, solver="unipc", denoise=1.0):
    return [seed, "fixed", steps, cfg, shift, solver, denoise]


# What the step-distilled LoRAs were trained with (wan_core.sampling.DISTILLED_*).
DISTILLED = dict(steps=4, cfg=1.0, shift=5.0, solver="distilled")


def lora(key, model_key, file, title="", column=1, expert="both"):
    return Node(key, "WanCoreLoRA", [file, 1.0, expert],
                {"model": (model_key, 0, "WANCORE_MODEL")}, column=column, group="1. Models",
                title=title)


def step_cache(model_key):
    """WanCore Step Cache at its easycache defaults, bypassed: enabling it changes the video
    (a faithful approximation, about 2x faster)."""
    from wan_core.sampling.cache import DEFAULTS

    d = DEFAULTS["easycache"]
    return Node("cache", "WanCoreStepCache", ["easycache", d.threshold, d.start, d.end],
                {"model": (model_key, 0, "WANCORE_MODEL")}, column=2, group="3. Sample",
                title="Step cache (bypassed: Ctrl+B to enable)", mode=4)


CACHE_TIP = ("WanCore Step Cache is bypassed (purple): enable it (Ctrl+B) for about 2x faster "
             "sampling at a small, measured change of the video (README: Step caching).")


def workflows() -> dict:
    out = {}
    f = "wan2.1_t2v_1.3B_bf16.safetensors"
    out["wan21_t2v_1.3B"] = build("wan21_t2v_1.3B", "Wan 2.1 text to video 1.3B", [
        *loaders([("dit", f)], VAE21),
        text("A cat walks on the grass, realistic style, close-up, soft morning light."),
        Node("video", "WanCoreEmptyVideo", [832, 480, 81], column=1, group="2. Prompt & video"),
        step_cache("dit"),
        *tail("cache", "video", sampler(50, 5.0, 5.0), 16, "WanCore/wan21_t2v"),
    ], note("Wan 2.1 T2V 1.3B (480P)", [("diffusion_models", f), ("vae", VAE21),
                                        ("text_encoders", UMT5)],
            ["Official settings: 832x480, 81 frames, 50 steps, cfg 5, shift 5 (the README "
             "suggests shift 8-12 and cfg 6 for the 1.3B model).",
             "Set the text encoder device to cpu to save VRAM; prompts are cached.",
             CACHE_TIP]))

    f = "wan2.1_i2v_480p_14B_bf16.safetensors"
    out["wan21_i2v_14B_480p"] = build("wan21_i2v_14B_480p", "Wan 2.1 image to video 14B 480P", [
        *loaders([("dit", f)], VAE21, clip=True),
        Node("image", "LoadImage", ["example.png", "image"], column=1, group="2. Prompt & video"),
        text("The cat in the picture turns its head and looks at the camera."),
        Node("i2v", "WanCoreImageToVideo", [832, 480, 81, "i2v"],
             {"vae": ("vae", 0, "WANCORE_VAE"), "start_image": ("image", 0, "IMAGE"),
              "clip_vision": ("clip", 0, "WANCORE_CLIP_VISION")}, column=1, group="2. Prompt & video"),
        *tail("dit", "i2v", sampler(40, 5.0, 3.0), 16, "WanCore/wan21_i2v"),
    ], note("Wan 2.1 I2V 14B 480P", [("diffusion_models", f), ("vae", VAE21),
                                     ("text_encoders", UMT5), ("clip_vision", CLIP)],
            ["Official settings: 40 steps, cfg 5, shift 3.0 for 480P (5.0 for the 720P model).",
             "The image is resized to cover 832x480 and centre-cropped."]))

    f = "wan2.1_flf2v_720p_14B_fp16.safetensors"
    out["wan21_flf2v_14B"] = build("wan21_flf2v_14B", "Wan 2.1 first-last frame to video 14B", [
        *loaders([("dit", f)], VAE21, clip=True),
        Node("image", "LoadImage", ["start.png", "image"], column=1, group="2. Prompt & video",
             title="Start frame"),
        Node("end", "LoadImage", ["end.png", "image"], column=1, group="2. Prompt & video",
             title="End frame"),
        text("A small bird takes off from a branch and flies towards the camera."),
        Node("i2v", "WanCoreImageToVideo", [1280, 720, 81, "i2v"],
             {"vae": ("vae", 0, "WANCORE_VAE"), "start_image": ("image", 0, "IMAGE"),
              "end_image": ("end", 0, "IMAGE"), "clip_vision": ("clip", 0, "WANCORE_CLIP_VISION")},
             column=1, group="2. Prompt & video"),
        *tail("dit", "i2v", sampler(50, 5.0, 16.0), 16, "WanCore/wan21_flf2v"),
    ], note("Wan 2.1 FLF2V 14B (720P)", [("diffusion_models", f), ("vae", VAE21),
                                         ("text_encoders", UMT5), ("clip_vision", CLIP)],
            ["Official settings: 1280x720, 81 frames, 50 steps, cfg 5, shift 16."]))

    hi, lo = ("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
              "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors")
    out["wan22_t2v_A14B"] = build("wan22_t2v_A14B", "Wan 2.2 text to video A14B (MoE)", [
        *loaders([("high", hi), ("low", lo)], VAE21),
        Node("moe", "WanCoreMoE", [0.875, 4.0, 3.0],
             {"high_noise_model": ("high", 0, "WANCORE_MODEL"),
              "low_noise_model": ("low", 0, "WANCORE_MODEL")}, column=2, group="3. Sample"),
        text("A red fox runs through fresh snow in a birch forest, slow motion, golden hour."),
        Node("video", "WanCoreEmptyVideo", [1280, 720, 81], column=1, group="2. Prompt & video"),
        step_cache("moe"),
        *tail("cache", "video", sampler(40, 4.0, 12.0), 16, "WanCore/wan22_t2v"),
    ], note("Wan 2.2 T2V A14B", [("diffusion_models", hi), ("diffusion_models", lo),
                                 ("vae", VAE21), ("text_encoders", UMT5)],
            ["One sampler runs both experts: high-noise while t >= 875, then low-noise; only "
             "the active expert stays on the GPU.",
             "Official settings: 40 steps, shift 12, cfg 4.0 (high) / 3.0 (low).",
             "The MoE node's cfg values are used; the sampler's cfg is ignored for MoE.",
             CACHE_TIP]))

    hi, lo = ("wan2.2_i2v_high_noise_14B_fp16.safetensors",
              "wan2.2_i2v_low_noise_14B_fp16.safetensors")
    out["wan22_i2v_A14B"] = build("wan22_i2v_A14B", "Wan 2.2 image to video A14B (MoE)", [
        *loaders([("high", hi), ("low", lo)], VAE21),
        Node("moe", "WanCoreMoE", [0.9, 3.5, 3.5],
             {"high_noise_model": ("high", 0, "WANCORE_MODEL"),
              "low_noise_model": ("low", 0, "WANCORE_MODEL")}, column=2, group="3. Sample"),
        Node("image", "LoadImage", ["example.png", "image"], column=1, group="2. Prompt & video"),
        text("The woman in the picture smiles and waves at the camera."),
        Node("i2v", "WanCoreImageToVideo", [1280, 720, 81, "i2v"],
             {"vae": ("vae", 0, "WANCORE_VAE"), "start_image": ("image", 0, "IMAGE")},
             column=1, group="2. Prompt & video"),
        *tail("moe", "i2v", sampler(40, 3.5, 5.0), 16, "WanCore/wan22_i2v"),
    ], note("Wan 2.2 I2V A14B", [("diffusion_models", hi), ("diffusion_models", lo),
                                 ("vae", VAE21), ("text_encoders", UMT5)],
            ["No CLIP vision needed for Wan 2.2.",
             "Official settings: 40 steps, shift 5, cfg 3.5 / 3.5, boundary 0.900."]))

    f = "wan2.2_ti2v_5B_fp16.safetensors"
    out["wan22_ti2v_5B"] = build("wan22_ti2v_5B", "Wan 2.2 text-image to video 5B", [
        *loaders([("dit", f)], VAE22),
        Node("image", "LoadImage", ["example.png", "image"], column=1, group="2. Prompt & video"),
        text("A paper boat drifts down a rain-soaked street, reflections of neon lights."),
        Node("i2v", "WanCoreImageToVideo", [1280, 704, 121, "ti2v"],
             {"vae": ("vae", 0, "WANCORE_VAE"), "start_image": ("image", 0, "IMAGE")},
             column=1, group="2. Prompt & video"),
        *tail("dit", "i2v", sampler(50, 5.0, 5.0), 24, "WanCore/wan22_ti2v"),
    ], note("Wan 2.2 TI2V 5B (720P, 24 fps)", [("diffusion_models", f), ("vae", VAE22),
                                               ("text_encoders", UMT5)],
            ["Uses the Wan 2.2 VAE (wan2.2_vae.safetensors): sizes are multiples of 32.",
             "Official settings: 1280x704, 121 frames at 24 fps, 50 steps, cfg 5, shift 5.",
             "For text-only generation replace WanCore Image To Video with WanCore Empty Video."]))
    hi, lo = ("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
              "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors")
    lhi, llo = ("wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors",
                "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors")
    out["wan22_t2v_A14B_4step_lora"] = build(
        "wan22_t2v_A14B_4step_lora", "Wan 2.2 text to video A14B in 4 steps (distilled LoRAs)", [
            *loaders([("high", hi), ("low", lo)], VAE21),
            lora("lora_high", "high", lhi, "High-noise 4-step LoRA"),
            lora("lora_low", "low", llo, "Low-noise 4-step LoRA"),
            Node("moe", "WanCoreMoE", [0.875, 1.0, 1.0],
                 {"high_noise_model": ("lora_high", 0, "WANCORE_MODEL"),
                  "low_noise_model": ("lora_low", 0, "WANCORE_MODEL")}, column=2,
                 group="3. Sample"),
            text("A red fox runs through fresh snow in a birch forest, slow motion, golden hour."),
            Node("video", "WanCoreEmptyVideo", [1280, 720, 81], column=1, group="2. Prompt & video"),
            *tail("moe", "video", sampler(**DISTILLED), 16, "WanCore/wan22_t2v_4step"),
        ], note("Wan 2.2 T2V A14B, 4 steps (LightX2V / Lightning LoRAs)",
                [("diffusion_models", hi), ("diffusion_models", lo), ("loras", lhi),
                 ("loras", llo), ("vae", VAE21), ("text_encoders", UMT5)],
                ["A step- and CFG-distilled LoRA per expert: 4 steps at cfg 1 instead of 40 at "
                 "cfg 4 / 3 (20x fewer model evaluations).",
                 "Sampler settings the LoRAs were trained with: solver 'distilled', 4 steps, "
                 "cfg 1 (MoE cfg 1 / 1), shift 5; the experts switch after step 2.",
                 "Any Wan 2.2 A14B 4-step pair works (Wan2.2-Lightning, LightX2V); fp8 models "
                 "keep the full LoRA effect."]))

    f = "wan2.1_i2v_480p_14B_bf16.safetensors"
    lf = "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors"
    out["wan21_i2v_14B_480p_4step_lora"] = build(
        "wan21_i2v_14B_480p_4step_lora", "Wan 2.1 image to video 14B 480P in 4 steps (LightX2V)", [
            *loaders([("dit", f)], VAE21, clip=True),
            lora("lora", "dit", lf, "LightX2V 4-step LoRA", column=2),
            Node("image", "LoadImage", ["example.png", "image"], column=1, group="2. Prompt & video"),
            text("The cat in the picture turns its head and looks at the camera."),
            Node("i2v", "WanCoreImageToVideo", [832, 480, 81, "i2v"],
                 {"vae": ("vae", 0, "WANCORE_VAE"), "start_image": ("image", 0, "IMAGE"),
                  "clip_vision": ("clip", 0, "WANCORE_CLIP_VISION")}, column=1,
                 group="2. Prompt & video"),
            *tail("lora", "i2v", sampler(**DISTILLED), 16, "WanCore/wan21_i2v_4step"),
        ], note("Wan 2.1 I2V 14B 480P, 4 steps (LightX2V LoRA)",
                [("diffusion_models", f), ("loras", lf), ("vae", VAE21),
                 ("text_encoders", UMT5), ("clip_vision", CLIP)],
                ["LightX2V's StepDistill-CfgDistill LoRA: 4 steps at cfg 1 instead of 40 at "
                 "cfg 5 (20x fewer model evaluations).",
                 "Sampler settings it was trained with: solver 'distilled', 4 steps, cfg 1, "
                 "shift 5.",
                 "Any rank of the LightX2V re-extractions (4 to 256) works."]))

    out["wancore_demo_t2v"] = build("wancore_demo_t2v", "WanCore demo: tiny text to video (CPU)", [
        *loaders([("dit", f"{DEMO}/dit_t2v.safetensors")], f"{DEMO}/vae.safetensors",
                 text_encoder=f"{DEMO}/text_encoder.safetensors"),
        text("a green square moving up on a black background", negative=""),
        Node("video", "WanCoreEmptyVideo", [64, 64, 17], column=1, group="2. Prompt & video"),
        *tail("dit", "video", sampler(20, 4.0, 3.0, seed=0), 8, "WanCore/demo"),
    ], note("WanCore demo (embedded, no download)", [],
            ["Runs on any CPU in seconds: the tiny model shipped inside the pack "
             "(`wancore-demo/...` in the loader lists, no files to download).",
             "It knows one shape (circle, square, triangle) in red, green, blue, yellow, white "
             "or purple, moving left, right, up or down on a black, gray, white or blue "
             "background, at 64x64: prompts like 'a red circle moving left on a blue "
             "background'.",
             "Settings it was trained for: 64x64, 17 frames, 20 steps, cfg 4, shift 3, "
             "empty negative prompt, 8 fps.",
             "Its quality is limited (see training/TRAINING.md)."]))
    caption = "a red circle moving right on a blue background"
    out["wancore_demo_i2v"] = build("wancore_demo_i2v", "WanCore demo: tiny image to video (CPU)", [
        *loaders([("dit", f"{DEMO}/dit_i2v.safetensors")], f"{DEMO}/vae.safetensors",
                 text_encoder=f"{DEMO}/text_encoder.safetensors"),
        Node("image", "WanCoreDemoFirstFrame", [caption, 0, 64], column=1,
             group="2. Prompt & video"),
        text(caption, negative=""),
        Node("i2v", "WanCoreImageToVideo", [64, 64, 17, "i2v"],
             {"vae": ("vae", 0, "WANCORE_VAE"), "start_image": ("image", 0, "IMAGE")},
             column=1, group="2. Prompt & video"),
        *tail("dit", "i2v", sampler(20, 4.0, 3.0, seed=0), 8, "WanCore/demo"),
    ], note("WanCore demo: image to video (embedded, no download)", [],
            ["Runs on any CPU in seconds: the tiny I2V model shipped inside the pack "
             "(`wancore-demo/...` in the loader lists, no files to download).",
             "WanCore Demo First Frame draws the start image from a caption; give the prompt "
             "the same caption. Or load your own 64x64 image of one plain shape on a plain "
             "background.",
             "It knows one shape (circle, square, triangle) in red, green, blue, yellow, white "
             "or purple, moving left, right, up or down on a black, gray, white or blue "
             "background.",
             "Settings it was trained for: 64x64, 17 frames, 20 steps, cfg 4, shift 3, "
             "empty negative prompt, 8 fps.",
             "Its quality is limited (see training/TRAINING.md)."]))
    out["wancore_demo_t2v_fast"] = build(
        "wancore_demo_t2v_fast", "WanCore demo: tiny text to video in 4 steps (CPU)", [
            *loaders([("dit", f"{DEMO}/dit_t2v.safetensors")], f"{DEMO}/vae.safetensors",
                     text_encoder=f"{DEMO}/text_encoder.safetensors"),
            lora("lora", "dit", f"{DEMO}/fast_lora.safetensors", "Demo 4-step LoRA", column=2),
            text("a green square moving up on a black background", negative=""),
            Node("video", "WanCoreEmptyVideo", [64, 64, 17], column=1, group="2. Prompt & video"),
            *tail("lora", "video", sampler(**DISTILLED, seed=0), 8, "WanCore/demo_fast"),
        ], note("WanCore demo in 4 steps (embedded, no download)", [],
                ["The tiny demo T2V with its step-distilled LoRA (shipped in the pack): 4 "
                 "steps, cfg 1, the 'distilled' solver, shift 5, like the LightX2V / Lightning "
                 "LoRAs of the real models.",
                 "Prompts like 'a red circle moving left on a blue background' (see the other "
                 "demo workflow's note for the vocabulary).",
                 "Set the LoRA strength to 0 to see what the base model does in 4 steps "
                 "without CFG."]))
    demo_caption = "a yellow circle moving right on a blue background"
    demo_loaders = loaders([("dit", f"{DEMO}/dit_t2v.safetensors")], f"{DEMO}/vae.safetensors",
                           text_encoder=f"{DEMO}/text_encoder.safetensors")
    demo_loaders[0].widgets[-1] = f"{DEMO}/vace_module.safetensors"
    out["wancore_demo_vace"] = build(
        "wancore_demo_vace", "WanCore demo: the object follows a control path (VACE, CPU)", [
            *demo_loaders,
            load_image("control", "wancore_demo_path.webp", "Control: the path to follow"),
            text(demo_caption, negative="", column=2),
            Node("vace", "WanCoreVACE", [64, 64, 17, 1.0],
                 {"vae": ("vae", 0, "WANCORE_VAE"), "control_video": ("control", 0, "IMAGE")},
                 column=2, group="2. Prompt & video"),
            *tail("dit", "vace", sampler(20, 4.0, 3.0, seed=0), 8, "WanCore/demo_vace",
                  column=3),
        ], note("WanCore demo: VACE control path (embedded, no download)", [],
                ["The tiny demo T2V with its VACE module (both shipped in the pack: the loader's "
                 "vace_module is wancore-demo/vace_module.safetensors): the object follows the "
                 "white silhouette of the control clip, a path the text model never makes "
                 "(here a curve); the prompt still sets its colour, shape and background.",
                 "Other paths: `python -m wan_core demo --task vace --path "
                 "diagonal|curve|stop|turn|x,y:x,y...`, or draw a white shape on black "
                 "yourself (64x64, 17 frames) and load it here.",
                 "Held-out paths: 1.5 px mean centroid error per frame (the plain T2V: 18 px)."],
                inputs=[("wancore_demo_path.webp", "a white disc on black along a curve, 17 "
                                                   "frames at 64x64")]))
    out.update(vace_workflows())
    out.update(long_video_workflows())
    return out


VACE13 = "wan2.1_vace_1.3B_fp16.safetensors"
VACE14 = "wan2.1_vace_14B_fp16.safetensors"
VACE_MODULE = "Wan2_1-VACE_module_1_3B_bf16.safetensors"
VACE_TIPS = [
    "Official VACE settings: 832x480 (1.3B; 1280x720 for the 14B file "
    f"`{VACE14}`), 81 frames at 16 fps, 50 steps, cfg 5, shift 16.",
    f"Instead of a whole VACE file: load `wan2.1_t2v_1.3B_bf16.safetensors` and set the "
    f"loader's vace_module to a VACE module file such as `{VACE_MODULE}` (also in "
    "models/diffusion_models).",
    "Chain WanCore VACE nodes (video_cond into the next one's video_cond) to combine controls, "
    "e.g. a pose clip and a reference image; their effects add up.",
]
CLIP_TIP = ("Load Image reads every frame of an animated WebP / GIF as one batch (for an mp4 use "
            "a video loader node, e.g. Load Video + Get Video Components, or VideoHelperSuite's "
            "Load Video). A clip needs at least `frames` frames (extra ones are dropped) and is "
            "resized to cover the video size. The example clips are 208x120 to keep the pack "
            "small: your own 832x480 clips give sharper results.")
MASK_TIP = ("Masks: white = generate, black = keep the control video. Convert Image to Mask "
            "(channel red) reads a black-and-white mask clip; a single mask image stands for "
            "every frame.")


def vace_node(inputs, column=2):
    return Node("vace", "WanCoreVACE", [832, 480, 81, 1.0],
                {"vae": ("vae", 0, "WANCORE_VAE"), **inputs}, column=column,
                group="2. Prompt & video")


def load_image(key, file, title):
    return Node(key, "LoadImage", [file, "image"], column=1, group="2. Prompt & video",
                title=title)


def image_to_mask(key, image_key):
    return Node(key, "ImageToMask", ["red"], {"image": (image_key, 0, "IMAGE")}, column=1,
                group="2. Prompt & video", title="Mask (white = generate)")


def vace_workflow(name, title, inputs_nodes, cond_inputs, prompt, note_title, input_files, tips,
                  prefix):
    return build(name, title, [
        *loaders([("dit", VACE13)], VAE21),
        *inputs_nodes,
        text(prompt, column=2),
        vace_node(cond_inputs),
        *tail("dit", "vace", sampler(50, 5.0, 16.0), 16, prefix, column=3),
    ], note(note_title, [("diffusion_models", VACE13), ("vae", VAE21), ("text_encoders", UMT5)],
            tips + VACE_TIPS, inputs=input_files))


def vace_workflows() -> dict:
    """Wan 2.1 VACE 1.3B: reference image, control video, inpaint, outpaint and extend, on the
    input files of tools/make_vace_inputs.py."""
    out = {}
    out["wan21_vace_reference_to_video"] = vace_workflow(
        "wan21_vace_reference_to_video", "Wan 2.1 VACE 1.3B: reference image to video",
        [load_image("ref", "vace_reference.png", "Reference image")],
        {"reference_images": ("ref", 0, "IMAGE")},
        "A small red toy robot with round eyes, an antenna and a yellow chest panel walks across "
        "a wooden desk next to a laptop, warm lamp light, shallow depth of field.",
        "Wan 2.1 VACE 1.3B: reference image to video",
        [("vace_reference.png", "a red toy robot on white")],
        ["The video shows the subject of the reference image; the prompt says what it does. "
         "A subject on a plain white background works best (the image is fitted into the frame "
         "on white).",
         "Several references (a person and an object): join them with Batch Images into "
         "reference_images (at most one per 4 frames).",
         "The reference frames are sampled in front of the video and the sampler drops them "
         "itself: the result has exactly `frames` frames.",
         "No control video or mask: the whole video is generated. Add a control video (pose, "
         "depth) to the same node to also steer the motion."],
        "WanCore/wan21_vace_r2v")

    out["wan21_vace_control_video"] = vace_workflow(
        "wan21_vace_control_video", "Wan 2.1 VACE 1.3B: follow a control video (depth / pose)",
        [load_image("control", "vace_depth.webp", "Control video (depth)")],
        {"control_video": ("control", 0, "IMAGE")},
        "A glossy orange basketball bounces across the polished wooden floor of an empty gym, "
        "realistic, soft daylight from high windows.",
        "Wan 2.1 VACE 1.3B: control video (depth, pose, edges)",
        [("vace_depth.webp", "81 frames of a depth-like clip (near = bright): a ball bouncing "
                             "across a floor"),
         ("vace_pose.webp", "81 frames of a pose clip (a stick figure walking); load it instead "
                            "with a prompt like 'A man in a red jacket walks along a beach at "
                            "sunset'")],
        ["The video follows the control clip's layout and motion; the prompt gives the look. "
         "Make control clips from your own videos with a depth, pose or edge preprocessor node "
         "pack (Depth Anything, DWPose, Canny).",
         "No mask: the whole video is generated (the control is followed, not kept).",
         "strength 1.0 is official; lower it (0.5-0.8) to follow the control more loosely.",
         CLIP_TIP],
        "WanCore/wan21_vace_control")

    out["wan21_vace_inpaint"] = vace_workflow(
        "wan21_vace_inpaint", "Wan 2.1 VACE 1.3B: inpaint a masked region of a clip",
        [load_image("clip", "vace_clip.webp", "Video to edit"),
         load_image("mask_clip", "vace_inpaint_mask.webp", "Mask clip (white = repaint)"),
         image_to_mask("mask", "mask_clip")],
        {"control_video": ("clip", 0, "IMAGE"), "control_masks": ("mask", 0, "MASK")},
        "A small white rabbit hops across a green meadow under a clear blue sky, a tree and the "
        "sun in the background, cartoon style.",
        "Wan 2.1 VACE 1.3B: inpaint (repaint a masked region)",
        [("vace_clip.webp", "81 frames: a red ball rolling over a meadow"),
         ("vace_inpaint_mask.webp", "81 frames: a white disc around the ball on black")],
        ["The white part of the mask is repainted to match the prompt; the black part keeps the "
         "clip. Describe the whole scene as it should look.",
         "Make the mask a little larger than the object (VACE works on 8x8-pixel blocks); a "
         "mask clip that follows the object (e.g. from a segmentation node) replaces it in "
         "every frame.",
         MASK_TIP, CLIP_TIP],
        "WanCore/wan21_vace_inpaint")

    out["wan21_vace_outpaint"] = vace_workflow(
        "wan21_vace_outpaint", "Wan 2.1 VACE 1.3B: outpaint (extend the canvas of a clip)",
        [load_image("clip", "vace_clip.webp", "Video to extend outwards"),
         Node("pad", "ImagePadForOutpaint", [56, 32, 56, 32, 0], {"image": ("clip", 0, "IMAGE")},
              column=1, group="2. Prompt & video", title="Pad (grey border, mask white)")],
        {"control_video": ("pad", 0, "IMAGE"), "control_masks": ("pad", 1, "MASK")},
        "A red ball rolls across a wide green meadow with trees, bushes and flowers under a "
        "blue summer sky, wide shot, cartoon style.",
        "Wan 2.1 VACE 1.3B: outpaint (a wider view of a clip)",
        [("vace_clip.webp", "81 frames: a red ball rolling over a meadow")],
        ["Pad Image for Outpainting puts the clip in the middle of a grey (0.5) canvas and "
         "gives the mask: white on the new border (generated), black on the clip (kept).",
         "Pad so that the padded clip has the video's aspect ratio: 208x120 plus 56 / 32 "
         "pixels per side is 320x184, close to 832x480 (it is resized to cover the video size "
         "and centre-cropped). Padding only some sides extends the view that way.",
         "feathering 0 keeps the mask's edge hard (VACE blends the seam itself).",
         CLIP_TIP],
        "WanCore/wan21_vace_outpaint")

    out["wan21_vace_extend"] = vace_workflow(
        "wan21_vace_extend", "Wan 2.1 VACE 1.3B: extend a clip (continue its first frames)",
        [load_image("clip", "vace_extend_clip.webp", "Known frames, then grey"),
         load_image("mask_clip", "vace_extend_mask.webp", "Mask clip (white = generate)"),
         image_to_mask("mask", "mask_clip")],
        {"control_video": ("clip", 0, "IMAGE"), "control_masks": ("mask", 0, "MASK")},
        "A red ball bounces across a green meadow from left to right under a clear blue sky, "
        "past a tree, the sun shining, cartoon style.",
        "Wan 2.1 VACE 1.3B: extend a clip (video continuation)",
        [("vace_extend_clip.webp", "81 frames: the first 17 of a red ball rolling over a "
                                   "meadow, then grey"),
         ("vace_extend_mask.webp", "81 frames: black for the 17 known frames, white after")],
        ["The known frames are kept and the grey frames after them are generated to continue "
         "the clip. The output's first 17 frames repeat the given ones: drop them when you "
         "join the result to your clip.",
         "For your clip: its last frames followed by grey (128, 128, 128) frames up to 81, and "
         "a mask clip black for the known frames and white after. Known frames anywhere work "
         "the same way: at the end to extend backwards, first and last to fill the middle.",
         MASK_TIP, CLIP_TIP],
        "WanCore/wan21_vace_extend")
    return out


V2V_CLIP_TIP = ("Load Image reads every frame of an animated WebP / GIF as one batch (for an mp4 "
                "use a video loader node, e.g. Load Video + Get Video Components, or "
                "VideoHelperSuite's Load Video). The example clip is 208x120 to keep the pack "
                "small: your own 832x480 clips give sharper results.")


def long_video_workflows() -> dict:
    """Video-to-video, extension and context windows (README: Long videos and video-to-video)."""
    out = {}
    f = "wan2.1_t2v_1.3B_bf16.safetensors"
    out["wan21_v2v_restyle"] = build(
        "wan21_v2v_restyle", "Wan 2.1 T2V 1.3B: restyle a clip (video to video)", [
            *loaders([("dit", f)], VAE21),
            load_image("clip", "vace_clip.webp", "Video to restyle"),
            Node("frames", "ImageFromBatch", [0, 81], {"image": ("clip", 0, "IMAGE")},
                 column=1, group="2. Prompt & video", title="Frames to restyle (4n+1)"),
            Node("scale", "ImageScale", ["bilinear", 832, 480, "center"],
                 {"image": ("frames", 0, "IMAGE")}, column=1, group="2. Prompt & video",
                 title="Scale to the video size"),
            Node("encode", "WanCoreVAEEncode", ["auto", 256],
                 {"vae": ("vae", 0, "WANCORE_VAE"), "images": ("scale", 0, "IMAGE")},
                 column=2, group="2. Prompt & video"),
            text("A red ball rolls across a snowy meadow under a grey winter sky, a bare tree "
                 "in the background, soft watercolour painting.", column=2),
            Node("video", "WanCoreEmptyVideo", [832, 480, 81], column=2,
                 group="2. Prompt & video", title="Video settings (= the clip's)"),
            *tail("dit", "video", sampler(50, 5.0, 5.0, denoise=0.6), 16, "WanCore/wan21_v2v",
                  column=3, latent_key="encode"),
        ], note("Wan 2.1 T2V 1.3B: video to video (restyle a clip)",
                [("diffusion_models", f), ("vae", VAE21), ("text_encoders", UMT5)],
                ["WanCore VAE Encode turns the clip into a latent; the sampler noises it to "
                 "`denoise` and samples from there with the prompt: the layout and motion come "
                 "from the clip, the look from the prompt. Describe the whole scene as it "
                 "should look.",
                 "denoise follows ComfyUI's KSampler rule: the last `steps` steps of an "
                 "int(steps / denoise)-step schedule (here 50 of 83), starting at about "
                 "shift x d / (1 + (shift - 1) x d) of the noise (shift 5: 0.3 starts at 0.68, "
                 "0.6 at 0.88). About 0.3 keeps the layout closely; 0.6 restyles freely and "
                 "keeps the rough motion; 1 ignores the clip; 0 runs no step and gives back "
                 "the VAE's reconstruction of the clip.",
                 "WanCore Empty Video must have the clip's size and frame count (832x480, 81 "
                 "here). VAE Encode needs 4n+1 frames: Image From Batch picks them "
                 "(batch_index = first frame, length = how many) from a longer clip.",
                 "Upscale Image brings the clip to the video size: the 208x120 example 4x to "
                 "832x480; crop center fills the frame with clips of another aspect ratio.",
                 "Official T2V 1.3B settings: 832x480, 50 steps, cfg 5, shift 5, 16 fps.",
                 V2V_CLIP_TIP],
                inputs=[("vace_clip.webp", "81 frames: a red ball rolling over a meadow "
                                           "(the VACE examples' clip)")]))

    f = "wan2.1_i2v_480p_14B_bf16.safetensors"
    out["wan21_extend_clip"] = build(
        "wan21_extend_clip", "Wan 2.1 I2V 14B 480P: a clip extended three times", [
            *loaders([("dit", f)], VAE21, clip=True),
            Node("image", "LoadImage", ["example.png", "image"], column=1,
                 group="2. Prompt & video", title="Start image"),
            text("The cat in the picture gets up and walks slowly along the garden path, the "
                 "camera follows it."),
            Node("i2v", "WanCoreImageToVideo", [832, 480, 81, "i2v"],
                 {"vae": ("vae", 0, "WANCORE_VAE"), "start_image": ("image", 0, "IMAGE"),
                  "clip_vision": ("clip", 0, "WANCORE_CLIP_VISION")}, column=1,
                 group="2. Prompt & video"),
            Node("sampler", "WanCoreSampler", sampler(40, 5.0, 3.0),
                 {"model": ("dit", 0, "WANCORE_MODEL"),
                  "text_embeds": ("text", 0, "WANCORE_TEXT_EMBEDS"),
                  "video_cond": ("i2v", 0, "WANCORE_VIDEO_COND")}, column=2,
                 group="3. Sample the first clip"),
            Node("decode", "WanCoreVAEDecode", ["auto", 256],
                 {"vae": ("vae", 0, "WANCORE_VAE"), "latent": ("sampler", 0, "LATENT")},
                 column=3, group="3. Sample the first clip"),
            Node("extend", "WanCoreExtendVideo",
                 [3, 1, 81, 43, "fixed", 40, 5.0, 3.0, "unipc", True],
                 {"model": ("dit", 0, "WANCORE_MODEL"), "vae": ("vae", 0, "WANCORE_VAE"),
                  "text_embeds": ("text", 0, "WANCORE_TEXT_EMBEDS"),
                  "video": ("decode", 0, "IMAGE"),
                  "clip_vision": ("clip", 0, "WANCORE_CLIP_VISION")}, column=4,
                 group="4. Extend (3 segments)"),
            Node("save", "WanCoreSaveVideo", [16.0, "mp4", "WanCore/wan21_extend", 19],
                 {"images": ("extend", 0, "IMAGE")}, column=5, group="5. Output"),
        ], note("Wan 2.1 I2V 14B 480P: extend a clip (long video)",
                [("diffusion_models", f), ("vae", VAE21), ("text_encoders", UMT5),
                 ("clip_vision", CLIP)],
                ["The first clip is an ordinary I2V generation; WanCore Extend Video then "
                 "appends 3 segments, each an I2V generation that starts on the clip's last "
                 "frame. A segment's first frame stands for the given one and is dropped: each "
                 "adds 81 - 1 = 80 frames, 81 + 3 x 80 = 321 frames in all (20 s at 16 fps).",
                 "overlap_frames 1 is exactly the official I2V conditioning. A larger overlap "
                 "(5 or 9) marks the clip's last frames as given and shows the model the motion "
                 "so far (smaller seams on the demo model); each segment then adds 81 - overlap "
                 "frames.",
                 "colour_match (on): a segment can come out slightly brighter, darker or "
                 "tinted, and this adds up over segments; the drift is measured over the "
                 "overlap (mean and contrast per channel) and corrected on the whole segment.",
                 "Official I2V 480P settings for the clip and every segment: 832x480, 81 "
                 "frames, 40 steps, cfg 5, shift 3. Segment k uses the node's seed + k "
                 "(43, 44, 45 here).",
                 "One segment is generated at a time: memory stays that of one 81-frame I2V "
                 "run, time grows with the segments.",
                 "A prompt per segment: chain Extend Video nodes (images into the next one's "
                 "video), each with its own Text Encode. end_image: the last segment ends on "
                 "that image.",
                 "To extend your own clip, connect it (Load Image reads an animated WebP; or a "
                 "video loader node) to video instead of the decoded first clip: its size is "
                 "every segment's size (832x480 for this model).",
                 "Wan 2.2 I2V A14B: load its two experts and WanCore MoE as in "
                 "`wan22_i2v_A14B`, connect the MoE to model and leave clip_vision empty "
                 "(shift 5, cfg 3.5)."]))

    f = "wan2.1_t2v_1.3B_bf16.safetensors"
    out["wan21_t2v_long_context_windows"] = build(
        "wan21_t2v_long_context_windows",
        "Wan 2.1 T2V 1.3B: a 241-frame video in context windows", [
            *loaders([("dit", f)], VAE21),
            text("A drone flies slowly along a winding river through an autumn forest, "
                 "golden evening light, realistic, smooth camera motion."),
            Node("video", "WanCoreEmptyVideo", [832, 480, 241], column=1,
                 group="2. Prompt & video"),
            Node("windows", "WanCoreContextWindows", [81, 16, "static", "linear"],
                 {"model": ("dit", 0, "WANCORE_MODEL")}, column=2, group="3. Sample"),
            *tail("windows", "video", sampler(50, 5.0, 5.0), 16, "WanCore/wan21_t2v_long"),
        ], note("Wan 2.1 T2V 1.3B: a long video in context windows",
                [("diffusion_models", f), ("vae", VAE21), ("text_encoders", UMT5)],
                ["241 frames (15 s at 16 fps) are sampled as overlapping 81-frame windows, the "
                 "model's length, here 4: at every step each window is evaluated as a clip of "
                 "its own and the windows' results are blended where they overlap (16 frames or "
                 "more: the first window starts at frame 0, the last ends at the last frame).",
                 "Memory is that of one window: only one window is in the model at a time "
                 "(measured: 1.08x one 81-frame window's peak for 241 frames, against 2.75x in "
                 "one pass). Time: about 4x an 81-frame run (4 windows every step).",
                 "schedule uniform moves the inner windows by half a stride every other step, "
                 "so no seam stays at one frame (not with the step cache); blend pyramid "
                 "weights each window by its distance to the window's centre. More "
                 "context_overlap (a multiple of 4) = smoother seams, more windows.",
                 "Every window gets the same prompt: describe something that can go on for the "
                 "whole video (a walk, a drive, a flight).",
                 "Also with Wan 2.2 A14B pairs (after WanCore MoE), LoRAs, VACE and the step "
                 "cache (one cache state per window). Frames: 4n+1.",
                 "Official T2V 1.3B settings: 832x480, 50 steps, cfg 5, shift 5, 16 fps."]))
    return out


PACK = _pack_nodes()


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, workflow in workflows().items():
        (OUT / f"{name}.json").write_text(json.dumps(workflow, indent=1, ensure_ascii=False) + "\n")
        print("wrote", OUT / f"{name}.json")


if __name__ == "__main__":
    main()
