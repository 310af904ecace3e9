"""Tests of ``probloss.functional.lowrank``: the low-rank plus diagonal multivariate normal
log density ``lowrank_multivariate_normal_log_prob``. Its extreme inputs are tested in
``test_multivariate_edges.py``.

Where the numbers come from
---------------------------
* **mpmath**: the oracles of ``_multivariate_oracles.py`` (the covariance formed *as a
  matrix* at high precision, Gaussian elimination written there, nothing of the
  implementation reused; evaluated at doubling precision until 25 digits agree).
  Here the covariance is ``W W^T + diag(exp(log_diag))``.
* **scipy.stats.multivariate_normal.logpdf** in float64 (eigendecomposition of the
  covariance), only for well-conditioned covariances: it is itself off by up to
  ~100 eps x scale there (measured against mpmath), is off by 1e6 eps x scale for scales
  spanning 1e-2 .. 1e2, and raises for scales spanning 1e-4 .. 1e4.
* **torch.distributions** ``LowRankMultivariateNormal`` in float64 at moderate inputs,
  where it is right.

Bounds
------
``eps``, ``scale`` (the sizes of the terms a log density is summed from) and ``cond`` (the
first-order change of the result when every input entry moves by a relative ``eps``) are
defined in the module doc of ``_multivariate_oracles.py``.

* low-rank vs mpmath: ``2 eps (scale + cond)`` with the float32 ``eps`` for float32 and half
  inputs (computed in float64 and rounded once to float32 since issue 10, so far inside
  it; the tight float64 bounds and the second-order term of a point along a long factor are
  in test_multivariate_edges.py); vs the dense formula, torch ``LowRankMultivariateNormal``
  and scipy: ``4 D eps kappa(Sigma) scale`` (each forms and factors a matrix).
"""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from torch.distributions import LowRankMultivariateNormal

from probloss.functional import (
    lowrank_multivariate_normal_log_prob,
    multivariate_normal_log_prob,
)
from tests.functional._checks import FLOAT_DTYPES, assert_within, dtype_id
from tests.functional._multivariate_oracles import _compute_dtype, _eps, _key, _scale, lowrank_ref

F64 = torch.float64
LOG_2PI = math.log(2.0 * math.pi)

# ======================================================================================
# Low rank plus diagonal
# ======================================================================================


def _lowrank_case(gen, batch, dim, rank, *, w_scale=1.0, log_diag_sd=1.0):
    w = w_scale * torch.randn((*batch, dim, rank), generator=gen, dtype=F64)
    log_diag = log_diag_sd * torch.randn((*batch, dim), generator=gen, dtype=F64)
    loc = torch.randn((*batch, dim), generator=gen, dtype=F64)
    cov = w @ w.mT + torch.diag_embed(log_diag.exp())
    noise = torch.randn((*batch, dim, 1), generator=gen, dtype=F64)
    value = loc + (torch.linalg.cholesky(cov) @ noise).squeeze(-1)
    return value, loc, w, log_diag


def _dense_from_lowrank(value, loc, w, log_diag):
    cov = w @ w.mT + torch.diag_embed(log_diag.exp())
    return multivariate_normal_log_prob(value, loc, torch.linalg.cholesky(cov))


LOWRANK_SHAPES = [(1, 1), (2, 1), (3, 2), (5, 2), (8, 3), (8, 8), (5, 0)]


