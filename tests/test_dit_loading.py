"""Loading Wan DiT checkpoints: layouts, dtypes, variant detection, errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.dit_helpers import random_inputs, random_state_dict, tiny_config
from tests.reference import report
from wan_core.loading.checkpoint import CheckpointError
from wan_core.models.configs import DEFAULTS, DiTConfig, detect_dit_config
from wan_core.models.dit import WanDiT
from wan_core import load_dit
from wan_core.loading.dit_layouts import to_official_layout
from wan_core.ops import Linear

HEADS = {"num_heads": "4"}


def _run(model, inp):
    with torch.no_grad():
        return model(**inp)


@pytest.fixture(scope="module")
def i2v():
    """Tiny 2.1 I2V weights (the richest layout: image branch included) and inputs."""
    cfg = tiny_config("i2v")
    return cfg, random_state_dict(cfg), random_inputs(cfg)


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------

def _diffusers_layout(sd):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers(dict(sd))


def _save_sharded(sd, folder, config):
    keys = sorted(sd)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))


def test_every_layout_loads_to_identical_outputs(tmp_path, i2v):
    cfg, sd, inp = i2v
    expected = _run(load_dit(sd, num_heads=4), inp)

    official = tmp_path / "official.safetensors"
    save_file(sd, str(official), metadata=HEADS)
    prefixed = tmp_path / "comfy.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(prefixed),
              metadata=HEADS)
    diffusers_file = tmp_path / "diffusers.safetensors"
    save_file(_diffusers_layout(sd), str(diffusers_file), metadata=HEADS)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    _save_sharded(sd, sharded, {"num_heads": 4, "model_type": "i2v"})
    diffusers_sharded = tmp_path / "diffusers_sharded"
    diffusers_sharded.mkdir()
    _save_sharded(_diffusers_layout(sd), diffusers_sharded, {"num_attention_heads": 4})

    sources = {
        "official": official, "prefixed": prefixed, "diffusers": diffusers_file,
        "sharded folder": sharded, "sharded index": next(sharded.glob("*.index.json")),
        "diffusers sharded": diffusers_sharded,
    }
    for name, source in sources.items():
        model = load_dit(source)
        assert model.config.model_type == "i2v" and model.config.num_heads == 4, name
        assert torch.equal(_run(model, inp), expected), f"{name} layout differs"


def test_diffusers_names_round_trip(i2v):
    """Our diffusers->official renaming inverts diffusers' own official->diffusers converter,
    including the FLF2V position embedding diffusers calls pos_embed."""
    cfg = tiny_config("flf2v")
    sd = random_state_dict(cfg)
    diff = _diffusers_layout(sd)
    diff["condition_embedder.image_embedder.pos_embed"] = diff.pop("img_emb.emb_pos")
    back = to_official_layout(diff)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


# --------------------------------------------------------------------------------------------
# Dtypes
# --------------------------------------------------------------------------------------------

def _matrix_keys(sd):
    return [k for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2]


def _to_fp8(sd, fp8_dtype, scaled):
    out = {}
    fmax = torch.finfo(fp8_dtype).max
    for k, v in sd.items():
        if k in _matrix_keys(sd):
            if scaled:
                scale = v.abs().max() / fmax
                out[k] = (v / scale).to(fp8_dtype)
                out[k[: -len("weight")] + "scale_weight"] = scale.reshape(1).float()
            else:
                out[k] = v.to(fp8_dtype)
        else:
            out[k] = v.to(torch.bfloat16)
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=fp8_dtype)
    return out


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_half_precision_files_keep_their_dtype(tmp_path, i2v):
    cfg, sd, inp = i2v
    ref = _run(load_dit(sd, num_heads=4), inp)
    for dtype, bound in ((torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        path = tmp_path / f"{dtype}.safetensors"
        save_file({k: v.to(dtype) for k, v in sd.items()}, str(path), metadata=HEADS)
        model = load_dit(path)
        assert model.compute_dtype == dtype
        assert model.blocks[0].ffn[0].weight.dtype == dtype
        err = _rel_err(_run(model, inp), ref)
        report(f"dit {dtype} file vs fp32 (relative)", err, bound)
        assert err < bound
    up = load_dit(tmp_path / "torch.bfloat16.safetensors", dtype="fp32")
    assert up.compute_dtype == torch.float32 and up.blocks[0].ffn[0].weight.dtype == torch.float32


@pytest.mark.parametrize("fp8_name,scaled,bound", [
    ("float8_e4m3fn", False, 0.10), ("float8_e4m3fn", True, 0.10), ("float8_e5m2", False, 0.20),
])
def test_fp8_files_stay_fp8_and_track_bf16(tmp_path, i2v, fp8_name, scaled, bound):
    fp8 = getattr(torch, fp8_name)
    cfg, sd, inp = i2v
    bf16_path = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(bf16_path), metadata=HEADS)
    ref = _run(load_dit(bf16_path), inp)

    path = tmp_path / f"{fp8_name}_{scaled}.safetensors"
    save_file(_to_fp8(sd, fp8, scaled), str(path), metadata=HEADS)
    model = load_dit(path)
    assert model.compute_dtype == torch.bfloat16
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight.dtype == fp8 for m in linears)
    if scaled:
        assert all(m.scale_weight is not None for m in linears)
    out = _run(model, inp)
    assert torch.isfinite(out).all()
    err = _rel_err(out, ref)
    report(f"dit {fp8_name}{' scaled' if scaled else ''} vs bf16 (relative L2)", err, bound)
    assert err < bound


# --------------------------------------------------------------------------------------------
# Variant detection on full-size shapes (meta tensors: nothing is allocated)
# --------------------------------------------------------------------------------------------

FULL = {
    "wan2.1-t2v-1.3B": (dict(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12,
                             num_layers=30), 1.419e9),
    "wan2.1-t2v-14B": (dict(model_type="t2v", dim=5120, ffn_dim=13824, num_heads=40,
                            num_layers=40), 14.29e9),
    "wan2.1-i2v-14B": (dict(model_type="i2v", dim=5120, ffn_dim=13824, num_heads=40,
                            num_layers=40, in_dim=36, has_image_branch=True), 16.39e9),
    "wan2.1-flf2v-14B": (dict(model_type="flf2v", dim=5120, ffn_dim=13824, num_heads=40,
                              num_layers=40, in_dim=36, has_image_branch=True,
                              image_pos_tokens=514), 16.39e9),
    "wan2.2-i2v-A14B": (dict(model_type="i2v", dim=5120, ffn_dim=13824, num_heads=40,
                             num_layers=40, in_dim=36), 14.29e9),
    "wan2.2-ti2v-5B": (dict(model_type="ti2v", dim=3072, ffn_dim=14336, num_heads=24,
                            num_layers=30, in_dim=48, out_dim=48), 5.000e9),
}


@pytest.mark.parametrize("variant", sorted(FULL))
def test_full_size_variants_are_detected_from_shapes(variant):
    kwargs, published = FULL[variant]
    with torch.device("meta"):
        sd = WanDiT(DiTConfig(**kwargs)).state_dict()
    assert all(v.is_meta for v in sd.values())
    for layout in (sd, {"model.diffusion_model." + k: v for k, v in sd.items()},
                   {k: v.shape for k, v in sd.items()}):
        cfg = detect_dit_config(to_official_layout(layout))
        assert cfg.variant == variant
        for name, value in kwargs.items():
            assert getattr(cfg, name) == value, (variant, name)
        assert cfg.head_dim == 128
    count = sum(v.numel() for v in sd.values())
    assert cfg.num_params() == count
    assert abs(count - published) / published < 0.005, (variant, count)
    assert DEFAULTS.get(variant) is not None


def test_diffusers_full_size_detection():
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    with torch.device("meta"):
        sd = WanDiT(DiTConfig(**FULL["wan2.1-i2v-14B"][0])).state_dict()
    cfg = detect_dit_config(to_official_layout(convert_wan_transformer_to_diffusers(sd)))
    assert cfg.variant == "wan2.1-i2v-14B"


def test_moe_defaults_present():
    assert DEFAULTS["wan2.2-t2v-A14B"].boundary == 0.875
    assert DEFAULTS["wan2.2-i2v-A14B"].boundary == 0.900
    assert DEFAULTS["wan2.2-ti2v-5B"].frames == 121


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

def _save(path, tensors):
    save_file({k: torch.zeros(2, 2) for k in tensors}, str(path))
    return path


@pytest.mark.parametrize("keys,expected", [
    (["encoder.conv1.weight", "decoder.conv1.weight"], "is a Wan VAE"),
    (["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"], "umT5 text encoder"),
    (["visual.transformer.resblocks.0.attn.in_proj_weight", "visual.proj"], "CLIP vision"),
    (["diffusion_model.blocks.0.self_attn.q.lora_A.weight",
      "diffusion_model.blocks.0.self_attn.q.lora_B.weight"], "is a LoRA"),
    (["foo.bar", "foo.baz"], "unknown key layout.*foo.bar"),
])
def test_wrong_kind_of_file_is_named(tmp_path, keys, expected):
    with pytest.raises(CheckpointError, match=expected):
        load_dit(_save(tmp_path / "model.safetensors", keys))


def test_truncated_and_foreign_files(tmp_path, i2v):
    cfg, sd, _ = i2v
    path = tmp_path / "cut.safetensors"
    save_file(sd, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_dit(path)
    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a model " * 100)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_dit(text)


def test_incomplete_or_headless_checkpoints(tmp_path, i2v):
    cfg, sd, _ = i2v
    broken = dict(sd)
    del broken["blocks.1.ffn.2.weight"]
    with pytest.raises(CheckpointError, match="missing 1 tensor.*: blocks.1.ffn.2.weight; the "
                                              "file is incomplete"):
        load_dit(broken, num_heads=4)
    odd = tiny_config("t2v", dim=96, num_heads=3)       # 96 is not a multiple of 128
    with pytest.raises(CheckpointError, match="num_heads"):
        load_dit(random_state_dict(odd))
    assert load_dit(random_state_dict(odd), num_heads=3).config.head_dim == 32
    vace = dict(sd, **{"vace_blocks.0.before_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="missing tensor 'vace_patch_embedding.weight'"):
        load_dit(vace, num_heads=4)       # VACE blocks without their patch embedding
