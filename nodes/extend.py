"""WanCore Extend Video: a clip continued segment after segment (wan_core.extend)."""
from __future__ import annotations

from . import host
from .generation import SOLVERS, _image_to_pixels


class WanCoreExtendVideo:
    CATEGORY = "WanCore"
    DESCRIPTION = ("Long videos: continues a clip from its last frame(s), one segment after "
                   "another, and returns the whole clip. An image-to-video model (Wan 2.1 I2V, "
                   "Wan 2.2 I2V-A14B, TI2V-5B) continues from the last frame(s); a VACE model "
                   "keeps the last overlap_frames frames and generates after them (keeps motion "
                   "best). Each segment's first overlap_frames frames stand for the given ones "
                   "and are dropped; each segment adds frames_per_segment - overlap_frames "
                   "frames. Colour drift between segments is corrected over the overlap.")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The whole clip: the input frames followed by every new segment's.",)
    FUNCTION = "extend"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("WANCORE_MODEL", {
                    "tooltip": "An image-to-video model or pair (continues from the last frame) "
                               "or a VACE model (continues from the last overlap_frames)."}),
                "vae": ("WANCORE_VAE", {"tooltip": "The VAE that matches the model."}),
                "text_embeds": ("WANCORE_TEXT_EMBEDS", {
                    "tooltip": "From WanCore Text Encode: what the new segments show."}),
                "video": ("IMAGE", {
                    "tooltip": "The clip to continue (e.g. from WanCore VAE Decode); its size "
                               "is every segment's size."}),
                "segments": ("INT", {"default": 2, "min": 1, "max": 100,
                                     "tooltip": "How many segments to append."}),
                "overlap_frames": ("INT", {
                    "default": 1, "min": 1, "max": 1000,
                    "tooltip": "Frames of the clip each segment is conditioned on, dropped "
                               "from the segment: 1 is the official I2V conditioning (TI2V-5B: "
                               "1 only); more (e.g. 5 or 9) mark several frames as given (I2V) "
                               "or kept (VACE) and carry the motion over the seam."}),
                "frames_per_segment": ("INT", {
                    "default": 81, "min": 5, "max": 1001, "step": 4,
                    "tooltip": "Frames each segment is generated with, 4n+1 (the model's "
                               "length: 81 for Wan 2.1 / 2.2 14B, 121 for TI2V-5B)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "control_after_generate": True,
                                 "tooltip": "Noise seed of the first segment; segment k uses "
                                            "seed + k."}),
                "steps": ("INT", {"default": 40, "min": 1, "max": 200,
                                  "tooltip": "Sampling steps per segment (official: 40 for the "
                                             "I2V models, 50 for VACE)."}),
                "cfg": ("FLOAT", {"default": 5.0, "min": 1.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale; 1 skips the "
                                             "negative prompt. A WanCore MoE pair uses its own."}),
                "shift": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                    "tooltip": "Sigma shift, as on WanCore Sampler."}),
                "solver": (SOLVERS, {"default": "unipc",
                                     "tooltip": "As on WanCore Sampler (distilled: 4 steps, "
                                                "cfg 1, shift 5 with a distilled LoRA)."}),
                "colour_match": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Match each new segment's colours (mean and contrast per "
                               "channel) to the clip's over the overlap frames."}),
            },
            "optional": {
                "end_image": ("IMAGE", {
                    "tooltip": "Optional: where the last segment ends (first-last-frame for an "
                               "I2V model; the last kept control frame for VACE)."}),
                "clip_vision": ("WANCORE_CLIP_VISION", {
                    "tooltip": "CLIP vision (clip_vision_h), needed by Wan 2.1 I2V; leave empty "
                               "for Wan 2.2 and VACE models."}),
            },
        }

    def extend(self, model, vae, text_embeds, video, segments, overlap_frames,
               frames_per_segment, seed, steps, cfg, shift, solver, colour_match=True,
               end_image=None, clip_vision=None):
        from wan_core.extend import check_extend, extend_video
        from wan_core.pipeline import MoEModel, unwrap_options
        from wan_core.video_io import frames_to_video, video_to_frames

        from .preview import latent_preview

        from wan_core.parallel import OnWorkers

        inner = unwrap_options(model)[0]
        if isinstance(inner, OnWorkers):
            raise ValueError("WanCore Extend Video runs on one GPU: connect the model without "
                             "WanCore Multi-GPU")
        _, height, width, _ = video.shape
        end = _image_to_pixels(end_image[-1]) if end_image is not None else None
        check_extend(inner.config, width, height, segments=segments,
                     frames=frames_per_segment, overlap=overlap_frames,
                     clip_frames=video.shape[0], end_image=end is not None,
                     clip_vision=clip_vision is not None)
        moe = isinstance(inner, MoEModel)
        channels = inner.config.out_dim
        bar = host.ProgressBar(segments * steps)

        def callback(step, total, x, x0):
            bar.update(step, latent_preview(x0, channels))

        def cancel():
            host.throw_if_interrupted()
            return False

        def prepare(what):
            if what == "vae":
                host.load_for_compute(vae)
                if clip_vision is not None:
                    host.load_for_compute(clip_vision)
            elif not moe:        # a pair's experts are loaded by its expert switch
                host.load_for_compute(inner)

        negative = text_embeds["negative"] if cfg != 1.0 or moe else None
        try:
            out = extend_video(model, vae, text_embeds["positive"], negative,
                               frames_to_video(video[..., :3]), segments=segments,
                               frames=frames_per_segment, overlap=overlap_frames,
                               end_image=end, clip_vision=clip_vision, steps=steps,
                               guide_scale=cfg, shift=shift, solver=solver, seed=seed,
                               colour_match=colour_match, callback=callback, cancel=cancel,
                               device=host.torch_device(), prepare=prepare)
        finally:
            if moe:
                for expert in inner.experts:
                    host.release(expert)
        return (video_to_frames(out),)


NODE_CLASS_MAPPINGS = {"WanCoreExtendVideo": WanCoreExtendVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"WanCoreExtendVideo": "WanCore Extend Video"}
