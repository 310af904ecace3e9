"""Tests of ``probloss.distributions.stroke.StrokeMixture`` (sketch-rnn stroke points).

Where the numbers come from
---------------------------
* ``log_prob``: a hand-written float64 reference, ``_reference_log_prob``: the bivariate
  normal density in its textbook form (``rho = tanh(a)``, ``1 - rho^2`` and the quadratic
  form written out), a log-sum-exp over components with ``log_softmax(logits)``, plus
  ``log_softmax(pen_logits)`` at the one-hot's state. At moderate inputs (``|a| <= 2``,
  log-scales in ``[-1, 1]``) the textbook form is exact to float64 rounding; bound
  ``64 eps (1 + |ref| + m)``, ``m`` the largest component term, for the evaluation's few
  dozen roundings relative to the terms; float32 and half-precision parameters against
  the same reference at their own (exactly representable) values, with eps of float32.
* ``mean``, ``variance``, ``mode``: the closed forms of the docstring from the same
  parameters in float64 (law of total expectation/variance for the offsets, ``pi``,
  ``pi (1 - pi)`` for the one-hot), within 1e-12 relative.
* Sampling: fixed seeds, N draws; each frequency within 5 standard errors
  ``sqrt(p (1 - p) / N)`` of its probability (``softmax(q / tau)`` for the pen state,
  ``softmax(l / tau)`` for the component, identified by the side of two far-apart
  components); within-component variances within 5 SE ``v sqrt(2 / (n - 1))`` of
  ``tau sigma^2``.
"""

from __future__ import annotations

import math

import pytest
import torch

from probloss.distributions import StrokeMixture
from probloss.distributions.mixture import BivariateNormalMixture

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(F64).eps


