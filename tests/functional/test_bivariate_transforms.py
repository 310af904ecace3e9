"""The bivariate density where no value can be read on the host (issue 12).

Under ``torch.func`` (and while compiling) the density and its backward cannot look at the
values to skip the log-scaled fallbacks: both forms are built and selected per event with
``torch.where``. These tests check that the selection gives the eager result on rows that
need the fallback and rows that do not, and that the compiled form of the sinh coefficient
keeps its digits for small arguments.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

from probloss.functional._bivariate_forms import sinh_coefficient
from probloss.functional.bivariate import bivariate_normal_log_prob
from tests.functional._checks import dtype_id

# value (2), loc (2), log_scale (2), atanh_rho: a plain row; the issue-10 row whose z_1
# underflows (x = (1, 0), l = (800, 800), a = 810: the forward's log-scaled Q/2 and the
# backward's fallback, float64); a point near the mean at a large correlation; a row whose
# closed-form gradient overflows (log_scale near -log(finfo.max): d/dx is 1e308-sized)
_ROWS = [
    [0.5, -0.3, 0.1, 0.2, -0.4, 0.3, 0.7],
    [1.0, 0.0, 0.0, 0.0, 800.0, 800.0, 810.0],
    [3.0, 3.001, 0.0, 0.0, 0.0, 0.0, 10.0],
    [1.0, -2.0, 0.0, 0.0, -700.0, -1.0, -0.5],
]


def test_vmap_grad_selects_the_eager_result_per_event():
    """Per-row ``vmap(grad)`` (both forms built, selected by ``where``) equals the eager
    gradient of the batch (the fallback used only where needed).

    Bound: the same formulas on the same numbers; only the vectorised and scalar ``exp`` /
    ``log`` may differ, by 2 ulps each, and an error of the exponents (up to ``E = 4000``
    here, module ``_bivariate_scaled``) is amplified by ``E``: ``2 eps (E + 100) = 1.8e-12``
    relative, below ``rtol = 1e-10``.
    """
    t = torch.tensor(_ROWS, dtype=torch.float64)
    value, loc, log_scale, a = t[:, 0:2], t[:, 2:4], t[:, 4:6], t[:, 6]

    def row(v, m, ls, r):
        return bivariate_normal_log_prob(v, m, ls, r)

    per_row = vmap(grad(row, argnums=(0, 1, 2, 3)))(value, loc, log_scale, a)
    inputs = [x.clone().requires_grad_() for x in (value, loc, log_scale, a)]
    eager = torch.autograd.grad(bivariate_normal_log_prob(*inputs).sum(), inputs)
    for got, want in zip(per_row, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0.0)
    values = vmap(row)(value, loc, log_scale, a)
    torch.testing.assert_close(values, bivariate_normal_log_prob(value, loc, log_scale, a),
                               rtol=1e-10, atol=0.0)


# compute dtypes only: half inputs are evaluated in float32
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_compiled_sinh_coefficient_keeps_small_arguments(dtype):
    """Compiled, ``s = (1 - e^{-2b})/2`` is ``tanh(b) c`` (inductor's CPU ``expm1`` is
    ``exp(x) - 1``, which gave ``s = 0`` for ``b < eps``). Bound: each form within 2.5 ulps
    (one libm call of 1 ulp, ``c`` within 1.5, one product), so they differ by at most
    5 ulps: ``rtol = 5 eps``."""
    b = torch.logspace(-30, 1.5, 200, dtype=torch.float64).to(dtype)
    compiled = torch.compile(sinh_coefficient, fullgraph=True)(b)
    eager = sinh_coefficient(b)
    assert bool((compiled > 0).all())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(compiled, eager, rtol=5 * eps, atol=0.0)
