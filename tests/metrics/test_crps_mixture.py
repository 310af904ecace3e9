"""``probloss.metrics.crps_normal_mixture`` against the definition, integrated numerically.

The reference is ``int (F(x) - 1{x >= y})^2 dx`` with ``F(x) = sum_k w_k Phi((x - mu_k) /
sigma_k)``, integrated by mpmath (tanh-sinh, 30 digits, split at every mean, a few scales
either side of it, and the target). ``T`` (the sum of the closed form's two non-negative
parts) comes from the fuzz oracle (``tests/fuzz/oracle.py``). Bound: ``32 eps T`` (the
closed form adds ``K + K^2`` terms, each within a few ulps of itself, by pairwise sums).
"""

from __future__ import annotations

import math

import pytest
import torch
from mpmath import mp
from torch.autograd import gradcheck, gradgradcheck

from probloss.metrics import crps_normal, crps_normal_mixture
from tests.fuzz import oracle


def _integral(y: float, w: list, mus: list, sigmas: list):
    with mp.workdps(30):

        def cdf(x):
            return mp.fsum(
                wk * mp.ncdf((x - m) / s) for wk, m, s in zip(w, mus, sigmas, strict=True)
            )

        cuts = {mp.mpf(y)}
        for m, s in zip(mus, sigmas, strict=True):
            cuts |= {m + c * s for c in (-30, -5, -1, 0, 1, 5, 30)}
        cuts = sorted(cuts)
        below = [-mp.inf, *(c for c in cuts if c < y), mp.mpf(y)]
        above = [mp.mpf(y), *(c for c in cuts if c > y), mp.inf]
        return mp.quad(lambda x: cdf(x) ** 2, below) + mp.quad(lambda x: (1 - cdf(x)) ** 2, above)


CASES = {
    # name: (targets, logits, means, log-scales), one dimension
    "overlapping": ([0.0, 0.7, -2.0], [0.0, 0.5, -1.0], [-1.0, 0.5, 2.0], [0.0, -0.5, 0.3]),
    "separated": ([0.0, 10.0, 55.0], [0.0, 0.0, 1.0], [-10.0, 10.0, 50.0], [-3.0, -2.0, -4.0]),
    "far_target": ([1e4, -3e3], [0.2, -0.3, 0.0], [0.0, 1.0, -1.0], [0.0, 0.5, -0.5]),
    "tiny_weight_far": ([0.0], [0.0, -60.0], [0.0, 1e20], [0.0, 0.0]),
    "scales_1e-3_1e3": ([0.5, 40.0], [0.0, 0.0, 0.0], [0.0, 0.1, -3.0], [-6.9, 0.0, 6.9]),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_the_integral_of_the_definition(case):
    """float64 against the integrated definition within ``32 eps T``; the fuzz oracle's
    closed form agrees with the integral to 1e-20 relative of ``T``."""
    ys, logits, mus, log_scales = CASES[case]
    logits_t = torch.tensor(logits, dtype=torch.float64)
    loc = torch.tensor(mus, dtype=torch.float64)[:, None]
    log_scale = torch.tensor(log_scales, dtype=torch.float64)[:, None]
    got = crps_normal_mixture(
        torch.tensor(ys, dtype=torch.float64)[:, None], logits_t, loc, log_scale
    )
    with mp.workdps(40):
        lse = mp.log(mp.fsum(mp.exp(mp.mpf(v)) for v in logits))
        w = [mp.exp(mp.mpf(v) - lse) for v in logits]
        sigmas = [mp.exp(mp.mpf(s)) for s in log_scales]
        for i, y in enumerate(ys):
            want = _integral(y, w, [mp.mpf(m) for m in mus], sigmas)
            closed, t = oracle.crps_normal_mixture([y], logits, mus, log_scales)[0]
            assert abs(closed - want) <= 1e-20 * t, (case, y)
            bound = 32 * torch.finfo(torch.float64).eps * float(t)
            assert abs(float(got[i]) - float(want)) <= bound, (case, y, float(got[i]))


def test_one_component_is_the_normal_crps_and_dimensions_add():
    """``K = 1`` is :func:`crps_normal` (float64, 8 eps relative); for ``D = 3`` the score is
    the sum of the three coordinates' scores (4 eps relative)."""
    g = torch.Generator().manual_seed(5)
    y, loc, ls = (torch.randn(16, 3, generator=g, dtype=torch.float64) for _ in range(3))
    one = crps_normal_mixture(y, torch.zeros(16, 1, dtype=torch.float64), loc[:, None], ls[:, None])
    torch.testing.assert_close(one, crps_normal(y, loc, ls).sum(-1), rtol=8e-16 * 3, atol=0)
    logits = torch.randn(16, 4, generator=g, dtype=torch.float64)
    locs, scales = (torch.randn(16, 4, 3, generator=g, dtype=torch.float64) for _ in range(2))
    joint = crps_normal_mixture(y, logits, locs, scales)
    per_dim = sum(
        crps_normal_mixture(y[:, d : d + 1], logits, locs[..., d : d + 1], scales[..., d : d + 1])
        for d in range(3)
    )
    torch.testing.assert_close(joint, per_dim, rtol=4 * 2.2e-16, atol=0)


def test_gradcheck_and_gradgradcheck():
    """Finite differences, first and second derivatives, every argument (float64)."""
    g = torch.Generator().manual_seed(9)
    args = (
        torch.randn(4, 2, generator=g, dtype=torch.float64),
        torch.randn(4, 3, generator=g, dtype=torch.float64),
        torch.randn(4, 3, 2, generator=g, dtype=torch.float64),
        0.3 * torch.randn(4, 3, 2, generator=g, dtype=torch.float64),
    )
    args = tuple(t.requires_grad_() for t in args)
    assert gradcheck(crps_normal_mixture, args)
    assert gradgradcheck(crps_normal_mixture, args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_extremes_in_low_precision(dtype):
    """A target 1e4 scales out, a component of weight ``e^{-60}`` 1e20 away (its
    contribution ``e^{-60} 1e20 = 8.8e-7`` is kept, float32 result) and log-scales of
    +-8: finite values and gradients, within ``32 eps32 T`` of the oracle at the rounded
    inputs (half inputs are computed in float32)."""
    y = torch.tensor([[1e4], [0.0], [0.5]], dtype=dtype, requires_grad=True)
    logits = torch.tensor([[0.0, 0.0], [0.0, -60.0], [0.0, 1.0]], dtype=dtype, requires_grad=True)
    far = 1e20 if dtype != torch.float16 else 6e4
    loc = torch.tensor(
        [[[0.0], [1.0]], [[0.0], [far]], [[0.0], [0.3]]], dtype=dtype, requires_grad=True
    )
    log_scale = torch.tensor(
        [[[0.0], [0.0]], [[0.0], [0.0]], [[-8.0], [8.0]]], dtype=dtype, requires_grad=True
    )
    out = crps_normal_mixture(y, logits, loc, log_scale)
    assert out.dtype == torch.float32
    out.sum().backward()
    for t in (y, logits, loc, log_scale):
        assert torch.isfinite(t.grad).all()
    for i in range(3):
        row = [t[i].detach().double().reshape(-1).tolist() for t in (y, logits, loc, log_scale)]
        want, t = oracle.crps_normal_mixture(*row)[0]
        bound = 32 * torch.finfo(torch.float32).eps * float(t)
        assert abs(float(out[i]) - float(want)) <= bound, (i, float(out[i]), float(want))
    assert not math.isnan(float(out.sum()))
