"""Tests of ``probloss.functional.laplace``: the Laplace log density (``log_scale``
positional, ``scale`` by keyword), against mpmath and scipy, and its validation.

References and bounds: see ``tests/functional/location_scale_reference.py``.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import scipy.stats
import torch

from probloss.functional import laplace_log_prob
from tests.functional._checks import FLOAT_DTYPES, assert_within, dtype_id
from tests.functional.location_scale_reference import (
    LOCS,
    LOG_SCALES,
    RTOL,
    cast,
    check,
    grad_rtol,
    laplace_ref,
    result_dtype,
)

LAPLACE_ZS = [0.0, *(s * m for m in (1e-8, 0.5, 1.0, 3.0, 1e3, 1e10, 1e30) for s in (1, -1))]


@functools.cache
def _laplace_grid(dtype: torch.dtype):
    triples = [
        (mu + z * math.exp(ls), mu, ls)
        for ls, z, mu in itertools.product(LOG_SCALES, LAPLACE_ZS, LOCS)
    ]
    cols = [cast([t[k] for t in triples], dtype) for k in range(3)]
    ok = torch.isfinite(cols[0])
    x, mu, ls = (c[ok].double().tolist() for c in cols)
    return sorted(set(zip(x, mu, ls, strict=True)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_laplace_matches_mpmath(dtype):
    """Value and gradients, |z| to 1e30 and log-scale +-80, against mpmath. At x == loc the
    derivative in value is the subgradient 0 (mpmath's sign(0) = 0)."""
    points = _laplace_grid(dtype)
    x, mu, ls = (cast([t[k] for t in points], dtype).requires_grad_() for k in range(3))
    out = laplace_log_prob(x, mu, ls)
    out_dtype = result_dtype(dtype)
    assert out.dtype == out_dtype
    out.sum().backward()
    ref = np.array([laplace_ref(*t) for t in points])
    rtol, g_rtol = RTOL[out_dtype], grad_rtol(dtype)
    check(out.detach().double(), ref[:, 0], ref[:, 1], rtol, out_dtype, points, "value")
    check(x.grad.double(), ref[:, 2], ref[:, 2], g_rtol, dtype, points, "d/dvalue")
    check(mu.grad.double(), -ref[:, 2], ref[:, 2], g_rtol, dtype, points, "d/dloc")
    check(ls.grad.double(), ref[:, 3], ref[:, 4], g_rtol, dtype, points, "d/dlog_scale")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_laplace_gradient_at_the_location_where_the_inverse_scale_overflows(dtype):
    """x == loc with exp(-log_scale) beyond the range (log_scale = -100 in float32, -800 in
    float64; found by ``probloss audit``): the density is exp(-log_scale) / 2, finite in log
    space, and the gradients are the subgradient 0 in value and loc and -1 in log_scale
    (d/ds of -s - log 2), not 0 * inf = NaN."""
    s = -100.0 if dtype == torch.float32 else -800.0
    x, mu, ls = (torch.tensor([v], dtype=dtype, requires_grad=True) for v in (3.0, 3.0, s))
    out = laplace_log_prob(x, mu, ls)
    out.sum().backward()
    assert out.item() == pytest.approx(-s - math.log(2.0), rel=1e-7)
    assert (x.grad.item(), mu.grad.item(), ls.grad.item()) == (0.0, 0.0, -1.0)


def test_laplace_against_scipy_and_gradcheck_float64():
    rng = np.random.default_rng(2)
    mu = rng.normal(size=300) * 5
    ls = rng.uniform(-7, 7, size=300)
    x = mu + np.exp(ls) * rng.laplace(size=300) * 10
    expected = scipy.stats.laplace.logpdf(x, mu, np.exp(ls))
    got = laplace_log_prob(torch.tensor(x), torch.tensor(mu), torch.tensor(ls)).numpy()
    magnitude = np.abs(x - mu) / np.exp(ls) + np.abs(ls) + 1
    assert_within(got, expected, 1e-13 * magnitude, list(range(300)), "laplace.logpdf")
    args = [torch.tensor(a[:10]).requires_grad_() for a in (x, mu, ls)]
    assert torch.autograd.gradcheck(laplace_log_prob, args)
