"""GPU speed of the DiT options and the VAE against bf16 SDPA, diffusers and ComfyUI, in one run.

    python -m benchmarks.gpu            # one CUDA GPU, 832x480x81 (32,760 tokens); about 5 min
    python -m benchmarks.gpu --tiny     # the same code paths on the CPU with tiny shapes (seconds
                                        # once Inductor's cache is warm; its smoke test)
    options: --models 1.3B,14B  --runs N (1.3B)  --runs-14b N  --no-vae  --no-references
             --device cuda:1

Every candidate gets the same seeded random weights in the official layout (generated on the
device, bf16; each value ~ N(0, 1/fan_in), norm scales ~1) and the same inputs: latent
[1, 16, 21, 60, 104] (832x480x81 after the VAE: 21 x 30 x 52 = 32,760 tokens), one timestep,
512 random text tokens. DiT candidates:
  * bf16 sdpa             load_dit(dtype='bf16'): the baseline every ratio and error refers to;
  * attention='fp8'       the fp8 attention kernel (skipped with a note where this checkout has
                          no 'fp8' backend; on a GPU without fp8 it warns and runs SDPA);
  * compute='fp8'         weight_dtype='fp8_e4m3fn' + fp8 matrix multiplies (torch._scaled_mm);
  * compile=True          the transformer block compiled once and shared by all blocks;
  * fp8 attn + fp8 compute + compile, all together (the fast path);
  * diffusers WanTransformer3DModel with the same weights converted, and ComfyUI native
    (comfy.ldm.wan.model, when COMFYUI_ROOT points at a checkout), when importable.
VAE 2.1 decode (full-size architecture, random weights) of a latent of the same size: ours in
bf16 and fp32 (and bf16 with cuDNN benchmark mode off, the lever ``WanVAE.decode`` pulls on
CUDA), diffusers' AutoencoderKLWan with the same weights, ComfyUI's when importable.

Columns: "first s" is the first call (compilation, cuDNN autotuning and allocator warm-up
included: for compile=True the compile time is about first - median), "median s" the median
of the timed calls after it, "vs base" the median over the baseline's, "peak GiB" the peak of
``torch.cuda.max_memory_allocated`` over the timed calls (weights included; on the CPU: the
RSS the calls add), "rel L2" ||out - baseline|| / ||baseline|| (the VAE against our fp32).
To fit 5 minutes the 14B model runs all 40 blocks once as warm-up (or compilation) and times
``--runs-14b`` forwards (default 1); the 1.3B times ``--runs`` (default 3).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = {"1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
         "14B": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)}
COMMON = dict(in_dim=16, out_dim=16, text_dim=4096, freq_dim=256)
LATENT = (16, 21, 60, 104)          # 832x480x81 -> 21 x 30 x 52 = 32,760 tokens
TEXT_TOKENS = 512
VAE_ARCH = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                attn_scales=[], temperal_downsample=[False, True, True])
# --tiny: one block shape for both "models" (so the second reuses the compiled block, as a
# real 1.3B / 14B pair of runs reuses nothing but each model's own 30 / 40 blocks), head dim
# 128 as the fp8 attention kernel needs.
TINY_SIZES = {"1.3B": dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2),
              "14B": dict(dim=256, ffn_dim=512, num_heads=2, num_layers=3)}
TINY_COMMON = dict(in_dim=16, out_dim=16, text_dim=64, freq_dim=256)
TINY_LATENT = (16, 3, 8, 12)        # 3 x 4 x 6 = 72 tokens
TINY_VAE_ARCH = dict(VAE_ARCH, base_dim=8)


@dataclass
class Row:
    name: str
    first_s: float = float("nan")
    median_s: float = float("nan")
    peak_gib: float = float("nan")
    rel_l2: float = float("nan")
    note: str = ""


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

class Device:
    def __init__(self, name: str):
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def peak(self, box: list):
        """Peak memory of the block in GiB, appended to ``box``: CUDA's allocator peak
        (weights included), or on the CPU the RSS the block adds (harness's sampler)."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            box.append(torch.cuda.max_memory_allocated(self.device) / 2**30)
            return
        from benchmarks.harness import _RssSampler, _rss_mb

        base = _rss_mb()
        with _RssSampler() as sampler:
            yield
        box.append(max(sampler.peak - base, 0.0) / 1024)


def measure(dev: Device, name: str, call, runs: int, baseline=None) -> tuple[Row, torch.Tensor]:
    """First call, then ``runs`` timed calls; the output (float32) for the error column."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = call()
        dev.sync()
        first = time.perf_counter() - t0
        times, peak = [], []
        with dev.peak(peak):
            for _ in range(runs):
                t0 = time.perf_counter()
                call()
                dev.sync()
                times.append(time.perf_counter() - t0)
    out = out.float()
    row = Row(name, first, statistics.median(times) if times else first, peak[0])
    if baseline is not None:
        row.rel_l2 = float((out - baseline).norm() / baseline.norm())
    print(f"  {name}: first {row.first_s:.3f} s, median {row.median_s:.4f} s, "
          f"peak {row.peak_gib:.2f} GiB, rel L2 {row.rel_l2:.2e}", flush=True)
    return row, out


def run_candidate(dev, rows, name, setup, runs, baseline):
    """Build (``setup() -> call``), measure, free; a failure becomes a row with its reason."""
    call = None
    try:
        call = setup()
        row, out = measure(dev, name, call, runs, baseline)
    except Exception as e:            # noqa: BLE001 - report and go on
        message = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
        print(f"  {name}: failed: {message}", flush=True)
        rows.append(Row(name, note=f"failed: {message}"))
        return None
    finally:
        del call
        dev.free()
    rows.append(row)
    return out


def print_table(title: str, rows: list, base: str, reference_names=()):
    base_row = next((r for r in rows if r.name == base and r.note == ""), None)
    print(f"\n## {title}")
    print("| candidate | first s | median s | vs base | peak GiB | rel L2 | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r.median_s / base_row.median_s if base_row else float("nan")
        print(f"| {r.name} | {r.first_s:.3f} | {r.median_s:.4f} | {ratio:.2f}x | "
              f"{r.peak_gib:.2f} | {r.rel_l2:.2e} | {r.note} |")
    references = [r for r in rows if r.name in reference_names and not r.note]
    if references:
        fastest = min(references, key=lambda r: r.median_s)
        ours = [r for r in rows if r.name not in reference_names and not r.note]
        parts = [f"{r.name} {r.median_s / fastest.median_s:.2f}x" for r in ours]
        print(f"time / fastest reference ({fastest.name}, {fastest.median_s:.4f} s): "
              + ", ".join(parts))


# --------------------------------------------------------------------------------------------
# DiT
# --------------------------------------------------------------------------------------------

def dit_config(size: str, tiny: bool):
    from wan_core.models.configs import DiTConfig

    sizes, common = (TINY_SIZES, TINY_COMMON) if tiny else (SIZES, COMMON)
    return DiTConfig(model_type="t2v", **sizes[size], **common)


def random_dit_weights(cfg, device, seed: int = 0) -> dict:
    """Official-layout bf16 weights, drawn on ``device`` one tensor at a time."""
    from wan_core.models.dit import WanDiT

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen, device=device)
        fan_in = shape[1] if len(shape) >= 2 else 1
        for n in shape[2:]:
            fan_in *= n
        value = 1.0 + 0.05 * noise if "norm" in key else noise / max(fan_in, 64) ** 0.5
        sd[key] = value.to(torch.bfloat16)
        del noise, value
    return sd


def dit_inputs(cfg, latent, device, seed: int = 1):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(1, *latent, generator=gen, device=device).bfloat16()
    context = torch.randn(1, TEXT_TOKENS, cfg.text_dim, generator=gen, device=device).bfloat16()
    t = torch.tensor([750.0], device=device)
    return x, t, context


def fp8_attention_available() -> bool:
    try:
        from wan_core.models.attention import BACKENDS
    except ImportError:
        return False
    return "fp8" in BACKENDS


def ours(sd, cfg, device, inputs, **options):
    from wan_core import load_dit

    def setup():
        model = load_dit(sd, dtype="bf16", device=device, num_heads=cfg.num_heads, **options)
        x, t, context = inputs
        return lambda: model(x, t, context)
    return setup


def diffusers_dit(sd, cfg, device, inputs):
    def setup():
        from diffusers import WanTransformer3DModel
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

        with torch.device("meta"):
            model = WanTransformer3DModel(
                num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim,
                freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers)
        model.load_state_dict(convert_wan_transformer_to_diffusers(dict(sd)), assign=True)
        model.rope = type(model.rope)(cfg.head_dim, (1, 2, 2), 1024).to(device)
        model.eval()
        x, t, context = inputs
        return lambda: model(x, t, context, return_dict=False)[0]
    return setup


def comfy_dit(sd, cfg, device, inputs, comfy_root: str):
    def setup():
        sys.path.insert(0, comfy_root)
        argv, sys.argv = sys.argv, [sys.argv[0]] + (["--cpu"] if device.type == "cpu" else [])
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            import comfy.ldm.wan.model as wan_model
            import comfy.ops
        finally:
            sys.argv = argv
        keys = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim",
                "freq_dim")
        with torch.device("meta"):
            model = wan_model.WanModel(model_type="t2v", operations=comfy.ops.disable_weight_init,
                                       dtype=torch.bfloat16,
                                       **{k: getattr(cfg, k) for k in keys})
        weights = dict(sd)
        for key in ("patch_embedding.weight", "patch_embedding.bias"):   # ComfyUI keeps fp32
            weights[key] = weights[key].float()
        model.load_state_dict(weights, assign=True)
        model.eval()
        x, t, context = inputs
        return lambda: model(x, t, context)
    return setup


def bench_dit(dev: Device, size: str, args) -> None:
    cfg = dit_config(size, args.tiny)
    latent = TINY_LATENT if args.tiny else LATENT
    tokens = latent[1] * (latent[2] // 2) * (latent[3] // 2)
    runs = args.runs_14b if size == "14B" else args.runs
    print(f"\n[DiT {size}{' (tiny shapes)' if args.tiny else ''}: dim {cfg.dim}, "
          f"{cfg.num_heads} heads, {cfg.num_layers} blocks, {tokens} video tokens + "
          f"{TEXT_TOKENS} text tokens, bf16, {runs} timed run(s) after the first]", flush=True)
    started = time.perf_counter()
    sd = random_dit_weights(cfg, dev.device)
    inputs = dit_inputs(cfg, latent, dev.device)
    rows: list = []
    base = run_candidate(dev, rows, "bf16 sdpa", ours(sd, cfg, dev.device, inputs), runs, None)
    if base is None:
        print("  the baseline failed; skipping the other DiT candidates")
        return
    fp8_attention = fp8_attention_available()
    if not fp8_attention:
        print("  note: this checkout has no attention='fp8' backend; its rows are skipped")
    candidates = []
    if fp8_attention:
        candidates.append(("attention='fp8'", dict(attention="fp8")))
    candidates += [("compute='fp8'", dict(weight_dtype="fp8_e4m3fn", compute="fp8")),
                   ("compile=True", dict(compile=True))]
    fast = dict(weight_dtype="fp8_e4m3fn", compute="fp8", compile=True)
    if fp8_attention:
        fast["attention"] = "fp8"
    candidates.append(("fp8 attn + fp8 compute + compile" if fp8_attention
                       else "fp8 compute + compile", fast))
    for name, options in candidates:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_candidate(dev, rows, name, ours(sd, cfg, dev.device, inputs, **options), runs,
                          base)
        notes = sorted({str(w.message).splitlines()[0][:140] for w in caught
                        if "wan_core" in (w.filename or "") or "compile=True" in str(w.message)
                        or "attention=" in str(w.message) or "compute=" in str(w.message)})
        if notes and rows[-1].note == "":
            rows[-1].note = "warned: " + "; ".join(notes)
            print(f"    {rows[-1].note}")
    references = []
    if not args.no_references:
        references.append("diffusers")
        run_candidate(dev, rows, "diffusers", diffusers_dit(sd, cfg, dev.device, inputs), runs,
                      base)
        comfy_root = os.environ.get("COMFYUI_ROOT")
        if comfy_root:
            references.append("comfyui native")
            run_candidate(dev, rows, "comfyui native",
                          comfy_dit(sd, cfg, dev.device, inputs, comfy_root), runs, base)
        else:
            print("  COMFYUI_ROOT not set: ComfyUI native skipped")
    del sd, inputs, base
    dev.free()
    print_table(f"DiT {size} forward ({tokens} tokens, {dev.device}), "
                f"{time.perf_counter() - started:.0f} s for this table", rows, "bf16 sdpa",
                references)


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------

def vae_weights(arch: dict, seed: int = 0):
    """(official-layout state dict, a diffusers AutoencoderKLWan holding the same weights or
    None without diffusers), fp32 on the CPU."""
    torch.manual_seed(seed)
    try:
        import diffusers
    except ImportError:
        diffusers = None
    if diffusers is not None:
        ref = diffusers.AutoencoderKLWan(**arch).eval()
        from wan_core.loading.vae import diffusers_to_official

        return diffusers_to_official(ref.state_dict()), ref
    from wan_core.models.vae import VAEConfig, WanVAE

    cfg = VAEConfig("2.1", dim=arch["base_dim"], decoder_dim=arch["base_dim"], z_dim=16)
    return WanVAE(cfg).state_dict(), None


def bench_vae(dev: Device, args) -> None:
    from wan_core import load_vae
    from wan_core.models.vae import model as vae_model

    arch = TINY_VAE_ARCH if args.tiny else VAE_ARCH
    latent = TINY_LATENT if args.tiny else LATENT
    runs = args.runs
    frames = 1 + 4 * (latent[1] - 1)
    print(f"\n[VAE 2.1 decode{' (tiny shapes)' if args.tiny else ''}: base width "
          f"{arch['base_dim']}, latent {list(latent)} -> {frames} frames at "
          f"{latent[3] * 8}x{latent[2] * 8}, untiled, {runs} timed run(s)]", flush=True)
    started = time.perf_counter()
    sd, reference = vae_weights(arch)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(1, *latent, generator=gen).to(dev.device)
    rows: list = []

    def ours_vae(dtype, autotune=True):
        def setup():
            vae = load_vae(dict(sd), dtype=dtype, device=dev.device)
            zz = z.to(dtype)

            def call():
                old = vae_model.CUDNN_BENCHMARK
                vae_model.CUDNN_BENCHMARK = autotune
                try:
                    return vae.decode(zz, tile=False)
                finally:
                    vae_model.CUDNN_BENCHMARK = old
            return call
        return setup

    base = run_candidate(dev, rows, "ours fp32", ours_vae(torch.float32), runs, None)
    if base is None:
        return
    run_candidate(dev, rows, "ours bf16", ours_vae(torch.bfloat16), runs, base)
    run_candidate(dev, rows, "ours bf16, cuDNN benchmark off",
                  ours_vae(torch.bfloat16, autotune=False), runs, base)
    references = []
    if reference is not None and not args.no_references:
        from wan_core.models.vae import wan21

        mean = torch.tensor(wan21.LATENT_MEAN, device=dev.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(wan21.LATENT_STD, device=dev.device).view(1, -1, 1, 1, 1)
        raw = z * std + mean                    # diffusers / ComfyUI decode raw latents

        def diffusers_vae(dtype):
            def setup():
                model = reference.to(device=dev.device, dtype=dtype)
                r = raw.to(dtype)
                return lambda: model.decode(r, return_dict=False)[0]
            return setup

        for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            references.append(f"diffusers {label}")
            run_candidate(dev, rows, f"diffusers {label}", diffusers_vae(dtype), runs, base)
        comfy_root = os.environ.get("COMFYUI_ROOT")
        if comfy_root:
            def comfy_vae(dtype):
                def setup():
                    sys.path.insert(0, comfy_root)
                    from comfy.ldm.wan.vae import WanVAE as ComfyWanVAE

                    with torch.device("meta"):
                        model = ComfyWanVAE(dim=arch["base_dim"], z_dim=16,
                                            dim_mult=arch["dim_mult"],
                                            num_res_blocks=arch["num_res_blocks"],
                                            attn_scales=[],
                                            temperal_downsample=arch["temperal_downsample"])
                    model.load_state_dict({k: v.to(device=dev.device, dtype=dtype)
                                           for k, v in sd.items()}, assign=True)
                    model.eval()
                    r = raw.to(dtype)
                    return lambda: model.decode(r).clamp(-1, 1)
                return setup

            for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                references.append(f"comfyui {label}")
                run_candidate(dev, rows, f"comfyui {label}", comfy_vae(dtype), runs, base)
    print_table(f"VAE 2.1 decode ({frames} frames, {dev.device}), "
                f"{time.perf_counter() - started:.0f} s for this table", rows, "ours fp32",
                references)


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes on the CPU (or --device): every code path in seconds")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--models", default="1.3B,14B", help="DiT sizes to run (1.3B,14B)")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per 1.3B / VAE candidate")
    parser.add_argument("--runs-14b", type=int, default=1, help="timed calls per 14B candidate")
    parser.add_argument("--no-vae", action="store_true")
    parser.add_argument("--no-references", action="store_true",
                        help="skip diffusers and ComfyUI")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU here: run `python -m benchmarks.gpu --tiny` for the CPU smoke run")
        return 2
    dev = Device(device)
    if dev.cuda:
        print(f"GPU: {torch.cuda.get_device_name(dev.device)}, torch {torch.__version__}")
    else:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        print(f"CPU, torch {torch.__version__} (timings of tiny shapes: code paths only)")
    started = time.perf_counter()
    for size in [s.strip() for s in args.models.split(",") if s.strip()]:
        if size not in SIZES:
            parser.error(f"unknown model size {size!r}; use 1.3B and / or 14B")
        bench_dit(dev, size, args)
    if not args.no_vae:
        bench_vae(dev, args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
