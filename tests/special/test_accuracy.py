"""Accuracy of every ``probloss.special`` function and of its autograd
derivatives against the mpmath oracle, over extreme grids in every dtype.

Numbers: inputs from ``_helpers.real_grid`` / ``_helpers.nonneg_grid`` (cast to
the dtype under test), exact values from ``tests/reference.py`` evaluated at
the cast input and rounded once to float64.

Bounds (relative, for exact results in the normal range of the dtype;
absolute ``<= finfo.tiny`` below it; see ``_helpers`` for the full rules):
* values and first derivatives: 1e-13 (float64), 1e-6 (float32),
  eps(dtype) (float16, bfloat16);
* third derivative of the CB log-partition (d cb_variance / d eta and the
  second derivative of cb_mean): 5.8e-14 (float64), 2.0e-5 (float32), eps
  (half dtypes), no absolute floor, derived in
  ``_helpers.third_derivative_tol`` (measured worst: 1.2e-15, 5.2e-7,
  0.5 eps);
* second derivative of cb_log_partition (= cb_variance): value bounds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.special._helpers import (
    DTYPE_IDS,
    DTYPES,
    NAMES,
    assert_matches,
    evaluate,
    reference_table,
    third_derivative_tol,
    value_rtol,
)

dtype_param = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
name_param = pytest.mark.parametrize("name", NAMES)


def grid_of(name, dtype):
    return reference_table(name, dtype, "value")[0]


@name_param
@dtype_param
def test_value_matches_mpmath(name, dtype):
    x, expected = reference_table(name, dtype, "value")
    (got,) = evaluate(name, x, dtype)
    assert_matches(x, got, expected, dtype, value_rtol(dtype), what=f"{name} value [{dtype}]")


@name_param
@dtype_param
def test_gradient_matches_mpmath(name, dtype):
    x, expected = reference_table(name, dtype, "grad")
    _, got = evaluate(name, x, dtype, order=1)
    if name == "cb_variance":
        rtol, atol = third_derivative_tol(dtype)
    else:
        rtol, atol = value_rtol(dtype), 0.0
    assert_matches(x, got, expected, dtype, rtol, atol, what=f"d/dx {name} [{dtype}]")


@pytest.mark.parametrize("name", ["cb_mean", "cb_log_partition"])
@dtype_param
def test_second_derivative_matches_mpmath(name, dtype):
    """d2/deta2 cb_mean = A''' (loose bound); d2/deta2 cb_log_partition = A''
    (value bound).  Both via double backward (create_graph=True)."""
    x, expected = reference_table(name, dtype, "grad2")
    _, _, got = evaluate(name, x, dtype, order=2)
    if name == "cb_mean":
        rtol, atol = third_derivative_tol(dtype)
    else:
        rtol, atol = value_rtol(dtype), 0.0
    assert_matches(x, got, expected, dtype, rtol, atol, what=f"d2/dx2 {name} [{dtype}]")


@name_param
@dtype_param
def test_finite_value_and_derivatives_on_extreme_grid(name, dtype):
    """Value, first derivative (and second derivative for the CB mean and
    log-partition) are finite at every grid point where the exact result is
    within the dtype's finite range (|exact| <= finfo.max).

    The only grid points excluded by that rule are, by the mpmath oracle:
    x = 0 for log1mexp/softplus_inverse (value -inf, derivative +inf) and
    the derivative 1/x-like blow-up of those two for x < ~1/finfo.max.
    """
    order = 2 if name in ("cb_mean", "cb_log_partition") else 1
    outs = evaluate(name, grid_of(name, dtype), dtype, order=order)
    kinds = ["value", "grad", "grad2"][: order + 1]
    big = torch.finfo(dtype).max
    problems = []
    for kind, got in zip(kinds, outs, strict=True):
        x, expected = reference_table(name, dtype, kind)
        representable = np.abs(expected) <= big
        bad = np.flatnonzero(representable & ~np.isfinite(got))
        problems += [
            f"{kind} at x={x[i]!r}: got {got[i]!r}, exact {expected[i]!r}" for i in bad[:5]
        ]
        # The exclusion rule must not swallow the grid.
        assert representable.mean() > 0.99, (kind, representable.mean())
    assert not problems, f"{name} [{dtype}] non-finite results:\n" + "\n".join(problems)


@dtype_param
def test_log_cosh_single_form_path_matches_mpmath(dtype):
    """log_cosh takes its one-formula path when every |x| <= log(finfo.max) (CPU): the
    moderate part of the grid, evaluated in one call, must meet the same bounds."""
    x, expected = reference_table("log_cosh", dtype, "value")
    bound = math.log(torch.finfo(dtype if dtype == torch.float64 else torch.float32).max)
    keep = np.abs(x) <= bound
    assert keep.sum() > 1000 and np.abs(x[keep]).max() > 40  # the path covers large |x| too
    (got,) = evaluate("log_cosh", x[keep], dtype)
    assert_matches(x[keep], got, expected[keep], dtype, value_rtol(dtype), what="log_cosh fast")
    _, grad = evaluate("log_cosh", x[keep], dtype, order=1)
    _, grad_expected = reference_table("log_cosh", dtype, "grad")
    assert_matches(
        x[keep], grad, grad_expected[keep], dtype, value_rtol(dtype), what="log_cosh fast grad"
    )
