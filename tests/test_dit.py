"""Parity of wan_core's DiT with the official Wan code and with diffusers (tiny, fp32, CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.dit_helpers import random_inputs, random_state_dict, tiny_config
from tests.reference import max_abs_err, official, report
from wan_core.models.attention import AttentionBackendError, attention
from wan_core.models.dit import WanDiT
from wan_core import load_dit

BOUND = 1e-4


def _official_model(cfg, sd):
    WanModel = official("modules.model").WanModel
    model = WanModel(model_type=cfg.model_type, patch_size=cfg.patch_size, in_dim=cfg.in_dim,
                     dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim,
                     text_dim=cfg.text_dim, out_dim=cfg.out_dim, num_heads=cfg.num_heads,
                     num_layers=cfg.num_layers)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _official_forward(model, inp, t_tokens):
    """The official forward takes lists and a [B, L] timestep (its [B] path only works for
    B == 1)."""
    x = inp["x"]
    seq_len = t_tokens.shape[1]
    with torch.no_grad():
        out = model(list(x), t_tokens, inp["context"], seq_len=seq_len)
    return torch.stack(out)


def test_t2v_matches_official():
    cfg = tiny_config("t2v")
    sd = random_state_dict(cfg)
    inp = random_inputs(cfg)
    ours = load_dit(sd, num_heads=cfg.num_heads)
    ref = _official_model(cfg, sd)
    tokens = 3 * 4 * 6
    ref_out = _official_forward(ref, inp, inp["t"][:, None].expand(-1, tokens))
    with torch.no_grad():
        out = ours(**inp)
    assert out.dtype == torch.float32 and out.shape == ref_out.shape
    err = max_abs_err(out, ref_out)
    report("dit t2v vs official wan22", err, BOUND)
    assert err < BOUND


def test_ti2v_per_token_timesteps_match_official():
    cfg = tiny_config("ti2v")
    sd = random_state_dict(cfg)
    inp = random_inputs(cfg)
    ours = load_dit(sd, num_heads=cfg.num_heads)
    assert ours.config.model_type == "ti2v"
    ref = _official_model(cfg, sd)
    b, (f, h, w) = 2, (3, 4, 6)
    t = inp["t"][:, None, None].expand(b, f, h * w).clone()
    t[:, 0] = 0.0                                  # the given first frame is clean
    t = t.reshape(b, -1)
    ref_out = _official_forward(ref, inp, t)
    with torch.no_grad():
        out = ours(inp["x"], t, inp["context"])
    err = max_abs_err(out, ref_out)
    report("dit ti2v per-token t vs official wan22", err, BOUND)
    assert err < BOUND


def _diffusers_model(cfg, sd):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers(dict(sd))
    if "img_emb.emb_pos" in converted:      # diffusers' converter leaves this key unrenamed
        converted["condition_embedder.image_embedder.pos_embed"] = converted.pop("img_emb.emb_pos")
    model = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
        text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers, cross_attn_norm=True, eps=cfg.eps,
        image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim,
        pos_embed_seq_len=cfg.image_pos_tokens or None)
    model.load_state_dict(converted, strict=True)
    return model.eval(), converted


def _diffusers_forward(model, cfg, inp):
    ctx = torch.stack([F.pad(c, (0, 0, 0, cfg.text_len - c.shape[0])) for c in inp["context"]])
    clip = inp["clip_fea"]
    if cfg.image_pos_tokens:        # diffusers takes [2B, tokens/2, C] (start, end) and folds
        clip = clip.reshape(-1, clip.shape[1] // 2, clip.shape[2])
    with torch.no_grad():
        return model(torch.cat([inp["x"], inp["y"]], 1), inp["t"], ctx, clip,
                     return_dict=False)[0]


@pytest.mark.parametrize("model_type", ["i2v", "flf2v"])
def test_image_models_match_diffusers(model_type):
    cfg = tiny_config(model_type)
    sd = random_state_dict(cfg)
    inp = random_inputs(cfg)
    ours = load_dit(sd, num_heads=cfg.num_heads)
    assert ours.config.model_type == model_type and ours.config.has_image_branch
    ref, _ = _diffusers_model(cfg, sd)
    ref_out = _diffusers_forward(ref, cfg, inp)
    with torch.no_grad():
        out = ours(**inp)
    err = max_abs_err(out, ref_out)
    report(f"dit {model_type} vs diffusers", err, BOUND)
    assert err < BOUND


def test_batch_equals_single_samples():
    cfg = tiny_config("t2v")
    model = load_dit(random_state_dict(cfg), num_heads=cfg.num_heads)
    inp = random_inputs(cfg)
    with torch.no_grad():
        both = model(**inp)
        first = model(inp["x"][:1], inp["t"][:1], inp["context"][:1])
    assert max_abs_err(both[:1], first) < 1e-5


def test_context_tensor_and_list_agree():
    cfg = tiny_config("t2v")
    model = load_dit(random_state_dict(cfg), num_heads=cfg.num_heads)
    inp = random_inputs(cfg, text_tokens=(9, 9))
    with torch.no_grad():
        a = model(inp["x"], inp["t"], inp["context"])
        b = model(inp["x"], inp["t"], torch.stack(inp["context"]))
    assert torch.equal(a, b)


def test_bad_inputs_give_clear_errors():
    cfg = tiny_config("i2v")
    model = load_dit(random_state_dict(cfg), num_heads=cfg.num_heads)
    inp = random_inputs(cfg)
    with pytest.raises(ValueError, match="36 input channels"):
        model(inp["x"], inp["t"], inp["context"])
    with pytest.raises(ValueError, match="divisible by the patch"):
        model(inp["x"][..., :7], inp["t"], inp["context"], y=inp["y"][..., :7])
    with pytest.raises(ValueError, match="at most 512"):
        model(inp["x"], inp["t"], [torch.zeros(600, cfg.text_dim)] * 2, y=inp["y"])


def test_attention_backends():
    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(attention(q, k, v), ref)
    with pytest.raises(AttentionBackendError, match="unknown attention backend"):
        attention(q, k, v, backend="xformers-magic")
    import importlib.util
    if importlib.util.find_spec("sageattention") is None:
        with pytest.raises(AttentionBackendError, match="not installed"):
            load_dit(random_state_dict(tiny_config()), num_heads=4, attention="sage")


def test_meta_build_allocates_nothing():
    with torch.device("meta"):
        model = WanDiT(tiny_config("flf2v"))
    assert all(p.is_meta for p in model.parameters())


def test_ffn_token_chunks_do_not_change_results(monkeypatch):
    import wan_core.models.dit as dit_module

    cfg = tiny_config("ti2v")
    model = load_dit(random_state_dict(cfg), num_heads=cfg.num_heads)
    inp = random_inputs(cfg)
    t = inp["t"][:, None].expand(2, 72).clone()
    t[:, :24] = 0.0
    with torch.no_grad():
        whole = model(inp["x"], t, inp["context"])
        monkeypatch.setattr(dit_module, "FFN_CHUNK_TOKENS", 16)
        chunked = model(inp["x"], t, inp["context"])
    assert max_abs_err(whole, chunked) < 1e-5


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_text_padding_collapse_is_exact(monkeypatch, model_type):
    """One pad key with a log(count) logit bias == all the identical zero-pad keys."""
    import wan_core.models.dit as dit_module

    cfg = tiny_config(model_type)
    model = load_dit(random_state_dict(cfg), num_heads=cfg.num_heads)
    inp = random_inputs(cfg, batch=3, text_tokens=(20, cfg.text_len, 7))
    short = inp["context"][2]
    gappy = torch.zeros(100, cfg.text_dim)          # a zero row inside the prompt, then padding
    gappy[:3], gappy[4:8] = short[:3], short[3:]
    contexts = [inp["context"][0], inp["context"][1], gappy]
    with torch.no_grad():
        collapsed = model(**{**inp, "context": contexts})
        monkeypatch.setattr(dit_module, "COLLAPSE_TEXT_PADDING", False)
        expanded = model(**{**inp, "context": contexts})
        padded = torch.stack([F.pad(c, (0, 0, 0, cfg.text_len - c.shape[0])) for c in contexts])
        expanded_padded = model(**{**inp, "context": padded})
    err = max_abs_err(collapsed, expanded)
    report(f"dit {model_type} text padding collapsed vs expanded", err, 1e-5)
    assert err < 1e-5
    assert max_abs_err(expanded, expanded_padded) < 1e-5


def test_all_zero_context_attends_the_pad_token_only():
    cfg = tiny_config("t2v")
    model = load_dit(random_state_dict(cfg), num_heads=cfg.num_heads)
    inp = random_inputs(cfg, batch=1)
    with torch.no_grad():
        a = model(inp["x"], inp["t"], [torch.zeros(0, cfg.text_dim)])
        b = model(inp["x"], inp["t"], torch.zeros(1, 30, cfg.text_dim))
    assert torch.isfinite(a).all() and max_abs_err(a, b) < 1e-6


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "ti2v"])
def test_training_path_is_differentiable_and_equal(model_type):
    """With gradients tracked the DiT takes autograd-friendly kernels (no out= / in-place
    writes): same outputs as inference, and the gradient agrees with a finite difference."""
    cfg = tiny_config(model_type)
    model = WanDiT(cfg)
    model.load_state_dict(random_state_dict(cfg))
    inp = random_inputs(cfg)
    with torch.no_grad():
        expected = model(**inp)
    out = model(**inp)
    assert out.requires_grad
    err = max_abs_err(out, expected)
    report(f"DiT {model_type} training path vs inference", err, 1e-5)
    assert err < 1e-5
    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # Directional finite difference through the q/k RMS norm + RoPE path of block 0.
    weight = model.blocks[0].self_attn.q.weight
    direction = torch.randn_like(weight)
    eps = 1e-3
    with torch.no_grad():
        weight += eps * direction
        plus = (model(**inp) * probe).sum()
        weight -= 2 * eps * direction
        minus = (model(**inp) * probe).sum()
        weight += eps * direction
    numeric = float((plus - minus) / (2 * eps))
    analytic = float((grads["blocks.0.self_attn.q.weight"] * direction).sum())
    assert abs(numeric - analytic) <= 2e-2 * max(1.0, abs(analytic))
