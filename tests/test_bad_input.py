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
                         (["--task", "i2v", "--prompt", "a cat on a sofa"],
                          "draws the first frame from the prompt, which must then be a demo "
                          "caption"),
                         (["--size", "64x48"], "the demo makes square videos"),
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
    # x264's macroblock tree read memory it never wrote at heights of an odd number of
    # macroblocks (80 px here): after a VP9 write had freed memory, about 1 mp4 in 4 came out
    # different. 30 writes, each after a VP9 one, must all be the same file.
    frames = torch.rand(17, 80, 64, 3, generator=torch.Generator().manual_seed(2))
    mp4s = set()
    for _ in range(30):
        write_video(tmp_path / "dirty.webm", frames, fps=16)
        mp4s.add(write_video(tmp_path / "same.mp4", frames, fps=16).read_bytes())
    assert len(mp4s) == 1, f"{len(mp4s)} different mp4 files from the same frames"
    (tmp_path / "dirty.webm").unlink()
    (tmp_path / "same.mp4").unlink()
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
    with pytest.raises(ValueError, match="WanCore VAE Decode: the input latent contains NaN"
                                         ".*the VAE was not run"):
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


# ---------------------------------------------------------------------------- issue 30

@pytest.fixture
def only_loras_read(monkeypatch):
    """Fail the test if any model weights are read; LoRA files (under loras/ or a test's own
    folder named *lora*) may be read."""
    import wan_core
    from wan_core.loading import checkpoint, on_demand

    real = checkpoint._read_state_dict

    def guarded(source, *args, **kwargs):
        if not isinstance(source, dict) and "lora" not in str(source):
            raise AssertionError(f"{source} was read before the input was checked")
        return real(source, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(checkpoint, "_read_state_dict", guarded)
    monkeypatch.setattr(on_demand, "load_dit", refuse)
    for name in ("load_dit", "load_vae", "load_text_encoder", "load_clip_vision"):
        monkeypatch.setattr(wan_core, name, refuse)


def test_seeds_use_all_64_bits_and_keep_the_videos_of_seeds_below_2_32():
    from wan_core.pipeline import draw_noise

    shape = (4, 3, 6, 8)
    for seed in (0, 1, 12345, 2**32 - 1):          # today's noise, exactly
        expected = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(draw_noise(shape, seed)[0], expected)
    seeds = [0, 1, 2**32, 2**32 + 1, 2**33, 2**63, 2**64 - 1]
    drawn = [draw_noise(shape, s) for s in seeds]
    for i in range(len(seeds)):
        for j in range(i):
            assert not torch.equal(drawn[i], drawn[j]), (seeds[i], seeds[j])
    assert torch.equal(draw_noise(shape, 2**63), draw_noise(shape, 2**63))   # deterministic
    big = draw_noise((16, 21, 60, 104), 2**40)
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1) < 0.01


def test_cli_seed_2_32_is_not_seed_0(models, tmp_path):
    latents = {}
    for seed in ("0", str(2**32)):
        path = tmp_path / f"{seed}.latent"
        assert _generate(models, tmp_path / f"{seed}.mp4", *SMALL, "--seed", seed,
                         "--save-latents", str(path)) == 0
        latents[seed] = load_file(str(path))["latent"]
    assert not torch.equal(latents["0"], latents[str(2**32)])


@pytest.mark.parametrize("low, needle", [
    (FILES["dit_i2v_low"], "i2v, 36 -> 16 channels"),
    (FILES["dit_ti2v"], "ti2v, 48 -> 48 channels"),
])
def test_a_mismatched_expert_pair_is_refused_before_loading(models, tmp_path, capsys,
                                                            no_model_loads, low, needle):
    assert _generate(models, tmp_path / "v.mp4", *SMALL, "--dit-low-noise", str(models / low),
                     dit=FILES["dit_t2v_high"]) == 2
    line = _one_error_line(capsys, "--dit-low-noise", Path(low).name, "--dit",
                           Path(FILES["dit_t2v_high"]).name, needle, "(t2v, 16 -> 16 channels")
    assert "must be the same model type and size" in line
    assert _snapshot(tmp_path) == {}


