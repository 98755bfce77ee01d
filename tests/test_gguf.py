"""GGUF Wan DiTs: every quant type against the ``gguf`` package's own numpy dequantisation
driving the official model, on tiny checkpoints written the way published Wan GGUFs are (arch
``wan``, official names, F32 1-D / small / modulation / patch-embedding tensors, quantised
block Linears, mixed types); weights stay quantised; bad files fail early and clearly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.dit_helpers import random_inputs, random_state_dict, tiny_config
from tests.reference import max_abs_err, report
from tests.test_dit import _official_forward, _official_model
from tests.tiny_models import write_gguf
from wan_core import CheckpointError, apply_loras, load_dit
from wan_core.ops.gguf import QTYPES

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
BOUND = 1e-4
# K-quants need rows of 256: dim 256, ffn 512 (text_dim / freq_dim stay unquantised inputs)
CFG = dict(dim=256, ffn_dim=512, num_heads=2)
TYPES = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K,
         Q.Q5_K, Q.Q6_K]


def _case(model_type="t2v"):
    cfg = tiny_config(model_type, **CFG)
    return cfg, random_state_dict(cfg, seed=4, scale=0.05), random_inputs(cfg)


def _official(cfg, sd, inp):
    return _official_forward(_official_model(cfg, sd), inp, inp["t"][:, None].expand(-1, 72))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_each_quant_type_matches_gguf_dequantisation_in_the_official_model(qtype, tmp_path):
    cfg, sd, inp = _case()
    reference = write_gguf(tmp_path / "model.gguf", sd, lambda key: qtype)
    ours = load_dit(tmp_path / "model.gguf", dtype="fp32", num_heads=cfg.num_heads)
    layer = ours.blocks[0].ffn[0]
    if qtype not in (Q.F16, Q.BF16):
        assert layer.qtype == int(qtype) and layer.weight.dtype == torch.uint8   # stays quantised
    with torch.no_grad():
        out = ours(**inp)
    expected = _official(cfg, reference, inp)
    err = max_abs_err(out, expected)
    report(f"gguf {qtype.name} vs gguf numpy dequant + official", err, BOUND)
    assert err < BOUND
    # the quantisation error is far above the bound, so a wrong decoder could not pass
    if qtype not in (Q.F16, Q.BF16):
        assert max_abs_err(expected, _official(cfg, sd, inp)) > 10 * BOUND


def test_a_mixed_file_like_q4_k_m_loads_every_type_it_holds(tmp_path):
    cfg, sd, inp = _case()
    choice = {"self_attn.v": Q.Q6_K, "ffn.2": Q.Q8_0, "cross_attn.o": Q.Q5_0}

    def choose(key):
        return next((q for part, q in choice.items() if f".{part}." in key), Q.Q4_K)

    reference = write_gguf(tmp_path / "mixed.gguf", sd, choose)
    ours = load_dit(tmp_path / "mixed.gguf", dtype="fp32", num_heads=cfg.num_heads)
    kinds = {m.qtype for m in ours.modules() if getattr(m, "qtype", None) is not None}
    assert kinds == {int(Q.Q6_K), int(Q.Q8_0), int(Q.Q5_0), int(Q.Q4_K)}
    assert ours.patch_embedding.weight.dtype == torch.float32
    with torch.no_grad():
        err = max_abs_err(ours(**inp), _official(cfg, reference, inp))
    report("gguf mixed Q4_K/Q6_K/Q8_0/Q5_0 vs gguf numpy dequant + official", err, BOUND)
    assert err < BOUND


def test_i2v_gguf_and_bf16_compute(tmp_path):
    from tests.test_dit import _diffusers_forward, _diffusers_model

    pytest.importorskip("diffusers")
    cfg, sd, inp = _case("i2v")
    reference = write_gguf(tmp_path / "i2v.gguf", sd, lambda key: Q.Q8_0)
    ours = load_dit(tmp_path / "i2v.gguf", dtype="fp32", num_heads=cfg.num_heads)
    assert ours.config.model_type == "i2v" and ours.blocks[0].cross_attn.k_img.qtype == int(Q.Q8_0)
    ref_model, _ = _diffusers_model(cfg, reference)
    with torch.no_grad():
        err = max_abs_err(ours(**inp), _diffusers_forward(ref_model, cfg, inp))
    report("gguf i2v Q8_0 vs gguf numpy dequant + diffusers", err, BOUND)
    assert err < BOUND
    bf16 = load_dit(tmp_path / "i2v.gguf", num_heads=cfg.num_heads)       # default compute
    assert bf16.compute_dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(bf16(**inp)).all()


def test_a_lora_on_a_gguf_base_keeps_its_effect(tmp_path):
    from tests.test_lora import LINEARS, _factors, comfy_layout, merged_by_hand

    cfg, sd, inp = _case()
    reference = write_gguf(tmp_path / "q4.gguf", sd, lambda key: Q.Q4_0)
    base = load_dit(tmp_path / "q4.gguf", dtype="fp32", num_heads=cfg.num_heads)
    factors = _factors(reference, LINEARS, 4, seed=2, scale=0.01)
    patched = apply_loras(base, [(comfy_layout(factors), 1.0)])
    assert patched.blocks[1].self_attn.q.weight is base.blocks[1].self_attn.q.weight
    with torch.no_grad():
        err = max_abs_err(patched(**inp), _official(cfg, merged_by_hand(reference, factors), inp))
    report("lora on gguf Q4_0 base vs hand-merged official (dequantised)", err, BOUND)
    assert err < BOUND


# -- bad files ----------------------------------------------------------------------------------

def test_a_truncated_gguf_is_named_before_any_model_is_built(tmp_path):
    cfg, sd, _ = _case()
    write_gguf(tmp_path / "full.gguf", sd, lambda key: Q.Q8_0)
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_dit(tmp_path / "cut.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:40])
    with pytest.raises(CheckpointError, match="damaged or truncated|truncated"):
        load_dit(tmp_path / "header.gguf")


@pytest.mark.parametrize("arch, message", [("llama", "'llama' model"), ("flux", "'flux' model"),
                                           ("t5encoder", "text-encoder GGUF")])
def test_a_gguf_of_another_architecture_is_refused(tmp_path, arch, message):
    cfg, sd, _ = _case()
    write_gguf(tmp_path / "other.gguf", sd, lambda key: Q.Q8_0, arch=arch)
    with pytest.raises(CheckpointError, match=message):
        load_dit(tmp_path / "other.gguf")


def test_an_unsupported_quant_type_is_named(tmp_path):
    cfg, sd, _ = _case()
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "wan")
    for key, value in sd.items():
        if key == "blocks.0.ffn.0.weight":
            block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
            raw = rng.integers(0, 255, (value.shape[0], value.shape[1] // block * size),
                               dtype=np.uint8)
            writer.add_tensor(key, raw, raw_shape=raw.shape, raw_dtype=Q.IQ4_NL)
        else:
            writer.add_tensor(key, value.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.0\.weight is IQ4_NL"):
        load_dit(tmp_path / "iq.gguf")


def test_supported_types_are_the_published_wan_quants():
    names = {name for name, _, _ in QTYPES.values()}
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
            "Q4_K", "Q5_K", "Q6_K"} <= names


def test_the_model_loader_node_lists_and_loads_gguf_files(models, monkeypatch):
    from tests.conftest import load_pack

    monkeypatch.setenv("WANCORE_MODELS_DIR", str(models))
    loader = load_pack().NODE_CLASS_MAPPINGS["WanCoreModelLoader"]
    names = loader.INPUT_TYPES()["required"]["model_name"][0]
    assert "wan2.1-t2v-1.3b-Q8_0.gguf" in names
    out = loader().load("wan2.1-t2v-1.3b-Q8_0.gguf")
    model = out["result"][0]
    assert model.load().blocks[0].ffn[0].qtype == int(Q.Q8_0)
    assert out["ui"]["wancore_variant"][0]["variant"] == "custom"
