"""Loader nodes: diffusion model, VAE, text encoder, CLIP vision, and the LoRA node.

Loaded models are cached per (file, modification time, options), so re-queuing a workflow, or
two loader nodes pointing at the same file, reuse one copy; ComfyUI's own output cache keeps
the node from re-running at all when nothing changed.
"""
from __future__ import annotations

import os
from collections import OrderedDict

from . import host

WEIGHT_DTYPES = ["default", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e4m3fn_fast"]
ATTENTION_BACKENDS = ["sdpa", "flash_attn", "sage", "fp8", "int8"]


class _ModelCache:
    """A tiny LRU of loaded models keyed by file identity and load options."""

    def __init__(self, size: int = 4):
        self.size = size
        self._items: OrderedDict = OrderedDict()

    def get(self, path: str, options: tuple, load):
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size, options)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = load()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value


CACHE = _ModelCache()


def _load_options(weight_dtype: str) -> dict:
    """The loader's weight_dtype widget -> load_dit options: bf16 / fp16 / fp32 set the compute
    dtype; fp8_e4m3fn stores the Linear weights in fp8 (computing in the file's dtype, or bf16);
    fp8_e4m3fn_fast also multiplies them in fp8 (Ada / Hopper GPUs; elsewhere one warning)."""
    if weight_dtype == "fp8_e4m3fn":
        return {"weight_dtype": weight_dtype}
    if weight_dtype == "fp8_e4m3fn_fast":
        return {"weight_dtype": "fp8_e4m3fn", "compute": "fp8"}
    return {"dtype": None if weight_dtype == "default" else weight_dtype}


def _block_streaming(blocks_on_gpu: int, vram_budget_gb: float):
    """The loader's streaming widgets -> a ``BlockStreaming`` setting, or None (off)."""
    from wan_core.ops.streaming import BlockStreaming

    if vram_budget_gb and vram_budget_gb > 0:
        return BlockStreaming(budget_gb=float(vram_budget_gb))
    if blocks_on_gpu is not None and blocks_on_gpu >= 0:
        return BlockStreaming(resident=int(blocks_on_gpu))
    return None


SHORT_DTYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32",
                "torch.float8_e4m3fn": "fp8_e4m3fn", "torch.float8_e5m2": "fp8_e5m2"}


def _describe(model, kind: str) -> dict:
    """What the loader shows on its node after a run (web/wancore.js)."""
    config = getattr(model, "config", None)
    if hasattr(model, "meta_model"):            # an on-demand DiT: described without loading
        params = sum(p.numel() for p in model.meta_model().parameters())
        dtype = str(model.stored_dtype)
    else:
        params = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else 0
        dtype = str(next(model.parameters()).dtype) if params else ""
    return {"variant": getattr(config, "variant", kind), "params": params,
            "dtype": SHORT_DTYPES.get(dtype, dtype)}


