"""The embedded demo: a tiny trained Wan model that makes real videos on any CPU in seconds.

The weights in ``weights/`` use the official Wan layouts, so they go through the same loaders,
variant detection and pipeline as real checkpoints. They are trained by ``python -m
training.train all`` from a clone of the repository (``training/TRAINING.md``; not installed).

    python -m wan_core demo --prompt "a green square moving up on a black background"
    python -m wan_core demo --task i2v --image first.png --prompt "... moving left ..."
    python -m wan_core demo --task moe --prompt "..."     # Wan 2.2 high/low-noise expert pair
    python -m wan_core demo --fast --prompt "..."         # 4 steps, no CFG: the distilled LoRA
    python -m wan_core demo --task vace --path diagonal --prompt "..."   # VACE: follow a path
    python -m wan_core demo --task vace --control silhouette.mp4 --prompt "..."

The model knows one plain shape (circle, square, triangle) in one of six colours (red, green,
blue, yellow, white, purple) moving left, right, up or down over a black, gray, white or blue
background, at 64x64 pixels. With its VACE module (``vace_module.safetensors``, attached to the
T2V) a control clip, the object's white silhouette moving over black
(``paths.render_control``), sets the path instead: diagonal, curved, stopping, turning
(``--path``, see ``paths.PATH_HELP``).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import torch

WEIGHTS_DIR = Path(__file__).parent / "weights"
FILES = {"vae": "vae.safetensors", "text_encoder": "text_encoder.safetensors",
         "t2v": "dit_t2v.safetensors", "i2v": "dit_i2v.safetensors",
         "high_noise": "dit_high_noise.safetensors", "low_noise": "dit_low_noise.safetensors",
         "fast_lora": "fast_lora.safetensors", "vace_module": "vace_module.safetensors"}
TASKS = ("t2v", "i2v", "moe", "vace")

# Sampling defaults, chosen by the held-out evaluation (TRAINING.md).
STEPS = 20
SHIFT = 3.0
CFG = 4.0               # first run: adherence 0.156 at 4 vs 0.062 at 1.5; third: CFG 8 loses colour
SOLVER = "unipc"
FRAMES = 17             # the clip length the models were trained on
# Longer videos: context windows of CONTEXT_FRAMES overlapping by CONTEXT_OVERLAP (README,
# "Context windows"; benchmarks.demo_long). The models know 25-frame clips as well as 17-frame
# ones (one 25-frame pass keeps 99 % of the movement forward), and 25-frame windows step back
# least (issue 28; 17 / 12 before, 17 / 8 before issue 27's retrain).
CONTEXT_FRAMES = 25
CONTEXT_OVERLAP = 20
SIZE = 64
FPS = 8
MOE_BOUNDARY = 0.875
NEGATIVE = ""           # the models are trained with the empty prompt as the CFG negative
# --fast: the T2V with its step-distilled LoRA, sampled as the published distilled Wan LoRAs are.
FAST = {"steps": 4, "cfg": 1.0, "shift": 5.0, "solver": "distilled"}


def demo_context_windows(frames: int):
    """The context windows a ``frames``-frame demo video is sampled with: None (one pass) up to
    ``CONTEXT_FRAMES``, else ``CONTEXT_FRAMES``-frame windows overlapping by
    ``CONTEXT_OVERLAP`` frames (``wan_core.sampling.ContextWindows``)."""
    from ..sampling import ContextWindows

    if frames <= CONTEXT_FRAMES:
        return None
    return ContextWindows(CONTEXT_FRAMES, CONTEXT_OVERLAP)


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / FILES[name]


class DemoModels:
    """The demo's VAE, text encoder and DiTs, loaded lazily through the normal loaders."""

    def __init__(self, weights: Optional[Path] = None):
        self.weights = Path(weights or WEIGHTS_DIR)
        self._cache: dict = {}

    def path(self, name: str) -> Path:
        return self.weights / FILES["vace_module" if name == "vace" else name]

    def get(self, name: str):
        if name not in self._cache:
            from .. import load_dit, load_text_encoder, load_vae

            path = self.path(name)
            if name == "vae":
                model = load_vae(path, dtype=torch.float32)
            elif name == "text_encoder":
                model = load_text_encoder(path, dtype=torch.float32)
            elif name == "vace":        # the T2V with the VACE module attached
                model = load_dit(self.path("t2v"), dtype="fp32",
                                 vace_module=self.path("vace_module"))
            else:
                model = load_dit(path, dtype="fp32")
            self._cache[name] = model
        return self._cache[name]

    def dit(self, task: str, fast: bool = False):
        from ..pipeline import MoEModel

        if fast:
            if task != "t2v":
                raise ValueError("--fast is the distilled text-to-video demo; use it with "
                                 "--task t2v")
            if "t2v_fast" not in self._cache:
                from .. import apply_loras

                self._cache["t2v_fast"] = apply_loras(self.get("t2v"),
                                                      [(self.path("fast_lora"), 1.0)])
            return self._cache["t2v_fast"]
        if task == "moe":
            return MoEModel(self.get("high_noise"), self.get("low_noise"), MOE_BOUNDARY)
        return self.get(task if task in ("i2v", "vace") else "t2v")


