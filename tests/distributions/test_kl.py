"""Tests of ``probloss.distributions.kl``: the one registry of closed-form KL divergences.

Where the numbers come from
---------------------------
* Dispatch: ``kl_divergence(q, p)`` for every registered pair is ``torch.equal`` to the
  functional core at the stored probloss parameters or the converted torch ones (``scale``
  through ``log``, ``logits`` as stored, ``scale_tril`` as in the module), the core being
  tested against mpmath in ``tests/functional``.
* Normal at the extremes: the mpmath oracle of ``tests/functional/test_normal_kl.py``
  (``kl_ref``, the closed form converged to 25 digits) with that file's bound, 10 eps
  relative in float32, 1e-13 in float64.
* Continuous Bernoulli at the extremes: ``tests/functional/cb_reference.cb_kl`` (mpmath,
  25 digits); the pairs lie in the quadrature region ``|p - q| <= max(4, |q|/2)``, whose
  bound is ``(13 + n) eps`` relative, ``n`` = 8 nodes in float32, 16 in float64
  (``tests/functional/test_divergence.py``).
* BivariateNormal at the extremes: the mpmath textbook form and the bound
  ``32 (1 + E) eps`` relative of ``tests/functional/test_bivariate_kl.py`` (``kl_ref``,
  ``kl_bound``); against a torch ``MultivariateNormal``, torch's own KL in float64 at
  moderate parameters (Cholesky of a well conditioned 2 x 2, accurate to a few ulp:
  relative 1e-12).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.distributions import ContinuousBernoulli as TorchCB
from torch.distributions import MultivariateNormal, kl_divergence
from torch.distributions import Normal as TorchNormal

import probloss.distributions as D
from probloss.distributions import BivariateNormal, ContinuousBernoulli, Normal
from probloss.functional import bivariate_normal_kl, continuous_bernoulli_kl, normal_kl
from tests.functional import cb_reference as cb_ref
from tests.functional._checks import F32_F64, assert_within, cast, dtype_id
from tests.functional.test_bivariate_kl import QP as BIVARIATE_QP
from tests.functional.test_bivariate_kl import kl_bound as bivariate_bound
from tests.functional.test_bivariate_kl import kl_ref as bivariate_ref
from tests.functional.test_normal_kl import RTOL as NORMAL_KL_RTOL
from tests.functional.test_normal_kl import kl_ref as normal_kl_ref

_CB_NODES = {torch.float32: 8, torch.float64: 16}


def _t(values, dtype, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def _no_warning_kl(q, p):
    """``kl_divergence`` with warnings as errors: torch warns when two registered pairs
    match equally well (an ambiguous dispatch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return kl_divergence(q, p)


def _assert_finite_gradients(out, params):
    grads = torch.autograd.grad(out.sum(), params)
    for g in grads:
        assert torch.isfinite(g).all(), g


# ======================================================================================
# The registry
# ======================================================================================


def test_every_probloss_pair_is_registered_in_the_one_module():
    """The nine pairs (both orders against torch's classes), and nothing registered for a
    probloss class outside ``probloss.distributions.kl``."""
    registry = torch.distributions.kl._KL_REGISTRY
    ours = {
        pair: fn
        for pair, fn in registry.items()
        if any(cls.__module__.startswith("probloss.") for cls in pair)
    }
    expected = {
        (Normal, Normal),
        (Normal, TorchNormal),
        (TorchNormal, Normal),
        (ContinuousBernoulli, ContinuousBernoulli),
        (ContinuousBernoulli, TorchCB),
        (TorchCB, ContinuousBernoulli),
        (BivariateNormal, BivariateNormal),
        (BivariateNormal, MultivariateNormal),
        (MultivariateNormal, BivariateNormal),
    }
    assert set(ours) == expected
    assert {fn.__module__ for fn in ours.values()} == {"probloss.distributions.kl"}
    assert D.kl.__name__ == "probloss.distributions.kl"  # imported by the package


def test_torch_formula_is_nan_where_the_registered_one_is_not():
    """Issue 11: probloss's Normal subclasses torch's, so without the registry torch's
    ``_kl_normal_normal`` (``(scale_p / scale_q)^2`` of two underflowed scales, 0/0) was
    used: NaN at ``log_scale = -120`` against ``-119`` in float32; the core gives
    ``(e^-2 - 1 + 2) / 2 = 0.5677`` (mpmath)."""
    q = Normal(torch.tensor(0.0), log_scale=torch.tensor(-120.0))
    p = Normal(torch.tensor(0.0), log_scale=torch.tensor(-119.0))
    assert torch.isnan(torch.distributions.kl._kl_normal_normal(q, p))
    assert _no_warning_kl(q, p).item() == pytest.approx(normal_kl_ref(0.0, -240.0, 0.0, -238.0)[0])


# ======================================================================================
# Normal
# ======================================================================================


def _normal_pairs(dtype):
    """``(q, p, core value, leaf parameters)`` for the three registered pairs; a torch
    scale of 1e-30 (``log`` -69.1) against ``log_scale = -70``."""
    loc_q, ls_q = _t([0.0, 1.0, -3.0, 1e4], dtype, True), _t([-120.0, 0.5, 2.0, 30.0], dtype, True)
    loc_p, ls_p = (
        _t([0.0, -2.0, -3.0, 0.0], dtype, True),
        _t([-119.0, 0.0, -5.0, 31.0], dtype, True),
    )
    ls_r = _t([-70.0, 0.0, -1.0, 5.0], dtype, True)
    scale = _t([1e-30, 0.5, 3.0, 1e3], dtype, True)
    ours_q, ours_p, ours_r = (
        Normal(loc_q, log_scale=ls_q),
        Normal(loc_p, log_scale=ls_p),
        Normal(loc_p, log_scale=ls_r),
    )
    theirs = TorchNormal(loc_p, scale)
    ls_t = torch.log(scale)
    return [
        (ours_q, ours_p, normal_kl(loc_q, 2 * ls_q, loc_p, 2 * ls_p), (loc_q, ls_q, loc_p, ls_p)),
        (ours_q, theirs, normal_kl(loc_q, 2 * ls_q, loc_p, 2 * ls_t), (ls_q, scale)),
        (theirs, ours_r, normal_kl(loc_p, 2 * ls_t, loc_p, 2 * ls_r), (ls_r, scale)),
    ]


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_normal_pairs_are_the_core_exactly_with_finite_gradients(dtype):
    """Every pair, including ``log_scale = -120`` (scale 0 in float32) and a torch Normal
    against it; the probloss-probloss pair against mpmath (module docstring bound)."""
    for q, p, core, params in _normal_pairs(dtype):
        got = _no_warning_kl(q, p)
        assert torch.equal(got, core)
        assert torch.isfinite(got).all()
        _assert_finite_gradients(got, params)
    q, p = _normal_pairs(dtype)[0][:2]
    args = [
        (m, 2 * lq, mp_, 2 * lp)
        for m, lq, mp_, lp in zip(
            q.loc.tolist(), q.log_scale.tolist(), p.loc.tolist(), p.log_scale.tolist(), strict=True
        )
    ]
    exact = [normal_kl_ref(*a)[0] for a in args]
    got = _no_warning_kl(q, p).detach().double().numpy()
    bound = [NORMAL_KL_RTOL[dtype] * e for e in exact]
    assert_within(got, exact, bound, args, f"Normal KL {dtype}")


def test_normal_pair_from_scale_and_log_scale_agree():
    """A Normal built from ``scale`` enters the KL as ``log(scale)``, like a torch one."""
    scale = torch.tensor([0.5, 2.0], dtype=torch.float64)
    ours = Normal(torch.zeros(2, dtype=torch.float64), scale)
    theirs = TorchNormal(torch.zeros(2, dtype=torch.float64), scale)
    p = Normal(torch.ones(2, dtype=torch.float64), log_scale=torch.zeros(2, dtype=torch.float64))
    assert torch.equal(_no_warning_kl(ours, p), _no_warning_kl(theirs, p))
    torch.testing.assert_close(
        _no_warning_kl(ours, p), kl_divergence(theirs, TorchNormal(1.0, 1.0)), rtol=1e-14, atol=0
    )


# ======================================================================================
# Continuous Bernoulli
# ======================================================================================

CB_PAIRS = [(50.0, 40.0), (1e4, 9e3), (-1e4, -6e3), (1.0, 1.0), (1e-6, 0.0), (-30.0, -25.0)]


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_continuous_bernoulli_pairs_are_the_core_exactly(dtype):
    """Every pair at logits up to 1e4 (torch's own formula saturates beyond |logits| ~ 17
    in float32); values against mpmath (quadrature bound, module docstring), gradients
    finite; torch's class enters by its stored ``logits``."""
    # the last two pairs, of opposite signs, are outside the quadrature region: equality
    # with the core and finiteness only (their bounds: tests/functional/test_divergence.py)
    lq = _t([q for q, _ in CB_PAIRS] + [1e4, -3e4], dtype, True)
    lp = _t([p for _, p in CB_PAIRS] + [-1e4, 2.0], dtype, True)
    ours_q, ours_p = ContinuousBernoulli(logits=lq), ContinuousBernoulli(logits=lp)
    theirs_q, theirs_p = TorchCB(logits=lq), TorchCB(logits=lp)
    core = continuous_bernoulli_kl(lq, lp)
    for q, p in ((ours_q, ours_p), (ours_q, theirs_p), (theirs_q, ours_p)):
        got = _no_warning_kl(q, p)
        assert torch.equal(got, core)
        assert torch.isfinite(got).all()
        _assert_finite_gradients(got, (lq, lp))
    core = core[: len(CB_PAIRS)]
    pairs = list(zip(cast(lq.tolist(), dtype), cast(lp.tolist(), dtype), strict=True))
    pairs = pairs[: len(CB_PAIRS)]
    exact = [cb_ref.to_float64(cb_ref.cb_kl(q, p)) for q, p in pairs]
    rtol = (13 + _CB_NODES[dtype]) * torch.finfo(dtype).eps
    bound = [max(rtol * e, torch.finfo(dtype).tiny) for e in exact]
    assert_within(core.detach().double().numpy(), exact, bound, pairs, f"CB KL {dtype}")


# ======================================================================================
# Bivariate normal
# ======================================================================================


def _bivariate(rows, dtype):
    rows = torch.tensor(rows, dtype=torch.float64).to(dtype)
    loc, ls, a = rows[:, :2], rows[:, 2:4], rows[:, 4]
    return [t.clone().requires_grad_() for t in (loc, ls, a)]


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_bivariate_pair_is_the_core_exactly_with_finite_gradients(dtype):
    """The registered pair is :func:`~probloss.functional.bivariate_normal_kl` of the stored
    parameters (tested against mpmath in ``tests/functional/test_bivariate_kl.py``), with
    finite gradients at ``log_scale = -120`` and ``atanh_rho = 20``."""
    q_params = _bivariate([q for q, _ in BIVARIATE_QP], dtype)
    p_params = _bivariate([p for _, p in BIVARIATE_QP], dtype)
    got = _no_warning_kl(BivariateNormal(*q_params), BivariateNormal(*p_params))
    assert torch.equal(got, bivariate_normal_kl(*q_params, *p_params))
    _assert_finite_gradients(got, (*q_params, *p_params))


def _random_bivariate(generator, n):
    loc = torch.randn(n, 2, dtype=torch.float64, generator=generator)
    ls = 0.5 * torch.randn(n, 2, dtype=torch.float64, generator=generator)
    a = torch.randn(n, dtype=torch.float64, generator=generator)
    return loc, ls, a


def test_bivariate_pairs_with_torch_multivariate_normal_agree_with_torch():
    """Moderate float64 parameters: ``BivariateNormal`` against a torch
    ``MultivariateNormal`` of the same covariance, both orders, equals torch's MVN-MVN KL
    to 1e-12 relative (values and gradients in ``loc``, ``scale_tril``); the conversion
    from ``scale_tril`` is the module's (``log L11``, ``log hypot(L21, L22)``,
    ``asinh(L21 / L22)``), so the pair is the core at those parameters exactly."""
    g = torch.Generator().manual_seed(0)
    q_params, p_params = _random_bivariate(g, 16), _random_bivariate(g, 16)
    bq, bp = BivariateNormal(*q_params), BivariateNormal(*p_params)
    tril_q = bq.scale_tril.detach().requires_grad_()
    tril_p = bp.scale_tril.detach().requires_grad_()
    mq, mp_ = (
        MultivariateNormal(bq.loc, scale_tril=tril_q),
        MultivariateNormal(bp.loc, scale_tril=tril_p),
    )
    reference = kl_divergence(mq, mp_)
    for q, p, tril in ((bq, mp_, tril_p), (mq, bp, tril_q)):
        got = _no_warning_kl(q, p)
        torch.testing.assert_close(got, reference, rtol=1e-12, atol=0)
        (g_ours,) = torch.autograd.grad(got.sum(), tril)
        (g_ref,) = torch.autograd.grad(reference.sum(), tril, retain_graph=True)
        # lower triangles: ours reads only those (torch's trace also differentiates the
        # zeros above the diagonal of q's factor)
        torch.testing.assert_close(g_ours.tril(), g_ref.tril(), rtol=1e-10, atol=1e-12)
    l11, l21, l22 = tril_p[:, 0, 0], tril_p[:, 1, 0], tril_p[:, 1, 1]
    log_scale = torch.log(torch.stack((l11, torch.hypot(l21, l22)), -1))
    core = bivariate_normal_kl(*q_params, bp.loc, log_scale, torch.asinh(l21 / l22))
    assert torch.equal(_no_warning_kl(bq, mp_), core)


def test_bivariate_against_multivariate_normal_of_other_size_is_an_error():
    q = BivariateNormal(torch.zeros(2), torch.zeros(2), torch.tensor(0.0))
    p = MultivariateNormal(torch.zeros(3), scale_tril=torch.eye(3))
    with pytest.raises(ValueError, match=r"event shape \(2,\); got \(3,\)"):
        kl_divergence(q, p)
    with pytest.raises(ValueError, match=r"event shape \(2,\); got \(3,\)"):
        kl_divergence(p, q)


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_bivariate_extremes_against_a_torch_unit_normal(dtype):
    """``log_scale = -120`` (float32 scale 0) and ``atanh_rho = +-1e4`` against a torch
    unit ``MultivariateNormal``: ``KL(q || p)`` finite with finite gradients;
    ``KL(p || q)`` (``~ e^{240} cosh^2 a``) overflows where mpmath says it does, never NaN.
    Both against mpmath with the module's bound (an exact value beyond ``finfo.max`` must
    be inf)."""
    rows = [
        (0.0, 0.0, -120.0, -120.0, 1e4),
        (0.0, 1.0, -120.0, 3.0, -1e4),
        (1.0, 1.0, 40.0, -40.0, 30.0),
        (0.0, 0.0, -120.0, -119.0, 0.0),
    ]
    q_params = _bivariate(rows, dtype)
    n = len(rows)
    p = MultivariateNormal(
        torch.zeros(n, 2, dtype=dtype), scale_tril=torch.eye(2, dtype=dtype).expand(n, 2, 2)
    )
    q = BivariateNormal(*q_params)
    forward, backward = _no_warning_kl(q, p), _no_warning_kl(p, q)
    assert forward.dtype == backward.dtype == dtype
    _assert_finite_gradients(forward, q_params)
    unit = (0.0, 0.0, 0.0, 0.0, 0.0)
    top = torch.finfo(dtype).max
    for got, pairs in ((forward, [(r, unit) for r in rows]), (backward, [(unit, r) for r in rows])):
        pairs = [(tuple(cast(a, dtype)), tuple(cast(b, dtype))) for a, b in pairs]
        exact = [bivariate_ref(a, b) for a, b in pairs]
        exact = [e if e <= top else math.inf for e in exact]
        bound = [bivariate_bound(a, b, e, dtype) for (a, b), e in zip(pairs, exact, strict=True)]
        assert_within(got.detach().double().numpy(), exact, bound, pairs, f"extremes {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_half_precision_kl_is_float32(dtype):
    q = Normal(torch.zeros(2, dtype=dtype), log_scale=torch.tensor([0.0, 30.0], dtype=dtype))
    p = Normal(torch.zeros(2, dtype=dtype), log_scale=torch.zeros(2, dtype=dtype))
    assert _no_warning_kl(q, p).dtype == torch.float32
    b = BivariateNormal(
        torch.zeros(2, dtype=dtype), torch.zeros(2, dtype=dtype), torch.tensor(1.0, dtype=dtype)
    )
    assert _no_warning_kl(b, b).dtype == torch.float32
    c = ContinuousBernoulli(logits=torch.zeros(2, dtype=dtype))
    assert _no_warning_kl(c, c).dtype == torch.float32


def test_kl_is_zero_on_itself_for_every_family():
    """``KL(d || d) = 0`` exactly, also at the extremes (no ``inf - inf`` anywhere)."""
    for d in (
        Normal(torch.tensor([0.0, 5.0]), log_scale=torch.tensor([-120.0, 80.0])),
        ContinuousBernoulli(logits=torch.tensor([-1e4, 0.0, 1e4])),
        BivariateNormal(torch.zeros(2), torch.tensor([-120.0, 80.0]), torch.tensor(1e4)),
    ):
        out = _no_warning_kl(d, d)
        assert torch.equal(out, torch.zeros_like(out))
