"""Tests of ``probloss.functional.student_t``: Student's t log density (normaliser without
cancellation, far tail, ``df`` gradients), against mpmath and scipy, and its validation.

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

from probloss.functional import normal_log_prob, student_t_log_prob
from tests.functional._checks import FLOAT_DTYPES, HALF_DTYPES, assert_within, dtype_id
from tests.functional.location_scale_reference import (
    DF_GRAD_RTOL,
    RTOL,
    cast,
    check,
    grad_rtol,
    result_dtype,
    student_t_ref,
)


def test_student_t_df_must_be_positive():
    with pytest.raises(ValueError, match=r"df of shape \(2,\) must be positive"):
        student_t_log_prob(torch.zeros(2), torch.tensor([1.0, 0.0]), 0.0, 0.0)


DFS = [1e-300, 1e-30, 1e-3, 1e-2, 0.3, 0.999, 1.0, 1.5, 2.0, 2.5, 5.0, 19.0, 20.0, 21.0, 100.0]
DFS += [1e4, 1e6, 1e8, 1e10]
T_ZS = [0.0, *(s * m for m in (1e-3, 0.7, 1.0, 3.0, 30.0, 1e4, 1e10, 1e30) for s in (1, -1))]
T_LOG_SCALES = [-3.0, 0.0, 2.0]


@functools.cache
def _t_grid(dtype: torch.dtype):
    quads = [
        (0.25 + z * math.exp(ls), df, 0.25, ls)
        for df, z, ls in itertools.product(DFS, T_ZS, T_LOG_SCALES)
    ]
    cols = [cast([q[k] for q in quads], dtype) for k in range(4)]
    ok = torch.isfinite(cols[0]) & torch.isfinite(cols[1]) & (cols[1] > 0)
    x, df, mu, ls = (c[ok].double().tolist() for c in cols)
    return sorted(set(zip(x, df, mu, ls, strict=True)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_student_t_matches_mpmath(dtype):
    """df from 1e-300 (1e-30 in float32; df -> 0+) to 1e10 (where lgamma((df+1)/2) -
    lgamma(df/2) cancels ~10 digits),
    |z| to 1e30 (z^2/df overflows float32), value and gradients in value, log_scale and
    df against mpmath (bounds in the module docstring)."""
    points = _t_grid(dtype)
    x, df, mu, ls = (cast([q[k] for q in points], dtype).requires_grad_() for k in range(4))
    out = student_t_log_prob(x, df, mu, ls)
    out_dtype = result_dtype(dtype)
    assert out.dtype == out_dtype
    out.sum().backward()
    ref = np.array([student_t_ref(*q) for q in points])
    rtol, g_rtol = RTOL[out_dtype], grad_rtol(dtype)
    df_rtol = torch.finfo(dtype).eps if dtype in HALF_DTYPES else DF_GRAD_RTOL[dtype]
    check(out.detach().double(), ref[:, 0], ref[:, 1], rtol, out_dtype, points, "value")
    check(x.grad.double(), ref[:, 2], ref[:, 2], g_rtol, dtype, points, "d/dvalue")
    check(ls.grad.double(), ref[:, 3], ref[:, 4], g_rtol, dtype, points, "d/dlog_scale")
    check(df.grad.double(), ref[:, 5], ref[:, 6], df_rtol, dtype, points, "d/ddf")


def test_student_t_where_z_or_df_have_no_float():
    """Found by ``probloss audit`` (float32): ``z = r e^{-log_scale}`` beyond the range
    (``log_scale = -100``, or ``-1e36`` against ``df = 1.2e-7``) gave -inf or lost 25% to
    the cancellation of ``-log_scale`` against the tail, and a subnormal ``df`` (1.4e-45,
    where ``df/2`` rounds to 0) gave NaN; the log density is finite at all of them. Value
    and d/dx against mpmath (``student_t_ref``), relative ``1e-5``, from the float32 inputs."""
    raw = [(1.0, 3.0, 0.0, -100.0), (0.3852, 1.19e-7, -2.52, -1e36), (0.0039, 1.4e-45, -0.98, 1.16)]
    raw += [(-0.5, 2.0, 0.0, -120.0)]
    points = [tuple(float(np.float32(v)) for v in p) for p in raw]
    x, df, mu, ls = (
        torch.tensor([p[k] for p in points], dtype=torch.float32, requires_grad=(k == 0))
        for k in range(4)
    )
    out = student_t_log_prob(x, df, mu, ls)
    out.sum().backward()
    ref = np.array([student_t_ref(*p) for p in points])
    got = out.detach().double().numpy()
    assert_within(got, ref[:, 0], 1e-5 * np.abs(ref[:, 0]), points, "value")
    assert_within(x.grad.double().numpy(), ref[:, 2], 1e-5 * np.abs(ref[:, 2]), points, "d/dx")


def test_student_t_bound_rejects_the_lgamma_difference():
    """The float32 bound fails the textbook normaliser lgamma((v+1)/2) - lgamma(v/2) at
    df = 1e6..1e10 (it cancels to garbage), so the accuracy test can fail."""
    df = torch.tensor([1e6, 1e8, 1e10])
    naive = torch.lgamma((df + 1) / 2) - torch.lgamma(df / 2) - 0.5 * torch.log(df * math.pi)
    exact = np.array([student_t_ref(0.0, v, 0.0, 0.0)[0] for v in df.tolist()])
    assert (np.abs(naive.double().numpy() - exact) > 1e-6 * np.abs(exact)).all()
    ours = student_t_log_prob(torch.zeros(3), df, 0.0, 0.0).double().numpy()
    assert (np.abs(ours - exact) <= 1e-6 * np.abs(exact)).all()


def test_student_t_against_scipy_float64():
    """scipy.stats.t.logpdf, df in [0.05, 100] (scipy's own error <= 1.5e-14 there)."""
    rng = np.random.default_rng(3)
    df = np.exp(rng.uniform(math.log(0.05), math.log(100.0), size=400))
    mu = rng.normal(size=400)
    ls = rng.uniform(-5, 5, size=400)
    x = mu + np.exp(ls) * rng.standard_t(df) * 3
    expected = scipy.stats.t.logpdf(x, df, mu, np.exp(ls))
    got = student_t_log_prob(*(torch.tensor(a) for a in (x, df, mu, ls))).numpy()
    z = (x - mu) / np.exp(ls)
    magnitude = (df + 1) / 2 * np.log1p(z * z / df) + np.abs(ls) + 1 + np.abs(np.log(df))
    assert_within(got, expected, 1e-13 * magnitude, list(range(400)), "t.logpdf")


def test_student_t_tends_to_normal():
    """df = 1e10: within ~(z^4 + 2 z^2 + 1) / (4 df) of the normal log density (the
    first-order correction; float64)."""
    z = torch.linspace(-5.0, 5.0, 21, dtype=torch.float64)
    t = student_t_log_prob(z, 1e10, 0.0, 0.0)
    n = normal_log_prob(z, 0.0, log_scale=0.0)
    assert ((t - n).abs() <= (z**4 + 2 * z**2 + 1) / 4e10 + 1e-15).all()


def test_student_t_gradcheck_float64():
    """gradcheck in every argument incl. df, on both sides of the tail switch z^2 = df and of
    the normaliser's switches (df = 2 and 20)."""
    x = torch.tensor([0.3, -2.0, 5.0, 40.0, 1e3, 0.1, -3.0, 2.0], dtype=torch.float64)
    df = torch.tensor([0.5, 1.5, 3.0, 19.0, 25.0, 1e3, 1e5, 2.5], dtype=torch.float64)
    mu = torch.tensor([0.0, 0.5, -1.0, 0.0, 2.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    ls = torch.tensor([0.0, -1.0, 0.5, 1.0, 3.0, -2.0, 0.0, 0.0], dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, df, mu, ls)]
    assert torch.autograd.gradcheck(student_t_log_prob, args)
    assert torch.autograd.gradgradcheck(student_t_log_prob, args)
