"""Text encode, video conditioning, MoE expert switcher and the sampler."""
from __future__ import annotations

from . import host
from .latents import from_comfy_latent, to_comfy_latent

from wan_core.prompts import OFFICIAL_NEGATIVE_PROMPT

SOLVERS = ["unipc", "dpm++", "euler", "distilled"]
MAX_SIZE = 4096


class WanCoreTextEncode:
    CATEGORY = "WanCore"
    DESCRIPTION = "Encodes the positive and negative prompts with umT5 (cached per prompt)."
    RETURN_TYPES = ("WANCORE_TEXT_EMBEDS",)
    RETURN_NAMES = ("text_embeds",)
    OUTPUT_TOOLTIPS = ("Positive and negative text embeddings for WanCore Sampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("WANCORE_TEXT_ENCODER", {"tooltip": "From WanCore Load Text Encoder."}),
            "positive": ("STRING", {"multiline": True, "default": "",
                                    "tooltip": "What the video should show (English or Chinese)."}),
            "negative": ("STRING", {"multiline": True, "default": OFFICIAL_NEGATIVE_PROMPT,
                                    "tooltip": "What to avoid. The default is the official Wan "
                                               "negative prompt. Ignored when cfg is 1."}),
        }}

    def encode(self, text_encoder, positive, negative):
        device = "cpu" if getattr(text_encoder, "run_on_cpu", False) else host.torch_device()
        if device != "cpu":
            host.load_for_compute(text_encoder.model)
        pos, neg = text_encoder.encode([positive, negative])
        return ({"positive": [pos.cpu()], "negative": [neg.cpu()]},)


class WanCoreEmptyVideo:
    CATEGORY = "WanCore"
    DESCRIPTION = "The size of a text-to-video generation (no image conditioning)."
    RETURN_TYPES = ("WANCORE_VIDEO_COND",)
    RETURN_NAMES = ("video_cond",)
    OUTPUT_TOOLTIPS = ("Video size for WanCore Sampler.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _size_inputs()}

    def build(self, width, height, frames):
        from wan_core.conditioning import VideoConditioning

        return (VideoConditioning(width, height, frames),)


def _size_inputs(width=832, height=480, frames=81):
    return {
        "width": ("INT", {"default": width, "min": 16, "max": MAX_SIZE, "step": 16,
                          "tooltip": "Video width in pixels: a multiple of 16 (32 for TI2V-5B). "
                                     "Official: 832x480 (480P), 1280x720 (720P), 1280x704 (5B)."}),
        "height": ("INT", {"default": height, "min": 16, "max": MAX_SIZE, "step": 16,
                           "tooltip": "Video height in pixels: a multiple of 16 (32 for TI2V-5B)."}),
        "frames": ("INT", {"default": frames, "min": 1, "max": 1001, "step": 4,
                           "tooltip": "Number of frames, 4n+1: 81 = 5 s at 16 fps (Wan 2.1 / "
                                      "2.2 14B); 121 = 5 s at 24 fps (TI2V-5B)."}),
    }


class WanCoreImageToVideo:
    CATEGORY = "WanCore"
    DESCRIPTION = ("Image conditioning for I2V (Wan 2.1 I2V, Wan 2.2 I2V-A14B, TI2V-5B) and "
                   "first-last-frame (FLF2V). Images are resized to cover the video size and "
                   "centre-cropped.")
    RETURN_TYPES = ("WANCORE_VIDEO_COND",)
    RETURN_NAMES = ("video_cond",)
    OUTPUT_TOOLTIPS = ("Mask + image latent (+ CLIP tokens) for WanCore Sampler.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("WANCORE_VAE", {"tooltip": "The VAE that matches the model "
                                                   "(Wan 2.2 VAE for TI2V-5B, else Wan 2.1)."}),
                "start_image": ("IMAGE", {"tooltip": "The first frame of the video."}),
                **_size_inputs(),
                "mode": (["i2v", "ti2v"], {
                    "default": "i2v",
                    "tooltip": "i2v: mask + image latent (Wan 2.1 I2V / FLF2V, Wan 2.2 "
                               "I2V-A14B). ti2v: first latent frame given (Wan 2.2 TI2V-5B)."}),
            },
            "optional": {
                "end_image": ("IMAGE", {"tooltip": "Optional last frame (FLF2V)."}),
                "clip_vision": ("WANCORE_CLIP_VISION", {
                    "tooltip": "CLIP vision (clip_vision_h) for Wan 2.1 I2V / FLF2V; leave "
                               "empty for Wan 2.2 models."}),
            },
        }

    def build(self, vae, start_image, width, height, frames, mode="i2v", end_image=None,
              clip_vision=None):
        from wan_core.conditioning import (build_i2v_conditioning, build_ti2v_conditioning,
                                           check_video_size)

        check_video_size(width, height, frames, vae.config.stride[1])
        start = _image_to_pixels(start_image[0])
        host.load_for_compute(vae)
        if mode == "ti2v":
            if end_image is not None:
                raise ValueError("TI2V-5B takes only a start image; disconnect end_image")
            return (build_ti2v_conditioning(vae, start.to(host.torch_device()), width, height,
                                            frames),)
        end = _image_to_pixels(end_image[-1]) if end_image is not None else None
        if clip_vision is not None:
            host.load_for_compute(clip_vision)
        return (build_i2v_conditioning(vae, start, width, height, frames, end=end,
                                       clip_vision=clip_vision),)


