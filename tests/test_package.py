"""The pack imports without ComfyUI and wan_core never touches the host."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, load_pack
from wan_core import checkpoint
from wan_core.checkpoint import CheckpointError


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
