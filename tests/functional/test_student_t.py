"""Tests of ``probloss.functional.student_t``: Student's t log density (normaliser without
cancellation, far tail, ``df`` gradients), against mpmath and scipy, and its validation.

References and bounds: see ``tests/functional/location_scale_reference.py``; the edge
cases at the end (subnormal ``df``, infinite residuals) state their reference (mpmath at
50 digits at the inputs after the cast, or the exact limit) and bound in their docstrings.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import scipy.stats
import torch
from mpmath import mp, mpf

from probloss.functional import normal_log_prob, student_t_log_prob
from tests.functional._checks import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    as_float,
    assert_within,
    dtype_id,
)
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


# --------------------------------------------------------------------------------------
# Edge cases found by the fuzz suite (issue 10): subnormal df, infinite residuals
# --------------------------------------------------------------------------------------


def test_student_t_gradients_at_subnormal_df():
    """Found by the fuzz suite: df = 9.2e-41 (float32 subnormal) with z = 1.1e-28 or z = 0
    (underflowed): z^2 / df differentiated as 2 z (1/df) overflowed 1/df (inf, and inf * 0
    = NaN at z = 0). mpmath: d/dvalue = -(df + 1) z / (sigma (df + z^2)); bound 4 (|log_scale|
    + 4) eps relative (e^{-log_scale} rounded in its exponent)."""
    eps = torch.finfo(torch.float32).eps
    for x, df, loc, ls in (
        (16.375, 9.183549615799121e-41, -7.625, 68.5),
        (0.0547, 1.84e-40, -708.0, 414.0),
    ):
        value = torch.tensor(x, requires_grad=True)
        dft = torch.tensor(df)
        out = student_t_log_prob(value, dft, torch.tensor(loc), torch.tensor(ls))
        out.backward()
        with mp.workdps(50):
            d = mpf(dft.item())
            z = (mpf(value.item()) - mpf(loc)) * mp.exp(-mpf(ls))
            exact = float(-(d + 1) * z / (mp.exp(mpf(ls)) * (d + z * z)))
        assert math.isfinite(value.grad.item())
        assert abs(value.grad.item() - exact) <= 4 * (ls + 4) * eps * abs(exact) + 1e-45


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_student_t_infinite_residual_limits(dtype):
    """Found by the fuzz suite: value = +-inf with a subnormal df (3e-40 float32) gave d/ddf =
    NaN (the tail's (log|r| - ...) = inf against its -1/(2 df) = -inf, and the normaliser's
    1/(2 df) = +inf), and with df = 1.5e36, log_scale = 257 a NaN value (df * inf - df
    log_scale = inf - inf). The exact limits as |x - mu| -> inf at fixed df > 0, from
    log p = D(df/2) - log(2 pi)/2 - log sigma - (df + 1)/2 log1p(z^2/df): value -inf,
    d/ddf = -inf (the tail grows like log|z|), d/dlog_scale = -1 + (df + 1) z^2 / (df + z^2)
    -> df, d/dvalue = d/dloc = -(df + 1) z / (sigma (df + z^2)) -> 0. The gradient in
    log_scale is df rounded to the output dtype (exact where df is representable)."""
    big = torch.finfo(dtype).max
    dfs = [torch.finfo(dtype).tiny / 64, 1e-3, 2.0, big / 8]  # 1 / (2 df) overflows at the first
    for x, df, ls in itertools.product((math.inf, -math.inf), dfs, (0.0, 256.9375, -1e4)):
        args = [torch.tensor(v, dtype=torch.float64).to(dtype) for v in (x, df, 0.5, ls)]
        if not all(torch.isfinite(a) for a in args[1:]):
            continue
        leaves = [a.clone().requires_grad_() for a in args]
        out = student_t_log_prob(*leaves)
        out.backward()
        label = f"x={x} df={args[1].item():.3g} ls={ls}"
        assert out.item() == -math.inf, label
        assert leaves[0].grad.item() == 0.0 and leaves[2].grad.item() == 0.0, label
        assert leaves[1].grad.item() == -math.inf, label
        assert leaves[3].grad.item() == args[1].item(), label


def _student_t_d_df(x: float, df: float) -> mpf:
    """d/ddf of log t(x | df, 0, 1) in mpmath: psi((df + 1)/2)/2 - psi(df/2)/2 - 1/(2 df)
    - log1p(x^2/df)/2 + (df + 1) x^2 / (2 df (df + x^2))."""
    d, z = mpf(df), mpf(x)
    return (
        mp.digamma((d + 1) / 2) / 2
        - mp.digamma(d / 2) / 2
        - 1 / (2 * d)
        - mp.log1p(z * z / d) / 2
        + (d + 1) * z * z / (2 * d * (d + z * z))
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=dtype_id)
def test_student_t_df_gradient_at_subnormal_df_beyond_sqrt_df_against_mpmath(dtype):
    """Found by the fuzz suite (issue 10): student_t_log_prob(0, df=1.4e-45, loc=3.1e-21,
    log_scale=0.03) float32 gave d/ddf = NaN (exact 7.1e44: +inf in float32; float64 at df =
    5e-324 likewise). For z^2 > df the kernel (df + 1)/2 (2 log|u| + log1p(df/z^2)) was
    differentiated by autograd into -(df + 1)/(2 df) and (df + 1)/(2 z^2 (1 + q)) (through
    1/z^2): both overflow at a subnormal df, inf - inf. Now dK/ddf = L/2 - (1 + 1/df)/(2 (1
    + q)) in closed form. Rows: df between 1/(2 max) and 1/max with z^2 = 1.05 df (exact
    d/ddf = 0.76/df, finite), and the smallest subnormal df with z^2 = 2 df (1/z^2
    overflows: NaN before) and z = 1e3 sqrt(df) (exact about 1/df: +inf). mpmath at 50
    digits at the cast inputs (loc 0, log_scale 0: z = value exactly); bound 16 eps relative
    (every term of the sum has the sign of the result up to log1p(z^2/df)/2 of size < 1,
    each rounded a few times), plus the half rounding for bfloat16."""
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    eps = torch.finfo(compute).eps
    half_eps = torch.finfo(dtype).eps / 2 if dtype in HALF_DTYPES else 0.0
    inv_max = 1.0 / torch.finfo(compute).max
    smallest = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    rows = [(f * inv_max, math.sqrt(1.05 * f * inv_max)) for f in (0.6, 0.8)]
    rows += [(smallest, math.sqrt(2 * smallest)), (smallest, 1e3 * math.sqrt(smallest))]
    for df, x in rows:
        df_t, x_t = (torch.tensor(v, dtype=torch.float64).to(dtype) for v in (df, x))
        with mp.workdps(50):
            exact = _student_t_d_df(x_t.item(), df_t.item())
        ref = as_float(exact, dtype)
        leaf = df_t.clone().requires_grad_()
        zero = torch.zeros((), dtype=dtype)
        student_t_log_prob(x_t, leaf, zero, zero).backward()
        got = leaf.grad.item()
        label = f"df={df_t.item():.4g} x={x_t.item():.4g}: got {got}, exact {float(exact):.6g}"
        if ref is None or math.isinf(ref):
            assert got == math.inf, label
        else:
            assert abs(got - ref) <= (16 * eps + half_eps) * abs(ref), label
