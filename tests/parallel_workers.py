"""Worker processes for tests/test_parallel.py: spawned with torch.multiprocessing, joined in a
gloo group on the CPU as torchrun would (RANK / WORLD_SIZE / MASTER_* in the environment).

Each scenario builds the same tiny models from fixed seeds in every process (and in the test's
own process for the single-process reference), runs them under ``wan_core.parallel`` and saves
what the test compares to ``<out>/<scenario>_rank<r>.pt``.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def spawn(scenario: str, world: int, out: Path, port: int, timeout: float = 120.0) -> None:
    """Run ``scenario`` on ``world`` processes; re-raise a worker's failure."""
    import torch.multiprocessing as mp

    mp.start_processes(_entry, args=(world, port, scenario, str(out)), nprocs=world,
                       start_method="spawn", join=True)


def spawn_unjoined(scenario: str, world: int, out: Path, port: int, timeout: float) -> list:
    """Run ``scenario`` on ``world`` processes and wait for each (no rank is killed because
    another failed); returns their exit codes (None: still running after ``timeout``)."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    procs = [context.Process(target=_entry, args=(r, world, port, scenario, str(out)))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes


def _entry(rank: int, world: int, port: int, scenario: str, out: str) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        SCENARIOS[scenario](rank, Path(out))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------- models

def models(names=("t2v", "ti2v", "i2v", "vace", "lora")) -> dict:
    """The tiny models and inputs every process builds the same way."""
    from tests.dit_helpers import random_inputs, random_state_dict, tiny_config
    from tests.test_vace_model import vace_config
    from wan_core import apply_loras, load_dit

    from tests.tiny_models import to_fp8_scaled

    made = {}
    for name in names:
        cfg = vace_config() if name == "vace" else tiny_config(
            {"lora": "t2v", "fp8_lora": "t2v"}.get(name, name))
        sd = random_state_dict(cfg, seed={"t2v": 1, "ti2v": 2, "i2v": 3, "vace": 4,
                                          "lora": 1, "fp8_lora": 5}[name])
        if name == "fp8_lora":           # ComfyUI's fp8_scaled storage, kept fp8 in memory
            sd = to_fp8_scaled(sd)
        model = load_dit(sd, num_heads=cfg.num_heads, dtype="fp32")
        # 3 x 3 x 5 = 45 tokens: odd, so two ranks pad one token
        inputs = random_inputs(cfg, batch=2, frames=3, height=6, width=10, seed=7)
        if name == "ti2v":
            t = inputs["t"][:, None].expand(2, 45).clone()
            t[:, :15] = 0.0                      # the given first latent frame is clean
            inputs["t"] = t
        if name == "vace":
            inputs["vace_context"] = torch.randn(2, 96, 3, 6, 10,
                                                 generator=torch.Generator().manual_seed(8))
            inputs["vace_scale"] = [0.7, 1.2]
        if name in ("lora", "fp8_lora"):
            gen = torch.Generator().manual_seed(9)
            lora = {"diffusion_model.blocks.1.self_attn.q.lora_down.weight":
                    torch.randn(4, cfg.dim, generator=gen),
                    "diffusion_model.blocks.1.self_attn.q.lora_up.weight":
                    torch.randn(cfg.dim, 4, generator=gen)}
            model = apply_loras(model, [(lora, 0.2)])
        made[name] = (model, inputs)
    return made


def forward_all(made: dict) -> dict:
    with torch.no_grad():
        return {name: model(**inputs) for name, (model, inputs) in made.items()}


def tiny_generation(model, **kwargs):
    """A short CFG generation with the step cache on (its decisions must agree on every
    rank)."""
    from wan_core.conditioning import VideoConditioning
    from wan_core.pipeline import generate
    from wan_core.sampling import CacheSettings

    gen = torch.Generator().manual_seed(3)
    ctx = [torch.randn(7, 64, generator=gen)]
    neg = [torch.randn(3, 64, generator=gen)]
    cond = VideoConditioning(48, 32, 9)          # 3 x 2 x 3 = 18 tokens
    stats = {}
    with torch.no_grad():
        latent = generate(model, ctx, neg, cond, steps=8, guide_scale=4.0, shift=3.0, seed=5,
                          cache=CacheSettings("easycache", threshold=2.0, start=0.0),
                          stats=stats, **kwargs)
    return latent, stats


def moe_pair():
    from tests.dit_helpers import random_state_dict, tiny_config
    from wan_core import load_dit
    from wan_core.pipeline import MoEModel

    cfg = tiny_config("t2v")
    high = load_dit(random_state_dict(cfg, seed=11), num_heads=cfg.num_heads)
    low = load_dit(random_state_dict(cfg, seed=12), num_heads=cfg.num_heads)
    return MoEModel(high, low, 0.875, (4.0, 3.0))


# ------------------------------------------------------------------------------ scenarios

def ulysses_2(rank: int, out: Path) -> None:
    """Ulysses over 2 ranks: every model kind's forward (odd token count, per-token t, image
    tokens, VACE control, LoRA), then FSDP + Ulysses, then a cached CFG generation."""
    from wan_core import parallel

    ctx = parallel.init(ulysses_size=2, device="cpu")
    made = models()
    for model, _ in made.values():
        ctx.prepare_dit(model)
    result = {"forward": forward_all(made)}
    fsdp = dataclasses.replace(ctx, dit_fsdp=True)
    sharded = models(("t2v", "vace", "fp8_lora"))
    whole = {}
    for name, (model, _) in sharded.items():
        whole[name] = parallel.local_bytes(model)
        fsdp.prepare_dit(model)
    result["fsdp_forward"] = forward_all(sharded)
    result["fsdp_fp8_dtype"] = str(sharded["fp8_lora"][0].blocks[0].ffn[0].weight.to_local().dtype)
    result["fsdp_bytes"] = {name: (whole[name], parallel.local_bytes(model),
                                   max(parallel.local_bytes(b) for b in model.blocks) * 2)
                            for name, (model, _) in sharded.items()}
    model, _ = models(("t2v",))["t2v"]
    result["generation"] = tiny_generation(ctx.prepare_dit(model), parallel=ctx)
    torch.save(result, out / f"ulysses_2_rank{rank}.pt")


def _moe_generation(rank: int, out: Path, name: str, **layout) -> None:
    """A cached CFG generation of the expert pair under ``parallel.init(**layout)``."""
    from wan_core import parallel

    ctx = parallel.init(device="cpu", **layout)
    pair = moe_pair()
    for expert in pair.experts:
        ctx.prepare_dit(expert)
    torch.save({"generation": tiny_generation(pair, parallel=ctx)}, out / f"{name}_rank{rank}.pt")


def cfg_2(rank: int, out: Path) -> None:
    """CFG parallelism on 2 ranks with a Wan 2.2 expert pair."""
    _moe_generation(rank, out, "cfg_2", ulysses_size=1, cfg_parallel=True)


def ulysses_2_cfg_2_fsdp(rank: int, out: Path) -> None:
    """4 ranks: Ulysses 2 x CFG 2, DiT weights sharded over all 4."""
    _moe_generation(rank, out, "ulysses_2_cfg_2_fsdp", ulysses_size=2, cfg_parallel=True,
                    dit_fsdp=True)


def dead_rank(rank: int, out: Path) -> None:
    """Rank 1 dies in its third forward; rank 0 must stop with an error, not hang."""
    from wan_core import parallel

    ctx = parallel.init(ulysses_size=2, device="cpu", timeout_s=20)
    model, _ = models(("t2v",))["t2v"]
    ctx.prepare_dit(model)
    calls = [0]
    forward = model.forward

    def dying(*args, **kwargs):
        calls[0] += 1
        if rank == 1 and calls[0] == 3:
            os._exit(3)                           # a crashed process: no goodbye
        return forward(*args, **kwargs)

    model.forward = dying
    started = time.monotonic()
    try:
        tiny_generation(model, parallel=ctx)
        outcome = "finished"
    except Exception as e:                       # noqa: BLE001 - recorded for the test
        outcome = f"{type(e).__name__}: {str(e)[:300]}\n{traceback.format_exc()[-500:]}"
    torch.save({"outcome": outcome, "seconds": time.monotonic() - started},
               out / f"dead_rank_rank{rank}.pt")
    os._exit(0)          # skip destroy_process_group: the peer is gone


SCENARIOS = {"ulysses_2": ulysses_2, "cfg_2": cfg_2,
             "ulysses_2_cfg_2_fsdp": ulysses_2_cfg_2_fsdp, "dead_rank": dead_rank}
