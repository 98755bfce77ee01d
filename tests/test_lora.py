"""LoRAs: every published key layout against a reference merged by hand (the published rule
``W + strength * alpha / rank * up @ down``) and run through the official model (T2V) or
diffusers (the 2.1 I2V image branch), on tiny random checkpoints in the official layout."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from tests.dit_helpers import random_inputs, random_state_dict, tiny_config
from tests.reference import max_abs_err, report
from tests.test_dit import _diffusers_forward, _diffusers_model, _official_forward, _official_model
from tests.tiny_models import to_fp8_scaled
from wan_core import apply_loras, load_dit
from wan_core.loading.lora import LoRAError
from wan_core.ops.lora import LowRank

BOUND = 1e-4
RANK = 4

# Every kind of target a Wan LoRA touches (official module names; the block ones in block 1).
LINEARS = ["blocks.1.self_attn.q", "blocks.1.self_attn.k", "blocks.1.self_attn.v",
           "blocks.1.self_attn.o", "blocks.1.cross_attn.q", "blocks.1.cross_attn.k",
           "blocks.1.cross_attn.v", "blocks.1.cross_attn.o", "blocks.1.ffn.0", "blocks.1.ffn.2",
           "blocks.0.self_attn.q", "text_embedding.0", "text_embedding.2", "time_embedding.0",
           "time_embedding.2", "time_projection.1", "head.head"]
IMAGE_LINEARS = ["blocks.0.cross_attn.k_img", "blocks.1.cross_attn.v_img", "img_emb.proj.1",
                 "img_emb.proj.3"]
DIFFS = ["blocks.1.norm3.weight", "blocks.1.norm3.bias", "blocks.0.cross_attn.norm_q.weight",
         "blocks.1.self_attn.q.bias", "blocks.0.ffn.0.bias", "head.head.bias",
         "blocks.1.modulation", "head.modulation", "patch_embedding.bias"]


def _factors(sd, modules, rank, seed, scale=0.05):
    """Random (up, down, alpha) per module, shaped for its weight (convs: kernel on down)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        w = sd[m + ".weight"]
        down = torch.randn(rank, *w.shape[1:], generator=gen) * scale
        up = torch.randn(w.shape[0], rank, *([1] * (w.dim() - 2)), generator=gen) * scale
        out[m] = (up, down, float(rank * 2))
    return out


