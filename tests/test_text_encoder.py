"""umT5 text encoder and tokenizer: parity with transformers and the official Wan code, every
checkpoint layout, fp8, caching, truncation, and the errors for wrong files."""
from __future__ import annotations

import io
import logging

import pytest
import torch
from safetensors.torch import save_file

from tests.reference import max_abs_err, official, report
from wan_core.loading.checkpoint import CheckpointError
from wan_core.loading.text_encoder import (config_from_state_dict, load_text_encoder, load_umt5,
                                           to_official_layout)
from wan_core.models.text_encoder import TextEncoder
from wan_core.models.tokenizer import UMT5Tokenizer, clean_prompt

BOUND = 1e-5
# Tiny umT5: attention width (heads * d_kv = 4 * 12) differs from the model width on purpose.
VOCAB, DIM, D_KV, FFN, HEADS, LAYERS, BUCKETS = 300, 32, 12, 48, 4, 3, 32

CORPUS = [
    "a cat sitting on a red sofa, cinematic lighting",
    "the dog runs across the green field in slow motion",
    "一只猫坐在红色的沙发上，电影灯光",
    "小狗在绿色的草地上奔跑，慢动作",
    "waves crash against the rocks at sunset",
    "城市的夜景，霓虹灯闪烁，下着小雨",
    "Ein Hund läuft über die Wiese; café, naïve, résumé",
    "the quick brown fox jumps over the lazy dog 0123456789",
] * 20


@pytest.fixture(scope="module")
def hf_model():
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=VOCAB, d_model=DIM, d_kv=D_KV, d_ff=FFN, num_layers=LAYERS,
                     num_heads=HEADS, relative_attention_num_buckets=BUCKETS,
                     feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = UMT5EncoderModel(cfg).eval()
    with torch.no_grad():  # weights large enough that every part of the network matters
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "relative_attention_bias" in name else 0.1)
                    + (1.0 if "layer_norm" in name else 0.0))
    return model


@pytest.fixture(scope="module")
def hf_sd(hf_model):
    return {k: v.clone() for k, v in hf_model.state_dict().items()}


@pytest.fixture(scope="module")
def spiece_bytes():
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=100, model_type="unigram",
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        normalization_rule_name="nmt_nfkc", minloglevel=2)
    return buf.getvalue()


def _ids_batch(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() + [1] for n in lengths]


