"""mpmath oracles of the multivariate normal log densities, shared by
``test_multivariate.py`` (dense), ``test_multivariate_scale_tril.py``, ``test_lowrank.py``
and ``test_multivariate_edges.py``.

Where the numbers come from
---------------------------
The covariance is formed *as a matrix* at high precision (``Sigma = L L^T``,
``W W^T + diag(exp(log_diag))`` or Graves' bivariate closed form from
``sigma_x, sigma_y, rho = tanh(a)``), and ``Sigma^{-1} r`` and ``det Sigma`` come from a
plain Gaussian elimination with partial pivoting written here: nothing of the
implementation (triangular solves, QR, scaled norms) is reused. Inputs are the exact
values after the cast to the dtype under test. Each oracle is evaluated at 80 digits,
then 160, ... until two successive evaluations agree to 25 significant digits (a
covariance with scales from 1e-150 to 1e150 has a condition number of 1e600 and needs
about 1300 digits), and is cached.

The sizes the bounds are stated in
----------------------------------
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
"""

from __future__ import annotations

import functools
import math

import mpmath
import numpy as np
import torch
from mpmath import mp
from mpmath.libmp import round_nearest, to_float

from tests.functional._checks import HALF_DTYPES

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
