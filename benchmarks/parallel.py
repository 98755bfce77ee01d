"""Multi-process generation (``wan_core.parallel``): the mechanism measured on 1, 2 and 4
processes, and a model of Wan 2.1 14B on 2, 4 and 8 GPUs.

    python -m benchmarks.parallel                 # both parts (the CPU part takes ~2-3 minutes)
    python -m benchmarks.parallel measure         # only the measured part
    python -m benchmarks.parallel model           # only the 14B model (instant)
    python -m benchmarks.parallel measure --configs 1 u2 cfg2 --video 320x320x17 --steps 3

``measure``: a random DiT (dim 256, 4 heads, 4 layers, ffn 1024 by default) generates one
video with CFG on (guide scale 5) in every configuration: 1 process; Ulysses 2; Ulysses 2 with
FSDP; CFG 2; Ulysses 2 x CFG 2 (with and without FSDP); Ulysses 4. Each configuration runs in
fresh processes (spawned as the tests do, joined in a group as torchrun would). Per rank: the
median wall time of a denoising step after ``--warmup`` steps (the solver's callback marks the
end of each step; with CUDA after a synchronise), the process CPU time per step, the bytes it
sends to other ranks per step, its peak memory, and the DiT weight bytes it holds. The final
latent of rank 0 is compared with the 1-process latent.

Bytes are *counted*, not assumed: the worker wraps ``torch.distributed.all_to_all_single``,
``all_gather``, ``all_gather_single`` / ``all_gather_into_tensor`` (FSDP2's weight gathers),
``reduce_scatter_tensor``, ``all_reduce`` and ``broadcast`` and adds up what each call sends
to the other ranks: an all-to-all sends (N-1)/N of its input, an all-gather sends its input to
N-1 ranks (a ring forwards N-1 chunks), a ring all-reduce 2(N-1)/N of its tensor. The "from
shapes" column is the same quantity predicted from the shapes the code exchanges (the formula
the 14B model below uses), so the two columns check each other.

Devices: when at least as many CUDA GPUs are visible as the largest configuration has processes
(and ``--device`` is not ``cpu``), each rank takes GPU ``rank`` and the group uses NCCL; peak memory
is then ``torch.cuda.max_memory_allocated``. Otherwise everything runs on the CPU over gloo,
``--threads`` (default 1) threads per process, and peak memory is the peak RSS of the process
(VmHWM: ``resource.getrusage``'s ``ru_maxrss`` is carried over from the parent through fork and
exec on Linux, VmHWM belongs to the process's own address space; see ``harness.py``). On a
machine with fewer cores than processes the wall times measure the cores, not the method.

``model``: Wan 2.1 14B (dim 5120, ffn 13824, 40 layers, 40 heads) at 480P (832x480x81, 32,760
tokens) and 720P (1280x720x81, 75,600 tokens), 50 steps with CFG, on 1, 2, 4 and 8 GPUs with
Ulysses over all GPUs or Ulysses x CFG 2, DiT FSDP over all GPUs (as the official multi-GPU
run). Compute from the DiT FLOP formula, layers x [L (12 d^2 + 4 d ffn) + 4 L^2 d + 4 * 512 L d
+ 4 * 512 d^2], twice per step (CFG), each rank doing 1/N of the tokens and heads, at the rates
of the named constants below (the 512-token text projection is repeated on every rank); bytes
from the shapes exchanged (the formula the measured part checks; as wan_core does, cond and
uncond go as one batch, so the weights are gathered once per step); communication time = bytes /
bandwidth + a fixed latency per collective, for NVLink and PCIe 4 / 5. "Serial": compute plus
communication; "overlapped": the larger of the two (an upper bound: wan_core's all-to-alls wait
for their result, FSDP2 prefetches the next block's weights). End to end, the time outside the
DiT (text encoder, VAE decode, moves; not parallelised) is the official 1-GPU time minus the
modelled 1-GPU DiT time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------- configurations

@dataclass(frozen=True)
class Layout:
    key: str
    ulysses: int = 1
    cfg: bool = False
    fsdp: bool = False

    @property
    def world(self) -> int:
        return self.ulysses * (2 if self.cfg else 1)

    @property
    def label(self) -> str:
        if self.world == 1:
            return "1 process"
        parts = ([f"Ulysses {self.ulysses}"] if self.ulysses > 1 else []) + \
                (["CFG 2"] if self.cfg else [])
        return " x ".join(parts) + (" + FSDP" if self.fsdp else "")


LAYOUTS = {lay.key: lay for lay in (
    Layout("1"),
    Layout("u2", 2),
    Layout("u2-fsdp", 2, fsdp=True),
    Layout("cfg2", 1, cfg=True),
    Layout("u2xcfg2", 2, cfg=True),
    Layout("u2xcfg2-fsdp", 2, cfg=True, fsdp=True),
    Layout("u4", 4),
    Layout("u4-fsdp", 4, fsdp=True),
)}
DEFAULT_CONFIGS = ("1", "u2", "u2-fsdp", "cfg2", "u2xcfg2", "u2xcfg2-fsdp", "u4", "u4-fsdp")


def _video(text: str) -> tuple:
    w, h, f = (int(v) for v in text.lower().split("x"))
    return w, h, f


def tokens_of(width: int, height: int, frames: int) -> int:
    """Video tokens of a Wan 2.1 latent after the 1x2x2 patch (VAE stride 4x8x8)."""
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)


# ------------------------------------------------------------------- counting bytes

class CommCounter:
    """Wraps the torch.distributed collectives and adds up the bytes each call sends to the
    other ranks, by kind: 'all-to-all', 'gather' (Ulysses output gather), 'cfg' (the CFG
    exchange), 'fsdp' (weight all-gathers / reduce-scatters), 'other'."""

    NAMES = ("all_to_all_single", "all_gather", "all_gather_single", "all_gather_into_tensor",
             "reduce_scatter_tensor", "all_reduce", "broadcast")

    def __init__(self):
        self.bytes: dict = {}
        self.calls: dict = {}
        self.cfg_group = None
        self._depth = 0

    def reset(self) -> None:
        self.bytes, self.calls = {}, {}

    def install(self) -> "CommCounter":
        import torch.distributed as dist

        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._wrap(name, original))
        return self

    def _kind(self, name: str, group) -> str:
        if name == "all_to_all_single":
            return "all-to-all"
        if name == "all_gather":
            return "cfg" if group is not None and group is self.cfg_group else "gather"
        if name in ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_tensor"):
            return "fsdp"
        return "other"

    def _sent(self, name: str, args, kwargs) -> tuple:
        import torch.distributed as dist

        group = kwargs.get("group")
        n = dist.get_world_size(group)
        if name == "all_to_all_single":
            data = args[1] if len(args) > 1 else kwargs["input"]
            splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
            total = data.numel() * data.element_size()
            if splits:
                own = splits[dist.get_rank(group)] * (total // max(data.shape[0], 1))
                return group, total - own
            return group, total * (n - 1) // n
        if name in ("all_gather", "all_gather_single", "all_gather_into_tensor"):
            data = args[1] if len(args) > 1 else kwargs.get("tensor", kwargs.get("input_tensor"))
            return group, data.numel() * data.element_size() * (n - 1)
        if name == "reduce_scatter_tensor":
            data = args[1] if len(args) > 1 else kwargs["input"]
            return group, data.numel() * data.element_size() * (n - 1) // n
        data = args[0] if args else kwargs["tensor"]
        size = data.numel() * data.element_size()
        return group, (2 * size * (n - 1) // n) if name == "all_reduce" else size

    def _wrap(self, name: str, original):
        def counted(*args, **kwargs):
            outer = self._depth == 0
            if outer:
                group, sent = self._sent(name, args, kwargs)
                kind = self._kind(name, group)
                self.bytes[kind] = self.bytes.get(kind, 0) + sent
                self.calls[kind] = self.calls.get(kind, 0) + 1
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted


def predicted_bytes(layout: Layout, *, layers: int, dim: int, tokens: int, latent_numel: int,
                    head_channels: int, param_bytes: int, act_bytes: int = 4,
                    head_bytes: int = 4, latent_bytes: int = 4) -> dict:
    """Bytes one rank sends per denoising step (CFG on), from the shapes wan_core exchanges.

    Ulysses over u ranks, S = ceil(L / u) tokens per rank, b samples per forward (2 with
    batched CFG on one rank group, 1 with CFG parallelism): per block 4 all-to-alls (q, k, v to
    the head split, the output back), each sending (u-1)/u of a [b, S, dim] tensor; after the
    last block an all-gather of the head output [b, S, out*patch] (float32) to u-1 ranks. CFG
    parallelism: one all-gather of the velocity (float32) to the partner. FSDP over all W
    ranks: every forward gathers every unit, each rank sending its 1/W shard to W-1 ranks.
    """
    u, world = layout.ulysses, layout.world
    per_rank = math.ceil(tokens / u)
    b = 1 if layout.cfg else 2
    out = {"all-to-all": 0, "gather": 0, "cfg": 0, "fsdp": 0}
    if u > 1:
        out["all-to-all"] = layers * 4 * (u - 1) * b * per_rank * dim * act_bytes // u
        out["gather"] = (u - 1) * b * per_rank * head_channels * head_bytes
    if layout.cfg:
        out["cfg"] = latent_numel * latent_bytes
    if layout.fsdp and world > 1:
        out["fsdp"] = (world - 1) * param_bytes // world      # one forward per step (batched)
    return out


# ------------------------------------------------------------------------------ workers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _use_cuda(world: int, device: str) -> bool:
    """One GPU per rank when enough are visible (decided once for all the layouts of a run,
    so that every row is on the same kind of device)."""
    return device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() >= world


def _peak_rss_mb() -> float:
    from benchmarks.harness import _hwm_mb

    return _hwm_mb()


def _entry(rank: int, world: int, port: int, layout: Layout, opts: dict, out: str) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(opts["threads"])
    import torch.distributed as dist

    try:
        result = _run_rank(rank, layout, opts)
        with open(Path(out) / f"rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_rank(rank: int, layout: Layout, opts: dict) -> dict:
    from tests.dit_helpers import random_state_dict
    from wan_core import load_dit, parallel
    from wan_core.conditioning import VideoConditioning
    from wan_core.models.configs import DiTConfig
    from wan_core.ops.streaming import place
    from wan_core.pipeline import generate

    cuda = opts["device"] == "cuda"
    counter = CommCounter().install()
    ctx = None
    if layout.world > 1:
        ctx = parallel.init(ulysses_size=layout.ulysses, cfg_parallel=layout.cfg,
                            dit_fsdp=layout.fsdp, device=None if cuda else "cpu")
        counter.cfg_group = ctx.cfg_group if layout.cfg else None
        device = ctx.device
    else:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
    cfg = DiTConfig(model_type="t2v", dim=opts["dim"], ffn_dim=opts["ffn"],
                    num_heads=opts["heads"], num_layers=opts["layers"],
                    text_dim=opts["text_dim"], freq_dim=opts["freq_dim"])
    model = load_dit(random_state_dict(cfg, seed=1, scale=0.05), dtype=opts["dtype"],
                     num_heads=cfg.num_heads)
    whole = parallel.local_bytes(model)
    if ctx is not None:
        ctx.prepare_dit(model)
    else:
        place(model, device)
    held = parallel.local_bytes(model)
    gen = torch.Generator().manual_seed(2)
    text = [torch.randn(40, cfg.text_dim, generator=gen)]
    negative = [torch.randn(12, cfg.text_dim, generator=gen)]
    width, height, frames = opts["video"]
    warmup, steps = opts["warmup"], opts["steps"]
    marks = []

    def mark(step, total, x, x0):
        if cuda:
            torch.cuda.synchronize()
        marks.append((time.perf_counter(), time.process_time()))
        if step == warmup:              # count what the timed steps send, and their peak
            counter.reset()
            if cuda:
                torch.cuda.reset_peak_memory_stats()

    latent = generate(model, text, negative, VideoConditioning(width, height, frames),
                      steps=warmup + steps, guide_scale=5.0, shift=5.0, seed=0, device=device,
                      parallel=ctx, callback=mark)
    wall = [b[0] - a[0] for a, b in zip(marks[warmup - 1:], marks[warmup:])]
    cpu = [b[1] - a[1] for a, b in zip(marks[warmup - 1:], marks[warmup:])]
    result = {
        "rank": rank, "device": str(device),
        "backend": (torch.distributed.get_backend() if ctx is not None else "none"),
        "step_s": statistics.median(wall), "cpu_step_s": statistics.median(cpu),
        "sent_per_step": {k: v / steps for k, v in counter.bytes.items()},
        "calls_per_step": {k: v / steps for k, v in counter.calls.items()},
        "peak_rss_mb": _peak_rss_mb(),
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "weights_mb": held / 2**20, "whole_weights_mb": whole / 2**20,
        "param_bytes": whole, "latent_numel": latent.numel(),
        "head_channels": cfg.out_dim * math.prod(cfg.patch_size),
        "act_bytes": torch.empty((), dtype=model.compute_dtype).element_size(),
    }
    if rank == 0:
        torch.save(latent, Path(opts["out"]) / f"{layout.key}.pt")
    return result


def run_layout(layout: Layout, opts: dict) -> list:
    """Spawn ``layout.world`` processes; the per-rank results."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="wancore-parallel-") as tmp:
        mp.start_processes(_entry, args=(layout.world, _free_port(), layout, opts, tmp),
                           nprocs=layout.world, start_method="spawn", join=True)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text())
                for r in range(layout.world)]