def _hf_encode(model, ids):
    """transformers on a right-padded batch; real tokens of each row."""
    longest = max(map(len, ids))
    batch = torch.zeros(len(ids), longest, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    with torch.no_grad():
        out = model(input_ids=batch, attention_mask=mask).last_hidden_state
    return [out[i, : len(x)] for i, x in enumerate(ids)]


def _ours(sd, **kw):
    return TextEncoder(load_umt5(sd, **kw), tokenizer=None)


def test_config_from_weights(hf_sd):
    cfg = config_from_state_dict(to_official_layout(hf_sd))
    assert (cfg.vocab_size, cfg.dim, cfg.attn_dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers,
            cfg.num_buckets) == (VOCAB, DIM, HEADS * D_KV, FFN, HEADS, LAYERS, BUCKETS)


def test_parity_transformers_padded_batch(hf_model, hf_sd):
    ids = _ids_batch([5, 40, 17, 150])  # > max_exact and > 128: every bucket kind is used
    ours = _ours(hf_sd, dtype=torch.float32).encode_ids(ids)
    ref = _hf_encode(hf_model, ids)
    err = max(max_abs_err(a, b) for a, b in zip(ours, ref))
    report("umT5 vs transformers UMT5EncoderModel (padded batch)", err, BOUND)
    assert err < BOUND
    # Padding does not leak: each prompt alone gives the same result as inside the batch.
    alone = [_ours(hf_sd, dtype=torch.float32).encode_ids([x])[0] for x in ids]
    err_pad = max(max_abs_err(a, b) for a, b in zip(ours, alone))
    report("umT5 batch vs one-by-one", err_pad, BOUND)
    assert err_pad < BOUND and [a.shape[0] for a in ours] == [len(x) for x in ids]


def test_parity_official_wan(hf_sd):
    t5 = official("modules.t5")
    ref_model = t5.T5Encoder(vocab=VOCAB, dim=DIM, dim_attn=HEADS * D_KV, dim_ffn=FFN,
                             num_heads=HEADS, num_layers=LAYERS, num_buckets=BUCKETS,
                             shared_pos=False, dropout=0.0).eval()
    official_sd = to_official_layout(hf_sd)
    ref_model.load_state_dict(official_sd, strict=True)  # our renaming = the official layout
    ids = _ids_batch([7, 60, 23])
    # The official encoder always sees the prompt padded to 512 with a key mask.
    batch = torch.zeros(len(ids), 512, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    with torch.no_grad():
        ref = ref_model(batch, mask)
    ref = [ref[i, : len(x)] for i, x in enumerate(ids)]
    ours = _ours(official_sd, dtype=torch.float32).encode_ids(ids)
    err = max(max_abs_err(a, b) for a, b in zip(ours, ref))
    report("umT5 vs official wan T5Encoder (padded to 512)", err, BOUND)
    assert err < BOUND


def test_layouts_files_and_prefixes(tmp_path, hf_sd, spiece_bytes):
    ids = _ids_batch([9])
    expected = _ours(hf_sd, dtype=torch.float32).encode_ids(ids)[0]
    spiece = torch.frombuffer(bytearray(spiece_bytes), dtype=torch.uint8)
    variants = {
        "hf.safetensors": dict(hf_sd, spiece_model=spiece),
        "prefixed.safetensors": {**{"text_encoders.umt5xxl.transformer." + k: v
                                    for k, v in hf_sd.items()}, "spiece_model": spiece},
        "official.pth": to_official_layout(hf_sd),
    }
    del variants["hf.safetensors"]["encoder.embed_tokens.weight"]  # ComfyUI keeps shared only
    for name, sd in variants.items():
        path = tmp_path / name
        if name.endswith(".pth"):
            torch.save(sd, path)
            (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
            (tmp_path / "google" / "umt5-xxl" / "spiece.model").write_bytes(spiece_bytes)
        else:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        te = load_text_encoder(path, dtype=torch.float32)
        assert te.tokenizer.vocab_size == 100
        err = max_abs_err(te.encode_ids(ids)[0], expected)
        assert err < 1e-6, name


def test_half_precision_defaults_to_bf16(hf_sd):
    sd = {k: v.to(torch.float16) for k, v in hf_sd.items()}
    model = load_umt5(sd)
    assert model.token_embedding.weight.dtype == torch.bfloat16
    out = TextEncoder(model, None).encode_ids(_ids_batch([12]))[0]
    ref = _ours(hf_sd, dtype=torch.float32).encode_ids(_ids_batch([12]))[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert max_abs_err(out, ref) < 0.1 * ref.abs().max().item()


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_weights_stay_fp8(hf_sd, scaled):
    fp8 = torch.float8_e4m3fn
    sd, dequant = {}, {}
    for k, v in reversed(hf_sd.items()):  # the tied embed_tokens copy first: shared.* wins
        linear = k.endswith(".weight") and any(f".{n}." in k for n in ("q", "k", "v", "o", "wi_0",
                                                                        "wi_1", "wo"))
        linear = linear or k == "shared.weight"  # an fp8 embedding is dequantised on load
        if not linear:
            sd[k] = dequant[k] = v
            continue
        scale = v.abs().max() / 448.0 if scaled else torch.tensor(1.0)
        sd[k] = (v / scale).to(fp8)
        dequant[k] = sd[k].float() * scale
        if scaled:
            sd[k.replace(".weight", ".scale_weight")] = scale.reshape(1)
            sd[k.replace(".weight", ".scale_input")] = torch.ones(1)
    if scaled:
        sd["scaled_fp8"] = torch.empty(0, dtype=fp8)
    model = load_umt5(sd, dtype=torch.float32)
    assert model.blocks[0].attn.q.weight.dtype == fp8
    assert model.token_embedding.weight.dtype == torch.float32
    ids = _ids_batch([11, 30])
    out = TextEncoder(model, None).encode_ids(ids)
    ref = _ours(dequant, dtype=torch.float32).encode_ids(ids)
    err = max(max_abs_err(a, b) for a, b in zip(out, ref))
    report(f"umT5 fp8{' scaled' if scaled else ''} vs dequantised fp32", err, BOUND)
    assert err < BOUND


def test_encode_cache_and_output_device(hf_sd, spiece_bytes):
    te = load_text_encoder(hf_sd, dtype=torch.float32, tokenizer=spiece_bytes)
    calls = []
    original = te.encode_ids
    te.encode_ids = lambda ids: calls.append(len(ids)) or original(ids)
    a = te.encode(["a red cat", "一只猫", "a red cat"], device="cpu")
    b = te.encode(["一只猫", "a red cat"])
    assert calls == [2]  # duplicates and re-queued prompts are not encoded again
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0]) and torch.equal(a[0], a[2])
    assert [x.shape[1] for x in a] == [DIM] * 3
    assert a[0].shape[0] == len(te.tokenizer("a red cat"))
    a[0].zero_()  # callers may modify their copy without corrupting the cache
    assert not torch.equal(te.encode(["a red cat"])[0], a[0])
    te.cache_size = 1
    te.encode(["x", "y"])
    assert list(te._cache) == ["y"]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

PROMPTS = [
    "A cat sitting on a red sofa,   cinematic lighting\n\n",
    "一只猫坐在红色的沙发上，电影灯光。",
    "小狗在绿色的草地上奔跑，慢动作；城市的夜景",
    "Ein Hund läuft über die Wiese &amp; café &lt;3 “quoted” ‘single’",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ and ﬁne ligatures\u3000ideographic space",
    "emoji 🐱 unknown ☃ pieces",
    "",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory, spiece_bytes):
    pytest.importorskip("google.protobuf")  # transformers needs it to read a .model file
    from transformers import T5Tokenizer

    folder = tmp_path_factory.mktemp("hf_tok")
    (folder / "spiece.model").write_bytes(spiece_bytes)
    return T5Tokenizer.from_pretrained(str(folder), extra_ids=0, legacy=False)


def test_tokenizer_matches_transformers(spiece_bytes, hf_tokenizer):
    tensor = torch.frombuffer(bytearray(spiece_bytes), dtype=torch.uint8)  # as ComfyUI embeds it
    ours = UMT5Tokenizer.from_spiece_tensor(tensor)
    for prompt in PROMPTS:
        cleaned = clean_prompt(prompt)
        expected = hf_tokenizer(cleaned, add_special_tokens=True).input_ids
        assert ours(prompt) == expected, prompt
        assert expected[-1] == 1


def test_tokenizer_json_matches_spiece(tmp_path, spiece_bytes, hf_tokenizer):
    hf_tokenizer.save_pretrained(str(tmp_path))
    from_json = UMT5Tokenizer.from_file(tmp_path / "tokenizer.json")
    from_spm = UMT5Tokenizer.from_spiece_bytes(spiece_bytes)
    for prompt in PROMPTS:
        assert from_json(prompt) == from_spm(prompt), prompt


def test_cleaning_matches_official():
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    tok = official("modules.tokenizers")
    from wan_core.models import tokenizer as ours_mod

    for prompt in PROMPTS + ["tab\tand\r\nnewlines \x00control\x7f", "&amp;amp; twice"]:
        expected = tok.whitespace_clean(tok.basic_clean(prompt))
        assert clean_prompt(prompt) == expected, prompt
        # Without ftfy installed, the built-in subset gives the same result on typed prompts.
        fallback = ours_mod._WHITESPACE.sub(" ", __import__("html").unescape(__import__("html").unescape(
            ours_mod._fix_text_subset(prompt))).strip()).strip()
        assert fallback == expected, prompt


def test_truncation_warns_and_keeps_eos(spiece_bytes, caplog):
    tok = UMT5Tokenizer.from_spiece_bytes(spiece_bytes)
    long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 80)
    with caplog.at_level(logging.WARNING, logger="wan_core"):
        ids = tok(long_prompt)
    assert len(ids) == 512 and ids[-1] == 1
    assert ids[:-1] == tok._encode_fn(clean_prompt(long_prompt))[:511]
    assert "512" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wan_core"):
        tok("short prompt")
    assert caplog.text == ""


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_missing_tokenizer_error(tmp_path, hf_sd):
    path = tmp_path / "umt5.safetensors"
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(path))
    with pytest.raises(CheckpointError, match="no tokenizer.*spiece.model.*google"):
        load_text_encoder(path)