def generate_video(models: DemoModels, prompt: str, task: str = "t2v",
                   image: Optional[torch.Tensor] = None, steps: Optional[int] = None,
                   cfg: Optional[float] = None, shift: Optional[float] = None, seed: int = 0,
                   frames: int = FRAMES, size: int = SIZE, solver: Optional[str] = None,
                   fast: bool = False, cache=None, stats: Optional[dict] = None,
                   control: Optional[torch.Tensor] = None,
                   vace_scale: float = 1.0, context_windows="auto") -> torch.Tensor:
    """One demo video: ``[3, frames, size, size]`` in [-1, 1] (float32).

    ``image``: the first frame ``[3, H, W]`` in [-1, 1] for ``task='i2v'``. ``control``: the
    control clip ``[3, T, H, W]`` in [-1, 1] for ``task='vace'`` (a silhouette moving along the
    path, ``paths.render_control``), with strength ``vace_scale`` (0: the plain T2V). ``fast``: the T2V
    with its distilled LoRA; steps / cfg / shift / solver then default to ``FAST``.
    ``cache``: step caching, as ``wan_core.pipeline.generate`` takes it (None, a name from
    ``wan_core.sampling.CACHE_METHODS`` or a ``CacheSettings``); ``stats`` receives the
    evaluated / skipped step counts. ``context_windows``: ``"auto"`` samples videos longer than
    ``CONTEXT_FRAMES`` as overlapping windows (:func:`demo_context_windows`); None: one pass; or a
    ``ContextWindows``."""
    from ..conditioning import VideoConditioning, build_i2v_conditioning, build_vace_conditioning
    from ..pipeline import generate

    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)} (got {task!r})")
    defaults = FAST if fast else {"steps": STEPS, "cfg": CFG, "shift": SHIFT, "solver": SOLVER}
    steps = defaults["steps"] if steps is None else steps
    cfg = defaults["cfg"] if cfg is None else cfg
    shift = defaults["shift"] if shift is None else shift
    solver = solver or defaults["solver"]
    vae = models.get("vae")
    te = models.get("text_encoder")
    context, negative = te.encode([prompt, NEGATIVE])
    if task == "i2v":
        if image is None:
            raise ValueError("the i2v demo needs a first frame (--image FILE)")
        cond = build_i2v_conditioning(vae, image, size, size, frames)
    elif task == "vace":
        if control is None:
            raise ValueError("the vace demo needs a control clip (--path SPEC or --control FILE)")
        cond = build_vace_conditioning(vae, size, size, frames, video=control[None],
                                       strength=vace_scale)
    else:
        cond = VideoConditioning(size, size, frames)
    latent = generate(models.dit(task, fast), [context], [negative] if cfg != 1 else None, cond,
                      steps=steps, guide_scale=cfg, shift=shift, solver=solver, seed=seed,
                      cache=cache, stats=stats,
                      context_windows=demo_context_windows(frames) if context_windows == "auto"
                      else context_windows)
    with torch.no_grad():
        return vae.decode(latent, tile=False)[0]


