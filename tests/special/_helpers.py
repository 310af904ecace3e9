"""Shared grids, reference tables, evaluation and error checks for the
``probloss.special`` tests.

Where the numbers come from
---------------------------
* Inputs: built in float64 (extreme magnitudes of the dtype, a dense linear
  grid over [-20, 20], a log grid over [1e-3, 1e3], the float neighbours of
  ln 2), then cast to the dtype under test (round to nearest) and
  de-duplicated.  The reference is always evaluated at the *cast* value, so
  half-precision grids contain only values representable in that dtype.
* Expected values: ``tests/reference.py`` (mpmath closed forms at adaptive
  precision), rounded once to float64.  Rounding the reference to float64
  adds at most 1.1e-16 relative error, negligible against every bound below.

Error criterion (see :func:`assert_matches`), per point, for dtype ``d``:
* exact value NaN                       -> result must be NaN;
* ``tiny(d) <= |exact| <= max(d)``      -> ``|got - exact| <= rtol |exact| + atol``;
* ``|exact| < tiny(d)`` (underflow)     -> ``|got - exact| <= tiny(d) + atol``;
* ``|exact| > max(d)`` (overflow)       -> ``got`` is inf of the right sign, or
  finite within ``rtol`` (a value just above max may round down to max).
Every result that is not NaN/inf by the rules above must be finite.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tests import reference as ref

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DTYPE_IDS = {
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float32: "f32",
    torch.float64: "f64",
}

LN2 = math.log(2.0)


# --------------------------------------------------------------------------
# Tolerances
# --------------------------------------------------------------------------


def value_rtol(dtype: torch.dtype) -> float:
    """Relative bound for values and first derivatives (the project's contract).

    float64: 1e-13; float32: 1e-6 (8.4 ulp). Derivation: every function
    here is, on each branch, at most about six elementary operations
    (exp, expm1, log, log1p, logsigmoid, a multiply, divide or a sum of
    same-signed terms), each within an ulp of its exact result, composed
    with condition numbers <= 1.5 (the branches are chosen so that no form
    cancels), hence <= ~6 x 1.5 = 9 ulp: 1e-6 in float32; float64 is held to
    the looser contract 1e-13 (450 ulp). float16/bfloat16: one machine
    epsilon of the dtype (the result is computed in float32 and rounded once
    to the half dtype: rounding contributes <= eps/2, the float32
    computation <= 1e-6 relative, so eps covers that double rounding).
    """
    if dtype == torch.float64:
        return 1e-13
    if dtype == torch.float32:
        return 1e-6
    return torch.finfo(dtype).eps


def third_derivative_tol(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for the third derivative of the CB log-partition
    (d/deta cb_variance, and the second derivative of cb_mean).

    Both forms of the third derivative are a difference of two terms. Error
    bound: on the series branch (|eta| <= 4) S and S' come from Horner's rule
    with non-negative coefficients at u >= 0 (relative error <= n eps for n
    terms: 7 in float32, 12 in float64, see ``_series_coefficients``), so
    D = 1 + uS and W' = S + uS' are within (n + 2) eps and each of the two
    terms, a product/quotient of at most six such factors, within
    6 (n + 2) eps; the terms cancel by at most a factor 3.1 (max of
    (|t1| + |t2|) / |t1 - t2| over |eta| <= 4, float64 on 80000 points).
    On the closed branch (|eta| > 4) the terms -2/a^3 and q(1+q)(1+2q),
    q = 1/expm1(a), are within 6 eps and cancel by at most 4.5 (at
    |eta| = 4, decreasing). Bound: (3.1 x 6 (n + 2) + 1) eps: 168 eps
    (2.0e-5) in float32, 261 eps (5.8e-14) in float64; half dtypes: the
    float32 result rounded once, within eps of the half dtype. No absolute
    floor: the relative error does not grow at the zero crossing eta = 0
    (the third derivative ~ -eta/120 there, and the series terms carry the
    factor h = eta/2).
    """
    if dtype in (torch.float32, torch.float64):
        n = 7 if dtype == torch.float32 else 12
        return (3.1 * 6 * (n + 2) + 1) * torch.finfo(dtype).eps, 0.0
    return torch.finfo(dtype).eps, 0.0


# --------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------


def smallest_subnormal(dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps


def _cast_unique(values, dtype: torch.dtype) -> np.ndarray:
    """Cast float64 values to ``dtype`` (round to nearest), drop the ones that
    overflowed, return the distinct cast values as exact float64, sorted."""
    t = torch.tensor(np.asarray(values, dtype=np.float64), dtype=torch.float64).to(dtype)
    t = t[torch.isfinite(t)]
    out = np.unique(t.to(torch.float64).numpy())
    # np.unique merges -0.0 and 0.0; keep a single +0.0.
    out[out == 0.0] = 0.0
    return out


def _neighbours(center: float, dtype: torch.dtype, count: int) -> list[float]:
    """``center`` rounded to dtype, plus its ``count`` float neighbours on each side."""
    c = torch.tensor(center, dtype=torch.float64).to(dtype)
    out = [c.item()]
    for direction in (math.inf, -math.inf):
        v = c
        d = torch.tensor(direction, dtype=dtype)
        for _ in range(count):
            v = torch.nextafter(v, d)
            out.append(v.item())
    return out


def extreme_magnitudes(dtype: torch.dtype) -> list[float]:
    """Positive magnitudes from the smallest subnormal to finfo.max."""
    fi = torch.finfo(dtype)
    sub = smallest_subnormal(dtype)
    pts = [
        sub,
        2 * sub,
        3 * sub,
        fi.tiny / 2,
        fi.tiny * (1 - fi.eps),  # largest subnormal
        fi.tiny,
        fi.tiny * (1 + fi.eps),
        math.sqrt(fi.tiny),
        math.sqrt(fi.max),
        fi.max / 2,
        *_neighbours(fi.max, dtype, 2),  # max and the two floats below it
        # magnitudes the specification names explicitly
        1e-30,
        1e-20,
        1e-10,
        1e-4,
        1e4,
        1e5,
        1e10,
        1e20,
        1e30,
    ]
    lo = math.floor(math.log10(sub))
    hi = math.floor(math.log10(fi.max))
    for k in range(lo, hi + 1):
        # two points per decade near 1, one per ten decades far out (the
        # functions are single power laws / logs out there, and the mpmath
        # work at tiny magnitudes needs over a thousand digits per point)
        if abs(k) <= 40:
            pts += [10.0**k, 3.7 * 10.0**k]
        elif k % 10 == 0:
            pts.append(10.0**k)
    # log-spaced, mantissa-rich points in [1e-3, 1e3]: 100 per decade
    pts += np.logspace(-3.0, 3.0, 601).tolist()
    # around exp-overflow thresholds of float32/float64 and the tails of
    # exp(-x) in every dtype
    pts += [11.0, 15.9, 16.7, 36.0, 36.8, 37.5, 44.4, 88.0, 88.8, 89.5, 103.9, 104.5]
    pts += [709.0, 709.9, 710.5, 744.4, 745.2, 746.0]
    return pts


def real_grid(dtype: torch.dtype) -> np.ndarray:
    """Symmetric grid over the whole finite real line of ``dtype``."""
    mags = extreme_magnitudes(dtype)
    dense = np.linspace(-20.0, 20.0, 4001)
    pts = [0.0, *mags, *(-m for m in mags), *dense.tolist()]
    # the switch between series and closed form lives in |eta| in [1, 8]:
    # add the float neighbours of a few integers/half integers there.
    for c in (0.5, 1.0, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0):
        nb = _neighbours(c, dtype, 3)
        pts += nb + [-v for v in nb]
    return _cast_unique(pts, dtype)


def nonneg_grid(dtype: torch.dtype) -> np.ndarray:
    """Grid over [0, finfo.max] with the float neighbours of ln 2."""
    mags = extreme_magnitudes(dtype)
    dense = np.linspace(0.0, 20.0, 2001)
    pts = [0.0, *mags, *dense.tolist(), *_neighbours(LN2, dtype, 16)]
    for c in (0.5, 1.0, 2.0, 4.0, 8.0):
        pts += _neighbours(c, dtype, 3)
    return _cast_unique(pts, dtype)


# --------------------------------------------------------------------------
# Function table
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    name: str
    domain: str  # "real" or "nonneg"
    value: Callable[[float], object]
    grad: Callable[[float], object]


SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec("log1mexp", "nonneg", ref.log1mexp, ref.log1mexp_grad),
        Spec("softplus_inverse", "nonneg", ref.softplus_inverse, ref.softplus_inverse_grad),
        Spec("log_cosh", "real", ref.log_cosh, ref.log_cosh_grad),
        Spec("softplus", "real", ref.softplus, ref.softplus_grad),
        Spec("log_softplus", "real", ref.log_softplus, ref.log_softplus_grad),
        Spec("cb_log_partition", "real", ref.cb_log_partition, ref.cb_mean),
        Spec("cb_mean", "real", ref.cb_mean, ref.cb_variance),
        Spec("cb_variance", "real", ref.cb_variance, ref.cb_variance_grad),
        Spec("cb_entropy", "real", ref.cb_entropy, ref.cb_entropy_grad),
    )
}
NAMES = tuple(SPECS)


