"""Forward+backward time of probloss's multivariate normal log densities against torch.

Compares, on the same inputs (a batch of ``B`` events, one factor per event as a network
head would predict):

* ``multivariate_normal_log_prob(value, loc, scale_tril)`` against
  ``torch.distributions.MultivariateNormal(loc, scale_tril=...).log_prob(value)``;
* ``lowrank_multivariate_normal_log_prob(value, loc, W, log_diag)`` against
  ``torch.distributions.LowRankMultivariateNormal(loc, W, exp(log_diag)).log_prob(value)``.

torch's distributions are constructed inside the timed region (a loss builds them every
step) with ``validate_args=False``; probloss is called with ``validate_args=False`` too, so
neither side pays for argument checks. Times are medians of interleaved runs.
Run: ``python benchmarks/bench_multivariate.py [--batch 65536] [--repeats 21] [--threads 1]``.
"""

from __future__ import annotations

import argparse

import torch
from _timing import median_times
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal

from probloss.functional.lowrank import lowrank_multivariate_normal_log_prob
from probloss.functional.multivariate import multivariate_normal_log_prob, scale_tril_from_raw


def ours_dense(value, loc, scale_tril):
    return multivariate_normal_log_prob(value, loc, scale_tril, validate_args=False)


def torch_dense(value, loc, scale_tril):
    return MultivariateNormal(loc, scale_tril=scale_tril, validate_args=False).log_prob(value)


def ours_lowrank(value, loc, cov_factor, log_diag):
    return lowrank_multivariate_normal_log_prob(
        value, loc, cov_factor, log_diag, validate_args=False
    )


def torch_lowrank(value, loc, cov_factor, log_diag):
    dist = LowRankMultivariateNormal(loc, cov_factor, log_diag.exp(), validate_args=False)
    return dist.log_prob(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: least noisy)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b = args.batch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B = {b}")
    print(f"{'case':<34}{'dtype':<9}{'probloss ms':>12}{'torch ms':>10}{'ratio':>8}")
    for dtype in (torch.float32, torch.float64):
        for dim in (2, 8):
            loc = torch.randn(b, dim, dtype=dtype)
            value = loc + torch.randn(b, dim, dtype=dtype)
            raw = 0.3 * torch.randn(b, dim * (dim + 1) // 2, dtype=dtype)
            scale_tril = scale_tril_from_raw(raw, dim)
            cases = [(f"dense D={dim}", ours_dense, torch_dense, (value, loc, scale_tril))]
            for rank in (1, 2) if dim == 2 else (2, 4):
                w = torch.randn(b, dim, rank, dtype=dtype)
                log_diag = torch.randn(b, dim, dtype=dtype)
                inputs = (value, loc, w, log_diag)
                cases.append((f"lowrank D={dim} R={rank}", ours_lowrank, torch_lowrank, inputs))
            for name, ours, theirs, inputs in cases:
                t_ours, t_torch = median_times((ours, theirs), inputs, args.repeats)
                print(
                    f"{name:<34}{str(dtype).removeprefix('torch.'):<9}"
                    f"{1e3 * t_ours:>12.2f}{1e3 * t_torch:>10.2f}{t_ours / t_torch:>8.2f}"
                )


if __name__ == "__main__":
    main()
