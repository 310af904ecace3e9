"""Shared oracle of the location-scale tests (``test_normal``, ``test_laplace``,
``test_student_t``): mpmath references and the error check with its bound.

Where the numbers come from
---------------------------
* mpmath (``_stable`` below): the textbook closed forms evaluated at the inputs *after* the
  cast to the dtype under test, with ``x - mu`` formed exactly, at 40 significant digits
  and again at 80 (doubling until every quantity agrees to 25 digits; the lgamma
  difference of the Student-t normaliser loses ``log10(df)`` digits, the df-derivative
  more):

  - normal: ``-z^2/2 - log(sigma) - log(2 pi)/2``, ``z = (x - mu)/sigma``; derivatives
    ``-z/sigma`` (value), ``z/sigma`` (loc), ``(z^2 - 1) * dlog(sigma)/dparam``;
  - Laplace: ``-|x - mu|/b - log(2 b)``; derivatives ``-sign(x - mu)/b``, ``|z| - 1``;
  - Student t: ``lgamma((v+1)/2) - lgamma(v/2) - log(v pi)/2 - log(sigma) - (v+1)/2
    log1p(z^2/v)``; derivative in ``v`` with ``digamma``, in ``x`` and ``log_scale`` by
    the chain rule on ``z``.

  None of the implementation's series, recurrences or branch forms is reused.
* scipy.stats ``norm.logpdf``, ``laplace.logpdf``, ``t.logpdf`` in float64 on seeded random
  moderate inputs (scipy's own error there, measured against mpmath: <= 1.5e-14 for
  ``t`` with df <= 100; it reaches 4e-13 at df = 1e3, so larger df are left to mpmath).

Bounds
------
Log densities are sums of terms of different signs, so their error is bounded relative to
the size of those terms, ``M`` (for the normal ``z^2/2 + |log sigma| + log(2 pi)/2``; for
the t ``|D| + log(2 pi)/2 + |log sigma| + K`` with ``D`` the normaliser's vanishing part and
``K = (v+1)/2 log1p(z^2/v)``): ``|got - exact| <= rtol M + tiny``. Products (the derivatives
in value and loc) are bounded relative to themselves; ``z^2 - 1`` relative to ``z^2 + 1``;
the df-derivative relative to the sum of the magnitudes of its two parts (normaliser and
tail). Half-precision inputs are computed in float32 and held to the float32 bounds.
Where the exact value exceeds the output dtype's ``finfo.max`` the result must be the
infinity of the right sign.

Measured worst errors (relative to the stated magnitude; half inputs: the float32 value,
and gradients rounded once to the half dtype, <= eps/2 = 4.9e-4 f16, 3.9e-3 bf16):

==============================  =========  =========  ====================
quantity                        f32 bound  f64 bound  measured f32 / f64
==============================  =========  =========  ====================
normal value (4 forms)          1e-6       1e-13      2.2e-7 / 5.8e-16
normal d/dvalue, d/dloc         1e-6       1e-13      1.5e-7 / 3.8e-16
normal d/dparam (4 forms)       1e-6       1e-13      3.3e-7 / 6.9e-16
laplace value                   1e-6       1e-13      1.0e-7 / 2.2e-16
laplace d/dvalue, d/dlog_scale  1e-6       1e-13      7.0e-8 / 1.9e-16
student_t value                 1e-6       1e-13      1.5e-7 / 3.0e-16
student_t d/dvalue, d/dls       1e-6       1e-13      2.1e-7 / 5.8e-16
student_t d/ddf                 1e-5       1e-13      2.9e-6 / 2.0e-15
==============================  =========  =========  ====================

The float32 df-derivative is looser because the normaliser's derivative below df = 20
comes from a ten-term recurrence whose terms cancel by up to a factor ~40.
"""

from __future__ import annotations

import functools

import mpmath
import numpy as np
import torch
from mpmath import mp

from tests.functional._checks import HALF_DTYPES, assert_within
from tests.functional.cb_reference import to_float64

RTOL = {torch.float32: 1e-6, torch.float64: 1e-13}
DF_GRAD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-13}
_AGREE = mpmath.mpf(10) ** -25
# the grids shared by the normal and Laplace accuracy tests
LOG_SCALES = [-80.0, -30.0, -5.0, -0.9189385332046727, 0.0, 0.5, 3.0, 30.0, 80.0]
LOCS = [0.0, 0.3, -7.0]


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF_DTYPES else dtype


def grad_rtol(dtype: torch.dtype) -> float:
    """Gradients come back in the input dtype: for half inputs the float32 gradient is
    rounded once to it (<= eps/2), so the bound is that dtype's eps."""
    return torch.finfo(dtype).eps if dtype in HALF_DTYPES else RTOL[dtype]