def impl(name: str):
    """The implementation under test, imported lazily so that collection
    works (and each test fails with the import error) before it exists."""
    import probloss.special as special

    return getattr(special, name)


@functools.cache
def grid(domain: str, dtype: torch.dtype) -> np.ndarray:
    return real_grid(dtype) if domain == "real" else nonneg_grid(dtype)


@functools.cache
def reference_table(name: str, dtype: torch.dtype, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, exact values rounded to float64) for ``kind`` in
    {"value", "grad", "grad2"} ("grad2": second derivative, CB mean and
    log-partition only).  Computed once per process."""
    spec = SPECS[name]
    x = grid(spec.domain, dtype)
    if kind == "value":
        f = spec.value
    elif kind == "grad":
        f = spec.grad
    elif kind == "grad2":
        f = {"cb_mean": ref.cb_variance_grad, "cb_log_partition": ref.cb_variance}[name]
    else:
        raise ValueError(kind)
    y = np.array([ref.to_float64(f(float(v))) for v in x], dtype=np.float64)
    return x, y


# --------------------------------------------------------------------------
# Evaluation (vectorised, autograd)
# --------------------------------------------------------------------------


def evaluate(name: str, x64: np.ndarray, dtype: torch.dtype, order: int = 0):
    """Evaluate ``name`` on ``x64`` (exactly representable in ``dtype``).

    Returns float64 numpy arrays: [value] for order 0, [value, d/dx] for
    order 1, [value, d/dx, d2/dx2] for order 2.  Derivatives come from
    torch.autograd with unit upstream gradient (elementwise function, so
    the vector-Jacobian product is the derivative itself).  The dtype of every
    output is checked to equal ``dtype``.
    """
    fn = impl(name)
    x = torch.tensor(x64, dtype=torch.float64).to(dtype)
    assert np.array_equal(x.to(torch.float64).numpy(), x64), "grid not representable"
    x.requires_grad_(order > 0)
    y = fn(x)
    assert y.dtype == dtype, f"{name}: output dtype {y.dtype} for input {dtype}"
    assert y.shape == x.shape
    outs = [y]
    if order >= 1:
        (g,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=order >= 2)
        assert g.dtype == dtype, f"{name}: gradient dtype {g.dtype} for input {dtype}"
        outs.append(g)
    if order >= 2:
        (g2,) = torch.autograd.grad(outs[1], x, torch.ones_like(outs[1]))
        assert g2.dtype == dtype
        outs.append(g2)
    return [o.detach().to(torch.float64).numpy() for o in outs]


# --------------------------------------------------------------------------
# Error check
# --------------------------------------------------------------------------


@dataclass
class ErrorReport:
    """Per-point verdicts plus the worst offender (largest err/bound)."""

    x: np.ndarray
    got: np.ndarray
    expected: np.ndarray
    ratio: np.ndarray  # error / bound; inf for a wrong non-finite result
    rel: np.ndarray  # relative error where the exact value is in the normal range, else nan
    rtol: float
    atol: float
    what: str

    @property
    def failures(self) -> np.ndarray:
        return np.flatnonzero(~(self.ratio <= 1.0))

    @property
    def max_rel(self) -> float:
        r = self.rel[np.isfinite(self.rel)]
        return float(r.max()) if r.size else 0.0

    @property
    def argmax_rel(self) -> int:
        r = np.where(np.isfinite(self.rel), self.rel, -1.0)
        return int(r.argmax())

    def describe(self, i: int) -> str:
        return (
            f"x={self.x[i]!r}: got={self.got[i]!r} expected={self.expected[i]!r} "
            f"rel_err={self.rel[i]:.3g} err/bound={self.ratio[i]:.3g}"
        )

    def message(self, limit: int = 6) -> str:
        bad = self.failures
        order = bad[np.argsort(-np.nan_to_num(self.ratio[bad], nan=np.inf))]
        lines = [
            f"{self.what}: {bad.size} of {self.x.size} points outside the bound "
            f"(rtol={self.rtol:g}, atol={self.atol:g}; tiny/overflow rules in _helpers.py). "
            f"Worst first:"
        ]
        lines += ["  " + self.describe(int(i)) for i in order[:limit]]
        return "\n".join(lines)


def error_report(
    x: np.ndarray,
    got: np.ndarray,
    expected: np.ndarray,
    dtype: torch.dtype,
    rtol: float,
    atol: float = 0.0,
    what: str = "",
) -> ErrorReport:
    fi = torch.finfo(dtype)
    tiny, big = fi.tiny, fi.max
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    ratio = np.full(x.shape, np.inf)
    rel = np.full(x.shape, np.nan)
    with np.errstate(all="ignore"):
        aexp = np.abs(expected)
        err = np.abs(got - expected)
        exp_nan = np.isnan(expected)
        normal = (aexp >= tiny) & (aexp <= big)
        under = aexp < tiny
        over = ~exp_nan & (aexp > big)
        fin = np.isfinite(got)

        ratio[exp_nan & np.isnan(got)] = 0.0

        m = normal & fin
        rel[m] = err[m] / aexp[m]
        ratio[m] = err[m] / (rtol * aexp[m] + atol)

        m = under & fin
        ratio[m] = err[m] / (tiny + atol)

        m = over & np.isinf(got) & (np.sign(got) == np.sign(expected))
        ratio[m] = 0.0
        m = over & fin
        ratio[m] = err[m] / (rtol * aexp[m])
    return ErrorReport(x, got, expected, ratio, rel, rtol, atol, what)


def assert_matches(x, got, expected, dtype, rtol, atol=0.0, what=""):
    """Assert ``got`` matches the float64-rounded exact ``expected`` under the
    rules of the module docstring; the message lists the worst inputs."""
    rep = error_report(x, got, expected, dtype, rtol, atol, what)
    assert rep.failures.size == 0, rep.message()
    return rep
