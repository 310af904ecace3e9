"""Tests of the mixture samplers (``probloss.functional.mixture.sampling``): shapes,
argument checks, temperature limits, generators, pathwise gradients; references, oracles
and bounds as stated in ``_moment_oracles.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probloss.functional import mixture
from tests.functional._checks import assert_within
from tests.functional.mixture._moment_oracles import (
    SIGMAS,
    _gen,
    _nearest,
    _np_weights,
    _random_params,
)

F64 = torch.float64


def test_large_batch_in_one_call_picks_each_rows_component():
    """Batch (4096,), K = 16, D = 3 in one call: row b allows only component b % 16 (the
    other logits are -inf), component k has mean (100 k, 100 k + 1, 100 k + 2) and scale
    e^-10, so every draw must lie within 10 e^-10 (10 standard deviations) of its row's
    mean: the gather is right in every row and -inf components are never drawn. Shapes
    (2, 4096, 3) and, for the bivariate sampler, (2, 4096, 2)."""
    b, k, d = 4096, 16, 3
    rows = torch.arange(b)
    logits = torch.full((b, k), -math.inf)
    logits[rows, rows % k] = 0.0
    loc = (100.0 * torch.arange(k)[:, None] + torch.arange(d)).expand(b, k, d).float()
    log_scale = torch.full((b, k, d), -10.0)
    x = mixture.normal_mixture_sample(logits, loc, log_scale, sample_shape=(2,), generator=_gen(0))
    assert x.shape == (2, b, d)
    expected = loc[rows, rows % k]
    assert ((x - expected).abs() <= 10 * math.exp(-10.0)).all()

    x2 = mixture.bivariate_normal_mixture_sample(
        logits, loc[..., :2], log_scale[..., :2], torch.randn(b, k), sample_shape=(2,),
        generator=_gen(1),
    )  # fmt: skip
    assert x2.shape == (2, b, 2)
    assert ((x2 - expected[:, :2]).abs() <= 10 * math.exp(-10.0)).all()


def test_large_batch_random_logits_draws_near_a_component_mean():
    """(4096, 16) with random logits: every draw is within 10 scales (e^-6) of one of its
    own row's 16 means (the rows' means are disjoint sets), and over the batch the
    frequency of each component index matches the average weight within 5 binomial SE
    (p = mean over rows of softmax(logits), numpy)."""
    b, k = 4096, 16
    g = _gen(2)
    logits = torch.randn(b, k, generator=g, dtype=F64)
    loc = (torch.arange(b)[:, None] * 1000.0 + torch.arange(k) * 10.0).to(F64)[..., None]
    x = mixture.normal_mixture_sample(
        logits, loc, torch.full((b, k, 1), -6.0, dtype=F64), generator=g
    )
    assert x.shape == (b, 1)
    rel = (x - loc[:, 0]) / 10.0  # component index within the row, plus noise
    idx = torch.round(rel)
    assert ((rel - idx).abs() * 10.0 <= 10 * math.exp(-6.0)).all()
    assert ((idx >= 0) & (idx < k)).all()
    freq = np.bincount(idx.long().numpy().ravel(), minlength=k) / b
    p = _np_weights(logits.numpy()).mean(0)
    # draws are independent Bernoulli(p_bk) per row: the variance of the count is
    # sum_b p_bk (1 - p_bk) <= b p_k (1 - p_k)
    var = (_np_weights(logits.numpy()) * (1 - _np_weights(logits.numpy()))).sum(0) / b**2
    assert_within(freq, p, SIGMAS * np.sqrt(var), range(k), "frequency over rows")


def test_broadcast_shapes():
    """logits (5, 1, K), loc (3, K, D), log_scale (K, D), atanh_rho (1, K) broadcast to batch
    (5, 3); sample_shape (2, 7) leads. Summaries have the batch shape (no sample dims)."""
    k = 4
    logits, loc, log_scale = torch.zeros(5, 1, k), torch.zeros(3, k, 2), torch.zeros(k, 2)
    a = torch.zeros(1, k)
    assert mixture.normal_mixture_sample(logits, loc, log_scale, sample_shape=(2, 7)).shape == (
        2, 7, 5, 3, 2,
    )  # fmt: skip
    assert mixture.normal_mixture_sample(logits, loc, log_scale, temperature=0.0).shape == (5, 3, 2)
    assert mixture.bivariate_normal_mixture_sample(
        logits, loc, log_scale, a, sample_shape=torch.Size([6])
    ).shape == (6, 5, 3, 2)
    assert mixture.normal_mixture_mean(logits, loc).shape == (5, 3, 2)
    assert mixture.normal_mixture_variance(logits, loc, log_scale).shape == (5, 3, 2)
    assert mixture.normal_mixture_mode(logits, loc).shape == (5, 3, 2)
    assert mixture.bivariate_normal_mixture_mean(logits, loc).shape == (5, 3, 2)
    assert mixture.bivariate_normal_mixture_covariance(logits, loc, log_scale, a).shape == (
        5,
        3,
        2,
        2,
    )
    assert mixture.bivariate_normal_mixture_mode(logits, loc).shape == (5, 3, 2)


@pytest.mark.parametrize(
    ("fn", "args", "pattern"),
    [
        (mixture.normal_mixture_sample, (torch.zeros(()), torch.zeros(1, 1), torch.zeros(1, 1)),
         r"logits must have shape \(\*, K\); got shape \(\)"),
        (mixture.normal_mixture_sample, (torch.zeros(3), torch.zeros(3), torch.zeros(3, 1)),
         r"loc must have shape \(\*, K, D\); got shape \(3,\)"),
        (mixture.normal_mixture_sample, (torch.zeros(3), torch.zeros(4, 2), torch.zeros(4, 2)),
         r"do not broadcast.*got logits \(3,\), loc \(4, 2\), log_scale \(4, 2\)"),
        (mixture.normal_mixture_variance,
         (torch.zeros(2, 3), torch.zeros(3, 3, 1), torch.zeros(3, 1)),
         r"do not broadcast.*logits \(2, 3\), loc \(3, 3, 1\)"),
        (mixture.bivariate_normal_mixture_sample,
         (torch.zeros(3), torch.zeros(3, 3), torch.zeros(3, 2), torch.zeros(3)),
         r"loc must have shape \(\*, K, 2\) \(event size 2.*got shape \(3, 3\)"),
        (mixture.bivariate_normal_mixture_covariance,
         (torch.zeros(3), torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(4)),
         r"atanh_rho \(4,\)"),
    ],
    ids=["logits-0d", "loc-1d", "K", "batch", "bivariate-event", "atanh_rho-K"],
)  # fmt: skip
def test_shape_errors_name_the_argument(fn, args, pattern):
    with pytest.raises(ValueError, match=pattern):
        fn(*args)


@pytest.mark.parametrize("bad", [-1e-3, -1.0, math.nan, math.inf, -math.inf])
def test_temperature_must_be_finite_and_non_negative(bad):
    args = (torch.zeros(2), torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        mixture.normal_mixture_sample(*args, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        mixture.bivariate_normal_mixture_sample(*args, torch.zeros(2), temperature=bad)


def test_temperature_zero_returns_the_argmax_components_mean_exactly():
    """tau = 0: every draw equals loc[b, argmax_k logits[b]] exactly (numpy argmax: the
    first maximum on ties, row 0 has one), for both samplers and both modes; no random
    number is drawn (the generator's state is unchanged) and nothing is NaN."""
    logits, loc, log_scale, a = _random_params(30)
    expected = loc.numpy()[np.arange(64), np.argmax(logits.numpy(), -1)]
    assert np.argmax(logits.numpy()[0]) == 1
    g = _gen(0)
    state = g.get_state()
    x = mixture.normal_mixture_sample(
        logits, loc, log_scale, temperature=0.0, sample_shape=(3,), generator=g
    )
    y = mixture.bivariate_normal_mixture_sample(
        logits, loc, log_scale, a, temperature=0, generator=g
    )
    assert torch.equal(g.get_state(), state)
    assert np.array_equal(x.numpy(), np.broadcast_to(expected, (3, 64, 2)))
    assert np.array_equal(y.numpy(), expected)
    assert np.array_equal(mixture.normal_mixture_mode(logits, loc).numpy(), expected)
    assert np.array_equal(mixture.bivariate_normal_mixture_mode(logits, loc).numpy(), expected)


def test_tiny_temperature_does_not_overflow_the_scaled_logits():
    """tau = 1e-38 (float32): logits / tau would be 9.5e38 and 1e39, both inf, and an argmax
    over two infs picks the first component; the shifted (l - max l) / tau is (-5e37, 0),
    so every one of 1000 draws comes from component 1 and lies within 10 of its
    sqrt(tau) sigma = 1e-19 of its mean (noise of 10 standard deviations: p < 1e-20)."""
    logits = torch.tensor([9.5, 10.0])
    loc = torch.tensor([[-3.0, 0.0], [4.0, 1.0]])
    x = mixture.normal_mixture_sample(
        logits, loc, torch.zeros(2, 2), temperature=1e-38, sample_shape=(1000,), generator=_gen(3)
    )
    assert torch.isfinite(x).all()
    assert ((x - loc[1]).abs() <= 10 * 1e-19).all()
    y = mixture.bivariate_normal_mixture_sample(
        logits, loc, torch.zeros(2, 2), torch.tensor([0.5, 50.0]), temperature=1e-38,
        sample_shape=(1000,), generator=_gen(4),
    )  # fmt: skip
    assert ((y - loc[1]).abs() <= 10 * 1e-19).all()


def test_generator_makes_draws_reproducible_and_leaves_the_global_rng_alone():
    """Same seed: identical samples (both samplers, temperature 1 and 1.0 and 0.7);
    different seed: different samples; the global RNG state is unchanged by calls with a
    generator; with generator=None the global RNG is used (torch.manual_seed repeats)."""
    logits, loc, log_scale, a = _random_params(33)
    global_state = torch.get_rng_state()
    for tau in (1, 1.0, 0.7):
        first = mixture.normal_mixture_sample(
            logits, loc, log_scale, temperature=tau, sample_shape=(5,), generator=_gen(7)
        )
        again = mixture.normal_mixture_sample(
            logits, loc, log_scale, temperature=tau, sample_shape=(5,), generator=_gen(7)
        )
        assert torch.equal(first, again)
        other = mixture.normal_mixture_sample(
            logits, loc, log_scale, temperature=tau, sample_shape=(5,), generator=_gen(8)
        )
        assert not torch.equal(first, other)
        b1 = mixture.bivariate_normal_mixture_sample(logits, loc, log_scale, a, generator=_gen(7))
        b2 = mixture.bivariate_normal_mixture_sample(logits, loc, log_scale, a, generator=_gen(7))
        assert torch.equal(b1, b2)
    assert torch.equal(torch.get_rng_state(), global_state)
    torch.manual_seed(123)
    g1 = mixture.normal_mixture_sample(logits, loc, log_scale)
    torch.manual_seed(123)
    assert torch.equal(mixture.normal_mixture_sample(logits, loc, log_scale), g1)


def test_conditional_pathwise_gradients():
    """The draw is differentiable given the drawn component (float64, 5000 draws of three
    separated components, tau = 0.5): for L = sum of all draws, dL/dloc[k] = n_k exactly,
    dL/dlog_scale[k, i] = sum_{draws from k} (x_i - mu_ki) and, bivariate,
    dL/datanh_rho[k] = sum_{draws from k} s_k2 sqrt(tau) (z1 - rho z2) (z the standardized
    draw), each within 1e-10 relative; logits get no gradient at all (grad stays None)."""
    n, tau = 5000, 0.5
    logits = torch.tensor([0.1, 0.4, -0.3], dtype=F64, requires_grad=True)
    loc = torch.tensor([[0.0, 0.0], [50.0, 50.0], [100.0, -50.0]], dtype=F64, requires_grad=True)
    log_scale = torch.tensor([[0.2, -0.1], [0.0, 0.3], [-0.4, 0.1]], dtype=F64, requires_grad=True)
    a = torch.tensor([0.7, -1.2, 2.0], dtype=F64, requires_grad=True)

    x = mixture.normal_mixture_sample(
        logits, loc, log_scale, temperature=tau, sample_shape=(n,), generator=_gen(14)
    )
    x.sum().backward()
    xs, mu = x.detach().numpy(), loc.detach().numpy()
    k = _nearest(xs, mu)
    counts = np.bincount(k, minlength=3)
    assert np.array_equal(loc.grad.numpy(), np.repeat(counts[:, None], 2, 1).astype(float))
    ref = np.stack([(xs[k == j] - mu[j]).sum(0) for j in range(3)])
    assert_within(log_scale.grad.numpy().ravel(), ref.ravel(), 1e-10 * np.abs(ref).ravel() + 1e-12,
                  range(6), "d/dlog_scale")  # fmt: skip
    assert logits.grad is None

    loc.grad = log_scale.grad = None
    y = mixture.bivariate_normal_mixture_sample(
        logits, loc, log_scale, a, temperature=tau, sample_shape=(n,), generator=_gen(15)
    )
    y.sum().backward()
    ys = y.detach().numpy()
    k = _nearest(ys, mu)
    s = np.exp(log_scale.detach().numpy())[k] * math.sqrt(tau)
    z = (ys - mu[k]) / s
    rho = np.tanh(a.detach().numpy())[k]
    per_draw = s[:, 1] * (z[:, 0] - rho * z[:, 1])
    ref = np.array([per_draw[k == j].sum() for j in range(3)])
    assert_within(a.grad.numpy(), ref, 1e-10 * np.abs(ref) + 1e-12, range(3), "d/datanh_rho")
    counts = np.bincount(k, minlength=3)
    assert np.array_equal(loc.grad.numpy(), np.repeat(counts[:, None], 2, 1).astype(float))
    assert logits.grad is None
