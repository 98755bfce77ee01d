"""Optional real-host test: a real ComfyUI (CPU, 127.0.0.1) with this pack in custom_nodes.

Skipped unless COMFYUI_ROOT points at a ComfyUI checkout. The Python that runs ComfyUI is
COMFYUI_PYTHON, else ``$COMFYUI_ROOT/../venv/bin/python`` when it exists, else this one.
Tiny checkpoints are written under the advertised file names into a temporary models folder
(given to ComfyUI with --extra-model-paths-config); each example workflow is converted to the
API format by the same widget mapping ComfyUI uses, queued through /prompt, and its history
must show the saved video.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, load_pack
from tests.workflow_runner import NATIVE_WIDGETS, SMALL

COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT")
pytestmark = pytest.mark.skipif(not COMFYUI_ROOT, reason="set COMFYUI_ROOT to a ComfyUI checkout")
EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))


def _python() -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv = Path(COMFYUI_ROOT).parent / "venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, payload: dict):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def to_api_format(workflow: dict, overrides: dict) -> dict:
    """UI-format workflow -> the /prompt API format, mapping widgets by position."""
    pack = load_pack()
    from comfyui_wancore_pack.nodes.schema import widget_kwargs

    links = {link[0]: (link[1], link[2]) for link in workflow["links"]}
    nodes = {node["id"]: node for node in workflow["nodes"]}

    def source(link_id):
        """The (node, slot) feeding a link, through bypassed nodes (mode 4) as the frontend
        does: a bypassed node passes on its input of the same type."""
        origin, slot = links[link_id]
        node = nodes[origin]
        while node.get("mode") == 4:
            out_type = node["outputs"][slot]["type"]
            sock = next(i for i in node["inputs"] if i["type"] == out_type)
            origin, slot = links[sock["link"]]
            node = nodes[origin]
        return origin, slot

    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in ("Note", "MarkdownNote") or node.get("mode") == 4:
            continue
        if node["type"] == "LoadImage":
            inputs = {"image": node["widgets_values"][0]}
        elif node["type"] in NATIVE_WIDGETS:          # other native nodes: widgets by position
            inputs = dict(zip(NATIVE_WIDGETS[node["type"]], node["widgets_values"]))
            inputs.update({k: v for k, v in overrides.items() if k in inputs})
        else:
            cls = pack.NODE_CLASS_MAPPINGS[node["type"]]
            inputs = widget_kwargs(cls, node["widgets_values"])
            inputs.update({k: v for k, v in overrides.items() if k in inputs})
        for sock in node.get("inputs", []):
            if sock.get("link") is not None:
                origin, slot = source(sock["link"])
                inputs[sock["name"]] = [str(origin), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from PIL import Image

    from tests.tiny_models import write_models

    root = tmp_path_factory.mktemp("host")
    models = write_models(root / "models")
    (root / "input").mkdir()
    rng = np.random.default_rng(0)
    for name in ("example.png", "start.png", "end.png"):
        Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(root / "input" / name)
    for path in (ROOT / "example_workflows" / "inputs").iterdir():     # the VACE examples'
        shutil.copy(path, root / "input" / path.name)
    (root / "paths.yaml").write_text(
        "wancore_test:\n"
        f"  base_path: {models}\n"
        "  diffusion_models: diffusion_models\n  vae: vae\n"
        "  text_encoders: text_encoders\n  clip_vision: clip_vision\n  loras: loras\n")
    link = Path(COMFYUI_ROOT) / "custom_nodes" / "ComfyUI-WanCore"
    if not link.exists():
        link.symlink_to(ROOT)
    port = _free_port()
    log = open(root / "comfy.log", "w")
    proc = subprocess.Popen(
        [_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--extra-model-paths-config", str(root / "paths.yaml"),
         "--input-directory", str(root / "input"), "--output-directory", str(root / "output"),
         "--disable-auto-launch"],
        cwd=COMFYUI_ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            _get(url + "/system_stats")
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((root / "comfy.log").read_text()[-3000:])
            time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError("ComfyUI did not start within 180 s")
    yield url, root
    proc.terminate()
    proc.wait(timeout=30)


def test_object_info_lists_every_node(server):
    url, root = server
    info = _get(url + "/object_info")
    pack = load_pack()
    missing = set(pack.NODE_CLASS_MAPPINGS) - set(info)
    assert not missing, (root / "comfy.log").read_text()[-3000:]
    # The dropdowns list the tiny files under the advertised names.
    loader = info["WanCoreModelLoader"]["input"]["required"]["model_name"][0]
    assert "wan2.1_t2v_1.3B_bf16.safetensors" in loader
    assert "wancore-demo/dit_t2v.safetensors" in loader           # the embedded demo model
    assert "wan2.1-t2v-1.3b-Q8_0.gguf" in loader                  # ComfyUI's own lists omit .gguf
    loras = info["WanCoreLoRA"]["input"]["required"]["lora_name"][0]
    assert "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors" in loras
    assert "wancore-demo/fast_lora.safetensors" in loras


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_workflow_through_prompt_api(server, path):
    url, root = server
    _run(url, root, to_api_format(json.loads(path.read_text()), SMALL))


def test_moe_workflow_with_block_streaming_and_the_step_cache_enabled(server):
    """Experts on demand released through ComfyUI's model management, blocks streamed, the
    step cache on: the Wan 2.2 pair still produces a video in a real ComfyUI."""
    url, root = server
    workflow = json.loads((ROOT / "example_workflows" / "wan22_t2v_A14B.json").read_text())
    (cache,) = [node for node in workflow["nodes"] if node["type"] == "WanCoreStepCache"]
    assert cache["mode"] == 4                  # shipped bypassed
    cache["mode"] = 0
    _run(url, root, to_api_format(workflow, {**SMALL, "blocks_on_gpu": 1}))


def test_multi_gpu_workers_are_reused_and_an_interrupt_stops_them(server):
    """WanCore Multi-GPU (2 CPU gloo workers, CFG-parallel: the tiny model has 1 head) before
    the sampler: a second run reuses the workers; /interrupt while they sample stops them (the
    real ComfyUI raises its interruption from the progress hook), and the next run gets its own
    video, not the interrupted run's."""
    url, root = server
    workflow = json.loads((ROOT / "example_workflows" / "wan21_t2v_1.3B.json").read_text())
    prompt = to_api_format(workflow, SMALL)
    (sampler,) = [node for node in prompt.values() if node["class_type"] == "WanCoreSampler"]
    prompt["multi_gpu"] = {"class_type": "WanCoreMultiGPU", "inputs": {
        "model": sampler["inputs"]["model"], "gpus": 2, "cfg_parallel": True, "dit_fsdp": False}}
    sampler["inputs"]["model"] = ["multi_gpu", 0]
    (empty,) = [node for node in prompt.values() if node["class_type"] == "WanCoreEmptyVideo"]

    def queue(seed, frames, steps):
        sampler["inputs"].update(seed=seed, steps=steps)
        empty["inputs"]["frames"] = frames
        return json.loads(json.dumps(prompt))

    def frames_of(path):
        import av

        with av.open(str(path)) as container:
            return sum(1 for _ in container.decode(video=0))

    assert frames_of(_run(url, root, queue(1, 9, 2))) == 9
    log = (root / "comfy.log").read_text()
    assert frames_of(_run(url, root, queue(2, 9, 2))) == 9
    # the workers (spawned processes log ComfyUI's start-up lines) were not started again
    started = (root / "comfy.log").read_text()[len(log):]
    assert "Total VRAM" not in started, started[-3000:]

    prompt_id = _post(url + "/prompt", {"prompt": queue(3, 41, 200)})["prompt_id"]
    deadline = time.time() + 120
    while not any(item[1] == prompt_id for item in _get(url + "/queue")["queue_running"]):
        assert time.time() < deadline, "the long run did not start"
        time.sleep(0.2)
    time.sleep(3)                                       # the sampler is running by now
    request = urllib.request.Request(url + "/interrupt", data=json.dumps(
        {"prompt_id": prompt_id}).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()          # answers with no body
    status = _wait(url, prompt_id, 120)
    assert "execution_interrupted" in [m[0] for m in status["messages"]], status
    assert frames_of(_run(url, root, queue(4, 9, 2))) == 9       # not the interrupted run's 41


def _wait(url, prompt_id, timeout=300):
    """The prompt's history status once it completed or failed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = _get(f"{url}/history/{prompt_id}")
        status = history.get(prompt_id, {}).get("status", {})
        if status.get("completed") or status.get("status_str") == "error":
            return status
        time.sleep(0.5)
    raise AssertionError(f"workflow did not finish in {timeout} s")


def _run(url, root, prompt):
    """Queue ``prompt``, require success and a saved video; returns the video's path."""
    prompt_id = _post(url + "/prompt", {"prompt": prompt})["prompt_id"]
    status = _wait(url, prompt_id)
    if status.get("status_str") == "error":
        raise AssertionError(json.dumps(status)[-3000:])
    outputs = _get(f"{url}/history/{prompt_id}")[prompt_id]["outputs"]
    videos = [v for out in outputs.values() for v in out.get("wancore_video", [])]
    assert videos, outputs
    path = root / "output" / videos[0]["subfolder"] / videos[0]["filename"]
    assert path.stat().st_size > 0
    return path