def _image_to_pixels(image):
    """ComfyUI IMAGE frame [H, W, C] in 0..1 -> [3, H, W] in [-1, 1]."""
    return image[..., :3].permute(2, 0, 1).float() * 2 - 1


class WanCoreMoE:
    CATEGORY = "WanCore"
    DESCRIPTION = ("Wan 2.2 A14B: combines the high-noise and low-noise experts into one model. "
                   "The sampler switches expert by itself at the boundary and keeps only the "
                   "active one on the GPU: no need to chain two samplers.")
    RETURN_TYPES = ("WANCORE_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("An expert pair for WanCore Sampler.",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "high_noise_model": ("WANCORE_MODEL", {"tooltip": "The *high_noise* expert file."}),
            "low_noise_model": ("WANCORE_MODEL", {"tooltip": "The *low_noise* expert file."}),
            "boundary": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.005,
                                   "tooltip": "Switch to the low-noise expert when t < boundary "
                                              "x 1000. 0 = official default for the detected "
                                              "task: 0.875 (T2V), 0.900 (I2V)."}),
            "cfg_high_noise": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 30.0, "step": 0.1,
                                         "tooltip": "CFG scale while the high-noise expert runs "
                                                    "(official: 4.0 T2V, 3.5 I2V)."}),
            "cfg_low_noise": ("FLOAT", {"default": 3.0, "min": 1.0, "max": 30.0, "step": 0.1,
                                        "tooltip": "CFG scale while the low-noise expert runs "
                                                   "(official: 3.0 T2V, 3.5 I2V)."}),
        }}

    def combine(self, high_noise_model, low_noise_model, boundary, cfg_high_noise, cfg_low_noise):
        from dataclasses import replace

        from wan_core.models.configs import expert_pair_mismatch
        from wan_core.pipeline import MoEModel, default_boundary, unwrap_options, with_options
        from wan_core.sampling import CacheSettings

        # A WanCore Step Cache / Context Windows on the experts applies to the pair (the
        # high-noise one's settings first; a cache on each expert with the same method: each
        # expert skips with its own threshold).
        high_noise_model, cache_high, windows_high = unwrap_options(high_noise_model)
        low_noise_model, cache_low, windows_low = unwrap_options(low_noise_model)
        cache, windows = cache_high or cache_low, windows_high or windows_low
        if (isinstance(cache_high, CacheSettings) and isinstance(cache_low, CacheSettings)
                and cache_high.method == cache_low.method):
            cache = replace(cache_high, threshold=cache_low.threshold,
                            high_noise_threshold=cache_high.threshold)

        problem = expert_pair_mismatch(high_noise_model.config, low_noise_model.config)
        if problem:
            raise ValueError(f"the models on high_noise_model and low_noise_model do not belong "
                             f"together: {problem}")
        boundary = boundary or default_boundary(high_noise_model.config.model_type)
        pair = MoEModel(high_noise_model, low_noise_model, boundary,
                        (cfg_high_noise, cfg_low_noise), offload=_swap_experts)
        return (with_options(pair, cache, windows),)