def test_wrong_model_errors(hf_sd, spiece_bytes):
    dit = {"patch_embedding.weight": torch.zeros(1), "head.head.weight": torch.zeros(1),
           "blocks.0.self_attn.q.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="diffusion model.*not a umT5 text encoder"):
        load_text_encoder({"model.diffusion_model." + k: v for k, v in dit.items()})
    vae = {"encoder.conv1.weight": torch.zeros(1), "decoder.conv1.weight": torch.zeros(1),
           "conv1.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="Wan VAE, not a umT5 text encoder"):
        load_text_encoder(vae)
    t5 = {k: v for k, v in hf_sd.items() if "relative_attention_bias" not in k or "block.0." in k}
    with pytest.raises(CheckpointError, match="T5 encoder.*not umT5-XXL"):
        load_text_encoder(t5, tokenizer=spiece_bytes)
    clip = {"vision_model.embeddings.class_embedding": torch.zeros(4)}
    with pytest.raises(CheckpointError, match="CLIP vision encoder, not a umT5"):
        load_text_encoder(clip)


# -- GGUF (llama.cpp t5encoder layout, the published umt5-xxl-encoder quants) ----------------

# Hugging Face name -> llama.cpp GGUF name, as llama.cpp's converter writes T5 encoders.
_TO_GGUF = [("shared.", "token_embd."), ("encoder.final_layer_norm.", "enc.output_norm."),
            ("layer.0.SelfAttention.relative_attention_bias.", "attn_rel_b."),
            ("layer.0.SelfAttention.", "attn_"), ("layer.0.layer_norm.", "attn_norm."),
            ("layer.1.DenseReluDense.wi_0.", "ffn_gate."),
            ("layer.1.DenseReluDense.wi_1.", "ffn_up."), ("layer.1.DenseReluDense.wo.", "ffn_down."),
            ("layer.1.layer_norm.", "ffn_norm."), ("encoder.block.", "enc.blk.")]


def _gguf_name(key: str) -> str:
    for old, new in _TO_GGUF:
        key = key.replace(old, new)
    return key


def write_umt5_gguf(path, hf_sd, spiece, quant_types):
    """A t5encoder GGUF of ``hf_sd`` with SentencePiece metadata; matrices whose rows split into
    32-value blocks cycle through ``quant_types`` (the embedding too), the rest F16 / F32.
    Returns the Hugging Face state dict as gguf's own numpy dequantisation reads it back."""
    import gguf
    import numpy as np
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    proto = spm_pb.ModelProto()
    proto.ParseFromString(spiece)
    writer = gguf.GGUFWriter(str(path), "t5encoder")
    writer.add_tokenizer_model("t5")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([int(p.type) for p in proto.pieces])
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    writer.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)
    writer.add_precompiled_charsmap(proto.normalizer_spec.precompiled_charsmap)
    writer.add_unk_token_id(proto.trainer_spec.unk_id)
    writer.add_eos_token_id(proto.trainer_spec.eos_id)
    writer.add_pad_token_id(proto.trainer_spec.pad_id)
    reference, turn = {}, 0
    for key, value in hf_sd.items():
        if key == "encoder.embed_tokens.weight":
            continue                                   # tied copy of shared.weight
        array = value.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0 and "relative_attention" not in key:
            qtype = quant_types[turn % len(quant_types)]
            turn += 1
            data = gguf.quants.quantize(array, qtype)
            writer.add_tensor(_gguf_name(key), data, raw_shape=data.shape, raw_dtype=qtype)
            back = gguf.quants.dequantize(data, qtype).reshape(array.shape)
        elif array.ndim == 2 and "relative_attention" not in key:
            writer.add_tensor(_gguf_name(key), array.astype(np.float16))
            back = array.astype(np.float16)
        else:
            writer.add_tensor(_gguf_name(key), array)
            back = array
        reference[key] = torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32))
    reference["encoder.embed_tokens.weight"] = reference["shared.weight"]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


