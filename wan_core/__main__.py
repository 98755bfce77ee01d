"""Command line: ``python -m wan_core <command>`` (also installed as ``wan-core``).

    python -m wan_core generate --task t2v --dit wan2.1_t2v_1.3B_bf16.safetensors \\
        --vae wan_2.1_vae.safetensors --text-encoder umt5_xxl_fp16.safetensors \\
        --prompt "a cat surfing a wave" --size 832x480 --frames 81 --out cat.mp4
    python -m wan_core demo --prompt "a green square moving up on a black background"

Options left out take the official defaults of the detected model (steps, shift, cfg, frames,
fps, size, MoE boundary).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from pathlib import Path

TASKS = ("t2v", "i2v", "flf2v", "ti2v", "vace")
ATTENTION = ("sdpa", "flash_attn", "sage", "fp8", "int8")    # wan_core.models.attention.BACKENDS


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130
SEED_MAX = 2**64 - 1
MIN_TILE = 64


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``, exit status 2), like every other error;
    a mistyped option gets the nearest real one suggested, a missing command the list."""

    def error(self, message):
        commands = self._commands()
        if commands and "required: command" in message:
            message = "choose a command: " + "; ".join(
                f"{name} ({help_text})" for name, help_text in commands)
        elif message.startswith("unrecognized arguments:"):
            message += self._suggestion(message.split(":", 1)[1].split())
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")

    def _command_action(self):
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action
        return None

    def _commands(self) -> list:
        action = self._command_action()
        if action is None:
            return []
        helps = {a.dest: a.help for a in action._choices_actions}
        return [(name, helps.get(name, "")) for name in action.choices]

    def _suggestion(self, unknown: list) -> str:
        import difflib

        parsers = [self]
        action = self._command_action()
        if action is not None:
            parsers += list(action.choices.values())
        known = sorted({o for p in parsers for a in p._actions for o in a.option_strings})
        for token in unknown:
            if token.startswith("--"):
                close = difflib.get_close_matches(token.split("=", 1)[0], known, n=1,
                                                  cutoff=0.6)
                if close:
                    return f" (did you mean {close[0]}?)"
        return ""


def _whole_number(low: int, high: int | None = None, hint: str = "", allowed: str = ""):
    """An argparse type: a whole number in [low, high], else a one-line error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None
        if value < low or high is not None and value > high:
            wanted = allowed or (f"at least {low}" if high is None else f"from {low} to {high}")
            raise argparse.ArgumentTypeError(f"must be {wanted} (got {value}){hint}")
        return value
    return parse


_positive_int = _whole_number(1, hint="; leave the option out to use the default")
_count = _whole_number(0)
_seed = _whole_number(0, SEED_MAX, allowed=f"from 0 to 2**64-1 = {SEED_MAX}")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number (got {text!r})") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0 (got {text!r}); "
                                         "leave the option out to use the default")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (got {text!r})")
    return value


def _tile(text: str):
    if text in ("auto", "off"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < MIN_TILE or value % 16:
        raise argparse.ArgumentTypeError(
            f"must be auto, off, or a tile size in pixels of at least {MIN_TILE} and a multiple "
            f"of 16, e.g. 256 (got {text!r})")
    return str(value)


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        w, h = int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 832x480 (got {text!r})")
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"width and height must be at least 1 (got {text!r})")
    return w, h


def _demo_size(text: str) -> int:
    """``--size`` of the demo: ``64`` or ``64x64`` (the demo draws square videos)."""
    if "x" in text.lower():
        width, height = _size(text)
        if width != height:
            raise argparse.ArgumentTypeError(
                f"the demo makes square videos (its model learned 64x64): use e.g. "
                f"{width}x{width} (got {text!r})")
        return width
    return _positive_int(text)


def _lora(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:STRENGTH`` -> (file, strength); strength defaults to 1."""
    path, sep, strength = text.rpartition(":")
    if not sep or Path(text).exists():
        return text, 1.0
    try:
        return path, float(strength)
    except ValueError:
        pass
    # Not a number after the last ':'. A drive letter (C:\\loras\\x) or a ':' inside a folder
    # name leaves a path separator after it; anything else was meant as a strength.
    if len(path) > 1 and not any(sep in strength for sep in "/\\"):
        raise argparse.ArgumentTypeError(
            f"strength {strength!r} after ':' is not a number (give FILE or FILE:STRENGTH, "
            f"e.g. {path}:0.8)")
    return text, 1.0


def _add_cache_options(parser: argparse.ArgumentParser) -> None:
    from wan_core.sampling.cache import CACHE_METHODS

    parser.add_argument("--cache", metavar="NAME", default=None, type=str.lower,
                        choices=CACHE_METHODS,
                        help=f"step caching: skip model evaluations where the output barely "
                             f"changes ({', '.join(CACHE_METHODS)}; default: off)")
    parser.add_argument("--cache-threshold", type=float, metavar="X", default=None,
                        help="step-cache threshold (default: the method's; higher = faster, "
                             "less faithful)")


def _add_context_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "context windows (long videos: the video sampled as overlapping windows of the "
        "model's length)")
    group.add_argument("--context-frames", type=_positive_int, metavar="N",
                       help="frames per window, 4n+1 (81 for Wan 2.1 / 2.2); enables windows")
    group.add_argument("--context-overlap", type=_whole_number(0), default=16, metavar="M",
                       help="frames shared by neighbouring windows, a multiple of 4 (default 16)")
    group.add_argument("--context-schedule", choices=("static", "uniform"), default="static",
                       help="static: the same windows every step (default); uniform: inner "
                            "windows move by half a stride every other step")
    group.add_argument("--context-blend", choices=("linear", "pyramid"), default="linear",
                       help="how overlapping windows are mixed (default linear)")


