"""Tests of ``probloss.functional.multivariate``: dense and low-rank multivariate normal
log densities and the unconstrained triangular-factor parameterisation.

Where the numbers come from
---------------------------
* **mpmath** (the oracles below): the covariance is formed *as a matrix* at high precision
  (``Sigma = L L^T``, ``W W^T + diag(exp(log_diag))`` or Graves' bivariate closed form from
  ``sigma_x, sigma_y, rho = tanh(a)``), and ``Sigma^{-1} r`` and ``det Sigma`` come from a
  plain Gaussian elimination with partial pivoting written here: nothing of the
  implementation (triangular solves, QR, scaled norms) is reused. Inputs are the exact
  values after the cast to the dtype under test. Each oracle is evaluated at 80 digits,
  then 160, ... until two successive evaluations agree to 25 significant digits (a
  covariance with scales from 1e-150 to 1e150 has a condition number of 1e600 and needs
  about 1300 digits), and is cached.
* **scipy.stats.multivariate_normal.logpdf** in float64 (eigendecomposition of the
  covariance), only for well-conditioned covariances: it is itself off by up to
  ~100 eps x scale there (measured against mpmath), is off by 1e6 eps x scale for scales
  spanning 1e-2 .. 1e2, and raises for scales spanning 1e-4 .. 1e4.
* **torch.distributions** (``MultivariateNormal(scale_tril=...)``,
  ``LowRankMultivariateNormal``) in float64 at moderate inputs, where they are right.

Bounds
------
``eps`` is the machine epsilon of the compute dtype (float32 for float16 / bfloat16 inputs,
which are computed and returned in float32). The natural size of a log density is

    scale = |maha/2| + (size of the terms of log det(Sigma)/2) + (D/2) log(2 pi),

the sizes of the terms it is summed from (for ``L``: ``sum_i |log L_ii|``; for the low-rank
form: ``sum_i |log_diag_i| / 2 + log det(I + W^T D^-1 W) / 2``). Where the terms have one
sign, ``k eps scale`` is a relative bound ``k eps |log p|``; where they cancel (the density
crosses 1, the log density 0, or ``log L_11 = -log L_22``) it is the absolute floor set by
rounding the largest term: no purely relative bound is attainable there by any
floating-point evaluation.

Where the problem itself is ill-conditioned (a point near a near-singular direction, nearly
collinear low-rank columns) the floor is raised by

    cond = sum |x dlogp/dx| over every input entry x (from the mpmath gradient),

the first-order change of the result when every input entry moves by a relative ``eps``:
what a backward-stable evaluation may err by.

* dense vs mpmath: ``4 eps scale``, covariances with well-conditioned correlation structure
  and per-coordinate scales (``L = diag(s) M`` or ``diag(s)``) log-uniform in
  1e-6 .. 1e6 (float32, bfloat16), 1e-2 .. 1e2 (float16: its range) and 1e-150 .. 1e150
  (float64), at 1e-3, 1 and 30 standard deviations, D in {1, 2, 3, 5, 8}. Measured worst:
  1.07 (float16), 1.26 (bfloat16), 1.28 (float32), 0.97 (float64) eps scale; relative
  errors up to 3.5e-6 (float16 inputs), 1.8e-6 (float32), 9.4e-16 (float64), at points
  where the terms cancel. (Scales mixed *within* a row, ``L = M diag(s)``, make the problem
  ill-conditioned: a relative perturbation eps of the inputs moves the result by far more
  than eps scale, so no algorithm meets this bound there; not swept.)
* dense gradients vs mpmath (``d/dvalue = -Sigma^{-1} r``,
  ``d/dL = tril(v (L^T v)^T) - diag(1/L_ii)``, ``v = Sigma^{-1} r``), in coordinates made
  dimensionless by the scales (entry ``i`` times ``s_i``): error norm at most ``8 eps`` of
  the gradient norm, plus the rounding of the gradient to a half-precision input's dtype.
  Measured worst 2.8 eps (float32) and 2.7 eps (float64).
* dense vs scipy (well-conditioned, float64): ``4 D eps kappa(Sigma) scale`` (scipy's
  eigendecomposition: each eigenvalue within ``eps ||Sigma||``); vs torch
  ``MultivariateNormal(scale_tril=...)``: ``4 eps scale``, gradients ``4 D eps kappa(L)^2``
  of the largest entry (two backward-stable triangular solves on each side).
* user-story failures of torch (rho rounding to 1, scales 1e-25 / 1e25): ``2 eps (scale +
  cond)`` at the exact ``L``, ``4 eps (scale + cond)`` against Graves' closed form at the
  exact parameters; see each test for measured values.
* low-rank vs mpmath: ``2 eps (scale + cond)`` with the float32 ``eps`` for float32 and half
  inputs (computed in float64 and rounded once to float32 since issue 10, so far inside
  it; the tight float64 bounds and the second-order term of a point along a long factor are
  in test_multivariate_edges.py); vs the dense formula, torch ``LowRankMultivariateNormal``
  and scipy: ``4 D eps kappa(Sigma) scale`` (each forms and factors a matrix).
* ``scale_tril_from_raw``: off-diagonal entries exact, diagonal within ``2 eps`` of mpmath
  ``min_scale + log1p(exp(raw))``; round trips within ``2 eps (1 + |raw|)`` and ``2 eps |L|``.
"""

from __future__ import annotations

import functools
import math

import mpmath
import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpmath import mp
from mpmath.libmp import round_nearest, to_float
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal

from probloss.functional import (
    lowrank_multivariate_normal_log_prob,
    multivariate_normal_log_prob,
    scale_tril_from_raw,
)
from probloss.functional.multivariate import default_min_diag, default_min_scale
from probloss.special import log_cosh, softplus_inverse
from tests.functional._checks import FLOAT_DTYPES, HALF_DTYPES, assert_within, dtype_id

DIMS = (1, 2, 3, 5, 8)
F64 = torch.float64
LOG_2PI = math.log(2.0 * math.pi)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF_DTYPES else dtype


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(_compute_dtype(dtype)).eps


# ======================================================================================
# mpmath oracles
# ======================================================================================

_AGREE = mpmath.mpf(10) ** -25
_START_DPS = 80
_MAX_DPS = 10240