class WanCoreModelLoader:
    CATEGORY = "WanCore/loaders"
    DESCRIPTION = ("Loads a Wan 2.1 / 2.2 diffusion model (T2V, I2V, FLF2V, TI2V-5B, VACE, or "
                   "one Wan 2.2 expert), optionally with a separate VACE module. The variant is "
                   "detected from the file's header; the "
                   "weights are read when the sampler first needs them, and an idle Wan 2.2 "
                   "expert is dropped from memory rather than kept.")
    RETURN_TYPES = ("WANCORE_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The diffusion model, ready for WanCore Sampler or WanCore MoE.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (host.list_models("diffusion_models"), {
                "tooltip": "A Wan diffusion model file from models/diffusion_models or "
                           "models/unet (official, ComfyUI repackaged, diffusers, fp8, "
                           "fp8_scaled, or GGUF Q2_K..Q8_0: kept quantised, dequantised per "
                           "layer)."}),
            "weight_dtype": (WEIGHT_DTYPES, {
                "default": "default",
                "tooltip": "'default' keeps the file's dtype (fp8 files stay fp8 and compute "
                           "in bf16). bf16 / fp16 / fp32: the dtype the model computes in. "
                           "fp8_e4m3fn: store a bf16 / fp16 file's weights in fp8 (half the "
                           "memory). fp8_e4m3fn_fast: also multiply in fp8 (torch._scaled_mm, "
                           "the activations quantised per token; Ada / Hopper GPUs, ~3 % "
                           "relative difference)."}),
            "attention": (ATTENTION_BACKENDS, {
                "default": "sdpa",
                "tooltip": "Attention kernel. sdpa (PyTorch) always works; flash_attn and "
                           "sage need their packages installed. fp8: WanCore's Triton kernel, "
                           "self-attention with Q·K in fp8 (Ada / Hopper GPUs and triton; "
                           "otherwise one warning and sdpa; ~1-4 % relative difference per "
                           "attention); int8: the same kernel with int8 Q·K (~1 %). "
                           "Cross-attention stays on sdpa."}),
        }, "optional": {
            "blocks_on_gpu": ("INT", {
                "default": -1, "min": -1, "max": 64,
                "tooltip": "Block streaming for small GPUs: -1 keeps every transformer block "
                           "on the GPU; N keeps N blocks there and streams the others from CPU "
                           "memory one at a time, prefetching the next (same output, slower; "
                           "a 14B model has 40 blocks, 1.3B has 30)."}),
            "vram_budget_gb": ("FLOAT", {
                "default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                "tooltip": "Block streaming by budget: the most GB of VRAM the weights may "
                           "use; the number of blocks kept on the GPU is picked to fit "
                           "(activations come on top). 0 = off; overrides blocks_on_gpu."}),
            "vace_module": (["none"] + host.list_models("diffusion_models"), {
                "default": "none",
                "tooltip": "A separate VACE module file (only vace_* weights, e.g. "
                           "Wan2_1-VACE_module_1_3B_bf16.safetensors) to attach to this Wan 2.1 "
                           "T2V model of the same size, making it a VACE model for WanCore VACE. "
                           "'none' for a whole VACE model or any other model."}),
            "compile": ("BOOLEAN", {
                "default": False,
                "tooltip": "torch.compile the transformer block once and reuse it for every "
                           "block (fuses the norm / modulation / RoPE / gate arithmetic; same "
                           "results up to float rounding). The first step takes longer while "
                           "it compiles (and once more for each new video size). Needs Triton "
                           "on GPUs (a C compiler on the CPU); where compiling fails, one "
                           "warning and the model runs uncompiled."}),
        }}

    def load(self, model_name, weight_dtype="default", attention="sdpa", blocks_on_gpu=-1,
             vram_budget_gb=0.0, vace_module="none", compile=False):
        from wan_core.loading.on_demand import OnDemandDiT

        path = host.model_path("diffusion_models", model_name)
        module = None if vace_module in (None, "", "none") else \
            host.model_path("diffusion_models", vace_module)
        streaming = _block_streaming(blocks_on_gpu, vram_budget_gb)

        def load():
            # Checked and configured from the file's header now; the weights are read when
            # the sampler first needs them (so a Wan 2.2 pair holds one expert at a time).
            handle = OnDemandDiT(path, device="cpu", attention=attention, vace_module=module,
                                 compile=bool(compile), **_load_options(weight_dtype))
            handle.block_streaming = streaming
            return handle

        module_key = None if module is None else (os.path.realpath(module),
                                                  os.stat(module).st_mtime_ns)
        model = CACHE.get(path, ("dit", weight_dtype, attention, streaming, module_key,
                                 bool(compile)), load)
        return {"ui": {"wancore_variant": [_describe(model, "diffusion model")]},
                "result": (model,)}


class WanCoreVAELoader:
    CATEGORY = "WanCore/loaders"
    DESCRIPTION = "Loads a Wan 2.1 (z16) or Wan 2.2 (z48) video VAE; the version is detected."
    RETURN_TYPES = ("WANCORE_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The video VAE for encode/decode and image conditioning.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": (host.list_models("vae"), {
            "tooltip": "wan_2.1_vae.safetensors for Wan 2.1 and the Wan 2.2 14B models; "
                       "wan2.2_vae.safetensors for TI2V-5B. Official .pth files work too."})}}

    def load(self, vae_name):
        from wan_core import load_vae

        path = host.model_path("vae", vae_name)
        vae = CACHE.get(path, ("vae",), lambda: load_vae(path))
        info = {"variant": f"wan{vae.config.version}-vae z{vae.config.z_dim}"}
        return {"ui": {"wancore_variant": [info]}, "result": (vae,)}