def context_windows_option(args):
    """``--context-frames`` & co. -> a ContextWindows (ValueError on bad values), or None."""
    if getattr(args, "context_frames", None) is None:
        return None
    from wan_core.sampling import ContextWindows

    return ContextWindows(args.context_frames, args.context_overlap, args.context_schedule,
                          args.context_blend)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m wan_core",
        description="Wan 2.1 / 2.2 video generation from the command line.",
        epilog="Exit status: 0 done, 1 failed (e.g. out of memory), 2 a usage error (one "
               "'error: ...' line, nothing written), 130 cancelled with Ctrl-C.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate", help="generate a video from model files",
        description="Generate a video. Options left out take the official defaults of the "
                    "detected model.")
    gen.add_argument("--task", choices=TASKS, default="t2v",
                     help="t2v: text only; i2v: start image (Wan 2.1 I2V, Wan 2.2 I2V-A14B); "
                          "flf2v: start and end image; ti2v: Wan 2.2 TI2V-5B with a start image "
                          "(without --image it runs text-to-video); vace: a Wan VACE model (or "
                          "--vace-module) with --control-video / --control-mask / "
                          "--reference-image")
    gen.add_argument("--dit", required=True, metavar="FILE",
                     help="diffusion model file or folder (for Wan 2.2 A14B: the high-noise expert)")
    gen.add_argument("--dit-low-noise", metavar="FILE",
                     help="Wan 2.2 A14B low-noise expert; enables expert switching (MoE). Each "
                          "expert is read from its file when needed and the idle one is dropped, "
                          "so one expert is in memory at a time")
    gen.add_argument("--prefetch-expert", action="store_true",
                     help="MoE: read the high-noise expert while the prompt is encoded (faster "
                          "start; the text encoder and one expert are then in memory together)")
    gen.add_argument("--vae", required=True, metavar="FILE", help="Wan 2.1 or 2.2 VAE file")
    gen.add_argument("--text-encoder", required=True, metavar="FILE",
                     help="umT5-XXL file (tokenizer embedded, or in a folder beside it)")
    gen.add_argument("--clip-vision", metavar="FILE",
                     help="CLIP vision file (needed by Wan 2.1 I2V and FLF2V)")
    gen.add_argument("--prompt", required=True, help="what the video shows")
    gen.add_argument("--negative-prompt", default=None,
                     help="what to avoid (default: the official Wan negative prompt)")
    gen.add_argument("--image", metavar="FILE", help="start image (i2v, flf2v, ti2v)")
    vace = gen.add_argument_group("VACE (--task vace)")
    vace.add_argument("--vace-module", metavar="FILE",
                      help="a separate VACE module file (only vace_* weights) attached to --dit, "
                           "a Wan 2.1 T2V model of the same size")
    vace.add_argument("--vace-module-low-noise", metavar="FILE",
                      help="MoE: the VACE module of the low-noise expert")
    vace.add_argument("--control-video", metavar="FILE",
                      help="control video (depth, pose, edges, or the frames to keep for "
                           "inpainting / extension); default: grey frames. Its frame count is "
                           "the default --frames")
    vace.add_argument("--control-mask", metavar="FILE",
                      help="mask video or image (one for every frame): white = generate, black "
                           "= keep the control video; default: all white")
    vace.add_argument("--reference-image", action="append", default=[], metavar="FILE",
                      help="an image whose subject the video should show (repeatable); fitted "
                           "into the frame on a white canvas")
    vace.add_argument("--vace-scale", type=_positive_float, default=1.0, metavar="X",
                      help="strength of the VACE control (default 1)")
    gen.add_argument("--end-image", metavar="FILE", help="end image (flf2v)")
    gen.add_argument("--size", type=_size, metavar="WxH",
                     help="video size, multiples of 16 (32 for TI2V-5B); default: the model's")
    gen.add_argument("--frames", type=_positive_int, help="frame count, 4n+1 (default: the model's, 81 or 121)")
    gen.add_argument("--steps", type=_positive_int, help="sampling steps (default: the model's, 40 or 50)")
    gen.add_argument("--shift", type=_positive_float, help="sigma shift (default: the model's)")
    gen.add_argument("--cfg", type=_positive_float,
                     help="guidance scale (default: the model's); for MoE the high-noise expert's")
    gen.add_argument("--cfg-low-noise", type=_positive_float,
                     help="MoE: guidance scale of the low-noise expert (default: the model's)")
    gen.add_argument("--boundary", type=_fraction,
                     help="MoE: switch experts at t = boundary x 1000 (default 0.875 T2V, 0.900 I2V)")
    gen.add_argument("--solver", choices=("unipc", "dpm++", "euler", "distilled"), default="unipc",
                     help="sampling solver (default: unipc, the official one). distilled: Euler "
                          "on the grid of the 4-step distilled LoRAs (LightX2V, Wan2.2-Lightning); "
                          "steps / shift / cfg then default to 4 / 5 / 1")
    gen.add_argument("--lora", action="append", type=_lora, default=[], metavar="FILE[:STRENGTH]",
                     help="apply a LoRA (repeatable; strength default 1). With --dit-low-noise it "
                          "goes on the high-noise expert")
    gen.add_argument("--lora-low-noise", action="append", type=_lora, default=[],
                     metavar="FILE[:STRENGTH]",
                     help="apply a LoRA to the Wan 2.2 low-noise expert (repeatable)")
    _add_cache_options(gen)
    gen.add_argument("--cache-calibration", metavar="FILE",
                     help="magcache / teacache: the calibration table for this model (a JSON "
                          "file written by --calibrate-cache); the shipped table covers the demo "
                          "and the Wan 2.1 TeaCache models")
    gen.add_argument("--calibrate-cache", metavar="FILE",
                     help="record this model's magcache / teacache calibration during this run "
                          "(which skips nothing) and save it to FILE (added to the file when it "
                          "exists); later runs use it with --cache magcache --cache-calibration "
                          "FILE")
    gen.add_argument("--seed", type=_seed, default=0, help="noise seed, 0 .. 2**64-1 (default 0)")
    gen.add_argument("--fps", type=_positive_float, help="frames per second of the file (default: the model's)")
    gen.add_argument("--out", default="video.mp4", help="output file: .mp4, .webm or .webp")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace --out / --save-latents when they exist (input files are "
                          "never overwritten)")
    gen.add_argument("--save-latents", metavar="FILE",
                     help="also save the raw latents (safetensors, key 'latent')")
    gen.add_argument("--device", default=None,
                     help="compute device, e.g. cuda or cpu (default: cuda when available)")
    gen.add_argument("--fp8-matmul", action="store_true",
                     help="multiply the fp8-stored weights (fp8 / fp8_scaled files) in fp8 "
                          "(torch._scaled_mm; Ada / Hopper GPUs, else one warning and bf16)")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the transformer block once, shared by every block "
                          "(the first step takes longer while it compiles; needs a C compiler "
                          "on the CPU, Triton on GPUs; else one warning and no compile)")
    gen.add_argument("--attention", choices=ATTENTION, default="sdpa",
                     help="attention kernel (default sdpa). fp8: WanCore's Triton kernel for "
                          "self-attention, Q·K in fp8 (Ada / Hopper and triton, else one "
                          "warning and sdpa); int8: the same kernel with int8 Q·K (a third of "
                          "fp8's error); flash_attn / sage need their packages")
    gen.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                     help="DiT compute dtype (default: the file's; fp8 files compute in bf16)")
    stream = gen.add_mutually_exclusive_group()
    stream.add_argument("--blocks-on-device", type=_count, metavar="N",
                        help="block streaming: keep N transformer blocks on the device and "
                             "stream the others from CPU memory, prefetching the next (same "
                             "output; for GPUs too small for the model)")
    stream.add_argument("--vram-budget", type=_positive_float, metavar="GB",
                        help="block streaming by budget: keep as many blocks on the device as "
                             "fit in GB of memory for the weights (activations come on top)")
    gen.add_argument("--text-encoder-cpu", action="store_true",
                     help="run the text encoder on the CPU (saves GPU memory)")
    gen.add_argument("--tile", default="auto", type=_tile,
                     help="VAE decode tiling: auto (by memory), off, or a tile size in pixels")
    _add_context_options(gen)
    _add_video_options(gen)
    multi = gen.add_argument_group(
        "several GPUs (start with torchrun --nproc-per-node N -m wan_core generate ...; only "
        "rank 0 prints and writes)")
    multi.add_argument("--ulysses-size", type=_positive_int, default=1, metavar="N",
                       help="sequence parallelism: split the video tokens over N GPUs (N must "
                            "divide the attention heads: 12 for 1.3B, 40 for 14B)")
    multi.add_argument("--cfg-parallel", action="store_true",
                       help="run the conditional and unconditional passes on two halves of the "
                            "GPUs (the process count is ulysses-size x 2)")
    multi.add_argument("--dit-fsdp", action="store_true",
                       help="shard the diffusion model's weights over the GPUs (FSDP)")
    multi.add_argument("--t5-fsdp", action="store_true",
                       help="shard the umT5 text encoder's weights over the GPUs (FSDP)")
    multi.add_argument("--dist-timeout", type=_positive_float, default=600.0, metavar="S",
                       help="seconds a process waits for the others before it stops with an "
                            "error (a process that died); default 600")

    from wan_core.demo.clips import vocabulary_help

    demo = sub.add_parser("demo", help="generate a video with the embedded tiny demo model",
                          description="Generate a video with the tiny demo model embedded in "
                                      "the pack (64x64, 17 frames at 8 fps). "
                                      + vocabulary_help())
    demo.add_argument("--prompt", default="a green square moving up on a black background",
                      help="what the video shows (the demo model knows simple shapes, colours "
                           "and directions)")
    demo.add_argument("--out", default="demo.mp4", help="output video file (.mp4, .webm, .webp)")
    demo.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    demo.add_argument("--task", choices=("t2v", "i2v", "moe", "vace"), default="t2v",
                      help="t2v: text only; i2v: start from --image (Wan 2.2 I2V layout); moe: "
                           "the Wan 2.2 high-noise / low-noise expert pair; vace: the object "
                           "follows --path or --control (the T2V with its VACE module)")
    demo.add_argument("--image", metavar="FILE",
                      help="first frame for --task i2v (default: drawn from the prompt, as "
                           "WanCore Demo First Frame draws it)")
    demo.add_argument("--path", metavar="SPEC",
                      help="--task vace: the path the object follows, drawn as its white "
                           "silhouette on black: a named path (diagonal, diagonal-up, curve, "
                           "stop, turn) or waypoints 'x,y:x,y[:...]' in fractions of the frame "
                           "(0..1, y down) reached at equal time intervals (repeat a point to "
                           "pause), e.g. '0.2,0.8:0.5,0.2:0.8,0.8'")
    demo.add_argument("--control", metavar="FILE",
                      help="--task vace: a control video instead of --path: the object's "
                           "silhouette (or a disc) in white moving over black")
    demo.add_argument("--vace-scale", type=float, default=None, metavar="X",
                      help="--task vace: strength of the control, 0..10 (default 1; 0: the "
                           "plain T2V)")
    demo.add_argument("--steps", type=_positive_int, default=None, help="sampling steps (default 20)")
    demo.add_argument("--cfg", type=_positive_float, default=None, help="guidance scale (default: tuned)")
    demo.add_argument("--frames", type=_positive_int, default=17,
                      help="frame count, 4n+1 (default 17, the length the demo was trained on; "
                           "up to 25 in one pass, longer videos as overlapping 25-frame context "
                           "windows)")
    demo.add_argument("--size", type=_demo_size, default=64, metavar="WxH",
                      help="video size, WxH like generate's (the demo draws squares: W = H) or "
                           "one number, a multiple of 16 (default 64x64)")
    demo.add_argument("--seed", type=_seed, default=0, help="noise seed, 0 .. 2**64-1")
    _add_cache_options(demo)
    demo.add_argument("--fast", action="store_true",
                      help="t2v in 4 steps without CFG: the demo's step-distilled LoRA "
                           "(fast_lora.safetensors) through apply_loras, the distilled sampler")
    return parser