def _swap_experts(active, idle):
    if idle is not None:
        host.release(idle)
    host.load_for_compute(active)


class WanCoreStepCache:
    CATEGORY = "WanCore"
    DESCRIPTION = ("Step caching: the sampler skips whole model evaluations where the output "
                   "barely changes between steps and reuses (extrapolates) the last ones "
                   "instead (easycache defaults on the demo: 1.5-1.7x fewer evaluations at 20 steps, "
                   "2.5-2.6x at 50, 43 dB from the uncached video on average at 50). Put it right "
                   "before WanCore Sampler (after WanCore LoRA / WanCore MoE); it also works before a LoRA node "
                   "or on the experts before WanCore MoE (one on each expert, same method: "
                   "each expert skips with its own threshold; start and end come from the "
                   "high-noise one). The model is not copied.")
    RETURN_TYPES = ("WANCORE_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model carrying the cache settings, for WanCore Sampler.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        from wan_core.sampling import CACHE_METHODS
        from wan_core.sampling.cache import DEFAULTS

        default = DEFAULTS[CACHE_METHODS[0]]
        thresholds = ", ".join(f"{name} {DEFAULTS[name].threshold:g}" for name in CACHE_METHODS)
        return {"required": {
            "model": ("WANCORE_MODEL", {"tooltip": "A diffusion model, a WanCore LoRA output or "
                                                   "a WanCore MoE pair."}),
            "method": (list(CACHE_METHODS), {
                "default": CACHE_METHODS[0],
                "tooltip": "easycache: training-free, works for every model. magcache / "
                           "teacache need calibration data for the model (shipped for the "
                           "demo; TeaCache's published coefficients for Wan 2.1)."}),
            "threshold": ("FLOAT", {
                "default": default.threshold, "min": 0.001, "max": 10.0, "step": 0.005,
                "tooltip": f"Skip steps while the estimated accumulated change stays below "
                           f"this: higher = faster, less faithful. Defaults: {thresholds}."}),
            "start": ("FLOAT", {
                "default": default.start, "min": 0.0, "max": 1.0, "step": 0.01,
                "tooltip": "Fraction of the steps at the start that always run (the layout of "
                           "the video is decided there)."}),
            "end": ("FLOAT", {
                "default": default.end, "min": 0.0, "max": 1.0, "step": 0.01,
                "tooltip": "Steps after this fraction always run (1 = caching up to the end)."}),
        }}

    def apply(self, model, method, threshold, start, end):
        from dataclasses import replace

        from wan_core.pipeline import MoEModel, unwrap_options, with_options
        from wan_core.sampling import cache_settings, check_calibration

        settings = replace(cache_settings(method), threshold=threshold, start=start, end=end)
        inner, _, windows = unwrap_options(model)
        experts = inner.experts if isinstance(inner, MoEModel) else (inner,)
        check_calibration(settings, [expert.config for expert in experts])  # before sampling
        return (with_options(inner, settings, windows),)


class WanCoreContextWindows:
    CATEGORY = "WanCore"
    DESCRIPTION = ("Long videos: the sampler samples the video as overlapping windows of the "
                   "model's length (each window a clip of its own, the overlaps blended every "
                   "step), so a 241-frame video needs the memory of one 81-frame window. Works "
                   "with CFG, Wan 2.2 expert pairs, LoRAs, VACE and the step cache (one cache "
                   "state per window). Put it right before WanCore Sampler.")
    RETURN_TYPES = ("WANCORE_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model carrying the window settings, for WanCore Sampler.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        from wan_core.sampling import BLENDS, SCHEDULES

        return {"required": {
            "model": ("WANCORE_MODEL", {"tooltip": "A diffusion model, a WanCore LoRA / Step "
                                                   "Cache output or a WanCore MoE pair."}),
            "context_frames": ("INT", {
                "default": 81, "min": 5, "max": 1001, "step": 4,
                "tooltip": "Frames per window, 4n+1: the model's length (81 for Wan 2.1 / 2.2, "
                           "121 for TI2V-5B)."}),
            "context_overlap": ("INT", {
                "default": 16, "min": 0, "max": 996, "step": 4,
                "tooltip": "Frames shared by neighbouring windows (a multiple of 4); more "
                           "overlap = smoother seams, more windows."}),
            "schedule": (list(SCHEDULES), {
                "default": "static",
                "tooltip": "static: the same windows every step. uniform: the inner windows "
                           "move by half a stride every other step so no seam stays put (not "
                           "with a step cache)."}),
            "blend": (list(BLENDS), {
                "default": "linear",
                "tooltip": "How overlaps are mixed: linear ramps over the overlap, pyramid "
                           "weights each window by the distance to its centre."}),
        }}

    def apply(self, model, context_frames, context_overlap, schedule="static", blend="linear"):
        from wan_core.pipeline import unwrap_options, with_options
        from wan_core.sampling import ContextWindows

        windows = ContextWindows(context_frames, context_overlap, schedule, blend)
        inner, cache, _ = unwrap_options(model)
        return (with_options(inner, cache, windows),)


class WanCoreMultiGPU:
    CATEGORY = "WanCore"
    DESCRIPTION = ("Samples on several GPUs: the sampler hands the run to worker processes, one "
                   "per GPU, joined in one torch.distributed group (NCCL). The video tokens are "
                   "split over the GPUs (Ulysses sequence parallelism); optionally the CFG "
                   "passes run on two halves of them and the model's weights are sharded "
                   "(FSDP). The workers read the model files themselves and stay alive between "
                   "runs (a changed model or LoRA reloads them); cancelling stops them all. "
                   "Put it right before WanCore Sampler.")
    RETURN_TYPES = ("WANCORE_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model, sampled on the workers by WanCore Sampler.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("WANCORE_MODEL", {"tooltip": "A model from WanCore Load Diffusion Model, "
                                                   "WanCore LoRA, WanCore MoE or WanCore Step "
                                                   "Cache (its files are read by the workers)."}),
            "gpus": ("INT", {"default": 2, "min": 1, "max": 64,
                             "tooltip": "Worker processes, one per visible GPU. The attention "
                                        "heads (12 for 1.3B, 40 for 14B) must divide over the "
                                        "GPUs of one CFG half."}),
            "cfg_parallel": ("BOOLEAN", {"default": False,
                                         "tooltip": "Run the conditional and unconditional "
                                                    "passes on two halves of the GPUs (an even "
                                                    "GPU count; no gain at cfg 1)."}),
            "dit_fsdp": ("BOOLEAN", {"default": False,
                                     "tooltip": "Shard the model's weights over the GPUs "
                                                "(FSDP): each holds 1/N of them plus one block; "
                                                "for models too large for one GPU."}),
        }}

    def apply(self, model, gpus, cfg_parallel=False, dit_fsdp=False):
        import torch

        from wan_core.parallel import OnWorkers, PoolSettings, check_heads, model_spec

        if cfg_parallel and gpus % 2:
            raise ValueError(f"cfg_parallel splits the GPUs into two halves: use an even "
                             f"number of gpus (got {gpus})")
        device = None
        if torch.cuda.is_available():
            if gpus > torch.cuda.device_count():
                raise ValueError(f"gpus is {gpus} but {torch.cuda.device_count()} GPU(s) are "
                                 "visible to ComfyUI")
        else:
            device = "cpu"                  # no CUDA: CPU worker processes over gloo
        settings = PoolSettings(gpus, cfg_parallel, dit_fsdp, device)
        check_heads(model.config.num_heads, settings.ulysses_size,
                    "gpus" + (" / 2 (cfg_parallel)" if cfg_parallel else ""))
        model_spec(model)                    # refuses in-memory weights now, not in the sampler
        return (OnWorkers(model, settings),)


