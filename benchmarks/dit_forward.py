"""DiT forward: wan_core vs official wan22 vs diffusers (vs ComfyUI native with COMFYUI_ROOT).

    python -m benchmarks.dit_forward            # 1.3B block shapes, 2 layers, 1560 video tokens
    python -m benchmarks.dit_forward --quick    # 192 video tokens, fewer runs

Every candidate runs in a fresh process, loads the same random weights from the same
safetensors file (assigned, no extra copy) and runs one forward on the same inputs: batch 1,
latent 16 x 4 x 30 x 52 (4 * 15 * 26 = 1560 tokens after the 1x2x2 patch) and two text
contexts, each a table per dtype:
  * worst case: 512 random text tokens, all real;
  * realistic prompt: 60 real tokens zero-padded to 512, handed to each model the way its own
    API takes it: the official model a list with the 60-token tensor (it zero-pads to 512
    itself), diffusers and ComfyUI the zero-padded [1, 512, 4096] tensor (as their pipelines
    pass it), wan_core the same padded tensor (all-zero rows count as padding).
The official model runs with the SDPA stand-in for flash attention, in fp32 only: its bf16
path relies on CUDA autocast (fp32 time embedding asserted), so it cannot run bf16 on CPU.
CPU timings on a shared machine are noisy; compare ratios from one run only.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import bench, print_table  # noqa: E402

CONFIG = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=2, in_dim=16, out_dim=16,
              text_dim=4096, freq_dim=256)
FULL_LATENT = (16, 4, 30, 52)
QUICK_LATENT = (16, 2, 16, 24)
TEXT_TOKENS = 512
PROMPT_TOKENS = 60          # real tokens of the "realistic prompt" case


def make_weights(folder: Path) -> None:
    """Random official-layout weights saved as dit_fp32 / dit_bf16 .safetensors in folder."""
    import torch
    from safetensors.torch import save_file

    from wan_core.models.configs import DiTConfig
    from wan_core.models.dit import WanDiT

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(DiTConfig(**CONFIG)).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        fan_in = shape[1] if len(shape) == 2 else 1
        sd[key] = 1.0 + 0.05 * noise if "norm" in key else noise / max(fan_in, 64) ** 0.5
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        save_file({k: v.to(dtype).contiguous() for k, v in sd.items()},
                  str(folder / f"dit_{name}.safetensors"))


def make_inputs(latent, dtype, real_tokens=TEXT_TOKENS):
    """x [1, *latent], t [1], context [1, 512, text_dim] whose rows past real_tokens are 0."""
    import torch

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, *latent, generator=gen).to(dtype)
    context = torch.randn(1, TEXT_TOKENS, CONFIG["text_dim"], generator=gen).to(dtype)
    context[:, real_tokens:] = 0
    t = torch.tensor([750.0])
    return x, t, context


def _dtype(name):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


# --------------------------------------------------------------------------------------------
# Candidates (module-level so that the harness can spawn them)
# --------------------------------------------------------------------------------------------

def setup_ours(path, dtype_name, latent, real_tokens):
    from wan_core import load_dit

    model = load_dit(path)
    x, t, context = make_inputs(latent, _dtype(dtype_name), real_tokens)
    return lambda: model(x, t, context)


def setup_official(path, dtype_name, latent, real_tokens):
    import torch
    from safetensors.torch import load_file

    from tests.reference import official

    if dtype_name != "fp32":
        raise RuntimeError("official wan22 runs bf16 only under CUDA autocast; fp32 only on CPU")
    import warnings

    warnings.filterwarnings("ignore", message="CUDA is not available")   # its autocast blocks

    mod = official("modules.model")
    with torch.device("meta"):
        model = mod.WanModel(model_type="t2v", **CONFIG)
    model.load_state_dict(load_file(path), assign=True)
    d = CONFIG["dim"] // CONFIG["num_heads"]
    model.freqs = torch.cat([mod.rope_params(1024, d - 4 * (d // 6)),
                             mod.rope_params(1024, 2 * (d // 6)),
                             mod.rope_params(1024, 2 * (d // 6))], dim=1)
    model.eval()
    x, t, context = make_inputs(latent, torch.float32, real_tokens)
    seq_len = latent[1] * (latent[2] // 2) * (latent[3] // 2)
    prompt = context[0, :real_tokens]           # the official pipeline passes trimmed prompts
    return lambda: model([x[0]], t, [prompt], seq_len=seq_len)


def setup_diffusers(path, dtype_name, latent, real_tokens):
    import torch
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors.torch import load_file

    with torch.device("meta"):
        model = WanTransformer3DModel(
            num_attention_heads=CONFIG["num_heads"],
            attention_head_dim=CONFIG["dim"] // CONFIG["num_heads"],
            in_channels=CONFIG["in_dim"], out_channels=CONFIG["out_dim"],
            text_dim=CONFIG["text_dim"], freq_dim=CONFIG["freq_dim"],
            ffn_dim=CONFIG["ffn_dim"], num_layers=CONFIG["num_layers"])
    model.load_state_dict(convert_wan_transformer_to_diffusers(load_file(path)), assign=True)
    model.rope = type(model.rope)(CONFIG["dim"] // CONFIG["num_heads"], (1, 2, 2), 1024)
    model.eval()
    x, t, context = make_inputs(latent, _dtype(dtype_name), real_tokens)
    return lambda: model(x, t, context, return_dict=False)[0]


def setup_comfy(path, dtype_name, latent, real_tokens, comfy_root):
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, comfy_root)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.ldm.wan.model as wan_model
    import comfy.ops

    dtype = _dtype(dtype_name)
    with torch.device("meta"):
        model = wan_model.WanModel(model_type="t2v", operations=comfy.ops.disable_weight_init,
                                   dtype=dtype, **CONFIG)
    sd = load_file(path)
    sd["patch_embedding.weight"] = sd["patch_embedding.weight"].float()   # ComfyUI keeps it fp32
    sd["patch_embedding.bias"] = sd["patch_embedding.bias"].float()
    model.load_state_dict(sd, assign=True)
    model.eval()
    x, t, context = make_inputs(latent, dtype, real_tokens)
    return lambda: model(x, t, context)


# --------------------------------------------------------------------------------------------

def print_cpu_times(results, ours="wan_core"):
    """Process CPU time per call (with --threads 1, a steadier figure than wall time on a
    machine shared with other jobs)."""
    done = [r for r in results if not r.error]
    base = next((r for r in done if r.name == ours), None)
    if not base:
        return
    parts = [f"{r.name} {r.cpu_median_s:.2f} s ({r.cpu_median_s / base.cpu_median_s:.2f}x)"
             for r in done]
    print("CPU time per call (all threads): " + ", ".join(parts))


# Linear layers run as addmm / mm; batched products (bmm, baddbmm) appear only in attention
# (ComfyUI's CPU attention is q @ k^T, softmax, @ v), so they count as attention.
GEMM_OPS = ("aten::addmm", "aten::mm")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax",
                 "aten::bmm", "aten::baddbmm",
                 "aten::_scaled_dot_product_efficient_attention",
                 "aten::_scaled_dot_product_flash_attention")


def _profile_child(queue, setup, args, threads):
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    with torch.no_grad():
        fn = setup(*args)
        fn()                                            # warm-up: kernels, weight reorders
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    shares = {"gemm": 0.0, "attention": 0.0, "total": 0.0}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        shares["total"] += seconds
        if event.key in GEMM_OPS:
            shares["gemm"] += seconds
        elif event.key in ATTENTION_OPS:
            shares["attention"] += seconds
    queue.put(shares)


def profile_split(name, setup, *args, threads=1):
    """CPU time of one forward split into GEMMs (matrix products, the same MKL/oneDNN calls in
    every implementation), attention kernels (SDPA, or bmm + softmax) and everything else."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_profile_child, args=(queue, setup, args, threads))
    proc.start()
    shares = queue.get()
    proc.join()
    other = shares["total"] - shares["gemm"] - shares["attention"]
    print(f"  {name}: {shares['total']:.2f} s = GEMM {shares['gemm']:.2f} s "
          f"({shares['gemm'] / shares['total']:.0%}) + attention {shares['attention']:.2f} s "
          f"({shares['attention'] / shares['total']:.0%}) + other {other:.2f} s "
          f"({other / shares['total']:.0%})", flush=True)
    return shares


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small latent, 2 timed runs")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--cases", default="all,prompt",
                        help="text contexts: all (512 real tokens), prompt (60 real + padding)")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per candidate")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing, split one forward's CPU time (1 thread) into "
                             "GEMMs, attention and the rest: the floor every implementation shares")
    args = parser.parse_args(argv)
    latent = QUICK_LATENT if args.quick else FULL_LATENT
    runs = args.runs or (2 if args.quick else 3)
    comfy_root = os.environ.get("COMFYUI_ROOT")
    tokens = latent[1] * (latent[2] // 2) * (latent[3] // 2)
    print(f"DiT forward on CPU: dim {CONFIG['dim']}, {CONFIG['num_heads']} heads, ffn "
          f"{CONFIG['ffn_dim']}, {CONFIG['num_layers']} layers, {tokens} video tokens + "
          f"{TEXT_TOKENS} text tokens (all real, or {PROMPT_TOKENS} real + zero padding), "
          f"batch 1, median of {runs}")
    if not comfy_root:
        print("COMFYUI_ROOT not set: ComfyUI native skipped")

    with tempfile.TemporaryDirectory(prefix="wancore_bench_") as tmp:
        # Generate the weights in a child process: Linux carries a process's peak RSS over
        # into the children it spawns, so the parent must stay small.
        import multiprocessing as mp

        maker = mp.get_context("spawn").Process(target=make_weights, args=(Path(tmp),))
        maker.start()
        maker.join()
        paths = {name: str(Path(tmp) / f"dit_{name}.safetensors") for name in ("fp32", "bf16")}
        cases = {"all": (TEXT_TOKENS, f"{TEXT_TOKENS} real text tokens (worst case)"),
                 "prompt": (PROMPT_TOKENS, f"{PROMPT_TOKENS} real text tokens + zero padding "
                                           f"to {TEXT_TOKENS} (realistic prompt)")}
        for dtype_name in args.dtypes.split(","):
            path = paths[dtype_name]
            for case in args.cases.split(","):
                real, label = cases[case]
                print(f"\n[{dtype_name}, {label}]", flush=True)
                kw = dict(runs=runs, threads=args.threads)
                common = (path, dtype_name, latent, real)
                if args.profile:
                    profile_split("wan_core", setup_ours, *common)
                    if dtype_name == "fp32":
                        profile_split("official wan22", setup_official, *common)
                    profile_split("diffusers", setup_diffusers, *common)
                    if comfy_root:
                        profile_split("comfyui native", setup_comfy, *common, comfy_root)
                    continue
                results = [
                    bench("wan_core", setup_ours, *common, **kw),
                    bench("official wan22", setup_official, *common, **kw),
                    bench("diffusers", setup_diffusers, *common, **kw),
                ]
                if comfy_root:
                    results.append(bench("comfyui native", setup_comfy, *common, comfy_root,
                                         **kw))
                print_table(f"DiT forward, {dtype_name}, {tokens} video tokens, {label}",
                            results)
                print_cpu_times(results)


if __name__ == "__main__":
    main()
