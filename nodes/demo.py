"""The embedded demo model's start image: WanCoreDemoFirstFrame renders the first frame of a
demo clip from its caption, so the demo I2V workflow needs no file in ComfyUI's input folder."""
from __future__ import annotations

DEFAULT_CAPTION = "a red circle moving right on a blue background"


class WanCoreDemoFirstFrame:
    CATEGORY = "WanCore/demo"
    DESCRIPTION = ("Draws the first frame of a clip like those the embedded demo model was "
                   "trained on (one shape on a plain background), as a start image for the "
                   "demo I2V model. Give the I2V prompt the same caption.")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("One frame [1, H, W, 3]: the object where the clip starts.",)
    FUNCTION = "render"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "caption": ("STRING", {
                "default": DEFAULT_CAPTION, "multiline": False,
                "tooltip": "'a <colour> <shape> moving <direction> on a <background> "
                           "background': shapes circle / square / triangle; colours red, green, "
                           "blue, yellow, white, purple; directions left, right, up, down; "
                           "backgrounds black, gray, white, blue. The direction places the "
                           "object so that its whole path stays in frame."}),
            "placement_seed": ("INT", {
                "default": 0, "min": 0, "max": 0xFFFFFFFF,
                "tooltip": "Chooses the object's start position and size."}),
            "size": ("INT", {"default": 64, "min": 16, "max": 512, "step": 16,
                             "tooltip": "Width and height in pixels (the demo model: 64)."}),
        }}

    def render(self, caption, placement_seed=0, size=64):
        import torch

        from wan_core.demo import clips

        spec = clips.place(clips.parse_caption(caption), placement_seed)
        frame = clips.render(spec, frames=1, size=size)     # [1, H, W, 3] in 0..1
        return (torch.from_numpy(frame),)


NODE_CLASS_MAPPINGS = {"WanCoreDemoFirstFrame": WanCoreDemoFirstFrame}
NODE_DISPLAY_NAME_MAPPINGS = {"WanCoreDemoFirstFrame": "WanCore Demo First Frame"}