def cache_option(args):
    """The ``cache=`` value from ``--cache NAME`` / ``--cache-threshold X`` /
    ``--cache-calibration FILE`` (ValueError on a bad name, threshold or file)."""
    from dataclasses import replace

    from ..sampling import cache_settings

    name, threshold = getattr(args, "cache", None), getattr(args, "cache_threshold", None)
    calibration = getattr(args, "cache_calibration", None)
    if name is None:
        if threshold is not None:
            raise ValueError("--cache-threshold needs --cache NAME")
        if calibration is not None:
            raise ValueError("--cache-calibration needs --cache magcache or --cache teacache")
        return None
    settings = cache_settings(name, threshold=threshold)
    if calibration is not None:
        if settings.method == "easycache":
            raise ValueError("--cache-calibration is for magcache and teacache; easycache needs "
                             "no calibration")
        if not Path(calibration).is_file():
            raise FileNotFoundError(f"--cache-calibration: file not found: {calibration}")
        settings = replace(settings, calibration=str(calibration))
    return settings


def check_run_args(args) -> Optional[torch.Tensor]:
    """Everything about a demo run that can be checked before a model loads; returns the
    loaded start image for ``--task i2v`` (else None). Raises ``UsageError``."""
    from ..checks import UsageError, check_memory, check_output_file, estimate_memory, read_image
    from ..conditioning import check_video_size
    from ..sampling import check_sampling_settings
    from ..video_io import FORMATS

    task = getattr(args, "task", "t2v") or "t2v"
    fast = bool(getattr(args, "fast", False))
    image_path = getattr(args, "image", None)
    if fast and task != "t2v":
        raise UsageError("--fast is the distilled text-to-video demo; use it with --task t2v")
    if image_path and task != "i2v":
        raise UsageError("--image is the first frame for --task i2v")
    check_sampling_settings(steps=getattr(args, "steps", None), cfg=getattr(args, "cfg", None),
                            seed=getattr(args, "seed", 0))
    frames = getattr(args, "frames", None) or FRAMES
    size = getattr(args, "size", None) or SIZE
    check_video_size(size, size, frames, 8)
    check_output_file(getattr(args, "out", None) or "demo.mp4", "--out", formats=FORMATS,
                      inputs=[("--image", image_path)] if image_path else [],
                      overwrite=bool(getattr(args, "overwrite", False)))
    check_memory(estimate_memory(size, size, frames), torch.device("cpu"),
                 f"a {size}x{size}, {frames}-frame demo video")
    if image_path:
        return read_image(image_path, "--image")
    if task == "i2v":
        return first_frame_from_prompt(getattr(args, "prompt", ""), getattr(args, "seed", 0),
                                       size)
    return None


def first_frame_from_prompt(prompt: str, seed: int, size: int) -> torch.Tensor:
    """``--task i2v`` without ``--image``: the first frame the prompt's caption describes, drawn
    as WanCore Demo First Frame draws it (placement from ``seed``): ``[3, size, size]`` in
    [-1, 1]. UsageError when the prompt is not a demo caption."""
    from ..checks import UsageError
    from . import clips

    try:
        combo = clips.parse_caption(prompt)
    except ValueError as e:
        raise UsageError(f"--task i2v without --image draws the first frame from the prompt, "
                         f"which must then be a demo caption ({e}); or give --image FILE") from None
    frame = clips.render(clips.place(combo, int(seed) % 2**32), frames=1, size=size)[0]
    return torch.from_numpy(frame).permute(2, 0, 1).float() * 2 - 1


def silhouette_shape(prompt: str) -> Optional[str]:
    """The shape a ``--path`` silhouette is drawn in: the prompt's shape when it is a demo
    caption, else None (a shape-agnostic disc)."""
    from .clips import parse_caption

    try:
        return parse_caption(prompt).shape
    except ValueError:
        return None