# One pool of worker processes at a time, kept between runs (nodes/ holds host state).
_POOLS: dict = {}


def _pool_for(settings):
    from wan_core.parallel import WorkerPool

    pool = _POOLS.get(settings)
    if pool is not None and pool.alive:
        return pool
    _close_pools()
    if settings.device == "cpu":
        import logging

        logging.getLogger("wan_core").warning(
            "WanCore Multi-GPU: no CUDA GPU; starting %d CPU worker processes (gloo)",
            settings.processes)
    if not _POOLS_CLOSED_AT_EXIT:
        import atexit

        atexit.register(_close_pools)
        _POOLS_CLOSED_AT_EXIT.append(True)
    _POOLS[settings] = pool = WorkerPool(settings)
    return pool


_POOLS_CLOSED_AT_EXIT: list = []


def _close_pools() -> None:
    for pool in list(_POOLS.values()):
        pool.close()
    _POOLS.clear()


def _sample_on_workers(model, cache, text_embeds, negative, video_cond, bar, **kwargs):
    from wan_core.parallel import SamplingJob, model_spec

    def progress(step, total):      # ComfyUI's progress hook may raise to interrupt: the
        bar.update(step)            # pool then stops the workers before re-raising it

    def interrupted():
        host.throw_if_interrupted()
        return False

    job = SamplingJob(model_spec(model.model), text_embeds["positive"], negative, video_cond,
                      dict(kwargs, cache=cache))
    return _pool_for(model.settings).run(job, progress=progress, interrupted=interrupted)


