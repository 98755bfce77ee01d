"""Random weights in the shapes of a full-size Wan 2.1 T2V 1.3B, for the memory benchmarks.

Values are random (timing and memory do not depend on them); shapes, names and storage
formats are those of the published files: bf16 safetensors, ComfyUI fp8_scaled (block Linears
fp8 with a per-layer scale) and GGUF (block Linears quantised, the rest F32 / F16).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

T2V_1_3B = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096,
                freq_dim=256)
T2V_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096,
               freq_dim=256)          # also each Wan 2.2 A14B expert


def shapes(**overrides) -> dict:
    """``{official key: shape}`` of the DiT (1.3B unless overridden)."""
    from wan_core.models.configs import DiTConfig
    from wan_core.models.dit import WanDiT

    cfg = DiTConfig(model_type="t2v", **{**T2V_1_3B, **overrides})
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in WanDiT(cfg).state_dict().items()}


def is_block_linear(key: str, shape) -> bool:
    return key.startswith("blocks.") and key.endswith(".weight") and len(shape) == 2


def random_bf16(shape_of: dict, seed: int = 0):
    """Yield ``(key, bf16 tensor)`` one at a time (values ~N(0, 0.02))."""
    gen = torch.Generator().manual_seed(seed)
    for key, shape in shape_of.items():
        yield key, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def to_fp8_scaled(key: str, value: torch.Tensor) -> dict:
    """ComfyUI fp8_scaled storage of one tensor: a block Linear becomes fp8 + its scale."""
    if not is_block_linear(key, value.shape):
        return {key: value}
    scale = value.float().abs().max() / 448
    return {key: (value.float() / scale).to(torch.float8_e4m3fn),
            key[:-len("weight")] + "scale_weight": scale.reshape(1)}


def write_bf16_and_fp8(folder: Path, shape_of: dict) -> dict:
    """``{"bf16": path, "fp8": path}``: the same random weights as bf16 and as fp8_scaled."""
    from safetensors.torch import save_file

    bf16, fp8 = {}, {}
    for key, value in random_bf16(shape_of):
        bf16[key] = value
        fp8.update(to_fp8_scaled(key, value))
    fp8["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    paths = {"bf16": folder / "wan2.1_t2v_1.3B_bf16.safetensors",
             "fp8": folder / "wan2.1_t2v_1.3B_fp8_scaled.safetensors"}
    save_file(bf16, str(paths["bf16"]))
    del bf16
    save_file(fp8, str(paths["fp8"]))
    return paths


def write_fp8_scaled(path: Path, shape_of: dict, seed: int = 0) -> Path:
    """One fp8_scaled file of random weights (block Linears fp8, the rest bf16)."""
    from safetensors.torch import save_file

    fp8 = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in random_bf16(shape_of, seed):
        fp8.update(to_fp8_scaled(key, value))
    save_file(fp8, str(path))
    return path


# fp16 fields (byte offsets) of each block type and a scale that keeps weights ~0.05
_SCALE_FIELDS = {"Q8_0": ([0], 4e-4), "Q4_0": ([0], 6e-3), "Q4_K": ([0, 2], 1e-4),
                 "Q6_K": ([208], 6.1e-5)}


def write_gguf(path: Path, shape_of: dict, qtype_name: str, seed: int = 0) -> Path:
    """A GGUF (arch ``wan``) with every block Linear in ``qtype_name`` (random blocks with sane
    fp16 scales), 1-D and small tensors F32, the other matrices F16."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    fields, scale = _SCALE_FIELDS[qtype_name]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "wan")
    for key, shape in shape_of.items():
        if is_block_linear(key, shape):
            rows, cols = shape
            raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
            for offset in fields:
                raw[:, offset:offset + 2] = np.full((len(raw), 1), scale, np.float16).view(np.uint8)
            writer.add_tensor(key, raw.reshape(rows, -1), raw_shape=(rows, cols // block * size),
                              raw_dtype=qtype)
        else:
            value = rng.standard_normal(shape, dtype=np.float32) * 0.02
            small = len(shape) < 2 or np.prod(shape) <= 1024 or "modulation" in key \
                or key == "patch_embedding.weight"
            writer.add_tensor(key, value if small else value.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
