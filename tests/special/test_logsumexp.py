"""Tests of ``probloss.special.logsumexp``: its contract (a row of ``-inf`` gives ``-inf`` and
gradient 0; ties split the gradient evenly) and its accuracy in every floating dtype.

Where the numbers come from
---------------------------
* mpmath at 50 digits, at the inputs *after* the cast to the dtype under test:
  ``log(sum_k exp(x_k))`` and its gradient ``softmax(x)_k = exp(x_k - logsumexp(x))``.
* Closed forms where the answer is exact: ``-inf`` and gradient 0 for a row of ``-inf``;
  gradient ``1/n`` at a tie of ``n`` equal terms.
* ``torch.logsumexp`` for the shape conventions (dim, keepdim, 0-d, empty), and to show
  where it differs (NaN gradient in a row of ``-inf``, weights summing to 2 at a tie of
  ``-1e8`` in float32).

Bounds (``rtol = value_rtol(dtype)`` of ``tests/special/_helpers.py``: 1e-6 float32, 1e-13
float64, one eps for float16 / bfloat16, which are computed in float32 and rounded once):

* value: ``|got - exact| <= rtol (|exact| + K)``: the result is ``m + log s`` with ``m`` the
  row maximum and ``s`` in ``[1, K]`` a sum of ``K`` exponentials, each within an ulp;
* gradient: ``|g_k - p_k| <= rtol (1 + |x_k - m|) p_k + atol``: ``p_k`` is ``exp`` of the
  rounded ``x_k - m`` (an absolute error ``eps |x_k - m|`` in the exponent) over ``s``;
  ``atol`` is the documented flush (``2 exp(-86)`` float32, ``2 exp(-707)`` float64) plus
  ``finfo(dtype).tiny`` (half results below it are subnormal).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mpmath import mp

from probloss.special import logsumexp
from tests.special._helpers import DTYPE_IDS, DTYPES, value_rtol

INF = math.inf
FLUSH = {torch.float32: 2 * math.exp(-86), torch.float64: 2 * math.exp(-707)}
dtype_param = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _rows(dtype: torch.dtype) -> torch.Tensor:
    """Rows of K = 4 terms: ties, spreads, huge magnitudes, ``-inf`` entries; cast to
    ``dtype`` (rows whose finite entries overflow the dtype are left out)."""
    fixed = [
        [0.0, 0.0, 0.0, 0.0],
        [0.0, -1.0, -2.0, -3.0],
        [30.0, -30.0, 0.0, 5.0],
        [1000.0, 999.0, -5.0, 0.0],
        [-1e4, -1e4 + 1.0, -1e4 - 3.0, -2e4],
        [-INF, 0.0, 1.0, -INF],
        [-INF, -INF, -INF, 2.5],
        [60000.0, 60000.0, -60000.0, 0.0],
        [1e30, 1e30, -1e30, 3e29],
        [-1e300, -1e300, 0.0, 1.0],
        [1e-30, -1e-30, 1e-40, 0.0],
    ]
    g = torch.Generator().manual_seed(0)
    scale = 10.0 ** torch.empty(40, 1, dtype=torch.float64).uniform_(-3, 4, generator=g)
    random = torch.randn(40, 4, generator=g, dtype=torch.float64) * scale
    x64 = torch.cat([torch.tensor(fixed, dtype=torch.float64), random])
    x = x64.to(dtype)
    keep = ~(torch.isinf(x) & ~torch.isinf(x64)).any(-1)
    return x[keep]


def _reference(row: list[float]) -> tuple[float, list[float]]:
    with mp.workdps(50):
        terms = [mp.mpf(v) for v in row if v != -INF]
        if not terms:
            return -INF, [0.0] * len(row)
        lse = mp.log(mp.fsum(mp.exp(t) for t in terms))
        grads = [0.0 if v == -INF else float(mp.exp(mp.mpf(v) - lse)) for v in row]
        return float(lse), grads


@dtype_param
def test_values_and_gradients_match_mpmath(dtype):
    x = _rows(dtype).requires_grad_(True)
    out = logsumexp(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert out.dtype == dtype and grad.dtype == dtype
    rtol = value_rtol(dtype)
    atol = FLUSH[_compute(dtype)] + torch.finfo(dtype).tiny
    k = x.shape[-1]
    rows = x.detach().double().tolist()
    for i, row in enumerate(rows):
        exact, exact_grad = _reference(row)
        got = float(out[i].detach())
        if exact == -INF:
            assert got == -INF, (row, got)
        else:
            assert abs(got - exact) <= rtol * (abs(exact) + k), (row, got, exact)
        m = max(row)
        for j, (g, p) in enumerate(zip(grad[i].double().tolist(), exact_grad, strict=True)):
            spread = 0.0 if row[j] == -INF else abs(row[j] - m)
            assert abs(g - p) <= rtol * (1.0 + spread) * p + atol, (row, j, g, p)


@dtype_param
def test_row_of_minus_inf_gives_minus_inf_and_gradient_zero(dtype):
    x = torch.tensor([[-INF] * 3, [0.0, -INF, 1.0]], dtype=dtype, requires_grad=True)
    out = logsumexp(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert out[0].item() == -INF and torch.isfinite(out[1])
    assert torch.equal(grad[0], torch.zeros(3, dtype=dtype))
    assert grad[1, 1].item() == 0.0
    # torch's own: exp(-inf - (-inf)) = NaN in that row (the case this function exists for)
    xt = x.detach().float().requires_grad_(True)
    (torch_grad,) = torch.autograd.grad(torch.logsumexp(xt, -1).sum(), xt)
    assert torch.isnan(torch_grad[0]).all()


TIES = [
    (torch.float16, -6e4),
    (torch.bfloat16, -1e8),
    (torch.float32, -1e8),
    (torch.float32, 0.0),
    (torch.float64, -1e17),
    (torch.float64, 1e300),
]


@pytest.mark.parametrize("n", [2, 3, 4, 5])
@pytest.mark.parametrize(("dtype", "magnitude"), TIES, ids=lambda v: str(v))
def test_ties_split_the_gradient_evenly(n, dtype, magnitude):
    """``n`` equal terms: every weight is the same float, within one rounding of ``1/n``
    (half dtypes: a float32 rounding and a half one), and they sum to 1 within ``n`` eps,
    however large the magnitude (``logsumexp`` rounds away ``log n`` there)."""
    x = torch.full((n,), magnitude, dtype=dtype, requires_grad=True)
    (grad,) = torch.autograd.grad(logsumexp(x), x)
    assert (grad == grad[0]).all()
    eps = torch.finfo(dtype).eps
    assert abs(grad[0].item() - 1.0 / n) <= eps / n
    assert abs(grad.double().sum().item() - 1.0) <= n * eps
    if dtype == torch.float32 and magnitude == -1e8:  # torch's: exp(x - lse) = 1 each
        xt = x.detach().requires_grad_(True)
        (torch_grad,) = torch.autograd.grad(torch.logsumexp(xt, -1), xt)
        assert torch_grad.sum().item() == n


@pytest.mark.parametrize("dim", [0, 1, -1, -2])
@pytest.mark.parametrize("keepdim", [False, True])
def test_dim_and_keepdim_follow_torch(dim, keepdim):
    """Shapes as ``torch.logsumexp``; values within 1e-6 relative (float32, moderate)."""
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1))
    got, want = logsumexp(x, dim, keepdim), torch.logsumexp(x, dim, keepdim)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)


def test_scalar_and_empty_inputs():
    """A 0-d input is its own log-sum-exp; an empty dimension gives ``-inf`` (the log of an
    empty sum), an empty batch an empty result; backward works in each case."""
    s = torch.tensor(2.5, requires_grad=True)
    out = logsumexp(s)
    assert out.shape == () and out.item() == 2.5
    (g,) = torch.autograd.grad(out, s)
    assert g.item() == 1.0
    empty_dim = torch.zeros(3, 0, requires_grad=True)
    out = logsumexp(empty_dim)
    assert out.shape == (3,) and (out == -INF).all()
    assert torch.equal(out, torch.logsumexp(empty_dim.detach(), -1))
    (g,) = torch.autograd.grad(out.sum(), empty_dim)
    assert g.shape == (3, 0)
    empty_batch = torch.zeros(0, 4, dtype=torch.float16, requires_grad=True)
    out = logsumexp(empty_batch)
    assert out.shape == (0,) and out.dtype == torch.float16
    (g,) = torch.autograd.grad(out.sum(), empty_batch)
    assert g.shape == (0, 4)


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="x must be a real floating-point tensor"):
        logsumexp(torch.arange(3))


def test_gradcheck_and_gradgradcheck_float64():
    """The backward is built from differentiable ops: first and second derivatives agree
    with finite differences (torch defaults, float64), also with a ``-inf`` entry."""
    x = torch.tensor([[0.3, -1.2, 2.0], [5.0, 5.0, -INF]], dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(logsumexp, (x,))
    y = x.detach()[:, :2].clone().requires_grad_(True)  # finite entries for gradgradcheck
    assert torch.autograd.gradgradcheck(logsumexp, (y,))


def test_runs_on_meta_tensors_without_host_reads():
    x = torch.zeros(2, 3, device="meta", requires_grad=True)
    out = logsumexp(x)
    assert out.device.type == "meta" and out.shape == (2,)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == (2, 3)


def test_compiles_with_fullgraph_and_matches_eager():
    x = torch.tensor([[-800.0, -30.0, 0.0], [-INF, -INF, -INF]], dtype=torch.float64)
    compiled = torch.compile(logsumexp, fullgraph=True, backend="eager")
    np.testing.assert_array_equal(compiled(x).numpy(), logsumexp(x).numpy())
