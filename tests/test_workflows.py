"""Example workflows run end to end on tiny checkpoints, and released workflows stay loadable.

Shared workflows are a public contract: ``tests/workflow_contract/`` keeps a frozen copy of
each example workflow as first released. Node ids, socket names/types/order and the meaning of
every stored widget value must keep working for those files; a deliberate change needs a
migration (ComfyUI restores widget values by position).
"""
import json
import shutil

import numpy as np
import pytest

from tests.conftest import ROOT, load_pack
from tests.workflow_runner import SMALL, run_workflow

EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))
FROZEN = sorted((ROOT / "tests" / "workflow_contract").glob("wan*.json"))
INPUTS = ROOT / "example_workflows" / "inputs"       # tools/make_vace_inputs.py
VACE = ["wan21_vace_reference_to_video", "wan21_vace_control_video", "wan21_vace_inpaint",
        "wan21_vace_outpaint", "wan21_vace_extend"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from PIL import Image

    from tests.tiny_models import write_models

    root = tmp_path_factory.mktemp("comfy")
    write_models(root / "models")
    (root / "input").mkdir()
    rng = np.random.default_rng(0)
    for name in ("example.png", "start.png", "end.png"):
        Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(root / "input" / name)
    for path in INPUTS.iterdir():          # what the README says to copy into ComfyUI/input
        shutil.copy(path, root / "input" / path.name)
    return root


def test_every_task_has_an_example():
    names = {p.stem for p in EXAMPLES}
    assert {"wan21_t2v_1.3B", "wan21_i2v_14B_480p", "wan21_flf2v_14B", "wan22_t2v_A14B",
            "wan22_i2v_A14B", "wan22_ti2v_5B", *VACE} <= names


def _small_frames(workflow: dict) -> int:
    """Frames of the saved video under SMALL: 9, plus what each WanCore Extend Video adds."""
    from comfyui_wancore_pack.nodes.schema import widget_kwargs

    pack = load_pack()
    frames = SMALL["frames"]
    for node in workflow["nodes"]:
        if node["type"] == "WanCoreExtendVideo":
            w = widget_kwargs(pack.NODE_CLASS_MAPPINGS[node["type"]], node["widgets_values"])
            frames += w["segments"] * (SMALL["frames_per_segment"] - w["overlap_frames"])
    return frames


def _saved_video(results, output_dir):
    from wan_core.video_io import read_video

    saved = [ui for key, ui in results.items() if isinstance(key, tuple) and ui and
             "wancore_video" in ui]
    assert len(saved) == 1, results.keys()
    info = saved[0]["wancore_video"][0]
    frames, fps = read_video(output_dir / info["subfolder"] / info["filename"])
    return frames


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_workflow_runs_to_a_video(path, folders, tmp_path):
    results = run_workflow(path, folders / "models", folders / "input", tmp_path, SMALL)
    frames = _saved_video(results, tmp_path)
    assert frames.shape == (_small_frames(json.loads(path.read_text())), 64, 64, 3)
    assert np.isfinite(frames).all() and frames.std() > 0


def _layout(pack, node_type):
    from comfyui_wancore_pack.nodes.schema import sockets_and_widgets

    return sockets_and_widgets(pack.NODE_CLASS_MAPPINGS[node_type])


@pytest.mark.parametrize("path", FROZEN, ids=lambda p: p.stem)
def test_released_workflow_still_means_the_same(path, folders, monkeypatch):
    """Every node type still exists; every linked socket keeps its index, name and type; every
    stored widget value still lands on a widget of the same name and is valid there (model
    names against a models folder that has the files the workflows name)."""
    monkeypatch.setenv("WANCORE_MODELS_DIR", str(folders / "models"))
    pack = load_pack()
    from comfyui_wancore_pack.nodes.schema import validate_widget, widget_kwargs

    workflow = json.loads(path.read_text())
    frozen_names = json.loads((path.parent / "widget_names.json").read_text())
    for node in workflow["nodes"]:
        if not node["type"].startswith("WanCore"):
            continue
        assert node["type"] in pack.NODE_CLASS_MAPPINGS, f"node {node['type']} was removed"
        cls = pack.NODE_CLASS_MAPPINGS[node["type"]]
        sockets, widgets = _layout(pack, node["type"])
        for index, socket in enumerate(node["inputs"]):
            assert index < len(sockets) and sockets[index] == (socket["name"], socket["type"]), \
                f"{node['type']}: socket {index} was {socket['name']} ({socket['type']})"
        names = frozen_names[node["type"]]
        assert widgets[:len(names)] == names, \
            f"{node['type']}: widget order changed from {names} to {widgets}"
        for name, value in widget_kwargs(cls, node["widgets_values"]).items():
            validate_widget(cls, name, value)


def test_frozen_copies_cover_every_example():
    assert {p.name for p in FROZEN} >= {p.name for p in EXAMPLES}


def test_missing_model_file_and_bad_sizes_are_clear(folders, tmp_path, monkeypatch):
    pack = load_pack()
    monkeypatch.setenv("WANCORE_MODELS_DIR", str(folders / "models"))
    loader = pack.NODE_CLASS_MAPPINGS["WanCoreModelLoader"]()
    with pytest.raises(FileNotFoundError, match="models/diffusion_models"):
        loader.load("nope.safetensors")
    vae_loader = pack.NODE_CLASS_MAPPINGS["WanCoreVAELoader"]()
    with pytest.raises(ValueError, match="is a Wan diffusion model"):
        vae_loader.load("../diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors")
    vae = vae_loader.load("wan_2.1_vae.safetensors")["result"][0]
    i2v = pack.NODE_CLASS_MAPPINGS["WanCoreImageToVideo"]()
    import torch
    with pytest.raises(ValueError, match="frames must be 4n\\+1.*use 77 or 81"):
        i2v.build(vae, torch.rand(1, 64, 64, 3), 832, 480, 80)


def test_i2v_model_without_image_is_refused(folders, tmp_path):
    wf = json.loads((ROOT / "example_workflows" / "wan21_t2v_1.3B.json").read_text())
    for node in wf["nodes"]:
        if node["type"] == "WanCoreModelLoader":
            node["widgets_values"][0] = "wan2.1_i2v_480p_14B_bf16.safetensors"
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    with pytest.raises(ValueError, match="needs a start image"):
        run_workflow(path, folders / "models", folders / "input", tmp_path, SMALL)


def test_demo_first_frame_node_draws_the_clip_start_and_names_bad_captions():
    from training import dataset

    node = load_pack().NODE_CLASS_MAPPINGS["WanCoreDemoFirstFrame"]()
    caption = "a yellow triangle moving down on a gray background"
    (image,) = node.render(caption, placement_seed=3, size=64)
    video, _, _ = dataset.sample_clip(dataset.place(dataset.parse_caption(caption), 3))
    assert image.shape == (1, 64, 64, 3)
    assert np.allclose(image[0].numpy(), (video[:, 0].permute(1, 2, 0).numpy() + 1) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="unknown colour 'orange'.*known: red"):
        node.render("an orange circle moving left on a blue background")


# ------------------------------------------------------------------------------ VACE examples

def _load_image_values(path):
    return [n["widgets_values"][0] for n in json.loads(path.read_text())["nodes"]
            if n["type"] == "LoadImage"]


def test_vace_examples_use_the_shipped_inputs_and_their_notes_list_them():
    """Every file a VACE example loads is in example_workflows/inputs and named in its note;
    the inputs stay small (they ship with the pack)."""
    shipped = {p.name for p in INPUTS.iterdir()}
    used = set()
    for name in VACE:
        path = ROOT / "example_workflows" / f"{name}.json"
        (note,) = [n["widgets_values"][0] for n in json.loads(path.read_text())["nodes"]
                   if n["type"] == "MarkdownNote"]
        assert "ComfyUI/input" in note and "wan2.1_vace_1.3B_fp16.safetensors" in note
        for file in _load_image_values(path):
            assert file in shipped and f"`{file}`" in note, (name, file)
            used.add(file)
    demo = ROOT / "example_workflows" / "wancore_demo_vace.json"
    used |= set(_load_image_values(demo))                  # the demo's control path
    assert shipped == used | {"vace_pose.webp"}           # the pose clip: the depth one's twin
    assert sum(p.stat().st_size for p in INPUTS.iterdir()) < 300_000


def test_vace_inputs_are_what_the_script_draws():
    """The lossless files decode to the frames tools/make_vace_inputs.py draws (81 frames, no
    repeated frame merged away by the encoder), masks exactly black / white."""
    import importlib.util

    from tests.workflow_runner import LoadImageStandIn

    spec = importlib.util.spec_from_file_location("make_vace_inputs",
                                                  ROOT / "tools" / "make_vace_inputs.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    frames, masks = make.meadow_clip()
    grey = np.full_like(frames[0], make.GREY)
    black, white = np.zeros_like(grey), np.full_like(grey, 255)
    expected = {
        "vace_depth.webp": make.depth_clip(), "vace_pose.webp": make.pose_clip(),
        "vace_clip.webp": frames, "vace_inpaint_mask.webp": masks,
        "vace_extend_clip.webp": frames[:make.KEEP] + [grey] * (make.FRAMES - make.KEEP),
        "vace_extend_mask.webp": [black] * make.KEEP + [white] * (make.FRAMES - make.KEEP),
    }
    load = LoadImageStandIn(INPUTS)
    for name, drawn in expected.items():
        image, mask = load(name)
        assert image.shape == (81, 120, 208, 3), name
        assert mask.shape == (81, 64, 64) or not mask.any(), name     # opaque: no mask
        got = (image.numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(got, np.stack(make.distinct(drawn))), name
    image, _ = load("vace_reference.png")
    assert np.array_equal((image[0].numpy() * 255).round().astype(np.uint8),
                          make.reference_image())


def test_load_image_stand_in_reads_frames_and_alpha_as_comfyui(tmp_path):
    """All frames of an animated file in one batch; MASK = 1 - alpha; no alpha: 64x64 zeros."""
    from PIL import Image

    from tests.workflow_runner import LoadImageStandIn

    rgba = [np.full((6, 10, 4), (40 * i, 0, 0, 255), dtype=np.uint8) for i in range(3)]
    rgba[1][:, :5, 3] = 0                                  # left half transparent
    images = [Image.fromarray(f, "RGBA") for f in rgba]
    images[0].save(tmp_path / "a.webp", save_all=True, append_images=images[1:], lossless=True)
    image, mask = LoadImageStandIn(tmp_path)("a.webp", "image")
    assert image.shape == (3, 6, 10, 3) and mask.shape == (3, 6, 10)
    assert np.allclose(image[:, 0, 9, 0].numpy(), [0, 40 / 255, 80 / 255])
    assert mask[1, :, :5].eq(1).all() and mask[1, :, 5:].eq(0).all() and not mask[0].any()
    Image.fromarray(rgba[0][..., :3]).save(tmp_path / "b.png")
    image, mask = LoadImageStandIn(tmp_path)("b.png", "image")
    assert image.shape == (1, 6, 10, 3) and mask.shape == (1, 64, 64) and not mask.any()


def test_outpaint_pad_stand_in():
    from tests.workflow_runner import image_pad_for_outpaint

    image = _rand_image(2, 4, 6)
    canvas, mask = image_pad_for_outpaint(image, 3, 1, 2, 0, 0)
    assert canvas.shape == (2, 5, 11, 3) and mask.shape == (5, 11)
    assert canvas[:, 0].eq(0.5).all() and canvas[:, 1:, 3:9].equal(image)
    assert mask[1:, 3:9].eq(0).all() and mask.sum() == 5 * 11 - 4 * 6
    _, soft = image_pad_for_outpaint(_rand_image(1, 20, 20), 4, 0, 0, 0, 5)
    assert soft[0, 4] == 1 and 0 < soft[0, 5] < 1 and soft[0, 9:].eq(0).all()


def test_image_from_batch_and_scale_stand_ins():
    """ImageFromBatch clamps to the batch; ImageScale: sizes, 0 = from the aspect ratio, crop
    center cuts the middle to the target aspect before resizing, lanczos through 8 bits."""
    import torch
    import torch.nn.functional as F

    from tests.workflow_runner import image_from_batch, image_scale

    image = _rand_image(5, 6, 12)
    assert image_from_batch(image, 1, 3)[0].equal(image[1:4])
    assert image_from_batch(image, 3, 81)[0].equal(image[3:])
    assert image_from_batch(image, 9, 2)[0].equal(image[4:])
    (out,) = image_scale(image, "bilinear", 24, 12, "disabled")
    assert out.shape == (5, 12, 24, 3)
    assert torch.allclose(out, F.interpolate(image.movedim(-1, 1), size=(12, 24),
                                             mode="bilinear").movedim(1, -1))
    assert image_scale(image, "nearest-exact", 0, 3, "disabled")[0].shape == (5, 3, 6, 3)
    assert image_scale(image, "area", 4, 0, "center")[0].shape == (5, 2, 4, 3)
    assert image_scale(image, "bicubic", 0, 0, "center")[0] is image
    (square,) = image_scale(image, "nearest-exact", 6, 6, "center")     # the middle 6x6
    assert square.equal(image[:, :, 3:9])
    (tall,) = image_scale(image, "nearest-exact", 12, 12, "center")
    assert tall.shape == (5, 12, 12, 3)
    (lanczos,) = image_scale(image, "lanczos", 12, 6, "disabled")   # same size: 8-bit copy
    assert torch.allclose(lanczos, (image * 255).floor() / 255, atol=1e-6)


def test_every_shipped_input_an_example_loads_is_named_in_its_note():
    """Load Image reads either a file of example_workflows/inputs (named in the note, to copy
    into ComfyUI/input) or a picture of the user's own (example.png, start.png, end.png)."""
    shipped = {p.name for p in INPUTS.iterdir()}
    for path in EXAMPLES:
        (note,) = [n["widgets_values"][0] for n in json.loads(path.read_text())["nodes"]
                   if n["type"] == "MarkdownNote"]
        for file in _load_image_values(path):
            if file in shipped:
                assert "ComfyUI/input" in note and f"`{file}`" in note, (path.stem, file)
            else:
                assert file in ("example.png", "start.png", "end.png"), (path.stem, file)


def test_long_video_workflow_samples_241_frames_one_window_at_a_time(folders, tmp_path,
                                                                     monkeypatch):
    """wan21_t2v_long_context_windows at its full length (241 frames; 64x64, 2 steps): the
    sampler's latent has all 61 latent frames while every model call sees one 81-frame window
    (21 latent frames), 4 windows per step. Decode and save are muted here (the tiny VAE takes
    long over 241 frames on a CPU); the run above decodes the 9-frame version."""
    import torch

    from wan_core.models.dit import WanDiT

    seen = []
    forward = WanDiT.forward

    def recording(self, x, *args, **kwargs):
        seen.append(tuple(x.shape[2:]))
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(WanDiT, "forward", recording)
    workflow = json.loads((ROOT / "example_workflows" /
                           "wan21_t2v_long_context_windows.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] in ("WanCoreVAEDecode", "WanCoreSaveVideo"):
            node["mode"] = 2                                    # muted: not run
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(workflow))
    results = run_workflow(path, folders / "models", folders / "input", tmp_path,
                           {"width": 64, "height": 64, "steps": 2})
    (sampler,) = [n for n in workflow["nodes"] if n["type"] == "WanCoreSampler"]
    latent = results[sampler["id"]][0]["samples"]
    assert latent.shape == (1, 16, 61, 8, 8) and torch.isfinite(latent).all()
    assert seen == [(21, 8, 8)] * 8


def _rand_image(n, h, w):
    import torch

    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(0))


def test_vace_example_with_a_t2v_model_and_a_vace_module(folders, tmp_path):
    """The loader's vace_module widget: the control-video example on the T2V 1.3B file plus
    the VACE module file, as the examples' notes describe."""
    from tests.tiny_models import FILES

    wf = json.loads((ROOT / "example_workflows" / "wan21_vace_control_video.json").read_text())
    (loader,) = [n for n in wf["nodes"] if n["type"] == "WanCoreModelLoader"]
    loader["widgets_values"][0] = FILES["dit_t2v"].split("/", 1)[1]
    loader["widgets_values"][5] = FILES["vace_module"].split("/", 1)[1]
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    results = run_workflow(path, folders / "models", folders / "input", tmp_path, SMALL)
    (model,) = results[loader["id"]]
    assert model.config.model_type == "vace"


TITLE_BAR = 30     # LiteGraph draws a node's title bar above its ``pos``


def _overlap(a, b) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


def _inside(node_rect, group_rect) -> bool:
    x, y, w, h = node_rect
    gx, gy, gw, gh = group_rect
    return gx <= x and gy <= y and x + w <= gx + gw and y + h <= gy + gh


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_workflows_open_tidy(path):
    """No group overlaps another, and every node (its title bar included) sits inside exactly
    one group, as the workflow opens in the frontend."""
    workflow = json.loads(path.read_text())
    groups = [(g["title"], g["bounding"]) for g in workflow["groups"]]
    for i, (title, rect) in enumerate(groups):
        for other, other_rect in groups[:i]:
            assert not _overlap(rect, other_rect), f"group {title!r} overlaps {other!r}"
    for node in workflow["nodes"]:
        (x, y), (w, h) = node["pos"], node["size"]
        rect = (x, y - TITLE_BAR, w, h + TITLE_BAR)
        holders = [title for title, group in groups if _inside(rect, group)]
        assert len(holders) == 1, f"{node['type']} at {node['pos']} is inside {holders}"
