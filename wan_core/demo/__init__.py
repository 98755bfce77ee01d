"""The embedded demo: a tiny trained Wan model that makes real videos on any CPU.

The weights are trained by the scripts in this folder (issue: "The embedded default"). Until
they are shipped, ``run`` says so and exits with status 1.
"""
from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"


def run(args) -> int:
    if not (WEIGHTS_DIR / "dit_t2v.safetensors").exists():
        print("wan_core demo: the embedded demo model is not shipped yet in this version "
              f"(expected its weights in {WEIGHTS_DIR}). Nothing was generated.")
        return 1
    raise NotImplementedError("demo pipeline")
