"""Tests of the bivariate normal mixture (``probloss.functional.mixture.bivariate``):
scipy / mpmath references, saturated correlations, the fused kernel against the plain path.

Where the numbers come from and the bounds: the module docstring of
``tests/functional/mixture/_density_oracles.py``
(the references, oracles and inputs these files share).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probloss.audit.naive import naive_bivariate_normal_mixture_nll
from probloss.functional.bivariate import bivariate_normal_log_prob
from probloss.functional.mixture import (
    bivariate_normal_mixture_log_prob,
)
from tests.functional._checks import assert_within, dtype_id
from tests.functional.mixture._density_oracles import (
    BIVARIATE_NAMES,
    FAR,
    INF,
    REF_EPS,
    _agree,
    _bivariate_reference,
    _check,
    _dead_bivariate_events,
    _eps,
    _events,
    _flush_eps,
    _oracle_arrays,
    _seeded,
    _value_and_grads,
    bivariate_inputs,
    bivariate_oracle,
)


def on_the_line(n, k, dtype, a_value, seed):
    """Bivariate events exactly on every component's correlation line (a > 0: z1 == z2) or
    anti-line (a < 0: z1 == -z2): equal log-scales and residuals in both coordinates, so
    ``Q`` stays finite although ``|a| = 50`` (``1 - tanh(a)^2 = 0`` in float32)."""
    g = _seeded(seed)
    sign = 1.0 if a_value > 0 else -1.0
    c = torch.randn(n, k, generator=g, dtype=torch.float64)
    ls = 3 * (2 * torch.rand(n, k, generator=g, dtype=torch.float64) - 1)
    t = torch.randn(n, 1, generator=g, dtype=torch.float64)
    x = torch.cat([t, sign * t], -1)
    loc = torch.stack([c, sign * c], -1)
    log_scale = torch.stack([ls, ls], -1)
    logits = 2 * torch.randn(n, k, generator=g, dtype=torch.float64)
    a = torch.full((n, k), a_value, dtype=torch.float64)
    return tuple(v.to(dtype) for v in (x, logits, loc, log_scale, a))


BIVARIATE_CASES = {
    "random": {"spread": 2.0, "a_range": 3.0},
    "far": {"spread": 1e5, "a_range": 3.0},
    "saturated": {"spread": 1e-3, "a_range": 12.0},  # tanh(a) == +-1 in float32 beyond 9
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("case", BIVARIATE_CASES)
def test_bivariate_fused_equals_plain(case, dtype):
    """Value and all five gradients: ``|fused - plain| <= 1e-5 S`` (float32), ``1e-12 S``
    (float64); the ``S`` of the bivariate gradients include ``e^{2|a|}`` terms."""
    inputs = bivariate_inputs(64, 4, dtype, seed=30, **BIVARIATE_CASES[case])
    _agree(bivariate_normal_mixture_log_prob, inputs, BIVARIATE_NAMES, case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("a_value", [50.0, -50.0])
def test_bivariate_saturated_on_the_line_fused_equals_plain(a_value, dtype):
    """|atanh_rho| = 50 (``1 - rho^2`` is 0 in float32, 4e-43 in fact) with every target on
    its components' correlation lines: finite, and fused == plain within ``1e-5 S``."""
    inputs = on_the_line(16, 3, dtype, a_value, seed=40)
    fused = _value_and_grads(bivariate_normal_mixture_log_prob, inputs)
    assert all(np.isfinite(t).all() for t in fused)
    _agree(bivariate_normal_mixture_log_prob, inputs, BIVARIATE_NAMES, f"a={a_value}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_bivariate_fused_gradients_when_one_coordinate_dwarfs_the_other(dtype):
    """K = 1 (the mixture is the bivariate density) at ``z2 = 2e8 z1`` (``2e17`` in
    float64): the fused backward's gradients equal the single density's, which
    ``test_bivariate.py`` checks against mpmath to ``64 eps`` relative here, within
    ``16 eps`` relative. (Through ``z1 +- z2`` the earlier fused backward rounded ``z1``
    away: d/dloc1 = -199976 for -199999 in float32.)"""
    big = 2e8 if dtype == torch.float32 else 2e17
    value = torch.tensor([[1.0, big]] * 3 + [[big, -1.0]] * 2, dtype=dtype)
    log_scale = torch.tensor([[0.0, 0.0]] * 3 + [[-1.0, 0.5]] * 2, dtype=dtype)
    atanh_rho = torch.tensor([1e-3, 0.3, -2.0, 1e-3, -0.3], dtype=dtype)
    loc = torch.zeros(5, 2, dtype=dtype)
    logits = torch.zeros(5, 1, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (loc, log_scale, atanh_rho)]
    bivariate_normal_mixture_log_prob(
        value, logits, leaves[0][:, None], leaves[1][:, None], leaves[2][:, None]
    ).sum().backward()
    single = [t.clone().requires_grad_() for t in (loc, log_scale, atanh_rho)]
    bivariate_normal_log_prob(value, *single).sum().backward()
    eps = torch.finfo(dtype).eps
    for name, got, ref in zip(("loc", "log_scale", "atanh_rho"), leaves, single, strict=True):
        expected = ref.grad.double().numpy().ravel()
        assert_within(
            got.grad.double().numpy().ravel(), expected, 16 * eps * np.abs(expected),
            list(range(expected.size)), name,
        )  # fmt: skip


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_bivariate_mixture_matches_scipy_and_mpmath(fused):
    """float64, |rho| <= tanh(3): value against ``scipy.stats.multivariate_normal.logpdf``
    per component, value and gradients against mpmath, ``|err| <= 32 eps S``; the scipy
    value within ``32 eps S cosh(a)^2`` (scipy factors a covariance of condition number up
    to ``cosh(a)^2 ~ 100``, and so does its own rounding)."""
    inputs = bivariate_inputs(24, 3, torch.float64, seed=60, spread=2.5, a_range=3.0)
    got = _value_and_grads(bivariate_normal_mixture_log_prob, inputs, fused=fused)
    flush = _flush_eps(torch.float64)
    expected, scale = _oracle_arrays(bivariate_oracle, _events(*inputs), flush)
    bound = REF_EPS * _eps(torch.float64)
    _check(got, expected, scale, bound, BIVARIATE_NAMES, "mpmath")
    by_scipy, _ = _bivariate_reference(*(t.numpy() for t in inputs))
    condition = np.cosh(inputs[-1].numpy()).max(-1) ** 2
    assert_within(got[0], by_scipy[0], bound * scale[0] * condition, range(24), "scipy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_bivariate_mixture_extremes_match_mpmath(dtype):
    """Targets 1e3..1e6 scales away (|a| <= 3) and |a| = 50 on the correlation line, both
    paths' values and the fused gradients within ``32 eps S`` of mpmath's
    probability-space formula. (The plain path's gradient is covered where the bivariate
    module's own backward is finite: see ``test_bivariate_fused_equals_plain``.)"""
    parts = [
        bivariate_inputs(2, 3, dtype, seed=70 + i, spread=t, a_range=3.0) for i, t in enumerate(FAR)
    ]
    parts += [on_the_line(2, 3, dtype, a, seed=80) for a in (50.0, -50.0)]
    inputs = tuple(torch.cat(p) for p in zip(*parts, strict=True))
    expected, scale = _oracle_arrays(bivariate_oracle, _events(*inputs), _flush_eps(dtype))
    bound = REF_EPS * _eps(dtype)
    fused = _value_and_grads(bivariate_normal_mixture_log_prob, inputs)
    _check(fused, expected, scale, bound, BIVARIATE_NAMES, f"fused {dtype}")
    plain = bivariate_normal_mixture_log_prob(*inputs, fused=False).double().numpy()
    _check([plain], expected[:1], scale[:1], bound, BIVARIATE_NAMES[:1], f"plain {dtype}")


def test_naive_bivariate_mixture_breaks_where_ours_is_exact():
    """The usual probability-space mixture (Graves eqs. 23-25 as written, then -log) in
    float32: ``-inf`` for a target 50 scales away, NaN once ``tanh(a)`` rounds to 1; ours
    matches mpmath (32 eps S) at both."""
    x = torch.tensor([[50.0, -50.0], [1.0, 1.0]])
    logits = torch.zeros(2, 2)
    loc = torch.zeros(2, 2, 2)
    log_scale = torch.zeros(2, 2, 2)
    a = torch.tensor([[0.5, -0.5], [12.0, 0.3]])
    naive = -naive_bivariate_normal_mixture_nll(x, logits, loc, log_scale, a)
    assert naive[0] == -INF and torch.isnan(naive[1])
    ours = bivariate_normal_mixture_log_prob(x, logits, loc, log_scale, a).double().numpy()
    expected, scale = _oracle_arrays(bivariate_oracle, _events(x, logits, loc, log_scale, a))
    assert_within(ours, expected[0], REF_EPS * _eps(torch.float32) * scale[0], [0, 1], "ours")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_bivariate_component_beyond_the_float_range(fused, dtype):
    """Issue 10: the fused bivariate value was NaN (fused=False: -4.54e7) and gradients NaN
    where a component's quadratic form is beyond the float range. Value and all gradients
    within 32 eps S of mpmath; the dead component's parameter gradients exactly 0."""
    inputs = _dead_bivariate_events(dtype)
    got = _value_and_grads(bivariate_normal_mixture_log_prob, inputs, fused=fused)
    expected, scale = _oracle_arrays(bivariate_oracle, _events(*inputs), _flush_eps(dtype))
    _check(got, expected, scale, REF_EPS * _eps(dtype), BIVARIATE_NAMES, f"dead {dtype}")
    for grad in got[3:]:
        assert (grad[:, 0] == 0).all()


def test_bivariate_fused_backward_with_saturated_correlation_and_wide_scales():
    """Found by the fuzz suite (float32): at ``|atanh_rho| = 64`` the fused backward formed
    ``A = w dQ/dz`` with a factor ``e^{2|a|}`` before dividing by a scale of ``e^{65.7}``,
    and a finite ``d/dloc`` of ``1.5e17`` came out ``inf`` (``fused != plain``). Such
    correlations now take the plain path (``|a| < 42.3``, documented); value and every
    gradient within 32 eps S of mpmath, finite."""
    x = torch.tensor([[744.4400634765625, -8.69769993562495e-21]])
    logits = torch.tensor([[7.624619007110596, 0.8743064999580383]])
    loc = torch.tensor([[[-5.5665054079977244e-39, 1.7075087394041828e30],
                         [-1.7395646572113037, 0.011541472747921944]]])  # fmt: skip
    log_scale = torch.tensor([[[-26.581716537475586, -46.714019775390625],
                               [28.390316009521484, 65.70220184326172]]])  # fmt: skip
    a = torch.tensor([[30.442798614501953, -64.19364166259766]])
    inputs = (x, logits, loc, log_scale, a)
    got = _value_and_grads(bivariate_normal_mixture_log_prob, inputs)
    assert all(np.isfinite(g).all() for g in got)
    expected, scale = _oracle_arrays(bivariate_oracle, _events(*inputs), _flush_eps(torch.float32))
    _check(got, expected, scale, REF_EPS * _eps(torch.float32), BIVARIATE_NAMES, "wide")