def _params(batch=(4,), k=3, p=3, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    params = (
        r(*batch, k),
        2 * r(*batch, k, 2),
        (2 * torch.rand(*batch, k, 2, generator=g, dtype=F64) - 1),  # log-scales in [-1, 1]
        (4 * torch.rand(*batch, k, generator=g, dtype=F64) - 2),  # |a| <= 2
        r(*batch, p),
    )
    return tuple(t.to(dtype) for t in params)


def _points(shape, p=3, seed=1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    offsets = 2 * torch.randn(*shape, 2, generator=g, dtype=F64)
    state = torch.randint(0, p, shape, generator=g)
    pen = torch.nn.functional.one_hot(state, p).to(F64)
    return torch.cat((offsets, pen), -1).to(dtype)


def _reference_log_prob(value, logits, loc, log_scale, atanh_rho, pen_logits):
    """float64 by hand: logsumexp_k(log_softmax(l)_k + log N_k(dx, dy)) + log_softmax(q)_j,
    with log N = -log 2 pi - log s1 - log s2 - log(1 - rho^2)/2 - Q / (2 (1 - rho^2)),
    Q = z1^2 - 2 rho z1 z2 + z2^2. Returns (log p, largest |component term|)."""
    value, logits, loc, log_scale, atanh_rho, pen_logits = (
        t.double() for t in (value, logits, loc, log_scale, atanh_rho, pen_logits)
    )
    x = value[..., None, :2]  # (*, 1, 2) against (*, K, 2)
    z = (x - loc) / log_scale.exp()
    rho = torch.tanh(atanh_rho)
    one_m = 1 - rho**2
    quad = z[..., 0] ** 2 - 2 * rho * z[..., 0] * z[..., 1] + z[..., 1] ** 2
    log_n = -math.log(2 * math.pi) - log_scale.sum(-1) - 0.5 * torch.log(one_m) - quad / (2 * one_m)
    terms = torch.log_softmax(logits, -1) + log_n
    state = value[..., 2:].argmax(-1, keepdim=True)
    log_pen = torch.log_softmax(pen_logits, -1)
    log_pen = log_pen.expand(*state.shape[:-1], log_pen.shape[-1]).gather(-1, state)
    return torch.logsumexp(terms, -1) + log_pen.squeeze(-1), terms.abs().amax(-1)


@pytest.mark.parametrize(
    ("dtype", "eps"),
    [(F64, EPS64), (torch.float32, EPS32), (torch.float16, EPS32), (torch.bfloat16, EPS32)],
    ids=["f64", "f32", "f16", "bf16"],
)
def test_log_prob_matches_hand_written_reference(dtype, eps):
    """Within 64 eps (1 + |ref| + m), eps of log_prob's dtype (float32 for half
    parameters: the half-precision policy), at the distribution's own parameters."""
    params = _params(dtype=dtype)
    d = StrokeMixture(*params)
    value = _points((6, 4), dtype=dtype)  # (6,) sample dims against batch (4,)
    lp = d.log_prob(value)
    assert lp.shape == (6, 4)
    assert lp.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    ref, magnitude = _reference_log_prob(value, *params)
    bound = 64 * eps * (1 + ref.abs() + magnitude)
    assert ((lp.double() - ref).abs() <= bound).all(), (lp, ref)


def test_log_prob_is_the_offset_mixture_plus_the_pen_term():
    """The offsets' part is the BivariateNormalMixture's log_prob (the same functional
    call, bitwise); the pen part is log_softmax at the state (bitwise)."""
    params = _params()
    d = StrokeMixture(*params)
    value = _points((4,))
    offsets = BivariateNormalMixture(*params[:4]).log_prob(value[..., :2])
    pen = torch.log_softmax(params[4], -1).gather(-1, value[..., 2:].argmax(-1, keepdim=True))
    assert torch.equal(d.log_prob(value), offsets + pen.squeeze(-1))


def test_gradcheck_float64():
    """Analytic gradients of log_prob in every parameter against finite differences."""
    params = tuple(t.requires_grad_() for t in _params(batch=(2,), k=2))
    value = _points((2,))
    torch.autograd.gradcheck(lambda *ps: StrokeMixture(*ps).log_prob(value), params)


def test_pen_term_is_finite_with_impossible_other_states():
    """A pen logit of -inf for a state that is not the point's: the gather reads only the
    state's own log_softmax (a dot product with the one-hot would give 0 * -inf = NaN)."""
    params = list(_params(batch=(), k=2))
    params[4] = torch.tensor([0.0, -math.inf, 1e30], dtype=F64)
    d = StrokeMixture(*params)
    value = torch.tensor([0.5, -0.5, 0.0, 0.0, 1.0], dtype=F64)
    ref, _ = _reference_log_prob(value, *params[:4], torch.tensor([0.0, -math.inf, 1e30]))
    assert torch.isfinite(d.log_prob(value))
    torch.testing.assert_close(d.log_prob(value), ref, rtol=64 * EPS64, atol=0)


def test_moments_and_mode():
    """mean = (offset mixture mean, pi), variance = (offset mixture variance,
    pi (1 - pi)), mode = (mean of the heaviest component, one-hot of the likeliest pen
    state) = sample_with_temperature(0): closed forms in float64, 1e-12 relative."""
    logits, loc, log_scale, atanh_rho, pen_logits = _params()
    d = StrokeMixture(logits, loc, log_scale, atanh_rho, pen_logits)
    w = torch.softmax(logits, -1)[..., None]
    mean = (w * loc).sum(-2)
    var = (w * (log_scale.exp() ** 2 + (loc - mean[..., None, :]) ** 2)).sum(-2)
    pi = torch.softmax(pen_logits, -1)
    torch.testing.assert_close(d.mean, torch.cat((mean, pi), -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        d.variance, torch.cat((var, pi * (1 - pi)), -1), rtol=1e-12, atol=1e-12
    )
    top = logits.argmax(-1)
    mode_loc = loc[torch.arange(4), top]
    mode_pen = torch.nn.functional.one_hot(pen_logits.argmax(-1), 3).to(F64)
    assert torch.equal(d.mode, torch.cat((mode_loc, mode_pen), -1))
    assert torch.equal(d.sample_with_temperature(0.0), d.mode)


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_sampling_frequencies_follow_the_temperature(tau):
    """N = 40000 draws of one point: pen states at softmax(q / tau), components at
    softmax(l / tau) (two components at x = -+20, unit scales: the side of dx identifies
    the component; P(misread) < Phi(-20)), within-component dx variance tau sigma^2.
    Each within 5 standard errors (see the module docstring); the draws are one-hot."""
    n = 40000
    logits = torch.tensor([0.3, -0.4], dtype=F64)
    loc = torch.tensor([[-20.0, 0.0], [20.0, 0.0]], dtype=F64)
    log_scale = torch.tensor([[0.0, 0.5], [-0.5, 0.0]], dtype=F64)
    atanh_rho = torch.tensor([0.5, -1.0], dtype=F64)
    pen_logits = torch.tensor([1.0, 0.0, -1.0], dtype=F64)
    d = StrokeMixture(logits, loc, log_scale, atanh_rho, pen_logits)
    g = torch.Generator().manual_seed(7)
    x = d.sample_with_temperature(tau, (n,), generator=g)
    assert x.shape == (n, 5)
    pen = x[:, 2:]
    assert ((pen == 0) | (pen == 1)).all() and (pen.sum(-1) == 1).all()

    def within_5_se(observed, p):
        return ((observed - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all()

    assert within_5_se(pen.mean(0), torch.softmax(pen_logits / tau, -1))
    right = x[:, 0] > 0
    assert within_5_se(right.double().mean(), torch.softmax(logits / tau, -1)[1])
    for k, side in enumerate((~right, right)):
        dx = x[side, 0]
        expected = tau * math.exp(2 * log_scale[k, 0].item())
        se = expected * math.sqrt(2 / (dx.numel() - 1))
        assert abs(dx.var().item() - expected) <= 5 * se, (k, dx.var(), expected)


def test_sample_uses_the_global_rng_and_is_reproducible():
    d = StrokeMixture(*_params())
    torch.manual_seed(3)
    a = d.sample((5,))
    torch.manual_seed(3)
    assert torch.equal(a, d.sample((5,))) and a.shape == (5, 4, 5)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(
        d.sample_with_temperature(0.7, (3,), g1), d.sample_with_temperature(0.7, (3,), g2)
    )
    with pytest.raises(ValueError, match="temperature"):
        d.sample_with_temperature(-1.0)
    with pytest.raises(NotImplementedError):
        d.rsample()


@pytest.mark.parametrize(
    ("pen", "offsets"),
    [([0.5, 0.5, 0.0], [0.0, 0.0]), ([0.0, 0.0, 0.0], [0.0, 0.0]), ([1.0, 1.0, 0.0], [0.0, 0.0]),
     ([0.0, 2.0, -1.0], [0.0, 0.0]), ([1.0, 0.0, 0.0], [math.nan, 0.0])],
)  # fmt: skip
def test_validation_refuses_points_outside_the_support(pen, offsets):
    """When validating, the pen part must be one-hot and the offsets not NaN; without
    validation the point is evaluated (the pen state read as the largest entry)."""
    d = StrokeMixture(*_params(batch=()))
    value = torch.tensor(offsets + pen, dtype=F64)
    with pytest.raises(ValueError, match="one-hot pen state"):
        d.log_prob(value)
    StrokeMixture(*_params(batch=()), validate_args=False).log_prob(value)


def test_shape_errors_name_the_arguments():
    logits, loc, log_scale, atanh_rho, pen_logits = _params()
    d = StrokeMixture(logits, loc, log_scale, atanh_rho, pen_logits)
    with pytest.raises(ValueError, match=r"value must have shape \(\*, 2 \+ P\) = \(\*, 5\)"):
        d.log_prob(torch.zeros(4, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"pen_logits must have shape \(\*, P\) with P >= 2"):
        StrokeMixture(logits, loc, log_scale, atanh_rho, pen_logits[..., :1])
    with pytest.raises(ValueError, match=r"pen_logits \(3, 3\)"):
        StrokeMixture(logits, loc, log_scale, atanh_rho, pen_logits[:3])
    with pytest.raises(ValueError, match="loc"):
        StrokeMixture(logits, loc[..., :1], log_scale, atanh_rho, pen_logits)


def test_batch_broadcast_expand_and_empty():
    """Parameters broadcast to one batch shape; expand gives the same log_prob; an empty
    batch gives empty results."""
    logits, loc, log_scale, atanh_rho, _ = _params(batch=(4,))
    d = StrokeMixture(logits, loc, log_scale, atanh_rho, torch.zeros(2, 1, 3, dtype=F64))
    assert d.batch_shape == (2, 4) and d.event_shape == (5,)
    e = StrokeMixture(*_params(batch=(1,))).expand((3, 4))
    value = _points((3, 4))
    assert e.batch_shape == (3, 4)
    assert torch.equal(e.log_prob(value), StrokeMixture(*_params(batch=(1,))).log_prob(value))
    empty = StrokeMixture(*_params(batch=(0,)))
    assert empty.log_prob(torch.zeros(0, 5, dtype=F64)).shape == (0,)
    assert empty.sample((2,)).shape == (2, 0, 5)
    for moment in ("mean", "variance", "mode"):
        assert getattr(empty, moment).shape == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_samples_and_moments_keep_the_dtype(dtype):
    d = StrokeMixture(*_params(dtype=dtype))
    for out in (d.sample((2,)), d.sample_with_temperature(0.5), d.mean, d.variance, d.mode):
        assert out.dtype == dtype and torch.isfinite(out).all()