@pytest.mark.parametrize(("dim", "rank"), LOWRANK_SHAPES)
def test_lowrank_matches_dense_scipy_and_torch_float64(dim, rank):
    """Moderate inputs, batch 6: against the dense formula (Cholesky of W W^T + D), scipy
    logpdf of that covariance, and torch LowRankMultivariateNormal (values and gradients in
    value, loc, cov_factor, log_diag). Every one of them forms the covariance (or the
    capacitance matrix) and factors it, backward stably: entries within ``eps`` relative,
    hence values within ``4 D eps kappa(Sigma) scale`` of each other (each eigenvalue moves
    by ``eps ||Sigma||``, ``eps kappa`` relative to the smallest), gradients within
    ``4 D eps kappa(Sigma)`` of the largest entry (torch's gradient comes through its
    subtraction form, which cancels by the same factor)."""
    gen = torch.Generator().manual_seed(10 * dim + rank)
    value, loc, w, log_diag = (t.requires_grad_(True) for t in _lowrank_case(gen, (6,), dim, rank))
    ours = lowrank_multivariate_normal_log_prob(value, loc, w, log_diag)
    dense = _dense_from_lowrank(value, loc, w, log_diag).detach()
    cov = (w @ w.mT + torch.diag_embed(log_diag.exp())).detach()
    scipy_vals = torch.tensor(
        [
            scipy.stats.multivariate_normal.logpdf(value[i].detach(), loc[i].detach(), cov[i])
            for i in range(6)
        ],
        dtype=F64,
    )
    z = torch.linalg.solve_triangular(
        torch.linalg.cholesky(cov), (value - loc).detach().unsqueeze(-1), upper=False
    )
    log_det_terms = 0.5 * (log_diag.abs().sum(-1) + torch.logdet(cov) - log_diag.sum(-1)).detach()
    scale = 0.5 * z.square().sum((-2, -1)) + log_det_terms + 0.5 * dim * LOG_2PI
    kappa = torch.linalg.cond(cov)
    tol = 4 * dim * _eps(F64) * kappa * scale
    assert ((ours.detach() - dense).abs() <= tol).all()
    assert ((ours.detach() - scipy_vals).abs() <= tol).all()
    if rank == 0:
        return  # torch's LowRankMultivariateNormal needs rank >= 1
    theirs = LowRankMultivariateNormal(loc, w, log_diag.exp()).log_prob(value)
    assert ((ours.detach() - theirs.detach()).abs() <= tol).all()
    g_ours = torch.autograd.grad(ours.sum(), (value, loc, w, log_diag))
    g_theirs = torch.autograd.grad(theirs.sum(), (value, loc, w, log_diag))
    for a, b in zip(g_ours, g_theirs, strict=True):
        atol = 4 * dim * _eps(F64) * kappa.max().item() * b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def _lowrank_bound(ref, dim, dtype, k=2.0):
    _, half_maha, log_det_terms, cond = ref
    return k * _eps(dtype) * (_scale(half_maha, log_det_terms, dim) + cond)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_lowrank_matches_mpmath(dtype):
    """All dtypes; W ~ N(0, 1) or 30 N(0, 1), log_diag ~ 2 N(0, 1), (D, R) from LOWRANK_SHAPES.
    Bound 2 eps (scale + cond), see module doc (float32 and half inputs are computed in
    float64, so their error is the float32 rounding of the result)."""
    gen = torch.Generator().manual_seed(11)
    for dim, rank in LOWRANK_SHAPES:
        for w_scale in (1.0, 30.0):
            value, loc, w, log_diag = (
                t.to(dtype)
                for t in _lowrank_case(gen, (3,), dim, rank, w_scale=w_scale, log_diag_sd=2.0)
            )
            got = lowrank_multivariate_normal_log_prob(value, loc, w, log_diag)
            assert got.dtype == _compute_dtype(dtype)
            refs = [
                lowrank_ref(_key(value[i]), _key(loc[i]), _key(w[i]), _key(log_diag[i]))
                for i in range(3)
            ]
            assert_within(
                got.double().numpy(),
                [r[0] for r in refs],
                [_lowrank_bound(r, dim, dtype) for r in refs],
                [(dim, rank, w_scale, i) for i in range(3)],
                f"lowrank {dtype}",
            )