def test_the_moe_node_refuses_a_mismatched_pair(models):
    from wan_core.loading.on_demand import OnDemandDiT

    moe = load_pack().NODE_CLASS_MAPPINGS["WanCoreMoE"]()
    high = OnDemandDiT(models / FILES["dit_t2v_high"])
    low = OnDemandDiT(models / FILES["dit_i2v_low"])
    with pytest.raises(ValueError, match="do not belong together.*high-noise expert is custom "
                                         r"\(t2v.*low-noise expert is custom \(i2v"):
        moe.combine(high, low, 0.0, 4.0, 3.0)
    assert not high.loaded and not low.loaded


def _lora_file(folder: Path, name: str, tensors: dict) -> Path:
    folder.mkdir(exist_ok=True)
    save_file({f"diffusion_model.{k}": v for k, v in tensors.items()}, str(folder / name))
    return folder / name


@pytest.mark.parametrize("tensors, needles", [
    ({"blocks.0.ffn.0.lora_down.weight": torch.randn(8, 128),           # rank 8 vs 4
      "blocks.0.ffn.0.lora_up.weight": torch.randn(256, 4)},
     ["the factors of diffusion_model.blocks.0.ffn.0 do not fit each other",
      "up [256, 4] has 4 columns but down [8, 128] has 8 rows",
      "diffusion_model.blocks.0.ffn.0.lora_down.weight [8, 128]"]),
    ({"blocks.0.ffn.0.lora_down.weight": torch.randn(128, 4),           # transposed factors
      "blocks.0.ffn.0.lora_up.weight": torch.randn(4, 256)},
     ["do not fit each other", "lora_up.weight [4, 256]"]),
    ({"blocks.0.ffn.0.diff": torch.randn(128, 256)},                     # transposed diff
     ["layer blocks.0.ffn.0.weight has shape (256, 128)",
      "diffusion_model.blocks.0.ffn.0.diff [128, 256] make a delta of shape (128, 256)",
      "transposed or reshaped factors"]),
    ({"blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 64),       # another model size
      "blocks.0.self_attn.q.lora_up.weight": torch.randn(64, 4)},
     ["layer blocks.0.self_attn.q.weight has shape (128, 128)", "another model size"]),
    ({"blocks.0.ffn.0.lora_down.weight": torch.full((4, 128), float("nan")),
      "blocks.0.ffn.0.lora_up.weight": torch.randn(256, 4)},
     ["diffusion_model.blocks.0.ffn.0.lora_down.weight hold NaN", "the LoRA is damaged"]),
])
def test_malformed_loras_are_refused_before_the_model_loads(models, tmp_path, capsys,
                                                          only_loras_read, tensors, needles):
    lora = _lora_file(tmp_path / "loras", "bad_lora.safetensors", tensors)
    before = _snapshot(tmp_path)
    assert _generate(models, tmp_path / "v.mp4", *SMALL, "--lora", f"{lora}:0.7") == 2
    _one_error_line(capsys, "bad_lora.safetensors", *needles)
    assert _snapshot(tmp_path) == before


def test_malformed_loras_are_refused_by_apply_loras(models, tmp_path):
    from wan_core import apply_loras, load_dit
    from wan_core.loading.lora import LoRAError

    dit = load_dit(models / DIT)
    bad = {"diffusion_model.blocks.1.ffn.2.lora_down.weight": torch.randn(4, 256),
           "diffusion_model.blocks.1.ffn.2.lora_up.weight": torch.randn(4, 128)}
    with pytest.raises(LoRAError, match=r"up \[4, 128\] has 128 columns but down \[4, 256\]"):
        apply_loras(dit, [(bad, 1.0)])
    lokr = {"diffusion_model.blocks.0.ffn.0.lokr_w1": torch.randn(2, 2),
            "diffusion_model.blocks.0.ffn.0.lokr_w2_a": torch.randn(128, 4),
            "diffusion_model.blocks.0.ffn.0.lokr_w2_b": torch.randn(8, 64)}
    with pytest.raises(LoRAError, match=r"w2_a \[128, 4\] has 4 columns but w2_b \[8, 64\]"):
        apply_loras(dit, [(lokr, 1.0)])
    good = {"diffusion_model.blocks.0.ffn.0.lokr_w1": torch.randn(2, 2),
            "diffusion_model.blocks.0.ffn.0.lokr_w2_a": torch.randn(128, 4),
            "diffusion_model.blocks.0.ffn.0.lokr_w2_b": torch.randn(4, 64)}
    apply_loras(dit, [(good, 1.0)])                 # [2*128, 2*64] fits [256, 128]