def _tile_option(text: str):
    if text == "auto":
        return None
    if text == "off":
        return False
    size = int(text)
    return (size, size)


def _inputs(args) -> list:
    """``(option, path)`` of every input file of a generate run."""
    pairs = [("--dit", args.dit), ("--dit-low-noise", args.dit_low_noise), ("--vae", args.vae),
             ("--vace-module", args.vace_module),
             ("--vace-module-low-noise", args.vace_module_low_noise),
             ("--control-video", args.control_video), ("--control-mask", args.control_mask),
             ("--text-encoder", args.text_encoder), ("--clip-vision", args.clip_vision),
             ("--image", args.image), ("--end-image", args.end_image),
             ("--video", getattr(args, "video", None))]
    pairs += [("--cache-calibration", args.cache_calibration)]
    pairs += [("--reference-image", path) for path in args.reference_image]
    pairs += [("--lora", path) for path, _ in args.lora]
    pairs += [("--lora-low-noise", path) for path, _ in args.lora_low_noise]
    return [(option, path) for option, path in pairs if path is not None]


def check_image_inputs(config, args: argparse.Namespace) -> None:
    """An image-to-video DiT needs --image; a Wan 2.1 I2V / FLF2V one also --clip-vision."""
    from wan_core.checks import UsageError

    if config.model_type in ("i2v", "flf2v") and not (args.image or getattr(args, "video", None)):
        raise UsageError(f"{args.dit} is an image-to-video model ({config.model_type}); "
                         "give --task i2v --image FILE (or flf2v with --end-image)")
    if config.has_image_branch and not args.clip_vision:
        raise UsageError("this Wan 2.1 I2V / FLF2V model needs --clip-vision "
                         "(clip_vision_h.safetensors)")


