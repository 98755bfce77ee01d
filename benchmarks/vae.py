"""Wan-VAE benchmark: decode speed against the references, and decode memory.

    python -m benchmarks.vae            # full run (tens of minutes on 2 CPU cores)
    python -m benchmarks.vae --quick    # small sizes, one run each

(a) decode time of a 17-frame 256x256 clip (2.1 VAE, full-size architecture, random weights,
    fp32): wan_core vs the official wan22 code vs diffusers AutoencoderKLWan (and ComfyUI's
    comfy/ldm/wan/vae.py when COMFYUI_ROOT points at an importable checkout);
(b) peak memory of decoding 5 frames at 832x480: automatic tiling (budget --tile-budget-mb)
    vs untiled;
(c) peak memory of decoding 9 vs 33 frames at the same size (default 256x256; below ~200x200
    activations are small enough for glibc's heap, whose fragmentation adds noise).
Every candidate runs in its own process (benchmarks.harness); memory figures are the peak RSS
above the level before the call ("call peak"), which excludes the weights.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import bench, print_table  # noqa: E402

ARCH_21 = dict(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
               temperal_downsample=[False, True, True])
THREADS = 2


def make_weights(path: str) -> None:
    """Full-size Wan 2.1 VAE with seeded random weights, official layout, saved as .pth."""
    sys.path.insert(0, str(ROOT))
    from tests.reference import official

    torch.manual_seed(0)
    ref = official("modules.vae2_1").WanVAE_(**ARCH_21)
    with torch.no_grad():  # the official init zeroes the attention output; give it weights
        for name, p in ref.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.02)
    torch.save(ref.state_dict(), path)


def _latent(frames: int, h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 16, 1 + (frames - 1) // 4, h // 8, w // 8, generator=g)


# ------------------------------------------------------------------------------ candidates
# Each returns the zero-argument callable that harness.bench times; all decode the same latent.

def setup_ours(path, frames, h, w, tile=False, max_memory=None):
    from wan_core import load_vae

    vae = load_vae(path)
    z = _latent(frames, h, w)
    return lambda: vae.decode(z, tile=tile, max_memory=max_memory)


def setup_official(path, frames, h, w):
    sys.path.insert(0, str(ROOT))
    from tests.reference import official

    mod = official("modules.vae2_1")
    with torch.device("meta"):
        ref = mod.WanVAE_(**ARCH_21)
    ref.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
    ref.eval()
    from wan_core.models.vae import wan21
    scale = [torch.tensor(wan21.LATENT_MEAN), 1.0 / torch.tensor(wan21.LATENT_STD)]
    z = _latent(frames, h, w)
    return lambda: ref.decode(z, scale).clamp_(-1, 1)


def setup_diffusers(path, frames, h, w):
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    sd = convert_wan_vae_to_diffusers(torch.load(path, mmap=True, weights_only=True))
    with torch.device("meta"):
        model = AutoencoderKLWan()
    model.load_state_dict(sd, assign=True)
    model.eval()
    z = _latent(frames, h, w)  # time only: the latent space does not change the work
    return lambda: model.decode(z).sample


def setup_comfy(path, frames, h, w):
    root = os.environ["COMFYUI_ROOT"]
    sys.path.insert(0, root)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401
    from comfy.ldm.wan.vae import WanVAE

    with torch.device("meta"):
        model = WanVAE(**{k: v for k, v in ARCH_21.items()})
    model.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
    model.eval()
    z = _latent(frames, h, w)
    return lambda: model.decode(z).clamp_(-1, 1)


def comfy_available() -> str | None:
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        return "COMFYUI_ROOT not set"
    if not (Path(root) / "comfy" / "ldm" / "wan" / "vae.py").exists():
        return f"{root} has no comfy/ldm/wan/vae.py"
    return None


# ------------------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one run each")
    ap.add_argument("--only", default="abc", help="which parts to run (subset of 'abc')")
    ap.add_argument("--tile-budget-mb", type=int, default=None,
                    help="memory budget for the automatic tiling in (b) (default 1024, quick 384)")
    ap.add_argument("--memory-size", default="256x256", help="WxH for (c)")
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="torch threads per candidate (1 is steadier on a shared machine)")
    args = ap.parse_args()
    threads = args.threads

    tmp = Path(tempfile.mkdtemp(prefix="wancore_vae_bench_"))
    path = str(tmp / "Wan2.1_VAE_random.pth")
    make_weights(path)
    runs = dict(runs=1, warmup=0)   # one call is minutes long at full size: one-time costs are noise
    print("CPU timings on a shared 2-core machine are noisy: read ratios, not absolutes.")

    if "a" in args.only:
        frames, h, w = (5, 128, 128) if args.quick else (17, 256, 256)
        print(f"\n(a) decode {frames} frames {w}x{h}, Wan 2.1 VAE fp32, {threads} threads")
        results = [bench("wan_core", setup_ours, path, frames, h, w, threads=threads, **runs),
                   bench("official", setup_official, path, frames, h, w, threads=threads, **runs),
                   bench("diffusers", setup_diffusers, path, frames, h, w, threads=threads, **runs)]
        why = comfy_available()
        if why is None:
            results.append(bench("comfyui", setup_comfy, path, frames, h, w, threads=threads, **runs))
        else:
            print(f"  comfyui: skipped ({why})")
        print_table(f"(a) decode {frames}x{w}x{h} (goal: wan_core <= 0.8x the fastest reference)", results)

    if "b" in args.only:
        frames, (w, h) = (5, (416, 240)) if args.quick else (5, (832, 480))
        budget_mb = args.tile_budget_mb or (384 if args.quick else 1024)
        budget = budget_mb * 2**20
        print(f"\n(b) decode {frames} frames {w}x{h}: automatic tiling (budget {budget_mb} MB) vs untiled")
        tiled = bench("wan_core tiled", setup_ours, path, frames, h, w, None, budget,
                      threads=threads, runs=1, warmup=0)
        untiled = bench("wan_core untiled", setup_ours, path, frames, h, w, False, None,
                        threads=threads, runs=1, warmup=0)
        print_table(f"(b) decode {frames}x{w}x{h} memory", [tiled, untiled], ours="wan_core untiled",
                    references=False)
        print(f"tiled / untiled call peak: {tiled.call_peak_mb / max(untiled.call_peak_mb, 1e-9):.2f}x "
              f"(goal <= 0.35x)")

    if "c" in args.only:
        w, h = (int(v) for v in args.memory_size.split("x"))
        if args.quick:
            w, h = 128, 128
        print(f"\n(c) decode 9 vs 33 frames at {w}x{h}, untiled")
        short = bench("wan_core 9 frames", setup_ours, path, 9, h, w, threads=threads, runs=1, warmup=0)
        long = bench("wan_core 33 frames", setup_ours, path, 33, h, w, threads=threads, runs=1, warmup=0)
        print_table(f"(c) decode length vs memory at {w}x{h}", [short, long], ours="wan_core 9 frames",
                    references=False)
        out_mb = 3 * 24 * h * w * 4 / 2**20
        print(f"33 / 9 frames call peak: {long.call_peak_mb / max(short.call_peak_mb, 1e-9):.2f}x "
              f"(goal <= 1.10x; the 24 extra output frames alone are {out_mb:.0f} MB)")


if __name__ == "__main__":
    main()
