"""Forward+backward time of probloss' Gaussian log densities against torch.distributions.

(a) univariate: ``probloss.functional.normal.normal_log_prob(value, loc, log_scale=...)``
    against ``torch.distributions.Normal(loc, log_scale.exp()).log_prob`` and a hand-written
    log-space formula;
(b) bivariate with correlation: ``bivariate_normal_log_prob`` against
    ``torch.distributions.MultivariateNormal`` built from ``exp``/``tanh`` of raw outputs the
    way users do it (``covariance_matrix=``, torch's default argument validation and with
    ``validate_args=False``; and ``scale_tril=``), and against the probability-space
    Graves formula ``-log(pdf)``.

The inputs are well conditioned (``|rho| <= tanh(3)``, points within a few scales): torch's
``MultivariateNormal`` raises on covariance matrices that are singular in the working dtype
and the probability-space formula returns inf/NaN at extreme inputs (see the tests), so
they are timed only where they work. Every time is the median of interleaved repeats of
``fn(...).sum().backward()`` with gradients for every parameter; "ratio" is the time over
probloss' time. "saved MB" is the memory autograd keeps for the backward pass (the bytes
of the distinct storages packed by ``saved_tensors_hooks``).
Run: ``python benchmarks/bench_gaussian.py [--n 1000000] [--repeats 15] [--threads 1]``
(on a shared machine, one thread gives the steadiest ratios).
"""

from __future__ import annotations

import argparse
import importlib
import math

import torch
from _timing import median_times
from torch.distributions import MultivariateNormal, Normal

from probloss.audit.naive import naive_bivariate_normal_nll
from probloss.functional.bivariate import bivariate_normal_log_prob

_LOG_2PI = math.log(2.0 * math.pi)


def _normal_log_prob_or_none():
    """probloss' univariate normal log density, or None while it does not exist yet."""
    try:
        return importlib.import_module("probloss.functional.normal").normal_log_prob
    except (ImportError, AttributeError):
        return None


# --- univariate ------------------------------------------------------------------------


def uni_torch(x, mu, ls):
    return Normal(mu, ls.exp()).log_prob(x)


def uni_hand(x, mu, ls):
    return -0.5 * ((x - mu) * torch.exp(-ls)).square() - ls - 0.5 * _LOG_2PI


# --- bivariate -------------------------------------------------------------------------


def bi_ours(x, mu, ls, a):
    return bivariate_normal_log_prob(x, mu, ls, a)


def _covariance(ls, a):
    sx, sy = ls.exp().unbind(-1)
    rho = torch.tanh(a)
    off = rho * sx * sy
    return torch.stack((sx * sx, off, off, sy * sy), -1).unflatten(-1, (2, 2))


def bi_torch_cov(x, mu, ls, a):
    return MultivariateNormal(mu, covariance_matrix=_covariance(ls, a)).log_prob(x)


def bi_torch_cov_novalidate(x, mu, ls, a):
    cov = _covariance(ls, a)
    return MultivariateNormal(mu, covariance_matrix=cov, validate_args=False).log_prob(x)


def bi_torch_tril(x, mu, ls, a):
    sx, sy = ls.exp().unbind(-1)
    rho = torch.tanh(a)
    zero = torch.zeros_like(sx)
    tril = torch.stack((sx, zero, rho * sy, sy * torch.sqrt(1 - rho**2)), -1).unflatten(-1, (2, 2))
    return MultivariateNormal(mu, scale_tril=tril).log_prob(x)


def bi_graves(x, mu, ls, a):
    """Graves (2013) eqs. 24-25 as usually written: the pdf, then log outside."""
    return -naive_bivariate_normal_nll(x, mu, ls, a)


# --- timing ----------------------------------------------------------------------------


def saved_megabytes(fn, inputs: tuple[torch.Tensor, ...]) -> float:
    """Megabytes of the distinct storages autograd saves for the backward pass of ``fn``."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    value, *params = inputs
    leaves = [p.detach().requires_grad_(True) for p in params]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(value, *leaves).sum()
    out.backward()
    return sum(storages.values()) / 2**20


def report(title: str, rows: list[tuple[str, object]], inputs, repeats: int) -> None:
    """Time the available rows (callables) interleaved; the first row is the reference."""
    print(f"\n{title}")
    print(f"{'method':<46}{'ms':>10}{'ratio':>8}{'saved MB':>10}")
    available = [(name, fn) for name, fn in rows if fn is not None]
    times = median_times([fn for _, fn in available], inputs, repeats, grad_from=1)
    timed = dict(zip((name for name, _ in available), times, strict=True))
    reference = timed.get(rows[0][0])
    for name, fn in rows:
        if fn is None:
            print(f"{name:<46}{'not available':>18}")
            continue
        t = timed[name]
        ratio = f"{t / reference:>8.2f}" if reference else f"{'-':>8}"
        print(f"{name:<46}{1e3 * t:>10.2f}{ratio}{saved_megabytes(fn, inputs):>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of events")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, n = {args.n} events")
    normal_log_prob = _normal_log_prob_or_none()
    for dtype in (torch.float32, torch.float64):
        name = str(dtype).removeprefix("torch.")
        n = args.n
        mu, ls = torch.randn(n, dtype=dtype), 0.5 * torch.randn(n, dtype=dtype)
        x = mu + ls.exp() * torch.randn(n, dtype=dtype)
        ours_uni = None
        if normal_log_prob is not None:

            def ours_uni(x, mu, ls):
                return normal_log_prob(x, mu, log_scale=ls)

        report(
            f"(a) univariate normal log_prob, {name}",
            [
                ("probloss normal_log_prob", ours_uni),
                ("torch Normal(loc, log_scale.exp())", uni_torch),
                ("hand-written log-space formula", uni_hand),
            ],
            (x, mu, ls),
            args.repeats,
        )

        mu2 = torch.randn(n, 2, dtype=dtype)
        ls2 = torch.rand(n, 2, dtype=dtype) * 2.0 - 1.0  # scales in [e^-1, e]
        a = (torch.rand(n, dtype=dtype) * 6.0 - 3.0).requires_grad_(False)  # |rho| <= 0.995
        x2 = MultivariateNormal(torch.zeros(2, dtype=dtype), _covariance(ls2, a)).sample() + mu2
        report(
            f"(b) bivariate normal log_prob with correlation, {name}",
            [
                ("probloss bivariate_normal_log_prob", bi_ours),
                ("torch MVN(covariance_matrix=) default checks", bi_torch_cov),
                ("torch MVN(covariance_matrix=, validate_args=F)", bi_torch_cov_novalidate),
                ("torch MVN(scale_tril=)", bi_torch_tril),
                ("Graves pdf then log (probability space)", bi_graves),
            ],
            (x2, mu2, ls2, a),
            args.repeats,
        )


if __name__ == "__main__":
    main()
