"""Command line: ``probloss demo [NAME]`` and ``probloss audit TARGET ...``."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .audit import command as audit_command

DEMOS = {
    "mdn": "mixture density networks against MSE regression on Bishop's inverse problem and "
    "a spiral, with figures (user story 2; the default)",
    "cb": "continuous-Bernoulli mean without NaN, and torch's continuous Bernoulli at large "
    "logits (user story 4)",
    "vae": "a VAE on the bundled 8x8 digits trained with seven KL strategies: table (ELBO in "
    "nats, bits/dim, KL, active units) and figures (user story 3)",
    "nan": "a naive bivariate loss goes NaN and the NaN guard names the cause; probloss's "
    "loss trains through (user stories 1 and 4)",
}
DEFAULT_DEMO = "mdn"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


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
    demo.add_argument(
        "name", nargs="?", default=DEFAULT_DEMO, choices=sorted(DEMOS), help="default: mdn"
    )
    demo.add_argument("--quick", action="store_true", help="short form, a few seconds (CI)")
    demo.add_argument(
        "--out",
        default="probloss-demo",
        metavar="DIR",
        help="directory for the figures (mdn, vae, nan; default: ./probloss-demo)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (mdn, vae, nan; default: 0)")
    demo.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="training length per model: full-batch steps (mdn; default 2000, 400 with --quick) "
        "or epochs (vae; see probloss demo vae --help)",
    )
    audit_command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        if args.name == "cb":
            from .demos import continuous_bernoulli

            return continuous_bernoulli.run()
        if args.name == "nan":
            from .demos import nan

            return nan.run(quick=args.quick, out=args.out, seed=args.seed)
        if args.name == "vae":
            from .demos import vae

            return vae.run(quick=args.quick, out=args.out, seed=args.seed, epochs=args.epochs)
        from .demos import mdn

        return mdn.run(quick=args.quick, out=args.out, seed=args.seed, epochs=args.epochs)
    if args.command == "audit":
        return audit_command.run(args)
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
