"""One loop over every class of ``probloss.distributions`` (zuko's style of distribution test).

Each class has one entry in ``CASES``: a small instance (batch ``(3,)``; ``(3, 2)`` for
Normal), a value in its support and the functional core's log density of that value.
Every class must:

* give ``log_prob`` equal to the functional core (same kernel, so equal to rounding:
  bound 4 eps of float64 times the magnitude);
* ``expand`` to a larger batch with ``log_prob`` equal to the broadcast one;
* ``sample`` with shape ``sample_shape + batch_shape + event_shape``;
* have a ``repr`` naming the class;
* with ``validate_args=True``, refuse a NaN value with a ``ValueError`` (docs/api.md, rule 4);
* follow the half-precision policy: float16 parameters give a float32 ``log_prob``.

A class in ``probloss.distributions.__all__`` without an entry fails
:func:`test_every_class_has_a_case`. The closed-form KLs are checked in ``KL_CASES``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.distributions as td
from mpmath import mp

import probloss.distributions as D
import probloss.functional as F


@dataclass(frozen=True)
class Case:
    build: Callable[..., td.Distribution]  # (dtype, validate_args) -> instance, batch (3,)
    value: Callable[[torch.dtype], torch.Tensor]  # a value in the support, shape (3, *event)
    core: Callable[[torch.Tensor, torch.dtype], torch.Tensor]  # functional log density


def _t(x, dtype):
    return torch.as_tensor(x, dtype=dtype)


_LOC = [[-1.0, 0.5], [0.0, 0.0], [3.0, -2.0]]
_LS = [[-0.5, 0.2], [0.0, 0.0], [1.0, -1.0]]
_A = [0.3, -2.0, 5.0]
_LOGITS = [[0.0, 1.0, -1.0], [2.0, 0.0, 0.0], [-3.0, 1.0, 0.5]]
_MIX_LOC = [[[0.0, 1.0], [2.0, -1.0], [-2.0, 0.0]]] * 3
_MIX_LS = [[[0.0, -0.5], [0.3, 0.1], [-1.0, 0.0]]] * 3
_MIX_A = [[0.5, -1.0, 0.0]] * 3
_TRIL = [[[[1.0, 0.0], [0.5, 2.0]], [[0.3, 0.0], [-0.2, 0.7]], [[2.0, 0.0], [0.0, 1.0]]]] * 3


def _value2(dtype):
    return _t([[0.5, -1.0], [2.0, 0.0], [-3.0, 4.0]], dtype)


def _stroke_core(x, dtype):
    """The offsets' mixture plus log_softmax(pen_logits) at the state (state i in row i),
    in float32 for half precision."""
    offsets = F.bivariate_normal_mixture_log_prob(
        x[..., :2], _t(_LOGITS, dtype), _t(_MIX_LOC, dtype), _t(_MIX_LS, dtype), _t(_MIX_A, dtype)
    )
    pen_logits = _t(_LOGITS, torch.promote_types(dtype, torch.float32))
    return offsets + torch.log_softmax(pen_logits, -1).diagonal()


CASES: dict[str, Case] = {
    "Normal": Case(
        build=lambda dt, v: D.Normal(_t(_LOC, dt), log_scale=_t(_LS, dt), validate_args=v),
        value=lambda dt: _value2(dt),
        core=lambda x, dt: F.normal_log_prob(x, _t(_LOC, dt), log_scale=_t(_LS, dt)),
    ),
    "ContinuousBernoulli": Case(
        build=lambda dt, v: D.ContinuousBernoulli(logits=_t(_A, dt), validate_args=v),
        value=lambda dt: _t([0.1, 0.5, 0.999], dt),
        core=lambda x, dt: F.continuous_bernoulli_log_prob(x, _t(_A, dt)),
    ),
    "BivariateNormal": Case(
        build=lambda dt, v: D.BivariateNormal(
            _t(_LOC, dt), _t(_LS, dt), _t(_A, dt), validate_args=v
        ),
        value=lambda dt: _value2(dt),
        core=lambda x, dt: F.bivariate_normal_log_prob(x, _t(_LOC, dt), _t(_LS, dt), _t(_A, dt)),
    ),
    "NormalMixture": Case(
        build=lambda dt, v: D.NormalMixture(
            _t(_LOGITS, dt), _t(_MIX_LOC, dt), _t(_MIX_LS, dt), validate_args=v
        ),
        value=lambda dt: _value2(dt),
        core=lambda x, dt: F.normal_mixture_log_prob(
            x, _t(_LOGITS, dt), _t(_MIX_LOC, dt), _t(_MIX_LS, dt)
        ),
    ),
    "BivariateNormalMixture": Case(
        build=lambda dt, v: D.BivariateNormalMixture(
            _t(_LOGITS, dt), _t(_MIX_LOC, dt), _t(_MIX_LS, dt), _t(_MIX_A, dt), validate_args=v
        ),
        value=lambda dt: _value2(dt),
        core=lambda x, dt: F.bivariate_normal_mixture_log_prob(
            x, _t(_LOGITS, dt), _t(_MIX_LOC, dt), _t(_MIX_LS, dt), _t(_MIX_A, dt)
        ),
    ),
    "MultivariateNormalMixture": Case(
        build=lambda dt, v: D.MultivariateNormalMixture(
            _t(_LOGITS, dt), _t(_MIX_LOC, dt), _t(_TRIL, dt), validate_args=v
        ),
        value=lambda dt: _value2(dt),
        core=lambda x, dt: F.multivariate_normal_mixture_log_prob(
            x, _t(_LOGITS, dt), _t(_MIX_LOC, dt), _t(_TRIL, dt)
        ),
    ),
    "StrokeMixture": Case(
        build=lambda dt, v: D.StrokeMixture(
            _t(_LOGITS, dt),
            _t(_MIX_LOC, dt),
            _t(_MIX_LS, dt),
            _t(_MIX_A, dt),
            _t(_LOGITS, dt),
            validate_args=v,
        ),
        value=lambda dt: torch.cat((_value2(dt), torch.eye(3, dtype=dt)), -1),  # one-hot pens
        core=lambda x, dt: _stroke_core(x, dt),
    ),
}


def _close(actual, expected, dtype=torch.float64):
    """Equal up to a few roundings of the same kernel: 4 eps (relative, absolute below 1)."""
    eps = torch.finfo(dtype).eps
    tol = 4 * eps * expected.abs().clamp_min(1.0)
    assert actual.dtype == expected.dtype
    assert ((actual - expected).abs() <= tol).all(), (actual, expected)


def test_every_class_has_a_case():
    missing = sorted(set(D.__all__) - set(CASES))
    assert not missing, f"add a contract case in tests/contract/test_distributions.py: {missing}"


case_param = pytest.mark.parametrize("name", sorted(CASES))


@case_param
def test_log_prob_is_the_functional_core(name):
    case = CASES[name]
    dist = case.build(torch.float64, True)
    x = case.value(torch.float64)
    _close(dist.log_prob(x), case.core(x, torch.float64))


@case_param
def test_expand(name):
    case = CASES[name]
    dist = case.build(torch.float64, True)
    wide = dist.expand(torch.Size((2, *dist.batch_shape)))
    assert wide.batch_shape == (2, *dist.batch_shape)
    assert wide.event_shape == dist.event_shape
    x = case.value(torch.float64)
    _close(wide.log_prob(x), dist.log_prob(x).expand(wide.batch_shape))


@case_param
@pytest.mark.parametrize("sample_shape", [(), (4,), (2, 5)], ids=str)
def test_sample_shape(name, sample_shape):
    dist = CASES[name].build(torch.float64, True)
    torch.manual_seed(0)
    draws = dist.sample(sample_shape)
    assert draws.shape == torch.Size(sample_shape) + dist.batch_shape + dist.event_shape
    assert torch.isfinite(dist.log_prob(draws)).all()


@case_param
def test_repr_names_the_class(name):
    assert repr(CASES[name].build(torch.float64, True)).startswith(name + "(")


@case_param
def test_validation_refuses_a_nan_value(name):
    case = CASES[name]
    x = case.value(torch.float64).clone()
    x.view(-1)[0] = math.nan
    with pytest.raises(ValueError):
        case.build(torch.float64, True).log_prob(x)
    # without validation the NaN propagates to that event only
    out = case.build(torch.float64, False).log_prob(x).reshape(-1)
    assert out.isnan()[0] and not out.isnan()[1:].any()


@case_param
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_log_prob_is_float32(name, dtype):
    case = CASES[name]
    out = case.build(dtype, True).log_prob(case.value(dtype))
    assert out.dtype == torch.float32


# ------------------------------------------------------------------ closed-form KL registry


def _normal(dt, scale_shift=0.0):
    return D.Normal(_t(_LOC, dt), log_scale=_t(_LS, dt) + scale_shift)


def _cb(dt, shift=0.0):
    return D.ContinuousBernoulli(logits=_t(_A, dt) + shift)


def _bi(dt, shift=0.0):
    return D.BivariateNormal(_t(_LOC, dt) + shift, _t(_LS, dt), _t(_A, dt))


def _normal_kl_core(q, p):
    return F.normal_kl(q.loc, 2 * q.log_scale, p.loc, 2 * p.log_scale)


KL_CASES = {
    "Normal||Normal": (lambda dt: (_normal(dt), _normal(dt, -1.0)), _normal_kl_core),
    "ContinuousBernoulli||ContinuousBernoulli": (
        lambda dt: (_cb(dt), _cb(dt, 2.0)),
        lambda q, p: F.continuous_bernoulli_kl(q.logits, p.logits),
    ),
    "BivariateNormal||BivariateNormal": (
        lambda dt: (_bi(dt), _bi(dt, 1.0)),
        lambda q, p: F.bivariate_normal_kl(
            q.loc, q.log_scale, q.atanh_rho, p.loc, p.log_scale, p.atanh_rho
        ),
    ),
    "probloss Normal||torch Normal": (
        lambda dt: (_normal(dt), td.Normal(_t(_LOC, dt), _t(_LS, dt).exp())),
        lambda q, p: F.normal_kl(q.loc, 2 * q.log_scale, p.loc, 2 * p.scale.log()),
    ),
    "torch Normal||probloss Normal": (
        lambda dt: (td.Normal(_t(_LOC, dt), _t(_LS, dt).exp()), _normal(dt, 1.0)),
        lambda q, p: F.normal_kl(q.loc, 2 * q.scale.log(), p.loc, 2 * p.log_scale),
    ),
}


@pytest.mark.parametrize("name", sorted(KL_CASES))
def test_kl_is_the_functional_core(name):
    make, core = KL_CASES[name]
    q, p = make(torch.float64)
    _close(td.kl_divergence(q, p), core(q, p))


def test_normal_kl_is_finite_where_torch_formula_is_not():
    """The issue's reproduction: log_scale -120 against -119, equal means, float32.

    Reference: the closed form ``(r - 1 - log r) / 2`` with ``r = sigma_q^2 / sigma_p^2 =
    e^-2``, evaluated with mpmath at 50 digits; bound 4 float32 eps relative. torch's own
    formula squares ``sigma = e^-120``, which underflows in float32, and returns NaN."""
    mp.dps = 50
    exact = float((mp.exp(-2) - 1 + 2) / 2)
    q = D.Normal(torch.tensor(0.0), log_scale=torch.tensor(-120.0))
    p = D.Normal(torch.tensor(0.0), log_scale=torch.tensor(-119.0))
    kl = td.kl_divergence(q, p)
    assert kl.dtype == torch.float32
    assert abs(kl.item() - exact) <= 4 * torch.finfo(torch.float32).eps * exact
