"""Write the small input files of the VACE example workflows to example_workflows/inputs/.

    python tools/make_vace_inputs.py          # rewrites example_workflows/inputs/

Synthetic and deterministic (no randomness, no downloads): simple shapes drawn with numpy and
PIL, saved as animated WebP (loaded by ComfyUI's Load Image as one IMAGE batch, every frame)
and PNG. Clips are 81 frames (5 s at 16 fps, VACE's official length) at 208x120, a quarter of
832x480 in each direction; WanCore VACE scales them up to the video size. Users copy these
files into ComfyUI/input.

- ``vace_reference.png``: a red toy robot on white (reference image -> video).
- ``vace_depth.webp``: a depth-like clip (near = bright): a ball bouncing across a floor.
- ``vace_pose.webp``: a pose-like clip: a stick figure walking, coloured limbs on black.
- ``vace_clip.webp``: a red ball rolling over a meadow (the clip to inpaint and to outpaint).
- ``vace_inpaint_mask.webp``: white (generate) on a disc around the ball, black elsewhere.
- ``vace_extend_clip.webp``: the first 17 frames of vace_clip, then grey frames.
- ``vace_extend_mask.webp``: black (keep) for those 17 frames, white (generate) after.
- ``wancore_demo_path.webp``: the embedded demo's control clip, a white disc on black along a
  curved path (17 frames, 64x64).

Everything is lossless. Masks are black / white, read with Convert Image to Mask (channel red).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "example_workflows" / "inputs"

W, H = 208, 120          # 832x480 / 4
FRAMES = 81              # VACE's official 81 frames at 16 fps
FPS = 16
KEEP = 17                # frames of vace_clip given to the extend workflow
GREY = 128               # the neutral grey VACE expects where nothing is known


def distinct(frames: list) -> list:
    """``frames`` with no two consecutive frames equal: WebP (like GIF and APNG) encoders merge
    a repeated frame into the previous one, and the file would load with fewer frames. Every
    second frame of a repeated run has its top-left pixel moved one level (1/255) towards grey:
    invisible, and on the same side of a mask's 0.5 threshold."""
    out = [frames[0]]
    for frame in frames[1:]:
        if np.array_equal(frame, out[-1]):
            frame = frame.copy()
            pixel = frame[0, 0].astype(np.int16)
            frame[0, 0] = np.where(pixel < 128, pixel + 1, pixel - 1)
        out.append(frame)
    return out


def save_webp(path: Path, frames: list) -> None:
    """A lossless animated WebP of ``frames`` (uint8 [H, W, 3] arrays) at FPS, looping. Lossless
    keeps the masks exactly black / white and decodes to the same pixels everywhere."""
    images = [Image.fromarray(f, "RGB") for f in distinct(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // FPS, loop=0,
                   lossless=True, method=6, minimize_size=True)


def _grid() -> tuple:
    return np.mgrid[0:H, 0:W].astype(np.float32)


def ball_position(t: int, radius: float) -> tuple:
    """Centre (x, y) of a ball rolling left to right in ``FRAMES`` frames, bouncing 3 times on a
    ground line at y = 92."""
    x = -radius + (W + 2 * radius) * t / (FRAMES - 1)
    bounce = abs(math.sin(math.pi * 3 * t / (FRAMES - 1)))
    return x, 92 - radius - 26 * bounce


def depth_clip() -> list:
    """Near is bright: a floor rising from dark (far, top) to light (near, bottom), a dark back
    wall, and a ball shaded as a sphere, brighter than the floor under it."""
    yy, xx = _grid()
    floor = np.where(yy < 40, 30.0, 30 + (yy - 40) / (H - 40) * 150)
    out = []
    for t in range(FRAMES):
        x, y = ball_position(t, 14)
        d = np.sqrt((xx - x) ** 2 + (yy - y) ** 2) / 14
        sphere = np.where(d < 1, 230 - 60 * d ** 2, 0)
        frame = np.maximum(floor, sphere).clip(0, 255).astype(np.uint8)
        out.append(np.repeat(frame[..., None], 3, axis=-1))
    return out


# A pose skeleton: keypoints (body-relative, y down, units of body height) and coloured limbs.
LIMBS = [("neck", "head", (0, 0, 255)), ("neck", "r_shoulder", (255, 0, 0)),
         ("neck", "l_shoulder", (255, 85, 0)), ("r_shoulder", "r_elbow", (255, 170, 0)),
         ("r_elbow", "r_wrist", (255, 255, 0)), ("l_shoulder", "l_elbow", (170, 255, 0)),
         ("l_elbow", "l_wrist", (85, 255, 0)), ("neck", "r_hip", (0, 255, 0)),
         ("r_hip", "r_knee", (0, 255, 85)), ("r_knee", "r_ankle", (0, 255, 170)),
         ("neck", "l_hip", (0, 255, 255)), ("l_hip", "l_knee", (0, 170, 255)),
         ("l_knee", "l_ankle", (0, 85, 255))]


def pose_keypoints(phase: float) -> dict:
    """Keypoints of a walker seen from the side at gait ``phase`` (radians)."""
    swing = 0.22 * math.sin(phase)
    points = {"head": (0.0, 0.0), "neck": (0.0, 0.13), "r_shoulder": (-0.05, 0.15),
              "l_shoulder": (0.05, 0.15), "r_hip": (-0.03, 0.5), "l_hip": (0.03, 0.5)}
    for side, sign in (("r", 1), ("l", -1)):
        leg, arm = sign * swing, -sign * swing * 0.8
        hx, hy = points[f"{side}_hip"]
        kx, ky = hx + 0.24 * math.sin(leg), hy + 0.24 * math.cos(leg)
        bend = max(0.0, -leg) * 0.8                   # the knee bends on the back swing
        points[f"{side}_knee"] = (kx, ky)
        points[f"{side}_ankle"] = (kx + 0.24 * math.sin(leg - bend), ky + 0.24 * math.cos(leg - bend))
        sx, sy = points[f"{side}_shoulder"]
        ex, ey = sx + 0.17 * math.sin(arm), sy + 0.17 * math.cos(arm)
        points[f"{side}_elbow"] = (ex, ey)
        points[f"{side}_wrist"] = (ex + 0.16 * math.sin(arm + 0.3), ey + 0.16 * math.cos(arm + 0.3))
    return points


def pose_clip() -> list:
    out = []
    height = 96
    for t in range(FRAMES):
        image = Image.new("RGB", (W, H))
        draw = ImageDraw.Draw(image)
        cx = 40 + (W - 80) * t / (FRAMES - 1)
        pts = {k: (cx + x * height, 10 + y * height)
               for k, (x, y) in pose_keypoints(2 * math.pi * 2.5 * t / (FRAMES - 1)).items()}
        for a, b, colour in LIMBS:
            draw.line([pts[a], pts[b]], fill=colour, width=3)
        for x, y in pts.values():
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(255, 255, 255))
        out.append(np.asarray(image))
    return out


