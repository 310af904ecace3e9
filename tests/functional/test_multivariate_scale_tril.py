"""Tests of ``probloss.functional.multivariate.scale_tril_from_raw`` (the unconstrained
triangular-factor parameterisation), and the user stories where a covariance built from such
parameters breaks ``torch.distributions.MultivariateNormal`` while ``L`` built from them
gives the exact log density.

Where the numbers come from
---------------------------
* **mpmath**: the oracles of ``_multivariate_oracles.py`` (the covariance formed *as a
  matrix* at high precision, Gaussian elimination written there, nothing of the
  implementation reused; evaluated at doubling precision until 25 digits agree).
  Among them, Graves' bivariate closed form at the exact ``sigma_x, sigma_y`` and
  ``rho = tanh(a)``.
* mpmath ``min_scale + log1p(exp(raw))`` at 40 digits for the diagonal of the factor.

Bounds
------
``eps``, ``scale`` (the sizes of the terms a log density is summed from) and ``cond`` (the
first-order change of the result when every input entry moves by a relative ``eps``) are
defined in the module doc of ``_multivariate_oracles.py``.

* user-story failures of torch (rho rounding to 1, scales 1e-25 / 1e25): ``2 eps (scale +
  cond)`` at the exact ``L``, ``4 eps (scale + cond)`` against Graves' closed form at the
  exact parameters; see each test for measured values.
* ``scale_tril_from_raw``: off-diagonal entries exact, diagonal within ``2 eps`` of mpmath
  ``min_scale + log1p(exp(raw))``; round trips within ``2 eps (1 + |raw|)`` and ``2 eps |L|``.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from mpmath import mp
from torch.distributions import MultivariateNormal

from probloss.functional import (
    multivariate_normal_log_prob,
    scale_tril_from_raw,
)
from probloss.functional.multivariate import default_min_diag, default_min_scale
from probloss.special import log_cosh, softplus_inverse
from tests.functional._checks import FLOAT_DTYPES, dtype_id
from tests.functional._multivariate_oracles import (
    _compute_dtype,
    _dense_cond,
    _eps,
    _key,
    _scale,
    dense_ref,
    graves_ref,
)

F64 = torch.float64

# ======================================================================================
# scale_tril_from_raw
# ======================================================================================


def test_scale_tril_ordering_row_major_lower_triangle():
    """Entry k of raw lands at torch.tril_indices(D, D)[:, k]; diagonal = min_scale + softplus.

    Reference: mpmath ``min_scale + log1p(exp(raw))`` (2 eps); off-diagonal entries exact.
    """
    dim = 4
    raw = torch.linspace(-30.0, 25.0, dim * (dim + 1) // 2, dtype=F64)
    factor = scale_tril_from_raw(raw, dim, min_scale=1e-3)
    rows, cols = torch.tril_indices(dim, dim)
    assert (factor.triu(1) == 0).all()
    for k, (i, j) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        if i != j:
            assert factor[i, j].item() == raw[k].item()
        else:
            assert k == i * (i + 3) // 2
            with mp.workdps(40):
                expected = float(mpmath.mpf(1e-3) + mpmath.log1p(mpmath.exp(raw[k].item())))
            assert factor[i, j].item() == pytest.approx(expected, rel=2 * _eps(F64), abs=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_scale_tril_extreme_raw(dtype):
    """raw in +-1e4 and +-1e30 (+-6e4 for float16, its range): finite, lower triangular,
    diagonal >= min_scale (exactly min_scale where softplus underflows), finite gradients
    that are exactly 1 on off-diagonal entries."""
    big = 6e4 if dtype == torch.float16 else 1e30
    values = [-big, -1e4, -1.0, 0.0, 1.0, 1e4, big]
    dim = 3
    raw = torch.tensor(
        [[v] * 6 for v in values] + [[values[i % 7] for i in range(k, k + 6)] for k in range(7)],
        dtype=dtype,
        requires_grad=True,
    )
    factor = scale_tril_from_raw(raw, dim)
    compute = _compute_dtype(dtype)
    assert factor.dtype == compute and factor.shape == (14, 3, 3)
    min_scale = default_min_scale(dtype)
    assert torch.isfinite(factor).all()
    assert (factor.triu(1) == 0).all()
    diag = factor.diagonal(dim1=-2, dim2=-1)
    assert (diag >= torch.tensor(min_scale, dtype=compute)).all()
    assert (diag[0] == torch.tensor(min_scale, dtype=compute)).all()  # raw = -big
    factor.sum().backward()
    assert torch.isfinite(raw.grad).all()
    off = torch.tensor([k not in (0, 2, 5) for k in range(6)])
    assert (raw.grad[:, off] == 1).all()


def test_scale_tril_default_min_scale():
    """sqrt(eps) of the compute dtype: 3.45e-4 for float32 and half inputs, 1.49e-8 for float64."""
    assert default_min_scale(torch.float32) == pytest.approx(3.4526698e-4, rel=1e-7)
    assert default_min_scale(torch.float16) == default_min_scale(torch.float32)
    assert default_min_scale(torch.bfloat16) == default_min_scale(torch.float32)
    assert default_min_scale(F64) == pytest.approx(1.4901161193847656e-8, rel=1e-15)
    low = torch.full((3,), -1e4, dtype=F64)
    assert (scale_tril_from_raw(low, 2).diagonal() == 1.4901161193847656e-8).all()


def test_scale_tril_min_diag_was_renamed_min_scale():
    """The floor has one name, min_scale (scale units); the old keyword raises a TypeError
    naming the new one, and default_min_diag is kept as an alias of default_min_scale."""
    raw = torch.zeros(3)
    with pytest.raises(TypeError, match="min_diag was renamed min_scale"):
        scale_tril_from_raw(raw, 2, min_diag=1e-3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'floor'"):
        scale_tril_from_raw(raw, 2, floor=1e-3)
    assert default_min_diag is default_min_scale


def test_scale_tril_gradients_reach_every_raw_entry():
    """Through the log density (D = 4, batch 3): every raw entry gets a nonzero, finite
    gradient; float64 gradcheck of raw -> L and of raw -> log density."""
    gen = torch.Generator().manual_seed(5)
    dim = 4
    raw = torch.randn(3, dim * (dim + 1) // 2, generator=gen, dtype=F64).requires_grad_(True)
    value = torch.randn(3, dim, generator=gen, dtype=F64)
    log_p = multivariate_normal_log_prob(
        value, torch.zeros(dim, dtype=F64), scale_tril_from_raw(raw, dim)
    )
    log_p.sum().backward()
    assert torch.isfinite(raw.grad).all() and (raw.grad != 0).all()
    assert torch.autograd.gradcheck(lambda r: scale_tril_from_raw(r, dim), (raw,))
    assert torch.autograd.gradcheck(
        lambda r: multivariate_normal_log_prob(
            value, torch.zeros(dim, dtype=F64), scale_tril_from_raw(r, dim)
        ),
        (raw,),
    )


def _raw_from_factor(factor: torch.Tensor, min_scale: float) -> torch.Tensor:
    """Inverse of scale_tril_from_raw: off-diagonals as they are, softplus_inverse(L_ii - m)."""
    dim = factor.shape[-1]
    rows, cols = torch.tril_indices(dim, dim)
    raw = factor[..., rows, cols].clone()
    diag = rows == cols
    raw[..., diag] = softplus_inverse(factor[..., rows[diag], cols[diag]] - min_scale)
    return raw


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=dtype_id)
def test_scale_tril_round_trip(dtype):
    """raw -> L -> raw and L -> raw -> L, raw ~ U(-5, 5), min_scale 1e-6: within 2 eps (1 + |raw|)
    and 2 eps |L| (the rounding of min_scale + softplus and of softplus_inverse; measured
    0.5 and 0.9 eps)."""
    gen = torch.Generator().manual_seed(6)
    dim, min_scale = 5, 1e-6
    raw = (10 * torch.rand(20, dim * (dim + 1) // 2, generator=gen, dtype=F64) - 5).to(dtype)
    factor = scale_tril_from_raw(raw, dim, min_scale=min_scale)
    back = _raw_from_factor(factor, min_scale)
    eps = _eps(dtype)
    assert ((back - raw).abs() <= 2 * eps * (1 + raw.abs())).all()
    again = scale_tril_from_raw(back, dim, min_scale=min_scale)
    assert ((again - factor).abs() <= 2 * eps * factor.abs()).all()


def test_scale_tril_initialisation_recipe():
    """bias = softplus_inverse(s - min_scale) on the diagonal, 0 elsewhere: L = s I (2 eps)."""
    dim, s, min_scale = 3, 0.05, default_min_scale(torch.float32)
    bias = torch.zeros(dim * (dim + 1) // 2)
    bias[[0, 2, 5]] = softplus_inverse(torch.tensor(s - min_scale))
    factor = scale_tril_from_raw(bias, dim)
    torch.testing.assert_close(factor, s * torch.eye(dim), rtol=0, atol=2 * _eps(torch.float32) * s)


@pytest.mark.parametrize(
    ("shape", "dim", "kwargs", "match"),
    [
        (
            (4, 5),
            3,
            {},
            r"raw must have shape \(\*, D\(D\+1\)/2\) = \(\*, 6\) for dim=3, got shape \(4, 5\)",
        ),
        ((), 1, {}, r"\(\*, 1\) for dim=1, got shape \(\) \(a 0-dim tensor\)"),
        ((3,), 0, {}, r"dim must be a positive int, got 0"),
        ((3,), 2.0, {}, r"dim must be a positive int, got 2.0"),
        ((3,), 2, {"min_scale": -1e-3}, r"min_scale must be finite and >= 0, got -0.001"),
        ((3,), 2, {"min_scale": math.nan}, r"min_scale must be finite and >= 0, got nan"),
    ],
)
def test_scale_tril_errors(shape, dim, kwargs, match):
    with pytest.raises(ValueError, match=match):
        scale_tril_from_raw(torch.zeros(shape), dim, **kwargs)


# ======================================================================================
# torch.distributions.MultivariateNormal breaks where probloss is exact
# ======================================================================================


def _bivariate_factor(log_s: torch.Tensor, atanh_rho: torch.Tensor) -> torch.Tensor:
    """L of the bivariate normal built in log space (sketch-rnn / Graves parameters).

    ``L = [[sx, 0], [sy rho, sy sqrt(1 - rho^2)]]`` with ``sqrt(1 - rho^2) = 1/cosh(a)``
    evaluated as ``exp(log sy - log_cosh(a))``: exact even where ``tanh(a)`` rounds to 1.
    """
    sx, sy = torch.exp(log_s)
    l21 = sy * torch.tanh(atanh_rho)
    l22 = torch.exp(log_s[1] - log_cosh(atanh_rho))
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero]), torch.stack([l21, l22])])


@pytest.mark.parametrize(
    ("dtype", "atanh_rho"), [(torch.float32, 10.0), (F64, 20.0)], ids=["f32", "f64"]
)
def test_torch_covariance_fails_when_rho_rounds_to_one(dtype, atanh_rho):
    """The user story: covariance [[sx^2, rho sx sy], [rho sx sy, sy^2]] with rho = tanh(a).

    tanh(10) == 1 in float32 and tanh(20) == 1 in float64, so the covariance is singular:
    torch raises (ValueError from its constraint check, LinAlgError without it). Ours, from
    L built in log space, at a point drawn from the distribution: within
    2 eps (scale + cond) of mpmath at the exact L, and within 4 eps (scale + cond) of
    Graves' closed form at the exact parameters (L's entries are within a few eps of
    their exact values; ``cond`` is the first-order effect of relative perturbations eps of
    every input entry, 3e3 (float32) and 4e7 (float64) times scale here: the density is a
    ridge of width L22 = sy / cosh(a)). Measured: 0.09 / 0.04 (exact L), 0.11 / 0.09
    (Graves) of these bounds in float32 / float64; relative error 8e-5 / 1e-9 end to end.
    """
    log_s = torch.tensor([math.log(2.0), math.log(0.5)], dtype=dtype)
    a = torch.tensor(atanh_rho, dtype=dtype)
    rho = torch.tanh(a)
    assert rho.item() == 1.0
    sx, sy = torch.exp(log_s)
    cov = torch.stack([torch.stack([sx**2, rho * sx * sy]), torch.stack([rho * sx * sy, sy**2])])
    loc = torch.tensor([0.3, -0.2], dtype=dtype)
    factor = _bivariate_factor(log_s, a)
    value = (loc.double() + factor.double() @ torch.tensor([0.7, -1.3], dtype=F64)).to(dtype)
    with pytest.raises(ValueError, match="covariance_matrix"):
        MultivariateNormal(loc, covariance_matrix=cov).log_prob(value)
    with pytest.raises(torch.linalg.LinAlgError, match="not positive-definite"):
        MultivariateNormal(loc, covariance_matrix=cov, validate_args=False).log_prob(value)

    got = multivariate_normal_log_prob(value, loc, factor).item()
    log_p, half_maha, log_det_terms = dense_ref(_key(value), _key(loc), _key(factor))
    cond = _dense_cond(value, loc, factor)
    scale = _scale(half_maha, log_det_terms, 2)
    assert cond > 1e3 * scale  # near-singular: the point's offset from the line is ~L22
    assert abs(got - log_p) <= 2 * _eps(dtype) * (scale + cond)
    log_p, half_maha, log_det_terms = graves_ref(_key(value), _key(loc), _key(log_s), a.item())
    assert abs(got - log_p) <= 4 * _eps(dtype) * (_scale(half_maha, log_det_terms, 2) + cond)


@pytest.mark.parametrize(
    ("dtype", "tiny_scale"), [(torch.float32, 1e-25), (F64, 1e-170)], ids=["f32", "f64"]
)
def test_torch_covariance_fails_for_scales_spanning_many_orders(dtype, tiny_scale):
    """sx = tiny_scale, sy = 1/tiny_scale: sx^2 underflows to 0, so torch's Cholesky raises.

    Ours, with L from scale_tril_from_raw (diagonal raw = softplus_inverse(scale),
    min_scale=0, correlation 0.6; the diagonal comes back within eps (1 + |raw|)): within
    4 eps scale of mpmath at the exact L (row-scaled: the problem is well-conditioned).
    """
    s = torch.tensor([tiny_scale, 1.0 / tiny_scale], dtype=dtype)
    raw = torch.stack([softplus_inverse(s[0]), 0.6 * s[1], softplus_inverse(0.8 * s[1])])
    factor = scale_tril_from_raw(raw, 2, min_scale=0.0)
    # softplus(x) ~ e^x for x << 0: a relative error of eps |x| from rounding raw ~ log(s)
    target = torch.stack([s[0], 0.8 * s[1]])
    rtol = _eps(dtype) * (1 + raw[[0, 2]].abs())
    assert ((factor.diagonal() - target).abs() <= rtol * target).all()
    loc = torch.zeros(2, dtype=dtype)
    value = (factor.double() @ torch.tensor([1.5, -0.5], dtype=F64)).to(dtype)
    cov = factor @ factor.mT
    assert cov[0, 0] == 0.0
    with pytest.raises(torch.linalg.LinAlgError, match="not positive-definite"):
        MultivariateNormal(loc, covariance_matrix=cov, validate_args=False).log_prob(value)
    got = multivariate_normal_log_prob(value, loc, factor).item()
    log_p, half_maha, log_det_terms = dense_ref(_key(value), _key(loc), _key(factor))
    assert abs(got - log_p) <= 4 * _eps(dtype) * _scale(half_maha, log_det_terms, 2)
