"""Long demo videos through context windows: motion across windows and window-edge jumps
(issue 28).

    python -m benchmarks.demo_long                       # 8 held-out prompts, 65 frames
    python -m benchmarks.demo_long --count 4 --settings 17/8/static/linear 17/12/static/linear
    python -m benchmarks.demo_long --extend 1 5 9 --count 4  # extension seams instead
    python -m benchmarks.demo_long --extend 5 9 --extend-model vace  # ... through the VACE model
    python -m benchmarks.demo_long --v2v 0.1 0.3 0.5 0.7     # video-to-video fidelity instead

Each setting (``frames/overlap/schedule/blend``, or ``none`` for one pass) samples a
``--frames``-frame demo T2V video per held-out prompt (20 steps, seed 0) and prints, averaged
over prompts: the object's centroid movement along the prompted direction summed forward and
backward (pixels), the forward share (worst prompt in brackets) and the window-edge ratio: the
largest frame-to-frame change at a pixel frame where a window starts or ends, divided by the
median change elsewhere (``wan_core.extend.seam_ratios``; the median of its worst prompt in
brackets), and the largest single frame-to-frame step backward over all prompts (a
visible jump back, where the sums also count sub-pixel jitter of the centroid). Goal (issue
28): no backward movement, window edges <= 1.5x. Two more columns say
where the trouble is: the backward movement within 2 frames of a window edge, and a control
for the edge ratio: the same ratio at the latent starts (pixel frames 4 i - 3, i >= 2) that are
not window edges in the same videos, which shows how large the frame change gets where no two
windows meet.

``--extend OVERLAP ...``: extension instead of windows. Per held-out prompt a 17-frame demo
I2V clip from the prompt's rendered first frame, then 3 segments of 17 frames from the demo I2V
(or, with ``--extend-model vace``, the demo VACE model: the clip's last frames as its control)
(``wan_core.extend.extend_video``, colour matching on); the seam ratio at each boundary
(``seam_ratios``) over all prompts: median, max and how many are <= 1.5x; and a control: the
same ratio at the latent starts (pixel frames 4 i - 3, i >= 2) of the first clip, a plain I2V
generation with no seam, which shows how large the frame change gets there without extension.

``--v2v DENOISE ...``: video-to-video instead. Per held-out prompt a 17-frame demo T2V clip
(seed 0) is VAE-encoded and restyled (seed 1) with its own prompt and with one attribute of the
prompt changed (the next shape, the opposite direction, the next object colour or background
that keeps the object visible); per prompt kind and
denoise, the PSNR of the result to the input clip, worst / mean over the prompts (denoise 0:
the VAE's round trip). Goal (issue 28): denoise 0.3 keeps >= 25 dB.
"""
from __future__ import annotations

import argparse
import time


def object_track(video):
    """Per frame, the centroid (x, y) of the pixels far from the clip's median colour:
    ``[T, 2]``, NaN where fewer than 5 pixels stand out. video [3, T, H, W] in [-1, 1]."""
    import torch

    background = video.flatten(1).median(dim=1).values[:, None, None, None]
    mask = ((video - background).abs().amax(dim=0) > 0.4).float()
    ys, xs = torch.meshgrid(torch.arange(video.shape[2]), torch.arange(video.shape[3]),
                            indexing="ij")
    area = mask.sum(dim=(1, 2))
    track = torch.stack([(mask * xs).sum(dim=(1, 2)), (mask * ys).sum(dim=(1, 2))], dim=1)
    return torch.where(area[:, None] > 4, track / area.clamp_min(1)[:, None], float("nan"))


def edge_frames(windows, frames: int) -> list:
    """Pixel frames where a window of ``windows`` (ContextWindows) starts or ends, inside a
    ``frames``-frame video: the first pixel frame of each window's first latent frame and of
    the latent frame after its last (latent frame i >= 1 starts at pixel frame 4 i - 3)."""
    latent = (frames - 1) // 4 + 1
    edges = set()
    for start, length in windows.windows(latent):
        for i in (start, start + length):
            if 0 < i < latent:
                edges.add(4 * i - 3)
    return sorted(edges)