def meadow_clip() -> tuple:
    """A red ball rolling over a meadow under a blue sky; and the white disc masks around it."""
    yy, xx = _grid()
    sky = np.stack([120 + yy * 0.8, 170 + yy * 0.5, 235 + yy * 0.1], axis=-1)
    grass = np.stack([60 + 0 * yy, 150 - (yy - 80) * 0.6, 50 + 0 * yy], axis=-1)
    scene = np.where((yy < 80)[..., None], sky, grass)
    sun = np.sqrt((xx - 175) ** 2 + (yy - 22) ** 2) < 11
    scene[sun] = (250, 220, 90)
    trunk = (xx > 34) & (xx < 40) & (yy > 58) & (yy < 84)
    crown = np.sqrt((xx - 37) ** 2 + (yy - 50) ** 2) < 14
    scene[trunk] = (110, 75, 40)
    scene[crown] = (40, 110, 45)
    frames, masks = [], []
    for t in range(FRAMES):
        x, y = ball_position(t, 10)
        d = np.sqrt((xx - x) ** 2 + (yy - y) ** 2)
        shade = np.clip(1 - 0.5 * np.sqrt((xx - x + 3) ** 2 + (yy - y + 3) ** 2) / 10, 0.4, 1)
        frame = scene.copy()
        inside = d < 10
        frame[inside] = np.stack([220 * shade, 30 * shade, 30 * shade], axis=-1)[inside]
        frames.append(frame.clip(0, 255).astype(np.uint8))
        mask = np.where(d < 18, 255, 0).astype(np.uint8)
        masks.append(np.repeat(mask[..., None], 3, axis=-1))
    return frames, masks


def reference_image() -> np.ndarray:
    """A red toy robot (boxy head with round eyes, antenna, arms, legs) on white, 160x160."""
    image = Image.new("RGB", (160, 160), (255, 255, 255))
    d = ImageDraw.Draw(image)
    red, dark, grey = (210, 40, 40), (120, 20, 20), (90, 90, 100)
    d.line([(80, 14), (80, 30)], fill=grey, width=3)
    d.ellipse([75, 8, 85, 18], fill=(250, 200, 40))
    d.rounded_rectangle([50, 30, 110, 72], radius=8, fill=red, outline=dark, width=2)
    for ex in (66, 94):
        d.ellipse([ex - 9, 42, ex + 9, 60], fill=(255, 255, 255), outline=dark, width=2)
        d.ellipse([ex - 4, 47, ex + 4, 55], fill=(20, 20, 30))
    d.rounded_rectangle([44, 76, 116, 124], radius=6, fill=red, outline=dark, width=2)
    d.rectangle([66, 86, 94, 108], fill=(250, 200, 40), outline=dark, width=2)
    d.rounded_rectangle([28, 80, 42, 116], radius=5, fill=grey)
    d.rounded_rectangle([118, 80, 132, 116], radius=5, fill=grey)
    d.rounded_rectangle([54, 126, 72, 150], radius=4, fill=grey)
    d.rounded_rectangle([88, 126, 106, 150], radius=4, fill=grey)
    return np.asarray(image)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    Image.fromarray(reference_image()).save(OUT / "vace_reference.png", optimize=True)
    save_webp(OUT / "vace_depth.webp", depth_clip())
    save_webp(OUT / "vace_pose.webp", pose_clip())
    frames, masks = meadow_clip()
    save_webp(OUT / "vace_clip.webp", frames)
    save_webp(OUT / "vace_inpaint_mask.webp", masks)
    grey = np.full((H, W, 3), GREY, dtype=np.uint8)
    save_webp(OUT / "vace_extend_clip.webp", frames[:KEEP] + [grey] * (FRAMES - KEEP))
    black, white = np.zeros_like(grey), np.full_like(grey, 255)
    save_webp(OUT / "vace_extend_mask.webp", [black] * KEEP + [white] * (FRAMES - KEEP))
    save_webp(OUT / "wancore_demo_path.webp", demo_path_clip())
    for path in sorted(OUT.iterdir()):
        print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")


def demo_path_clip() -> list:
    """The embedded demo's VACE control: a white disc on black following the demo's curved
    path (``wan_core.demo.paths``), 17 frames at 64x64."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from wan_core.demo.paths import parse_path, render_control

    clip = render_control(parse_path("curve"), frames=17, size=64)
    return [(f * 255).round().astype(np.uint8) for f in clip]


if __name__ == "__main__":
    main()