def check_expert_pair(high, low, args: argparse.Namespace) -> None:
    """--dit and --dit-low-noise must be the two experts of one Wan 2.2 pair (same model type
    and size); checked from the headers, before the high-noise phase runs."""
    from wan_core.checks import UsageError
    from wan_core.loading.checkpoint import source_name
    from wan_core.models.configs import expert_pair_mismatch

    problem = None if high is None or low is None else expert_pair_mismatch(high, low)
    if problem:
        raise UsageError(f"--dit-low-noise {source_name(args.dit_low_noise)} does not pair with "
                         f"--dit {source_name(args.dit)}: {problem}")


def uses_parallel(args: argparse.Namespace) -> bool:
    return bool(args.ulysses_size > 1 or args.cfg_parallel or args.dit_fsdp or args.t5_fsdp)


def check_parallel_args(args: argparse.Namespace) -> None:
    """Multi-GPU options: launched by torchrun, and ulysses x cfg = the process count (from
    torchrun's environment, before the group is joined)."""
    import os

    from wan_core.parallel import ParallelError, check_layout, launched_by_torchrun

    if not uses_parallel(args):
        return
    if not launched_by_torchrun():
        raise ParallelError(
            "multi-GPU options (--ulysses-size, --cfg-parallel, --dit-fsdp, --t5-fsdp) need one "
            "process per GPU started by torchrun: torchrun --nproc-per-node N -m wan_core "
            "generate ...")
    check_layout(int(os.environ["WORLD_SIZE"]), args.ulysses_size, args.cfg_parallel)
    if args.dit_fsdp and (args.blocks_on_device is not None or args.vram_budget is not None):
        raise ParallelError("--dit-fsdp shards the blocks over the GPUs and block streaming "
                            "streams them from CPU memory; use one of the two")


def check_generate_args(args: argparse.Namespace) -> dict:
    """Everything about a generate run that can be checked before a model loads.

    Returns ``device``, ``image`` / ``end_image`` (loaded tensors or None) and the DiT config
    read from the file header (None when the file is not a single safetensors file)."""
    from wan_core.checks import (UsageError, check_device, check_distinct_outputs, check_kind,
                                 check_memory, check_output_file, check_vae_matches,
                                 estimate_memory, file_size, peek_dit_config,
                                 peek_vae_latent_channels, read_image)
    from wan_core.conditioning import check_video_size
    from wan_core.models.configs import DEFAULTS
    from wan_core.demo import cache_option
    from wan_core.pipeline import vae_stride_for
    from wan_core.sampling import check_calibration
    from wan_core.video_io import FORMATS

    video_run = check_video_args(args)        # --video / --denoise / --extend
    if args.task in ("i2v", "flf2v") and not args.image and not args.video:
        raise UsageError(f"--task {args.task} needs --image (the start frame)")
    if args.task == "flf2v" and not args.end_image:
        raise UsageError("--task flf2v needs --end-image (the last frame)")
    if args.end_image and args.task != "flf2v" and not args.extend:
        raise UsageError("--end-image is for --task flf2v (or --extend: the last segment ends "
                         "on it)")
    if args.image and args.task in ("t2v", "vace"):
        raise UsageError(f"--image needs --task i2v, flf2v or ti2v ({args.task} uses no start "
                         "image; VACE takes --reference-image or --control-video)")
    vace_inputs = [option for option, value in (
        ("--control-video", args.control_video), ("--control-mask", args.control_mask),
        ("--reference-image", args.reference_image), ("--vace-module", args.vace_module),
        ("--vace-module-low-noise", args.vace_module_low_noise)) if value]
    if vace_inputs and args.task != "vace":
        raise UsageError(f"{', '.join(vace_inputs)} {'needs' if len(vace_inputs) == 1 else 'need'}"
                         " --task vace")
    if args.vace_module_low_noise and not args.dit_low_noise:
        raise UsageError("--vace-module-low-noise needs --dit-low-noise (a Wan 2.2 expert pair)")
    if args.lora_low_noise and not args.dit_low_noise:
        raise UsageError("--lora-low-noise needs --dit-low-noise (a Wan 2.2 expert pair); for "
                         "one model use --lora")
    for option, path in _inputs(args):
        if not Path(path).exists():
            what = "LoRA file" if option.startswith("--lora") else "file"
            raise FileNotFoundError(f"{option}: {what} not found: {path}")
    inputs = _inputs(args)
    check_output_file(args.out, "--out", formats=FORMATS, inputs=inputs,
                      overwrite=args.overwrite)
    if args.save_latents:
        check_output_file(args.save_latents, "--save-latents", inputs=inputs,
                          overwrite=args.overwrite)
    if args.calibrate_cache:
        if args.cache:
            raise UsageError("--calibrate-cache records a calibration in a run without a cache; "
                             "leave out --cache")
        check_output_file(args.calibrate_cache, "--calibrate-cache", inputs=inputs,
                          overwrite=True)          # an existing table gets this model added
        if Path(args.calibrate_cache).exists():
            from wan_core.sampling import load_calibration

            load_calibration(args.calibrate_cache)    # refuses a file that is not a table
    check_distinct_outputs(("--out", args.out), ("--save-latents", args.save_latents),
                           ("--calibrate-cache", args.calibrate_cache))
    cache = cache_option(args)           # a bad name / threshold / file: before any work
    windows = context_windows_option(args)
    if windows is not None and cache is not None and windows.schedule != "static":
        raise UsageError("the step cache keeps one state per context window: use "
                         "--context-schedule static with --cache")
    device = check_device(args.device)
    image = read_image(args.image, "--image") if args.image else None
    end_image = read_image(args.end_image, "--end-image") if args.end_image else None
    controls = read_vace_inputs(args) if args.task == "vace" else None

    check_parallel_args(args)
    config = peek_dit_config(args.dit, args.vace_module)
    low_config = peek_dit_config(args.dit_low_noise, args.vace_module_low_noise) \
        if args.dit_low_noise else None
    if args.ulysses_size > 1 and config is not None:
        from wan_core.parallel import check_heads

        check_heads(config.num_heads, args.ulysses_size)
    if args.task == "vace":
        for option, dit_config, module in (("--dit", config, "--vace-module"),
                                           ("--dit-low-noise", low_config,
                                            "--vace-module-low-noise")):
            if dit_config is not None and not dit_config.is_vace:
                raise UsageError(f"--task vace needs a Wan VACE model: {option} is "
                                 f"{dit_config.variant} ({dit_config.model_type}) without VACE "
                                 f"weights; give a VACE model, or its VACE module with {module}")
    if args.dit_low_noise:
        check_expert_pair(config, low_config, args)
    from wan_core.loading.lora import check_loras
    for loras, dit_config in ((args.lora, config), (args.lora_low_noise, low_config)):
        if loras and dit_config is not None:
            check_loras(dit_config, loras)       # reads the LoRAs only, not the model
    if config is not None and (low_config is not None or not args.dit_low_noise):
        check_calibration(cache, [c for c in (config, low_config) if c is not None])
    check_kind(args.text_encoder, "text_encoder")
    if args.clip_vision:
        check_kind(args.clip_vision, "clip_vision")
    vae_channels = peek_vae_latent_channels(args.vae)
    if config is not None:
        check_image_inputs(config, args)
        if vae_channels is not None:
            check_vae_matches(config.out_dim, vae_channels, args.dit, args.vae)
        defaults = DEFAULTS.get(config.variant, DEFAULTS["custom"])
        width, height = args.size or defaults.size
        frames = args.frames or default_frames(controls) or defaults.frames
        check_video_model(args, video_run, config, width, height, frames)
        check_video_size(width, height, frames, vae_stride_for(config.out_dim))
        weights = sum(file_size(p) for p in (args.dit, args.dit_low_noise, args.vae,
                                             args.text_encoder, args.clip_vision))
        estimate = estimate_memory(width, height, frames, latent_channels=config.out_dim,
                                   dim=config.dim, ffn_dim=config.ffn_dim, weights=weights)
        print(check_memory(estimate, device, f"a {width}x{height}, {frames}-frame video"))
    return {"device": device, "image": image if image is not None else video_run["first_frame"],
            "end_image": end_image, "config": config, "cache": cache, "controls": controls,
            "windows": windows, "video_run": video_run}


