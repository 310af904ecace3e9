"""Tests of ``probloss.special.exp.expm1mx(x) = exp(x) - 1 - x``.

Where the numbers come from
---------------------------
* Inputs: float64 values (both signs of ``extreme_magnitudes`` from ``_helpers.py``: the
  smallest subnormal to ``finfo.max``; a dense grid over [-3, 3]; the float neighbours of
  -1, 0 and 1, where the implementation switches forms), cast to the dtype under test and
  de-duplicated. The reference is evaluated at the cast value.
* Expected values: mpmath, closed form ``exp(x) - 1 - x`` (and ``expm1(x)`` for the
  derivative) at ``40 + 2 log10(1/|x|)`` significant digits: the closed form cancels to
  ``x^2/2`` for small ``|x|``, losing ``2 log10(1/|x|)`` digits, so 40 remain.
  ``test_oracle_is_converged`` re-evaluates a sample with 30 more digits. None of the
  implementation's series or branch forms is reused.

Bounds (``_helpers.value_rtol``; over- and underflow rules of ``_helpers.assert_matches``)
-----------------------------------------------------------------------------------------
=========  ==========  =====================================================
dtype      bound       measured worst relative error (value / derivative)
=========  ==========  =====================================================
float64    1e-13       2.7e-16 / 8.2e-16
float32    1e-6        1.4e-7  / 2.3e-7
bfloat16   eps 7.8e-3  3.9e-3  / 3.8e-3 (one rounding of the float32 result)
float16    eps 9.8e-4  4.8e-4  / 4.7e-4 (one rounding of the float32 result)
=========  ==========  =====================================================
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpmath import mp
from torch.autograd import gradcheck, gradgradcheck

from probloss.special.exp import expm1mx
from tests.reference import to_float64
from tests.special._helpers import (
    DTYPE_IDS,
    DTYPES,
    assert_matches,
    error_report,
    extreme_magnitudes,
    value_rtol,
)

dtype_param = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])


def _digits(x: float) -> int:
    """40 digits plus the 2 log10(1/|x|) that exp(x) - 1 - x cancels near 0."""
    return int(40 + 2 * max(0.0, -math.log10(abs(x))))


@functools.cache
def _exact(x: float, extra: int = 0):
    if x == 0.0:
        return mp.mpf(0)
    with mp.workdps(_digits(x) + extra):
        xm = mp.mpf(x)
        return +(mp.exp(xm) - 1 - xm)


@functools.cache
def _exact_grad(x: float):
    with mp.workdps(40):
        return +mp.expm1(mp.mpf(x))


def _neighbours(center: float, dtype: torch.dtype, count: int = 4) -> list[float]:
    c = torch.tensor(center, dtype=dtype)
    out = [c.item()]
    for direction in (math.inf, -math.inf):
        v = c
        for _ in range(count):
            v = torch.nextafter(v, torch.tensor(direction, dtype=dtype))
            out.append(v.item())
    return out


@functools.cache
def _grid(dtype: torch.dtype) -> np.ndarray:
    mags = extreme_magnitudes(dtype)
    pts = [0.0, *mags, *(-m for m in mags), *np.linspace(-3.0, 3.0, 1201).tolist()]
    for c in (-1.0, 0.0, 1.0):
        pts += _neighbours(c, dtype)
    t = torch.tensor(pts, dtype=torch.float64).to(dtype)
    t = t[torch.isfinite(t)]
    out = np.unique(t.to(torch.float64).numpy())
    out[out == 0.0] = 0.0
    return out


@functools.cache
def _table(dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = _grid(dtype)
    value = np.array([to_float64(_exact(float(v))) for v in x])
    grad = np.array([to_float64(_exact_grad(float(v))) for v in x])
    return x, value, grad


def _evaluate(x64: np.ndarray, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    x = torch.tensor(x64, dtype=torch.float64).to(dtype).requires_grad_(True)
    y = expm1mx(x)
    assert y.dtype == dtype and y.shape == x.shape
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert g.dtype == dtype
    return y.detach().double().numpy(), g.double().numpy()


# --------------------------------------------------------------------------------------
# Accuracy against mpmath
# --------------------------------------------------------------------------------------


@dtype_param
def test_value_matches_mpmath(dtype):
    x, expected, _ = _table(dtype)
    got, _ = _evaluate(x, dtype)
    assert_matches(x, got, expected, dtype, value_rtol(dtype), what=f"expm1mx {dtype}")


@dtype_param
def test_derivative_is_expm1(dtype):
    """The autograd derivative against mpmath's ``expm1(x)``; finite at every grid point
    except where ``expm1`` itself overflows (x > log(finfo.max))."""
    x, _, expected = _table(dtype)
    _, got = _evaluate(x, dtype)
    assert_matches(x, got, expected, dtype, value_rtol(dtype), what=f"d expm1mx {dtype}")
    representable = np.abs(expected) <= torch.finfo(dtype).max
    assert np.isfinite(got[representable]).all()


def test_bound_rejects_the_naive_formula():
    """The float32 bound is tight enough to fail ``expm1(x) - x`` (relative error ~2 eps/|x|
    near 0), so the accuracy tests above can fail."""
    x, expected, _ = _table(torch.float32)
    keep = (np.abs(x) > 1e-4) & (np.abs(x) < 0.5)
    xt = torch.tensor(x[keep], dtype=torch.float32)
    naive = (torch.expm1(xt) - xt).double().numpy()
    report = error_report(x[keep], naive, expected[keep], torch.float32, value_rtol(torch.float32))
    assert report.failures.size > 0


def test_oracle_is_converged():
    """The oracle at 30 more digits agrees to 1e-30 relative on a sample (incl. tiny x)."""
    for x in (5e-324, 1e-200, -3e-8, 1e-3, -0.75, 1.0, -1.0, 25.0, -1e300, 700.0):
        a, b = _exact(x), _exact(x, extra=30)
        assert abs(a - b) <= mp.mpf(10) ** -30 * abs(b), x


# --------------------------------------------------------------------------------------
# Contract: exact values, sign, dtype, gradients
# --------------------------------------------------------------------------------------


@dtype_param
@pytest.mark.parametrize("zero", [0.0, -0.0], ids=["+0", "-0"])
def test_zero_value_and_gradient(dtype, zero):
    x = torch.tensor(zero, dtype=dtype, requires_grad=True)
    y = expm1mx(x)
    (g,) = torch.autograd.grad(y, x)
    assert y.item() == 0.0 and g.item() == 0.0


@dtype_param
def test_never_negative_on_grid(dtype):
    got, _ = _evaluate(_grid(dtype), dtype)
    assert (got >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: DTYPE_IDS[d])
def test_never_negative_and_gradient_finite_property(dtype):
    """For any finite x: value >= 0 (exactly: e^x >= 1 + x), gradient finite where
    expm1(x) is (x <= 0.99 log(finfo.max))."""
    width = 32 if dtype == torch.float32 else 64
    top = float(torch.tensor(0.99 * math.log(torch.finfo(dtype).max), dtype=dtype))

    @settings(max_examples=300, deadline=None)
    @given(st.floats(allow_nan=False, allow_infinity=False, width=width, max_value=top))
    def check(v):
        x = torch.tensor(v, dtype=dtype, requires_grad=True)
        y = expm1mx(x)
        (g,) = torch.autograd.grad(y, x)
        assert y >= 0 and torch.isfinite(y) and torch.isfinite(g), (v, y, g)

    check()


def test_shapes_broadcast_and_python_numbers():
    x = torch.linspace(-2.0, 2.0, 12, dtype=torch.float64).reshape(3, 4).t()
    assert not x.is_contiguous()
    assert torch.equal(expm1mx(x), expm1mx(x.contiguous()))
    assert expm1mx(torch.zeros(0, 3)).shape == (0, 3)
    assert expm1mx(0.5).dtype == torch.get_default_dtype()
    with pytest.raises(TypeError, match="floating"):
        expm1mx(torch.tensor([1, 2]))


POINTS = [-700.0, -40.0, -3.0, -1.0001, -1.0, -0.9999, -0.5, -1e-3, -1e-9, 0.0]
POINTS += [1e-9, 1e-3, 0.3, 0.9999, 1.0, 1.0001, 2.5, 30.0, 300.0]


def test_gradcheck_and_gradgradcheck_float64():
    """float64 finite differences (gradcheck defaults, full Jacobian) at points on both sides
    of the switches at +-1 and in every branch; second derivative exp(x) as well."""
    x = torch.tensor(POINTS, dtype=torch.float64, requires_grad=True)
    assert gradcheck(expm1mx, (x,), fast_mode=False)
    assert gradgradcheck(expm1mx, (x,), fast_mode=False)


@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")  # torch's
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_private_expm1_is_exact_while_compiling(dtype):
    """Inductor's CPU vector ``expm1`` is ``exp(x) - 1`` (torch 2.13); the library's expm1
    keeps every digit under ``torch.compile``. Bound: 4 eps relative (the tanh form: tanh
    and the quotient within an ulp each, ``e^x - 1`` within 2.6 ulps above 1/2)."""
    from probloss.special.exp import expm1

    tiny = math.log10(torch.finfo(dtype).tiny)
    mags = torch.logspace(tiny - 6, 0, 700, dtype=torch.float64)
    x = torch.cat([mags, -mags, torch.linspace(-60, 60, 241, dtype=torch.float64)]).to(dtype)
    torch._dynamo.reset()
    got = torch.compile(expm1, fullgraph=True)(x).double()
    with mp.workdps(50):
        want = [float(mp.expm1(mp.mpf(float(v)))) for v in x.double()]
    want = torch.tensor(want, dtype=torch.float64)
    rel = (got - want).abs() / want.abs().clamp_min(torch.finfo(torch.float64).tiny)
    assert float(rel.max()) <= 4 * torch.finfo(dtype).eps, float(rel.max())