class WanCoreTextEncoderLoader:
    CATEGORY = "WanCore/loaders"
    DESCRIPTION = ("Loads the umT5-XXL text encoder (official .pth, ComfyUI's safetensors incl. "
                   "fp8_scaled with the tokenizer embedded, or a GGUF quant).")
    RETURN_TYPES = ("WANCORE_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The text encoder for WanCore Text Encode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder_name": (host.list_models("text_encoders"), {
                "tooltip": "umt5_xxl_fp8_e4m3fn_scaled.safetensors or umt5_xxl_fp16.safetensors "
                           "from models/text_encoders, or a umt5-xxl-encoder GGUF (Q3_K..Q8_0; "
                           "kept quantised, tokenizer read from the file)."}),
            "device": (["default", "cpu"], {
                "default": "default",
                "tooltip": "'cpu' keeps the encoder off the GPU (saves ~6-11 GB of VRAM; "
                           "prompts are encoded once and cached)."}),
        }}

    def load(self, text_encoder_name, device="default"):
        from wan_core import load_text_encoder

        path = host.model_path("text_encoders", text_encoder_name)
        te = CACHE.get(path, ("te",), lambda: load_text_encoder(path))
        te.run_on_cpu = device == "cpu"
        return (te,)


class WanCoreCLIPVisionLoader:
    CATEGORY = "WanCore/loaders"
    DESCRIPTION = "Loads the CLIP ViT-H/14 image encoder used by Wan 2.1 I2V and FLF2V."
    RETURN_TYPES = ("WANCORE_CLIP_VISION",)
    RETURN_NAMES = ("clip_vision",)
    OUTPUT_TOOLTIPS = ("The image encoder for WanCore Image To Video (Wan 2.1 I2V / FLF2V).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (host.list_models("clip_vision"), {
            "tooltip": "clip_vision_h.safetensors from models/clip_vision (only needed for "
                       "Wan 2.1 I2V / FLF2V; Wan 2.2 models use none)."})}}

    def load(self, clip_name):
        from wan_core import load_clip_vision

        path = host.model_path("clip_vision", clip_name)
        return (CACHE.get(path, ("clip",), lambda: load_clip_vision(path)),)


LORA_EXPERTS = ["both", "high_noise", "low_noise"]


class WanCoreLoRA:
    CATEGORY = "WanCore/loaders"
    DESCRIPTION = ("Applies a LoRA to a WanCore model; chain several (their effects add). Reads "
                   "every published Wan LoRA layout (ComfyUI, LightX2V, kohya / musubi, "
                   "diffusers, LoKr / LoHa). The incoming model is not changed and no copy of it "
                   "is made, so changing the strength re-runs only this node; fp8 models keep "
                   "the full LoRA effect.")
    RETURN_TYPES = ("WANCORE_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied (for another WanCore LoRA, WanCore MoE "
                       "or WanCore Sampler).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("WANCORE_MODEL", {
                "tooltip": "A WanCore diffusion model, a LoRA node's output, or a WanCore MoE "
                           "pair."}),
            "lora_name": (host.list_models("loras"), {
                "tooltip": "A Wan LoRA from models/loras. For 4-step generation use a "
                           "distilled LoRA (LightX2V, Wan2.2-Lightning) with the sampler's "
                           "'distilled' solver, 4 steps, cfg 1, shift 5."}),
            "strength": ("FLOAT", {
                "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                "tooltip": "Multiplies the LoRA's effect (1 = as trained, 0 = off, negative "
                           "inverts it)."}),
            "expert": (LORA_EXPERTS, {
                "default": "both",
                "tooltip": "For a WanCore MoE pair: which Wan 2.2 expert gets the LoRA "
                           "(Lightning and LightX2V ship one LoRA per expert). Ignored for a "
                           "single model."}),
        }}

    def apply(self, model, lora_name, strength=1.0, expert="both"):
        from wan_core import apply_loras
        from wan_core.pipeline import unwrap_options, with_options

        path = host.model_path("loras", lora_name)
        # after WanCore Step Cache / Context Windows: keep their settings
        inner, cache, windows = unwrap_options(model)
        patched = apply_loras(inner, [(path, strength)], expert=expert)
        return (with_options(patched, cache, windows),)


NODE_CLASS_MAPPINGS = {
    "WanCoreModelLoader": WanCoreModelLoader,
    "WanCoreVAELoader": WanCoreVAELoader,
    "WanCoreTextEncoderLoader": WanCoreTextEncoderLoader,
    "WanCoreCLIPVisionLoader": WanCoreCLIPVisionLoader,
    "WanCoreLoRA": WanCoreLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WanCoreModelLoader": "WanCore Load Diffusion Model",
    "WanCoreVAELoader": "WanCore Load VAE",
    "WanCoreTextEncoderLoader": "WanCore Load Text Encoder",
    "WanCoreCLIPVisionLoader": "WanCore Load CLIP Vision",
    "WanCoreLoRA": "WanCore LoRA",
}
