"""Saving videos: WanCoreSaveVideo writes mp4 / webm / animated webp with a UI preview."""
from __future__ import annotations

from . import host


class WanCoreSaveVideo:
    CATEGORY = "WanCore"
    DESCRIPTION = "Saves frames as a video in ComfyUI's output folder and previews it on the node."
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The frames to save (IMAGE batch, one per frame)."}),
            "fps": ("FLOAT", {"default": 16.0, "min": 1.0, "max": 120.0, "step": 1.0,
                              "tooltip": "Frames per second: 16 for Wan 2.1 / 2.2 14B, "
                                         "24 for TI2V-5B."}),
            "format": (["mp4", "webm", "webp"], {
                "default": "mp4",
                "tooltip": "mp4 (H.264), webm (VP9) or animated webp."}),
            "filename_prefix": ("STRING", {"default": "WanCore/video",
                                           "tooltip": "File name prefix, may include a subfolder."}),
            "quality": ("INT", {"default": 19, "min": 0, "max": 40,
                                "tooltip": "Constant rate factor: lower is better and larger."}),
        }}

    def save(self, images, fps=16.0, format="mp4", filename_prefix="WanCore/video", quality=19):
        from wan_core.video_io import write_video

        if images.shape[0] == 0:
            raise ValueError("no frames to save: the IMAGE input is empty")
        path, filename, subfolder = host.next_output_path(filename_prefix, format)
        write_video(path, images, fps=fps, quality=quality)
        return {"ui": {"wancore_video": [{"filename": filename, "subfolder": subfolder,
                                          "type": "output", "format": format}]}}


NODE_CLASS_MAPPINGS = {"WanCoreSaveVideo": WanCoreSaveVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"WanCoreSaveVideo": "WanCore Save Video"}
