"""Forward+backward time of probloss.special.cb_mean against the naive formula.

The naive ``1/(1 - exp(-x)) - 1/x`` (and its ``where(|x| < 0.1, 0.5 + x/12, ...)`` patch) is
wrong: NaN/inf at and near 0 and NaN gradients. It is timed only as the speed floor.
Run: ``python benchmarks/bench_special.py [--n 1000000] [--repeats 15]``.
"""

from __future__ import annotations

import argparse

import torch
from _timing import median_times

from probloss.audit.naive import naive_cb_mean, naive_cb_mean_unpatched
from probloss.special import cb_log_partition, cb_mean, cb_variance


def naive_log_partition(x: torch.Tensor) -> torch.Tensor:
    return torch.log(torch.expm1(x) / x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, n = {args.n}")
    print(
        f"{'function':<22}{'dtype':<10}{'inputs':<14}{'probloss ms':>12}"
        f"{'naive ms':>10}{'ratio':>8}"
    )
    cases = [
        ("cb_mean", cb_mean, naive_cb_mean_unpatched),
        ("cb_mean (vs where)", cb_mean, naive_cb_mean),
        ("cb_log_partition", cb_log_partition, naive_log_partition),
        ("cb_variance", cb_variance, lambda x: 1 / x**2 - 1 / (4 * torch.sinh(x / 2) ** 2)),
    ]
    for dtype in (torch.float32, torch.float64):
        inputs = {
            "logits N(0,3)": 3.0 * torch.randn(args.n, dtype=dtype),
            "U(-50, 50)": 100.0 * torch.rand(args.n, dtype=dtype) - 50.0,
        }
        for label, x in inputs.items():
            for name, ours, naive in cases:
                t_ours, t_naive = median_times((ours, naive), (x,), args.repeats)
                print(
                    f"{name:<22}{str(dtype).removeprefix('torch.'):<10}{label:<14}"
                    f"{1e3 * t_ours:>12.2f}{1e3 * t_naive:>10.2f}{t_ours / t_naive:>8.2f}"
                )


if __name__ == "__main__":
    main()
