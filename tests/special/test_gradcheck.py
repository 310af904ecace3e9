"""float64 ``torch.autograd.gradcheck`` / ``gradgradcheck``: the autograd
derivatives agree with central finite differences of the function itself.

Numbers: hand-picked float64 points mixing small, medium (including both
sides of the series/closed-form switch region |eta| in [1, 8]) and large
inputs; no exact kinks (log1mexp / softplus_inverse are kept > 1e-3 so the
finite-difference stencil, step 1e-6, stays inside the domain).  "Large" is
limited to where a 1e-6 step is still resolvable in float64 (|x| <= 1e3);
the extreme range is covered against mpmath in test_accuracy.py.

Bounds: gradcheck's defaults (atol 1e-5, rtol 1e-3 on each Jacobian entry,
step 1e-6) with ``fast_mode=False`` (full Jacobian).  The central-difference
error is inside them at every point (worst: log1mexp/softplus_inverse at
1e-3, about 3e-4 absolute on a derivative of about 1000, i.e. 3e-7
relative), so a wrong backward (wrong formula, wrong sign, dropped
upstream gradient, broken double backward) fails.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from tests.special._helpers import NAMES, SPECS, impl

POSITIVE_POINTS = [
    1e-3,
    0.01,
    0.1,
    0.5,
    0.69,
    0.6931471805599453,
    0.7,
    1.0,
    2.5,
    5.0,
    9.0,
    20.0,
    40.0,
    100.0,
    700.0,
]
REAL_POINTS = [
    -1000.0,
    -100.0,
    -20.0,
    -8.5,
    -7.9,
    -4.0,
    -2.6,
    -1.2,
    -0.9,
    -0.25,
    -1e-3,
    -1e-8,
    0.0,
    1e-8,
    1e-3,
    0.3,
    0.99,
    1.01,
    1.7,
    2.5,
    3.3,
    4.6,
    6.0,
    7.1,
    8.2,
    12.0,
    35.0,
    300.0,
]


def _points(name: str) -> torch.Tensor:
    pts = POSITIVE_POINTS if SPECS[name].domain == "nonneg" else REAL_POINTS
    return torch.tensor(pts, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name):
    assert gradcheck(impl(name), (_points(name),), fast_mode=False)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64_shaped_input(name):
    """Same check through a 2-d, non-contiguous view (the backward must
    respect shape and strides)."""
    x = _points(name).detach()
    n = x.numel() - x.numel() % 2
    x = x[:n].reshape(2, n // 2).t().requires_grad_(True)
    assert not x.is_contiguous()
    assert gradcheck(impl(name), (x,), fast_mode=False)


@pytest.mark.parametrize("name", ["cb_mean", "cb_log_partition"])
def test_gradgradcheck_float64(name):
    assert gradgradcheck(impl(name), (_points(name),), fast_mode=False)
