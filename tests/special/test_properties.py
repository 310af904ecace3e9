"""Hypothesis property tests for ``probloss.special``.

Inputs are arbitrary finite floats (hypothesis favours boundaries: 0,
subnormals, finfo.max, integers, ...), so these complement the fixed grids
of test_accuracy.py.  Properties and their bounds:

* cb_mean lies in [0, 1] exactly and is non-decreasing: for a < b,
  cb_mean(a) <= cb_mean(b) + 2 rtol (rtol = value bound of the dtype; two
  results each within rtol of a monotone exact function can be out of order
  by at most that much, and cb_mean <= 1);
* 0 <= cb_variance <= fl(1/12) exactly, and > 0 where the exact value
  1/eta^2-ish is representable (|eta| <= 1e150 in float64, 1e18 in float32);
* cb_entropy <= 0 exactly;
* any finite input: value and first derivative match mpmath under the
  rules and bounds of test_accuracy.py (float16, float32, float64 inputs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import reference as ref
from tests.special._helpers import (
    NAMES,
    SPECS,
    assert_matches,
    evaluate,
    impl,
    third_derivative_tol,
    value_rtol,
)

WIDTH_DTYPE = {16: torch.float16, 32: torch.float32, 64: torch.float64}
PROP = settings(max_examples=300, deadline=None)


def finite(width: int, **kw):
    return st.floats(allow_nan=False, allow_infinity=False, width=width, **kw)


def _t(v: float, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(v, dtype=dtype)


@pytest.mark.parametrize("width", [32, 64])
def test_cb_mean_in_unit_interval_and_monotone(width):
    dtype = WIDTH_DTYPE[width]
    slack = 2 * value_rtol(dtype)
    f = impl("cb_mean")

    @PROP
    @given(finite(width), finite(width))
    def check(a, b):
        a, b = min(a, b), max(a, b)
        ma, mb = f(_t(a, dtype)).item(), f(_t(b, dtype)).item()
        assert 0.0 <= ma <= 1.0 and 0.0 <= mb <= 1.0, (a, ma, b, mb)
        assert ma <= mb + slack, (a, ma, b, mb)

    check()


@pytest.mark.parametrize("width", [32, 64])
def test_cb_variance_in_zero_one_twelfth(width):
    dtype = WIDTH_DTYPE[width]
    top = _t(1.0 / 12.0).to(dtype).item()
    positive_up_to = 1e150 if width == 64 else 1e18
    f = impl("cb_variance")

    @PROP
    @given(finite(width))
    def check(eta):
        v = f(_t(eta, dtype)).item()
        assert 0.0 <= v <= top, (eta, v)
        if abs(eta) <= positive_up_to:
            assert v > 0.0, (eta, v)

    check()


@pytest.mark.parametrize("width", [32, 64])
def test_cb_entropy_non_positive(width):
    dtype = WIDTH_DTYPE[width]
    f = impl("cb_entropy")

    @PROP
    @given(finite(width))
    def check(eta):
        h = f(_t(eta, dtype)).item()
        assert h <= 0.0, (eta, h)

    check()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("width", [16, 32, 64])
def test_random_inputs_match_mpmath(name, width):
    dtype = WIDTH_DTYPE[width]
    spec = SPECS[name]
    lo = 0.0 if spec.domain == "nonneg" else None
    rtol = value_rtol(dtype)
    grtol, gatol = third_derivative_tol(dtype) if name == "cb_variance" else (rtol, 0.0)

    @settings(max_examples=60, deadline=None)
    @given(finite(width, min_value=lo))
    def check(v):
        x = np.array([v])
        got, grad = evaluate(name, x, dtype, order=1)
        want = np.array([ref.to_float64(spec.value(v))])
        gwant = np.array([ref.to_float64(spec.grad(v))])
        assert_matches(x, got, want, dtype, rtol, what=f"{name} [{dtype}]")
        assert_matches(x, grad, gwant, dtype, grtol, gatol, what=f"d/dx {name} [{dtype}]")

    check()