def _converged(fn, *args) -> tuple[float, ...]:
    """``fn(*args)`` (a tuple of mpf) at doubling precision until 25 digits agree; as float64.

    A Gaussian elimination that meets an exact zero pivot (a covariance singular at this
    precision) raises ZeroDivisionError: the precision is doubled. Components smaller than
    ``10^(-dps/4)`` times the largest one (exact zeros that rounding turns into ~1e-20000)
    are compared absolutely at that level.
    """
    dps, prev = _START_DPS, None
    while dps <= _MAX_DPS:
        with mp.workdps(dps):
            try:
                cur = fn(*args)
            except ZeroDivisionError:
                cur = None
            if cur is not None and prev is not None:
                floor = max(abs(c) for c in cur) * mpmath.mpf(10) ** (-(dps // 4))
                pairs = zip(cur, prev, strict=True)
                if all(abs(c - p) <= _AGREE * max(abs(c), floor) for c, p in pairs):
                    return tuple(to_float(mpmath.mpf(c)._mpf_, rnd=round_nearest) for c in cur)
        prev, dps = cur, 2 * dps
    raise RuntimeError(f"{fn.__name__} did not converge by {_MAX_DPS} digits")


def _solve(a: list[list], columns: list[list]) -> tuple[list[list], mpmath.mpf]:
    """``(A^{-1} b for b in columns, det A)`` by Gaussian elimination with partial pivoting."""
    n = len(a)
    a = [list(row) for row in a]
    cols = [list(b) for b in columns]
    det = mpmath.mpf(1)
    for k in range(n):
        p = max(range(k, n), key=lambda i: abs(a[i][k]))
        if a[p][k] == 0:
            raise ZeroDivisionError
        if p != k:
            a[k], a[p] = a[p], a[k]
            for b in cols:
                b[k], b[p] = b[p], b[k]
            det = -det
        det *= a[k][k]
        for i in range(k + 1, n):
            f = a[i][k] / a[k][k]
            for j in range(k, n):
                a[i][j] -= f * a[k][j]
            for b in cols:
                b[i] -= f * b[k]
    out = []
    for b in cols:
        x = [mpmath.mpf(0)] * n
        for i in reversed(range(n)):
            x[i] = (b[i] - mpmath.fsum(a[i][j] * x[j] for j in range(i + 1, n))) / a[i][i]
        out.append(x)
    return out, det


def _mpf_vector(v) -> list:
    return [mpmath.mpf(t) for t in v]


def _dense_sigma(factor) -> list[list]:
    """``L L^T`` from the lower triangle of ``factor`` (entries above it are ignored)."""
    n = len(factor)
    lo = [
        [mpmath.mpf(factor[i][j]) if j <= i else mpmath.mpf(0) for j in range(n)] for i in range(n)
    ]
    return [
        [mpmath.fsum(lo[i][k] * lo[j][k] for k in range(n)) for j in range(n)] for i in range(n)
    ]


def _gaussian_terms(sigma: list[list], r: list) -> tuple:
    """``(log p, maha/2, log det/2)`` of N(0, sigma) at ``r``."""
    ((v,), det) = _solve(sigma, [r])
    half_maha = mpmath.fsum(a * b for a, b in zip(r, v, strict=True)) / 2
    half_log_det = mpmath.log(det) / 2
    n = len(r)
    return (-half_maha - half_log_det - n * mpmath.log(2 * mpmath.pi) / 2, half_maha, half_log_det)


def _dense_value(x, mu, factor):
    """``(log p, maha/2, sum_i |log L_ii|)``; the last is the size of the terms of log det/2."""
    r = [a - b for a, b in zip(_mpf_vector(x), _mpf_vector(mu), strict=True)]
    log_p, half_maha, _ = _gaussian_terms(_dense_sigma(factor), r)
    terms = mpmath.fsum(abs(mpmath.log(mpmath.mpf(factor[i][i]))) for i in range(len(x)))
    return log_p, half_maha, terms


def _dense_gradient(x, mu, factor):
    """``d/dx = -v``, ``d/dL_ij = v_i (L^T v)_j - [i = j] / L_ii`` (i >= j); ``v = Sigma^-1 r``."""
    n = len(x)
    r = [a - b for a, b in zip(_mpf_vector(x), _mpf_vector(mu), strict=True)]
    ((v,), _) = _solve(_dense_sigma(factor), [r])
    ltv = [mpmath.fsum(mpmath.mpf(factor[i][j]) * v[i] for i in range(j, n)) for j in range(n)]
    grad_factor = [
        v[i] * ltv[j] - (1 / mpmath.mpf(factor[i][i]) if i == j else 0)
        for i in range(n)
        for j in range(i + 1)
    ]
    return tuple(-t for t in v) + tuple(grad_factor)


def _lowrank_solved(x, mu, w, log_diag):
    """mpmath ``(W, d, Sigma, r, v, Sigma^{-1}, det Sigma)`` of the low-rank covariance
    ``Sigma = W W^T + diag(e^log_diag)``, with ``r = x - mu`` and ``v = Sigma^{-1} r``."""
    n, rank = len(w), len(w[0])
    wm = [_mpf_vector(row) for row in w]
    d = [mpmath.exp(mpmath.mpf(t)) for t in log_diag]
    sigma = [
        [
            mpmath.fsum(wm[i][k] * wm[j][k] for k in range(rank)) + (d[i] if i == j else 0)
            for j in range(n)
        ]
        for i in range(n)
    ]
    r = [a - b for a, b in zip(_mpf_vector(x), _mpf_vector(mu), strict=True)]
    identity = [[mpmath.mpf(int(i == j)) for i in range(n)] for j in range(n)]
    (v, *inv_columns), det = _solve(sigma, [r, *identity])
    inv = [[inv_columns[j][i] for j in range(n)] for i in range(n)]
    return wm, d, sigma, r, v, inv, det


def _lowrank_value(x, mu, w, log_diag):
    """``(log p, maha/2, terms, cond)`` for Sigma = W W^T + diag(exp(log_diag)).

    ``terms = sum |log_diag_i| / 2 + log det(K) / 2`` (``K = I + W^T D^-1 W``, log det K >= 0)
    is the size of the terms log det(Sigma)/2 is made of.

    ``cond = sum|r_i dlogp/dr_i| + sum|W_ij dlogp/dW_ij| + sum|d_i dlogp/dd_i|`` with
    ``dlogp/dr = -v``, ``dlogp/dW = (v v^T - Sigma^{-1}) W``,
    ``dlogp/dd_i = (v_i^2 - Sigma^{-1}_ii) / 2``, ``v = Sigma^{-1} r``.
    """
    n, rank = len(w), len(w[0])
    wm, d, sigma, r, v, inv, _ = _lowrank_solved(x, mu, w, log_diag)
    cond = mpmath.fsum(abs(a * b) for a, b in zip(r, v, strict=True))
    for i in range(n):
        for k in range(rank):
            g = mpmath.fsum((v[i] * v[j] - inv[i][j]) * wm[j][k] for j in range(n))
            cond += abs(wm[i][k] * g)
        cond += abs(d[i] * (v[i] ** 2 - inv[i][i]) / 2)
    log_p, half_maha, half_log_det = _gaussian_terms(sigma, r)
    half_sum = mpmath.fsum(mpmath.mpf(t) for t in log_diag) / 2
    terms = mpmath.fsum(abs(mpmath.mpf(t)) for t in log_diag) / 2 + (half_log_det - half_sum)
    return log_p, half_maha, terms, cond


def _graves_value(x, mu, log_s, atanh_rho):
    """Bivariate normal from Graves (2013) eq. 24-25 at the exact parameters.

    ``(log p, maha/2, |log sx| + |log sy| + log cosh(a))`` with ``rho = tanh(a)`` and
    ``1 - rho^2 = 1 / cosh(a)^2`` (the last: the size of the terms of log det/2).
    """
    dx, dy = (mpmath.mpf(a) - mpmath.mpf(b) for a, b in zip(x, mu, strict=True))
    sx, sy = (mpmath.exp(mpmath.mpf(t)) for t in log_s)
    a = mpmath.mpf(atanh_rho)
    rho, one_m_rho2 = mpmath.tanh(a), 1 / mpmath.cosh(a) ** 2
    z = (dx / sx) ** 2 + (dy / sy) ** 2 - 2 * rho * dx * dy / (sx * sy)
    half_maha = z / (2 * one_m_rho2)
    half_log_det = mpmath.log(sx * sy * mpmath.sqrt(one_m_rho2))
    log_p = -half_maha - half_log_det - mpmath.log(2 * mpmath.pi)
    terms = abs(mpmath.log(sx)) + abs(mpmath.log(sy)) + mpmath.log(mpmath.cosh(a))
    return (log_p, half_maha, terms)


@functools.cache
def dense_ref(x: tuple, mu: tuple, factor: tuple) -> tuple[float, float, float]:
    return _converged(_dense_value, x, mu, factor)


@functools.cache
def dense_grad_ref(x: tuple, mu: tuple, factor: tuple) -> tuple[float, ...]:
    return _converged(_dense_gradient, x, mu, factor)


@functools.cache
def lowrank_ref(x: tuple, mu: tuple, w: tuple, log_diag: tuple) -> tuple[float, ...]:
    return _converged(_lowrank_value, x, mu, w, log_diag)


@functools.cache
def graves_ref(x: tuple, mu: tuple, log_s: tuple, atanh_rho: float) -> tuple[float, ...]:
    return _converged(_graves_value, x, mu, log_s, atanh_rho)


def _key(t: torch.Tensor):
    """Exact values of ``t`` as nested tuples of Python floats (hashable oracle input)."""
    out = t.detach().to(F64).tolist()
    return tuple(tuple(row) for row in out) if t.dim() == 2 else tuple(out)


def _dense_cond(value: torch.Tensor, loc: torch.Tensor, factor: torch.Tensor) -> float:
    """``sum |r_i dlogp/dr_i| + sum |L_ij dlogp/dL_ij|`` from the mpmath gradient.

    The first-order change of the log density when every entry of ``value - loc`` and of
    ``L`` is perturbed by a relative ``eps``, divided by ``eps``: the error a
    backward-stable evaluation may make, over ``eps``.
    """
    dim = factor.shape[-1]
    grad = np.array(dense_grad_ref(_key(value), _key(loc), _key(factor)))
    r = (value.double() - loc.double()).numpy()
    rows, cols = np.tril_indices(dim)
    entries = factor.double().numpy()[rows, cols]
    return float(np.abs(r * grad[:dim]).sum() + np.abs(entries * grad[dim:]).sum())


def _scale(half_maha: float, log_det_terms: float, dim: int) -> float:
    """``|maha/2| + (size of the terms of log det/2) + (D/2) log 2 pi``: see module doc."""
    return abs(half_maha) + log_det_terms + 0.5 * dim * LOG_2PI


# ======================================================================================
# Case generators (float64; the tests cast to the dtype under test)
# ======================================================================================


def _unit_factor(gen: torch.Generator, batch: tuple[int, ...], dim: int) -> torch.Tensor:
    """Well-conditioned lower-triangular M: off-diagonal N(0, 0.5^2), diagonal U(0.5, 2)."""
    off = 0.5 * torch.randn((*batch, dim, dim), generator=gen, dtype=F64).tril(-1)
    diag = torch.rand((*batch, dim), generator=gen, dtype=F64) * 1.5 + 0.5
    return off + torch.diag_embed(diag)


def _dense_cases(gen, batch, dim, *, lo, hi, kind, far):
    """``(value, loc, L)`` with scales ``s`` log-uniform in ``[lo, hi]`` per coordinate.

    ``kind="row"``: ``L = diag(s) M`` (correlated coordinates in different units);
    ``kind="diag"``: ``L = diag(s)``. Points at ``far`` standard deviations:
    ``value = loc + L u``, ``u ~ far N(0, I)``.
    """
    s = torch.exp(
        torch.empty((*batch, dim), dtype=F64).uniform_(math.log(lo), math.log(hi), generator=gen)
    )
    factor = (
        s.unsqueeze(-1) * _unit_factor(gen, batch, dim) if kind == "row" else torch.diag_embed(s)
    )
    u = far * torch.randn((*batch, dim), generator=gen, dtype=F64)
    loc = s * torch.randn((*batch, dim), generator=gen, dtype=F64)
    value = loc + (factor @ u.unsqueeze(-1)).squeeze(-1)
    return value, loc, factor


SCALE_RANGES = {
    torch.float16: (1e-2, 1e2),
    torch.bfloat16: (1e-6, 1e6),
    torch.float32: (1e-6, 1e6),
    torch.float64: (1e-150, 1e150),
}


# ======================================================================================
# Dense: accuracy
# ======================================================================================


@pytest.mark.parametrize("dim", DIMS)
def test_dense_matches_scipy_float64(dim):
    """Random well-conditioned covariances, batch shape (4, 3), against scipy logpdf.

    Bound ``4 D eps kappa(Sigma) scale``: scipy's backward-stable eigendecomposition perturbs
    each eigenvalue by ``eps ||Sigma||``, ``eps kappa`` relative to the smallest, and the
    Mahalanobis term and log det inherit relative errors of at most ``D eps kappa``."""
    gen = torch.Generator().manual_seed(100 + dim)
    factor = _unit_factor(gen, (4, 3), dim)
    loc = torch.randn(4, 3, dim, generator=gen, dtype=F64)
    value = loc + 2.0 * torch.randn(4, 3, dim, generator=gen, dtype=F64)
    got = multivariate_normal_log_prob(value, loc, factor)
    assert got.shape == (4, 3) and got.dtype == F64
    for idx in np.ndindex(4, 3):
        cov = (factor[idx] @ factor[idx].mT).numpy()
        expected = scipy.stats.multivariate_normal.logpdf(value[idx].numpy(), loc[idx].numpy(), cov)
        z = torch.linalg.solve_triangular(
            factor[idx], (value[idx] - loc[idx])[:, None], upper=False
        )
        scale = _scale(
            0.5 * z.square().sum().item(), factor[idx].diagonal().log().abs().sum().item(), dim
        )
        bound = 4 * dim * _eps(F64) * np.linalg.cond(cov) * scale
        assert abs(got[idx].item() - expected) <= bound, (idx, got[idx].item(), expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dim", DIMS)
def test_dense_badly_scaled_matches_mpmath(dtype, dim):
    """Scales spanning SCALE_RANGES[dtype], points at 1e-3, 1, 30 sd; bound 4 eps scale."""
    lo, hi = SCALE_RANGES[dtype]
    gen = torch.Generator().manual_seed(200 + dim)
    cases = [
        _dense_cases(gen, (2,), dim, lo=lo, hi=hi, kind=kind, far=far)
        for kind in ("row", "diag")
        for far in (1e-3, 1.0, 30.0)
    ]
    value, loc, factor = (torch.cat(parts).to(dtype) for parts in zip(*cases, strict=True))
    got = multivariate_normal_log_prob(value, loc, factor)
    assert got.dtype == _compute_dtype(dtype)
    refs = [dense_ref(_key(value[i]), _key(loc[i]), _key(factor[i])) for i in range(len(value))]
    expected = [r[0] for r in refs]
    bound = [4 * _eps(dtype) * _scale(r[1], r[2], dim) for r in refs]
    assert_within(
        got.double().numpy(), expected, bound, list(range(len(value))), f"{dtype} D={dim}"
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_dense_gradients_badly_scaled_match_mpmath(dtype):
    """d/dvalue, d/dloc, d/dscale_tril vs mpmath, in coordinates made dimensionless by scales.

    Bound: ``||s (g - g_ref)|| <= 8 eps ||s g_ref|| + ||s rnd(g_ref)||`` (see module doc),
    where ``rnd(g) = eps_half/2 |g| + subnormal_half/2`` is the rounding of a gradient to a
    half-precision input's dtype (0 for float32 / float64).
    Also: every gradient is finite and zero above the diagonal of ``scale_tril``. float16
    uses scales 0.1 .. 10: with 1e-2 .. 1e2 the exact gradients (up to ``far^2 / s``)
    exceed the float16 range that a gradient of a float16 leaf is returned in.
    """
    lo, hi = (0.1, 10.0) if dtype == torch.float16 else SCALE_RANGES[dtype]
    gen = torch.Generator().manual_seed(300)
    fi = torch.finfo(dtype)
    half, sub = (fi.eps / 2, fi.smallest_normal * fi.eps / 2) if dtype in HALF_DTYPES else (0, 0)
    worst = 0.0
    for dim in (1, 2, 5, 8):
        for kind in ("row", "diag"):
            for far in (1e-3, 1.0, 30.0):
                value, loc, factor = (
                    t[0].to(dtype)
                    for t in _dense_cases(gen, (1,), dim, lo=lo, hi=hi, kind=kind, far=far)
                )
                for t in (value, loc, factor):
                    t.requires_grad_(True)
                multivariate_normal_log_prob(value, loc, factor).backward()
                assert value.grad.dtype == dtype
                for t in (value, loc, factor):
                    assert torch.isfinite(t.grad).all()
                assert (factor.grad.triu(1) == 0).all()
                ref = np.array(dense_grad_ref(_key(value), _key(loc), _key(factor)))
                rows, cols = np.tril_indices(dim)
                s = factor.detach().double().diagonal().abs().numpy()
                for got, expected, weight in (
                    (value.grad.double().numpy(), ref[:dim], s),
                    (loc.grad.double().numpy(), -ref[:dim], s),  # d/dloc = -d/dvalue
                    (factor.grad.double().numpy()[rows, cols], ref[dim:], s[rows]),
                ):
                    err = np.linalg.norm(weight * (got - expected))
                    bound = 8 * _eps(dtype) * np.linalg.norm(weight * expected)
                    bound += np.linalg.norm(weight * (half * np.abs(expected) + sub))
                    assert err <= bound, (dim, kind, far, got, expected)
                    worst = max(worst, err / bound if bound else 0.0)
    print(f"{dtype}: worst gradient error / bound = {worst:.3g}")


def test_dense_half_squared_norm_does_not_overflow_float32():
    """||z||^2 = 4.5e38 overflows float32, ||z||^2/2 = 2.25e38 does not: ours is finite.

    Reference: mpmath; bound 4 eps scale. torch's MultivariateNormal(scale_tril=...) squares
    before halving and returns -inf here.
    """
    value = torch.tensor([1.5e19, -1.5e19])
    loc = torch.zeros(2)
    factor = torch.eye(2)
    got = multivariate_normal_log_prob(value, loc, factor)
    ref = dense_ref(_key(value), _key(loc), _key(factor))
    assert math.isfinite(ref[0])
    assert abs(got.item() - ref[0]) <= 4 * _eps(torch.float32) * _scale(ref[1], ref[2], 2)
    assert torch.isneginf(MultivariateNormal(loc, scale_tril=factor).log_prob(value))
    value.requires_grad_(True)
    multivariate_normal_log_prob(value, loc, factor).backward()
    torch.testing.assert_close(value.grad, -value.detach(), rtol=0, atol=0)  # -Sigma^-1 r


def test_dense_half_squared_norm_does_not_overflow_float64():
    """As above in float64 with L = 1e-150 I: z = 1.2e154, ||z||^2 = 2.9e308 > max."""
    value = torch.tensor([1.2e4, 1.2e4], dtype=F64)
    loc = torch.zeros(2, dtype=F64)
    factor = 1e-150 * torch.eye(2, dtype=F64)
    got = multivariate_normal_log_prob(value, loc, factor)
    ref = dense_ref(_key(value), _key(loc), _key(factor))
    assert math.isfinite(ref[0])
    assert abs(got.item() - ref[0]) <= 4 * _eps(F64) * _scale(ref[1], ref[2], 2)
    assert torch.isneginf(MultivariateNormal(loc, scale_tril=factor).log_prob(value))


def test_dense_overflow_gives_minus_inf():
    """Where maha/2 itself exceeds the float32 range the result is -inf, not NaN."""
    got = multivariate_normal_log_prob(torch.tensor([3e19, 3e19]), torch.zeros(2), torch.eye(2))
    assert torch.isneginf(got)


def test_dense_at_the_mean():
    """value == loc: maha = 0, log p = -sum log L_ii - D/2 log 2 pi exactly; gradient in value 0."""
    factor = torch.tensor([[2.0, 0.0], [0.3, 0.5]], dtype=F64)
    value = torch.ones(2, dtype=F64, requires_grad=True)
    got = multivariate_normal_log_prob(value, torch.ones(2, dtype=F64), factor)
    assert got.item() == pytest.approx(-math.log(2.0 * 0.5) - LOG_2PI, rel=4e-16)
    got.backward()
    assert (value.grad == 0).all()


# ======================================================================================
# Dense: broadcasting, dtype policy, agreement with torch where torch is right
# ======================================================================================


def _dense_loop(value, loc, factor):
    """Reference for broadcasting: one call per event after explicit expansion."""
    batch = torch.broadcast_shapes(value.shape[:-1], loc.shape[:-1], factor.shape[:-2])
    dim = factor.shape[-1]
    v = value.expand((*batch, dim)).reshape(-1, dim)
    m = loc.expand((*batch, dim)).reshape(-1, dim)
    f = factor.expand((*batch, dim, dim)).reshape(-1, dim, dim)
    return torch.stack(
        [multivariate_normal_log_prob(v[i], m[i], f[i]) for i in range(v.shape[0])]
    ).reshape(batch)


@pytest.mark.parametrize(
    ("value_shape", "loc_shape", "factor_shape"),
    [
        ((7, 3), (3,), (3, 3)),  # shared factor: one solve with many right-hand sides
        ((5, 1, 3), (3,), (4, 3, 3)),
        ((3,), (2, 3), (2, 3, 3)),
        ((2, 4, 3), (1, 4, 3), (1, 1, 3, 3)),
        ((6, 3), (6, 3), (6, 3, 3)),
    ],
)
def test_dense_broadcasting(value_shape, loc_shape, factor_shape):
    """Batch dimensions broadcast; each event equals the unbatched call (float64). Bound 4 eps
    scale: a shared factor is solved against all right-hand sides at once (another BLAS
    routine, another rounding order); both are backward stable, within 2 eps scale each."""
    gen = torch.Generator().manual_seed(1)
    dim = factor_shape[-1]
    factor = _unit_factor(gen, factor_shape[:-2], dim)
    value = torch.randn(value_shape, generator=gen, dtype=F64)
    loc = torch.randn(loc_shape, generator=gen, dtype=F64)
    got = multivariate_normal_log_prob(value, loc, factor)
    expected = _dense_loop(value, loc, factor)
    assert got.shape == expected.shape
    half_maha = -expected - 0.5 * dim * LOG_2PI + factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    terms = factor.diagonal(dim1=-2, dim2=-1).log().abs().sum(-1)
    scale = half_maha.abs() + terms + 0.5 * dim * LOG_2PI
    assert ((got - expected).abs() <= 4 * _eps(F64) * scale).all()


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_dense_half_inputs_return_float32(dtype):
    """Half inputs are computed in float32 and equal the float32 call on the same values."""
    gen = torch.Generator().manual_seed(2)
    value, loc, factor = (
        t.to(dtype) for t in _dense_cases(gen, (3,), 3, lo=0.1, hi=10, kind="row", far=1.0)
    )
    got = multivariate_normal_log_prob(value, loc, factor)
    assert got.dtype == torch.float32
    expected = multivariate_normal_log_prob(value.float(), loc.float(), factor.float())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_dense_mixed_dtypes_promote():
    got = multivariate_normal_log_prob(torch.zeros(2, dtype=F64), torch.zeros(2), torch.eye(2))
    assert got.dtype == F64


def test_dense_agrees_with_torch_scale_tril_float64():
    """Values and gradients against torch MultivariateNormal(scale_tril=...), float64.

    Bounds: values 4 eps scale; gradients ``4 D eps kappa(L)^2`` of the largest entry of each
    gradient: both sides are backward-stable triangular solves (``z = L^{-1} r`` and
    ``L^{-T} z``, each within ``D eps kappa(L)`` relative, Higham (2002) thm. 8.5), and the
    gradient in ``L`` is a product of the two.
    """
    gen = torch.Generator().manual_seed(3)
    for dim in DIMS:
        factor = _unit_factor(gen, (6,), dim).requires_grad_(True)
        loc = torch.randn(6, dim, generator=gen, dtype=F64).requires_grad_(True)
        value = (loc.detach() + 3.0 * torch.randn(6, dim, generator=gen, dtype=F64)).requires_grad_(
            True
        )
        ours = multivariate_normal_log_prob(value, loc, factor)
        theirs = MultivariateNormal(loc, scale_tril=factor).log_prob(value)
        z = torch.linalg.solve_triangular(
            factor.detach(), (value - loc).detach().unsqueeze(-1), upper=False
        )
        scale = 0.5 * z.square().sum((-2, -1)) + factor.detach().diagonal(
            dim1=-2, dim2=-1
        ).log().abs().sum(-1)
        scale = scale + 0.5 * dim * LOG_2PI
        assert ((ours - theirs).abs() <= 4 * _eps(F64) * scale).all()
        g_ours = torch.autograd.grad(ours.sum(), (value, loc, factor))
        g_theirs = torch.autograd.grad(theirs.sum(), (value, loc, factor))
        for a, b in zip(g_ours, g_theirs, strict=True):
            b = b.tril() if b.dim() == 3 else b  # torch's gradient for L is already lower
            kappa = torch.linalg.cond(factor.detach()).max().item()
            atol = 4 * dim * _eps(F64) * kappa**2 * b.abs().max().item()
            torch.testing.assert_close(a, b, rtol=0, atol=atol)


@settings(max_examples=40)
@given(
    dim=st.integers(1, 5),
    log_scales=st.lists(st.floats(-20, 20), min_size=5, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_dense_property_agrees_with_torch_and_affine_law(dim, log_scales, seed):
    """For random factors (diagonal e^{+-20}, row-scaled), float64:

    * agreement with torch MultivariateNormal(scale_tril=...) (16 eps scale), and
    * the change-of-variables law ``log p(A x; A mu, A L) = log p(x; mu, L) - log|det A|``
      for lower-triangular ``A = diag(s) A0 diag(s)^-1`` (so ``A L = diag(s) A0 M`` stays
      lower triangular and row-scaled; an ``A`` mixing rows of different scales would make
      the transformed problem ill-conditioned), within ``64 eps (scale + |log det A|)``
      (``A``, ``A L``, ``A x`` and ``A mu`` are rounded products).
    """
    gen = torch.Generator().manual_seed(seed)
    s = torch.exp(torch.tensor(log_scales[:dim], dtype=F64))
    factor = s[:, None] * _unit_factor(gen, (), dim)
    loc = s * torch.randn(dim, generator=gen, dtype=F64)
    value = loc + factor @ (2.0 * torch.randn(dim, generator=gen, dtype=F64))
    ours = multivariate_normal_log_prob(value, loc, factor)
    theirs = MultivariateNormal(loc, scale_tril=factor).log_prob(value)
    z = torch.linalg.solve_triangular(factor, (value - loc)[:, None], upper=False)
    scale = _scale(0.5 * z.square().sum().item(), factor.diagonal().log().abs().sum().item(), dim)
    assert abs(ours.item() - theirs.item()) <= 16 * _eps(F64) * scale
    a0 = _unit_factor(gen, (), dim)
    a = s[:, None] * a0 / s[None, :]
    moved = multivariate_normal_log_prob(a @ value, a @ loc, a @ factor)
    log_det_a = a0.diagonal().log().sum().item()
    assert abs(moved.item() - (ours.item() - log_det_a)) <= 64 * _eps(F64) * (
        scale + abs(log_det_a)
    )


# ======================================================================================
# Dense: gradcheck and validation
# ======================================================================================


def test_dense_gradcheck_float64():
    """float64 gradcheck and gradgradcheck in (value, loc, scale_tril), batch 2, D = 3."""
    gen = torch.Generator().manual_seed(4)
    factor = _unit_factor(gen, (2,), 3).requires_grad_(True)
    loc = torch.randn(2, 3, generator=gen, dtype=F64).requires_grad_(True)
    value = torch.randn(2, 3, generator=gen, dtype=F64).requires_grad_(True)

    # validate_args=False: finite-difference steps perturb the zero upper triangle too
    def fn(v, m, f):
        return multivariate_normal_log_prob(v, m, f.tril(), validate_args=False)

    assert torch.autograd.gradcheck(fn, (value, loc, factor))
    assert torch.autograd.gradgradcheck(fn, (value, loc, factor))


@pytest.mark.parametrize(
    ("value_shape", "loc_shape", "factor_shape", "match"),
    [
        ((3,), (2,), (2, 2), r"value must have shape \(\*, 2\).*\(3,\)"),
        ((2,), (3,), (2, 2), r"loc must have shape \(\*, 2\).*\(3,\)"),
        ((2,), (2,), (2, 3), r"scale_tril must have shape \(\*, D, D\).*\(2, 3\)"),
        ((2,), (2,), (2,), r"scale_tril must have shape \(\*, D, D\).*\(2,\)"),
        ((), (2,), (2, 2), r"value must have shape \(\*, 2\).*\(\)"),
        (
            (4, 2),
            (2,),
            (3, 2, 2),
            r"batch shapes do not broadcast: value \(4,\).*scale_tril \(3,\)",
        ),
    ],
)
def test_dense_shape_errors(value_shape, loc_shape, factor_shape, match):
    with pytest.raises(ValueError, match=match):
        multivariate_normal_log_prob(
            torch.zeros(value_shape), torch.zeros(loc_shape), torch.ones(factor_shape)
        )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda v, m, f: f.__setitem__((1, 1), 0.0), r"positive diagonal; got 1 diagonal"),
        (lambda v, m, f: f.__setitem__((0, 0), -1.0), r"positive diagonal.*smallest -1"),
        (lambda v, m, f: f.__setitem__((0, 1), 0.5), r"must be lower triangular; 1 entries"),
        (lambda v, m, f: v.__setitem__(0, math.nan), r"value of shape \(2,\) contains 1 NaN"),
        (lambda v, m, f: m.__setitem__(1, math.nan), r"loc of shape \(2,\) contains 1 NaN"),
        (lambda v, m, f: f.__setitem__((1, 0), math.nan), r"scale_tril of shape \(2, 2\) contains"),
    ],
)
def test_dense_value_errors_when_validating(change, match):
    """Validation (default on CPU) names the argument and shape; validate_args=False skips it."""
    value, loc, factor = torch.zeros(2), torch.zeros(2), torch.eye(2)
    change(value, loc, factor)
    with pytest.raises(ValueError, match=match):
        multivariate_normal_log_prob(value, loc, factor)
    with pytest.raises(ValueError, match=match):
        multivariate_normal_log_prob(value, loc, factor, validate_args=True)
    multivariate_normal_log_prob(value, loc, factor, validate_args=False)  # no check, no raise


def test_dense_reads_only_the_lower_triangle_without_validation():
    factor = torch.tensor([[1.0, 7.0], [0.5, 2.0]], dtype=F64)
    got = multivariate_normal_log_prob(
        torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64), factor, validate_args=False
    )
    expected = multivariate_normal_log_prob(
        torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64), factor.tril()
    )
    assert got.item() == expected.item()


# ======================================================================================
# torch.distributions.MultivariateNormal breaks where probloss is exact
# ======================================================================================


def _bivariate_factor(log_s: torch.Tensor, atanh_rho: torch.Tensor) -> torch.Tensor:
    """L of the bivariate normal built in log space (sketch-rnn / Graves parameters).

    ``L = [[sx, 0], [sy rho, sy sqrt(1 - rho^2)]]`` with ``sqrt(1 - rho^2) = 1/cosh(a)``
    evaluated as ``exp(log sy - log_cosh(a))``: exact even where ``tanh(a)`` rounds to 1.
    """
    sx, sy = torch.exp(log_s)
    l21 = sy * torch.tanh(atanh_rho)
    l22 = torch.exp(log_s[1] - log_cosh(atanh_rho))
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero]), torch.stack([l21, l22])])


