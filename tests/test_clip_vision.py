"""CLIP vision encoder: parity with transformers CLIPVisionModel and open_clip's visual tower,
the three key layouts, preprocessing, and the errors for wrong files."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.reference import max_abs_err, report
from wan_core.loading.checkpoint import CheckpointError
from wan_core import load_clip_vision
from wan_core.models.clip_vision import CLIP_MEAN, CLIP_STD

BOUND = 1e-5
# Tiny ViT: width 128 -> 2 heads of 64 (the width/64 rule), 42 px images of 14 px patches.
WIDTH, LAYERS, MLP, PATCH, SIZE = 128, 3, 256, 14, 42
TOKENS = (SIZE // PATCH) ** 2 + 1


@pytest.fixture(scope="module")
def hf_model():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
                           num_attention_heads=WIDTH // 64, image_size=SIZE, patch_size=PATCH,
                           hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=16)
    model = CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and "weight" in name else 0))
    return model


@pytest.fixture(scope="module")
def hf_sd(hf_model):
    """ComfyUI's clip_vision_h.safetensors layout: vision_model.* plus the projection."""
    sd = {"vision_model." + k.removeprefix("vision_model."): v.clone()
          for k, v in hf_model.state_dict().items()}
    sd["visual_projection.weight"] = torch.zeros(16, WIDTH)
    return sd


