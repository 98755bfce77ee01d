"""Hostile and careless input (issue 21): every case is refused with one clear message, before
any model loads where possible, and no file is changed or left behind."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import load_pack
from tests.tiny_models import FILES
from wan_core.__main__ import main
from wan_core.loading.checkpoint import CheckpointError, load_state_dict

DIT = FILES["dit_t2v"]
SMALL = ["--size", "64x48", "--frames", "9", "--steps", "2"]


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones included) -> its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if anything tries to read model weights."""
    import wan_core
    from wan_core.loading import checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(checkpoint, "_read_state_dict", refuse)
    for name in ("load_dit", "load_vae", "load_text_encoder", "load_clip_vision"):
        monkeypatch.setattr(wan_core, name, refuse)


def _generate(models, out, *extra, dit=DIT, vae=FILES["vae21"]):
    return main(["generate", "--dit", str(models / dit), "--vae", str(models / vae),
                 "--text-encoder", str(models / FILES["umt5"]), "--prompt", "a red circle",
                 "--out", str(out), *extra])


def _one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def png(tmp_path):
    from PIL import Image

    path = tmp_path / "start.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


# ---------------------------------------------------------------------------- CLI: values

@pytest.mark.parametrize("option, value, needle", [
    ("--steps", "0", "--steps: must be at least 1"),
    ("--steps", "-3", "--steps: must be at least 1"),
    ("--frames", "0", "--frames: must be at least 1"),
    ("--fps", "0", "--fps: must be a finite number above 0"),
    ("--fps", "inf", "--fps: must be a finite number above 0"),
    ("--cfg", "nan", "--cfg: must be a finite number above 0"),
    ("--cfg", "0", "--cfg: must be a finite number above 0"),
    ("--shift", "nan", "--shift: must be a finite number above 0"),
    ("--shift", "-1", "--shift: must be a finite number above 0"),
    ("--cfg-low-noise", "inf", "--cfg-low-noise"),
    ("--boundary", "nan", "--boundary"),
    ("--size", "0x48", "width and height must be at least 1"),
    ("--seed", "-1", "--seed: must be from 0 to 2**64-1"),
    ("--seed", str(2**64), "--seed: must be from 0 to 2**64-1"),
    ("--tile", "0", "--tile: must be auto, off, or a tile size"),
    ("--tile", "-256", "--tile: must be auto, off, or a tile size"),
])
def test_generate_refuses_bad_values(models, tmp_path, capsys, no_model_loads, option, value,
                                     needle):
    before = _snapshot(tmp_path)
    assert _generate(models, tmp_path / "v.mp4", option, value) == 2
    _one_error_line(capsys, needle)
    assert _snapshot(tmp_path) == before


def test_demo_refuses_bad_values(tmp_path, capsys, no_model_loads):
    for argv, needle in [(["--steps", "0"], "--steps"), (["--cfg", "0"], "--cfg"),
                         (["--frames", "0"], "--frames"), (["--size", "0"], "--size"),
                         (["--frames", "16"], "frames must be 4n+1 (1, 5, 9, ..., 81); got 16"),
                         (["--size", "100000"], "needs at least"),
                         (["--seed", "-1"], "--seed"),
                         (["--task", "i2v"], "--task i2v needs --image"),
                         (["--out", str(tmp_path / "x.gif")], "unsupported format '.gif'")]:
        assert main(["demo", "--out", str(tmp_path / "d.mp4"), *argv]) == 2, argv
        _one_error_line(capsys, needle)
    assert _snapshot(tmp_path) == {}


# ---------------------------------------------------------------------------- CLI: files