@pytest.mark.parametrize("names", [("Q8_0",), ("Q4_0", "Q5_1", "Q8_0"), ("F16",)])
def test_gguf_umt5_matches_transformers_on_gguf_dequantised_weights(tmp_path, hf_model, hf_sd,
                                                                    spiece_bytes, names):
    import copy

    import gguf

    path = tmp_path / "umt5-xxl-encoder.gguf"
    reference = write_umt5_gguf(path, hf_sd, spiece_bytes,
                                [gguf.GGMLQuantizationType[n] for n in names])
    te = load_text_encoder(path, dtype=torch.float32)
    if names != ("F16",):
        kept = {te.model.blocks[0].attn.q.qtype, te.model.blocks[0].ffn.fc1.qtype}
        assert kept <= {int(gguf.GGMLQuantizationType[n]) for n in names}   # kept quantised
    model = copy.deepcopy(hf_model)
    model.load_state_dict(reference)
    ids = _ids_batch([5, 40, 17, 150])
    err = max(max_abs_err(a, b) for a, b in zip(te.encode_ids(ids), _hf_encode(model, ids)))
    report(f"umT5 GGUF {'+'.join(names)} vs transformers on gguf-dequantised weights", err, 1e-4)
    assert err < 1e-4
    # The tokenizer rebuilt from the GGUF metadata tokenises exactly like the original model.
    original = UMT5Tokenizer.from_spiece_bytes(spiece_bytes)
    for text in CORPUS[:12] + ["  spaced   out  ", "Ünïcödé ＦＵＬＬ width", ""]:
        assert te.tokenizer(text) == original(text), text


def test_gguf_text_encoder_and_dit_files_are_told_apart(tmp_path, hf_sd, spiece_bytes, models):
    import gguf

    from wan_core import load_dit

    path = tmp_path / "umt5.gguf"
    write_umt5_gguf(path, hf_sd, spiece_bytes, [gguf.GGMLQuantizationType.Q8_0])
    with pytest.raises(CheckpointError, match="text-encoder GGUF: load it with the text encoder"):
        load_dit(path)
    with pytest.raises(CheckpointError, match="Wan diffusion-model GGUF: load it with the diff"):
        load_text_encoder(models / "diffusion_models/wan2.1-t2v-1.3b-Q8_0.gguf")
