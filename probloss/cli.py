"""Command line: ``probloss demo [NAME]``."""

from __future__ import annotations

import argparse
import sys

from . import __version__

DEMOS = {
    "cb": "continuous-Bernoulli mean without NaN, and torch's continuous Bernoulli at large "
    "logits (user story 4)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="probloss", description="Probabilistic losses for PyTorch that do not break."
    )
    parser.add_argument("--version", action="version", version=f"probloss {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run a user story on built-in data",
        description="Run a user story on built-in data. Available: "
        + "; ".join(f"{k}: {v}" for k, v in DEMOS.items()),
    )
    demo.add_argument("name", nargs="?", default="cb", choices=sorted(DEMOS))
    demo.add_argument("--quick", action="store_true", help="short form (used by CI)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demos import continuous_bernoulli

        return continuous_bernoulli.run()
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
