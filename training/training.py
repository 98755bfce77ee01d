"""What every demo training stage shares: run folders, resumable checkpoints, EMA, schedules.

A stage writes ``<out>/<stage>/ckpt.pt`` every ``save_every`` steps (written to a temporary file,
then renamed, so an interrupted save never leaves a broken checkpoint) and ``<out>/<stage>/
done.pt`` with its final weights. With ``resume=True`` a stage continues from ``ckpt.pt``; a
finished stage is skipped. Clip seeds are derived from the step number, so a resumed run sees
the clips an uninterrupted run would have seen.
"""
from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch

THREADS = 1   # measured: on a shared, oversubscribed 2-core box 1 thread is 3-8x faster than 2


def setup_threads(threads: int = THREADS) -> None:
    torch.set_num_threads(threads)


def atomic_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


class EMA:
    """Exponential moving average of a model's parameters, with the usual warm-up
    (decay ``min(decay, (1 + n) / (10 + n))``) so that short runs are not dominated by the
    initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.shadow, self.updates = state["decay"], state["shadow"], state["updates"]

    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of ``model`` carrying the averaged weights."""
        out = copy.deepcopy(model)
        out.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})
        return out


def cosine_lr(step: int, total: int, peak: float, warmup: int, final_ratio: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(stage_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               loss_fn: Callable[[int], tuple], steps: int, lr: Callable[[int], float], *,
               resume: bool, seed: int, save_every: int = 50, ema: Optional[EMA] = None,
               log_every: int = 10, extra_state: Optional[dict] = None) -> dict:
    """Run ``steps`` optimisation steps of ``loss_fn(step) -> (loss, logs dict)``.

    Resumes from ``stage_dir/ckpt.pt`` when ``resume`` is set. Returns the final state dict
    ``{"model": ..., "ema": ..., "step": ..., "seconds": ...}`` (also written to ``done.pt``).
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = stage_dir / "ckpt.pt", stage_dir / "log.txt"
    start, seconds = 0, 0.0
    torch.manual_seed(seed)
    if resume and ckpt_path.exists():
        state = load(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"])
        start, seconds = state["step"], state["seconds"]
        print(f"resuming {stage_dir.name} at step {start}", flush=True)

    def snapshot(step):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "rng": torch.get_rng_state(), "step": step, "seconds": seconds,
                **(extra_state or {})}

    model.train()
    running: dict = {}
    session_start = seconds
    tick = time.perf_counter()
    with open(log_path, "a") as log:
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = lr(step)
            loss, logs = loss_fn(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if ema is not None:
                ema.update(model)
            for k, v in {"loss": loss.item(), **logs}.items():
                running[k] = running.get(k, 0.0) + float(v)
            now = time.perf_counter()
            seconds += now - tick
            tick = now
            done = step + 1
            if done % log_every == 0 or done == steps:
                n = log_every if done % log_every == 0 else done % log_every
                text = " ".join(f"{k} {v / n:.5f}" for k, v in running.items())
                line = f"step {done}/{steps} {text} lr {lr(step):.2e} s/step {(seconds - session_start) / (done - start or 1):.2f} elapsed {seconds:.0f}s"
                print(line, flush=True)
                log.write(line + "\n")
                log.flush()
                running = {}
            if done % save_every == 0 and done < steps:
                atomic_save(snapshot(done), ckpt_path)
    final = snapshot(steps)
    atomic_save(final, ckpt_path)
    result = {"model": model.state_dict(), "ema": ema.shadow if ema is not None else None,
              "step": steps, "seconds": seconds, **(extra_state or {})}
    atomic_save(result, stage_dir / "done.pt")
    model.eval()
    return result


def finished(stage_dir: Path, steps: Optional[int] = None) -> Optional[dict]:
    """The stage's ``done.pt``; ``None`` when it is missing or, given ``steps``, when it ran
    fewer steps: ``--resume --steps N`` then continues a finished stage from its ``ckpt.pt``
    (the cosine schedule recomputed for the new length)."""
    path = Path(stage_dir) / "done.pt"
    if not path.exists():
        return None
    done = load(path)
    return done if steps is None or done["step"] >= steps else None


def finished_already(stage_dir: Path, steps: int, resume: bool) -> Optional[dict]:
    """With ``--resume``, the stage's ``done.pt`` when it ran ``steps`` already (announced);
    else ``None``: the stage (re)trains or continues."""
    done = finished(stage_dir, steps)
    if done is not None and resume:
        print(f"{Path(stage_dir).name}: finished already", flush=True)
        return done
    return None
