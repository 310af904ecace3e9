"""Tests of ``probloss.special.floor``: ``softplus`` and ``soft_floor``.

Where the numbers come from
---------------------------
* ``softplus`` and its derivative: the mpmath oracle ``tests/reference.py``
  (``log1p(exp(x))`` and ``1/(1 + exp(-x))`` at 40+ digits), at the inputs after the cast
  to the dtype under test. Bounds: ``_helpers.value_rtol`` (1e-13 float64, 1e-6 float32,
  eps for half dtypes) with the under/overflow rules of ``_helpers.assert_matches``.
* ``soft_floor(log s, log m) = log(s + m)``: mpmath ``log(exp(a) + exp(b))`` at 50 digits.
  ``m + softplus(a - m)`` rounds ``a - m`` and adds ``m`` back, so its error is a few ulp
  of the larger of ``|a|``, ``|m|``, ``|a - m|``, not of the result (measured 1.3e-2
  *relative* at ``a = 0, m = -30`` in float64, where the result is 9e-14): the bound is
  ``rtol (|a| + |m| + |result|)`` with the dtype's value rtol. Its derivative
  ``s / (s + m) = sigmoid(a - m)``: mpmath, relative bound ``rtol (1 + |a - m|)`` (the
  rounding of ``a - m`` is amplified by ``|a - m|`` where the sigmoid is tiny).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from mpmath import mp

from probloss.special.floor import soft_floor, softplus
from tests import reference as ref
from tests.functional._checks import assert_within
from tests.special._helpers import DTYPE_IDS, DTYPES, assert_matches, value_rtol

dtype_param = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])

MAGNITUDES = [0.0, 1e-30, 1e-8, 0.5, 1.0, 5.0, 15.0, 19.9, 20.0, 20.1, 25.0, 30.0, 36.0]
MAGNITUDES += [37.0, 40.0, 50.0, 88.0, 100.0, 700.0, 1e4, 1e30]


@functools.cache
def _softplus_table(dtype: torch.dtype):
    pts = MAGNITUDES + [-m for m in MAGNITUDES] + np.linspace(20.0, 40.0, 201).tolist()
    t = torch.tensor(pts, dtype=torch.float64).to(dtype)
    x = np.unique(t[torch.isfinite(t)].double().numpy())
    value = np.array([ref.to_float64(ref.softplus(float(v))) for v in x])
    grad = np.array([ref.to_float64(ref.softplus_grad(float(v))) for v in x])
    return x, value, grad


@dtype_param
def test_softplus_matches_mpmath(dtype):
    """Value and derivative (sigmoid) from -1e30 to 1e30, dense in (20, 40)."""
    x64, value, grad = _softplus_table(dtype)
    x = torch.tensor(x64).to(dtype).requires_grad_()
    y = softplus(x)
    assert y.dtype == dtype
    (g,) = torch.autograd.grad(y.sum(), x)
    rtol = value_rtol(dtype)
    assert_matches(x64, y.detach().double().numpy(), value, dtype, rtol, what="softplus")
    assert_matches(x64, g.double().numpy(), grad, dtype, rtol, what="softplus grad")


def test_softplus_exact_where_torch_threshold_drops_a_term():
    """float64, x in (20, 40): F.softplus returns x (threshold 20), off by log1p(e^-x) up to
    2e-9 absolute, 1e-10 relative; ours meets 1e-13 relative (the check on F.softplus makes
    sure this grid is where the threshold bites)."""
    x64 = np.linspace(20.0, 40.0, 201)[1:-1]
    exact = np.array([ref.to_float64(ref.softplus(float(v))) for v in x64])
    x = torch.tensor(x64)
    torch_err = np.abs(torch.nn.functional.softplus(x).numpy() - exact) / exact
    assert torch_err.max() > 5e-11
    assert_matches(x64, softplus(x).numpy(), exact, torch.float64, 1e-13, what="softplus")


# --------------------------------------------------------------------------------------
# soft_floor
# --------------------------------------------------------------------------------------

LOG_S = [-80.0, -30.0, -7.0, -1.0, 0.0, 1e-3, 0.5, 3.0, 20.0, 80.0]
LOG_M = [-30.0, -13.8, -7.0, -2.3, 0.0, 2.0]


@functools.cache
def _log_sum_exp(a: float, b: float) -> tuple[float, float]:
    with mp.workdps(50):
        ea, eb = mp.exp(mp.mpf(a)), mp.exp(mp.mpf(b))
        return ref.to_float64(mp.log(ea + eb)), ref.to_float64(ea / (ea + eb))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: DTYPE_IDS[d])
def test_soft_floor_of_logs_is_log_of_sum(dtype):
    """soft_floor(log s, log m) = log(s + m) (bound in the module docstring); derivative in
    the first argument s / (s + m), relative."""
    pairs = [(a, b) for a in LOG_S for b in LOG_M]
    a64 = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    b64 = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    a, b = a64.to(dtype).requires_grad_(), b64.to(dtype)
    out = soft_floor(a, b)
    (g,) = torch.autograd.grad(out.sum(), a)
    cast = list(zip(a.tolist(), b.tolist(), strict=True))
    expected = np.array([_log_sum_exp(*p) for p in cast])
    rtol = value_rtol(dtype)
    magnitude = np.abs(a.detach().double().numpy()) + np.abs(b.double().numpy())
    magnitude += np.abs(expected[:, 0])
    got = out.detach().double().numpy()
    assert_within(got, expected[:, 0], rtol * magnitude, cast, "soft_floor")
    # the derivative sigmoid(a - m) inherits the rounding of a - m, |a - m| eps / 2
    # relative where it is tiny (measured 3.1e-6 at a - m = -77.7 in float32)
    condition = 1.0 + np.abs(a.detach().double().numpy() - b.double().numpy())
    bound = rtol * condition * np.abs(expected[:, 1]) + torch.finfo(dtype).tiny
    assert_within(g.double().numpy(), expected[:, 1], bound, cast, "d/dx")


def test_soft_floor_example_scales():
    """In scale space the floor is additive: exp(soft_floor(log s, log m)) = s + m (float64,
    1e-15 relative: one exp of an argument of size <= 7 after a few-ulp log)."""
    s = torch.tensor([1e-30, 1e-3, 1.0, 148.4], dtype=torch.float64)
    m = 1e-3
    out = soft_floor(s.log(), math.log(m)).exp()
    torch.testing.assert_close(out, s + m, rtol=2e-15, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: DTYPE_IDS[d])
def test_soft_floor_gradient_in_unit_interval(dtype):
    """d soft_floor / dx = sigmoid(x - m): strictly inside (0, 1) wherever sigmoid is not
    rounded to 0 or 1 (|x - m| <= 15 in float32, <= 30 in float64), inside [0, 1] and never
    NaN for any x up to +-1e30; d/dfloor = 1 - d/dx."""
    width = 15.0 if dtype == torch.float32 else 30.0
    x = torch.linspace(-width, width, 301, dtype=dtype) - 7.0
    x.requires_grad_()
    floor = torch.tensor(-7.0, dtype=dtype, requires_grad=True)
    (gx, gf) = torch.autograd.grad(soft_floor(x, floor).sum(), (x, floor))
    assert ((gx > 0) & (gx < 1)).all()
    torch.testing.assert_close(gf, (1 - gx).sum(), rtol=1e-5, atol=0.0)
    far = torch.tensor([-1e30, -1e4, -100.0, 100.0, 1e4, 1e30], dtype=dtype, requires_grad=True)
    y = soft_floor(far, 0.0)
    (g,) = torch.autograd.grad(y.sum(), far)
    assert ((g >= 0) & (g <= 1)).all()
    assert torch.isfinite(y).all()
    assert (y >= 0).all() and (y[3:] == far[3:]).all()


HALF_LOG_S = [-80.0, -30.0, -17.375, -7.0, 0.0, 0.5625, 3.0, 20.0, 28.375, 41.6875, 80.0]
HALF_LOG_M = [-30.0, -7.0, 0.0, 2.0, 8.21875, 16.75, 26.75, 34.5]


@dtype_param
def test_soft_floor_every_dtype_matches_mpmath(dtype):
    """Regression (issue 10: soft_floor did not upcast half precision): the result and its
    gradient are computed in float32 and rounded once to the input dtype. Before, the
    backward formed ``exp(a - out)`` in half precision from the rounded output, whose error
    of ``|out| eps_half / 2`` became a relative error of the gradient (12% in bfloat16 at
    a = -17.4, m = 16.75; 0 for 1.8e-7 in float16). Reference: mpmath (50 digits) at the
    cast inputs. Bounds: the float32 (or float64) evaluation as in
    ``test_soft_floor_of_logs_is_log_of_sum`` plus one rounding to the dtype, ``eps/2``
    relative; results below the dtype's ``tiny`` within ``tiny``."""
    pairs = [(a, b) for a in HALF_LOG_S for b in HALF_LOG_M]
    a = torch.tensor([p[0] for p in pairs], dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.tensor([p[1] for p in pairs], dtype=torch.float64).to(dtype)
    out = soft_floor(a, b)
    assert out.dtype == dtype
    (g,) = torch.autograd.grad(out.sum(), a)
    assert g.dtype == dtype
    cast = list(zip(a.tolist(), b.tolist(), strict=True))
    expected = np.array([_log_sum_exp(*p) for p in cast])
    compute_rtol = value_rtol(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    half_ulp = torch.finfo(dtype).eps / 2 if dtype in (torch.float16, torch.bfloat16) else 0.0
    tiny = torch.finfo(dtype).tiny
    a64, b64 = a.detach().double().numpy(), b.double().numpy()
    magnitude = np.abs(a64) + np.abs(b64) + np.abs(expected[:, 0])
    bound = compute_rtol * magnitude + half_ulp * np.abs(expected[:, 0]) + tiny
    assert_within(out.detach().double().numpy(), expected[:, 0], bound, cast, "soft_floor")
    condition = 1.0 + np.abs(a64 - b64)
    bound = (compute_rtol * condition + half_ulp) * np.abs(expected[:, 1]) + tiny
    assert_within(g.double().numpy(), expected[:, 1], bound, cast, "d/dx")


@pytest.mark.parametrize(
    "x",
    [torch.randn(3), torch.randn(3, dtype=torch.float64), torch.tensor(1.0),
     torch.tensor(1.0, dtype=torch.float16), torch.randn(3, dtype=torch.bfloat16)],
    ids=lambda t: f"{t.dtype}-{t.dim()}d",
)  # fmt: skip
def test_soft_floor_dtype_is_torch_promotion(x):
    """The dtype rule is written out (a tracer cannot run torch.result_type): it must agree
    with torch's for numbers, 0-dim and dimensioned floors of every kind."""
    floors = [-7.0, 2, torch.tensor(1.0, dtype=torch.float64),
              torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor(1),
              torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16),
              torch.tensor(1.0, dtype=torch.bfloat16)]  # fmt: skip
    for floor in floors:
        assert soft_floor(x, floor).dtype == torch.result_type(x, floor), floor