def test_outputs_never_overwrite_inputs_or_existing_files(models, tmp_path, capsys,
                                                          no_model_loads, png):
    existing = tmp_path / "old.mp4"
    existing.write_bytes(b"my old video")
    before_models, before = _snapshot(models), _snapshot(tmp_path)
    cases = [
        ((existing,), "already exists; pass --overwrite"),
        ((tmp_path / "v.mp4", "--save-latents", str(models / DIT), "--overwrite"),
         "is the input file of --dit"),
        ((tmp_path / "v.mp4", "--save-latents", str(models / FILES["vae21"])),
         "is the input file of --vae"),
        ((png.with_suffix(".webp"), "--task", "i2v", "--image", str(png.with_suffix(".webp")),
          "--overwrite"), "is the input file of --image"),
        ((tmp_path / "v.mp4", "--save-latents", str(tmp_path / "v.mp4")), "name the same file"),
        ((tmp_path / "v.gif",), "unsupported format '.gif'"),
        ((tmp_path,), "is a folder"),
        ((png / "v.mp4",), "is a file, not a folder"),
    ]
    from PIL import Image
    Image.open(png).save(png.with_suffix(".webp"))
    before[png.with_suffix(".webp").name] = _snapshot(tmp_path)[png.with_suffix(".webp").name]
    for (out, *extra), needle in cases:
        assert _generate(models, out, *extra) == 2, extra
        _one_error_line(capsys, needle)
    assert _snapshot(tmp_path) == before and _snapshot(models) == before_models


def _truncated_png(path: Path) -> Path:
    from PIL import Image

    Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[:200])
    return path


@pytest.mark.parametrize("make, needle", [
    (lambda d: (d / "x.png").write_text("not an image") and d / "x.png", "is not an image"),
    (lambda d: _truncated_png(d / "cut.png"), "truncated or damaged"),
    (lambda d: d, "is a folder, not an image file"),
    (lambda d: d / "missing.png", "file not found"),
])
def test_unreadable_images_are_refused_before_loading(models, tmp_path, capsys, no_model_loads,
                                                      make, needle):
    image = make(tmp_path)
    before = _snapshot(tmp_path)
    assert _generate(models, tmp_path / "v.mp4", "--task", "i2v", "--image", str(image),
                     dit=FILES["dit_i2v_high"]) == 2
    _one_error_line(capsys, needle)
    assert _snapshot(tmp_path) == before


def test_decompression_bomb_is_refused(tmp_path):
    from PIL import Image

    from wan_core.video_io import load_image

    Image.new("1", (10_000, 10_000)).save(tmp_path / "bomb.png")    # 100 M pixels, ~12 KB
    with pytest.raises(ValueError, match="too large an image"):
        load_image(tmp_path / "bomb.png")


def test_model_mismatches_are_refused_before_loading(models, tmp_path, capsys, no_model_loads):
    assert _generate(models, tmp_path / "v.mp4", dit=FILES["dit_ti2v"]) == 2
    _one_error_line(capsys, "48-channel latents", "makes 16", "Wan 2.2 VAE")
    assert _generate(models, tmp_path / "v.mp4", vae=DIT) == 2
    _one_error_line(capsys, "is a Wan diffusion model (DiT), not a Wan VAE")
    assert _generate(models, tmp_path / "v.mp4", "--size", "100000x100000") == 2
    _one_error_line(capsys, "needs at least", "use a smaller --size")
    assert _generate(models, tmp_path / "v.mp4", "--frames", "8") == 2
    _one_error_line(capsys, "frames must be 4n+1")
    assert _generate(models, tmp_path / "v.mp4", dit=FILES["dit_i2v"]) == 2
    _one_error_line(capsys, "is an image-to-video model")
    gguf_dit = "diffusion_models/wan2.1-t2v-1.3b-Q8_0.gguf"
    assert _generate(models, tmp_path / "v.mp4", vae=gguf_dit) == 2
    _one_error_line(capsys, "Wan diffusion-model GGUF: load it with the diffusion model loader")
    assert main(["generate", "--dit", str(models / DIT), "--vae", str(models / FILES["vae21"]),
                 "--text-encoder", str(models / gguf_dit), "--prompt", "a red circle",
                 "--out", str(tmp_path / "v.mp4")]) == 2
    _one_error_line(capsys, "Wan diffusion-model GGUF: load it with the diffusion model loader")
    assert _snapshot(tmp_path) == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a PyTorch without CUDA")
def test_unavailable_device_is_refused(models, tmp_path, capsys, no_model_loads):
    assert _generate(models, tmp_path / "v.mp4", "--device", "cuda") == 2
    _one_error_line(capsys, "--device cuda", "no CUDA GPU available")
    assert _generate(models, tmp_path / "v.mp4", "--device", "tpu9") == 2
    _one_error_line(capsys, "--device")


# ---------------------------------------------------------------------------- CLI: full runs

