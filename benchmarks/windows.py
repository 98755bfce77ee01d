"""Context windows: memory and time of a long generation against one window (issue 28).

    python -m benchmarks.windows                     # 241 frames in 81-frame windows, CPU
    python -m benchmarks.windows --size 256x256 --model-dim 512 --steps 2 --device cuda

Three candidates, each in a fresh process (benchmarks.harness): one 81-frame window sampled
alone (the memory the goal is measured against), the 241-frame video in 81-frame windows
overlapping by 16, and the 241-frame video in one pass (what windows avoid). The DiT is random
(dim ``--model-dim``, 2 blocks, head dim 128): only memory and time are measured, and the
activations of one forward dominate at these sizes. Goal: the windowed 241-frame peak <= 1.2x
the one-window peak ("call peak": the peak above the level before sampling, i.e. the
activations).
"""
from __future__ import annotations

import argparse

from benchmarks.harness import bench, print_table


def setup(frames: int, windows, size: tuple, dim: int, steps: int, device: str):
    import torch

    from wan_core.conditioning import VideoConditioning
    from wan_core.models.configs import DiTConfig
    from wan_core.models.dit import WanDiT
    from wan_core.pipeline import generate
    from wan_core.sampling import ContextWindows

    cfg = DiTConfig(dim=dim, ffn_dim=4 * dim, num_heads=dim // 128, num_layers=2, text_dim=64,
                    freq_dim=256)
    torch.manual_seed(0)
    model = WanDiT(cfg).to(device).eval().requires_grad_(False)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    text = [torch.randn(8, 64)]
    cond = VideoConditioning(size[0], size[1], frames)
    settings = ContextWindows(*windows) if windows else None

    def call():
        generate(model, text, None, cond, steps=steps, guide_scale=1.0, shift=5.0, seed=0,
                 device=torch.device(device), context_windows=settings)

    return call


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--frames", type=int, default=241)
    parser.add_argument("--window", type=int, default=81)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--model-dim", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    common = dict(runs=1, warmup=0, device=args.device, threads=args.threads)
    shape = (size, args.model_dim, args.steps, args.device)
    results = [
        bench(f"one {args.window}-frame window", setup, args.window, None, *shape, **common),
        bench(f"{args.frames} frames, windows {args.window}/{args.overlap}", setup,
              args.frames, (args.window, args.overlap), *shape, **common),
        bench(f"{args.frames} frames, one pass", setup, args.frames, None, *shape, **common),
    ]
    print_table(f"context windows, {args.size}, dim {args.model_dim}, {args.steps} steps",
                results, ours=results[0].name, references=False)
    one, windowed = results[0], results[1]
    if not one.error and not windowed.error:
        print(f"windowed {args.frames}-frame call peak / one window: "
              f"{windowed.call_peak_mb / max(one.call_peak_mb, 1e-9):.2f}x (goal <= 1.2x)")


if __name__ == "__main__":
    main()