def latent_starts(frames: int) -> list:
    """The first pixel frame (4 i - 3) of every latent frame but the first two in a
    ``frames``-frame video: where window edges fall, and where the causal VAE's 4-frame chunks
    meet whether or not a window edge is there (the control for the edge ratio). Latent 1 is
    left out: the change from the single first frame into it is large with or without
    windows."""
    return [4 * i - 3 for i in range(2, (frames - 1) // 4 + 1)]


def change_ratios(video, frames, median: float) -> list:
    """The frame-to-frame change into each pixel frame of ``frames`` (the change from the frame
    before), over ``median`` (``seam_ratios``' median change): the control columns."""
    from wan_core.extend import frame_changes

    changes = frame_changes(video)
    return [float(changes[f - 1]) / max(median, 1e-12) for f in frames]


def measure(setting: str, prompts, frames: int, steps: int) -> dict:
    import torch

    from wan_core.demo import DemoModels, generate_video
    from wan_core.demo.clips import DIRECTIONS
    from wan_core.extend import seam_ratios
    from wan_core.sampling import ContextWindows

    windows = None
    if setting != "none":
        f, o, schedule, blend = setting.split("/")
        windows = ContextWindows(int(f), int(o), schedule, blend)
    models = DemoModels()
    rows = []
    started = time.perf_counter()
    for prompt, direction in prompts:
        video = generate_video(models, prompt, frames=frames, seed=0, steps=steps,
                               context_windows=windows)
        dx, dy = DIRECTIONS[direction]
        track = object_track(video)
        along = track[:, 0] * dx + track[:, 1] * dy
        moves = torch.diff(along[~torch.isnan(along)])
        forward = float(moves.clamp_min(0).sum())
        backward = float((-moves).clamp_min(0).sum())
        edge = control = near_back = float("nan")
        if windows:
            edges = edge_frames(windows, frames)
            ratios, median = seam_ratios(video, edges)
            edge = max(ratios)
            others = [f for f in latent_starts(frames) if f not in edges]
            control = max(change_ratios(video, others, median), default=float("nan"))
            step = torch.diff(along)          # frame i -> i + 1, NaN where out of frame
            near = torch.tensor([min(abs(i + 1 - e) for e in edges) <= 2
                                 for i in range(len(step))])
            near_back = float((-step[near & ~torch.isnan(step)]).clamp_min(0).sum())
        jump_back = float((-moves).clamp_min(0).max()) if len(moves) else 0.0
        rows.append((forward, backward, forward / max(forward + backward, 1e-9), edge, control,
                     near_back, jump_back))
    n = len(rows)
    return {"setting": setting, "forward": sum(r[0] for r in rows) / n,
            "backward": sum(r[1] for r in rows) / n, "share": sum(r[2] for r in rows) / n,
            "worst_share": min(r[2] for r in rows), "edge": max(r[3] for r in rows),
            "edge_median": sorted(r[3] for r in rows)[n // 2],
            "control": max(r[4] for r in rows), "near_back": sum(r[5] for r in rows) / n,
            "jump_back": max(r[6] for r in rows),
            "seconds": time.perf_counter() - started}


def measure_extend(overlap: int, prompts, steps: int, segments: int = 3,
                   model: str = "i2v") -> dict:
    import torch

    from wan_core.demo import CFG, SHIFT, DemoModels, generate_video
    from wan_core.demo.clips import parse_caption, place, render
    from wan_core.extend import extend_video, seam_ratios

    models = DemoModels()
    ratios, controls = [], []
    started = time.perf_counter()
    for prompt, _ in prompts:
        first = torch.from_numpy(render(place(parse_caption(prompt), 0), 1))[0]
        clip = generate_video(models, prompt, "i2v", image=first.permute(2, 0, 1) * 2 - 1,
                              steps=steps, seed=0)
        context, negative = models.get("text_encoder").encode([prompt, ""])
        report = []
        out = extend_video(models.get(model), models.get("vae"), [context], [negative], clip,
                           segments=segments, frames=17, overlap=overlap, steps=steps,
                           guide_scale=CFG, shift=SHIFT, seed=1, report=report, tile=False)
        found, median = seam_ratios(out, [r.start for r in report])
        ratios += found
        controls += change_ratios(out, latent_starts(clip.shape[1]), median)
    ratios.sort()
    return {"overlap": overlap, "median": ratios[len(ratios) // 2], "max": ratios[-1],
            "within": sum(r <= 1.5 for r in ratios), "seams": len(ratios),
            "control": max(controls), "control_within": sum(c <= 1.5 for c in controls),
            "controls": len(controls), "seconds": time.perf_counter() - started}


RESTYLES = ("own", "shape", "direction", "object colour", "background colour")


def restyled(spec, kind: str):
    """The caption of ``spec`` (a held-out ``ClipSpec``) with the attribute ``kind`` names
    changed (``own``: as is): the opposite direction, or the next shape / object colour /
    background that keeps the object visible (``training.probes.changed``)."""
    import dataclasses

    from training.probes import changed

    if kind == "own":
        return spec.caption
    if kind == "direction":
        opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
        return dataclasses.replace(spec.combo, direction=opposite[spec.direction]).caption
    attribute = {"shape": "shape", "object colour": "colour",
                 "background colour": "background"}[kind]
    return changed(spec, attribute).caption


def measure_v2v(denoises, specs, steps: int) -> dict:
    """{(kind, denoise): [PSNR per prompt]}; kind ``"round trip"`` at denoise 0."""
    import torch

    from benchmarks.cache import psnr
    from wan_core.conditioning import VideoConditioning
    from wan_core.demo import CFG, NEGATIVE, SHIFT, SIZE, DemoModels, generate_video
    from wan_core.pipeline import generate

    models = DemoModels()
    vae, te, dit = models.get("vae"), models.get("text_encoder"), models.get("t2v")
    out: dict = {}
    for spec in specs:
        source = generate_video(models, spec.caption, steps=steps, seed=0)
        with torch.no_grad():
            z = vae.encode(source[None])
            out.setdefault(("round trip", 0.0), []).append(
                psnr(vae.decode(z, tile=False)[0], source))
        for kind in RESTYLES:
            context, negative = te.encode([restyled(spec, kind), NEGATIVE])
            for denoise in denoises:
                latent = generate(dit, [context], [negative],
                                  VideoConditioning(SIZE, SIZE, source.shape[1]), steps=steps,
                                  guide_scale=CFG, shift=SHIFT, seed=1, denoise=denoise,
                                  init_latent=z)
                with torch.no_grad():
                    out.setdefault((kind, denoise), []).append(
                        psnr(vae.decode(latent, tile=False)[0], source))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--frames", type=int, default=65)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--settings", nargs="+", default=["17/8/static/linear"])
    parser.add_argument("--extend", type=int, nargs="+", default=None, metavar="OVERLAP")
    parser.add_argument("--extend-model", choices=("i2v", "vace"), default="i2v",
                        help="the demo model that extends the I2V clip (default i2v)")
    parser.add_argument("--v2v", type=float, nargs="+", default=None, metavar="DENOISE")
    args = parser.parse_args(argv)

    from training.evaluate import heldout_specs

    if args.v2v:
        started = time.perf_counter()
        found = measure_v2v(args.v2v, heldout_specs(args.count), args.steps)
        trip = found[("round trip", 0.0)]
        print(f"demo T2V video-to-video: {args.count} held-out 17-frame clips, {args.steps} "
              f"steps; PSNR to the input, worst / mean; denoise 0 (the VAE round trip): "
              f"{min(trip):.1f} / {sum(trip) / len(trip):.1f} dB")
        print("| prompt at sampling | " + " | ".join(f"{d:g}" for d in args.v2v) + " |")
        print("|---" * (len(args.v2v) + 1) + "|")
        for kind in RESTYLES:
            cells = [found[(kind, d)] for d in args.v2v]
            print(f"| {kind} | " + " | ".join(f"{min(c):.1f} / {sum(c) / len(c):.1f}"
                                              for c in cells) + " |")
        print(f"{time.perf_counter() - started:.0f} s")
        return

    prompts = [(s.caption, s.direction) for s in heldout_specs(args.count)]
    if args.extend:
        print(f"demo extension through the {args.extend_model} model: {len(prompts)} held-out "
              f"prompts, 17-frame I2V clip + 3 x 17-frame segments, {args.steps} steps")
        print("| overlap | seam ratio: median | max | seams <= 1.5x | control: largest at the "
              "first clip's latent starts (<= 1.5x) | seconds |")
        print("|---|---|---|---|---|---|")
        for overlap in args.extend:
            r = measure_extend(overlap, prompts, args.steps, model=args.extend_model)
            print(f"| {overlap} | {r['median']:.2f} | {r['max']:.2f} | {r['within']} of "
                  f"{r['seams']} | {r['control']:.2f} ({r['control_within']} of {r['controls']}) "
                  f"| {r['seconds']:.0f} |", flush=True)
        return
    print(f"{args.frames}-frame demo T2V, {len(prompts)} held-out prompts, {args.steps} steps")
    print("| windows (frames/overlap/schedule/blend) | forward px | backward px (within 2 frames "
          "of an edge) | largest step back px | forward share (worst) | largest edge / median (median prompt) | control: "
          "largest at other latent starts | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in args.settings:
        r = measure(setting, prompts, args.frames, args.steps)
        print(f"| {r['setting']} | {r['forward']:.0f} | {r['backward']:.0f} ({r['near_back']:.0f}) "
              f"| {r['jump_back']:.1f} | {r['share']:.2f} ({r['worst_share']:.2f}) | {r['edge']:.2f} "
              f"({r['edge_median']:.2f}) | {r['control']:.2f} | {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