def _hf_penultimate(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


def _pixels(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g)


def _wan_layout(hf_sd):
    """The official Wan CLIP layout (visual.*, fused to_qkv), built from the HF weights."""
    v = {k[len("vision_model."):]: t for k, t in hf_sd.items() if k.startswith("vision_model.")}
    out = {"visual.patch_embedding.weight": v["embeddings.patch_embedding.weight"],
           "visual.cls_embedding": v["embeddings.class_embedding"].view(1, 1, -1),
           "visual.pos_embedding": v["embeddings.position_embedding.weight"][None],
           "visual.pre_norm.weight": v["pre_layrnorm.weight"],
           "visual.pre_norm.bias": v["pre_layrnorm.bias"],
           "visual.post_norm.weight": v["post_layernorm.weight"],
           "visual.post_norm.bias": v["post_layernorm.bias"],
           "visual.head": torch.zeros(WIDTH, 16),
           "textual.token_embedding.weight": torch.zeros(10, 8),
           "log_scale": torch.zeros(())}
    for i in range(LAYERS):
        src, dst = f"encoder.layers.{i}.", f"visual.transformer.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.to_qkv.{kind}"] = torch.cat(
                [v[src + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
            out[dst + f"attn.proj.{kind}"] = v[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"norm1.{kind}"] = v[src + f"layer_norm1.{kind}"]
            out[dst + f"norm2.{kind}"] = v[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.0.{kind}"] = v[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.2.{kind}"] = v[src + f"mlp.fc2.{kind}"]
    return out


def test_parity_transformers(hf_model, hf_sd):
    cv = load_clip_vision(hf_sd)
    cfg = cv.config
    assert (cfg.width, cfg.num_layers, cfg.num_heads, cfg.mlp_dim, cfg.patch_size, cfg.image_size) \
        == (WIDTH, LAYERS, WIDTH // 64, MLP, PATCH, SIZE)
    assert len(cv.blocks) == LAYERS - 1  # the last block is never run, so never loaded
    pixels = _pixels()
    with torch.no_grad():
        ours = cv(pixels)
    ref = _hf_penultimate(hf_model, pixels)
    assert ours.shape == (2, TOKENS, WIDTH)
    err = max_abs_err(ours, ref)
    report("CLIP vision vs transformers CLIPVisionModel hidden_states[-2]", err, BOUND)
    assert err < BOUND


def test_wan_layout_file_matches(tmp_path, hf_sd):
    path = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save(_wan_layout(hf_sd), path)
    pixels = _pixels()
    with torch.no_grad():
        a = load_clip_vision(path)(pixels)
        b = load_clip_vision(hf_sd)(pixels)
    assert max_abs_err(a, b) < 1e-6


def _import_open_clip_transformer():
    """open_clip's transformer.py without its package __init__ (which needs torchvision, not
    installable here); the one torchvision symbol it imports is stubbed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip is not installed: pip install --no-deps open-clip-torch")
    root = Path(list(spec.submodule_search_locations)[0])
    saved = {n: sys.modules.get(n) for n in ("open_clip", "open_clip.utils", "open_clip.pos_embed",
                                             "open_clip.transformer", "torchvision",
                                             "torchvision.ops", "torchvision.ops.misc")}
    try:
        if importlib.util.find_spec("torchvision") is None:
            misc = types.ModuleType("torchvision.ops.misc")
            misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
            ops = types.ModuleType("torchvision.ops")
            ops.misc = misc
            tv = types.ModuleType("torchvision")
            tv.ops = ops
            sys.modules.update({"torchvision": tv, "torchvision.ops": ops,
                                "torchvision.ops.misc": misc})
        package = types.ModuleType("open_clip")
        package.__path__ = [str(root)]
        sys.modules["open_clip"] = package
        return importlib.import_module("open_clip.transformer")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def test_parity_open_clip():
    oc = _import_open_clip_transformer()
    torch.manual_seed(1)
    ref = oc.VisionTransformer(image_size=SIZE, patch_size=PATCH, width=WIDTH, layers=LAYERS,
                               heads=WIDTH // 64, mlp_ratio=MLP / WIDTH, output_dim=16,
                               act_layer=torch.nn.GELU).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "ln" in name and "weight" in name else 0))
    sd = {"visual." + k: v for k, v in ref.state_dict().items()}
    sd["token_embedding.weight"] = torch.zeros(10, 8)  # a full open_clip file has a text tower
    pixels = _pixels(seed=3)
    with torch.no_grad():
        out = ref.forward_intermediates(pixels, indices=[LAYERS - 2], output_fmt="NLC",
                                        output_extra_tokens=True, intermediates_only=True)
        expected = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], 1)
        ours = load_clip_vision(sd)(pixels)
    err = max_abs_err(ours, expected)
    report("CLIP vision vs open_clip VisionTransformer (penultimate block)", err, BOUND)
    assert err < BOUND


def test_encode_preprocessing(hf_model, hf_sd):
    cv = load_clip_vision(hf_sd)
    g = torch.Generator().manual_seed(5)
    image = torch.rand(2, 50, 37, 3, generator=g)  # ComfyUI IMAGE, any size, 0..1
    pixels = F.interpolate(image.permute(0, 3, 1, 2), size=(SIZE, SIZE), mode="bicubic",
                           align_corners=False)
    pixels = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected = _hf_penultimate(hf_model, pixels)
    assert max_abs_err(cv.encode(image), expected) < BOUND
    # Wan's own frames: channels-first in [-1, 1] (the official path resizes before mapping).
    frames = image.permute(0, 3, 1, 2) * 2 - 1
    assert max_abs_err(cv.encode(frames, value_range=(-1, 1)), expected) < BOUND
    rgba = torch.cat([image, torch.ones_like(image[..., :1])], -1)
    assert max_abs_err(cv.encode(rgba), expected) < BOUND


def test_safetensors_half_and_fp8(tmp_path, hf_sd):
    path = tmp_path / "clip_vision_h.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in hf_sd.items()}, str(path))
    cv = load_clip_vision(path)
    assert cv.dtype == torch.float16
    pixels = _pixels()
    ref = load_clip_vision(hf_sd)(pixels)
    with torch.no_grad():
        assert max_abs_err(cv(pixels).float(), ref) < 0.05
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 and "proj" in k or "fc" in k else v)
           for k, v in hf_sd.items()}
    cv8 = load_clip_vision(fp8, dtype=torch.float32)
    assert cv8.blocks[0].attn.q.weight.dtype == torch.float8_e4m3fn
    assert torch.isfinite(cv8.encode(torch.rand(1, SIZE, SIZE, 3))).all()


def test_bare_transformers_keys(hf_model, hf_sd):
    bare = {k: v for k, v in hf_model.state_dict().items()}  # transformers 5 state_dict()
    pixels = _pixels()
    with torch.no_grad():
        assert max_abs_err(load_clip_vision(bare)(pixels), load_clip_vision(hf_sd)(pixels)) == 0


def test_num_heads_override(hf_sd):
    cv = load_clip_vision(hf_sd, num_heads=4)
    assert cv.config.num_heads == 4 and cv.blocks[0].attn.num_heads == 4


def test_wrong_model_errors():
    dit = {"model.diffusion_model.patch_embedding.weight": torch.zeros(1),
           "model.diffusion_model.head.head.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="diffusion model.*not a CLIP vision encoder"):
        load_clip_vision(dit)
    vae = {"encoder.conv1.weight": torch.zeros(1), "decoder.conv1.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="Wan VAE, not a CLIP vision encoder"):
        load_clip_vision(vae)
    t5 = {"shared.weight": torch.zeros(1), "encoder.final_layer_norm.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="umT5 text encoder, not a CLIP vision encoder"):
        load_clip_vision(t5)
