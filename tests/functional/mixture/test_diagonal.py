"""Tests of the diagonal normal mixture (``probloss.functional.mixture.diagonal``) against
scipy and mpmath: far targets, components beyond the float range, properties.

Where the numbers come from and the bounds: the module docstring of
``tests/functional/mixture/_density_oracles.py``
(the references, oracles and inputs these files share).
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpmath import mp

from probloss.audit.naive import naive_normal_mixture_nll
from probloss.functional.mixture import (
    bivariate_normal_mixture_log_prob,
    normal_mixture_log_prob,
)
from tests.functional._checks import assert_within, dtype_id
from tests.functional.mixture._density_oracles import (
    BIVARIATE_NAMES,
    FAR,
    INF,
    LOG_2PI,
    NORMAL_NAMES,
    REF_EPS,
    TINY_LOG_SCALE,
    _agree,
    _check,
    _eps,
    _events,
    _flush_eps,
    _log_space_oracle,
    _normal_reference,
    _oracle_arrays,
    _seeded,
    _value_and_grads,
    bivariate_inputs,
    bivariate_oracle,
    normal_inputs,
    normal_oracle,
)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("d", [1, 2, 3, 6])
def test_normal_mixture_matches_scipy(d, fused):
    """float64, moderate inputs (targets within 3 scales, log_scale in [-1, 1]): value and
    every gradient against scipy / Bishop's formulas, ``|err| <= 32 eps S``."""
    inputs = normal_inputs(40, 4, d, torch.float64, seed=10 + d, spread=3.0)
    got = _value_and_grads(normal_mixture_log_prob, inputs, fused=fused)
    flush = _flush_eps(torch.float64)
    expected, scale = _normal_reference(*(t.numpy() for t in inputs), flush=flush)
    _check(got, expected, scale, REF_EPS * _eps(torch.float64), NORMAL_NAMES, f"D={d}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_normal_mixture_far_targets_match_mpmath(dtype, fused):
    """Targets 1e3..1e6 scales from every mean: the tutorial product of pdfs underflows to
    0 (its log -inf, its gradient NaN) in float32 *and* float64; ours is within 32 eps S
    of mpmath's evaluation of that same formula, in value and every gradient."""
    events = []
    for i, spread in enumerate(FAR):
        events.append(normal_inputs(3, 3, 2, dtype, seed=100 + i, spread=spread))
    x, logits, loc, log_scale = (torch.cat(parts) for parts in zip(*events, strict=True))
    got = _value_and_grads(normal_mixture_log_prob, (x, logits, loc, log_scale), fused=fused)
    events = _events(x, logits, loc, log_scale)
    expected, scale = _oracle_arrays(normal_oracle, events, _flush_eps(dtype))
    assert np.isfinite(got[0]).all() and (got[0] < -4e4).all()  # exp(-4e4) == 0 in float64
    _check(got, expected, scale, REF_EPS * _eps(dtype), NORMAL_NAMES, f"far {dtype}")

    # The tutorial form: log(sum(pi * prod(pdf))) underflows; its gradient is NaN.
    leaves = [t.clone().requires_grad_(True) for t in (logits, loc, log_scale)]
    naive = -naive_normal_mixture_nll(x, *leaves)
    assert (naive == -INF).all()
    naive.sum().backward()
    assert torch.isnan(leaves[1].grad).any()


def _flatten(tree) -> list:
    if isinstance(tree, tuple):
        return [v for part in tree for v in _flatten(part)]
    return [tree]


def _unflatten(values, like):
    it = iter(values)

    def build(part):
        return tuple(build(p) for p in part) if isinstance(part, tuple) else next(it)

    return build(like)


def _normal_density(x, logits, loc, log_scale):
    """The tutorial formula ``log(sum_k pi_k prod_d npdf)`` in mpmath (unrounded)."""
    lse = mp.log(mp.fsum(mp.exp(v) for v in logits))
    dens = [
        mp.fprod(mp.npdf(xd, m, mp.exp(lv)) for xd, m, lv in zip(x, mu, ls, strict=True))
        for mu, ls in zip(loc, log_scale, strict=True)
    ]
    return mp.log(mp.fsum(mp.exp(lw - lse) * p for lw, p in zip(logits, dens, strict=True)))


def _bivariate_density(x, logits, loc, log_scale, a):
    """Graves' probability-space mixture ``log(sum_k pi_k N_k)`` in mpmath (unrounded)."""
    lse = mp.log(mp.fsum(mp.exp(v) for v in logits))
    total = mpmath.mpf(0)
    for lw, mu, ls, ak in zip(logits, loc, log_scale, a, strict=True):
        s1, s2, rho = mp.exp(ls[0]), mp.exp(ls[1]), mp.tanh(ak)
        z1, z2 = (x[0] - mu[0]) / s1, (x[1] - mu[1]) / s2
        n = z1 * z1 - 2 * rho * z1 * z2 + z2 * z2
        pdf = mp.exp(-n / (2 * (1 - rho * rho))) / (2 * mp.pi * s1 * s2 * mp.sqrt(1 - rho * rho))
        total += mp.exp(lw - lse) * pdf
    return mp.log(total)


def test_reference_gradients_match_mpmath_diff():
    """The analytic gradients of both oracles (responsibilities times component
    derivatives) against ``mpmath.diff`` of the probability-space mixture, at a moderate
    point with 30 digits: every partial derivative agrees to the float64 rounding of the
    oracle's result (1e-15 relative to max(1, |d|))."""
    x, logits, loc, log_scale, a = bivariate_inputs(1, 2, torch.float64, seed=7, spread=1.5)
    cases = [
        (normal_oracle, _normal_density, _events(x, logits, loc, log_scale)[0]),
        (bivariate_oracle, _bivariate_density, _events(x, logits, loc, log_scale, a)[0]),
    ]
    for oracle, density, event in cases:
        params = _flatten(event)
        analytic = _flatten(oracle(event)[0][1:])  # gradients, in the order of the inputs
        assert len(analytic) == len(params)
        with mp.workdps(30):
            for i, ref in enumerate(analytic):

                def f(t, i=i, params=params, density=density, event=event):
                    values = list(params)
                    values[i] = t
                    return density(*_unflatten(values, event))

                numeric = mp.diff(f, mpmath.mpf(params[i]))
                assert abs(numeric - ref) <= 1e-15 * max(1.0, abs(ref)), (density.__name__, i)


@settings(max_examples=40)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(1, 5),
    d=st.integers(1, 5),
    shift=st.floats(-1e3, 1e3),
    spread=st.sampled_from([0.5, 3.0, 1e2, 1e4]),
)
def test_properties_float64(seed, k, d, shift, spread):
    """Laws, float64: fused == plain (1e-12 S); adding a constant to the logits, or
    permuting the components, changes nothing (1e-12 relative to max(1, |value|)); K = 1 is
    the product of normal densities (scipy, 32 eps S)."""
    inputs = normal_inputs(8, k, d, torch.float64, seed=seed, spread=spread)
    _agree(normal_mixture_log_prob, inputs, NORMAL_NAMES, "hypothesis")
    x, logits, loc, log_scale = inputs
    base = normal_mixture_log_prob(*inputs).numpy()
    perm = torch.randperm(k, generator=_seeded(seed))
    for variant in (
        normal_mixture_log_prob(x, logits + shift, loc, log_scale),
        normal_mixture_log_prob(x, logits[:, perm], loc[:, perm], log_scale[:, perm]),
    ):
        np.testing.assert_allclose(variant.numpy(), base, rtol=1e-12, atol=1e-12)
    single = normal_mixture_log_prob(x, logits[:, :1], loc[:, :1], log_scale[:, :1]).numpy()
    ref = scipy.stats.norm.logpdf(x.numpy(), loc[:, 0].numpy(), log_scale[:, 0].exp().numpy())
    scale = np.abs(ref).sum(-1) + np.abs(log_scale[:, 0].numpy()).sum(-1) + d * LOG_2PI
    assert_within(single, ref.sum(-1), REF_EPS * _eps(torch.float64) * scale, range(8), "K=1")