def check_vace_args(args) -> Optional[torch.Tensor]:
    """``--path`` / ``--control`` / ``--vace-scale``: for ``--task vace`` exactly one of
    ``--path`` and ``--control``; returns the control clip ``[3, T, H, W]`` in [-1, 1] (the
    path drawn as a white silhouette of the prompt's shape over black, or the file read and
    checked to have enough frames), else None. Raises ``UsageError``."""
    from ..checks import UsageError
    from ..conditioning import nearest_valid_frames
    from ..video_io import load_video
    from . import paths

    task = getattr(args, "task", "t2v") or "t2v"
    spec, control_file = getattr(args, "path", None), getattr(args, "control", None)
    scale = getattr(args, "vace_scale", None)
    if task != "vace":
        given = [o for o, v in (("--path", spec), ("--control", control_file),
                                ("--vace-scale", scale)) if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for "
                             "--task vace (the object follows a control clip)")
        return None
    if spec is None and control_file is None:
        raise UsageError(f"--task vace needs the path to follow: --path SPEC ({paths.PATH_HELP}) "
                         "or --control FILE (a video of a white disc moving over black)")
    if spec is not None and control_file is not None:
        raise UsageError("give either --path or --control for --task vace, not both")
    if scale is not None and not (0.0 <= scale <= 10.0):
        raise UsageError(f"--vace-scale must be 0..10 (1: as trained, 0: the plain T2V); got "
                         f"{scale:g}")
    frames = getattr(args, "frames", None) or FRAMES
    size = getattr(args, "size", None) or SIZE
    if spec is not None:
        try:
            path = paths.parse_path(spec)
        except ValueError as e:
            raise UsageError(str(e)) from None
        clip = paths.render_control(path, frames, size, shape=silhouette_shape(
            getattr(args, "prompt", "") or ""))
        return torch.from_numpy(clip).permute(3, 0, 1, 2).contiguous() * 2 - 1
    try:
        video = load_video(control_file)
    except (ValueError, OSError) as e:
        raise UsageError(f"--control: {e}") from None
    if video.shape[1] < frames:
        below = nearest_valid_frames(video.shape[1])[0]
        raise UsageError(f"--control {control_file} has {video.shape[1]} frames but --frames is "
                         f"{frames}: give a longer control video or --frames {below}")
    return video[:, :frames]


def run(args) -> int:
    """The ``demo`` command. User errors raise ValueError (``UsageError``); the CLI prints
    them as one line and exits with status 2."""
    from ..errors import require_finite
    from ..video_io import video_to_frames, write_video

    started = time.perf_counter()
    fast = bool(getattr(args, "fast", False))
    task = getattr(args, "task", "t2v") or "t2v"
    needed = ("vae", "text_encoder", "t2v") + (("fast_lora",) if fast else ()) + \
        (("vace_module",) if task == "vace" else ())
    missing = [n for n in needed if not weights_path(n).exists()]
    if missing:
        print("wan_core demo: the embedded demo weights are missing "
              f"({', '.join(FILES[n] for n in missing)} in {WEIGHTS_DIR}). Nothing was generated.",
              file=sys.stderr)
        return 1
    image = check_run_args(args)
    control = check_vace_args(args)
    from .clips import unknown_words, vocabulary_help

    unknown = unknown_words(getattr(args, "prompt", "") or "")
    if unknown:
        print(f"warning: the demo model does not know {', '.join(repr(w) for w in unknown)}; "
              f"it runs anyway. {vocabulary_help()}", file=sys.stderr)
    cache = cache_option(args)  # ValueError (bad name / threshold) before any work
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    from ..conditioning import latent_frames

    frames = getattr(args, "frames", None) or FRAMES
    windows = demo_context_windows(frames)
    if windows is not None:
        count = len(windows.windows(latent_frames(frames)))
        print(f"{frames} frames is longer than the demo samples in one pass ({CONTEXT_FRAMES}; "
              f"it was trained on {FRAMES}): sampling {count} overlapping {CONTEXT_FRAMES}-frame "
              f"context windows (overlap {CONTEXT_OVERLAP})")
    stats: dict = {}
    video = generate_video(DemoModels(), args.prompt, task, image, cache=cache, stats=stats,
                           steps=getattr(args, "steps", None),
                           cfg=getattr(args, "cfg", None), fast=fast,
                           seed=getattr(args, "seed", 0) or 0,
                           frames=frames, context_windows=windows,
                           size=getattr(args, "size", None) or SIZE, control=control,
                           vace_scale=1.0 if getattr(args, "vace_scale", None) is None
                           else args.vace_scale)
    require_finite(video, "the decoded demo video")
    if cache is not None:
        print(f"step cache: skipped {stats['skipped']} of {stats['steps']} model evaluations")
    out = getattr(args, "out", None) or "demo.mp4"
    write_video(out, video_to_frames(video), fps=FPS,
                overwrite=bool(getattr(args, "overwrite", False)))
    print(f"wrote {out} ({video.shape[1]} frames, {video.shape[3]}x{video.shape[2]}, {task}) "
          f"in {time.perf_counter() - started:.1f} s")
    return 0
