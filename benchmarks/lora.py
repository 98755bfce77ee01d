"""LoRA cost on a full-size Wan 2.1 T2V 1.3B (random weights): apply time and peak memory of a
rank-64 LoRA on every block Linear, against loading the same file without a LoRA, for a bf16
and an fp8_scaled base; plus one small forward with and without the LoRA.

    python -m benchmarks.lora                  # bf16 and fp8, rank 64
    python -m benchmarks.lora --only bf16 --rank 32 --tokens 240

Every case runs in a fresh process (peak RSS = the process's VmHWM, weights included). The
files are written once to a temporary folder (about 4.5 GB) and removed afterwards.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import full_size
from benchmarks.harness import _hwm_mb, _rss_mb

LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
           "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def write_files(folder: Path, rank: int) -> dict:
    from safetensors.torch import save_file

    shape_of = full_size.shapes()
    files = full_size.write_bf16_and_fp8(folder, shape_of)
    gen = torch.Generator().manual_seed(1)
    lora = {}
    for n in range(full_size.T2V_1_3B["num_layers"]):
        for name in LINEARS:
            out_features, in_features = shape_of[f"blocks.{n}.{name}.weight"]
            prefix = f"diffusion_model.blocks.{n}.{name}"
            lora[f"{prefix}.lora_down.weight"] = (torch.randn(rank, in_features, generator=gen)
                                                  * 0.01).to(torch.bfloat16)
            lora[f"{prefix}.lora_up.weight"] = (torch.randn(out_features, rank, generator=gen)
                                                * 0.01).to(torch.bfloat16)
    files["lora"] = folder / f"lora_rank{rank}.safetensors"
    save_file(lora, str(files["lora"]))
    return files


def _case(queue, model_path, lora_path, tokens, threads):
    torch.set_num_threads(threads)
    from wan_core import apply_loras, load_dit

    out = {"rss_start_mb": _rss_mb()}
    t0 = time.perf_counter()
    dit = load_dit(model_path)
    out["load_s"] = time.perf_counter() - t0
    out["after_load_mb"] = _rss_mb()
    out["load_peak_mb"] = _hwm_mb()
    model = dit
    if lora_path is not None:
        t0 = time.perf_counter()
        model = apply_loras(dit, [(lora_path, 1.0)])
        out["apply_s"] = time.perf_counter() - t0
        out["after_apply_mb"] = _rss_mb()
        out["apply_peak_mb"] = _hwm_mb()
    # one small forward (a latent of `tokens` tokens, a 12-token prompt)
    w = tokens // 4
    x = torch.randn(1, 16, 1, 8, 2 * w)
    ctx = [torch.randn(12, 4096)]
    with torch.no_grad():
        model(x, torch.tensor([500.0]), ctx)
        t0 = time.perf_counter()
        model(x, torch.tensor([500.0]), ctx)
        out["forward_s"] = time.perf_counter() - t0
    out["peak_mb"] = _hwm_mb()
    queue.put(out)


def run_case(model_path, lora_path, tokens, threads) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_case, args=(queue, str(model_path),
                                           None if lora_path is None else str(lora_path),
                                           tokens, threads))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lora")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--only", choices=("bf16", "fp8"), default=None)
    parser.add_argument("--tokens", type=int, default=64, help="tokens of the timed forward")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wancore-lora-bench-") as tmp:
        files = write_files(Path(tmp), args.rank)
        lora_mb = files["lora"].stat().st_size / 2**20
        print(f"rank-{args.rank} LoRA on all 300 block Linears: {lora_mb:.0f} MB (bf16)")
        rows = []
        for dtype in ("bf16", "fp8") if args.only is None else (args.only,):
            model_mb = files[dtype].stat().st_size / 2**20
            plain = run_case(files[dtype], None, args.tokens, args.threads)
            lora = run_case(files[dtype], files["lora"], args.tokens, args.threads)
            extra = lora["peak_mb"] - plain["peak_mb"]
            rows.append((dtype, model_mb, plain, lora, extra))
        print(f"\n| base | file MB | load s | peak RSS, no LoRA | apply s | peak RSS, LoRA | "
              f"extra peak (LoRA {lora_mb:.0f} MB) | forward {args.tokens} tok: no LoRA / LoRA |")
        print("|---|---|---|---|---|---|---|---|")
        for dtype, model_mb, plain, lora, extra in rows:
            print(f"| {dtype} | {model_mb:,.0f} | {plain['load_s']:.1f} | "
                  f"{plain['peak_mb']:,.0f} MB | {lora['apply_s']:.2f} | {lora['peak_mb']:,.0f} MB "
                  f"| {extra:+,.0f} MB ({extra / model_mb:.2f}x the model file) | "
                  f"{plain['forward_s']:.2f} s / {lora['forward_s']:.2f} s "
                  f"({lora['forward_s'] / plain['forward_s']:.2f}x) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