def _dead_normal_events(dtype):
    """Events whose component 0 is beyond the float range (its term is -inf exactly as
    rounded, its responsibility e^{-1.5e81} or less): the issue's reproduction, the other
    component order, and D = 2 with only one coordinate overflowing."""
    t = TINY_LOG_SCALE[dtype]
    x = torch.tensor([[1e6, 0.0], [1e6, 0.0], [1e6, 1.0]], dtype=dtype)
    logits = torch.tensor([[0.0, 0.0], [1.0, -1.0], [0.0, 0.5]], dtype=dtype)
    loc = torch.zeros(3, 2, 2, dtype=dtype)
    log_scale = torch.tensor(
        [[[t, 0.0], [5.0, 0.0]], [[t, 0.0], [5.0, 0.0]], [[t, t], [5.0, 1.0]]], dtype=dtype
    )
    return x, logits, loc, log_scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_normal_component_beyond_the_float_range(fused, dtype):
    """Issue 10: a residual of 1e6 at log_scale -80 (float32) / -700 (float64) gave the
    fused kernel a NaN gradient (``0 * inf``), inside its exp(log_scale) domain. Value and
    every gradient within 32 eps S of mpmath (the probability-space formula); the dead
    component's gradients exactly 0, its logit's ``r - pi = -pi``."""
    inputs = _dead_normal_events(dtype)
    got = _value_and_grads(normal_mixture_log_prob, inputs, fused=fused)
    expected, scale = _oracle_arrays(normal_oracle, _events(*inputs), _flush_eps(dtype))
    _check(got, expected, scale, REF_EPS * _eps(dtype), NORMAL_NAMES, f"dead {dtype}")
    assert (got[3][:, 0] == 0).all() and (got[4][:, 0] == 0).all()