@pytest.mark.parametrize(
    ("dtype", "atanh_rho"), [(torch.float32, 10.0), (F64, 20.0)], ids=["f32", "f64"]
)
def test_torch_covariance_fails_when_rho_rounds_to_one(dtype, atanh_rho):
    """The user story: covariance [[sx^2, rho sx sy], [rho sx sy, sy^2]] with rho = tanh(a).

    tanh(10) == 1 in float32 and tanh(20) == 1 in float64, so the covariance is singular:
    torch raises (ValueError from its constraint check, LinAlgError without it). Ours, from
    L built in log space, at a point drawn from the distribution: within
    2 eps (scale + cond) of mpmath at the exact L, and within 4 eps (scale + cond) of
    Graves' closed form at the exact parameters (L's entries are within a few eps of
    their exact values; ``cond`` is the first-order effect of relative perturbations eps of
    every input entry, 3e3 (float32) and 4e7 (float64) times scale here: the density is a
    ridge of width L22 = sy / cosh(a)). Measured: 0.09 / 0.04 (exact L), 0.11 / 0.09
    (Graves) of these bounds in float32 / float64; relative error 8e-5 / 1e-9 end to end.
    """
    log_s = torch.tensor([math.log(2.0), math.log(0.5)], dtype=dtype)
    a = torch.tensor(atanh_rho, dtype=dtype)
    rho = torch.tanh(a)
    assert rho.item() == 1.0
    sx, sy = torch.exp(log_s)
    cov = torch.stack([torch.stack([sx**2, rho * sx * sy]), torch.stack([rho * sx * sy, sy**2])])
    loc = torch.tensor([0.3, -0.2], dtype=dtype)
    factor = _bivariate_factor(log_s, a)
    value = (loc.double() + factor.double() @ torch.tensor([0.7, -1.3], dtype=F64)).to(dtype)
    with pytest.raises(ValueError, match="covariance_matrix"):
        MultivariateNormal(loc, covariance_matrix=cov).log_prob(value)
    with pytest.raises(torch.linalg.LinAlgError, match="not positive-definite"):
        MultivariateNormal(loc, covariance_matrix=cov, validate_args=False).log_prob(value)

    got = multivariate_normal_log_prob(value, loc, factor).item()
    log_p, half_maha, log_det_terms = dense_ref(_key(value), _key(loc), _key(factor))
    cond = _dense_cond(value, loc, factor)
    scale = _scale(half_maha, log_det_terms, 2)
    assert cond > 1e3 * scale  # near-singular: the point's offset from the line is ~L22
    assert abs(got - log_p) <= 2 * _eps(dtype) * (scale + cond)
    log_p, half_maha, log_det_terms = graves_ref(_key(value), _key(loc), _key(log_s), a.item())
    assert abs(got - log_p) <= 4 * _eps(dtype) * (_scale(half_maha, log_det_terms, 2) + cond)