def stable(fn, *args: float) -> tuple[float, ...]:
    """``fn(*mpf args)`` (a tuple of mpf) at 40, 80, 160, ... digits until every component
    of two successive evaluations agrees to 25 digits; rounded to float64."""
    dps = 40
    with mp.workdps(dps):
        prev = fn(*(mpmath.mpf(a) for a in args))
    while dps < 5000:
        dps *= 2
        with mp.workdps(dps):
            cur = fn(*(mpmath.mpf(a) for a in args))
            if all(abs(c - p) <= _AGREE * abs(c) for c, p in zip(cur, prev, strict=True)):
                return tuple(to_float64(c) for c in cur)
        prev = cur
    raise RuntimeError(f"oracle did not converge at {args}")


def sigma_of(form: str, p):
    return {"scale": p, "log_scale": mp.exp(p), "var": mp.sqrt(p), "log_var": mp.exp(p / 2)}[form]


def _dlogsigma_dparam(form: str, p, sigma):
    return {"scale": 1 / sigma, "log_scale": 1, "var": 1 / (2 * sigma**2), "log_var": 0.5}[form]


@functools.cache
def normal_ref(x: float, mu: float, form: str, p: float) -> tuple[float, ...]:
    """(log p, M, d/dx, d/dmu, d/dparam, magnitude of d/dparam)."""

    def f(x, mu, p):
        sigma = sigma_of(form, p)
        z = mp.fsub(x, mu, exact=True) / sigma
        log_sigma = mp.log(sigma)
        half_log_2pi = mp.log(2 * mp.pi) / 2
        factor = _dlogsigma_dparam(form, p, sigma)
        return (
            -z * z / 2 - log_sigma - half_log_2pi,
            z * z / 2 + abs(log_sigma) + half_log_2pi,
            -z / sigma,
            z / sigma,
            (z * z - 1) * factor,
            (z * z + 1) * abs(factor),
        )

    return stable(f, x, mu, p)


@functools.cache
def laplace_ref(x: float, mu: float, ls: float) -> tuple[float, ...]:
    """(log p, M, d/dx, d/dls, magnitude of d/dls)."""

    def f(x, mu, ls):
        b = mp.exp(ls)
        r = mp.fsub(x, mu, exact=True)
        z = abs(r) / b
        return (-z - ls - mp.log(2), z + abs(ls) + mp.log(2), -mp.sign(r) / b, z - 1, z + 1)

    return stable(f, x, mu, ls)


@functools.cache
def student_t_ref(x: float, df: float, mu: float, ls: float) -> tuple[float, ...]:
    """(log p, M, d/dx, d/dls, magnitude of d/dls, d/ddf, magnitude of d/ddf)."""

    def f(x, v, mu, ls):
        sigma = mp.exp(ls)
        z = mp.fsub(x, mu, exact=True) / sigma
        q = z * z / v
        a = v / 2
        vanishing = mp.loggamma(a + mp.mpf(1) / 2) - mp.loggamma(a) - mp.log(a) / 2
        tail = (v + 1) / 2 * mp.log1p(q)
        value = vanishing - mp.log(2 * mp.pi) / 2 - ls - tail
        magnitude = abs(vanishing) + mp.log(2 * mp.pi) / 2 + abs(ls) + tail
        dtail_dz = (v + 1) * z / (v * (1 + q))
        # d/dv: normaliser part and tail part
        dnorm = (mp.digamma(a + mp.mpf(1) / 2) - mp.digamma(a)) / 2 - 1 / (2 * v)
        dtail = mp.log1p(q) / 2 - (v + 1) / 2 * (q / v) / (1 + q)
        return (
            value,
            magnitude,
            -dtail_dz / sigma,
            v * (z * z - 1) / (v + z * z),  # = dtail_dz z - 1, exactly 0 at |z| = 1
            abs(dtail_dz * z) + 1,
            dnorm - dtail,
            abs(dnorm) + abs(dtail),
        )

    return stable(f, x, df, mu, ls)


def check(got, exact, magnitude, rtol, out_dtype, labels, what):
    """``|got - exact| <= rtol * magnitude + tiny``; where ``|exact|`` exceeds the output
    dtype's range, ``got`` must be the infinity of the same sign."""
    got = np.asarray(got, dtype=np.float64)
    exact = np.asarray(exact, dtype=np.float64)
    magnitude = np.abs(np.asarray(magnitude, dtype=np.float64))
    over = np.abs(exact) > torch.finfo(out_dtype).max
    bad = np.flatnonzero(over & ~(got == np.copysign(np.inf, exact)))
    assert not bad.size, f"{what}: expected overflow to inf at {[labels[i] for i in bad[:5]]}"
    keep = np.flatnonzero(~over)
    bound = rtol * magnitude[keep] + torch.finfo(out_dtype).tiny
    return assert_within(got[keep], exact[keep], bound, [labels[i] for i in keep], what)


def cast(values, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).to(dtype)
