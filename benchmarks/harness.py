"""Shared benchmark helper: time a callable and record its peak memory, in a fresh process.

Each candidate runs in its own spawned process so that one candidate's allocations (and the
process-wide peak RSS) never leak into another's figures:

    from benchmarks.harness import bench, print_table
    results = [bench("wan_core", setup_ours, cfg), bench("official", setup_official, cfg)]
    print_table("DiT forward, fp32", results, ours="wan_core")

``setup(*args)`` is a module-level function (it must be picklable) that builds the model and
inputs and returns a zero-argument callable; only that callable is timed (warm-up runs first,
then ``runs`` timed runs, median reported).

Memory: on CPU, ``peak_mb`` is the process's peak resident set size over its whole life
(weights included; VmHWM, so nothing is inherited from the parent) and ``call_peak_mb`` the peak RSS above the level just before the timed
calls, sampled every 2 ms; on CUDA both come from ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Result:
    name: str
    median_s: float
    times: list = field(default_factory=list)
    peak_mb: float = 0.0
    call_peak_mb: float = 0.0
    device: str = "cpu"
    error: str = ""
    cpu_median_s: float = 0.0   # median process CPU time per call (all threads; less noisy
                                # than wall time on a shared machine when threads=1)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    """This process's peak RSS (VmHWM). Unlike ``ru_maxrss``, which Linux carries over from
    the parent through fork and exec, VmHWM belongs to this process's own address space."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _RssSampler:
    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = _rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _measure(setup: Callable, args: tuple, runs: int, warmup: int, device: str,
             threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    call = setup(*args)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(warmup):
            call()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        base = _rss_mb()
        times, cpu_times = [], []
        with _RssSampler() as sampler:
            for _ in range(runs):
                t0, c0 = time.perf_counter(), time.process_time()
                call()
                sync()
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        call_peak = peak
    else:
        peak = _hwm_mb()
        call_peak = sampler.peak - base
    return dict(times=times, peak_mb=peak, call_peak_mb=call_peak, cpu_times=cpu_times)


def _child(queue, setup, args, runs, warmup, device, threads):
    try:
        queue.put(("ok", _measure(setup, args, runs, warmup, device, threads)))
    except Exception as e:  # report, do not hang the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def bench(name: str, setup: Callable[..., Callable[[], Any]], *args, runs: int = 3,
          warmup: int = 1, device: str = "cpu", threads: int | None = None,
          isolate: bool = True) -> Result:
    """Time ``setup(*args)()``; returns a Result (``error`` set if the candidate failed)."""
    if isolate:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(queue, setup, args, runs, warmup, device, threads))
        proc.start()
        status, payload = queue.get()
        proc.join()
    else:
        try:
            status, payload = "ok", _measure(setup, args, runs, warmup, device, threads)
        except Exception as e:
            status, payload = "error", f"{type(e).__name__}: {e}"
    if status != "ok":
        print(f"  {name}: failed: {payload}")
        return Result(name, float("nan"), device=device, error=payload)
    times = payload["times"]
    result = Result(name, statistics.median(times), times, payload["peak_mb"],
                    payload["call_peak_mb"], device,
                    cpu_median_s=statistics.median(payload.get("cpu_times") or [0.0]))
    print(f"  {name}: median {result.median_s:.4f} s over {len(times)} runs, "
          f"peak {result.peak_mb:.0f} MB (call +{result.call_peak_mb:.0f} MB)", flush=True)
    return result


def print_table(title: str, results: list[Result], ours: str = "wan_core",
                references: bool = True) -> None:
    """One table: time and memory of every candidate, with ratios against ``ours``; with
    ``references`` the other candidates are references and the fastest is compared."""
    base = next((r for r in results if r.name == ours), None)
    print(f"\n## {title}")
    print("| candidate | median s | time / ours | peak MB | call peak MB | peak / ours |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if r.error:
            print(f"| {r.name} | failed: {r.error[:60]} | | | | |")
            continue
        t_ratio = r.median_s / base.median_s if base and not base.error else float("nan")
        m_ratio = r.peak_mb / base.peak_mb if base and not base.error else float("nan")
        print(f"| {r.name} | {r.median_s:.4f} | {t_ratio:.2f}x | {r.peak_mb:.0f} | "
              f"{r.call_peak_mb:.0f} | {m_ratio:.2f}x |")
    refs = [r for r in results if r.name != ours and not r.error] if references else []
    if base and not base.error and refs:
        fastest = min(refs, key=lambda r: r.median_s)
        print(f"ours vs fastest reference ({fastest.name}): "
              f"{base.median_s / fastest.median_s:.2f}x time, "
              f"{base.peak_mb / fastest.peak_mb:.2f}x peak memory, "
              f"{base.call_peak_mb / max(fastest.call_peak_mb, 1e-9):.2f}x call peak")
