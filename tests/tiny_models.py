"""A models folder of tiny random checkpoints under the file names ComfyUI users have.

Every file is in the layout the real file uses (official DiT keys, some with ComfyUI's
``model.diffusion_model.`` prefix or fp8_scaled storage; the official VAE layout; the Hugging
Face umT5 layout with an embedded SentencePiece model; the Hugging Face CLIP vision layout), so
the loaders, variant detection and pipeline run exactly the code a real 14B file would.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

TEXT_DIM = 32          # tiny umT5 width (the DiT's text_dim follows it)
CLIP_WIDTH = 128       # tiny CLIP ViT width (the I2V DiT's image_dim follows it)
CLIP_TOKENS = 10       # 42 px images of 14 px patches: 9 patches + class token
DIT = dict(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=TEXT_DIM, freq_dim=256)
VAE = dict(dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=1)

CAPTIONS = [
    "a red circle moving left on a blue background",
    "a green square moving up on a black background",
    "a cat surfing a wave at sunset, cinematic lighting",
    "一只猫在海浪上冲浪",
] * 10

FILES = {
    "dit_t2v": "diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors",
    "dit_i2v": "diffusion_models/wan2.1_i2v_480p_14B_bf16.safetensors",
    "dit_flf2v": "diffusion_models/wan2.1_flf2v_720p_14B_fp16.safetensors",
    "dit_t2v_high": "diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
    "dit_t2v_low": "diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
    "dit_i2v_high": "diffusion_models/wan2.2_i2v_high_noise_14B_fp16.safetensors",
    "dit_i2v_low": "diffusion_models/wan2.2_i2v_low_noise_14B_fp16.safetensors",
    "dit_ti2v": "diffusion_models/wan2.2_ti2v_5B_fp16.safetensors",
    "vae21": "vae/wan_2.1_vae.safetensors",
    "vae22": "vae/wan2.2_vae.safetensors",
    "umt5": "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "clip": "clip_vision/clip_vision_h.safetensors",
    "lora_t2v_high": "loras/wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors",
    "lora_t2v_low": "loras/wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors",
    "lora_i2v": "loras/lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors",
    "dit_t2v_gguf": "diffusion_models/wan2.1-t2v-1.3b-Q8_0.gguf",
    "dit_vace": "diffusion_models/wan2.1_vace_1.3B_fp16.safetensors",
    "vace_module": "diffusion_models/Wan2_1-VACE_module_1_3B_bf16.safetensors",
}


def _random(model: torch.nn.Module, seed: int, scale: float = 0.05) -> dict:
    """Random weights for ``model``'s state dict: norm scales near 1, the rest ~N(0, scale)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, p in model.state_dict().items():
        noise = torch.randn(p.shape, generator=gen)
        norm_scale = "norm" in key and key.endswith(".weight") or key.endswith(".gamma")
        out[key] = (1.0 + 0.05 * noise) if norm_scale else scale * noise
    return out


def dit_state_dict(model_type: str, seed: int, in_dim=None, out_dim=16, image=False,
                   pos_tokens=0, vace_blocks=0) -> dict:
    """Random weights of a tiny DiT; ``vace_blocks`` > 0 adds VACE blocks (a VACE model)."""
    from wan_core.models.configs import DiTConfig, vace_plan
    from wan_core.models.dit import WanDiT

    in_dim = in_dim or out_dim
    vace = dict(vace_layers=vace_plan(DIT["num_layers"], vace_blocks), vace_in_dim=96) \
        if vace_blocks else {}
    cfg = DiTConfig(model_type=model_type, in_dim=in_dim, out_dim=out_dim,
                    has_image_branch=image, image_dim=CLIP_WIDTH, image_pos_tokens=pos_tokens,
                    **DIT, **vace)
    with torch.device("meta"):
        model = WanDiT(cfg)
    return _random(model, seed)


