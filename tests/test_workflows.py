"""Example workflows run end to end on tiny checkpoints, and released workflows stay loadable.

Shared workflows are a public contract: ``tests/workflow_contract/`` keeps a frozen copy of
each example workflow as first released. Node ids, socket names/types/order and the meaning of
every stored widget value must keep working for those files; a deliberate change needs a
migration (ComfyUI restores widget values by position).
"""
import json

import numpy as np
import pytest

from tests.conftest import ROOT, load_pack
from tests.workflow_runner import run_workflow

EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))
FROZEN = sorted((ROOT / "tests" / "workflow_contract").glob("wan*.json"))
SMALL = {"width": 64, "height": 64, "frames": 9, "steps": 2}


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
    return root


def test_every_task_has_an_example():
    names = {p.stem for p in EXAMPLES}
    assert {"wan21_t2v_1.3B", "wan21_i2v_14B_480p", "wan21_flf2v_14B", "wan22_t2v_A14B",
            "wan22_i2v_A14B", "wan22_ti2v_5B"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_workflow_runs_to_a_video(path, folders, tmp_path):
    from wan_core.video_io import read_video

    results = run_workflow(path, folders / "models", folders / "input", tmp_path, SMALL)
    saved = [ui for key, ui in results.items() if isinstance(key, tuple) and ui and
             "wancore_video" in ui]
    assert len(saved) == 1, results.keys()
    info = saved[0]["wancore_video"][0]
    frames, fps = read_video(tmp_path / info["subfolder"] / info["filename"])
    assert frames.shape == (9, 64, 64, 3)
    assert np.isfinite(frames).all() and frames.std() > 0


def _layout(pack, node_type):
    from comfyui_wancore_pack.nodes.schema import sockets_and_widgets

    return sockets_and_widgets(pack.NODE_CLASS_MAPPINGS[node_type])


@pytest.mark.parametrize("path", FROZEN, ids=lambda p: p.stem)
def test_released_workflow_still_means_the_same(path):
    """Every node type still exists; every linked socket keeps its index, name and type; every
    stored widget value still lands on a widget of the same name and is valid there."""
    from comfyui_wancore_pack.nodes.schema import validate_widget, widget_kwargs

    pack = load_pack()
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
