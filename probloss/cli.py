"""Command line: ``probloss demo [NAME] [OPTIONS]`` and ``probloss audit TARGET ...``.

Each demo is a subcommand of ``probloss demo`` with its own options and ``--help``;
``probloss demo`` alone (or followed by options only) runs the default, ``mdn``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from . import __version__
from .audit import command as audit_command


@dataclass(frozen=True)
class DemoSpec:
    """One demo's entry in ``probloss demo --help`` and its own ``--help``."""

    summary: str  # one line, in the list of demos
    description: str  # its --help
    figures: bool = True  # takes --out and --seed
    epochs: str | None = None  # help of --epochs, if the demo takes it


DEMOS = {
    "mdn": DemoSpec(
        "mixture density networks against MSE regression on Bishop's inverse problem and a "
        "spiral (user story 2; the default)",
        "Fit an MLP with a MixtureDensityHead and the same MLP with MSE on three built-in "
        "tasks (Bishop's forward and inverse problems, a spiral); print test NLL, coverage "
        "and size of the 90% regions; write four figures.",
        epochs="full-batch Adam steps per model (default 2000, 400 with --quick)",
    ),
    "cb": DemoSpec(
        "continuous-Bernoulli mean without NaN, and torch's continuous Bernoulli at large "
        "logits (user story 4)",
        "Print the value and gradient of the naive continuous-Bernoulli mean, its where() "
        "patch and probloss.special.cb_mean; then torch's ContinuousBernoulli against "
        "probloss's in float32 at large logits. Prints tables only (no figures).",
        figures=False,
    ),
    "vae": DemoSpec(
        "a VAE on the bundled 8x8 digits with seven KL strategies: ELBO table and figures "
        "(user story 3)",
        "Train one VAE on scikit-learn's bundled 8x8 digits per KL strategy (ELBO, "
        "Bernoulli ELBO, beta-VAE, sigmoid and cyclical annealing, free bits, GECO, "
        "sigma-VAE); print -ELBO in nats and bits/dim, KL and active units; write four "
        "figures.",
        epochs="passes over the training set per strategy, 11 Adam steps each (default 300, "
        "15 with --quick)",
    ),
    "nan": DemoSpec(
        "a naive bivariate loss goes NaN and the NaN guard names the cause; probloss's loss "
        "trains through (user stories 1 and 4)",
        "Train a small trajectory model under NaNGuard twice: with the naive "
        "probability-space bivariate loss (the guard stops it and names the loss term, "
        "rows and cause) and with probloss's bivariate_normal_nll (it trains through); "
        "write the loss curves.",
    ),
}
DEFAULT_DEMO = "mdn"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_demo(commands, name: str, spec: DemoSpec) -> None:
    """The subparser of one demo, with ``--quick`` and the options the demo takes."""
    parser = commands.add_parser(
        name, help=spec.summary, description=spec.description, prog=f"probloss demo {name}"
    )
    quick = "short form, under a minute (CI)" if spec.figures else "accepted; the demo is instant"
    parser.add_argument("--quick", action="store_true", help=quick)
    if spec.figures:
        parser.add_argument(
            "--out",
            default="probloss-demo",
            metavar="DIR",
            help="directory for the figures, created if missing (default: ./probloss-demo)",
        )
        parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    if spec.epochs is not None:
        parser.add_argument("--epochs", type=_positive_int, default=None, help=spec.epochs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="probloss", description="Probabilistic losses for PyTorch that do not break."
    )
    parser.add_argument("--version", action="version", version=f"probloss {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run a user story (docs/user_stories.md) on built-in data",
        description="Run a user story (numbered as in docs/user_stories.md) on built-in "
        "data: probloss demo NAME [OPTIONS]; "
        f"without NAME, the {DEFAULT_DEMO} demo. Each demo has its own options: "
        "probloss demo NAME --help.",
    )
    demos = demo.add_subparsers(dest="name", metavar="NAME", title="demos")
    for name, spec in DEMOS.items():
        _add_demo(demos, name, spec)
    audit_command.add_parser(commands)
    return parser


def _with_default_demo(argv: list[str]) -> list[str]:
    """``demo`` followed by no demo name (nothing, or options only) runs the default demo:
    ``["demo", "--quick"]`` -> ``["demo", "mdn", "--quick"]``; ``demo --help`` is kept."""
    if not argv or argv[0] != "demo":
        return argv
    rest = argv[1:]
    if rest and (rest[0] in DEMOS or rest[0] in ("-h", "--help") or not rest[0].startswith("-")):
        return argv  # a name (known or not: argparse reports an unknown one), or the help
    return ["demo", DEFAULT_DEMO, *rest]


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line ``argv`` (without the program name), the default demo filled in."""
    return build_parser().parse_args(_with_default_demo(list(argv)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "demo":
        return _run_demo(args)
    if args.command == "audit":
        return audit_command.run(args)
    return 2  # unreachable: argparse requires a command


def _run_demo(args: argparse.Namespace) -> int:
    """Import the demo named in ``args`` (only that one) and run it; its exit status."""
    if args.name == "cb":
        from .demos import continuous_bernoulli

        return continuous_bernoulli.run(quick=args.quick)
    if args.name == "nan":
        from .demos import nan

        return nan.run(quick=args.quick, out=args.out, seed=args.seed)
    if args.name == "vae":
        from .demos import vae

        return vae.run(quick=args.quick, out=args.out, seed=args.seed, epochs=args.epochs)
    from .demos import mdn

    return mdn.run(quick=args.quick, out=args.out, seed=args.seed, epochs=args.epochs)


if __name__ == "__main__":
    sys.exit(main())
