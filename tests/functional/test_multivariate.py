"""Tests of ``probloss.functional.multivariate``: the dense multivariate normal log density
``multivariate_normal_log_prob`` (values, gradients, broadcasting, dtype policy, validation).
``scale_tril_from_raw`` is tested in ``test_multivariate_scale_tril.py``, the low-rank form
in ``test_lowrank.py``, extreme inputs in ``test_multivariate_edges.py``.

Where the numbers come from
---------------------------
* **mpmath**: the oracles of ``_multivariate_oracles.py`` (the covariance formed *as a
  matrix* at high precision, Gaussian elimination written there, nothing of the
  implementation reused; evaluated at doubling precision until 25 digits agree).
* **scipy.stats.multivariate_normal.logpdf** in float64 (eigendecomposition of the
  covariance), only for well-conditioned covariances: it is itself off by up to
  ~100 eps x scale there (measured against mpmath), is off by 1e6 eps x scale for scales
  spanning 1e-2 .. 1e2, and raises for scales spanning 1e-4 .. 1e4.
* **torch.distributions** ``MultivariateNormal(scale_tril=...)`` in float64 at moderate
  inputs, where it is right.

Bounds
------
``eps``, ``scale`` (the sizes of the terms a log density is summed from) and ``cond`` (the
first-order change of the result when every input entry moves by a relative ``eps``) are
defined in the module doc of ``_multivariate_oracles.py``.

* dense vs mpmath: ``4 eps scale``, covariances with well-conditioned correlation structure
  and per-coordinate scales (``L = diag(s) M`` or ``diag(s)``) log-uniform in
  1e-6 .. 1e6 (float32, bfloat16), 1e-2 .. 1e2 (float16: its range) and 1e-150 .. 1e150
  (float64), at 1e-3, 1 and 30 standard deviations, D in {1, 2, 3, 5, 8}. Measured worst:
  1.07 (float16), 1.26 (bfloat16), 1.28 (float32), 0.97 (float64) eps scale; relative
  errors up to 3.5e-6 (float16 inputs), 1.8e-6 (float32), 9.4e-16 (float64), at points
  where the terms cancel. (Scales mixed *within* a row, ``L = M diag(s)``, make the problem
  ill-conditioned: a relative perturbation eps of the inputs moves the result by far more
  than eps scale, so no algorithm meets this bound there; not swept.)
* dense gradients vs mpmath (``d/dvalue = -Sigma^{-1} r``,
  ``d/dL = tril(v (L^T v)^T) - diag(1/L_ii)``, ``v = Sigma^{-1} r``), in coordinates made
  dimensionless by the scales (entry ``i`` times ``s_i``): error norm at most ``8 eps`` of
  the gradient norm, plus the rounding of the gradient to a half-precision input's dtype.
  Measured worst 2.8 eps (float32) and 2.7 eps (float64).
* dense vs scipy (well-conditioned, float64): ``4 D eps kappa(Sigma) scale`` (scipy's
  eigendecomposition: each eigenvalue within ``eps ||Sigma||``); vs torch
  ``MultivariateNormal(scale_tril=...)``: ``4 eps scale``, gradients ``4 D eps kappa(L)^2``
  of the largest entry (two backward-stable triangular solves on each side).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import MultivariateNormal

from probloss.functional import multivariate_normal_log_prob
from tests.functional._checks import FLOAT_DTYPES, HALF_DTYPES, assert_within, dtype_id
from tests.functional._multivariate_oracles import (
    _compute_dtype,
    _eps,
    _key,
    _scale,
    dense_grad_ref,
    dense_ref,
)

F64 = torch.float64
LOG_2PI = math.log(2.0 * math.pi)

DIMS = (1, 2, 3, 5, 8)


# ======================================================================================
# Case generators (float64; the tests cast to the dtype under test)
# ======================================================================================


def _unit_factor(gen: torch.Generator, batch: tuple[int, ...], dim: int) -> torch.Tensor:
    """Well-conditioned lower-triangular M: off-diagonal N(0, 0.5^2), diagonal U(0.5, 2)."""
    off = 0.5 * torch.randn((*batch, dim, dim), generator=gen, dtype=F64).tril(-1)
    diag = torch.rand((*batch, dim), generator=gen, dtype=F64) * 1.5 + 0.5
    return off + torch.diag_embed(diag)


def _dense_cases(gen, batch, dim, *, lo, hi, kind, far):
    """``(value, loc, L)`` with scales ``s`` log-uniform in ``[lo, hi]`` per coordinate.

    ``kind="row"``: ``L = diag(s) M`` (correlated coordinates in different units);
    ``kind="diag"``: ``L = diag(s)``. Points at ``far`` standard deviations:
    ``value = loc + L u``, ``u ~ far N(0, I)``.
    """
    s = torch.exp(
        torch.empty((*batch, dim), dtype=F64).uniform_(math.log(lo), math.log(hi), generator=gen)
    )
    factor = (
        s.unsqueeze(-1) * _unit_factor(gen, batch, dim) if kind == "row" else torch.diag_embed(s)
    )
    u = far * torch.randn((*batch, dim), generator=gen, dtype=F64)
    loc = s * torch.randn((*batch, dim), generator=gen, dtype=F64)
    value = loc + (factor @ u.unsqueeze(-1)).squeeze(-1)
    return value, loc, factor


SCALE_RANGES = {
    torch.float16: (1e-2, 1e2),
    torch.bfloat16: (1e-6, 1e6),
    torch.float32: (1e-6, 1e6),
    torch.float64: (1e-150, 1e150),
}


# ======================================================================================
# Dense: accuracy
# ======================================================================================


@pytest.mark.parametrize("dim", DIMS)
def test_dense_matches_scipy_float64(dim):
    """Random well-conditioned covariances, batch shape (4, 3), against scipy logpdf.

    Bound ``4 D eps kappa(Sigma) scale``: scipy's backward-stable eigendecomposition perturbs
    each eigenvalue by ``eps ||Sigma||``, ``eps kappa`` relative to the smallest, and the
    Mahalanobis term and log det inherit relative errors of at most ``D eps kappa``."""
    gen = torch.Generator().manual_seed(100 + dim)
    factor = _unit_factor(gen, (4, 3), dim)
    loc = torch.randn(4, 3, dim, generator=gen, dtype=F64)
    value = loc + 2.0 * torch.randn(4, 3, dim, generator=gen, dtype=F64)
    got = multivariate_normal_log_prob(value, loc, factor)
    assert got.shape == (4, 3) and got.dtype == F64
    for idx in np.ndindex(4, 3):
        cov = (factor[idx] @ factor[idx].mT).numpy()
        expected = scipy.stats.multivariate_normal.logpdf(value[idx].numpy(), loc[idx].numpy(), cov)
        z = torch.linalg.solve_triangular(
            factor[idx], (value[idx] - loc[idx])[:, None], upper=False
        )
        scale = _scale(
            0.5 * z.square().sum().item(), factor[idx].diagonal().log().abs().sum().item(), dim
        )
        bound = 4 * dim * _eps(F64) * np.linalg.cond(cov) * scale
        assert abs(got[idx].item() - expected) <= bound, (idx, got[idx].item(), expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dim", DIMS)
def test_dense_badly_scaled_matches_mpmath(dtype, dim):
    """Scales spanning SCALE_RANGES[dtype], points at 1e-3, 1, 30 sd; bound 4 eps scale."""
    lo, hi = SCALE_RANGES[dtype]
    gen = torch.Generator().manual_seed(200 + dim)
    cases = [
        _dense_cases(gen, (2,), dim, lo=lo, hi=hi, kind=kind, far=far)
        for kind in ("row", "diag")
        for far in (1e-3, 1.0, 30.0)
    ]
    value, loc, factor = (torch.cat(parts).to(dtype) for parts in zip(*cases, strict=True))
    got = multivariate_normal_log_prob(value, loc, factor)
    assert got.dtype == _compute_dtype(dtype)
    refs = [dense_ref(_key(value[i]), _key(loc[i]), _key(factor[i])) for i in range(len(value))]
    expected = [r[0] for r in refs]
    bound = [4 * _eps(dtype) * _scale(r[1], r[2], dim) for r in refs]
    assert_within(
        got.double().numpy(), expected, bound, list(range(len(value))), f"{dtype} D={dim}"
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_dense_gradients_badly_scaled_match_mpmath(dtype):
    """d/dvalue, d/dloc, d/dscale_tril vs mpmath, in coordinates made dimensionless by scales.

    Bound: ``||s (g - g_ref)|| <= 8 eps ||s g_ref|| + ||s rnd(g_ref)||`` (see module doc),
    where ``rnd(g) = eps_half/2 |g| + subnormal_half/2`` is the rounding of a gradient to a
    half-precision input's dtype (0 for float32 / float64).
    Also: every gradient is finite and zero above the diagonal of ``scale_tril``. float16
    uses scales 0.1 .. 10: with 1e-2 .. 1e2 the exact gradients (up to ``far^2 / s``)
    exceed the float16 range that a gradient of a float16 leaf is returned in.
    """
    lo, hi = (0.1, 10.0) if dtype == torch.float16 else SCALE_RANGES[dtype]
    gen = torch.Generator().manual_seed(300)
    fi = torch.finfo(dtype)
    half, sub = (fi.eps / 2, fi.smallest_normal * fi.eps / 2) if dtype in HALF_DTYPES else (0, 0)
    worst = 0.0
    for dim in (1, 2, 5, 8):
        for kind in ("row", "diag"):
            for far in (1e-3, 1.0, 30.0):
                value, loc, factor = (
                    t[0].to(dtype)
                    for t in _dense_cases(gen, (1,), dim, lo=lo, hi=hi, kind=kind, far=far)
                )
                for t in (value, loc, factor):
                    t.requires_grad_(True)
                multivariate_normal_log_prob(value, loc, factor).backward()
                assert value.grad.dtype == dtype
                for t in (value, loc, factor):
                    assert torch.isfinite(t.grad).all()
                assert (factor.grad.triu(1) == 0).all()
                ref = np.array(dense_grad_ref(_key(value), _key(loc), _key(factor)))
                rows, cols = np.tril_indices(dim)
                s = factor.detach().double().diagonal().abs().numpy()
                for got, expected, weight in (
                    (value.grad.double().numpy(), ref[:dim], s),
                    (loc.grad.double().numpy(), -ref[:dim], s),  # d/dloc = -d/dvalue
                    (factor.grad.double().numpy()[rows, cols], ref[dim:], s[rows]),
                ):
                    err = np.linalg.norm(weight * (got - expected))
                    bound = 8 * _eps(dtype) * np.linalg.norm(weight * expected)
                    bound += np.linalg.norm(weight * (half * np.abs(expected) + sub))
                    assert err <= bound, (dim, kind, far, got, expected)
                    worst = max(worst, err / bound if bound else 0.0)
    print(f"{dtype}: worst gradient error / bound = {worst:.3g}")


def test_dense_half_squared_norm_does_not_overflow_float32():
    """||z||^2 = 4.5e38 overflows float32, ||z||^2/2 = 2.25e38 does not: ours is finite.

    Reference: mpmath; bound 4 eps scale. torch's MultivariateNormal(scale_tril=...) squares
    before halving and returns -inf here.
    """
    value = torch.tensor([1.5e19, -1.5e19])
    loc = torch.zeros(2)
    factor = torch.eye(2)
    got = multivariate_normal_log_prob(value, loc, factor)
    ref = dense_ref(_key(value), _key(loc), _key(factor))
    assert math.isfinite(ref[0])
    assert abs(got.item() - ref[0]) <= 4 * _eps(torch.float32) * _scale(ref[1], ref[2], 2)
    assert torch.isneginf(MultivariateNormal(loc, scale_tril=factor).log_prob(value))
    value.requires_grad_(True)
    multivariate_normal_log_prob(value, loc, factor).backward()
    torch.testing.assert_close(value.grad, -value.detach(), rtol=0, atol=0)  # -Sigma^-1 r


def test_dense_half_squared_norm_does_not_overflow_float64():
    """As above in float64 with L = 1e-150 I: z = 1.2e154, ||z||^2 = 2.9e308 > max."""
    value = torch.tensor([1.2e4, 1.2e4], dtype=F64)
    loc = torch.zeros(2, dtype=F64)
    factor = 1e-150 * torch.eye(2, dtype=F64)
    got = multivariate_normal_log_prob(value, loc, factor)
    ref = dense_ref(_key(value), _key(loc), _key(factor))
    assert math.isfinite(ref[0])
    assert abs(got.item() - ref[0]) <= 4 * _eps(F64) * _scale(ref[1], ref[2], 2)
    assert torch.isneginf(MultivariateNormal(loc, scale_tril=factor).log_prob(value))


def test_dense_overflow_gives_minus_inf():
    """Where maha/2 itself exceeds the float32 range the result is -inf, not NaN."""
    got = multivariate_normal_log_prob(torch.tensor([3e19, 3e19]), torch.zeros(2), torch.eye(2))
    assert torch.isneginf(got)


def test_dense_at_the_mean():
    """value == loc: maha = 0, log p = -sum log L_ii - D/2 log 2 pi exactly; gradient in value 0."""
    factor = torch.tensor([[2.0, 0.0], [0.3, 0.5]], dtype=F64)
    value = torch.ones(2, dtype=F64, requires_grad=True)
    got = multivariate_normal_log_prob(value, torch.ones(2, dtype=F64), factor)
    assert got.item() == pytest.approx(-math.log(2.0 * 0.5) - LOG_2PI, rel=4e-16)
    got.backward()
    assert (value.grad == 0).all()


# ======================================================================================
# Dense: broadcasting, dtype policy, agreement with torch where torch is right
# ======================================================================================


def _dense_loop(value, loc, factor):
    """Reference for broadcasting: one call per event after explicit expansion."""
    batch = torch.broadcast_shapes(value.shape[:-1], loc.shape[:-1], factor.shape[:-2])
    dim = factor.shape[-1]
    v = value.expand((*batch, dim)).reshape(-1, dim)
    m = loc.expand((*batch, dim)).reshape(-1, dim)
    f = factor.expand((*batch, dim, dim)).reshape(-1, dim, dim)
    return torch.stack(
        [multivariate_normal_log_prob(v[i], m[i], f[i]) for i in range(v.shape[0])]
    ).reshape(batch)


@pytest.mark.parametrize(
    ("value_shape", "loc_shape", "factor_shape"),
    [
        ((7, 3), (3,), (3, 3)),  # shared factor: one solve with many right-hand sides
        ((5, 1, 3), (3,), (4, 3, 3)),
        ((3,), (2, 3), (2, 3, 3)),
        ((2, 4, 3), (1, 4, 3), (1, 1, 3, 3)),
        ((6, 3), (6, 3), (6, 3, 3)),
    ],
)
def test_dense_broadcasting(value_shape, loc_shape, factor_shape):
    """Batch dimensions broadcast; each event equals the unbatched call (float64). Bound 4 eps
    scale: a shared factor is solved against all right-hand sides at once (another BLAS
    routine, another rounding order); both are backward stable, within 2 eps scale each."""
    gen = torch.Generator().manual_seed(1)
    dim = factor_shape[-1]
    factor = _unit_factor(gen, factor_shape[:-2], dim)
    value = torch.randn(value_shape, generator=gen, dtype=F64)
    loc = torch.randn(loc_shape, generator=gen, dtype=F64)
    got = multivariate_normal_log_prob(value, loc, factor)
    expected = _dense_loop(value, loc, factor)
    assert got.shape == expected.shape
    half_maha = -expected - 0.5 * dim * LOG_2PI + factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    terms = factor.diagonal(dim1=-2, dim2=-1).log().abs().sum(-1)
    scale = half_maha.abs() + terms + 0.5 * dim * LOG_2PI
    assert ((got - expected).abs() <= 4 * _eps(F64) * scale).all()


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_dense_half_inputs_return_float32(dtype):
    """Half inputs are computed in float32 and equal the float32 call on the same values."""
    gen = torch.Generator().manual_seed(2)
    value, loc, factor = (
        t.to(dtype) for t in _dense_cases(gen, (3,), 3, lo=0.1, hi=10, kind="row", far=1.0)
    )
    got = multivariate_normal_log_prob(value, loc, factor)
    assert got.dtype == torch.float32
    expected = multivariate_normal_log_prob(value.float(), loc.float(), factor.float())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_dense_mixed_dtypes_promote():
    got = multivariate_normal_log_prob(torch.zeros(2, dtype=F64), torch.zeros(2), torch.eye(2))
    assert got.dtype == F64


def test_dense_agrees_with_torch_scale_tril_float64():
    """Values and gradients against torch MultivariateNormal(scale_tril=...), float64.

    Bounds: values 4 eps scale; gradients ``4 D eps kappa(L)^2`` of the largest entry of each
    gradient: both sides are backward-stable triangular solves (``z = L^{-1} r`` and
    ``L^{-T} z``, each within ``D eps kappa(L)`` relative, Higham (2002) thm. 8.5), and the
    gradient in ``L`` is a product of the two.
    """
    gen = torch.Generator().manual_seed(3)
    for dim in DIMS:
        factor = _unit_factor(gen, (6,), dim).requires_grad_(True)
        loc = torch.randn(6, dim, generator=gen, dtype=F64).requires_grad_(True)
        value = (loc.detach() + 3.0 * torch.randn(6, dim, generator=gen, dtype=F64)).requires_grad_(
            True
        )
        ours = multivariate_normal_log_prob(value, loc, factor)
        theirs = MultivariateNormal(loc, scale_tril=factor).log_prob(value)
        z = torch.linalg.solve_triangular(
            factor.detach(), (value - loc).detach().unsqueeze(-1), upper=False
        )
        scale = 0.5 * z.square().sum((-2, -1)) + factor.detach().diagonal(
            dim1=-2, dim2=-1
        ).log().abs().sum(-1)
        scale = scale + 0.5 * dim * LOG_2PI
        assert ((ours - theirs).abs() <= 4 * _eps(F64) * scale).all()
        g_ours = torch.autograd.grad(ours.sum(), (value, loc, factor))
        g_theirs = torch.autograd.grad(theirs.sum(), (value, loc, factor))
        for a, b in zip(g_ours, g_theirs, strict=True):
            b = b.tril() if b.dim() == 3 else b  # torch's gradient for L is already lower
            kappa = torch.linalg.cond(factor.detach()).max().item()
            atol = 4 * dim * _eps(F64) * kappa**2 * b.abs().max().item()
            torch.testing.assert_close(a, b, rtol=0, atol=atol)


@settings(max_examples=40)
@given(
    dim=st.integers(1, 5),
    log_scales=st.lists(st.floats(-20, 20), min_size=5, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_dense_property_agrees_with_torch_and_affine_law(dim, log_scales, seed):
    """For random factors (diagonal e^{+-20}, row-scaled), float64:

    * agreement with torch MultivariateNormal(scale_tril=...) (16 eps scale), and
    * the change-of-variables law ``log p(A x; A mu, A L) = log p(x; mu, L) - log|det A|``
      for lower-triangular ``A = diag(s) A0 diag(s)^-1`` (so ``A L = diag(s) A0 M`` stays
      lower triangular and row-scaled; an ``A`` mixing rows of different scales would make
      the transformed problem ill-conditioned), within ``64 eps (scale + |log det A|)``
      (``A``, ``A L``, ``A x`` and ``A mu`` are rounded products).
    """
    gen = torch.Generator().manual_seed(seed)
    s = torch.exp(torch.tensor(log_scales[:dim], dtype=F64))
    factor = s[:, None] * _unit_factor(gen, (), dim)
    loc = s * torch.randn(dim, generator=gen, dtype=F64)
    value = loc + factor @ (2.0 * torch.randn(dim, generator=gen, dtype=F64))
    ours = multivariate_normal_log_prob(value, loc, factor)
    theirs = MultivariateNormal(loc, scale_tril=factor).log_prob(value)
    z = torch.linalg.solve_triangular(factor, (value - loc)[:, None], upper=False)
    scale = _scale(0.5 * z.square().sum().item(), factor.diagonal().log().abs().sum().item(), dim)
    assert abs(ours.item() - theirs.item()) <= 16 * _eps(F64) * scale
    a0 = _unit_factor(gen, (), dim)
    a = s[:, None] * a0 / s[None, :]
    moved = multivariate_normal_log_prob(a @ value, a @ loc, a @ factor)
    log_det_a = a0.diagonal().log().sum().item()
    assert abs(moved.item() - (ours.item() - log_det_a)) <= 64 * _eps(F64) * (
        scale + abs(log_det_a)
    )


# ======================================================================================
# Dense: gradcheck and validation
# ======================================================================================


def test_dense_gradcheck_float64():
    """float64 gradcheck and gradgradcheck in (value, loc, scale_tril), batch 2, D = 3."""
    gen = torch.Generator().manual_seed(4)
    factor = _unit_factor(gen, (2,), 3).requires_grad_(True)
    loc = torch.randn(2, 3, generator=gen, dtype=F64).requires_grad_(True)
    value = torch.randn(2, 3, generator=gen, dtype=F64).requires_grad_(True)

    # validate_args=False: finite-difference steps perturb the zero upper triangle too
    def fn(v, m, f):
        return multivariate_normal_log_prob(v, m, f.tril(), validate_args=False)

    assert torch.autograd.gradcheck(fn, (value, loc, factor))
    assert torch.autograd.gradgradcheck(fn, (value, loc, factor))


@pytest.mark.parametrize(
    ("value_shape", "loc_shape", "factor_shape", "match"),
    [
        ((3,), (2,), (2, 2), r"value must have shape \(\*, 2\).*\(3,\)"),
        ((2,), (3,), (2, 2), r"loc must have shape \(\*, 2\).*\(3,\)"),
        ((2,), (2,), (2, 3), r"scale_tril must have shape \(\*, D, D\).*\(2, 3\)"),
        ((2,), (2,), (2,), r"scale_tril must have shape \(\*, D, D\).*\(2,\)"),
        ((), (2,), (2, 2), r"value must have shape \(\*, 2\).*\(\)"),
        (
            (4, 2),
            (2,),
            (3, 2, 2),
            r"batch shapes do not broadcast: value \(4,\).*scale_tril \(3,\)",
        ),
    ],
)
def test_dense_shape_errors(value_shape, loc_shape, factor_shape, match):
    with pytest.raises(ValueError, match=match):
        multivariate_normal_log_prob(
            torch.zeros(value_shape), torch.zeros(loc_shape), torch.ones(factor_shape)
        )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda v, m, f: f.__setitem__((1, 1), 0.0), r"positive diagonal; got 1 diagonal"),
        (lambda v, m, f: f.__setitem__((0, 0), -1.0), r"positive diagonal.*smallest -1"),
        (lambda v, m, f: f.__setitem__((0, 1), 0.5), r"must be lower triangular; 1 entries"),
        (lambda v, m, f: v.__setitem__(0, math.nan), r"value of shape \(2,\) contains 1 NaN"),
        (lambda v, m, f: m.__setitem__(1, math.nan), r"loc of shape \(2,\) contains 1 NaN"),
        (lambda v, m, f: f.__setitem__((1, 0), math.nan), r"scale_tril of shape \(2, 2\) contains"),
    ],
)
def test_dense_value_errors_when_validating(change, match):
    """Validation (default on CPU) names the argument and shape; validate_args=False skips it."""
    value, loc, factor = torch.zeros(2), torch.zeros(2), torch.eye(2)
    change(value, loc, factor)
    with pytest.raises(ValueError, match=match):
        multivariate_normal_log_prob(value, loc, factor)
    with pytest.raises(ValueError, match=match):
        multivariate_normal_log_prob(value, loc, factor, validate_args=True)
    multivariate_normal_log_prob(value, loc, factor, validate_args=False)  # no check, no raise


def test_dense_reads_only_the_lower_triangle_without_validation():
    factor = torch.tensor([[1.0, 7.0], [0.5, 2.0]], dtype=F64)
    got = multivariate_normal_log_prob(
        torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64), factor, validate_args=False
    )
    expected = multivariate_normal_log_prob(
        torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64), factor.tril()
    )
    assert got.item() == expected.item()
