"""Wall time of the stability audit (``probloss.audit``) and of the ``probloss audit`` CLI.

1. ``audit(fn)`` of two-argument functions over the default grid in the four dtypes
   (float32, float16, bfloat16, float64): ``bernoulli_kl`` (probloss, hand-written
   backward) and ``x * y``; median of ``--repeats`` runs after one warm-up.
2. The CLI on each naive example of ``probloss/audit/naive.py`` and its stable twin, as a
   subprocess (Python start-up and ``import torch`` included), median of ``--cli-repeats``.

Run: ``python benchmarks/bench_audit.py [--repeats 5] [--cli-repeats 3]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch
from _timing import interleaved_medians, measure

from probloss.audit.naive import BIVARIATE_DOMAINS, MIXTURE_DOMAINS, domain_options
from probloss.audit.runner import audit
from probloss.functional import bernoulli_kl

BIVARIATE = domain_options(BIVARIATE_DOMAINS)
MIXTURE = domain_options(MIXTURE_DOMAINS)
CLI_CASES = [
    ("naive_cb_mean", []),
    ("stable_cb_mean", []),
    ("naive_bivariate_nll", BIVARIATE),
    ("stable_bivariate_nll", BIVARIATE),
    ("naive_mixture_nll", MIXTURE),
    ("stable_mixture_nll", MIXTURE),
]


def product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x * y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cli-repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'audit(fn), four dtypes':<34}{'points':>8}{'seconds':>10}")
    for name, fn in (("bernoulli_kl(logits_q, logits_p)", bernoulli_kl), ("x * y", product)):
        report = audit(fn)
        [timing] = interleaved_medians([lambda fn=fn: measure(lambda: audit(fn))], args.repeats)
        print(f"{name:<34}{sum(report.points.values()):>8}{timing.wall:>10.3f}")
    print()
    print(f"{'probloss audit probloss.audit.naive:...':<42}{'exit':>5}{'seconds':>10}")
    for name, extra in CLI_CASES:
        command = [sys.executable, "-m", "probloss", "audit", f"probloss.audit.naive:{name}"]
        codes: list[int] = []

        def cli(command=command, extra=extra, codes=codes) -> None:
            codes.append(subprocess.run([*command, *extra], capture_output=True).returncode)

        # no warm-up: each run is a fresh process, start-up included
        [timing] = interleaved_medians([lambda cli=cli: measure(cli)], args.cli_repeats, warmup=0)
        print(f"{name:<42}{codes[-1]:>5}{timing.wall:>10.2f}")


if __name__ == "__main__":
    main()