def distill_lora_state_dict(dit_sd: dict, seed: int, rank: int = 4, scale: float = 0.02) -> dict:
    """A LoRA in the LightX2V step-distill layout for the DiT whose state dict is ``dit_sd``:
    ``lora_down`` / ``lora_up`` (no alpha) on every 2-D block / image-branch weight, full
    ``.diff`` on norm weights and the head, ``.diff_b`` on biases, ``blocks.N.diff_m`` on the
    modulation; all under ``diffusion_model.``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in dit_sd.items():
        module, leaf = key.rsplit(".", 1)
        r = lambda *s: torch.randn(*s, generator=gen) * scale   # noqa: E731
        if leaf == "weight" and value.dim() == 2 and (key.startswith("blocks.") or
                                                      key.startswith("img_emb.")):
            out[f"diffusion_model.{module}.lora_down.weight"] = r(rank, value.shape[1])
            out[f"diffusion_model.{module}.lora_up.weight"] = r(value.shape[0], rank)
        elif leaf == "weight" and ("norm" in module or module == "head.head"):
            out[f"diffusion_model.{module}.diff"] = r(*value.shape)
        elif leaf == "bias" and key.startswith("blocks."):
            out[f"diffusion_model.{module}.diff_b"] = r(*value.shape)
        elif leaf == "modulation" and key.startswith("blocks."):
            out[f"diffusion_model.{module}.diff_m"] = r(*value.shape)
    return out


# -- GGUF, written the way published Wan GGUFs are ----------------------------------------------
# fp16 fields of each K-quant block (byte offsets) and a scale that gives weights ~0.05
K_FIELDS = {"Q2_K": ([80, 82], 2e-3), "Q3_K": ([108], 4e-4), "Q4_K": ([0, 2], 1e-4),
            "Q5_K": ([0, 2], 6e-5), "Q6_K": ([208], 6.1e-5)}


def quantize(value: np.ndarray, qtype, rng) -> np.ndarray:
    """Bytes of ``value`` in ``qtype``: gguf's quantiser where it has one; for K-quants random
    blocks with fp16 scales in a sane range (the reference dequantises the same bytes)."""
    import gguf

    if qtype.name not in K_FIELDS:                    # F16, BF16, Q4_0 ... Q8_0
        return gguf.quants.quantize(value, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = value.shape
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    fields, scale = K_FIELDS[qtype.name]
    for offset in fields:
        d = (np.abs(rng.standard_normal(len(raw))) * scale + scale / 4).astype(np.float16)
        raw[:, offset:offset + 2] = d.reshape(-1, 1).view(np.uint8)
    return raw.reshape(rows, -1)


def is_quantised_target(key: str, value: torch.Tensor) -> bool:
    """What published Wan GGUFs quantise: 2-D block weights, VACE blocks' too (not the
    embeddings / head)."""
    return (key.startswith(("blocks.", "vace_blocks.")) and key.endswith(".weight")
            and value.dim() == 2)


def write_gguf(path, sd, choose, arch="wan", seed=0):
    """Write ``sd`` as a GGUF; ``choose(key)`` gives each quantised tensor's type. Returns the
    state dict as gguf's numpy dequantisation reads the file back (the reference weights)."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    reference = {}
    for key, value in sd.items():
        array = value.float().numpy()
        if is_quantised_target(key, value):
            qtype = choose(key)
            data = quantize(array, qtype, rng)
            writer.add_tensor(key, data, raw_shape=data.shape, raw_dtype=qtype)
            back = gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(array.shape)
        else:
            writer.add_tensor(key, array)
            back = array
        reference[key] = torch.from_numpy(np.ascontiguousarray(back))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def to_fp8_scaled(sd: dict) -> dict:
    """ComfyUI's fp8_scaled storage: 2-D weights as fp8 with a per-layer scale, plus a marker."""
    out = {}
    for key, value in sd.items():
        if value.dim() == 2 and key.endswith(".weight") and "embedding" not in key:
            scale = value.abs().max().clamp_min(1e-8) / 448.0
            out[key] = (value / scale).to(torch.float8_e4m3fn)
            out[key[:-len("weight")] + "scale_weight"] = scale.reshape(1).float()
        else:
            out[key] = value
    out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    return out


def vae_state_dict(version: str, seed: int) -> dict:
    from wan_core.models.vae import VAEConfig, WanVAE

    z = 16 if version == "2.1" else 48
    cfg = VAEConfig(version=version, dim=VAE["dim"], decoder_dim=VAE["dim"] + 4 * (version == "2.2"),
                    z_dim=z, dim_mult=VAE["dim_mult"], num_res_blocks=VAE["num_res_blocks"])
    with torch.device("meta"):
        model = WanVAE(cfg)
    return _random(model, seed, scale=0.1)


