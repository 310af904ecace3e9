"""Tests of ``probloss.vae.reconstruction``: decoder log-likelihoods (the sigma-VAE scale is
tested in ``test_sigma_vae.py``).

Where the numbers come from
---------------------------
* Bernoulli: the explicit formula ``x log sigmoid(l) + (1 - x) log sigmoid(-l)`` in float64
  NumPy, with ``scipy.special.log_expit`` for ``log sigmoid``, at the inputs after the cast
  to the dtype under test; its logit-gradient ``x - expit(l)`` likewise.
* Continuous Bernoulli: ``probloss.functional.continuous_bernoulli_log_prob`` (tested
  against mpmath in ``tests/functional/test_continuous_bernoulli.py``), summed in float64.
* Gaussian / Laplace: ``scipy.stats.norm.logpdf`` / ``scipy.stats.laplace.logpdf`` in
  float64, summed.

Bounds
------
* Bernoulli: ``torch``'s built-in adds terms of size ``|l|`` and ``|log sigmoid(l)|``; the
  bound is ``8 eps`` times the sum of those magnitudes over the event (float32 / float64
  compute eps; half inputs are computed in float32). Measured worst: 0.045 of the bound
  (float16 inputs), 0.036 (float32), 0.022 (float64); relative to the value itself 1.3e-7
  (float32) and 1.2e-16 (float64). Gradient ``x - sigmoid(l)``: ``4 eps`` absolute of the
  input dtype (it lies in [-1, 1]); measured 0.11 of it (float32), exact in float64.
* Continuous Bernoulli: ``4 eps`` times the summed magnitudes (the order of summation);
  measured 0.37 of it (bfloat16), 0.18 (float32), exact in float64.
* Gaussian / Laplace against scipy (float64): relative 1e-13 of the sum of the magnitudes
  of the terms; measured 2.1e-16.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from probloss.functional import continuous_bernoulli_log_prob
from probloss.vae.reconstruction import (
    bernoulli_log_likelihood,
    continuous_bernoulli_log_likelihood,
    gaussian_log_likelihood,
    laplace_log_likelihood,
)
from probloss.vae.sigma_vae import sigma_vae_log_likelihood
from tests.functional._checks import FLOAT_DTYPES, HALF_DTYPES, assert_within, dtype_id
from tests.vae._helpers import _data

LOGITS = [1e4, -1e4, 100.0, -100.0, 20.0, -20.0, 1.0, -1.0, 1e-3, -1e-3, 0.0, 3.7]
VALUES = [0.0, 1.0, 0.3, 1e-6, 0.5, 1.0 - 2.0**-10]


def _grid(dtype):
    """x and logits of shape (len(VALUES), 2, len(LOGITS)): every pair, two channels."""
    x = torch.tensor(VALUES, dtype=torch.float64)[:, None, None].expand(-1, 2, len(LOGITS))
    logits = torch.tensor(LOGITS, dtype=torch.float64).expand(len(VALUES), 2, -1).clone()
    logits[:, 1] *= 0.5
    return x.to(dtype), logits.to(dtype)


def _compute_eps(dtype):
    return torch.finfo(torch.float32 if dtype in HALF_DTYPES else dtype).eps


# ======================================================================================
# Bernoulli and continuous Bernoulli
# ======================================================================================


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_bernoulli_matches_explicit_formula(dtype):
    """Against x log sigmoid(l) + (1-x) log sigmoid(-l) (float64 NumPy / scipy), logits up
    to +-1e4 and grey-level x; value and logit-gradient, every dtype."""
    x, logits = _grid(dtype)
    logits.requires_grad_()
    out = bernoulli_log_likelihood(x, logits)
    assert out.shape == (len(VALUES),)
    assert out.dtype == (torch.float32 if dtype in HALF_DTYPES else dtype)
    out.sum().backward()
    xs, ls = x.double().numpy(), logits.detach().double().numpy()
    terms = xs * scipy.special.log_expit(ls) + (1 - xs) * scipy.special.log_expit(-ls)
    expected = terms.sum(axis=(1, 2))
    magnitude = (np.abs(ls) + np.abs(scipy.special.log_expit(ls))).sum(axis=(1, 2))
    labels = [f"x={v}" for v in VALUES]
    bound = 8 * _compute_eps(dtype) * magnitude
    assert_within(out.detach().double(), expected, bound, labels, "value")
    grad = (xs - scipy.special.expit(ls)).ravel()
    g_labels = [f"x={a}, l={b}" for a, b in zip(xs.ravel(), ls.ravel(), strict=True)]
    g_bound = 4 * torch.finfo(dtype).eps
    assert_within(logits.grad.double().numpy().ravel(), grad, g_bound, g_labels, "d/dlogits")


def test_bernoulli_binary_x_is_a_log_probability():
    """For x in {0, 1} every term is a log probability: the sum is <= 0, and at logits 0 it
    is exactly -n log 2."""
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    assert bernoulli_log_likelihood(x, torch.zeros(1, 4, dtype=torch.float64)).item() == (
        pytest.approx(-4 * math.log(2), rel=1e-15)
    )
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert (bernoulli_log_likelihood(x.expand(5, 4), logits * 10) <= 0).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_continuous_bernoulli_is_the_summed_log_prob(dtype):
    """The sum over the event of probloss' CB log_prob (itself tested against mpmath), in
    float64, within 4 eps of the sum of magnitudes; finite gradients at logits +-1e4."""
    x, logits = _grid(dtype)
    logits.requires_grad_()
    out = continuous_bernoulli_log_likelihood(x, logits)
    assert out.dtype == (torch.float32 if dtype in HALF_DTYPES else dtype)
    out.sum().backward()
    terms = continuous_bernoulli_log_prob(x, logits.detach()).double()
    expected = terms.sum(dim=(1, 2))
    bound = 4 * _compute_eps(dtype) * terms.abs().sum(dim=(1, 2))
    assert_within(out.detach().double(), expected, bound, VALUES, "CB sum")
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("fn", [bernoulli_log_likelihood, continuous_bernoulli_log_likelihood])
def test_bernoulli_rejects_x_outside_unit_interval(fn):
    with pytest.raises(ValueError, match=r"x of shape \(2, 2\) must lie in \[0.0, 1.0\]"):
        fn(torch.tensor([[0.5, 1.5], [0.0, 0.0]]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"x of shape \(1, 2\) contains 1 NaN"):
        fn(torch.tensor([[0.5, float("nan")]]), torch.zeros(1, 2))
    out = fn(torch.tensor([[0.5, 1.5]]), torch.zeros(1, 2), validate_args=False)
    assert out.shape == (1,)


# ======================================================================================
# Gaussian and Laplace
# ======================================================================================


def _scales(shape):
    """Every documented form of the scale, as (log_scale, numpy log-scale broadcastable)."""
    gen = torch.Generator().manual_seed(7)
    per_dim = torch.randn(shape[1:], generator=gen, dtype=torch.float64)
    per_example = torch.randn(shape[0], *(1,) * (len(shape) - 1), generator=gen).double()
    full = torch.randn(shape, generator=gen, dtype=torch.float64)
    return {
        "fixed": -0.7,
        "per_dim": per_dim,
        "per_example": per_example,
        "scalar": torch.tensor(1.3, dtype=torch.float64),
        "full": full,
    }


def _log_scale_np(s):
    return s.numpy() if isinstance(s, torch.Tensor) else s


@pytest.mark.parametrize("form", ["fixed", "per_dim", "per_example", "scalar", "full"])
def test_gaussian_matches_scipy(form):
    """Against scipy.stats.norm.logpdf (float64) summed over (2, 5), for every documented
    broadcasting of the scale, given as log_scale and as scale."""
    x, loc = _data()
    log_scale = _scales(x.shape)[form]
    ls = _log_scale_np(log_scale)
    terms = scipy.stats.norm.logpdf(x.numpy(), loc.numpy(), np.exp(ls) * np.ones(x.shape))
    expected = terms.sum(axis=(1, 2))
    bound = 1e-13 * np.abs(terms).sum(axis=(1, 2))
    got = gaussian_log_likelihood(x, loc, log_scale=log_scale)
    assert got.shape == (3,)
    assert_within(got, expected, bound, range(3), f"log_scale {form}")
    scale = math.exp(log_scale) if isinstance(log_scale, float) else log_scale.exp()
    got = gaussian_log_likelihood(x, loc, scale=scale)
    assert_within(got, expected, bound, range(3), f"scale {form}")


@pytest.mark.parametrize("form", ["fixed", "per_dim", "per_example", "full"])
def test_laplace_matches_scipy(form):
    """Against scipy.stats.laplace.logpdf (float64) summed over the event."""
    x, loc = _data(1)
    log_scale = _scales(x.shape)[form]
    ls = _log_scale_np(log_scale)
    terms = scipy.stats.laplace.logpdf(x.numpy(), loc.numpy(), np.exp(ls) * np.ones(x.shape))
    got = laplace_log_likelihood(x, loc, log_scale=log_scale)
    bound = 1e-13 * np.abs(terms).sum(axis=(1, 2))
    assert_within(got, terms.sum(axis=(1, 2)), bound, range(3), f"laplace {form}")


def test_gaussian_scale_errors():
    x, loc = _data()
    with pytest.raises(ValueError, match="exactly one of log_scale, scale, var, log_var; got none"):
        gaussian_log_likelihood(x, loc)
    with pytest.raises(ValueError, match=r"exactly one of .*; got log_scale, scale"):
        gaussian_log_likelihood(x, loc, log_scale=0.0, scale=1.0)
    with pytest.raises(ValueError, match=r"scale of shape \(5,\) must be positive"):
        gaussian_log_likelihood(x, loc, scale=torch.tensor([1.0, 1, 1, 0, 1]).double())


# ======================================================================================
# event_dims, shapes, dtypes, extremes
# ======================================================================================

CALLS = {  # x of the Bernoulli likelihoods is the data sent through sigmoid (in [0, 1])
    "bernoulli": lambda x, p, **k: bernoulli_log_likelihood(x, p, **k),
    "continuous_bernoulli": lambda x, p, **k: continuous_bernoulli_log_likelihood(x, p, **k),
    "gaussian": lambda x, p, **k: gaussian_log_likelihood(x, p, log_scale=0.3, **k),
    "laplace": lambda x, p, **k: laplace_log_likelihood(x, p, log_scale=-0.2, **k),
    "sigma_vae": lambda x, p, **k: sigma_vae_log_likelihood(x, p, **k),
}
UNIT = ("bernoulli", "continuous_bernoulli")


@pytest.mark.parametrize("name", list(CALLS))
def test_event_dims(name):
    """Default: all dims but the first; k: the last k; 0: elementwise; a leading sample
    dim of the decoder output is kept. Each result equals the elementwise one summed."""
    fn = CALLS[name]
    x, loc = _data(2, (4, 3, 2), unit=name in UNIT)
    elementwise = fn(x, loc, event_dims=0)
    assert elementwise.shape == (4, 3, 2)
    if name != "sigma_vae":  # its shared scale depends on the whole batch, not elementwise
        assert torch.allclose(fn(x, loc), elementwise.sum(dim=(1, 2)), rtol=1e-14)
        assert torch.allclose(fn(x, loc, event_dims=1), elementwise.sum(-1), rtol=1e-14)
        assert torch.allclose(fn(x, loc, event_dims=3), elementwise.sum(), rtol=1e-14)
    assert fn(x, loc).shape == (4,)
    assert fn(x, loc, event_dims=1).shape == (4, 3)
    assert fn(x, loc, event_dims=3).shape == ()
    samples = loc.expand(5, 4, 3, 2)  # (S, B, *E) decoder output against x of (B, *E)
    assert fn(x, samples).shape == (5, 4)


@pytest.mark.parametrize("name", list(CALLS))
def test_event_dims_and_shape_errors(name):
    fn = CALLS[name]
    x, loc = _data(2, (4, 3), unit=name in UNIT)
    with pytest.raises(ValueError, match=r"event_dims must lie in \[0, 2\] .* got 3"):
        fn(x, loc, event_dims=3)
    with pytest.raises(ValueError, match=r"event_dims must lie in \[0, 2\] .* got -1"):
        fn(x, loc, event_dims=-1)
    with pytest.raises(TypeError, match="event_dims must be an int, got float"):
        fn(x, loc, event_dims=1.0)
    with pytest.raises(ValueError, match=r"shapes do not broadcast: x \(4, 3\), \w+ \(4, 2\)"):
        fn(x, loc[:, :2])


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_half_inputs_give_float32(name, dtype):
    """float16 / bfloat16 in, float32 out, equal to the float32 computation on the same
    (exactly upcast) inputs."""
    x, loc = _data(3, (2, 6), unit=name in UNIT)
    x, loc = x.to(dtype), loc.to(dtype)
    out = CALLS[name](x, loc)
    assert out.dtype == torch.float32
    assert torch.equal(out, CALLS[name](x.float(), loc.float()))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_extreme_decoder_outputs_are_finite(dtype):
    """Logits +-1e4 / +-100: finite values and gradients in every dtype. Log-scales +-30
    and residuals 1e4 (Gaussian, Laplace): finite values; each gradient finite wherever its
    exact value (float64 closed form at the cast inputs) fits the input dtype, else the
    exact value rounded to +-inf (gradients come back in the input dtype)."""
    x = torch.tensor([[0.0, 1.0, 0.25, 1.0, 0.0, 0.5]], dtype=dtype)
    logits = torch.tensor([[1e4, -1e4, 1e4, 100.0, -100.0, -1e4]], dtype=dtype)
    logits.requires_grad_()
    for fn in (bernoulli_log_likelihood, continuous_bernoulli_log_likelihood):
        out = fn(x, logits)
        (grad,) = torch.autograd.grad(out.sum(), logits)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all(), fn.__name__
    loc = torch.tensor([[1e4, -1e4, 0.0, 0.25, 0.0, 5.0]], dtype=dtype, requires_grad=True)
    log_scale = torch.tensor([[30.0, -30.0, 0.0, -30.0, 30.0, 0.0]], dtype=dtype)
    log_scale.requires_grad_()
    r, s = (x - loc).detach().double(), log_scale.detach().double()
    exact = {  # (d/dloc, d/dlog_scale)
        gaussian_log_likelihood: (r * torch.exp(-2 * s), (r * torch.exp(-s)) ** 2 - 1),
        laplace_log_likelihood: (torch.sign(r) * torch.exp(-s), r.abs() * torch.exp(-s) - 1),
    }
    big = torch.finfo(dtype).max
    for fn, exact_grads in exact.items():
        out = fn(x, loc, log_scale=log_scale)
        assert torch.isfinite(out).all(), fn.__name__
        grads = torch.autograd.grad(out.sum(), (loc, log_scale))
        for got, want in zip(grads, exact_grads, strict=True):
            fits = want.abs() <= big
            assert torch.isfinite(got[fits]).all(), fn.__name__
            assert torch.equal(got[~fits].double(), want[~fits].sign() * math.inf), fn.__name__
