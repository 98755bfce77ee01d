"""Stage ``export``: write the shipped demo weights in the official layouts and check them.

Files (``wan_core/demo/weights/``):

- ``vae.safetensors``: Wan-VAE 2.1, official keys, fp32 (as ComfyUI's ``wan_2.1_vae``);
- ``text_encoder.safetensors``: umT5 encoder in the Hugging Face / ComfyUI layout
  (``encoder.block.N.layer...``, ``shared.weight``), fp32, with the demo SentencePiece model
  embedded as the uint8 ``spiece_model`` tensor, as ComfyUI's umT5 files carry it;
- ``dit_t2v``, ``dit_i2v``, ``dit_high_noise``, ``dit_low_noise`` ``.safetensors``: official
  Wan DiT keys, bf16 (EMA weights);
- ``fast_lora.safetensors``: the T2V's 4-step distilled LoRA (stage ``fast_lora``), ComfyUI
  LoRA layout, bf16.

Every file is loaded back through ``load_vae`` / ``load_text_encoder`` / ``load_dit`` and the
total size is checked against the 40 MB budget.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from wan_core.demo import WEIGHTS_DIR as WEIGHTS

from .steps import I2V_STAGES, T2V_STAGES, VAE_STAGES, final_stage
from .training import finished, load

BUDGET_BYTES = 40 * 1024 * 1024
DIT_FILES = {"dit": "dit_t2v", "i2v": "dit_i2v", "expert_high": "dit_high_noise",
             "expert_low": "dit_low_noise"}

# official umT5 names -> Hugging Face / ComfyUI names (the loader maps them back)
_TEXT_RENAMES = (
    ("attn.q.", "layer.0.SelfAttention.q."), ("attn.k.", "layer.0.SelfAttention.k."),
    ("attn.v.", "layer.0.SelfAttention.v."), ("attn.o.", "layer.0.SelfAttention.o."),
    ("pos_embedding.embedding.", "layer.0.SelfAttention.relative_attention_bias."),
    ("norm1.", "layer.0.layer_norm."), ("ffn.gate.0.", "layer.1.DenseReluDense.wi_0."),
    ("ffn.fc1.", "layer.1.DenseReluDense.wi_1."), ("ffn.fc2.", "layer.1.DenseReluDense.wo."),
    ("norm2.", "layer.1.layer_norm."),
)


def _stage(out: Path, name: str) -> dict:
    path = Path(out) / name / "done.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the '{name}' stage first")
    return load(path)


def vae_state(out: Path, stage: str = "vae_fit") -> dict:
    """The trained VAE of ``stage`` (default: the shipped one, ``vae_fit``, whose encoder made
    the DiTs' latents): official keys, fp32."""
    return {k: v.float().contiguous() for k, v in _stage(out, stage)["final"].items()}


def text_state(out: Path) -> dict:
    """The trained umT5 encoder in the Hugging Face / ComfyUI layout, with ``spiece_model``."""
    from .tokenizer_train import as_spiece_tensor

    done = _stage(out, "text")
    sd = {}
    for key, value in done["encoder"].items():
        if key == "token_embedding.weight":
            new = "shared.weight"
        elif key.startswith("norm."):
            new = "encoder.final_layer_norm." + key[len("norm."):]
        else:
            _, n, rest = key.split(".", 2)
            for old, hf in _TEXT_RENAMES:
                if rest.startswith(old):
                    rest = hf + rest[len(old):]
                    break
            else:
                raise KeyError(f"unexpected umT5 key {key}")
            new = f"encoder.block.{n}.{rest}"
        sd[new] = value.float().contiguous()
    sd["spiece_model"] = as_spiece_tensor(done["spiece"])
    return sd


def shipped_state(name: str) -> dict:
    """The shipped ``<name>.safetensors`` from the package's weights folder (copied, so that
    an export into that same folder can overwrite the file)."""
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(WEIGHTS / f"{name}.safetensors")).items()}


def dit_state(out: Path, stage: str) -> dict:
    return {k: v.to(torch.bfloat16).contiguous() for k, v in _stage(out, stage)["ema"].items()}


def export(out: Path, weights: Optional[Path] = None) -> dict:
    from safetensors.torch import load_file, save_file

    from wan_core import apply_loras, load_dit, load_text_encoder, load_vae

    from .train_fast import fast_lora_state

    weights = Path(weights or WEIGHTS)
    weights.mkdir(parents=True, exist_ok=True)
    vae_stage = final_stage(out, VAE_STAGES)
    # a run without the VAE / text stages (e.g. DiTs retrained on latents the shipped VAE
    # encoded) keeps the shipped files: their latents are what the DiTs learnt
    files = {"vae": vae_state(out, vae_stage) if finished(Path(out) / vae_stage) is not None
             else shipped_state("vae"),
             "text_encoder": text_state(out) if finished(Path(out) / "text") is not None
             else shipped_state("text_encoder")}
    for stage, name in DIT_FILES.items():
        chain = {"dit": T2V_STAGES, "i2v": I2V_STAGES}.get(stage)
        files[name] = dit_state(out, final_stage(out, chain) if chain else stage)
    if finished(Path(out) / "fast_lora") is not None:
        files["fast_lora"] = fast_lora_state(out)
    else:   # the shape chain trains the LoRA after export, from the exported T2V
        print("export: fast_lora not finished in this run: fast_lora.safetensors left as it is "
              "(run the fast_lora stage next: it distils the exported T2V)", flush=True)
    sizes = {}
    for name, sd in files.items():
        path = weights / f"{name}.safetensors"
        meta = {"format": "pt", "source": "wan_core demo (python -m training.train)"}
        save_file(sd, str(path), metadata=meta)
        sizes[name] = path.stat().st_size
    load_vae(weights / "vae.safetensors")
    if "fast_lora" in files:
        apply_loras(load_dit(weights / "dit_t2v.safetensors"),
                    [(weights / "fast_lora.safetensors", 1.0)])
    load_text_encoder(weights / "text_encoder.safetensors")
    expected = {"dit_t2v": "t2v", "dit_i2v": "i2v", "dit_high_noise": "t2v",
                "dit_low_noise": "t2v"}
    for name, kind in expected.items():
        model_type = load_dit(weights / f"{name}.safetensors").config.model_type
        if model_type != kind:
            raise RuntimeError(f"{name} was detected as {model_type}, expected {kind}")
    for name in ("fast_lora", "vace_module"):     # written by their own stages
        if name not in sizes and (weights / f"{name}.safetensors").exists():
            sizes[name] = (weights / f"{name}.safetensors").stat().st_size
    total = sum(sizes.values())
    for name, size in sizes.items():
        print(f"export: {name}.safetensors {size / 1e6:.2f} MB")
    print(f"export: total {total / 1e6:.2f} MB (budget {BUDGET_BYTES / 1e6:.1f} MB)", flush=True)
    if total > BUDGET_BYTES:
        raise RuntimeError(f"the demo weights take {total} bytes, over the 40 MB budget")
    return sizes