def spiece_model_bytes() -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS), model_writer=buf, vocab_size=48, model_type="unigram",
        hard_vocab_limit=False,
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        normalization_rule_name="nmt_nfkc", minloglevel=2)
    return buf.getvalue()


def umt5_state_dict(seed: int, d_model: int = TEXT_DIM) -> dict:
    """Hugging Face UMT5 encoder layout with the tokenizer embedded (ComfyUI's files)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=64, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                     dropout_rate=0.0)
    model = UMT5EncoderModel(cfg)
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.embed")}
    sd["spiece_model"] = torch.frombuffer(bytearray(spiece_model_bytes()), dtype=torch.uint8)
    return sd


def clip_state_dict(seed: int) -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=CLIP_WIDTH, intermediate_size=256, num_hidden_layers=3,
                           num_attention_heads=2, image_size=42, patch_size=14, hidden_act="gelu",
                           layer_norm_eps=1e-5, projection_dim=16)
    model = CLIPVisionModel(cfg)
    return {"vision_model." + k.removeprefix("vision_model."): v.clone()
            for k, v in model.state_dict().items()}


def _save(root: Path, name: str, sd: dict, dtype=None, prefix: str = "") -> None:
    path = root / FILES[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in sd.items():
        if dtype is not None and value.is_floating_point() and value.dtype.itemsize > 1:
            value = value.to(dtype)
        tensors[prefix + key if key != "scaled_fp8" else key] = value.contiguous()
    save_file(tensors, str(path))


def write_models(root: Path) -> Path:
    """Write every tiny checkpoint under ``root`` (a ComfyUI ``models`` folder); returns root."""
    root = Path(root)
    bf16, fp16 = torch.bfloat16, torch.float16
    _save(root, "dit_t2v", dit_state_dict("t2v", 1), bf16)
    _save(root, "dit_i2v", dit_state_dict("i2v", 2, in_dim=36, image=True), bf16,
          prefix="model.diffusion_model.")
    _save(root, "dit_flf2v", dit_state_dict("flf2v", 3, in_dim=36, image=True, pos_tokens=2 * CLIP_TOKENS),
          fp16)
    _save(root, "dit_t2v_high", to_fp8_scaled(dit_state_dict("t2v", 4)))
    _save(root, "dit_t2v_low", to_fp8_scaled(dit_state_dict("t2v", 5)))
    _save(root, "lora_t2v_high", distill_lora_state_dict(dit_state_dict("t2v", 4), 13), bf16)
    _save(root, "lora_t2v_low", distill_lora_state_dict(dit_state_dict("t2v", 5), 14), bf16)
    _save(root, "lora_i2v", distill_lora_state_dict(
        dit_state_dict("i2v", 2, in_dim=36, image=True), 15), bf16)
    _save(root, "dit_i2v_high", dit_state_dict("i2v", 6, in_dim=36), fp16)
    _save(root, "dit_i2v_low", dit_state_dict("i2v", 7, in_dim=36), fp16)
    _save(root, "dit_ti2v", dit_state_dict("ti2v", 8, out_dim=48), fp16)
    vace = dit_state_dict("vace", 16, vace_blocks=2)
    _save(root, "dit_vace", vace, fp16, prefix="model.diffusion_model.")
    module = {k: v for k, v in dit_state_dict("vace", 1, vace_blocks=1).items()
              if k.startswith("vace_")}        # for dit_t2v (seed 1): the wrapper's module file
    _save(root, "vace_module", module, bf16)
    _save(root, "vae21", vae_state_dict("2.1", 9))
    _save(root, "vae22", vae_state_dict("2.2", 10))
    _save(root, "umt5", umt5_state_dict(11))
    _save(root, "clip", clip_state_dict(12), fp16)
    try:
        import gguf

        write_gguf(root / FILES["dit_t2v_gguf"], dit_state_dict("t2v", 1),
                   lambda key: gguf.GGMLQuantizationType.Q8_0)
    except ImportError:
        pass
    return root


def diffusers_wan21_vae(seed: int):
    """(diffusers ``AutoencoderKLWan``, our WanVAE with the same random weights): a tiny Wan 2.1
    VAE (base dim 8, z 16) for parity tests against diffusers' Wan pipelines."""
    import diffusers

    from wan_core import load_vae

    ref = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4],
                                     num_res_blocks=1, attn_scales=[],
                                     temperal_downsample=[False, True, True]).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return ref, load_vae(ref.state_dict(), dtype=torch.float32)