def _mb(n: float) -> str:
    return f"{n / 2**20:,.2f}"


def measure(args) -> None:
    width, height, frames = _video(args.video)
    tokens = tokens_of(width, height, frames)
    with tempfile.TemporaryDirectory(prefix="wancore-parallel-out-") as out:
        opts = dict(dim=args.dim, heads=args.heads, layers=args.layers, ffn=args.ffn,
                    text_dim=args.text_dim, freq_dim=64, dtype=args.dtype, video=(width, height,
                    frames), warmup=args.warmup, steps=args.steps, threads=args.threads,
                    out=out, device="cuda" if _use_cuda(
                        max(LAYOUTS[k].world for k in args.configs), args.device) else "cpu")
        results, latents = {}, {}
        started = time.perf_counter()
        for key in args.configs:
            layout = LAYOUTS[key]
            t0 = time.perf_counter()
            ranks = run_layout(layout, opts)
            results[key] = ranks
            latents[key] = torch.load(Path(out) / f"{key}.pt")
            r0 = ranks[0]
            print(f"  {layout.label}: {r0['step_s']:.3f} s/step on {r0['device']} "
                  f"({r0['backend']}), {time.perf_counter() - t0:.1f} s with start-up",
                  flush=True)
        total = time.perf_counter() - started
    base_key = args.configs[0]
    base = results[base_key][0]
    on = results[base_key][0]["device"]
    print(f"\n## Multi-process generation, measured: DiT dim {args.dim}, {args.heads} heads, "
          f"{args.layers} layers, ffn {args.ffn}, {args.dtype}; {width}x{height}x{frames} "
          f"({tokens:,} tokens), CFG on; median of {args.steps} steps after {args.warmup} "
          f"warm-up; {args.threads} thread(s) per process; {on}; {os.cpu_count()} CPU cores; "
          f"load average {os.getloadavg()[0]:.1f} at the end; whole run {total:.0f} s")
    print("| configuration | processes | s / step | vs 1 process | CPU s / step: per rank; all "
          "ranks (vs 1 process) | cores busy | sent per rank per step, MB: all-to-all / "
          "gathers / CFG / FSDP (counted) | same, from shapes | peak memory per rank, MB | "
          "DiT weights per rank, MB | max abs diff vs 1 process |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, ranks in results.items():
        layout = LAYOUTS[key]
        step = statistics.median(r["step_s"] for r in ranks)
        cpu = statistics.mean(r["cpu_step_s"] for r in ranks)
        cpu_all = sum(r["cpu_step_s"] for r in ranks)
        sent = {k: max(r["sent_per_step"].get(k, 0) for r in ranks)
                for k in ("all-to-all", "gather", "cfg", "fsdp", "other")}
        r0 = ranks[0]
        pred = predicted_bytes(layout, layers=args.layers, dim=args.dim, tokens=tokens,
                               latent_numel=r0["latent_numel"],
                               head_channels=r0["head_channels"],
                               param_bytes=r0["param_bytes"], act_bytes=r0["act_bytes"])
        counted = " / ".join(_mb(sent[k]) for k in ("all-to-all", "gather", "cfg", "fsdp"))
        if sent["other"]:
            counted += f" (+{_mb(sent['other'])} other)"
        shapes = " / ".join(_mb(pred[k]) for k in ("all-to-all", "gather", "cfg", "fsdp"))
        if r0["peak_cuda_mb"] is not None:
            memory = ", ".join(f"{r['peak_cuda_mb']:,.0f}" for r in ranks) + " (CUDA)"
        else:
            memory = ", ".join(f"{r['peak_rss_mb']:,.0f}" for r in ranks)
        err = float((latents[key] - latents[base_key]).abs().max())
        print(f"| {layout.label} | {layout.world} | {step:.3f} | {step / base['step_s']:.2f}x | "
              f"{cpu:.3f}; {cpu_all:.3f} ({cpu_all / base['cpu_step_s']:.2f}x) | "
              f"{cpu_all / step:.2f} | {counted} | {shapes} | {memory} | "
              f"{r0['weights_mb']:.1f} of {r0['whole_weights_mb']:.1f} | {err:.1e} |")
    if not base["device"].startswith("cuda") and (os.cpu_count() or 1) < 4:
        print(f"\nOn {os.cpu_count()} CPU cores the processes of a configuration share the "
              "cores (and with other jobs): with free cores N processes would take about 1/N of "
              "the time, here the wall times measure the machine, not the method. 'Cores busy' "
              "= the CPU seconds of all ranks per wall second; 'all ranks' CPU time against "
              "1 process is the cost of splitting the work. The byte counts carry over.")


# ------------------------------------------------------------------------ the 14B model

# Wan 2.1 T2V 14B
LAYERS, DIM, FFN, HEADS = 40, 5120, 13824, 40
TEXT_TOKENS = 512                 # the text is padded to 512 tokens in every cross-attention
STEPS = 50                        # the official T2V default (sample_steps)
ACT_BYTES = 2                     # bf16 activations in the all-to-alls
HEAD_BYTES = 4                    # the head output is gathered in float32
WEIGHT_BYTES = 2                  # bf16 weights gathered by FSDP
# Sustained H100 SXM rates (assumptions). GEMMs: 400 TFLOP/s, about 40 % of the 989 TFLOP/s
# dense bf16 peak, which leaves room for the element-wise work the FLOP formula leaves out
# (norms, modulation, RoPE). Attention: 350 TFLOP/s, a FlashAttention-2-class forward at head
# dim 128 and these sequence lengths.
GEMM_FLOPS = 400e12
ATTENTION_FLOPS = 350e12
# Effective per-GPU bandwidth of NCCL collectives (one direction) and a fixed cost per call.
LINKS = {
    "NVLink 4": (350e9, 30e-6),   # H100 SXM, NVSwitch: 450 GB/s per direction, ~350 reached
    "PCIe 5": (50e9, 50e-6),      # x16, optimistic: no host-bridge / socket contention
    "PCIe 4": (25e9, 50e-6),
}
# Official Wan 2.1 figures (14B T2V, 1280x720x81, H100): 1 GPU (offload_model) and 8 GPUs
# (--dit_fsdp --t5_fsdp --ulysses_size 8), total seconds.
OFFICIAL_1GPU_S, OFFICIAL_8GPU_S = 1837.9, 287.9
RESOLUTIONS = {"480P": (832, 480, 81), "720P": (1280, 720, 81)}


def param_bytes_14b() -> int:
    from wan_core.models.configs import DiTConfig

    cfg = DiTConfig(model_type="t2v", dim=DIM, ffn_dim=FFN, num_heads=HEADS,
                    num_layers=LAYERS)
    return cfg.num_params() * WEIGHT_BYTES


def block_bytes_14b() -> int:
    from wan_core.models.configs import DiTConfig

    one, none = (DiTConfig(model_type="t2v", dim=DIM, ffn_dim=FFN, num_heads=HEADS,
                           num_layers=n).num_params() for n in (1, 0))
    return (one - none) * WEIGHT_BYTES


def step_model(tokens: int, latent_numel: int, gpus: int, cfg_parallel: bool, link: str,
               fsdp: bool = True) -> dict:
    """Per-rank compute and communication seconds of one denoising step (CFG on)."""
    layout = Layout("model", gpus // 2 if cfg_parallel else gpus, cfg_parallel,
                    fsdp and gpus > 1)
    u = layout.ulysses
    forwards = 1 if cfg_parallel else 2         # forwards per step on each rank
    per_rank = math.ceil(tokens / u)
    L, d = tokens, DIM
    gemm = LAYERS * (per_rank * (12 * d * d + 4 * d * FFN) + 4 * TEXT_TOKENS * d * d)
    attention = LAYERS * (4 * L * per_rank * d + 4 * TEXT_TOKENS * per_rank * d)
    compute = forwards * (gemm / GEMM_FLOPS + attention / ATTENTION_FLOPS)
    # wan_core runs cond and uncond as one batch of 2 on a rank (or one sample per rank with
    # CFG parallelism): one all-to-all per q / k / v / output per block and one gather of the
    # weights per step, whatever the batch
    sent = predicted_bytes(layout, layers=LAYERS, dim=DIM, tokens=tokens,
                           latent_numel=latent_numel, head_channels=64,
                           param_bytes=param_bytes_14b(), act_bytes=ACT_BYTES,
                           head_bytes=HEAD_BYTES)
    calls = ((4 * LAYERS + 1) if u > 1 else 0) + (1 if cfg_parallel else 0)
    fsdp_calls = (LAYERS + 1) if layout.fsdp else 0
    bandwidth, latency = LINKS[link]
    ulysses_comm = (sent["all-to-all"] + sent["gather"] + sent["cfg"]) / bandwidth \
        + calls * latency
    fsdp_comm = sent["fsdp"] / bandwidth + fsdp_calls * latency
    comm = ulysses_comm + fsdp_comm
    return {"layout": layout, "compute": compute, "ulysses_comm": ulysses_comm,
            "fsdp_comm": fsdp_comm, "serial": compute + comm, "overlapped": max(compute, comm),
            "sent": sent}


def model(args) -> None:
    param_gb = param_bytes_14b() / 1e9
    print(f"\n## Model: Wan 2.1 14B, {STEPS} steps with CFG (two forwards per step), per rank; "
          f"GEMMs at {GEMM_FLOPS / 1e12:.0f} TFLOP/s, attention at "
          f"{ATTENTION_FLOPS / 1e12:.0f} TFLOP/s; DiT FSDP over all GPUs ({param_gb:.1f} GB "
          f"of bf16 weights gathered per step, N GPUs hold {param_gb:.1f} / N GB + the "
          f"{block_bytes_14b() / 1e9:.2f} GB block in use); links: " +
          ", ".join(f"{k} {bw / 1e9:.0f} GB/s + {lat * 1e6:.0f} us per call"
                    for k, (bw, lat) in LINKS.items()))
    print("| video | GPUs | layout | link | compute s / step | all-to-all + gathers s / step "
          "(GB) | FSDP gathers s / step (GB) | step s: serial / overlapped | DiT speed-up: "
          "serial / overlapped |")
    print("|---|---|---|---|---|---|---|---|---|")
    singles = {}
    for name, (w, h, f) in RESOLUTIONS.items():
        tokens = tokens_of(w, h, f)
        numel = 16 * ((f - 1) // 4 + 1) * (h // 8) * (w // 8)
        single = step_model(tokens, numel, 1, False, "NVLink 4")
        singles[name] = single
        print(f"| {name} ({tokens:,} tokens) | 1 | - | - | {single['compute']:.2f} | - | - | "
              f"{single['serial']:.2f} | 1.00x |")
        for gpus in (2, 4, 8):
            for cfg_parallel in (False, True):
                for link in LINKS:
                    m = step_model(tokens, numel, gpus, cfg_parallel, link)
                    s = m["sent"]
                    print(f"| {name} | {gpus} | {m['layout'].label} | {link} | "
                          f"{m['compute']:.2f} | {m['ulysses_comm']:.3f} "
                          f"({(s['all-to-all'] + s['gather'] + s['cfg']) / 1e9:.1f}) | "
                          f"{m['fsdp_comm']:.3f} ({s['fsdp'] / 1e9:.1f}) | "
                          f"{m['serial']:.2f} / {m['overlapped']:.2f} | "
                          f"{single['serial'] / m['serial']:.2f}x / "
                          f"{single['serial'] / m['overlapped']:.2f}x |")

    # end to end, 720P, against the official figures
    w, h, f = RESOLUTIONS["720P"]
    tokens = tokens_of(w, h, f)
    numel = 16 * ((f - 1) // 4 + 1) * (h // 8) * (w // 8)
    dit_1 = STEPS * singles["720P"]["serial"]
    other = OFFICIAL_1GPU_S - dit_1
    official = OFFICIAL_1GPU_S / OFFICIAL_8GPU_S
    print(f"\n## Model vs the official figure: Wan 2.1 14B 720P, end to end. Modelled DiT on 1 "
          f"GPU: {STEPS} x {singles['720P']['serial']:.2f} s = {dit_1:.0f} s; the rest of the "
          f"official 1-GPU {OFFICIAL_1GPU_S} s, {other:.0f} s (text encoder, VAE decode, moves), "
          "is added unparallelised to every row.")
    print("| GPUs | layout | link | modelled total s: serial / overlapped | modelled speed-up: "
          "serial / overlapped | official | serial vs official |")
    print("|---|---|---|---|---|---|---|")
    for gpus in (2, 4, 8):
        for cfg_parallel in (False, True):
            for link in LINKS:
                m = step_model(tokens, numel, gpus, cfg_parallel, link)
                serial = other + STEPS * m["serial"]
                overlapped = other + STEPS * m["overlapped"]
                is_official = gpus == 8 and not cfg_parallel
                ref = (f"{OFFICIAL_8GPU_S} s ({official:.1f}x)" if is_official and
                       link == "NVLink 4" else "")
                vs = (f"{(OFFICIAL_1GPU_S / serial) / official - 1:+.0%}" if ref else "")
                print(f"| {gpus} | {m['layout'].label} | {link} | {serial:.0f} / "
                      f"{overlapped:.0f} | {OFFICIAL_1GPU_S / serial:.2f}x / "
                      f"{OFFICIAL_1GPU_S / overlapped:.2f}x | {ref} | {vs} |")
    m = step_model(tokens, numel, 8, False, "NVLink 4")
    print(f"\nSensitivity (8 GPUs, Ulysses 8 + FSDP, NVLink, serial): the speed-up is bounded "
          f"by the time outside the DiT. The official 8-GPU figure implies "
          f"{(OFFICIAL_8GPU_S - other) / STEPS:.2f} s per step with that {other:.0f} s, the "
          f"model {m['serial']:.2f} s.")
    print("| time outside the DiT | modelled 8-GPU total | speed-up |")
    print("|---|---|---|")
    for rest in (0, 20, other, 80, 120):
        scale = (OFFICIAL_1GPU_S - rest) / dit_1      # the rates that fit the 1-GPU figure
        total = rest + STEPS * (m["compute"] * scale + m["ulysses_comm"] + m["fsdp_comm"])
        print(f"| {rest:.0f} s (rates x {1 / scale:.2f}) | {total:.0f} s | "
              f"{OFFICIAL_1GPU_S / total:.2f}x |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parallel")
    parser.add_argument("part", nargs="?", choices=("all", "measure", "model"), default="all")
    parser.add_argument("--configs", nargs="+", choices=list(LAYOUTS), default=DEFAULT_CONFIGS,
                        help="measure: configurations; the first is the baseline")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--text-dim", type=int, default=256)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--video", default="320x320x17", metavar="WxHxF",
                        help="measure: video size (320x320x17: 2,000 tokens)")
    parser.add_argument("--steps", type=int, default=3, help="measure: timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="measure: untimed first steps")
    parser.add_argument("--threads", type=int, default=1, help="measure: threads per process")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="measure: auto = one CUDA GPU per rank (NCCL) when enough are "
                             "visible, else the CPU (gloo)")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step's end starts the clock)")
    if args.part in ("all", "measure"):
        measure(args)
    if args.part in ("all", "model"):
        model(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
