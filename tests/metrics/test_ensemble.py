"""``probloss.metrics.crps_ensemble`` against the published pairwise formulas.

References: scoringrules' ``crps_ensemble`` (estimators ``"fair"`` and ``"nrg"``) and
properscoring's ``crps_ensemble`` define the score by the ``O(M^2)`` pairwise sums
``mean|x_i - y| - sum_ij |x_i - x_j| / (2 M (M - 1))`` (fair) or ``/ (2 M^2)`` (the
empirical distribution's CRPS); evaluated here in mpmath at 50 digits. Bound: ``16 eps T``,
``T = mean|x_i - y| + sum_ij |x_i - x_j| / (2 M (M - kappa))`` (the pairwise form's two
non-negative parts: the library's sum of non-negative gap terms is within a few eps of the
score itself, a tighter claim that ``T`` bounds).
"""

from __future__ import annotations

import math

import pytest
import torch
from mpmath import mp
from torch.autograd import gradcheck, gradgradcheck

from probloss.metrics import crps_ensemble, crps_normal


def _pairwise(y: float, xs: list[float], fair: bool):
    """``(score, T)`` by the published pairwise formula, in mpmath."""
    with mp.workdps(50):
        m = len(xs)
        near = mp.fsum(abs(mp.mpf(x) - y) for x in xs) / m
        pairs = mp.fsum(abs(mp.mpf(a) - mp.mpf(b)) for a in xs for b in xs)
        spread = pairs / (2 * m * (m - 1 if fair else m))
        return near - spread, near + spread


@pytest.mark.parametrize("fair", [True, False], ids=["fair", "plain"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_matches_the_pairwise_formula(dtype, fair):
    """Random ensembles (M = 2, 7, 50), far targets, and draws of ``1e30 + O(1)`` (float64)
    or ``1e4 + O(1)`` (the others), within ``16 eps T`` of the mpmath pairwise sum; half
    inputs give float32."""
    g = torch.Generator().manual_seed(11)
    offset = 1e30 if dtype == torch.float64 else 1e4 if dtype != torch.float16 else 1e3
    for m in (2, 7, 50):
        xs = torch.randn(m, 6, generator=g, dtype=torch.float64) * 3
        xs[:, 5] += offset
        y = torch.tensor([0.0, 0.5, -40.0, 1e6 if dtype != torch.float16 else 6e4, 2.0, offset])
        xs, y = xs.to(dtype), y.to(dtype)
        got = crps_ensemble(y, xs, fair=fair)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        for j in range(6):
            want, t = _pairwise(float(y[j]), [float(v) for v in xs[:, j]], fair)
            assert abs(float(got[j]) - float(want)) <= 16 * eps * float(t), (m, j, float(got[j]))


def test_fair_estimator_is_unbiased():
    """The mean of the fair score over 4000 ensembles of M = 5 normal draws is the normal
    CRPS (closed form) within 5 standard errors; the plain one is biased above it by the
    ``E|X - X'| / (2M)`` its divisor leaves out (``sigma / (M sqrt(pi))``)."""
    g = torch.Generator().manual_seed(12)
    n, m = 4000, 5
    y = torch.full((n,), 0.7, dtype=torch.float64)
    draws = torch.randn(m, n, generator=g, dtype=torch.float64)
    exact = float(crps_normal(torch.tensor(0.7, dtype=torch.float64), 0.0, 0.0))
    fair = crps_ensemble(y, draws)
    assert abs(float(fair.mean()) - exact) <= 5 * float(fair.std()) / math.sqrt(n)
    plain = crps_ensemble(y, draws, fair=False)
    bias = 1.0 / (m * math.sqrt(math.pi))  # E|X - X'| / (2 M) for unit normal draws
    assert abs(float(plain.mean()) - (exact + bias)) <= 5 * float(plain.std()) / math.sqrt(n)


def test_gradients():
    """Finite differences (first and second order) in float64, off ties; ``d/dvalue`` is the
    fraction of draws below minus the fraction above."""
    g = torch.Generator().manual_seed(13)
    y = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    xs = torch.randn(6, 3, generator=g, dtype=torch.float64).requires_grad_()
    assert gradcheck(crps_ensemble, (y, xs))
    assert gradgradcheck(crps_ensemble, (y, xs))
    (d_value,) = torch.autograd.grad(crps_ensemble(y, xs).sum(), y)
    want = ((xs < y).double().mean(0) - (xs > y).double().mean(0)).detach()
    torch.testing.assert_close(d_value, want, rtol=0, atol=1e-15)


def test_shapes_and_errors():
    """``samples`` broadcast against ``value`` after the sample dimension; one draw is refused
    by the fair estimator, nothing but a bool is a ``fair``."""
    out = crps_ensemble(torch.zeros(4, 3), torch.randn(10, 3))  # one ensemble per column
    assert out.shape == (4, 3)
    assert crps_ensemble(torch.tensor(1.0), torch.tensor([1.0]), fair=False) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        crps_ensemble(torch.tensor(1.0), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="do not broadcast"):
        crps_ensemble(torch.zeros(4), torch.zeros(10, 3))
    with pytest.raises(ValueError, match="fair"):
        crps_ensemble(torch.zeros(4), torch.zeros(10, 4), fair=1)
