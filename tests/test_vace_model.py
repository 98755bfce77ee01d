"""The VACE DiT (issue 25) against diffusers' WanVACETransformer3DModel: both hint plans,
per-block scales, batch 2, every key layout, separate VACE module files, several controls,
LoRA on VACE blocks, block streaming, and the errors (tiny random weights, fp32, CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.dit_helpers import random_inputs, random_state_dict, tiny_config
from tests.reference import max_abs_err, report
from wan_core import CheckpointError, apply_loras, load_dit
from wan_core.models.configs import vace_plan

BOUND = 1e-4
VACE_IN = 96


def vace_config(layers: int = 4, vace_blocks: int = 2):
    return tiny_config("vace", num_layers=layers, vace_layers=vace_plan(layers, vace_blocks),
                       vace_in_dim=VACE_IN)


def vace_inputs(cfg, batch: int = 2, frames: int = 3, seed: int = 5) -> dict:
    inp = random_inputs(cfg, batch=batch, frames=frames)
    gen = torch.Generator().manual_seed(seed)
    inp["vace_context"] = torch.randn(batch, VACE_IN, frames, 8, 12, generator=gen)
    return inp


def base_of(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("vace_")}


def module_of(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k.startswith("vace_")}


def diffusers_vace(cfg, sd):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers(dict(sd))
    model = diffusers.WanVACETransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
        text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers, cross_attn_norm=True, eps=cfg.eps,
        vace_layers=list(cfg.vace_layers), vace_in_channels=cfg.vace_in_dim)
    model.load_state_dict(converted, strict=True)
    return model.eval(), converted


def diffusers_forward(model, cfg, inp, scale):
    ctx = torch.stack([F.pad(c, (0, 0, 0, cfg.text_len - c.shape[0])) for c in inp["context"]])
    with torch.no_grad():
        return model(inp["x"], inp["t"], ctx, control_hidden_states=inp["vace_context"],
                     control_hidden_states_scale=scale, return_dict=False)[0]


@pytest.mark.parametrize("layers, vace_blocks, plan", [(4, 2, (0, 2)), (10, 2, (0, 5))])
def test_vace_dit_matches_diffusers_with_per_block_scales(layers, vace_blocks, plan):
    cfg = vace_config(layers, vace_blocks)
    assert cfg.vace_layers == plan
    sd = random_state_dict(cfg, seed=3)
    ours = load_dit(sd, num_heads=cfg.num_heads)
    assert ours.config.model_type == "vace" and ours.config.vace_layers == plan
    assert ours.config.vace_in_dim == VACE_IN
    ref, _ = diffusers_vace(cfg, sd)
    inp = vace_inputs(cfg)
    scales = torch.tensor([0.7, 1.3])
    with torch.no_grad():
        out = ours(**inp, vace_scale=scales.tolist())
    err = max_abs_err(out, diffusers_forward(ref, cfg, inp, scales))
    report(f"vace dit ({layers} layers, hints after {plan}) vs diffusers", err, BOUND)
    assert err < BOUND
    with torch.no_grad():       # a float scale is that scale for every VACE block
        out = ours(**inp, vace_scale=0.5)
    err = max_abs_err(out, diffusers_forward(ref, cfg, inp, torch.tensor([0.5, 0.5])))
    assert err < BOUND


def _layouts(sd, converted):
    from tests.tiny_models import to_fp8_scaled

    half = {k: v.half() for k, v in sd.items()}
    return {
        "official": (sd, sd),
        "comfyui prefix": ({f"model.diffusion_model.{k}": v for k, v in sd.items()}, sd),
        "diffusers": (converted, sd),
        "comfyui fp16": ({f"model.diffusion_model.{k}": v for k, v in half.items()},
                         {k: v.float() for k, v in half.items()}),
        "comfyui fp8_scaled": (to_fp8_scaled(sd), None),
    }


def test_every_layout_loads_the_same_vace_model():
    cfg = vace_config()
    sd = random_state_dict(cfg, seed=4)
    _, converted = diffusers_vace(cfg, sd)
    inp = vace_inputs(cfg)
    reference = load_dit(sd, num_heads=cfg.num_heads)
    with torch.no_grad():
        expected = reference(**inp)
    for name, (layout, weights) in _layouts(sd, converted).items():
        model = load_dit(layout, num_heads=cfg.num_heads, dtype="fp32")
        assert model.config.vace_layers == cfg.vace_layers, name
        if weights is None:           # fp8: the reference is the weights rounded the same way
            fp8 = to_fp8_scaled_reference(layout)
            with torch.no_grad():
                expected_here = load_dit(fp8, num_heads=cfg.num_heads)(**inp)
        else:
            with torch.no_grad():
                expected_here = load_dit(weights, num_heads=cfg.num_heads)(**inp)
        with torch.no_grad():
            out = model(**inp)
        err = max_abs_err(out, expected_here)
        report(f"vace layout {name}", err, BOUND)
        assert err < BOUND, name
        if name == "official":
            assert torch.equal(out, expected)


def to_fp8_scaled_reference(layout: dict) -> dict:
    """The fp32 weights an fp8_scaled file stands for (fp8 value x scale)."""
    out = {}
    for key, value in layout.items():
        if key == "scaled_fp8" or key.endswith(".scale_weight"):
            continue
        scale = layout.get(key[: -len("weight")] + "scale_weight")
        out[key] = value.float() * scale if scale is not None else value.float()
    return out


def test_a_gguf_vace_model_matches_its_dequantised_weights(tmp_path):
    import gguf

    from tests.tiny_models import write_gguf

    cfg = vace_config()
    sd = random_state_dict(cfg, seed=6)
    reference = write_gguf(tmp_path / "vace.gguf", sd, lambda key: gguf.GGMLQuantizationType.Q8_0)
    model = load_dit(tmp_path / "vace.gguf", num_heads=cfg.num_heads, dtype="fp32")
    assert model.config.vace_layers == cfg.vace_layers
    assert getattr(model.vace_blocks[1].self_attn.q, "qtype", None) is not None   # quantised
    inp = vace_inputs(cfg)
    with torch.no_grad():
        err = max_abs_err(model(**inp), load_dit(reference, num_heads=cfg.num_heads)(**inp))
    report("vace gguf Q8_0 vs its dequantised weights", err, BOUND)
    assert err < BOUND


def test_a_vace_module_file_attached_to_its_base_equals_the_whole_model(tmp_path):
    from safetensors.torch import save_file

    cfg = vace_config()
    sd = random_state_dict(cfg, seed=7)
    save_file(base_of(sd), str(tmp_path / "base.safetensors"))
    _, converted = diffusers_vace(cfg, sd)
    # The wrapper's module files: official names; also diffusers names and a ComfyUI prefix.
    modules = {"official": module_of(sd),
               "diffusers": {k: v for k, v in converted.items() if k.startswith("vace_")},
               "prefixed": {f"model.diffusion_model.{k}": v for k, v in module_of(sd).items()}}
    inp = vace_inputs(cfg)
    with torch.no_grad():
        expected = load_dit(sd, num_heads=cfg.num_heads)(**inp)
    for name, module in modules.items():
        path = tmp_path / f"vace_module_{name}.safetensors"
        save_file({k: v.contiguous() for k, v in module.items()}, str(path))
        model = load_dit(tmp_path / "base.safetensors", num_heads=cfg.num_heads,
                         vace_module=path)
        assert model.config.model_type == "vace"
        with torch.no_grad():
            assert torch.equal(model(**inp), expected), name


def test_scale_zero_and_no_control_equal_the_base_model():
    cfg = vace_config()
    sd = random_state_dict(cfg, seed=8)
    vace, base = load_dit(sd, num_heads=cfg.num_heads), load_dit(base_of(sd),
                                                                 num_heads=cfg.num_heads)
    assert base.config.model_type == "t2v"
    inp = vace_inputs(cfg)
    plain = {k: v for k, v in inp.items() if k != "vace_context"}
    with torch.no_grad():
        expected = base(**plain)
        assert torch.equal(vace(**plain), expected)
        assert max_abs_err(vace(**inp, vace_scale=0.0), expected) < BOUND
        assert max_abs_err(vace(**inp, vace_scale=1.0), expected) > 1e-3   # it does steer


def _hand_reference(ref, cfg, inp, controls):
    """Several controls, ComfyUI's rule, built from diffusers' own blocks: each control runs
    through the VACE blocks alone; after main block plan[k] the hints of all controls, each
    times its scale, are added."""
    ctx = torch.stack([F.pad(c, (0, 0, 0, cfg.text_len - c.shape[0])) for c in inp["context"]])
    with torch.no_grad():
        x = inp["x"]
        rotary = ref.rope(x)
        hidden = ref.patch_embedding(x).flatten(2).transpose(1, 2)
        temb, proj, text, _ = ref.condition_embedder(inp["t"], ctx, None)
        proj = proj.unflatten(1, (6, -1))
        hints = []
        for context, scale in controls:
            c = ref.vace_patch_embedding(context).flatten(2).transpose(1, 2)
            per_block = []
            for block in ref.vace_blocks:
                h, c = block(hidden, text, c, proj, rotary)
                per_block.append(h)
            hints.append((per_block, scale))
        for i, block in enumerate(ref.blocks):
            hidden = block(hidden, text, proj, rotary)
            if i in cfg.vace_layers:
                k = cfg.vace_layers.index(i)
                for per_block, scale in hints:
                    hidden = hidden + per_block[k] * scale[k]
        shift, scale = (ref.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = ref.proj_out(ref.norm_out(hidden.float()) * (1 + scale) + shift)
        b, _, f, hh, ww = x.shape
        hidden = hidden.reshape(b, f, hh // 2, ww // 2, 1, 2, 2, -1)
        return hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def test_several_controls_sum_their_hints():
    cfg = vace_config()
    sd = random_state_dict(cfg, seed=9)
    ours = load_dit(sd, num_heads=cfg.num_heads)
    ref, _ = diffusers_vace(cfg, sd)
    inp = vace_inputs(cfg)
    second = torch.randn(1, VACE_IN, 3, 8, 12, generator=torch.Generator().manual_seed(11))
    controls = [(inp["vace_context"], [0.8, 1.1]), (second.expand(2, -1, -1, -1, -1), [0.5, 0.5])]
    expected = _hand_reference(ref, cfg, inp, controls)
    with torch.no_grad():
        out = ours(inp["x"], inp["t"], inp["context"],
                   vace_context=[inp["vace_context"], second], vace_scale=[[0.8, 1.1], 0.5])
    err = max_abs_err(out, expected)
    report("vace two controls vs a hand-built reference from diffusers' blocks", err, BOUND)
    assert err < BOUND
    with torch.no_grad():       # one control in a list is that control
        single = ours(**inp, vace_scale=[0.8, 1.1])
        listed = ours(inp["x"], inp["t"], inp["context"], vace_context=[inp["vace_context"]],
                      vace_scale=[[0.8, 1.1]])
    assert torch.equal(single, listed)


def test_fewer_control_frames_are_zero_padded_like_diffusers():
    cfg = vace_config()
    sd = random_state_dict(cfg, seed=10)
    ours, (ref, _) = load_dit(sd, num_heads=cfg.num_heads), diffusers_vace(cfg, sd)
    inp = vace_inputs(cfg)
    inp["vace_context"] = inp["vace_context"][:, :, :2]
    with torch.no_grad():
        err = max_abs_err(ours(**inp), diffusers_forward(ref, cfg, inp, torch.ones(2)))
    assert err < BOUND


def test_lora_on_vace_blocks_and_block_streaming():
    from wan_core.ops.streaming import BlockStreaming, place

    cfg = vace_config()
    sd = random_state_dict(cfg, seed=12)
    model = load_dit(sd, num_heads=cfg.num_heads)
    gen = torch.Generator().manual_seed(2)
    down, up = torch.randn(4, cfg.dim, generator=gen), torch.randn(cfg.dim, 4, generator=gen)
    official = {"diffusion_model.vace_blocks.1.self_attn.q.lora_down.weight": down,
                "diffusion_model.vace_blocks.1.self_attn.q.lora_up.weight": up}
    peft = {"transformer.vace_blocks.0.attn1.to_q.lora_A.weight": down,    # diffusers / PEFT
            "transformer.vace_blocks.0.attn1.to_q.lora_B.weight": up,
            "transformer.vace_blocks.0.proj_in.lora_A.weight": down,
            "transformer.vace_blocks.0.proj_in.lora_B.weight": up}
    merged = dict(sd)
    for key in ("vace_blocks.1.self_attn.q.weight", "vace_blocks.0.self_attn.q.weight",
                "vace_blocks.0.before_proj.weight"):
        merged[key] = sd[key] + 0.3 * up @ down
    inp = vace_inputs(cfg)
    patched = apply_loras(model, [(official, 0.3), (peft, 0.3)])
    with torch.no_grad():
        out = patched(**inp)
        err = max_abs_err(out, load_dit(merged, num_heads=cfg.num_heads)(**inp))
    report("vace LoRA on VACE blocks vs merged weights", err, BOUND)
    assert err < BOUND
    patched.block_streaming = BlockStreaming(resident=1)
    place(patched, "cpu")
    with torch.no_grad():
        assert torch.equal(patched(**inp), out)         # streamed: the same bytes, same output
    streamer = patched._block_streamer
    assert len(streamer.blocks) == cfg.num_layers + len(cfg.vace_layers)
    assert streamer.peak_streamed <= 2


def test_vace_errors_are_clear(tmp_path):
    from safetensors.torch import save_file

    cfg = vace_config()
    sd = random_state_dict(cfg, seed=13)
    base = load_dit(base_of(sd), num_heads=cfg.num_heads)
    inp = vace_inputs(cfg)
    with pytest.raises(ValueError, match="this model has no VACE weights"):
        base(**inp)
    vace = load_dit(sd, num_heads=cfg.num_heads)
    with pytest.raises(ValueError, match=r"\[B, 96, F, H, W\]; got \[2, 16, 3, 8, 12\]"):
        vace(**dict(inp, vace_context=inp["x"]))
    with pytest.raises(ValueError, match="does not fit the latent"):
        vace(**dict(inp, vace_context=inp["vace_context"][..., :8]))
    with pytest.raises(ValueError, match="one per VACE block"):
        vace(**inp, vace_scale=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="2 VACE controls need 2 scales"):
        vace(inp["x"], inp["t"], inp["context"], vace_context=[inp["vace_context"]] * 2,
             vace_scale=[1.0, 1.0, 1.0])

    save_file(base_of(sd), str(tmp_path / "base.safetensors"))
    save_file(module_of(sd), str(tmp_path / "module.safetensors"))
    with pytest.raises(CheckpointError, match="'module.safetensors' is a VACE module.*needs a "
                                              "base Wan 2.1 T2V model"):
        load_dit(tmp_path / "module.safetensors")
    big = random_state_dict(tiny_config("vace", dim=256, num_layers=4, vace_in_dim=VACE_IN,
                                        vace_layers=(0, 2)), seed=1)
    save_file(module_of(big), str(tmp_path / "module_256.safetensors"))
    with pytest.raises(CheckpointError, match="VACE module for a dim-256 model.*has dim 128"):
        load_dit(tmp_path / "base.safetensors", vace_module=tmp_path / "module_256.safetensors",
                 num_heads=4)
    with pytest.raises(CheckpointError, match="is not a VACE module"):
        load_dit(tmp_path / "base.safetensors", vace_module=tmp_path / "base.safetensors",
                 num_heads=4)
    save_file(sd, str(tmp_path / "whole.safetensors"))
    with pytest.raises(CheckpointError, match="already has VACE weights"):
        load_dit(tmp_path / "whole.safetensors", vace_module=tmp_path / "module.safetensors",
                 num_heads=4)