def test_magcache_without_calibration_is_refused_before_the_other_models_load(
        models, tmp_path, capsys, monkeypatch):
    import wan_core

    def refuse(*args, **kwargs):
        raise AssertionError("loaded before the cache was checked")

    for name in ("load_vae", "load_text_encoder"):
        monkeypatch.setattr(wan_core, name, refuse)
    for method in ("magcache", "teacache"):
        assert _generate(models, tmp_path / "v.mp4", *SMALL, "--cache", method) == 2
        _run_error_line(capsys, f"{method} needs calibration data for this model (custom-",
                        "Use easycache", "--calibrate-cache FILE",
                        f"--cache {method} --cache-calibration FILE")
    assert _snapshot(tmp_path) == {}


def test_known_models_are_checked_for_calibration_from_their_config():
    from wan_core.models.configs import DiTConfig
    from wan_core.sampling import CacheSettings, check_calibration

    t2v_14b = DiTConfig(variant="wan2.1-t2v-14B")
    with pytest.raises(ValueError, match=r"magcache needs calibration data for this model "
                                         r"\(wan2.1-t2v-14B\+wan2.1-t2v-14B\)"):
        check_calibration(CacheSettings("magcache"), [t2v_14b, t2v_14b])
    check_calibration(CacheSettings("teacache"), [DiTConfig(variant="wan2.1-t2v-1.3B")])
    check_calibration(CacheSettings("easycache"), [t2v_14b])
    check_calibration(CacheSettings("magcache"), [DiTConfig()])     # custom: checked later

    class Handle:                     # what the model loader node outputs, before any read
        config = t2v_14b

    node = load_pack().NODE_CLASS_MAPPINGS["WanCoreStepCache"]()
    with pytest.raises(ValueError, match=r"magcache needs calibration data .*wan2.1-t2v-14B"):
        node.apply(Handle(), "magcache", 0.1, 0.2, 1.0)
    node.apply(Handle(), "teacache", 0.1, 0.2, 1.0)     # the published Wan 2.1 coefficients
    node.apply(Handle(), "easycache", 0.3, 0.2, 1.0)


