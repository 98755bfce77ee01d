"""Memory of the low-memory paths on a full-size Wan 2.1 T2V 1.3B (random weights).

    python -m benchmarks.memory gguf          # GGUF Q4_K / Q8_0 forward vs the bf16 file
    python -m benchmarks.memory gguf --tokens 256 1560 --threads 2

``gguf``: peak RSS of loading a file and running one forward, and the forward time, for the
bf16 safetensors and for GGUF files whose block Linears are Q8_0 / Q4_K (random blocks; the
rest F32 / F16 as in published files). Goals (issue 19): peak RSS <= 1.25 x the file + 1 GiB;
Q8_0 forward <= 1.5 x the bf16 forward on the same shapes.

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory")
    parser.add_argument("case", choices=("gguf",))
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1560])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wancore-memory-bench-") as tmp:
        if args.case == "gguf":
            bench_gguf(Path(tmp), args.tokens, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
