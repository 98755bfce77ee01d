"""Memory of the low-memory paths on full-size Wan shapes (random weights).

    python -m benchmarks.memory gguf          # GGUF Q4_K / Q8_0 forward vs the bf16 file
    python -m benchmarks.memory gguf --tokens 256 1560 --threads 2
    python -m benchmarks.memory experts --blocks 8   # Wan 2.2 A14B-shaped fp8 pair, CLI
    python -m benchmarks.memory streaming     # 1.3B with 0 / half / all blocks resident
    python -m benchmarks.memory streaming --model 14B --video 832x480x81 --budget 8 10
        # on a GPU: Wan 2.1 14B 480P 81 frames, resident vs VRAM budgets (issue 19's goal)

``gguf``: peak RSS of loading a file and running one forward, and the forward time, for the
bf16 safetensors and for GGUF files whose block Linears are Q8_0 / Q4_K (random blocks; the
rest F32 / F16 as in published files). Goals (issue 19): peak RSS <= 1.25 x the file + 1 GiB;
Q8_0 forward <= 1.5 x the bf16 forward on the same shapes.

``experts``: two Wan 2.2 A14B-shaped experts (dim 5120, ffn 13824, 40 heads; ``--blocks`` of
the 40 blocks each, to fit the machine) stored ComfyUI fp8_scaled, with a tiny umT5 (4096 wide)
and a tiny VAE: peak RSS of ``python -m wan_core generate --dit HIGH --dit-low-noise LOW``
(experts on demand) against the same generation with both experts loaded (what the CLI did
before). Goal: peak RSS <= 1.25 x one expert file + 1 GiB.

``streaming``: the 1.3B bf16 model with 0, half and all of its 30 blocks resident on the compute
device (CUDA when present, else the CPU, where only the mechanism's cost shows): forward time,
the weight bytes on the device, peak RSS, and peak CUDA memory on a GPU. ``--model 14B --video
832x480x81 --budget ...`` is the GPU check of issue 19 (within 12 GB of VRAM at <= 1.3x the
time of resident weights).

Every case runs in a fresh process (peak RSS = VmHWM, weights and the mapped file included).
Files are written to a temporary folder (about 5 GB) and removed afterwards.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import full_size
from benchmarks.harness import _hwm_mb


def _forward_case(queue, path, token_counts, threads):
    torch.set_num_threads(threads)
    from wan_core import load_dit

    t0 = time.perf_counter()
    dit = load_dit(path)
    out = {"load_s": time.perf_counter() - t0, "times": {}}
    ctx = [torch.randn(60, 4096)]
    with torch.no_grad():
        for tokens in token_counts:
            x = torch.randn(1, 16, 1, 16, tokens // 4)            # tokens after the 1x2x2 patch
            dit(x, torch.tensor([500.0]), ctx)                      # warm-up
            t0 = time.perf_counter()
            dit(x, torch.tensor([500.0]), ctx)
            out["times"][tokens] = time.perf_counter() - t0
    out["peak_mb"] = _hwm_mb()
    queue.put(out)


def _run(path, token_counts, threads) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_forward_case, args=(queue, str(path), token_counts, threads))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def bench_gguf(folder: Path, token_counts, threads) -> None:
    shape_of = full_size.shapes()
    files = {"bf16 safetensors": full_size.write_bf16_and_fp8(folder, shape_of)["bf16"]}
    for name in ("Q8_0", "Q4_K"):
        files[f"GGUF {name}"] = full_size.write_gguf(folder / f"1.3B_{name}.gguf", shape_of, name)
    results = {name: _run(path, token_counts, threads) for name, path in files.items()}
    base = results["bf16 safetensors"]["times"]
    head = " | ".join(f"forward {n} tok" for n in token_counts)
    print(f"\n| file | size | peak RSS | goal (1.25 x file + 1 GiB) | load | {head} |")
    print("|---|---|---|---|---|" + "---|" * len(token_counts))
    for name, path in files.items():
        r = results[name]
        size = path.stat().st_size / 2**20
        goal = 1.25 * size + 1024
        times = " | ".join(f"{r['times'][n]:.2f} s ({r['times'][n] / base[n]:.2f}x bf16)"
                           for n in token_counts)
        print(f"| {name} | {size:,.0f} MB | {r['peak_mb']:,.0f} MB | {goal:,.0f} MB "
              f"({'met' if r['peak_mb'] <= goal else 'NOT met'}) | {r['load_s']:.1f} s | {times} |")


def _experts_case(queue, files, mode, threads, steps):
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    common = ["--vae", files["vae"], "--text-encoder", files["te"], "--prompt", "a red ball",
              "--size", "64x64", "--frames", "5", "--steps", str(steps), "--device", "cpu",
              "--out", files["out_" + mode]]
    if mode == "on demand (CLI)":
        from wan_core.__main__ import main

        rc = main(["generate", "--dit", files["high"], "--dit-low-noise", files["low"], *common])
        assert rc == 0
    else:   # both experts loaded, as the CLI did before experts on demand
        from wan_core import load_dit, load_text_encoder, load_vae
        from wan_core.conditioning import VideoConditioning
        from wan_core.pipeline import MoEModel, generate
        from wan_core.sampling import OffloadIdleExpert
        from wan_core.video_io import video_to_frames, write_video

        pair = MoEModel(load_dit(files["high"]), load_dit(files["low"]), 0.875, (4.0, 3.0),
                        offload=OffloadIdleExpert("cpu"))
        vae, te = load_vae(files["vae"]), load_text_encoder(files["te"])
        ctx, neg = te.encode(["a red ball", "blurry"])
        latent = generate(pair, [ctx], [neg], VideoConditioning(64, 64, 5), steps=steps)
        with torch.no_grad():
            video = vae.decode(latent)
        write_video(files["out_" + mode], video_to_frames(video[0]), fps=16)
    queue.put({"peak_mb": _hwm_mb(), "wall_s": time.perf_counter() - t0})


def _spawn(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(queue, *args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def bench_experts(folder: Path, blocks: int, threads: int, steps: int) -> None:
    from safetensors.torch import save_file

    from tests.tiny_models import umt5_state_dict, vae_state_dict

    shape_of = full_size.shapes(**{**full_size.T2V_14B, "num_layers": blocks})
    files = {"high": full_size.write_fp8_scaled(folder / "high_noise_fp8_scaled.safetensors",
                                                shape_of, seed=1),
             "low": full_size.write_fp8_scaled(folder / "low_noise_fp8_scaled.safetensors",
                                               shape_of, seed=2),
             "vae": folder / "vae.safetensors", "te": folder / "umt5.safetensors"}
    save_file(vae_state_dict("2.1", 0), str(files["vae"]))
    save_file(umt5_state_dict(0, d_model=4096), str(files["te"]))
    files = {k: str(v) for k, v in files.items()}
    modes = ("both loaded (before)", "on demand (CLI)")
    for mode in modes:
        files["out_" + mode] = str(folder / f"{mode.split()[0]}.mp4")
    results = {mode: _spawn(_experts_case, files, mode, threads, steps) for mode in modes}
    size = Path(files["high"]).stat().st_size / 2**20
    goal = 1.25 * size + 1024
    print(f"\nWan 2.2 A14B-shaped fp8_scaled experts, {blocks} of 40 blocks each "
          f"({size:,.0f} MB per expert file), {steps} steps, 64x64x5, CFG on")
    print("| run | peak RSS | goal (1.25 x one expert + 1 GiB) | wall |")
    print("|---|---|---|---|")
    for mode in modes:
        r = results[mode]
        verdict = "met" if r["peak_mb"] <= goal else "NOT met"
        print(f"| {mode} | {r['peak_mb']:,.0f} MB | {goal:,.0f} MB ({verdict}) | "
              f"{r['wall_s']:.1f} s |")


def _streaming_case(queue, path, setting, latent, threads):
    torch.set_num_threads(threads)
    from wan_core import load_dit
    from wan_core.ops.streaming import BlockStreaming, device_bytes, place

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dit = load_dit(path, device="cpu")
    dit.block_streaming = (None if setting is None else
                           BlockStreaming(budget_gb=setting) if isinstance(setting, float) else
                           BlockStreaming(resident=setting))
    on_device = device_bytes(dit, dit.block_streaming)
    resident = (len(dit.blocks) if dit.block_streaming is None
                else dit.block_streaming.resident_blocks(dit))
    place(dit, device)
    ctx = [torch.randn(60, 4096, device=device)]
    x = torch.randn(1, *latent, device=device)
    t = torch.tensor([500.0], device=device)
    times = []
    with torch.no_grad():
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            dit(x, t, ctx)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    queue.put({"time": min(times[1:]), "device_mb": on_device / 2**20, "peak_mb": _hwm_mb(),
               "cuda_mb": cuda_peak, "device": str(device), "resident": resident,
               "blocks": len(dit.blocks)})


def _latent_shape(video: str | None, tokens: int) -> tuple:
    """``WxHxF`` (pixels, frames) -> the Wan 2.1 latent [16, F', H / 8, W / 8]; else a one-frame
    latent of ``tokens`` tokens after the 1x2x2 patch."""
    if video is None:
        return (16, 1, 16, tokens // 4)
    w, h, f = (int(v) for v in video.lower().split("x"))
    return (16, (f - 1) // 4 + 1, h // 8, w // 8)


def bench_streaming(folder: Path, model: str, latent, threads: int, budgets) -> None:
    if model == "14B":
        path = full_size.write_fp8_scaled(folder / "wan2.1_t2v_14B_fp8_scaled.safetensors",
                                          full_size.shapes(**full_size.T2V_14B))
        cases = {"all 40 resident (no streaming)": None}
    else:
        path = full_size.write_bf16_and_fp8(folder, full_size.shapes())["bf16"]
        cases = {"all 30 resident (no streaming)": None, "15 resident": 15, "0 resident": 0}
    cases.update({f"budget {gb:g} GiB": float(gb) for gb in budgets})
    results = {name: _spawn(_streaming_case, str(path), setting, latent, threads)
               for name, setting in cases.items()}
    base = next(iter(results.values()))["time"]
    device = next(iter(results.values()))["device"]
    tokens = latent[1] * latent[2] * latent[3] // 4
    print(f"\nBlock streaming, Wan 2.1 {model} ({path.name}), one forward of latent "
          f"{list(latent)} ({tokens} tokens) on {device}")
    print("| case | blocks resident | weights on the device | peak CUDA | peak RSS | forward | "
          "vs resident |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        cuda = f"{r['cuda_mb']:,.0f} MB" if r["cuda_mb"] is not None else "n/a (CPU)"
        print(f"| {name} | {r['resident']} of {r['blocks']} | {r['device_mb']:,.0f} MB | {cuda} | "
              f"{r['peak_mb']:,.0f} MB | {r['time']:.2f} s | {r['time'] / base:.2f}x |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory")
    parser.add_argument("case", choices=("gguf", "experts", "streaming"))
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1560])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=8,
                        help="experts: blocks per A14B-shaped expert (of 40)")
    parser.add_argument("--steps", type=int, default=4, help="experts: sampling steps")
    parser.add_argument("--model", choices=("1.3B", "14B"), default="1.3B",
                        help="streaming: the model shapes (14B: a 14 GB fp8_scaled file)")
    parser.add_argument("--video", metavar="WxHxF",
                        help="streaming: the forward's video size, e.g. 832x480x81 (default: "
                             "one frame of the last --tokens)")
    parser.add_argument("--budget", type=float, nargs="*", default=[],
                        help="streaming: VRAM budgets (GiB) to run besides the fixed cases")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wancore-memory-bench-") as tmp:
        if args.case == "gguf":
            bench_gguf(Path(tmp), args.tokens, args.threads)
        elif args.case == "experts":
            bench_experts(Path(tmp), args.blocks, args.threads, args.steps)
        else:
            bench_streaming(Path(tmp), args.model, _latent_shape(args.video, args.tokens[-1]),
                            args.threads, args.budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
