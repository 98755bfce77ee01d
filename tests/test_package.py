"""The pack imports without ComfyUI and wan_core never touches the host."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wan_core

from tests.conftest import ROOT, load_pack
from wan_core.loading import checkpoint
from wan_core.loading.checkpoint import CheckpointError


def test_pack_imports_without_comfyui():
    pack = load_pack()
    assert isinstance(pack.NODE_CLASS_MAPPINGS, dict)
    assert pack.WEB_DIRECTORY == "./web"
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) <= set(pack.NODE_CLASS_MAPPINGS)


def test_wan_core_never_imports_the_host():
    pattern = re.compile(r"^\s*(import|from)\s+(comfy|folder_paths|server|execution|nodes)\b")
    for path in (ROOT / "wan_core").rglob("*.py"):
        for line in path.read_text().splitlines():
            assert not pattern.match(line), f"{path}: {line}"


# wan_core's layers, low to high: a module may import only from its own room or a lower layer.
LAYERS = {"errors": 0, "prompts": 0, "video_io": 0, "ops": 1, "models": 2, "conditioning": 2,
          "loading": 3, "sampling": 3, "pipeline": 4, "checks": 4, "demo": 5, "parallel": 5, "extend": 5,
          "__main__": 6}


def _room(module: str) -> str:
    """'wan_core.models.vae.blocks' -> 'models'; 'wan_core' -> '' (the lazy public face)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _wan_core_imports(path: Path) -> list:
    """Absolute names of the wan_core / training / nodes modules ``path`` imports."""
    import ast

    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found += [f"{mod}.{a.name}" if not node.module else mod for a in node.names]
    return [m for m in found if m.split(".")[0] in ("wan_core", "training", "nodes")]


def test_wan_core_layers_import_only_downwards():
    """ops -> models -> loading -> sampling/pipeline -> demo -> CLI: no import from a higher
    layer into a lower one, nothing in wan_core imports training/ or nodes/."""
    for path in (ROOT / "wan_core").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        room = _room(module)
        if room in ("", "__init__"):
            continue                      # the public face re-exports lazily
        assert room in LAYERS, f"{path}: add its room '{room}' to LAYERS"
        for target in _wan_core_imports(path):
            assert target.split(".")[0] == "wan_core", f"{path} imports {target}"
            other = _room(target)
            if other not in LAYERS and other in wan_core._LAZY:   # a name of the public face
                other = _room(wan_core._LAZY[other])
            if other in ("", room):
                continue
            assert LAYERS[other] < LAYERS[room], (
                f"{path} ({room}, layer {LAYERS[room]}) imports {target} "
                f"({other}, layer {LAYERS[other]})")


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "wan_core", "--help"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout


def _save(path: Path, sd):
    from safetensors.torch import save_file
    save_file(sd, str(path))


def test_truncated_safetensors_is_reported(tmp_path):
    path = tmp_path / "model.safetensors"
    _save(path, {"w": torch.randn(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load_state_dict(path)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("<html>404 not found</html>")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        checkpoint.load_state_dict(path)


def test_pickle_with_objects_is_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(2), "obj": Path("not a tensor")}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        checkpoint.load_state_dict(path)


def test_plain_pickle_and_sharded_folder_load(tmp_path):
    sd = {"a.weight": torch.randn(3, 3), "b.weight": torch.randn(2)}
    torch.save(sd, tmp_path / "m.pth")
    got = checkpoint.load_state_dict(tmp_path / "m.pth")
    assert all(torch.equal(got[k], sd[k]) for k in sd)

    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    _save(shard_dir / "m-00001-of-00002.safetensors", {"a.weight": sd["a.weight"]})
    _save(shard_dir / "m-00002-of-00002.safetensors", {"b.weight": sd["b.weight"]})
    import json
    (shard_dir / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "m-00001-of-00002.safetensors", "b.weight": "m-00002-of-00002.safetensors"}}))
    got = checkpoint.load_state_dict(shard_dir)
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_identify_names_the_wrong_kind():
    vae = {"encoder.conv1.weight": torch.zeros(1), "decoder.conv1.weight": torch.zeros(1),
           "conv1.weight": torch.zeros(1)}
    assert checkpoint.identify(vae) == "vae"
    with pytest.raises(CheckpointError, match="is a Wan VAE, not a Wan diffusion model"):
        checkpoint.require_kind(vae, "dit", "wan_2.1_vae.safetensors")
    lora = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(1)}
    assert checkpoint.identify(lora) == "lora"