def test_overwrite_replaces_and_ctrl_c_leaves_nothing(models, tmp_path, capsys, monkeypatch):
    import av

    out, latents = tmp_path / "v.mp4", tmp_path / "v.latent"
    out.write_bytes(b"old")
    assert _generate(models, out, *SMALL, "--seed", str(2**64 - 1), "--overwrite",
                     "--save-latents", str(latents)) == 0
    assert out.read_bytes()[:3] != b"old" and "latent" in load_file(str(latents))
    capsys.readouterr()
    before = _snapshot(tmp_path)

    calls = []
    real = av.VideoFrame.from_ndarray

    def interrupted(*args, **kwargs):       # Ctrl-C in the middle of encoding the video
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", interrupted)
    assert _generate(models, out, *SMALL, "--overwrite") == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "cancelled"
    assert len(calls) == 4 and _snapshot(tmp_path) == before      # old file intact, no .part


def test_nan_weight_warns_and_nan_output_is_an_error(models, tmp_path, capsys):
    sd = load_file(str(models / DIT))
    key = "blocks.0.ffn.0.weight"
    bad = next(k for k in sd if k.endswith(key))
    sd[bad] = sd[bad].clone()
    sd[bad].view(-1)[3] = float("nan")
    nan_dit = tmp_path / "nan_dit.safetensors"
    save_file(sd, str(nan_dit))
    before = _snapshot(tmp_path)
    assert _generate(models, tmp_path / "v.mp4", *SMALL, "--save-latents",
                     str(tmp_path / "l.st"), dit=nan_dit) == 2
    err = capsys.readouterr().err
    assert f"warning: 'nan_dit.safetensors': tensor {bad} holds NaN" in err
    assert "error: the sampled latent contains NaN" in err and "wrote" not in err
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------------------- files

def test_written_video_files_are_deterministic(tmp_path):
    from wan_core.video_io import write_video

    frames = torch.rand(9, 48, 64, 3, generator=torch.Generator().manual_seed(1))
    for fmt in ("mp4", "webm", "webp"):
        a = write_video(tmp_path / f"a.{fmt}", frames, fps=16).read_bytes()
        b = write_video(tmp_path / f"b.{fmt}", frames.clone(), fps=16).read_bytes()
        assert a == b, fmt
    with pytest.raises(ValueError, match="NaN"):
        write_video(tmp_path / "nan.mp4", torch.full((5, 16, 16, 3), float("nan")))
    with pytest.raises(FileExistsError):
        write_video(tmp_path / "a.mp4", frames, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{n}.{f}" for n in "ab"
                                                         for f in ("mp4", "webm", "webp")]