@pytest.mark.parametrize(
    ("dtype", "tiny_scale"), [(torch.float32, 1e-25), (F64, 1e-170)], ids=["f32", "f64"]
)
def test_torch_covariance_fails_for_scales_spanning_many_orders(dtype, tiny_scale):
    """sx = tiny_scale, sy = 1/tiny_scale: sx^2 underflows to 0, so torch's Cholesky raises.

    Ours, with L from scale_tril_from_raw (diagonal raw = softplus_inverse(scale),
    min_scale=0, correlation 0.6; the diagonal comes back within eps (1 + |raw|)): within
    4 eps scale of mpmath at the exact L (row-scaled: the problem is well-conditioned).
    """
    s = torch.tensor([tiny_scale, 1.0 / tiny_scale], dtype=dtype)
    raw = torch.stack([softplus_inverse(s[0]), 0.6 * s[1], softplus_inverse(0.8 * s[1])])
    factor = scale_tril_from_raw(raw, 2, min_scale=0.0)
    # softplus(x) ~ e^x for x << 0: a relative error of eps |x| from rounding raw ~ log(s)
    target = torch.stack([s[0], 0.8 * s[1]])
    rtol = _eps(dtype) * (1 + raw[[0, 2]].abs())
    assert ((factor.diagonal() - target).abs() <= rtol * target).all()
    loc = torch.zeros(2, dtype=dtype)
    value = (factor.double() @ torch.tensor([1.5, -0.5], dtype=F64)).to(dtype)
    cov = factor @ factor.mT
    assert cov[0, 0] == 0.0
    with pytest.raises(torch.linalg.LinAlgError, match="not positive-definite"):
        MultivariateNormal(loc, covariance_matrix=cov, validate_args=False).log_prob(value)
    got = multivariate_normal_log_prob(value, loc, factor).item()
    log_p, half_maha, log_det_terms = dense_ref(_key(value), _key(loc), _key(factor))
    assert abs(got - log_p) <= 4 * _eps(dtype) * _scale(half_maha, log_det_terms, 2)