def read_vace_inputs(args: argparse.Namespace) -> dict:
    """The VACE input files, read now (cheap next to the models) so a bad file fails first:
    ``video`` [1, 3, T, H, W] in [-1, 1], ``mask`` [1, 1, T, H, W] in 0..1 (one image stands
    for every frame), ``references``: a list of [3, H, W] in [-1, 1]."""
    from wan_core.checks import UsageError, read_image
    from wan_core.video_io import load_mask, load_video

    def read(option, path, loader):
        try:
            return loader(path)
        except (ValueError, OSError) as e:
            raise UsageError(f"{option}: {e}") from None

    video = read("--control-video", args.control_video, load_video)[None] \
        if args.control_video else None
    mask = read("--control-mask", args.control_mask, load_mask)[None] \
        if args.control_mask else None
    references = [read_image(path, "--reference-image") for path in args.reference_image]
    return {"video": video, "mask": mask, "references": references or None}


def default_frames(controls) -> int | None:
    """With a control video and no --frames: its length (the 4n+1 count at or below it)."""
    from wan_core.conditioning import nearest_valid_frames

    if not controls or controls["video"] is None:
        return None
    return nearest_valid_frames(controls["video"].shape[2])[0]


# ------------------------------------------------- video-to-video (--video --denoise), --extend

def _denoise(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1 (got {text!r})") from None
    if not 0.0 <= value <= 1.0:              # NaN fails too
        raise argparse.ArgumentTypeError(
            f"must be from 0 to 1 (got {text!r}): 0 keeps the video as it is, about 0.3 keeps "
            "its layout, 1 ignores it")
    return value


def _add_video_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("video-to-video and long videos (--video, --extend)")
    group.add_argument("--video", metavar="FILE",
                       help="an input clip (mp4, webm, animated webp): restyled with --denoise "
                            "and / or continued with --extend. Its length (4n+1 frames at most) "
                            "is the default --frames and its size the default --size; another "
                            "--size resizes it. An I2V task without --image starts from its "
                            "first frame")
    group.add_argument("--denoise", type=_denoise, metavar="X",
                       help="video-to-video strength for --video, 0..1: the video is encoded, "
                            "noised to this strength and sampled with the prompt (ComfyUI's "
                            "KSampler rule: the last --steps steps of an int(steps / X)-step "
                            "schedule). About 0.3 keeps the layout; 0 returns the video as the "
                            "VAE reconstructs it")
    group.add_argument("--extend", type=_whole_number(1), metavar="N",
                       help="append N segments, each continuing from the end of the clip so "
                            "far (the generated one, or --video): through an image-to-video "
                            "model (--task i2v or ti2v) or a VACE model (--task vace), from "
                            "the clip's last --extend-overlap frames. --end-image: the last "
                            "segment ends on it")
    group.add_argument("--extend-frames", type=_positive_int, metavar="N",
                       help="frames each segment is generated with, 4n+1 (default: --frames); "
                            "each adds N - overlap frames")
    group.add_argument("--extend-overlap", type=_positive_int, metavar="N",
                       help="frames of the clip each segment continues from, dropped from the "
                            "segment (default 1 for i2v, the official conditioning, where more "
                            "mark several frames as given; ti2v: 1 only; default 5 for vace)")
    group.add_argument("--extend-prompt", action="append", default=[], metavar="TEXT",
                       help="--extend: the prompt of the next segment (repeatable: one per "
                            "segment in order, the last one for the rest; default --prompt)")
    group.add_argument("--no-colour-match", action="store_true",
                       help="--extend: keep each segment's colours as generated (by default "
                            "they are matched to the clip's over the overlap)")


def extend_overlap(args: argparse.Namespace) -> int:
    return args.extend_overlap or (5 if args.task == "vace" else 1)


def check_video_args(args: argparse.Namespace) -> dict:
    """``--video`` / ``--denoise`` / ``--extend``: checked before any model loads. Reads the
    video; it sets the default ``--frames`` (its length, the 4n+1 count at or below it) and
    ``--size`` (its size). Returns ``video`` ([3, T, H, W] in [-1, 1], cut to --frames, or
    None), ``size_from_video`` and ``first_frame`` (the start image of an I2V task without
    --image, else None)."""
    from wan_core.checks import UsageError
    from wan_core.conditioning import nearest_valid_frames
    from wan_core.video_io import load_video

    run = {"video": None, "size_from_video": False, "first_frame": None}
    if args.denoise is not None and not args.video:
        raise UsageError("--denoise restyles an input video: give --video FILE")
    if not args.extend:
        given = [option for option, value in (("--extend-frames", args.extend_frames),
                                              ("--extend-overlap", args.extend_overlap),
                                              ("--extend-prompt", args.extend_prompt),
                                              ("--no-colour-match", args.no_colour_match))
                 if value]
        if given:
            raise UsageError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} "
                             "--extend N")
    else:
        if args.task not in ("i2v", "ti2v", "vace"):
            raise UsageError(f"--extend continues the clip through an image-to-video model "
                             f"(--task i2v or ti2v) or a VACE model (--task vace), not --task "
                             f"{args.task}" + (" (with --end-image the last segment ends on "
                                               "it: use --task i2v)" if args.task == "flf2v"
                                               else ""))
        if args.save_latents:
            raise UsageError("--save-latents saves one latent, and an extended video is made of "
                             "several segments: leave out --save-latents or --extend")
        if args.calibrate_cache:
            raise UsageError("--calibrate-cache records one plain generation: leave out --extend")
        if uses_parallel(args):
            raise UsageError("--extend runs in one process: leave out the multi-GPU options")
    if not args.video:
        return run
    if args.denoise is None and not args.extend:
        raise UsageError("--video needs --denoise X (restyle it: video-to-video) or --extend N "
                         "(continue it)")
    if args.calibrate_cache and args.denoise is None:
        raise UsageError("--calibrate-cache records a generation: with --video give --denoise")
    try:
        video = load_video(args.video)
    except (ValueError, OSError) as e:
        raise UsageError(f"--video: {e}") from None
    count = video.shape[1]
    if args.frames is None:
        args.frames = nearest_valid_frames(count)[0]
        if args.frames != count:
            print(f"--video {args.video} has {count} frames, not 4n+1: using its first "
                  f"{args.frames} (give --frames to choose)")
    elif args.frames > count:
        below = nearest_valid_frames(count)[0]
        raise UsageError(f"--video {args.video} has {count} frames but --frames is "
                         f"{args.frames}: give --frames {below} or less (4n+1), or a longer "
                         "video")
    run["video"] = video[:, :args.frames]
    if args.size is None:
        args.size = (video.shape[3], video.shape[2])
        run["size_from_video"] = True
    if args.task in ("i2v", "flf2v") and not args.image:
        run["first_frame"] = run["video"][:, 0]
        print(f"--task {args.task}: the start image is the first frame of --video")
    return run


