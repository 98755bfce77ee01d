"""Command line: ``python -m wan_core <command>`` (also installed as ``wan-core``)."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wan_core",
        description="Wan 2.1 / 2.2 video generation from the command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate a video with the embedded tiny demo model")
    demo.add_argument("--prompt", default="a green square moving up on a black background",
                      help="what the video shows (the demo model knows simple shapes, colours "
                           "and directions)")
    demo.add_argument("--out", default="demo.mp4", help="output video file")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    from wan_core import demo

    return demo.run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return cmd_demo(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