def test_calibrate_cache_then_use_it_from_the_cli(models, tmp_path, capsys):
    table = tmp_path / "calibration.json"
    assert _generate(models, tmp_path / "a.mp4", *SMALL[:4], "--steps", "12",
                     "--calibrate-cache", str(table)) == 0
    assert "cache calibration saved to" in capsys.readouterr().out
    data = json.loads(table.read_text())
    (key, entry), = data.items()
    assert key.startswith("custom-") and len(entry["magcache"]["sigmas"]) == 12
    assert oct(table.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    for method in ("magcache", "teacache"):
        assert _generate(models, tmp_path / f"{method}.mp4", *SMALL[:4], "--steps", "12",
                         "--cache", method, "--cache-calibration", str(table),
                         "--cache-threshold", "5") == 0
        out = capsys.readouterr().out
        assert "step cache: skipped" in out and "skipped 0 of" not in out
    table.write_text("not json")
    assert _generate(models, tmp_path / "b.mp4", *SMALL, "--cache", "magcache",
                     "--cache-calibration", str(table)) == 2
    _one_error_line(capsys, "is not a cache calibration file")
    assert _generate(models, tmp_path / "b.mp4", *SMALL, "--calibrate-cache", str(table)) == 2
    _one_error_line(capsys, "is not a cache calibration file")
    assert not (tmp_path / "b.mp4").exists()


def _run_error_line(capsys, *needles) -> str:
    """After a run that sampled: exactly one ``error:`` line (progress bars aside)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("failing", ["latents", "video"])
def test_a_failed_write_leaves_no_output(models, tmp_path, capsys, monkeypatch, failing):
    import errno

    import wan_core.video_io as video_io

    out, latents = tmp_path / "v.mp4", tmp_path / "v.latent"
    if failing == "latents":
        real = Path.write_bytes

        def full_disk(self, data):
            if ".v.latent." in self.name:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, data)

        monkeypatch.setattr(Path, "write_bytes", full_disk)
    else:
        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(video_io, "_encode", full_disk)
    assert _generate(models, out, *SMALL, "--save-latents", str(latents)) == 2
    option = "--save-latents" if failing == "latents" else "--out"
    _run_error_line(capsys, f"{option}: could not write", "No space left on device",
                    "nothing was written")
    assert _snapshot(tmp_path) == {}


def test_latents_and_videos_get_the_same_permissions(models, tmp_path):
    out, latents = tmp_path / "v.mp4", tmp_path / "v.latent"
    assert _generate(models, out, *SMALL, "--save-latents", str(latents)) == 0
    expected = 0o666 & ~_umask()
    assert out.stat().st_mode & 0o777 == expected
    assert latents.stat().st_mode & 0o777 == expected


def test_ctrl_c_while_importing_exits_130_without_a_traceback(tmp_path):
    import subprocess
    import sys

    code = (
        "import importlib.abc, runpy, sys\n"
        "class Interrupt(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "sys.argv = ['wan_core', 'demo', '--out', sys.argv[1]]\n"
        "runpy.run_module('wan_core', run_name='__main__', alter_sys=True)\n")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d.mp4")], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "cancelled" and "Traceback" not in done.stderr
    assert _snapshot(tmp_path) == {}


def test_smaller_messages(models, tmp_path, capsys):
    # A LoRA strength that is not a number is named as such (not "file not found").
    lora = models / FILES["lora_t2v_high"]
    assert _generate(models, tmp_path / "v.mp4", "--lora", f"{lora}:abc") == 2
    _one_error_line(capsys, "--lora", "strength 'abc' after ':' is not a number")
    # Keys that match no layer, and a prompt cut at 512 tokens: 'warning:' lines.
    extra = _lora_file(tmp_path / "loras", "extra_lora.safetensors", {
        "blocks.0.ffn.0.lora_down.weight": torch.randn(4, 128) * 0.01,
        "blocks.0.ffn.0.lora_up.weight": torch.randn(256, 4) * 0.01,
        "blocks.0.not_a_layer.lora_down.weight": torch.randn(4, 128),
        "blocks.0.not_a_layer.lora_up.weight": torch.randn(256, 4)})
    assert main(["generate", "--dit", str(models / DIT), "--vae", str(models / FILES["vae21"]),
                 "--text-encoder", str(models / FILES["umt5"]), "--prompt", "a red circle " * 300,
                 "--out", str(tmp_path / "v.mp4"), *SMALL, "--lora", str(extra)]) == 0
    err = capsys.readouterr().err
    assert "warning: 'extra_lora.safetensors': 2 of 4 keys match no layer" in err
    assert "warning: prompt is " in err and "umT5 reads at most 512" in err


def test_a_gguf_missing_tensors_names_them(tmp_path):
    import gguf

    from tests.tiny_models import dit_state_dict, write_gguf
    from wan_core import load_dit

    sd = dit_state_dict("t2v", 3)
    for missing, needle in (("head.head.weight", "is missing head.head.weight"),
                            ("blocks.1.ffn.2.weight", "missing 1 tensor(s) of the detected "
                                                      "custom (t2v): blocks.1.ffn.2.weight")):
        path = tmp_path / f"no_{missing}.gguf"
        write_gguf(path, {k: v for k, v in sd.items() if k != missing},
                   lambda key: gguf.GGMLQuantizationType.Q8_0)
        with pytest.raises(CheckpointError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            load_dit(path)


def test_mistyped_options_and_a_missing_command_are_explained(capsys, no_model_loads):
    assert main(["demo", "--promt", "a red circle"]) == 2
    _one_error_line(capsys, "unrecognized arguments: --promt", "(did you mean --prompt?)")
    assert main(["generate", "--dit", "x", "--vae", "y", "--text-encoder", "z", "--prompt", "p",
                 "--sead", "3"]) == 2
    _one_error_line(capsys, "(did you mean --seed?)")
    assert main([]) == 2
    _one_error_line(capsys, "choose a command: generate (", "demo (")
    assert main(["demo", "--zzzzzz"]) == 2                       # nothing close: no guess
    assert "did you mean" not in _one_error_line(capsys, "unrecognized arguments: --zzzzzz")


def test_demo_talks_about_its_vocabulary_and_draws_an_i2v_first_frame(tmp_path, capsys):
    assert main(["demo", "--prompt", "a pink dog moving left on a blue background", "--steps",
                 "2", "--size", "64x64", "--out", str(tmp_path / "a.mp4")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning:")]
    assert len(warnings) == 1 and "'pink', 'dog'" in warnings[0]
    assert "shapes circle, square, triangle" in warnings[0]
    assert main(["demo", "--task", "i2v", "--steps", "2", "--prompt",
                 "a red circle moving left on a blue background",
                 "--out", str(tmp_path / "b.mp4")]) == 0
    assert "warning:" not in capsys.readouterr().err
    assert (tmp_path / "a.mp4").exists() and (tmp_path / "b.mp4").exists()