def check_video_model(args: argparse.Namespace, run: dict, config, width: int, height: int,
                      frames: int) -> None:
    """With the DiT's config (from the file header): a size taken from ``--video`` must suit
    the model, and ``--extend`` the model and the sizes."""
    from wan_core.checks import UsageError
    from wan_core.conditioning import PATCH
    from wan_core.extend import check_extend
    from wan_core.models.configs import DEFAULTS
    from wan_core.pipeline import vae_stride_for

    multiple = vae_stride_for(config.out_dim) * PATCH
    if run["size_from_video"] and (width % multiple or height % multiple):
        fit = [max(multiple, v // multiple * multiple) for v in (width, height)]
        default = DEFAULTS.get(config.variant, DEFAULTS["custom"]).size
        raise UsageError(f"--video {args.video} is {width}x{height}, not a size this model "
                         f"takes (width and height multiples of {multiple}): give --size, e.g. "
                         f"--size {fit[0]}x{fit[1]} or the model's {default[0]}x{default[1]}, "
                         "and the video is resized to it")
    if args.extend:
        check_extend(config, width, height, segments=args.extend,
                     frames=args.extend_frames or frames, overlap=extend_overlap(args),
                     clip_frames=frames, method="vace" if args.task == "vace" else "i2v",
                     end_image=bool(args.end_image), clip_vision=bool(args.clip_vision))


def prepare_video_run(args: argparse.Namespace, run: dict, vae, width: int, height: int,
                      device) -> tuple:
    """``(clip, generate_kwargs)``: the --video clip at the video's size (resized with one
    printed line when --size differs), and ``denoise`` / ``init_latent`` for video-to-video."""
    import torch

    from wan_core.extend import fit_video

    clip = run["video"]
    if clip is None:
        return None, {}
    if (clip.shape[3], clip.shape[2]) != (width, height):
        print(f"--video: resized from {clip.shape[3]}x{clip.shape[2]} to {width}x{height} "
              "(scaled to cover, centre-cropped)")
        clip = fit_video(clip, width, height)
    if args.denoise is None:
        return clip, {}
    with torch.no_grad():
        init = vae.encode(clip[None].to(device), tile=_tile_option(args.tile)).float().cpu()
    return clip, {"denoise": args.denoise, "init_latent": init}


def run_extension(args: argparse.Namespace, model, vae, context, negative_context, clip,
                  *, steps: int, cfg: float, shift: float, frames: int, device, cache,
                  end_image, prompts=(), main_rank: bool = True):
    """``--extend N``: the clip ``[3, T, H, W]`` with N segments appended; prints what each
    segment did and the seams. ``prompts``: the encoded ``--extend-prompt`` texts, in order
    (with the run's negative prompt)."""
    from tqdm import tqdm

    from wan_core import load_clip_vision
    from wan_core.extend import extend_video, seam_ratios

    clip_vision = load_clip_vision(args.clip_vision, device=device) if args.clip_vision \
        else None
    report: list = []
    seed = (args.seed + 1) % (SEED_MAX + 1)      # the first clip used args.seed
    with tqdm(total=args.extend * steps, desc="extending", unit="step",
              disable=not main_rank) as bar:
        out = extend_video(model, vae, context, negative_context, clip, segments=args.extend,
                           frames=args.extend_frames or frames, overlap=extend_overlap(args),
                           method="vace" if args.task == "vace" else "i2v",
                           end_image=end_image, clip_vision=clip_vision, steps=steps,
                           guide_scale=cfg, shift=shift, solver=args.solver, seed=seed,
                           colour_match=not args.no_colour_match, device=device, cache=cache,
                           tile=_tile_option(args.tile), report=report,
                           segment_prompts=[([p], negative_context) for p in prompts],
                           callback=lambda step, total, x, x0: bar.update(1))
    ratios, _ = seam_ratios(out, [r.start for r in report])
    for r, ratio in zip(report, ratios):
        print(f"extend: segment {r.index} of {args.extend} (seed {r.seed}) added {r.added} "
              f"frames; colour drift {r.drift.size:.3f} -> {r.drift_after.size:.3f}; seam "
              f"change {ratio:.2f}x the median inside segments")
    return out


def release_idle_expert(active, idle) -> None:
    """Multi-GPU expert switch: drop the idle expert (its shards); the active one is loaded
    and prepared (sharded, moved) by its handle when first called."""
    if idle is not None:
        idle.release()


def write_outputs(args, video, latent_raw, fps: float, calibration=None) -> None:
    """Write the video, the latents (``--save-latents``) and a cache calibration
    (``--calibrate-cache``) all or none: each goes to a temporary file first and the video is
    encoded last, so a failed write (a full disk) leaves every output as it was. NaN output is
    an error, never a file."""
    from contextlib import ExitStack

    from wan_core.errors import require_finite
    from wan_core.video_io import video_to_frames, write_video

    require_finite(video, "the decoded video")
    with ExitStack() as pending:          # renamed into place only when everything is written
        if args.save_latents:
            from safetensors.torch import save

            data = save({"latent": latent_raw.contiguous()})
            _write_bytes(pending, args.save_latents, data, "--save-latents", args.overwrite)
        if calibration is not None:
            from wan_core.sampling.cache import merged_calibration_json

            text = merged_calibration_json(calibration, args.calibrate_cache)
            _write_bytes(pending, args.calibrate_cache, text.encode(), "--calibrate-cache", True)
        try:
            write_video(args.out, video_to_frames(video[0].cpu()), fps=fps,
                        overwrite=args.overwrite)
        except OSError as e:
            raise OSError(f"--out: could not write {args.out} ({e.strerror or e}); nothing was "
                          "written") from None


def _write_bytes(pending, path, data: bytes, option: str, overwrite: bool) -> None:
    """Write ``data`` to a temporary file beside ``path``, renamed when ``pending`` closes."""
    from wan_core.video_io import atomic_output

    try:
        tmp = pending.enter_context(atomic_output(path, overwrite=overwrite))
        tmp.write_bytes(data)
    except OSError as e:
        raise OSError(f"{option}: could not write {path} ({e.strerror or e}); nothing was "
                      "written") from None


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from wan_core import apply_loras, load_clip_vision, load_dit, load_text_encoder, load_vae
    from wan_core.loading.on_demand import OnDemandDiT
    from wan_core.ops.streaming import BlockStreaming, place
    from wan_core.conditioning import (VideoConditioning, build_i2v_conditioning,
                                       build_ti2v_conditioning, build_vace_conditioning,
                                       check_video_size)
    from wan_core.models.configs import DEFAULTS
    from wan_core.pipeline import MoEModel, default_boundary, generate, vae_stride_for
    from wan_core.sampling import (DISTILLED_CFG, DISTILLED_SHIFT, DISTILLED_STEPS,
                                   CacheCalibration, OffloadIdleExpert, save_calibration)
    from wan_core.sampling.cache import CacheSettings, calibration_key, missing_calibration
    from wan_core.checks import UsageError, check_vae_matches

    checked = check_generate_args(args)
    device, cache = checked["device"], checked["cache"]
    recorder = CacheCalibration() if args.calibrate_cache else None
    started = time.perf_counter()
    ctx = None
    if uses_parallel(args):
        from wan_core import parallel

        ctx = parallel.init(args.ulysses_size, args.cfg_parallel, args.dit_fsdp, args.t5_fsdp,
                            device=args.device, timeout_s=args.dist_timeout)
        args.parallel_context = ctx
        device = ctx.device
    main_rank = ctx is None or ctx.is_main
    say = print if main_rank else (lambda *a, **k: None)     # only rank 0 prints and writes
    load_device = "cpu" if ctx is not None else device       # sharded / moved by ctx
    compute_mode = "fp8" if args.fp8_matmul else None

    streaming = None
    if args.blocks_on_device is not None or args.vram_budget is not None:
        streaming = BlockStreaming(resident=args.blocks_on_device, budget_gb=args.vram_budget)
    moe = args.dit_low_noise is not None
    if moe:
        # Experts on demand: each is read from its file when the sampler switches to it and
        # the idle one is dropped, so at most one expert is in memory at a time.
        dit = OnDemandDiT(args.dit, dtype=args.dtype, device=load_device,
                          vace_module=args.vace_module, compute=compute_mode,
                          compile=args.compile, attention=args.attention)
        dit.block_streaming = streaming
    else:
        dit = load_dit(args.dit, dtype=args.dtype,
                       device="cpu" if streaming else load_device, vace_module=args.vace_module,
                       compute=compute_mode, compile=args.compile, attention=args.attention)
    config = dit.config
    variant = config.variant
    if moe and variant == "wan2.1-t2v-14B":
        variant = "wan2.2-t2v-A14B"  # the experts have exactly the 2.1 T2V-14B shapes
    defaults = DEFAULTS.get(variant, DEFAULTS["custom"])
    width, height = args.size or defaults.size
    frames = args.frames or default_frames(checked["controls"]) or defaults.frames
    distilled = args.solver == "distilled"
    steps = args.steps or (DISTILLED_STEPS if distilled else defaults.steps)
    shift = args.shift if args.shift is not None else (
        DISTILLED_SHIFT if distilled else defaults.shift)
    cfg = args.cfg if args.cfg is not None else (DISTILLED_CFG if distilled else defaults.guide)
    fps = args.fps or defaults.fps
    check_video_size(width, height, frames, vae_stride_for(config.out_dim))
    check_image_inputs(config, args)     # again: GGUF / folders are only known once loaded
    if args.task == "vace" and not config.is_vace:
        raise UsageError(f"--task vace needs a Wan VACE model; {args.dit} is {config.variant} "
                         f"({config.model_type}); give a VACE model or --vace-module")
    say(f"model: {variant} ({config.model_type}), {width}x{height}, {frames} frames, "
        f"{steps} steps, shift {shift}, cfg {cfg}, solver {args.solver}, seed {args.seed}"
        + ("" if ctx is None else f"; {ctx.world_size} processes: ulysses {ctx.ulysses_size} x "
           f"cfg {ctx.cfg_size}{', DiT FSDP' if ctx.dit_fsdp else ''}"
           f"{', T5 FSDP' if ctx.t5_fsdp else ''}"))

    if not moe and isinstance(cache, CacheSettings):
        # A custom model's calibration key needs its weights: checked now, before the rest.
        problem = missing_calibration(cache, [calibration_key([dit])])
        if problem:
            raise UsageError(problem)
    if args.lora:
        dit = apply_loras(dit, args.lora)
    if not moe:
        dit.block_streaming = streaming
        if ctx is not None:
            dit = ctx.prepare_dit(dit)       # sharded (FSDP) and/or split over the sequence
        else:
            place(dit, device)    # streams the blocks, or brings the LoRA patches along
    model = dit
    if moe:
        low = OnDemandDiT(args.dit_low_noise, dtype=args.dtype, device=load_device,
                          vace_module=args.vace_module_low_noise, compute=compute_mode,
                          compile=args.compile, attention=args.attention)
        low.block_streaming = streaming
        if args.lora_low_noise:
            low = apply_loras(low, args.lora_low_noise)
        offload = OffloadIdleExpert(device)
        if ctx is not None:         # each rank loads its experts, prepared by ctx
            dit.prepare = low.prepare = ctx.prepare_dit
            offload = release_idle_expert
        cfg_low = args.cfg_low_noise if args.cfg_low_noise is not None else (
            cfg if distilled or defaults.guide_low is None else defaults.guide_low)
        boundary = args.boundary or defaults.boundary or default_boundary(config.model_type)
        model = MoEModel(dit, low, boundary, (cfg, cfg_low), offload=offload)

    if moe and args.prefetch_expert:
        model.high_noise.prefetch()       # read the first expert while the prompt is encoded
    vae = load_vae(args.vae, device=device)
    check_vae_matches(config.out_dim, vae.config.z_dim, args.dit, args.vae)
    te = load_text_encoder(args.text_encoder,
                           device="cpu" if args.text_encoder_cpu or ctx else device)
    if ctx is not None and not args.text_encoder_cpu:
        te = ctx.prepare_text_encoder(te)
    negative = args.negative_prompt
    if negative is None:
        from wan_core.prompts import OFFICIAL_NEGATIVE_PROMPT
        negative = OFFICIAL_NEGATIVE_PROMPT
    context, negative_context = te.encode([args.prompt, negative], device=device)
    extend_prompts = [te.encode([text], device=device)[0] for text in args.extend_prompt]
    del te

    if args.task == "vace":
        controls = checked["controls"]
        mask = controls["mask"]
        if mask is not None and mask.shape[2] == 1:          # one mask image: every frame
            mask = mask.expand(-1, -1, frames, -1, -1)
        cond = build_vace_conditioning(vae, width, height, frames, video=controls["video"],
                                       mask=mask, reference_images=controls["references"],
                                       strength=args.vace_scale)
        if cond.trim:
            say(f"vace: {cond.trim} reference image(s) sampled in front of the video and "
                "dropped from it")
    elif args.task == "t2v" or (args.task == "ti2v" and not args.image):
        cond = VideoConditioning(width, height, frames)
    elif args.task == "ti2v":
        cond = build_ti2v_conditioning(vae, checked["image"].to(device), width, height,
                                       frames)
    else:
        clip = load_clip_vision(args.clip_vision, device=device) if args.clip_vision else None
        end = checked["end_image"] if args.task == "flf2v" else None
        cond = build_i2v_conditioning(vae, checked["image"].to(device), width, height,
                                      frames, end=end, clip_vision=clip)
        del clip

    stats: dict = {}
    given, v2v = prepare_video_run(args, checked["video_run"], vae, width, height, device)
    latent = None
    if given is None or v2v:      # a clip given only to be extended is not sampled again
        with tqdm(total=steps, desc="sampling", unit="step", disable=not main_rank) as bar:
            latent = generate(model, [context], [negative_context] if cfg != 1 or moe else None,
                              cond, steps=steps, guide_scale=cfg, shift=shift,
                              solver=args.solver, seed=args.seed,
                              callback=lambda step, total, x, x0: bar.update(1),
                              device=device, cache=recorder or cache, stats=stats, parallel=ctx,
                              context_windows=checked["windows"], **v2v)
        if cache is not None:
            say(f"step cache: skipped {stats['skipped']} of {stats['steps']} model evaluations")
    extender = model if args.extend else None      # kept for the segments
    del model, dit
    if not main_rank:
        return 0                  # rank 0 decodes and writes; the others are done
    if latent is None:
        video = given[None]
    else:
        with torch.no_grad():
            video = vae.decode(latent.to(device), tile=_tile_option(args.tile))
    if args.extend:
        video = run_extension(args, extender, vae, [context],
                              [negative_context] if cfg != 1 or moe else None, video[0].cpu(),
                              steps=steps, cfg=cfg, shift=shift, frames=frames, device=device,
                              cache=cache, end_image=checked["end_image"],
                              prompts=extend_prompts)[None]
        del extender
    write_outputs(args, video, None if latent is None else vae.denormalize(latent), fps,
                  calibration=recorder.result() if recorder is not None else None)
    if recorder is not None:
        print(f"cache calibration saved to {args.calibrate_cache}; use it with --cache magcache "
              f"(or teacache) --cache-calibration {args.calibrate_cache}")
    print(f"wrote {args.out} ({video.shape[2]} frames, {width}x{height}, {fps:g} fps) in "
          f"{time.perf_counter() - started:.1f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from wan_core import demo

    return demo.run(args)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


class _OneLineLog(logging.Handler):
    """The library's log warnings as ``warning: ...`` lines, like ``warnings`` and errors."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 done, 1 failed, 2 usage error, 130
    cancelled). User errors print one ``error: ...`` line and write nothing."""
    logger = logging.getLogger("wan_core")
    handler, propagate = _OneLineLog(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings():       # warnings as one line each, like errors
            warnings.showwarning = _show_warning
            return _main(argv)
    except KeyboardInterrupt:                 # e.g. while torch is still being imported
        print("cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _main(argv) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:             # --help (0) or a bad option (2, already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    handler = {"generate": cmd_generate, "demo": cmd_demo}[args.command]
    return _run(handler, args)


def _run(handler, args) -> int:
    try:
        return _run_checked(handler, args)
    except Exception as e:
        if getattr(args, "parallel_context", None) is None or not _is_distributed_failure(e):
            raise
        print(f"error: another process of this multi-GPU run stopped or did not answer within "
              f"--dist-timeout ({str(e).splitlines()[0][:200]}); nothing was written",
              file=sys.stderr)
        return EXIT_FAILED
    finally:
        if getattr(args, "parallel_context", None) is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _is_distributed_failure(error: BaseException) -> bool:
    import torch.distributed as dist

    text = str(error).lower()
    return isinstance(error, getattr(dist, "DistError", ())) or any(
        word in text for word in ("gloo", "nccl", "connection closed", "connection reset",
                                  "timed out", "broken pipe"))


def _run_checked(handler, args) -> int:
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except MemoryError:
        print("error: out of memory; use a smaller --size or fewer --frames", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, OSError) as e:   # CheckpointError, UsageError, VideoSizeError, files
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        print(f"error: out of memory ({str(e).splitlines()[0][:200]}); use a smaller --size, "
              "fewer --frames, --tile 256 or --text-encoder-cpu", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