def _header_file(path: Path, header, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


class _Code:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("name, make, needle", [
    ("list.safetensors", lambda p: _header_file(p, [1, 2]), "header is a JSON list"),
    ("dtype.safetensors", lambda p: _header_file(
        p, {"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
     "tensor 'w' has an unknown dtype 'F99'"),
    ("offsets.safetensors", lambda p: _header_file(
        p, {"w": {"dtype": "F32", "shape": [2]}}, bytes(8)), "invalid data_offsets"),
    ("size.safetensors", lambda p: _header_file(
        p, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
     "8 bytes of data for shape [3] F32"),
    ("junk.safetensors", lambda p: p.write_bytes(struct.pack("<Q", 9000) + b"GIF89a..."),
     "not a safetensors file"),
    ("cut.safetensors", lambda p: p.write_bytes(struct.pack("<Q", 9000) + b'{"w": {"dty'),
     "truncated"),
    ("self.safetensors.index.json", lambda p: p.write_text(json.dumps(
        {"weight_map": {"w": "self.safetensors.index.json"}})), "cannot point at an index"),
    ("code.pth", lambda p: p.write_bytes(pickle.dumps({"w": _Code()})),
     "contains Python objects"),
])
def test_malformed_checkpoints_name_the_file(tmp_path, name, make, needle):
    make(tmp_path / name)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(tmp_path / name)
    assert name in str(info.value) and needle in str(info.value)


def test_old_format_pth_loads_with_weights_only(tmp_path):
    sd = {"a.weight": torch.randn(3, 3)}
    torch.save(sd, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(load_state_dict(tmp_path / "old.pth")["a.weight"], sd["a.weight"])


# ---------------------------------------------------------------------------- nodes

@pytest.fixture(scope="module")
def nodes():
    return load_pack().NODE_CLASS_MAPPINGS


def test_nodes_name_the_node_and_input(nodes):
    from wan_core.conditioning import VideoConditioning

    decode, encode = nodes["WanCoreVAEDecode"](), nodes["WanCoreVAEEncode"]()
    sampler = nodes["WanCoreSampler"]()
    cond = VideoConditioning(64, 48, 9)
    cases = [
        (lambda: decode.decode(cond, {"samples": torch.zeros(1, 16, 3, 6, 8)}),
         "WanCore VAE Decode: input 'vae' needs a VAE", "VideoConditioning"),
        (lambda: decode.decode(object(), {"latent": torch.zeros(1)}),
         "WanCore VAE Decode: input 'vae'", ""),
        (lambda: nodes["WanCoreEmptyVideo"]().build("832", 480, 81),
         "WanCore Empty Video: input 'width' must be a number", "'832'"),
        (lambda: nodes["WanCoreEmptyVideo"]().build(64, 48, 9.5),
         "input 'frames' must be a whole number", ""),
        (lambda: sampler.sample(None, {}, cond, 0, 4, float("nan"), 5.0, "unipc", 1.0),
         "WanCore Sampler: input 'model' needs a diffusion model", ""),
        (lambda: encode.encode(None, torch.zeros(0, 48, 64, 3)),
         "WanCore VAE Encode: input 'vae'", ""),
        (lambda: nodes["WanCoreSaveVideo"]().save(torch.zeros(0, 8, 8, 3)),
         "WanCore Save Video: input 'images' is an empty image batch", ""),
        (lambda: nodes["WanCoreSaveVideo"]().save(torch.zeros(5, 8, 8, 3), fps=float("inf")),
         "WanCore Save Video: input 'fps' must be a finite number", ""),
        (lambda: nodes["WanCoreSaveVideo"]().save(torch.zeros(5, 8, 8, 3), format="gif"),
         "input 'format' is 'gif'; choose one of 'mp4'", ""),
    ]
    for call, needle, also in cases:
        with pytest.raises(ValueError) as info:
            call()
        assert needle in str(info.value) and also in str(info.value), str(info.value)


def test_nodes_with_a_real_vae(nodes, models):
    from wan_core import load_vae

    vae = load_vae(models / FILES["vae21"])
    decode, encode = nodes["WanCoreVAEDecode"](), nodes["WanCoreVAEEncode"]()
    with pytest.raises(ValueError, match="input 'latent' has no 'samples' tensor"):
        decode.decode(vae, {"latent": torch.zeros(1, 16, 3, 6, 8)})
    with pytest.raises(ValueError, match="input 'images' is an empty image batch"):
        encode.encode(vae, torch.zeros(0, 48, 64, 3))
    with pytest.raises(ValueError, match="input 'images' needs an IMAGE batch"):
        encode.encode(vae, {"samples": torch.zeros(1, 16, 3, 6, 8)})
    with pytest.raises(ValueError, match="got 0; use 1 or 5"):
        vae.encode(torch.zeros(1, 3, 0, 48, 64))
    nan = {"samples": torch.full((1, 16, 3, 6, 8), float("nan"))}
    with pytest.raises(ValueError, match="WanCore VAE Decode: the decoded video contains NaN"):
        decode.decode(vae, nan, tiling="off")


def test_save_video_stays_in_the_output_folder(nodes, tmp_path, monkeypatch):
    out = tmp_path / "output"
    monkeypatch.setenv("WANCORE_OUTPUT_DIR", str(out))
    save = nodes["WanCoreSaveVideo"]()
    frames = torch.rand(5, 16, 16, 3)
    for prefix in ("../../escaped", str(tmp_path / "abs" / "x"), "a/../../b/x", "videos/"):
        with pytest.raises(ValueError, match="filename_prefix"):
            save.save(frames, filename_prefix=prefix)
    result = save.save(frames, filename_prefix="videos/clip")
    assert result["ui"]["wancore_video"][0]["filename"] == "clip_00001_.mp4"
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [os.path.join("output", "videos", "clip_00001_.mp4")]
