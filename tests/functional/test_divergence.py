"""Tests of ``probloss.functional.divergence``: ``bernoulli_kl`` and ``continuous_bernoulli_kl``.

Where the numbers come from
---------------------------
Expected values are mpmath evaluations (``tests/functional/cb_reference.py``) of the
closed forms, at the exact inputs after the cast to the dtype under test, converged to 25
significant digits (the closed forms cancel catastrophically near ``q == p`` and for large
logits of one sign; the oracle raises the precision until two evaluations agree):

* Bernoulli: ``softplus(lp) - softplus(lq) - sigmoid(lq) (lp - lq)``, gradients
  ``dKL/dlp = sigmoid(lp) - sigmoid(lq)``, ``dKL/dlq = -sigmoid'(lq) (lp - lq)``;
* continuous Bernoulli: ``A(p) - A(q) - mean(q) (p - q)`` with ``A = log(expm1(eta)/eta)``,
  ``mean = 1/(1 - e^-eta) - 1/eta``; gradients ``dKL/dp = mean(p) - mean(q)``,
  ``dKL/dq = -var(q) (p - q)``, ``var = 1/eta^2 - 1/(4 sinh^2(eta/2))``.

Bounds
------
Values (``test_kl_matches_mpmath``), per pair, from the form the implementation uses (and
at least ``tiny``, so that underflow to 0 or a subnormal is accepted):

* quadrature (``|p - q| <= 2``, resp. ``max(4, |q|/2)``): a sum of ``n`` positive terms
  (``n`` = 8 nodes in float32, 16 in float64) ``w (1 - t) Delta^2 f''(q + t Delta)``, each
  within about 12 ulp (``f''`` by the special functions' 9-ulp contract, ``Delta^2``, the
  node and the weight one rounding each), summed with ``n - 1`` roundings, plus the
  quadrature error ``~3.4^(-2n)`` (below an ulp): ``(13 + n) eps`` relative;
* closed form, after the reflection to ``q <= 0``: ``f(p) - f(q) - f'(q)(p - q)``, each
  term within 10 ulp (the contract plus a rounding), and two subtractions: ``12 eps``
  times ``|f(p)| + |f(q)| + |f'(q)(p - q)| (1 + |log f'(q)|)`` (mpmath), the last factor
  for ``e^{-softplus(-q)}`` formed from an exponent of size ``|log f'(q)|``.

Gradients (``test_kl_gradients_match_mpmath``), per pair, likewise:

* quadrature: the derivative of the rule, ``sum k_i (2 |Delta| f2 + Delta^2 |f3|)`` at the
  nodes (``f2``, ``f3`` the second and third derivatives of the log-partition), with
  ``|f3| <= f2`` (a third central moment of a variable in ``[0, 1]``): at most
  ``KL (1 + 2 / |Delta|)`` in magnitude, each term within ``(14 + n)`` ulp;
* closed form: ``dKL/dp = f1(p) - f1(q)`` and ``dKL/dq = -f1(q) + f1(q) - f2(q)(p - q)``
  as autograd forms them, each term within 10 ulp, times ``1 + |log f1(q)|`` for the terms
  built from ``e^{-softplus(-q)}``.

The regression tests use the same per-pair bounds (``_assert_kl_matches``); half inputs
are computed in float32 and their gradients rounded once to the input dtype (plus
``eps/2`` relative). Measured worst on the grids: 0.08 to 0.29 of the bounds.

Example of the closed-form bound at work: q=+-1000, p=+-1510 (just past the quadrature
region |p - q| <= |q|/2; after reflection to q <= 0 the terms ``A(p) - A(q) ~ -0.41`` and
``mean(q)(p - q) ~ -0.51``, built from logs of size ~7, cancel to 0.0979), where the
bound is ~150 times ``12 eps`` relative to the KL.

Regression tests at the end pin four failure modes found and fixed during development:
``F.softplus``'s threshold of 20 (a relative 2e-10 error in float64), ``(p - q)^2``
overflowing in the quadrature for huge same-sign logits, NaN gradients from the unselected
quadrature branch when ``|p - q| > sqrt(finfo.max)``, and the variance's derivative
underflowing for huge logits; and two from issue 10: ``p - q`` overflowing ``finfo.max``
in the closed form, and huge logits (3e34) on the quadrature branch.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpmath import mp
from torch.distributions import Bernoulli, kl_divergence
from torch.distributions import ContinuousBernoulli as TorchCB

from probloss.functional import bernoulli_kl, continuous_bernoulli_kl
from tests.functional import cb_reference as ref
from tests.functional._checks import (
    F32_F64,
    FLOAT_DTYPES,
    HALF_DTYPES,
    assert_within,
    cast,
    dtype_id,
    signed,
)

KL = {"bernoulli": bernoulli_kl, "continuous_bernoulli": continuous_bernoulli_kl}
ORACLE = {"bernoulli": ref.bernoulli_kl, "continuous_bernoulli": ref.cb_kl}
GRAD_ORACLE = {"bernoulli": ref.bernoulli_kl_grad, "continuous_bernoulli": ref.cb_kl_grad}


# ======================================================================================
# Grids (float64 pairs (q, p); cast to the dtype under test before use)
# ======================================================================================

_BASE = [0.0, *signed([1e-30, 1e-7, 0.5, 1.0, 3.0, 4.0, 8.0, 17.0, 30.0, 50.0, 100.0])]
_BASE += signed([1e3, 1e4])


def _bernoulli_pairs() -> list[tuple[float, float]]:
    pairs = list(itertools.product(_BASE, _BASE))
    # near-equal pairs: absolute and relative offsets
    for q in (0.0, 0.5, -3.0, 10.0, 30.0, -50.0):
        for d in (1e-7, 1e-4, 1e-2, 0.5):
            pairs += [(q, q + d), (q, q - d)]
            if q:
                pairs += [(q, q * (1 + d)), (q, q * (1 - d))]
    # saturating sigmoid, both large of one sign, and the near/far switch |lp - lq| = 2
    pairs += [(30.0, 0.0), (0.0, 30.0), (100.0, -100.0), (-100.0, 100.0)]
    pairs += [(30.0, 40.0), (40.0, 30.0), (-30.0, -45.0), (50.0, 60.0), (1e3, 1.1e3)]
    pairs += [(1e4, 1.5e4), (-1e4, -1.5e4)]
    for q in (0.0, 1.0, -5.0, 12.0):
        pairs += [(q, q + s * 2.0 * k) for s in (1, -1) for k in (1 - 1e-6, 1.0, 1 + 1e-6)]
    return pairs


def _cb_pairs() -> list[tuple[float, float]]:
    pairs = list(itertools.product(_BASE, _BASE))
    # near-equal pairs: relative differences 1e-7 .. 1e-2 (the quadrature region)
    for q in (0.5, -3.0, 8.0, 30.0, -50.0, 1e3, -1e4):
        for r in (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
            pairs += [(q, q * (1 + r)), (q, q * (1 - r))]
    pairs += [(0.0, d) for d in signed([1e-7, 1e-5, 1e-3, 1e-2])]
    # the switch |p - q| = max(4, |q|/2) between quadrature and closed form, both sides
    for q in (0.0, 1.0, -3.0, 8.0, 20.0, -40.0, 1e3, -1e3):
        width = max(4.0, abs(q) / 2)
        pairs += [(q, q + s * width * k) for s in (1, -1) for k in (1 - 1e-3, 1.0, 1 + 1e-3)]
    pairs += [(1e3, 1510.0), (-1e3, -1510.0), (50.0, 40.0), (30.0, 25.0)]
    return pairs


PAIRS = {"bernoulli": _bernoulli_pairs(), "continuous_bernoulli": _cb_pairs()}


def _softplus_threshold_case(q: float, p: float) -> bool:
    """Bernoulli pairs where ``F.softplus``'s threshold would bite in float64: the closed
    form is used (|p - q| > 2) on the reflected pair (q <= 0) and the reflected p lies in
    (20, 37), where ``softplus(p) = p`` drops ``log1p(e^-p) > 1e-16 p``."""
    p_reflected = -p if q > 0 else p
    return abs(p - q) > 2.0 and 20.0 < p_reflected < 37.0


@functools.cache
def _table(family: str, dtype: torch.dtype):
    """(pairs cast to dtype, exact KL, exact dKL/dq, exact dKL/dp), all as float64."""
    pairs = PAIRS[family]
    q = cast([a for a, _ in pairs], dtype)
    p = cast([b for _, b in pairs], dtype)
    cast_pairs = list(zip(q, p, strict=True))
    kl = np.array([ref.to_float64(ORACLE[family](a, b)) for a, b in cast_pairs])
    grads = [GRAD_ORACLE[family](a, b) for a, b in cast_pairs]
    dq = np.array([ref.to_float64(g[0]) for g in grads])
    dp = np.array([ref.to_float64(g[1]) for g in grads])
    return cast_pairs, kl, dq, dp


def _tensors(pairs, dtype, requires_grad=False):
    q = torch.tensor([a for a, _ in pairs], dtype=torch.float64).to(dtype)
    p = torch.tensor([b for _, b in pairs], dtype=torch.float64).to(dtype)
    return q.requires_grad_(requires_grad), p.requires_grad_(requires_grad)


# ======================================================================================
# Accuracy against mpmath
# ======================================================================================


_QUADRATURE_NODES = {torch.float32: 8, torch.float64: 16}


@functools.cache
def _closed_form_terms(family: str, q: float, p: float) -> tuple[float, float]:
    """``(|f(p)| + |f(q)| + |f'(q)(p - q)| (1 + |log f'(q)|), 0)`` after the reflection to
    ``q <= 0`` (mpmath, 50 digits), the magnitudes the closed form adds up."""
    if q > 0:
        q, p = -q, -p
    with mp.workdps(50):
        qm, pm = mp.mpf(q), mp.mpf(p)
        if family == "bernoulli":
            f_p, f_q = mp.log1p(mp.exp(pm)), mp.log1p(mp.exp(qm))
            slope = 1 / (1 + mp.exp(-qm))
        else:
            f_p = ref.log_partition(p)
            f_q = ref.log_partition(q)
            slope = ref.mean(q)
        step = abs(slope * (pm - qm))
        amplification = 1 + abs(mp.log(slope)) if slope else 1
        return float(abs(f_p) + abs(f_q) + step * amplification), 0.0


def _kl_value_bound(family: str, pairs, expected: np.ndarray, dtype: torch.dtype):
    """Per-pair bound from the form the implementation uses (see the module docstring)."""
    eps = torch.finfo(dtype).eps
    n = _QUADRATURE_NODES[dtype]
    bounds = []
    for (q, p), e in zip(pairs, expected, strict=True):
        width = 2.0 if family == "bernoulli" else max(4.0, abs(q) / 2)
        if abs(p - q) <= width:
            bound = (13 + n) * eps * abs(e)
        else:
            bound = 12 * eps * _closed_form_terms(family, q, p)[0]
        bounds.append(max(bound, torch.finfo(dtype).tiny))
    return np.array(bounds)


@functools.cache
def _slope_and_curvature(family: str, q: float) -> tuple[float, float]:
    """``(f1(q), f2(q))``, the first two derivatives of the log-partition, by mpmath (50
    digits; the continuous-Bernoulli ones from ``cb_reference``)."""
    if family == "bernoulli":
        with mp.workdps(50):
            s = 1 / (1 + mp.exp(-mp.mpf(q)))
            return float(s), float(s * (1 - s))
    return float(ref.mean(q)), float(ref.variance(q))


def _kl_gradient_bounds(family: str, pairs, kl: np.ndarray, dtype: torch.dtype):
    """Per-pair bounds for ``(dKL/dq, dKL/dp)`` from the form used (module docstring)."""
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    n = _QUADRATURE_NODES[dtype]
    bq, bp = [], []
    for (q, p), k in zip(pairs, kl, strict=True):
        delta = abs(p - q)
        width = 2.0 if family == "bernoulli" else max(4.0, abs(q) / 2)
        if delta <= width:
            # derivative of the rule: sum k_i (2 |Delta| f2 + Delta^2 |f3|) at the nodes, and
            # |f3| <= f2 (third central moment, |X - mean| <= 1 on [0, 1]): <= KL (1 + 2/|Delta|)
            magnitude = k * (1.0 + 2.0 / delta) if delta else 0.0
            b_q = b_p = (14 + n) * eps * magnitude
        else:
            rq, rp = (-q, -p) if q > 0 else (q, p)
            slope_q, curv_q = _slope_and_curvature(family, rq)
            slope_p, _ = _slope_and_curvature(family, rp)
            amplification = 1.0 + abs(math.log(slope_q)) if slope_q > 0 else 1.0
            b_p = 10 * eps * (abs(slope_p) + abs(slope_q) * amplification)
            step = curv_q * abs(rp - rq) if curv_q else 0.0  # 0 * inf where p - q overflows
            b_q = 10 * eps * (2 * abs(slope_q) + step * amplification)
        bq.append(max(b_q, tiny))
        bp.append(max(b_p, tiny))
    return np.array(bq), np.array(bp)


def _assert_kl_matches(family: str, pairs, dtype: torch.dtype, out, grad_q=None, grad_p=None):
    """Value (and gradients, if given) against mpmath with the per-pair bounds; half inputs
    are computed in float32 (its bounds) and their gradients rounded once to the input
    dtype (plus ``eps/2`` relative, within ``tiny`` of the dtype)."""
    half = dtype in HALF_DTYPES
    compute = torch.float32 if half else dtype
    kl = np.array([ref.to_float64(ORACLE[family](a, b)) for a, b in pairs])
    bound = _kl_value_bound(family, pairs, kl, compute)
    assert_within(out.detach().double().numpy(), kl, bound, pairs, f"{family} KL {dtype}")
    if grad_q is None:
        return
    grads = [GRAD_ORACLE[family](a, b) for a, b in pairs]
    bounds = _kl_gradient_bounds(family, pairs, kl, compute)
    for k, (name, got, bound) in enumerate(
        zip(("dq", "dp"), (grad_q, grad_p), bounds, strict=True)
    ):
        e = np.array([ref.to_float64(g[k]) for g in grads])
        if half:
            bound = bound + torch.finfo(dtype).eps / 2 * np.abs(e) + torch.finfo(dtype).tiny
        got = got.double().numpy()
        assert_within(got, e, bound, pairs, f"{family} {name} {dtype}")


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
@pytest.mark.parametrize("family", list(KL))
def test_kl_matches_mpmath(family, dtype):
    """Value against the mpmath closed form (per-pair bounds in the module docstring)."""
    pairs, expected, _, _ = _table(family, dtype)
    q, p = _tensors(pairs, dtype)
    got = KL[family](q, p)
    assert got.dtype == dtype and got.shape == q.shape
    bound = _kl_value_bound(family, pairs, expected, dtype)
    assert_within(got.numpy(), expected, bound, pairs, f"{family} KL {dtype}")


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
@pytest.mark.parametrize("family", list(KL))
def test_kl_gradients_match_mpmath(family, dtype):
    """Both partial derivatives against mpmath, finite everywhere on the grid (incl. the
    saturated-sigmoid pairs 30 vs 0 and 100 vs -100, and 1e4 vs -1e4)."""
    pairs, kl, exp_dq, exp_dp = _table(family, dtype)
    q, p = _tensors(pairs, dtype, requires_grad=True)
    KL[family](q, p).sum().backward()  # elementwise: grad = partial derivative
    bound_q, bound_p = _kl_gradient_bounds(family, pairs, kl, dtype)
    for name, got, expected, bound in (
        ("dKL/dq", q.grad, exp_dq, bound_q),
        ("dKL/dp", p.grad, exp_dp, bound_p),
    ):
        assert torch.isfinite(got).all(), name
        assert_within(got.numpy(), expected, bound, pairs, f"{family} {name} {dtype}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("family", list(KL))
def test_kl_nonnegative_and_zero_on_diagonal_on_grid(family, dtype):
    """KL >= 0 at every grid pair and exactly 0 for equal arguments, in every dtype."""
    pairs = PAIRS[family]
    q, p = _tensors(pairs, dtype)
    got = KL[family](q, p)
    assert (got >= 0).all()
    equal = q == p
    assert equal.any()
    assert (got[equal] == 0).all()


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("family", list(KL))
def test_kl_half_inputs_return_float32(family, dtype):
    """Half-precision logits are computed and returned in float32 (dtype policy): the result
    equals the float32 computation on the exactly upcast inputs, and gradients come back
    in the input dtype, finite."""
    q, p = _tensors(PAIRS[family], dtype, requires_grad=True)
    got = KL[family](q, p)
    assert got.dtype == torch.float32
    expected = KL[family](q.detach().float(), p.detach().float())
    torch.testing.assert_close(got.detach(), expected, rtol=0.0, atol=0.0)
    got.sum().backward()
    assert q.grad.dtype == dtype and p.grad.dtype == dtype
    assert torch.isfinite(q.grad).all() and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("family", list(KL))
def test_kl_broadcasts_and_checks_shapes(family):
    q = torch.linspace(-3.0, 3.0, 4, dtype=torch.float64).reshape(4, 1)
    p = torch.linspace(-2.0, 2.0, 3, dtype=torch.float64)
    got = KL[family](q, p)
    assert got.shape == (4, 3)
    eps = torch.finfo(torch.float64).eps
    for i, j in itertools.product(range(4), range(3)):
        single = KL[family](q[i, 0], p[j])  # scalar vs vectorised kernels: a few ulp apart
        torch.testing.assert_close(got[i, j], single, rtol=8 * eps, atol=0.0)
    with pytest.raises(ValueError) as info:
        KL[family](torch.zeros(3), torch.zeros(2))
    assert "(3,)" in str(info.value) and "(2,)" in str(info.value)


@pytest.mark.parametrize("family", list(KL))
def test_kl_gradcheck(family):
    """float64 gradcheck at pairs in the quadrature and the closed-form regions, away from
    the switch |p - q| = width (the two forms agree to rounding, not to all digits)."""
    q = torch.tensor([0.0, 0.5, -3.0, 8.0, 30.0, -2.0, 1.0, 15.0, 0.0], dtype=torch.float64)
    p = torch.tensor([0.3, 0.7, -2.5, 9.0, 29.0, 6.0, -5.0, -15.0, 40.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(KL[family], (q.requires_grad_(), p.requires_grad_()))


# ======================================================================================
# Properties
# ======================================================================================

# The whole range where p - q cannot overflow.
_WIDE = {dtype: torch.finfo(dtype).max / 4 for dtype in (torch.float32, torch.float64)}


def _logits(dtype: torch.dtype, bound: float):
    width = 32 if dtype == torch.float32 else 64
    return st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=width)


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
@pytest.mark.parametrize("family", list(KL))
def test_kl_nonnegative_property(family, dtype):
    """KL(q || p) >= 0 (and finite) for any logits in +-finfo.max / 4,
    including near-equal pairs (p drawn as q times 1 + a tiny relative offset half the time)."""

    @settings(max_examples=300, deadline=None)
    @given(
        _logits(dtype, _WIDE[dtype]),
        _logits(dtype, _WIDE[dtype]),
        st.booleans(),
        st.floats(-1e-3, 1e-3),
    )
    def check(q, p, near, rel):
        if near:
            p = q * (1.0 + rel)
        qt = torch.tensor(q, dtype=dtype)
        pt = torch.tensor(p, dtype=dtype)
        kl = KL[family](qt, pt)
        assert torch.isfinite(kl) and kl >= 0, (q, p, kl)
        assert KL[family](qt, qt) == 0

    check()


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
@pytest.mark.parametrize("family", list(KL))
def test_kl_zero_iff_equal_property(family, dtype):
    """KL = 0 exactly at q == p, and > 0 for q != p wherever the exact value is far above
    underflow (|q| <= 20, 1e-3 <= |p - q| <= 40: KL >= ~1e-16)."""

    @settings(max_examples=200, deadline=None)
    @given(st.floats(-20.0, 20.0), st.floats(1e-3, 40.0), st.booleans())
    def check(q, d, negative):
        qt = torch.tensor(q, dtype=dtype)
        pt = qt + (-d if negative else d)
        assert KL[family](qt, qt) == 0
        assert KL[family](qt, pt) > 0, (q, pt.item())

    check()


# ======================================================================================
# Comparisons with torch.distributions
# ======================================================================================


def test_bernoulli_kl_agrees_with_torch_float64():
    """``kl_divergence(Bernoulli(logits=lq), Bernoulli(logits=lp))`` is KL(q || p) and is
    accurate in float64 at moderate logits (measured 3.5e-14 against mpmath): agree to 1e-12."""
    logits = [-5.0, -3.7, -2.5, -1.0, -0.5, 0.3, 0.5, 1.0, 2.5, 4.2, 5.0]
    pairs = [(a, b) for a, b in itertools.product(logits, logits) if a != b]
    q, p = _tensors(pairs, torch.float64)
    theirs = kl_divergence(Bernoulli(logits=q), Bernoulli(logits=p))
    ours = bernoulli_kl(q, p)
    assert_within(ours.numpy(), theirs.numpy(), 1e-12 * theirs.abs().numpy(), pairs, "vs torch")


def test_torch_continuous_bernoulli_kl_is_wrong_in_float32_and_ours_is_not():
    """User story: torch's ContinuousBernoulli KL (built from clamped probabilities) is
    wrong beyond |logits| ~ 17 in float32, even negative. Search a grid, require that torch
    fails there (documents the failure; measured e.g. q=17, p=50: torch -30.9, exact 0.862;
    q=50, p=40: torch 9.37, exact 0.0231) and that ours meets the float32 bound at every
    point of the grid, in particular where torch fails."""
    logits = [-100.0, -50.0, -30.0, -25.0, -20.0, -17.0, 17.0, 20.0, 25.0, 30.0, 40.0, 50.0]
    pairs = [(a, b) for a, b in itertools.product(logits, logits) if a != b]
    pairs += [(50.0, 50.001), (20.0, 20.5), (30.0, 30.01)]  # near-equal large logits
    q, p = _tensors(pairs, torch.float32)
    pairs = list(zip(q.tolist(), p.tolist(), strict=True))
    exact = np.array([ref.to_float64(ref.cb_kl(a, b)) for a, b in pairs])
    theirs = kl_divergence(TorchCB(logits=q), TorchCB(logits=p)).double().numpy()
    negative = theirs < 0
    off = np.abs(theirs - exact) > 0.1 * exact
    assert negative.sum() >= 1, "torch's float32 KL was expected to go negative somewhere"
    assert off.sum() >= len(pairs) // 2, "torch was expected to be >10% off on most pairs"
    ours = continuous_bernoulli_kl(q, p).double().numpy()
    assert (ours >= 0).all()
    bound = _kl_value_bound("continuous_bernoulli", pairs, exact, torch.float32)
    assert_within(ours, exact, bound, pairs, "ours where torch fails")


# ======================================================================================
# Regressions: failure modes found and fixed during development
# ======================================================================================


def test_bernoulli_kl_saturated_sigmoid_times_a_huge_step_float32():
    """(88.72, 1e36) in float32 (found by ``probloss audit``): KL = sigmoid(-88.72) (1e36 -
    88.72) = 0.00294, where sigmoid(-88.72) = 3e-39 is subnormal; formed as the product
    ``delta e^{-softplus(-x)}`` it keeps its accuracy (it was 0, in value and gradient)."""
    raw = [(88.72, 1e36), (-88.72, -1e36), (95.0, 1e38)]
    pairs = [tuple(float(np.float32(v)) for v in pq) for pq in raw]  # the float32 inputs
    q, p = _tensors(pairs, torch.float32, requires_grad=True)
    got = bernoulli_kl(q, p)
    got.sum().backward()
    exact = np.array([ref.to_float64(ref.bernoulli_kl(a, b)) for a, b in pairs])
    grads = [ref.bernoulli_kl_grad(a, b) for a, b in pairs]
    exact_dq = np.array([ref.to_float64(g[0]) for g in grads])
    assert_within(got.detach().double().numpy(), exact, 1e-6 * exact, pairs, "value")
    assert_within(q.grad.double().numpy(), exact_dq, 1e-6 * np.abs(exact_dq), pairs, "dKL/dlq")


def test_bernoulli_kl_softplus_threshold_float64():
    """float64 pairs in the closed-form region with a (reflected) logit in (20, 37), and
    gradcheck across the threshold."""
    pairs = [(0.0, 20.01), (0.0, 20.5), (0.0, 25.0), (0.0, 30.0), (-5.0, 20.01), (-25.0, 21.0)]
    pairs += [(-a, -b) for a, b in pairs if a != 0.0]  # reflection: q > 0 maps onto these
    assert all(_softplus_threshold_case(*pq) for pq in pairs)
    q, p = _tensors(pairs, torch.float64, requires_grad=True)
    got = bernoulli_kl(q, p)
    got.sum().backward()
    exact = np.array([ref.to_float64(ref.bernoulli_kl(a, b)) for a, b in pairs])
    exact_dp = np.array([ref.to_float64(ref.bernoulli_kl_grad(a, b)[1]) for a, b in pairs])
    assert_within(got.detach().numpy(), exact, 1e-13 * exact, pairs, "value")
    assert_within(p.grad.numpy(), exact_dp, 1e-13 * np.abs(exact_dp), pairs, "dKL/dlp")
    q, p = _tensors([(20.0, -20.0), (-20.0, 20.0)], torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bernoulli_kl, (q, p))


_HUGE_SAME_SIGN = {
    torch.float32: [(1e20, 1.2e20), (1e25, 1.2e25), (-1e25, -1.2e25), (1e30, 1.3e30)],
    torch.float64: [(1e160, 1.2e160), (-1e200, -1.1e200), (1e300, 1.2e300)],
}


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_cb_kl_huge_same_sign_logits_value(dtype):
    pairs = [tuple(cast(pq, dtype)) for pq in _HUGE_SAME_SIGN[dtype]]
    q, p = _tensors(pairs, dtype)
    _assert_kl_matches("continuous_bernoulli", pairs, dtype, continuous_bernoulli_kl(q, p))


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
@pytest.mark.parametrize("family", list(KL))
def test_kl_gradient_when_delta_squared_overflows(family, dtype):
    big = 1e20 if dtype == torch.float32 else 1e155
    pairs = [(0.0, big), (0.0, -big), (big, -big), (1.0, big)]
    pairs = [tuple(cast(pq, dtype)) for pq in pairs]
    q, p = _tensors(pairs, dtype, requires_grad=True)
    out = KL[family](q, p)
    out.sum().backward()
    _assert_kl_matches(family, pairs, dtype, out, q.grad, p.grad)


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_cb_kl_gradient_huge_logits(dtype):
    scale = 1e17 if dtype == torch.float32 else 1e110
    pairs = [(scale, 1.2 * scale), (scale, 0.7 * scale), (-scale, -1.001 * scale)]
    pairs = [tuple(cast(pq, dtype)) for pq in pairs]
    q, p = _tensors(pairs, dtype, requires_grad=True)
    out = continuous_bernoulli_kl(q, p)
    out.sum().backward()
    _assert_kl_matches("continuous_bernoulli", pairs, dtype, out, q.grad, p.grad)


def test_documented_torch_failure_point():
    """The concrete point quoted in the brief and the docstring: q=50, p=40 in float32."""
    q = torch.tensor(50.0)
    p = torch.tensor(40.0)
    exact = ref.to_float64(ref.cb_kl(50.0, 40.0))
    theirs = kl_divergence(TorchCB(logits=q), TorchCB(logits=p)).item()
    assert abs(theirs - exact) > 10 * exact  # measured: torch 9.3727, exact 0.0231436
    ours = continuous_bernoulli_kl(q.reshape(1), p.reshape(1))
    _assert_kl_matches("continuous_bernoulli", [(50.0, 40.0)], torch.float32, ours)


def _overflowing_step_pairs(dtype: torch.dtype) -> list[tuple[float, float]]:
    """(q, p) with p - q beyond finfo.max (the KL itself is below it)."""
    top = torch.finfo(dtype).max
    mid = 1e33 if dtype == torch.float32 else 1e300
    pairs = [(-top, mid), (mid, -top), (-top, top), (top, -top), (-0.9 * top, 0.5 * top)]
    pairs += [(0.6 * top, -0.6 * top), (-top, 1.0)]
    return [tuple(cast(pq, dtype)) for pq in pairs]


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
@pytest.mark.parametrize("family", list(KL))
def test_kl_step_overflows(family, dtype):
    """Regression (issue 10): ``p - q`` overflowing to inf made the closed form
    ``f(p) - f(q) - f'(q)(p - q)`` NaN or 0 (bernoulli_kl(-3.4e38, 1e33) was 0, exact 1e33),
    and its gradient NaN (an underflowed ``f''(q) = 0`` times the infinite step). Value and
    both partials against mpmath with the module's bounds (relative; within ``tiny`` where
    the exact value is below it)."""
    pairs = _overflowing_step_pairs(dtype)
    q, p = _tensors(pairs, dtype, requires_grad=True)
    assert torch.isinf(p.detach() - q.detach()).sum() >= 5  # the case under test
    out = KL[family](q, p)
    out.sum().backward()
    _assert_kl_matches(family, pairs, dtype, out, q.grad, p.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, *F32_F64], ids=dtype_id)
def test_cb_kl_gradient_at_huge_logits_in_the_quadrature(dtype):
    """Regression (issue 10: the continuous-Bernoulli KL gradient at logits near 3e34 was
    NaN): on the quadrature branch (|p - q| <= |q| / 2) with ``(p - q)^2`` beyond
    ``finfo.max``, the unselected small-|eta| branch squared the step (inf times a zero
    upstream gradient) and ``eta^2 / expm1(|eta|)`` met ``inf * 0`` in the backward. Value
    and gradients against mpmath; bfloat16 inputs are computed in float32 (float32 bound,
    the gradients rounded once to bfloat16: its eps); float16 holds no such logits."""
    if dtype == torch.float64:
        raw = [(1e300, 1.2e300), (-1e300, -1.3e300), (1e200, 1.4e200)]
    else:
        raw = [(3e34, 3.1e34), (-3e34, -3.6e34), (1e38, 1.4e38), (-3e38, -2e38), (2e25, 2.5e25)]
    pairs = [tuple(cast(pq, dtype)) for pq in raw]
    q, p = _tensors(pairs, dtype, requires_grad=True)
    out = continuous_bernoulli_kl(q, p)
    out.sum().backward()
    _assert_kl_matches("continuous_bernoulli", pairs, dtype, out, q.grad, p.grad)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("family", list(KL))
def test_empty_inputs(family, dtype):
    """Empty in, empty out (issue 10): shape ``(0, 3)``, float32 for half inputs, backward
    gives empty gradients."""
    q = torch.zeros(0, 3, dtype=dtype, requires_grad=True)
    p = torch.zeros(3, dtype=dtype, requires_grad=True)
    out = KL[family](q, p)
    assert out.shape == (0, 3)
    assert out.dtype == (torch.float32 if dtype in HALF_DTYPES else dtype)
    gq, gp = torch.autograd.grad(out.sum(), (q, p))
    assert gq.shape == (0, 3) and torch.equal(gp, torch.zeros_like(p))