def test_lowrank_nearly_collinear_factor_float32():
    """Columns of W equal to 1e-4 relative, |W| ~ 3e3, log_diag = 0, float32 (D = 8, R = 4).

    torch's LowRankMultivariateNormal forms I + W^T D^-1 W and its Cholesky decomposition
    can fail (LinAlgError) where rounding makes it indefinite (7 of these 12 cases on the
    machine this was written on; how many depends on the BLAS, so it is not asserted); ours
    (QR of [W~; I]) is finite and within 2 eps (scale + cond) of mpmath for every case
    (cond is up to 1800 scale here).
    """
    gen = torch.Generator().manual_seed(12)
    for _ in range(12):
        base = torch.randn(8, 1, generator=gen, dtype=F64)
        w = 3e3 * torch.cat(
            [
                base,
                base + 1e-4 * torch.randn(8, 1, generator=gen, dtype=F64),
                torch.randn(8, 2, generator=gen, dtype=F64),
            ],
            1,
        )
        cov = w @ w.mT + torch.eye(8, dtype=F64)
        value = (torch.linalg.cholesky(cov) @ torch.randn(8, generator=gen, dtype=F64)).float()
        w, loc, log_diag = w.float(), torch.zeros(8), torch.zeros(8)
        got = lowrank_multivariate_normal_log_prob(value, loc, w, log_diag).item()
        ref = lowrank_ref(_key(value), _key(loc), _key(w), _key(log_diag))
        assert abs(got - ref[0]) <= _lowrank_bound(ref, 8, torch.float32), (got, ref)


def test_lowrank_point_along_factor_float32():
    """x = W (one column), diagonal e^-30: the quadratic form is ~1 and log p = 25.8473...

    Ours within 2 eps (scale + cond) of mpmath (a float32 evaluation of the ridge form
    missed by 0.75 on an AMD EPYC: the second-order rounding effect (u ||r~||)^2, which that
    first-order bound rightly does not allow for; computed in float64 it is below float32
    rounding); torch's subtraction form ||r~||^2 - ||C^-1 W~^T r~||^2 cancels to 0 and is
    0.5 off.
    """
    w = torch.tensor([[2.0], [1.0], [-1.0]])
    value, loc, log_diag = torch.tensor([2.0, 1.0, -1.0]), torch.zeros(3), torch.full((3,), -30.0)
    got = lowrank_multivariate_normal_log_prob(value, loc, w, log_diag).item()
    ref = lowrank_ref(_key(value), _key(loc), _key(w), _key(log_diag))
    assert abs(got - ref[0]) <= _lowrank_bound(ref, 3, torch.float32)
    theirs = LowRankMultivariateNormal(loc, w, log_diag.exp()).log_prob(value).item()
    assert abs(theirs - ref[0]) > 0.4


@pytest.mark.parametrize(
    ("value_shape", "w_shape", "log_diag_shape"),
    [
        ((7, 4), (4, 2), (4,)),  # shared factor and diagonal
        ((5, 1, 4), (3, 4, 2), (4,)),
        ((4,), (3, 4, 2), (3, 4)),
        ((2, 3, 4), (1, 3, 4, 1), (2, 1, 4)),
    ],
)
def test_lowrank_broadcasting(value_shape, w_shape, log_diag_shape):
    """Each event equals the unbatched call (float64). Bound ``8 D eps kappa(Sigma) scale``: a
    shared factor takes another BLAS path (one solve for all right-hand sides); both are
    backward stable, each within ``4 D eps kappa scale`` (see
    test_lowrank_matches_dense_scipy_and_torch_float64)."""
    gen = torch.Generator().manual_seed(13)
    value = torch.randn(value_shape, generator=gen, dtype=F64)
    w = torch.randn(w_shape, generator=gen, dtype=F64)
    log_diag = torch.randn(log_diag_shape, generator=gen, dtype=F64)
    loc = torch.zeros(4, dtype=F64)
    got = lowrank_multivariate_normal_log_prob(value, loc, w, log_diag)
    batch = torch.broadcast_shapes(value_shape[:-1], w_shape[:-2], log_diag_shape[:-1])
    assert got.shape == batch
    v = value.expand((*batch, 4)).reshape(-1, 4)
    ws = w.expand(batch + w_shape[-2:]).reshape((-1, *w_shape[-2:]))
    ld = log_diag.expand((*batch, 4)).reshape(-1, 4)
    expected = torch.stack(
        [lowrank_multivariate_normal_log_prob(v[i], loc, ws[i], ld[i]) for i in range(v.shape[0])]
    ).reshape(batch)
    terms = 0.5 * ld.abs().sum(-1).reshape(batch) + 0.5 * 4 * LOG_2PI
    # |maha/2 + log det K / 2| <= |log p| + sum |l| / 2 + D/2 log 2 pi (both terms >= 0)
    scale = expected.abs() + 2 * terms
    cov = ws @ ws.mT + torch.diag_embed(ld.exp())
    kappa = torch.linalg.cond(cov).reshape(batch)
    assert ((got - expected).abs() <= 8 * 4 * _eps(F64) * kappa * scale).all()