class WanCoreSampler:
    CATEGORY = "WanCore"
    DESCRIPTION = ("Generates a video latent with the official flow-matching solvers. Works with "
                   "one model or a WanCore MoE pair; cancellable, with a live preview.")
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Raw video latent (ComfyUI's convention; native VAE Decode reads it).",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("WANCORE_MODEL", {"tooltip": "A diffusion model or a WanCore MoE pair."}),
                "text_embeds": ("WANCORE_TEXT_EMBEDS", {"tooltip": "From WanCore Text Encode."}),
                "video_cond": ("WANCORE_VIDEO_COND", {
                    "tooltip": "From WanCore Empty Video (T2V) or WanCore Image To Video."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "control_after_generate": True,
                                 "tooltip": "Noise seed; the same seed gives the same video on "
                                            "any device."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 200,
                                  "tooltip": "Official: 50 (2.1 T2V, FLF2V, 5B), 40 (2.1 I2V, "
                                             "2.2 A14B)."}),
                "cfg": ("FLOAT", {"default": 5.0, "min": 1.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale (official 5.0); 1 "
                                             "skips the negative prompt (faster). A WanCore MoE "
                                             "pair uses its own per-expert cfg instead."}),
                "shift": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                    "tooltip": "Sigma shift: official 5.0 (T2V 480P/720P, 5B, "
                                               "2.2 I2V), 3.0 (2.1 I2V 480P), 12.0 (2.2 T2V), "
                                               "16.0 (FLF2V)."}),
                "solver": (SOLVERS, {"default": "unipc",
                                     "tooltip": "unipc (official default), dpm++ or euler. "
                                                "distilled: Euler on the grid the 4-step "
                                                "distilled LoRAs (LightX2V, Lightning) were "
                                                "trained on; use 4 steps, cfg 1, shift 5."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "1: generate from noise. Below 1: video-to-"
                                                 "video from the input latent, noised to this "
                                                 "strength (ComfyUI's rule: the last `steps` "
                                                 "steps of an int(steps / denoise)-step "
                                                 "schedule; about 0.3 keeps the layout). 0: the "
                                                 "input latent comes back unchanged (no step "
                                                 "runs)."}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "Start latent for denoise < 1 (vid2vid)."}),
            },
        }

    def sample(self, model, text_embeds, video_cond, seed, steps, cfg, shift, solver, denoise,
               latent=None):
        from wan_core.pipeline import MoEModel, generate, unwrap_cache, unwrap_options
        from .preview import latent_preview

        from wan_core.parallel import OnWorkers

        model, cache, windows = unwrap_options(model)
        channels = model.config.out_dim
        init = None
        if denoise < 1.0:
            if latent is None:
                raise ValueError("denoise < 1 needs a latent input (encode a video with "
                                 "WanCore VAE Encode)")
            init = from_comfy_latent(latent, channels)
        if denoise == 0.0:      # no step runs: the input latent, checked, comes back as it is
            generate(model, text_embeds["positive"], None, video_cond, steps=steps,
                     guide_scale=cfg, shift=shift, solver=solver, seed=seed, denoise=0.0,
                     init_latent=init)
            return (dict(latent),)
        moe = isinstance(model, MoEModel) or isinstance(model, OnWorkers) and isinstance(
            unwrap_cache(model.model)[0], MoEModel)
        if isinstance(model, OnWorkers):
            negative = text_embeds["negative"] if cfg != 1.0 or moe else None
            out = _sample_on_workers(model, cache, text_embeds, negative, video_cond,
                                     host.ProgressBar(steps), steps=steps, guide_scale=cfg,
                                     shift=shift, solver=solver, seed=seed, denoise=denoise,
                                     init_latent=init, context_windows=windows)
            return (to_comfy_latent(out),)
        if not moe:          # a pair's experts are loaded (and dropped) by its expert switch
            host.load_for_compute(model)
        device = host.torch_device()
        bar = host.ProgressBar(steps)

        def callback(step, total, x, x0):
            bar.update(step, latent_preview(x0, channels))

        def cancel():
            host.throw_if_interrupted()
            return False

        negative = text_embeds["negative"] if cfg != 1.0 or moe else None
        try:
            out = generate(model, text_embeds["positive"], negative, video_cond, steps=steps,
                           guide_scale=cfg, shift=shift, solver=solver, seed=seed,
                           denoise=denoise, init_latent=init, callback=callback, cancel=cancel,
                           device=device, cache=cache, context_windows=windows)
        finally:
            if moe:
                # The next run starts with the high-noise expert (and its LoRAs may change):
                # keep neither, so two experts are never in memory together.
                for expert in model.experts:
                    host.release(expert)
        return (to_comfy_latent(out),)


NODE_CLASS_MAPPINGS = {
    "WanCoreTextEncode": WanCoreTextEncode,
    "WanCoreEmptyVideo": WanCoreEmptyVideo,
    "WanCoreImageToVideo": WanCoreImageToVideo,
    "WanCoreMoE": WanCoreMoE,
    "WanCoreStepCache": WanCoreStepCache,
    "WanCoreContextWindows": WanCoreContextWindows,
    "WanCoreMultiGPU": WanCoreMultiGPU,
    "WanCoreSampler": WanCoreSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WanCoreTextEncode": "WanCore Text Encode",
    "WanCoreEmptyVideo": "WanCore Empty Video",
    "WanCoreImageToVideo": "WanCore Image To Video",
    "WanCoreMoE": "WanCore MoE (Wan 2.2 experts)",
    "WanCoreStepCache": "WanCore Step Cache",
    "WanCoreContextWindows": "WanCore Context Windows",
    "WanCoreMultiGPU": "WanCore Multi-GPU",
    "WanCoreSampler": "WanCore Sampler",
}
