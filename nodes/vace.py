"""WanCore VACE: control video, masks and reference images -> conditioning for a VACE model."""
from __future__ import annotations

from . import host
from .generation import _size_inputs


class WanCoreVACE:
    CATEGORY = "WanCore"
    DESCRIPTION = ("Conditioning for a Wan VACE model (a VACE file, or a T2V model with a VACE "
                   "module): follow a control video (depth, pose, edges), repaint the white "
                   "part of a mask (inpaint, outpaint, extend a clip: the known frames as the "
                   "control video, the rest masked white), keep the subject of reference "
                   "images. Chain several to combine controls (their effects add up). The "
                   "reference images are sampled in front of the video and dropped from the "
                   "result by the sampler itself.")
    RETURN_TYPES = ("WANCORE_VIDEO_COND",)
    RETURN_NAMES = ("video_cond",)
    OUTPUT_TOOLTIPS = ("Size + VACE controls for WanCore Sampler (or the next WanCore VACE).",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("WANCORE_VAE", {"tooltip": "The Wan 2.1 VAE (VACE models use it)."}),
                **_size_inputs(),
                "strength": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                    "tooltip": "How strongly the control steers the video (the VACE hint "
                               "scale; official 1.0). 0 = the plain text-to-video model."}),
            },
            "optional": {
                "control_video": ("IMAGE", {
                    "tooltip": "Frames to follow or keep: a depth / pose / edge video, or the "
                               "video to inpaint / extend. Resized to the video size (with a "
                               "logged line); extra frames are dropped (logged). Default: grey."}),
                "control_masks": ("MASK", {
                    "tooltip": "White (1) = generate, black (0) = keep the control video. One "
                               "mask stands for every frame. Default: all white."}),
                "reference_images": ("IMAGE", {
                    "tooltip": "Images whose subject the video should show (a batch of "
                               "several is allowed); fitted into the frame on white."}),
                "video_cond": ("WANCORE_VIDEO_COND", {
                    "tooltip": "The output of another WanCore VACE, to add this control to "
                               "it (same size, frames and reference images)."}),
            },
        }

    def build(self, vae, width, height, frames, strength=1.0, control_video=None,
              control_masks=None, reference_images=None, video_cond=None):
        from wan_core.conditioning import build_vace_conditioning

        video = None
        if control_video is not None:     # IMAGE [N, H, W, 3] 0..1 -> [1, 3, N, H, W] [-1, 1]
            video = control_video[..., :3].permute(3, 0, 1, 2)[None].float() * 2 - 1
        mask = None
        if control_masks is not None:     # MASK [N, H, W] 0..1 -> [1, 1, N, H, W]
            masks = control_masks if control_masks.dim() == 3 else control_masks[None]
            mask = masks[None, None].float()
            if mask.shape[2] == 1:
                mask = mask.expand(-1, -1, frames, -1, -1)
        references = None
        if reference_images is not None:
            references = [image[..., :3].permute(2, 0, 1).float() * 2 - 1
                          for image in reference_images]
        if video_cond is not None and not getattr(video_cond, "vace", None):
            raise ValueError("input 'video_cond' must come from another WanCore VACE node "
                             "(it carries no VACE control)")
        host.load_for_compute(vae)
        return (build_vace_conditioning(vae, width, height, frames, video=video, mask=mask,
                                        reference_images=references, strength=strength,
                                        previous=video_cond),)


NODE_CLASS_MAPPINGS = {"WanCoreVACE": WanCoreVACE}
NODE_DISPLAY_NAME_MAPPINGS = {"WanCoreVACE": "WanCore VACE"}