def test_lowrank_gradcheck_float64():
    """float64 gradcheck and gradgradcheck in (value, loc, cov_factor, log_diag), D = 4, R = 2."""
    gen = torch.Generator().manual_seed(14)
    inputs = tuple(t.requires_grad_(True) for t in _lowrank_case(gen, (2,), 4, 2))
    assert torch.autograd.gradcheck(lowrank_multivariate_normal_log_prob, inputs)
    assert torch.autograd.gradgradcheck(lowrank_multivariate_normal_log_prob, inputs)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_lowrank_gradients_finite(dtype):
    """Finite gradients in every input, every dtype, including nearly collinear large W and
    log_diag at +-40 (diagonal variances e^+-40; +-6 for float16, where larger exact
    gradients exceed the float16 range a float16 leaf's gradient is returned in)."""
    gen = torch.Generator().manual_seed(15)
    value, loc, w, log_diag = _lowrank_case(gen, (4,), 5, 3, w_scale=30.0)
    w[..., 1] = w[..., 0] * (1 + 1e-4)
    extreme = 6.0 if dtype == torch.float16 else 40.0
    log_diag[..., 0] = extreme
    log_diag[..., 1] = -extreme
    inputs = [t.to(dtype).requires_grad_(True) for t in (value, loc, w, log_diag)]
    out = lowrank_multivariate_normal_log_prob(*inputs)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for t in inputs:
        assert t.grad.dtype == dtype
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize(
    ("value_shape", "w_shape", "log_diag_shape", "match"),
    [
        ((3,), (3,), (3,), r"cov_factor must have shape \(\*, D, R\), got \(3,\)"),
        ((2,), (3, 1), (3,), r"value must have shape \(\*, 3\).*\(2,\)"),
        ((3,), (3, 1), (2,), r"log_diag must have shape \(\*, 3\).*\(2,\)"),
        (
            (4, 3),
            (5, 3, 1),
            (3,),
            r"batch shapes do not broadcast: value \(4,\).*cov_factor \(5,\)",
        ),
    ],
)
def test_lowrank_shape_errors(value_shape, w_shape, log_diag_shape, match):
    with pytest.raises(ValueError, match=match):
        lowrank_multivariate_normal_log_prob(
            torch.zeros(value_shape),
            torch.zeros(3),
            torch.ones(w_shape),
            torch.zeros(log_diag_shape),
        )


@pytest.mark.parametrize("name", ["value", "loc", "cov_factor", "log_diag"])
def test_lowrank_nan_errors_when_validating(name):
    args = {
        "value": torch.zeros(3),
        "loc": torch.zeros(3),
        "cov_factor": torch.ones(3, 2),
        "log_diag": torch.zeros(3),
    }
    args[name] = args[name].clone().flatten()
    args[name][0] = math.nan
    args[name] = args[name].reshape(torch.zeros(3, 2).shape if name == "cov_factor" else (3,))
    with pytest.raises(ValueError, match=f"{name} of shape .* contains 1 NaN"):
        lowrank_multivariate_normal_log_prob(**args)
    out = lowrank_multivariate_normal_log_prob(**args, validate_args=False)
    assert torch.isnan(out)