# ======================================================================================
# scale_tril_from_raw
# ======================================================================================


def test_scale_tril_ordering_row_major_lower_triangle():
    """Entry k of raw lands at torch.tril_indices(D, D)[:, k]; diagonal = min_scale + softplus.

    Reference: mpmath ``min_scale + log1p(exp(raw))`` (2 eps); off-diagonal entries exact.
    """
    dim = 4
    raw = torch.linspace(-30.0, 25.0, dim * (dim + 1) // 2, dtype=F64)
    factor = scale_tril_from_raw(raw, dim, min_scale=1e-3)
    rows, cols = torch.tril_indices(dim, dim)
    assert (factor.triu(1) == 0).all()
    for k, (i, j) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        if i != j:
            assert factor[i, j].item() == raw[k].item()
        else:
            assert k == i * (i + 3) // 2
            with mp.workdps(40):
                expected = float(mpmath.mpf(1e-3) + mpmath.log1p(mpmath.exp(raw[k].item())))
            assert factor[i, j].item() == pytest.approx(expected, rel=2 * _eps(F64), abs=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_scale_tril_extreme_raw(dtype):
    """raw in +-1e4 and +-1e30 (+-6e4 for float16, its range): finite, lower triangular,
    diagonal >= min_scale (exactly min_scale where softplus underflows), finite gradients
    that are exactly 1 on off-diagonal entries."""
    big = 6e4 if dtype == torch.float16 else 1e30
    values = [-big, -1e4, -1.0, 0.0, 1.0, 1e4, big]
    dim = 3
    raw = torch.tensor(
        [[v] * 6 for v in values] + [[values[i % 7] for i in range(k, k + 6)] for k in range(7)],
        dtype=dtype,
        requires_grad=True,
    )
    factor = scale_tril_from_raw(raw, dim)
    compute = _compute_dtype(dtype)
    assert factor.dtype == compute and factor.shape == (14, 3, 3)
    min_scale = default_min_scale(dtype)
    assert torch.isfinite(factor).all()
    assert (factor.triu(1) == 0).all()
    diag = factor.diagonal(dim1=-2, dim2=-1)
    assert (diag >= torch.tensor(min_scale, dtype=compute)).all()
    assert (diag[0] == torch.tensor(min_scale, dtype=compute)).all()  # raw = -big
    factor.sum().backward()
    assert torch.isfinite(raw.grad).all()
    off = torch.tensor([k not in (0, 2, 5) for k in range(6)])
    assert (raw.grad[:, off] == 1).all()


def test_scale_tril_default_min_scale():
    """sqrt(eps) of the compute dtype: 3.45e-4 for float32 and half inputs, 1.49e-8 for float64."""
    assert default_min_scale(torch.float32) == pytest.approx(3.4526698e-4, rel=1e-7)
    assert default_min_scale(torch.float16) == default_min_scale(torch.float32)
    assert default_min_scale(torch.bfloat16) == default_min_scale(torch.float32)
    assert default_min_scale(F64) == pytest.approx(1.4901161193847656e-8, rel=1e-15)
    low = torch.full((3,), -1e4, dtype=F64)
    assert (scale_tril_from_raw(low, 2).diagonal() == 1.4901161193847656e-8).all()


def test_scale_tril_min_diag_was_renamed_min_scale():
    """The floor has one name, min_scale (scale units); the old keyword raises a TypeError
    naming the new one, and default_min_diag is kept as an alias of default_min_scale."""
    raw = torch.zeros(3)
    with pytest.raises(TypeError, match="min_diag was renamed min_scale"):
        scale_tril_from_raw(raw, 2, min_diag=1e-3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'floor'"):
        scale_tril_from_raw(raw, 2, floor=1e-3)
    assert default_min_diag is default_min_scale


def test_scale_tril_gradients_reach_every_raw_entry():
    """Through the log density (D = 4, batch 3): every raw entry gets a nonzero, finite
    gradient; float64 gradcheck of raw -> L and of raw -> log density."""
    gen = torch.Generator().manual_seed(5)
    dim = 4
    raw = torch.randn(3, dim * (dim + 1) // 2, generator=gen, dtype=F64).requires_grad_(True)
    value = torch.randn(3, dim, generator=gen, dtype=F64)
    log_p = multivariate_normal_log_prob(
        value, torch.zeros(dim, dtype=F64), scale_tril_from_raw(raw, dim)
    )
    log_p.sum().backward()
    assert torch.isfinite(raw.grad).all() and (raw.grad != 0).all()
    assert torch.autograd.gradcheck(lambda r: scale_tril_from_raw(r, dim), (raw,))
    assert torch.autograd.gradcheck(
        lambda r: multivariate_normal_log_prob(
            value, torch.zeros(dim, dtype=F64), scale_tril_from_raw(r, dim)
        ),
        (raw,),
    )


def _raw_from_factor(factor: torch.Tensor, min_scale: float) -> torch.Tensor:
    """Inverse of scale_tril_from_raw: off-diagonals as they are, softplus_inverse(L_ii - m)."""
    dim = factor.shape[-1]
    rows, cols = torch.tril_indices(dim, dim)
    raw = factor[..., rows, cols].clone()
    diag = rows == cols
    raw[..., diag] = softplus_inverse(factor[..., rows[diag], cols[diag]] - min_scale)
    return raw


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=dtype_id)
def test_scale_tril_round_trip(dtype):
    """raw -> L -> raw and L -> raw -> L, raw ~ U(-5, 5), min_scale 1e-6: within 2 eps (1 + |raw|)
    and 2 eps |L| (the rounding of min_scale + softplus and of softplus_inverse; measured
    0.5 and 0.9 eps)."""
    gen = torch.Generator().manual_seed(6)
    dim, min_scale = 5, 1e-6
    raw = (10 * torch.rand(20, dim * (dim + 1) // 2, generator=gen, dtype=F64) - 5).to(dtype)
    factor = scale_tril_from_raw(raw, dim, min_scale=min_scale)
    back = _raw_from_factor(factor, min_scale)
    eps = _eps(dtype)
    assert ((back - raw).abs() <= 2 * eps * (1 + raw.abs())).all()
    again = scale_tril_from_raw(back, dim, min_scale=min_scale)
    assert ((again - factor).abs() <= 2 * eps * factor.abs()).all()


def test_scale_tril_initialisation_recipe():
    """bias = softplus_inverse(s - min_scale) on the diagonal, 0 elsewhere: L = s I (2 eps)."""
    dim, s, min_scale = 3, 0.05, default_min_scale(torch.float32)
    bias = torch.zeros(dim * (dim + 1) // 2)
    bias[[0, 2, 5]] = softplus_inverse(torch.tensor(s - min_scale))
    factor = scale_tril_from_raw(bias, dim)
    torch.testing.assert_close(factor, s * torch.eye(dim), rtol=0, atol=2 * _eps(torch.float32) * s)


@pytest.mark.parametrize(
    ("shape", "dim", "kwargs", "match"),
    [
        (
            (4, 5),
            3,
            {},
            r"raw must have shape \(\*, D\(D\+1\)/2\) = \(\*, 6\) for dim=3, got shape \(4, 5\)",
        ),
        ((), 1, {}, r"\(\*, 1\) for dim=1, got shape \(\) \(a 0-dim tensor\)"),
        ((3,), 0, {}, r"dim must be a positive int, got 0"),
        ((3,), 2.0, {}, r"dim must be a positive int, got 2.0"),
        ((3,), 2, {"min_scale": -1e-3}, r"min_scale must be finite and >= 0, got -0.001"),
        ((3,), 2, {"min_scale": math.nan}, r"min_scale must be finite and >= 0, got nan"),
    ],
)
def test_scale_tril_errors(shape, dim, kwargs, match):
    with pytest.raises(ValueError, match=match):
        scale_tril_from_raw(torch.zeros(shape), dim, **kwargs)


# ======================================================================================
# Low rank plus diagonal
# ======================================================================================


def _lowrank_case(gen, batch, dim, rank, *, w_scale=1.0, log_diag_sd=1.0):
    w = w_scale * torch.randn((*batch, dim, rank), generator=gen, dtype=F64)
    log_diag = log_diag_sd * torch.randn((*batch, dim), generator=gen, dtype=F64)
    loc = torch.randn((*batch, dim), generator=gen, dtype=F64)
    cov = w @ w.mT + torch.diag_embed(log_diag.exp())
    noise = torch.randn((*batch, dim, 1), generator=gen, dtype=F64)
    value = loc + (torch.linalg.cholesky(cov) @ noise).squeeze(-1)
    return value, loc, w, log_diag


def _dense_from_lowrank(value, loc, w, log_diag):
    cov = w @ w.mT + torch.diag_embed(log_diag.exp())
    return multivariate_normal_log_prob(value, loc, torch.linalg.cholesky(cov))


LOWRANK_SHAPES = [(1, 1), (2, 1), (3, 2), (5, 2), (8, 3), (8, 8), (5, 0)]


@pytest.mark.parametrize(("dim", "rank"), LOWRANK_SHAPES)
def test_lowrank_matches_dense_scipy_and_torch_float64(dim, rank):
    """Moderate inputs, batch 6: against the dense formula (Cholesky of W W^T + D), scipy
    logpdf of that covariance, and torch LowRankMultivariateNormal (values and gradients in
    value, loc, cov_factor, log_diag). Every one of them forms the covariance (or the
    capacitance matrix) and factors it, backward stably: entries within ``eps`` relative,
    hence values within ``4 D eps kappa(Sigma) scale`` of each other (each eigenvalue moves
    by ``eps ||Sigma||``, ``eps kappa`` relative to the smallest), gradients within
    ``4 D eps kappa(Sigma)`` of the largest entry (torch's gradient comes through its
    subtraction form, which cancels by the same factor)."""
    gen = torch.Generator().manual_seed(10 * dim + rank)
    value, loc, w, log_diag = (t.requires_grad_(True) for t in _lowrank_case(gen, (6,), dim, rank))
    ours = lowrank_multivariate_normal_log_prob(value, loc, w, log_diag)
    dense = _dense_from_lowrank(value, loc, w, log_diag).detach()
    cov = (w @ w.mT + torch.diag_embed(log_diag.exp())).detach()
    scipy_vals = torch.tensor(
        [
            scipy.stats.multivariate_normal.logpdf(value[i].detach(), loc[i].detach(), cov[i])
            for i in range(6)
        ],
        dtype=F64,
    )
    z = torch.linalg.solve_triangular(
        torch.linalg.cholesky(cov), (value - loc).detach().unsqueeze(-1), upper=False
    )
    log_det_terms = 0.5 * (log_diag.abs().sum(-1) + torch.logdet(cov) - log_diag.sum(-1)).detach()
    scale = 0.5 * z.square().sum((-2, -1)) + log_det_terms + 0.5 * dim * LOG_2PI
    kappa = torch.linalg.cond(cov)
    tol = 4 * dim * _eps(F64) * kappa * scale
    assert ((ours.detach() - dense).abs() <= tol).all()
    assert ((ours.detach() - scipy_vals).abs() <= tol).all()
    if rank == 0:
        return  # torch's LowRankMultivariateNormal needs rank >= 1
    theirs = LowRankMultivariateNormal(loc, w, log_diag.exp()).log_prob(value)
    assert ((ours.detach() - theirs.detach()).abs() <= tol).all()
    g_ours = torch.autograd.grad(ours.sum(), (value, loc, w, log_diag))
    g_theirs = torch.autograd.grad(theirs.sum(), (value, loc, w, log_diag))
    for a, b in zip(g_ours, g_theirs, strict=True):
        atol = 4 * dim * _eps(F64) * kappa.max().item() * b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def _lowrank_bound(ref, dim, dtype, k=2.0):
    _, half_maha, log_det_terms, cond = ref
    return k * _eps(dtype) * (_scale(half_maha, log_det_terms, dim) + cond)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_lowrank_matches_mpmath(dtype):
    """All dtypes; W ~ N(0, 1) or 30 N(0, 1), log_diag ~ 2 N(0, 1), (D, R) from LOWRANK_SHAPES.
    Bound 2 eps (scale + cond), see module doc (float32 and half inputs are computed in
    float64, so their error is the float32 rounding of the result)."""
    gen = torch.Generator().manual_seed(11)
    for dim, rank in LOWRANK_SHAPES:
        for w_scale in (1.0, 30.0):
            value, loc, w, log_diag = (
                t.to(dtype)
                for t in _lowrank_case(gen, (3,), dim, rank, w_scale=w_scale, log_diag_sd=2.0)
            )
            got = lowrank_multivariate_normal_log_prob(value, loc, w, log_diag)
            assert got.dtype == _compute_dtype(dtype)
            refs = [
                lowrank_ref(_key(value[i]), _key(loc[i]), _key(w[i]), _key(log_diag[i]))
                for i in range(3)
            ]
            assert_within(
                got.double().numpy(),
                [r[0] for r in refs],
                [_lowrank_bound(r, dim, dtype) for r in refs],
                [(dim, rank, w_scale, i) for i in range(3)],
                f"lowrank {dtype}",
            )


def test_lowrank_nearly_collinear_factor_float32():
    """Columns of W equal to 1e-4 relative, |W| ~ 3e3, log_diag = 0, float32 (D = 8, R = 4).

    torch's LowRankMultivariateNormal forms I + W^T D^-1 W and its Cholesky decomposition
    can fail (LinAlgError) where rounding makes it indefinite (7 of these 12 cases on the
    machine this was written on; how many depends on the BLAS, so it is not asserted); ours
    (QR of [W~; I]) is finite and within 2 eps (scale + cond) of mpmath for every case
    (cond is up to 1800 scale here).
    """
    gen = torch.Generator().manual_seed(12)
    for _ in range(12):
        base = torch.randn(8, 1, generator=gen, dtype=F64)
        w = 3e3 * torch.cat(
            [
                base,
                base + 1e-4 * torch.randn(8, 1, generator=gen, dtype=F64),
                torch.randn(8, 2, generator=gen, dtype=F64),
            ],
            1,
        )
        cov = w @ w.mT + torch.eye(8, dtype=F64)
        value = (torch.linalg.cholesky(cov) @ torch.randn(8, generator=gen, dtype=F64)).float()
        w, loc, log_diag = w.float(), torch.zeros(8), torch.zeros(8)
        got = lowrank_multivariate_normal_log_prob(value, loc, w, log_diag).item()
        ref = lowrank_ref(_key(value), _key(loc), _key(w), _key(log_diag))
        assert abs(got - ref[0]) <= _lowrank_bound(ref, 8, torch.float32), (got, ref)


def test_lowrank_point_along_factor_float32():
    """x = W (one column), diagonal e^-30: the quadratic form is ~1 and log p = 25.8473...

    Ours within 2 eps (scale + cond) of mpmath (a float32 evaluation of the ridge form
    missed by 0.75 on an AMD EPYC: the second-order rounding effect (u ||r~||)^2, which that
    first-order bound rightly does not allow for; computed in float64 it is below float32
    rounding); torch's subtraction form ||r~||^2 - ||C^-1 W~^T r~||^2 cancels to 0 and is
    0.5 off.
    """
    w = torch.tensor([[2.0], [1.0], [-1.0]])
    value, loc, log_diag = torch.tensor([2.0, 1.0, -1.0]), torch.zeros(3), torch.full((3,), -30.0)
    got = lowrank_multivariate_normal_log_prob(value, loc, w, log_diag).item()
    ref = lowrank_ref(_key(value), _key(loc), _key(w), _key(log_diag))
    assert abs(got - ref[0]) <= _lowrank_bound(ref, 3, torch.float32)
    theirs = LowRankMultivariateNormal(loc, w, log_diag.exp()).log_prob(value).item()
    assert abs(theirs - ref[0]) > 0.4


@pytest.mark.parametrize(
    ("value_shape", "w_shape", "log_diag_shape"),
    [
        ((7, 4), (4, 2), (4,)),  # shared factor and diagonal
        ((5, 1, 4), (3, 4, 2), (4,)),
        ((4,), (3, 4, 2), (3, 4)),
        ((2, 3, 4), (1, 3, 4, 1), (2, 1, 4)),
    ],
)
def test_lowrank_broadcasting(value_shape, w_shape, log_diag_shape):
    """Each event equals the unbatched call (float64). Bound ``8 D eps kappa(Sigma) scale``: a
    shared factor takes another BLAS path (one solve for all right-hand sides); both are
    backward stable, each within ``4 D eps kappa scale`` (see
    test_lowrank_matches_dense_scipy_and_torch_float64)."""
    gen = torch.Generator().manual_seed(13)
    value = torch.randn(value_shape, generator=gen, dtype=F64)
    w = torch.randn(w_shape, generator=gen, dtype=F64)
    log_diag = torch.randn(log_diag_shape, generator=gen, dtype=F64)
    loc = torch.zeros(4, dtype=F64)
    got = lowrank_multivariate_normal_log_prob(value, loc, w, log_diag)
    batch = torch.broadcast_shapes(value_shape[:-1], w_shape[:-2], log_diag_shape[:-1])
    assert got.shape == batch
    v = value.expand((*batch, 4)).reshape(-1, 4)
    ws = w.expand(batch + w_shape[-2:]).reshape((-1, *w_shape[-2:]))
    ld = log_diag.expand((*batch, 4)).reshape(-1, 4)
    expected = torch.stack(
        [lowrank_multivariate_normal_log_prob(v[i], loc, ws[i], ld[i]) for i in range(v.shape[0])]
    ).reshape(batch)
    terms = 0.5 * ld.abs().sum(-1).reshape(batch) + 0.5 * 4 * LOG_2PI
    # |maha/2 + log det K / 2| <= |log p| + sum |l| / 2 + D/2 log 2 pi (both terms >= 0)
    scale = expected.abs() + 2 * terms
    cov = ws @ ws.mT + torch.diag_embed(ld.exp())
    kappa = torch.linalg.cond(cov).reshape(batch)
    assert ((got - expected).abs() <= 8 * 4 * _eps(F64) * kappa * scale).all()


def test_lowrank_gradcheck_float64():
    """float64 gradcheck and gradgradcheck in (value, loc, cov_factor, log_diag), D = 4, R = 2."""
    gen = torch.Generator().manual_seed(14)
    inputs = tuple(t.requires_grad_(True) for t in _lowrank_case(gen, (2,), 4, 2))
    assert torch.autograd.gradcheck(lowrank_multivariate_normal_log_prob, inputs)
    assert torch.autograd.gradgradcheck(lowrank_multivariate_normal_log_prob, inputs)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_lowrank_gradients_finite(dtype):
    """Finite gradients in every input, every dtype, including nearly collinear large W and
    log_diag at +-40 (diagonal variances e^+-40; +-6 for float16, where larger exact
    gradients exceed the float16 range a float16 leaf's gradient is returned in)."""
    gen = torch.Generator().manual_seed(15)
    value, loc, w, log_diag = _lowrank_case(gen, (4,), 5, 3, w_scale=30.0)
    w[..., 1] = w[..., 0] * (1 + 1e-4)
    extreme = 6.0 if dtype == torch.float16 else 40.0
    log_diag[..., 0] = extreme
    log_diag[..., 1] = -extreme
    inputs = [t.to(dtype).requires_grad_(True) for t in (value, loc, w, log_diag)]
    out = lowrank_multivariate_normal_log_prob(*inputs)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for t in inputs:
        assert t.grad.dtype == dtype
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize(
    ("value_shape", "w_shape", "log_diag_shape", "match"),
    [
        ((3,), (3,), (3,), r"cov_factor must have shape \(\*, D, R\), got \(3,\)"),
        ((2,), (3, 1), (3,), r"value must have shape \(\*, 3\).*\(2,\)"),
        ((3,), (3, 1), (2,), r"log_diag must have shape \(\*, 3\).*\(2,\)"),
        (
            (4, 3),
            (5, 3, 1),
            (3,),
            r"batch shapes do not broadcast: value \(4,\).*cov_factor \(5,\)",
        ),
    ],
)
def test_lowrank_shape_errors(value_shape, w_shape, log_diag_shape, match):
    with pytest.raises(ValueError, match=match):
        lowrank_multivariate_normal_log_prob(
            torch.zeros(value_shape),
            torch.zeros(3),
            torch.ones(w_shape),
            torch.zeros(log_diag_shape),
        )


@pytest.mark.parametrize("name", ["value", "loc", "cov_factor", "log_diag"])
def test_lowrank_nan_errors_when_validating(name):
    args = {
        "value": torch.zeros(3),
        "loc": torch.zeros(3),
        "cov_factor": torch.ones(3, 2),
        "log_diag": torch.zeros(3),
    }
    args[name] = args[name].clone().flatten()
    args[name][0] = math.nan
    args[name] = args[name].reshape(torch.zeros(3, 2).shape if name == "cov_factor" else (3,))
    with pytest.raises(ValueError, match=f"{name} of shape .* contains 1 NaN"):
        lowrank_multivariate_normal_log_prob(**args)
    out = lowrank_multivariate_normal_log_prob(**args, validate_args=False)
    assert torch.isnan(out)