def _diffs(sd, params, seed, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    return {p: torch.randn(sd[p].shape, generator=gen) * scale for p in params}


def merged_by_hand(sd, factors=None, diffs=None, strength=1.0, use_alpha=True):
    """The reference: the published merge rule applied to a copy of the base state dict."""
    out = {k: v.clone() for k, v in sd.items()}
    for m, (up, down, alpha) in (factors or {}).items():
        w = out[m + ".weight"]
        scale = strength * (alpha / down.shape[0] if use_alpha else 1.0)
        out[m + ".weight"] = w + scale * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    for p, d in (diffs or {}).items():
        out[p] = out[p] + strength * d
    return out


# -- the layouts, written the way each tool writes them ------------------------------------

def comfy_layout(factors, diffs=None, prefix="diffusion_model."):
    out = {}
    for m, (up, down, alpha) in factors.items():
        out[f"{prefix}{m}.lora_down.weight"] = down
        out[f"{prefix}{m}.lora_up.weight"] = up
        out[f"{prefix}{m}.alpha"] = torch.tensor(alpha)
    for p, d in (diffs or {}).items():
        module, leaf = p.rsplit(".", 1)
        if leaf == "modulation":            # LightX2V: blocks.N.diff_m (and head.diff_m)
            out[f"{prefix}{module}.diff_m"] = d
        else:
            out[f"{prefix}{module}.{'diff' if leaf == 'weight' else 'diff_b'}"] = d
    return out


def official_ab_layout(factors):          # bare names, lora_A / lora_B, no alpha
    out = {}
    for m, (up, down, _) in factors.items():
        out[f"{m}.lora_A.weight"] = down
        out[f"{m}.lora_B.weight"] = up
    return out


def peft_default_layout(factors):
    out = {}
    for m, (up, down, alpha) in factors.items():
        out[f"diffusion_model.{m}.lora_A.default.weight"] = down
        out[f"diffusion_model.{m}.lora_B.default.weight"] = up
        out[f"diffusion_model.{m}.alpha"] = torch.tensor(alpha)
    return out


def kohya_layout(factors, prefix="lora_unet_"):
    out = {}
    for m, (up, down, alpha) in factors.items():
        name = prefix + m.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def diffusers_layout(factors):
    """diffusers / PEFT names, renamed by diffusers' own checkpoint converter."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    out = {}
    for m, (up, down, _) in factors.items():
        (new_key,) = convert_wan_transformer_to_diffusers({m + ".weight": down}).keys()
        name = new_key[: -len(".weight")]
        out[f"transformer.{name}.lora_A.weight"] = down
        out[f"transformer.{name}.lora_B.weight"] = up
    return out


LAYOUTS = {
    "comfyui": (comfy_layout, True),
    "comfyui_prefixed": (lambda f: comfy_layout(f, prefix="model.diffusion_model."), True),
    "official_lora_A_B_no_alpha": (official_ab_layout, False),
    "peft_default": (peft_default_layout, True),
    "kohya": (kohya_layout, True),
    "wan_fun_kohya": (lambda f: kohya_layout(f, prefix="lora_unet__"), True),
    "diffusers": (diffusers_layout, False),
}


def _t2v_case(seed=0):
    cfg = tiny_config("t2v")
    sd = random_state_dict(cfg, seed=seed)
    return cfg, sd, random_inputs(cfg)


def _run_ours(model, inp):
    with torch.no_grad():
        return model(**inp)


def _run_official(cfg, sd, inp):
    ref = _official_model(cfg, sd)
    return _official_forward(ref, inp, inp["t"][:, None].expand(-1, 3 * 4 * 6))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_matches_the_hand_merged_official_model(layout):
    if layout == "diffusers":
        pytest.importorskip("diffusers")
    cfg, sd, inp = _t2v_case()
    factors = _factors(sd, LINEARS + ["patch_embedding"], RANK, seed=3)
    write, use_alpha = LAYOUTS[layout]
    strength = 0.8
    base = load_dit(sd, num_heads=cfg.num_heads)
    ours = _run_ours(apply_loras(base, [(write(factors), strength)]), inp)
    ref = _run_official(cfg, merged_by_hand(sd, factors, strength=strength,
                                            use_alpha=use_alpha), inp)
    plain = _run_official(cfg, sd, inp)
    err = max_abs_err(ours, ref)
    report(f"lora {layout} vs hand-merged official", err, BOUND)
    assert err < BOUND
    assert max_abs_err(ref, plain) > 100 * BOUND          # the LoRA really changes the output


def test_lightx2v_full_deltas_on_weights_biases_norms_and_modulation():
    cfg, sd, inp = _t2v_case()
    factors = _factors(sd, LINEARS, 8, seed=4)
    diffs = _diffs(sd, DIFFS + ["patch_embedding.weight", "blocks.0.self_attn.k.weight"], seed=5)
    lora = comfy_layout(factors, diffs)
    assert "diffusion_model.blocks.1.diff_m" in lora and "diffusion_model.head.head.diff_b" in lora
    ours = _run_ours(apply_loras(load_dit(sd, num_heads=cfg.num_heads), [(lora, 1.0)]), inp)
    ref = _run_official(cfg, merged_by_hand(sd, factors, diffs), inp)
    err = max_abs_err(ours, ref)
    report("lora lightx2v diff/diff_b/diff_m vs hand-merged official", err, BOUND)
    assert err < BOUND


def test_lokr_and_loha_match_their_published_products():
    cfg, sd, inp = _t2v_case()
    gen = torch.Generator().manual_seed(6)
    r = lambda *s: torch.randn(*s, generator=gen) * 0.1   # noqa: E731
    lora, merged = {}, {k: v.clone() for k, v in sd.items()}
    # LoKr, whole w1 and low-rank w2 (alpha / rank of w2's factor), on a 128x128 weight
    w1, w2a, w2b, alpha = r(4, 4), r(32, 2), r(2, 32), 1.0
    key = "lora_unet_blocks_1_self_attn_q"
    lora.update({f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b,
                 f"{key}.alpha": torch.tensor(alpha)})
    merged["blocks.1.self_attn.q.weight"] += torch.kron(w1, w2a @ w2b) * alpha / 2
    # LoKr with both factors whole (no alpha scaling), on the 256x128 FFN input
    w1, w2 = r(2, 4), r(128, 32)
    lora.update({"lora_unet_blocks_1_ffn_0.lokr_w1": w1, "lora_unet_blocks_1_ffn_0.lokr_w2": w2,
                 "lora_unet_blocks_1_ffn_0.alpha": torch.tensor(8.0)})
    merged["blocks.1.ffn.0.weight"] += torch.kron(w1, w2)
    # LoHa
    a1, b1, a2, b2 = r(128, 3), r(3, 128), r(128, 3), r(3, 128)
    key = "lora_unet_blocks_0_cross_attn_o"
    lora.update({f"{key}.hada_w1_a": a1, f"{key}.hada_w1_b": b1, f"{key}.hada_w2_a": a2,
                 f"{key}.hada_w2_b": b2, f"{key}.alpha": torch.tensor(1.5)})
    merged["blocks.0.cross_attn.o.weight"] += (a1 @ b1) * (a2 @ b2) * 1.5 / 3
    ours = _run_ours(apply_loras(load_dit(sd, num_heads=cfg.num_heads), [(lora, 1.0)]), inp)
    err = max_abs_err(ours, _run_official(cfg, merged, inp))
    report("lora lokr + loha vs hand-merged official", err, BOUND)
    assert err < BOUND


def test_stacked_loras_add_their_deltas():
    cfg, sd, inp = _t2v_case()
    a = _factors(sd, LINEARS[:10], RANK, seed=7)
    b = _factors(sd, LINEARS[5:], 2 * RANK, seed=8)
    base = load_dit(sd, num_heads=cfg.num_heads)
    once = apply_loras(base, [(comfy_layout(a), 0.7), (kohya_layout(b), -0.4)])
    chained = apply_loras(apply_loras(base, [(comfy_layout(a), 0.7)]), [(kohya_layout(b), -0.4)])
    ref = _run_official(cfg, merged_by_hand(merged_by_hand(sd, a, strength=0.7), b,
                                            strength=-0.4), inp)
    for name, model in (("one call", once), ("chained nodes", chained)):
        err = max_abs_err(_run_ours(model, inp), ref)
        report(f"lora stacked ({name}) vs hand-merged official", err, BOUND)
        assert err < BOUND


def test_strength_zero_and_the_base_model_are_unchanged_and_nothing_is_copied():
    cfg, sd, inp = _t2v_case()
    base = load_dit(sd, num_heads=cfg.num_heads)
    before = _run_ours(base, inp)
    base_tensors = {k: (v.data_ptr(), v.clone()) for k, v in base.state_dict().items()}
    lora = comfy_layout(_factors(sd, LINEARS, RANK, seed=9), _diffs(sd, DIFFS, seed=10))

    zero = apply_loras(base, [(lora, 0.0)])
    assert torch.equal(_run_ours(zero, inp), before)

    patched = apply_loras(base, [(lora, 1.0)])
    assert max_abs_err(_run_ours(patched, inp), before) > 1e-3
    assert torch.equal(_run_ours(base, inp), before)               # the input model is intact
    for key, (ptr, value) in base_tensors.items():
        assert base.state_dict()[key].data_ptr() == ptr and torch.equal(base.state_dict()[key],
                                                                         value), key
    # every Linear weight is the base's own tensor; only small parameters were merged anew
    new_sd = patched.state_dict()
    for key, (ptr, _) in base_tensors.items():
        if key.endswith(".weight") and new_sd[key].dim() == 2:
            assert new_sd[key].data_ptr() == ptr, key
    copied = sum(v.numel() for k, v in new_sd.items() if v.data_ptr() != base_tensors[k][0])
    assert 0 < copied < 0.05 * sum(v.numel() for v in new_sd.values())


def test_i2v_image_branch_matches_hand_merged_diffusers():
    pytest.importorskip("diffusers")
    cfg = tiny_config("i2v")
    sd = random_state_dict(cfg)
    inp = random_inputs(cfg)
    factors = _factors(sd, IMAGE_LINEARS + LINEARS[:4], RANK, seed=11)
    diffs = _diffs(sd, ["blocks.0.cross_attn.norm_k_img.weight", "img_emb.proj.0.weight",
                        "img_emb.proj.4.bias"], seed=12)
    ours = _run_ours(apply_loras(load_dit(sd, num_heads=cfg.num_heads),
                                 [(comfy_layout(factors, diffs), 1.0)]), inp)
    ref_model, _ = _diffusers_model(cfg, merged_by_hand(sd, factors, diffs))
    plain_model, _ = _diffusers_model(cfg, sd)
    ref = _diffusers_forward(ref_model, cfg, inp)
    err = max_abs_err(ours, ref)
    report("lora i2v image branch vs hand-merged diffusers", err, BOUND)
    assert err < BOUND
    assert max_abs_err(ref, _diffusers_forward(plain_model, cfg, inp)) > 100 * BOUND


def test_fp8_scaled_base_keeps_a_small_lora_effect():
    """The delta is added to the dequantised weight in float32, never rounded into fp8."""
    cfg, sd, inp = _t2v_case()
    fp8 = to_fp8_scaled(sd)
    dequantised = {k: (v.float() * fp8[k[:-len("weight")] + "scale_weight"]
                       if v.dtype == torch.float8_e4m3fn and k.endswith(".weight") else v)
                   for k, v in fp8.items() if k != "scaled_fp8" and not k.endswith("scale_weight")}
    factors = _factors(sd, LINEARS, RANK, seed=13, scale=0.01)   # deltas far below fp8's step
    base = load_dit(fp8, dtype="fp32", num_heads=cfg.num_heads)
    patched = apply_loras(base, [(comfy_layout(factors), 1.0)])
    assert base.blocks[1].self_attn.q.weight.dtype == torch.float8_e4m3fn
    assert patched.blocks[1].self_attn.q.weight is base.blocks[1].self_attn.q.weight
    ref = _run_official(cfg, merged_by_hand(dequantised, factors), inp)
    err = max_abs_err(_run_ours(patched, inp), ref)
    report("lora on fp8_scaled base vs hand-merged official (dequantised)", err, BOUND)
    assert err < BOUND
    # Rounding the merged weight back into fp8 (what an in-place fp8 merge does) loses most of it
    w = dequantised["blocks.1.self_attn.q.weight"]
    up, down, alpha = factors["blocks.1.self_attn.q"]
    delta = alpha / RANK * up @ down
    scale = fp8["blocks.1.self_attn.q.scale_weight"]
    rounded = ((w + delta) / scale).to(torch.float8_e4m3fn).float() * scale - w
    assert (rounded - delta).abs().mean() > 0.5 * delta.abs().mean()


def test_expert_pair_gets_the_lora_on_the_chosen_expert_only():
    from wan_core.pipeline import MoEModel

    cfg, sd, inp = _t2v_case()
    high, low = load_dit(sd, num_heads=cfg.num_heads), load_dit(sd, num_heads=cfg.num_heads)
    pair = MoEModel(high, low, 0.875)
    lora = comfy_layout(_factors(sd, LINEARS, RANK, seed=14))
    only_low = apply_loras(pair, [(lora, 1.0)], expert="low_noise")
    assert only_low.high_noise is high and only_low.low_noise is not low
    assert isinstance(only_low, MoEModel) and only_low.boundary == 0.875
    both = apply_loras(pair, [(lora, 1.0)])
    assert both.high_noise is not high and both.low_noise is not low
    assert torch.equal(_run_ours(both.high_noise, inp), _run_ours(only_low.low_noise, inp))


def test_patched_layers_hold_the_lora_factors_not_a_weight_copy():
    cfg, sd, _ = _t2v_case()
    patched = apply_loras(load_dit(sd, num_heads=cfg.num_heads),
                          [(comfy_layout(_factors(sd, ["blocks.1.ffn.0"], RANK, seed=15)), 1.0)])
    (patch,) = patched.blocks[1].ffn[0].patches
    assert isinstance(patch, LowRank) and patch.up.shape == (256, RANK)
    assert "patches" not in " ".join(patched.state_dict())        # not saved with the model


# -- bad input ----------------------------------------------------------------------------------

def test_a_lora_for_another_model_size_names_the_layer_and_both_shapes():
    cfg, sd, _ = _t2v_case()
    other = random_state_dict(tiny_config("t2v", dim=64, ffn_dim=128, num_heads=2))
    lora = comfy_layout(_factors(other, ["blocks.0.self_attn.q"], RANK, seed=1))
    with pytest.raises(LoRAError, match=r"blocks\.0\.self_attn\.q\.weight has shape \(128, 128\)"
                                        r".*\(64, 64\).*another model size"):
        apply_loras(load_dit(sd, num_heads=cfg.num_heads), [(lora, 1.0)])


@pytest.mark.parametrize("kind", ["vae", "sdxl", "dit_checkpoint", "empty"])
def test_files_that_are_not_wan_dit_loras_are_refused(kind):
    cfg, sd, _ = _t2v_case()
    files = {
        "vae": {"encoder.conv1.weight": torch.zeros(2), "decoder.conv1.weight": torch.zeros(2),
                "conv1.weight": torch.zeros(2)},
        "sdxl": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                 "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
                 "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)},
        "dit_checkpoint": dict(sd),
        "empty": {},
    }
    message = {"vae": "is a Wan VAE, not a LoRA", "dit_checkpoint": "is a Wan diffusion model",
               "sdxl": "not a Wan DiT LoRA", "empty": "not a Wan DiT LoRA"}[kind]
    with pytest.raises(LoRAError, match=message):
        apply_loras(load_dit(sd, num_heads=cfg.num_heads), [(files[kind], 1.0)])


def test_a_partly_matching_lora_warns_with_the_count_and_first_keys(caplog):
    cfg, sd, inp = _t2v_case()
    lora = comfy_layout(_factors(sd, LINEARS[:3], RANK, seed=16))
    lora["diffusion_model.blocks.7.self_attn.q.lora_down.weight"] = torch.zeros(RANK, 128)
    lora["diffusion_model.blocks.7.self_attn.q.lora_up.weight"] = torch.zeros(128, RANK)
    lora["diffusion_model.vace_blocks.0.proj.lora_down.weight"] = torch.zeros(RANK, 128)
    lora["diffusion_model.vace_blocks.0.proj.lora_up.weight"] = torch.zeros(128, RANK)
    with caplog.at_level(logging.WARNING, logger="wan_core.lora"):
        apply_loras(load_dit(sd, num_heads=cfg.num_heads), [(lora, 1.0)])
    (record,) = [r for r in caplog.records if r.name == "wan_core.lora"]
    assert "4 of 13 keys match no layer" in record.getMessage()
    assert "blocks.7.self_attn.q" in record.getMessage()


@pytest.mark.parametrize("strength", [math.nan, math.inf, -math.inf, "strong"])
def test_bad_strength_is_an_error(strength):
    cfg, sd, _ = _t2v_case()
    lora = comfy_layout(_factors(sd, LINEARS[:1], RANK, seed=1))
    with pytest.raises(ValueError, match="strength must be"):
        apply_loras(load_dit(sd, num_heads=cfg.num_heads), [(lora, strength)])


# -- the node -------------------------------------------------------------------------------

def test_lora_node_chains_leaves_its_input_alone_and_never_reloads_the_base(models,
                                                                            monkeypatch):
    from tests.conftest import load_pack
    import wan_core.loading.dit as dit_loading
    import wan_core.loading.on_demand as on_demand

    pack = load_pack()
    monkeypatch.setenv("WANCORE_MODELS_DIR", str(models))
    nodes = pack.NODE_CLASS_MAPPINGS
    high = nodes["WanCoreModelLoader"]().load(     # fp8 weights, fp32 compute
        "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "fp32")["result"][0]
    low = nodes["WanCoreModelLoader"]().load(
        "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", "fp32")["result"][0]
    names = nodes["WanCoreLoRA"].INPUT_TYPES()["required"]["lora_name"][0]
    assert "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors" in names
    assert "wancore-demo/fast_lora.safetensors" in names               # the embedded demo LoRA
    node = nodes["WanCoreLoRA"]()
    lora_high = "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors"
    x = torch.randn(1, 16, 1, 4, 4)
    ctx = [torch.randn(5, high.config.text_dim)]
    t = torch.tensor([900.0])
    with torch.no_grad():
        before = high(x, t, ctx)          # the loader's model is read from its file here
        for module in (dit_loading, on_demand):
            monkeypatch.setattr(module, "load_dit", lambda *a, **k: pytest.fail("base reloaded"))
        (once,) = node.apply(high, lora_high, 1.0)
        (twice,) = node.apply(once, lora_high, 1.0)         # chained: the effect adds up
        (double,) = node.apply(high, lora_high, 2.0)        # a new strength: only this node
        assert torch.equal(high(x, t, ctx), before)
        assert max_abs_err(once(x, t, ctx), before) > 1e-3
        assert max_abs_err(twice(x, t, ctx), double(x, t, ctx)) < 1e-5
    (pair,) = nodes["WanCoreMoE"]().combine(high, low, 0.875, 1.0, 1.0)
    (only_low,) = node.apply(pair, "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors",
                             1.0, "low_noise")
    assert only_low.high_noise is high and only_low.low_noise is not low
    assert only_low.guide_scales == (1.0, 1.0) and only_low.offload is pair.offload
