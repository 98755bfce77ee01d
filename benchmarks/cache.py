"""Step caching on the embedded demo: speed and fidelity of each method against no cache.

    python -m benchmarks.cache                    # every method, a threshold sweep, 8 prompts
    python -m benchmarks.cache --quick            # 2 prompts, defaults only
    python -m benchmarks.cache --calibrate        # rewrite the demo's MagCache / TeaCache data
    python -m benchmarks.cache --heldout 32 --methods easycache --factors 1 --steps 50 --weighted
                                                  # 32 held-out prompts (seed i), + noise weighting

For T2V and MoE at 20 and 50 steps, every prompt is generated once without a cache (the
"twin") and once per (method, threshold). Per row: model evaluations run, the speedup of
sampling alone and end to end (the sum over the prompts of: model load + text encoding +
sampling + VAE decode + mp4 write; the load is measured once and added to every video, as a
fresh `python -m wan_core demo` pays it), and the PSNR / SSIM of each decoded video against its
uncached twin (pixels in [0, 1], PSNR over the whole video, SSIM: 11x11 Gaussian window, mean
over frames and channels). Times are process CPU time with one thread (robust to other load on a shared
machine), taken in the same run.
A speed / quality plot is written to ``cache_benchmark.png`` (matplotlib if installed, else
PIL).
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PROMPTS = [
    "a green square moving up on a black background",
    "a red circle moving left on a white background",
    "a blue triangle moving right on a gray background",
    "a yellow circle moving down on a blue background",
    "a white square moving left on a black background",
    "a purple triangle moving up on a white background",
    "a red square moving right on a blue background",
    "a green circle moving down on a gray background",
]
SWEEP = (0.5, 1.0, 2.0)  # multiples of each method's default threshold
# Process CPU time (one thread): on a shared machine wall time swings with other load, CPU
# time of a single-threaded process does not (and the demo does all its work in-process).
CLOCK = time.process_time


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos [3, T, H, W] in [-1, 1], on pixels in [0, 1]."""
    a, b = (a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else -10 * math.log10(mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of two videos [3, T, H, W] in [-1, 1] (per frame and channel, 11x11 Gaussian
    window with sigma 1.5, pixels in [0, 1])."""
    a = ((a.clamp(-1, 1) + 1) / 2).permute(1, 0, 2, 3).reshape(-1, 1, *a.shape[2:]).double()
    b = ((b.clamp(-1, 1) + 1) / 2).permute(1, 0, 2, 3).reshape(-1, 1, *b.shape[2:]).double()
    x = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-x ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None]

    def blur(t):
        return F.conv2d(t, window)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) *
                                                         (var_a + var_b + c2))
    return float(value.mean())


def load_seconds() -> float:
    """Wall time to load the demo's VAE, text encoder and DiTs from disk (the fixed start-up
    cost of one `python -m wan_core demo` run)."""
    from wan_core.demo import DemoModels

    started = CLOCK()
    fresh = DemoModels()
    for name in ("vae", "text_encoder", "t2v"):
        fresh.get(name)
    return CLOCK() - started


class Timer:
    """Times wan_core.pipeline.generate (sampling alone) inside generate_video."""

    def __init__(self):
        import wan_core.pipeline as pipeline

        self.pipeline, self.original, self.seconds = pipeline, pipeline.generate, 0.0

        def timed(*args, **kwargs):
            started = CLOCK()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds = CLOCK() - started

        pipeline.generate = timed


def one_video(models, timer, prompt, task, steps, cache, out_dir, seed=0):
    from wan_core.demo import FPS, generate_video
    from wan_core.video_io import video_to_frames, write_video

    stats: dict = {}
    started = CLOCK()
    video = generate_video(models, prompt, task, steps=steps, cache=cache, stats=stats,
                           seed=seed)
    write_video(str(out_dir / "video.mp4"), video_to_frames(video), fps=FPS)
    return video, CLOCK() - started, timer.seconds, stats


def calibrate(models) -> dict:
    """MagCache curves and TeaCache fits of the demo T2V, I2V and MoE pair (50 steps, first
    prompt, seed 0), plus the published TeaCache coefficients of the Wan 2.1 models."""
    from wan_core.conditioning import VideoConditioning, build_i2v_conditioning
    from wan_core.demo import CFG, FRAMES, NEGATIVE, SHIFT, SIZE, clips
    from wan_core.pipeline import calibrate_cache

    te, vae = models.get("text_encoder"), models.get("vae")
    context, negative = te.encode([PROMPTS[0], NEGATIVE])
    data = {}
    for task in ("t2v", "moe", "i2v"):
        if task == "i2v":
            frame = clips.render(clips.place(clips.parse_caption(PROMPTS[0]), 0), 1, SIZE)[0]
            first = torch.from_numpy(frame).permute(2, 0, 1) * 2 - 1
            cond = build_i2v_conditioning(vae, first, SIZE, SIZE, FRAMES)
        else:
            cond = VideoConditioning(SIZE, SIZE, FRAMES)
        data.update(calibrate_cache(models.dit(task), [context], [negative], cond, steps=50,
                                    guide_scale=CFG, shift=SHIFT, seed=0))
    # TeaCache4Wan2.1, polynomial on the relative L1 change of e0 (highest power first).
    published = {
        "wan2.1-t2v-1.3B": [-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01,
                            -4.99875664e-02],
        "wan2.1-t2v-14B": [-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01,
                           -3.15583525e-01],
        "wan2.1-i2v-14B": [2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01,
                           1.32517977e-01],   # the 480P fit
    }
    for key, coefficients in published.items():
        data[key] = {"teacache": {"coefficients": coefficients,
                                  "source": "TeaCache4Wan2.1 (ret_steps, e0)"}}
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 prompts, default settings only")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    parser.add_argument("--steps", default="20,50")
    parser.add_argument("--factors", default=",".join(str(f) for f in SWEEP),
                        help="threshold sweep, multiples of each method's default")
    parser.add_argument("--tasks", default="t2v,moe")
    parser.add_argument("--heldout", type=int, default=0, metavar="N",
                        help="instead of the 8 fixed prompts: the first N held-out demo captions "
                             "(training/, from a clone), prompt i with seed i")
    parser.add_argument("--weighted", action="store_true",
                        help="also run easycache weighted by the noise level (row 'weighted': "
                             "sigma_weight 0.5, threshold 0.5, start 0.1, at most 4 skips in a "
                             "row) and the same with limits inside the high-noise expert of a "
                             "pair (row 'w+high': threshold 0.25, at most 1 skip in a row; a "
                             "single model runs it like 'weighted')")
    parser.add_argument("--plot", default="cache_benchmark.png")
    parser.add_argument("--calibrate", action="store_true",
                        help="record the demo calibration into wan_core/sampling/"
                             "cache_calibration.json and exit")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from dataclasses import replace

    from wan_core.demo import DemoModels
    from wan_core.sampling import CACHE_METHODS, CacheSettings
    from wan_core.sampling.cache import CALIBRATION_FILE, DEFAULTS

    models = DemoModels()
    if args.calibrate:
        import json

        data = calibrate(models)
        CALIBRATION_FILE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"wrote {CALIBRATION_FILE} ({', '.join(sorted(data))})")
        return
    prompts = PROMPTS[:2 if args.quick else args.prompts]
    seeds = [0] * len(prompts)
    if args.heldout:
        from training.evaluate import heldout_specs

        prompts = [spec.caption for spec in heldout_specs(args.heldout)]
        seeds = list(range(len(prompts)))
    methods = args.methods.split(",") if args.methods else list(CACHE_METHODS)
    sweep = (1.0,) if args.quick else tuple(float(f) for f in args.factors.split(","))
    settings = [(m, replace(DEFAULTS[m], threshold=DEFAULTS[m].threshold * f))
                for m in methods for f in sweep]
    if args.weighted:
        weighted = CacheSettings("easycache", threshold=0.5, start=0.1, max_skips=4,
                                 sigma_weight=0.5)
        settings += [("weighted", weighted),
                     ("w+high", replace(weighted, high_noise_threshold=0.25,
                                        high_noise_max_skips=1))]
    load = load_seconds()
    for name in ("vae", "text_encoder", "t2v", "high_noise", "low_noise"):
        models.get(name)
    timer = Timer()
    rows = []
    out_dir = Path(tempfile.mkdtemp(prefix="wancore_cache_bench_"))
    one_video(models, timer, prompts[0], "t2v", 2, None, out_dir)  # warm-up
    for task in args.tasks.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            twins, base_total, base_sampling = [], 0.0, 0.0
            for prompt, seed in zip(prompts, seeds):
                video, total, sampling, _ = one_video(models, timer, prompt, task, steps, None,
                                                      out_dir, seed)
                twins.append(video)
                base_total += total + load
                base_sampling += sampling
            for label, s in settings:
                total_s = sampling_s = 0.0
                psnrs, ssims, evaluated = [], [], 0
                for prompt, seed, twin in zip(prompts, seeds, twins):
                    video, total, sampling, stats = one_video(models, timer, prompt, task,
                                                              steps, s, out_dir, seed)
                    total_s += total + load
                    sampling_s += sampling
                    psnrs.append(psnr(video, twin))
                    ssims.append(ssim(video, twin))
                    evaluated += stats["evaluated"]
                default = s == DEFAULTS[s.method]
                rows.append(dict(task=task, steps=steps, method=s.method, label=label,
                                 threshold=s.threshold,
                                 default=default, evals=evaluated / len(prompts),
                                 sampling_x=base_sampling / sampling_s,
                                 e2e_x=base_total / total_s, min_psnr=min(psnrs),
                                 mean_psnr=sum(psnrs) / len(psnrs), min_ssim=min(ssims),
                                 below_30=sum(p < 30 for p in psnrs),
                                 mean_ssim=sum(ssims) / len(ssims)))
                print_row(rows[-1], flush=True)
            print(f"  ({task}, {steps} steps: uncached sampling {base_sampling / len(prompts):.3f} "
                  f"s/video, end to end {base_total / len(prompts):.3f} s/video incl. "
                  f"{load:.3f} s load)", flush=True)
    print()
    print(f"Step caching on the demo ({len(prompts)} prompts, "
          f"{'seed i for prompt i' if args.heldout else 'seed 0'}, 64x64x17, cfg 4, "
          f"unipc; * = the method's default threshold)")
    print(HEADER)
    for row in rows:
        print_row(row)
    plot(rows, Path(args.plot))
    print(f"plot: {args.plot}")


HEADER = (f"{'task':<5}{'steps':>6}  {'setting':<10}{'thresh':>8}  {'evals':>6}  {'fewer':>6}  "
          f"{'sampling':>9}  {'end2end':>8}  {'minPSNR':>8}  {'meanPSNR':>9}  {'<30dB':>6}  "
          f"{'minSSIM':>8}")


def print_row(r: dict, flush: bool = False) -> None:
    mark = "*" if r["default"] else " "
    print(f"{r['task']:<5}{r['steps']:>6}  {r['label']:<10}{r['threshold']:>7.3f}{mark}  "
          f"{r['evals']:>6.1f}  {r['steps'] / r['evals']:>5.2f}x  {r['sampling_x']:>8.2f}x  "
          f"{r['e2e_x']:>7.2f}x  {r['min_psnr']:>8.1f}  {r['mean_psnr']:>9.1f}  "
          f"{r['below_30']:>6d}  {r['min_ssim']:>8.3f}", flush=flush)


def plot(rows: list, path: Path) -> None:
    """Speedup (sampling, x) against the worst video's PSNR, one marker per method."""
    points = [(r["sampling_x"], min(r["min_psnr"], 60.0), r) for r in rows]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(points, path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["method"], r["task"], r["steps"]) for r in rows}):
        sel = [(x, y) for x, y, r in points if (r["method"], r["task"], r["steps"]) == key]
        ax.plot(*zip(*sel), marker="o", label=f"{key[0]} {key[1]} {key[2]} steps")
    ax.axhline(30, color="gray", ls="--")
    ax.set_xlabel("sampling speedup (x)")
    ax.set_ylabel("worst video PSNR vs uncached (dB)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _plot_pil(points, path: Path) -> None:
    from PIL import Image, ImageDraw

    w, h, m = 720, 480, 50
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    xs = [p[0] for p in points] + [1.0]
    x_lo, x_hi = min(xs), max(xs) * 1.05
    y_lo, y_hi = 15.0, 60.0

    def at(x, y):
        return (m + (x - x_lo) / (x_hi - x_lo) * (w - 2 * m),
                h - m - (min(max(y, y_lo), y_hi) - y_lo) / (y_hi - y_lo) * (h - 2 * m))

    draw.rectangle([m, m, w - m, h - m], outline="black")
    y30 = at(x_lo, 30)[1]
    draw.line([m, y30, w - m, y30], fill="gray")
    draw.text((m + 4, y30 - 12), "30 dB", fill="gray")
    colours = {"easycache": "red", "magcache": "blue", "teacache": "green"}
    for x, y, r in points:
        cx, cy = at(x, y)
        shape = draw.ellipse if r["steps"] == 50 else draw.rectangle
        shape([cx - 4, cy - 4, cx + 4, cy + 4], fill=colours.get(r["method"], "black"),
              outline="black" if r["task"] == "moe" else None)
    draw.text((m, h - m + 8), f"sampling speedup {x_lo:.2f}x .. {x_hi:.2f}x", fill="black")
    draw.text((4, 4), "worst-video PSNR (15..60 dB) vs speedup; circle 50 steps, square 20; "
                      "red easycache, blue magcache, green teacache; outline = MoE", fill="black")
    img.save(path)


if __name__ == "__main__":
    main()