def test_normal_component_beyond_the_float_range_issue_reproduction():
    """The issue's exact call (float32): d/dloc = [0, 45.4] (the live component's
    ``z / sigma = 1e6 e^{-10}``, closed form, 4 eps relative), not NaN."""
    lc = torch.zeros(2, 1, requires_grad=True)
    sc = torch.tensor([[-80.0], [5.0]], requires_grad=True)
    normal_mixture_log_prob(torch.tensor([1e6]), torch.zeros(2), lc, sc).backward()
    assert lc.grad[0, 0] == 0
    expected = 1e6 * math.exp(-10.0)
    assert abs(lc.grad[1, 0].item() - expected) <= 4 * _eps(torch.float32) * expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_residual_that_overflows_at_a_wide_scale(fused, dtype):
    """Issue 10 (fuzz, fused value -inf where the plain one is -345.9): ``value - loc`` of
    huge numbers of opposite signs overflows (``1.35e36 + 3.4e38`` in float32) while ``z``
    at a wide scale is moderate (``log_scale = 85.8``: ``z = 19``). The fused kernels made
    the component's term ``-inf``; it is recomputed from the halves (as ``split_residual``
    does). Value and gradients against mpmath: the normal mixture in log space (bound
    below), the bivariate one (float32) within 32 eps S."""
    big = torch.finfo(dtype).max
    wide = 85.78 if dtype == torch.float32 else 705.0
    x = torch.tensor(
        [[1.3468900131415708e36 if dtype == torch.float32 else 1e306, 0.0015]], dtype=dtype
    )
    logits = torch.tensor([[0.0, 0.5]], dtype=dtype)
    loc = torch.tensor([[[-100.0, 0.0], [-big, 1e-30]]], dtype=dtype)
    log_scale = torch.tensor([[[-30.0, 0.0], [wide, 0.0]]], dtype=dtype)
    inputs = (x, logits, loc, log_scale)
    got = _value_and_grads(normal_mixture_log_prob, inputs, fused=fused)
    expected = _log_space_oracle(_events(*inputs)[0])
    assert np.isfinite(got[0]).all()
    # the terms (|T| <= 1 + |value| here: component 0 is beyond the float range) carry an
    # absolute rounding error of a few eps |T|; each output is a few rounded factors times
    # responsibilities shifted by that: 32 eps (|e| + 1)(1 + |value|)
    size = 1.0 + abs(float(expected[0]))
    for name, g, e in zip(NORMAL_NAMES, got, expected, strict=True):
        e = np.asarray(e, dtype=np.float64).ravel()
        bound = REF_EPS * _eps(dtype) * (np.abs(e) + 1) * size
        assert_within(g.ravel(), e, bound, range(e.size), f"overflow {dtype} {name}")
    if dtype == torch.float64:  # bivariate_oracle's 40 digits do not reach 1.8e308 e^-705
        return
    a = torch.tensor([[0.0, 0.3]], dtype=dtype)
    inputs = (*inputs, a)
    got = _value_and_grads(bivariate_normal_mixture_log_prob, inputs, fused=fused)
    expected, scale = _oracle_arrays(bivariate_oracle, _events(*inputs), _flush_eps(dtype))
    assert np.isfinite(got[0]).all()
    _check(got, expected, scale, REF_EPS * _eps(dtype), BIVARIATE_NAMES, f"overflow {dtype}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_normal_mixture_ties_of_far_components(fused):
    """The same class through a Gaussian mixture (the plain path is ``mixture_log_prob``):
    two components at +-1 of the mean, the target 1e4 scales away on the axis midway in
    float32, log densities ``-5e7`` each, equal: responsibilities 1/2, logit gradients 0,
    loc gradients ``r z / sigma`` equal (closed form, 4 eps relative)."""
    x = torch.tensor([[0.0, 1e4]])
    logits = torch.zeros(1, 2, requires_grad=True)
    loc = torch.tensor([[[-1.0, 0.0], [1.0, 0.0]]], requires_grad=True)
    log_scale = torch.zeros(1, 2, 2)
    normal_mixture_log_prob(x, logits, loc, log_scale, fused=fused).sum().backward()
    eps = _eps(torch.float32)
    assert logits.grad.abs().max() <= 4 * eps
    expected = torch.tensor([[[0.5, 0.5e4], [-0.5, 0.5e4]]])
    assert ((loc.grad - expected).abs() <= 4 * eps * expected.abs()).all()


@pytest.mark.parametrize(
    ("dtype", "inside", "beyond"),
    [(torch.float32, 14.2, 14.6), (torch.float64, 38.4, 38.8)],
    ids=["f32", "f64"],
)
def test_tutorial_form_underflows_beyond_14_4_and_38_6_scales(dtype, inside, beyond):
    """The module's claim: with D = 1 and unit scales the tutorial ``log(sum pi pdf)`` is
    ``-inf`` (NaN gradient) from 14.4 scales in float32, 38.6 in float64 (``e^{-z^2/2} /
    sqrt(2 pi)`` below the smallest subnormal, by hand: ``e^{-107.5} = 2e-47 < 1.4e-45``,
    ``e^{-753.6} < 4.9e-324``), finite just inside; ours is the closed form
    ``-z^2/2 - log(2 pi)/2`` (one component's term, both components equal) within
    32 eps S at both."""
    for z, naive_finite in ((inside, True), (beyond, False)):
        x = torch.tensor([[z]], dtype=dtype)
        logits = torch.zeros(1, 2, dtype=dtype)
        loc = torch.zeros(1, 2, 1, dtype=dtype, requires_grad=True)
        log_scale = torch.zeros(1, 2, 1, dtype=dtype)
        naive = -naive_normal_mixture_nll(x, logits, loc, log_scale)
        assert bool(torch.isfinite(naive).all()) == naive_finite
        if not naive_finite:
            naive.sum().backward()
            assert torch.isnan(loc.grad).all()
        ours = normal_mixture_log_prob(x, logits, loc.detach(), log_scale).item()
        zf = float(x)
        expected = -0.5 * zf * zf - 0.5 * LOG_2PI
        assert abs(ours - expected) <= REF_EPS * _eps(dtype) * (abs(expected) + LOG_2PI)
