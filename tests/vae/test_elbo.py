"""Tests of ``probloss.vae.elbo``: reductions, units, and the ELBO of two toy models.

Where the numbers come from
---------------------------
* Bernoulli toy model (hand arithmetic): two binary pixels ``x = (1, 0)`` with decoder
  probabilities ``(1/2, 1/4)`` independent of ``z``, so ``E_q log p(x|z) = ln(1/2) +
  ln(3/4) = ln(3/8)``; one latent with posterior ``N(1, 1)`` against ``N(0, 1)``, so
  ``KL = (1 + 1 - 1 - ln 1) / 2 = 1/2``. Negative ELBO ``= 1/2 - ln(3/8) =
  1.4808292530117262`` nats ``= 1.4808292530117262 / (2 ln 2) = 1.0681925098616628`` bits
  per dimension (mpmath, 30 digits).
* Linear-Gaussian VAE (closed form, evaluated in mpmath at 30 digits): for
  ``q(z|x) = N(mu, diag(s^2))`` and ``p(x|z) = N(W z + b, sigma^2 I)``,
  ``E_q log p(x|z) = sum_i [-log(2 pi sigma^2)/2 - ((x_i - (W mu + b)_i)^2
  + sum_j W_ij^2 s_j^2) / (2 sigma^2)]`` and ``KL_j = (mu_j^2 + s_j^2 - 1 - 2 log s_j)/2``.
  The expectation is itself checked against a 200000-sample Monte Carlo average (within
  5 standard errors), so the oracle's algebra is tested too.

Bounds: the ELBO is a handful of sums of the inputs; float64 results are compared at
``1e-14`` relative, float32 at ``1e-6``.
"""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Normal, kl_divergence

from probloss.vae.constrained import GECO, Capacity
from probloss.vae.elbo import ELBO, ELBOResult, elbo
from probloss.vae.schedules import LinearWarmup
from probloss.vae.weighting import Beta, FreeBits, normalised_beta

mp.mp.dps = 30
F64 = torch.float64
LN2 = math.log(2.0)


def rel_close(got, expected, rel: float) -> bool:
    return abs(float(got) - float(expected)) <= rel * abs(float(expected))


def random_inputs(batch: int, latent: int, seed: int = 0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    recon = -50.0 * torch.rand(batch, generator=gen, dtype=F64)
    kl = 3.0 * torch.rand(batch, latent, generator=gen, dtype=F64)
    return recon.to(dtype), kl.to(dtype)


# ======================================================================================
# Toy models
# ======================================================================================


@pytest.mark.parametrize(("dtype", "rel"), [(F64, 1e-15), (torch.float32, 1e-6)])
def test_bernoulli_toy_model_by_hand(dtype, rel):
    x = torch.tensor([[1.0, 0.0]], dtype=dtype)
    p = torch.tensor([[0.5, 0.25]], dtype=dtype)
    logits = torch.log(p) - torch.log1p(-p)
    recon = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    kl = kl_divergence(Normal(torch.ones(1, 1, dtype=dtype), 1.0), Normal(0.0, 1.0))
    out = elbo(recon, kl, data_dims=2)
    assert rel_close(out.reconstruction, math.log(3 / 8), rel)
    assert rel_close(out.kl, 0.5, rel)
    assert rel_close(out.nats, 1.4808292530117262, rel)
    assert rel_close(out.loss, 1.4808292530117262, rel)
    assert rel_close(out.bits_per_dim, 1.0681925098616628, rel)


def _gaussian_vae():
    """Three examples, D = 3, L = 2, fixed parameters (float64)."""
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-2.0, 1.0, 0.0]], dtype=F64)
    mu = torch.tensor([[0.3, -0.7], [1.2, 0.1], [-0.4, 0.9]], dtype=F64)
    s = torch.tensor([[0.5, 1.3], [0.8, 0.2], [1.0, 0.6]], dtype=F64)
    w = torch.tensor([[1.0, -0.5], [0.25, 2.0], [-1.5, 0.75]], dtype=F64)
    b = torch.tensor([0.1, -0.2, 0.3], dtype=F64)
    sigma = 0.7
    return x, mu, s, w, b, sigma


def _gaussian_vae_reference(x, mu, s, w, b, sigma):
    """-ELBO per example from the closed form, in mpmath (30 digits), and its parts."""
    out = []
    for xb, mb, sb in zip(x.tolist(), mu.tolist(), s.tolist(), strict=True):
        expected_log_lik = mp.mpf(0)
        for i in range(3):
            mean = sum(mp.mpf(w[i, j].item()) * mb[j] for j in range(2)) + b[i].item()
            spread = sum(mp.mpf(w[i, j].item()) ** 2 * sb[j] ** 2 for j in range(2))
            expected_log_lik += -mp.log(2 * mp.pi * mp.mpf(sigma) ** 2) / 2 - (
                (xb[i] - mean) ** 2 + spread
            ) / (2 * mp.mpf(sigma) ** 2)
        kls = [
            (mp.mpf(m) ** 2 + mp.mpf(v) ** 2 - 1 - 2 * mp.log(v)) / 2
            for m, v in zip(mb, sb, strict=True)
        ]
        out.append((expected_log_lik, kls))
    return out


def test_gaussian_vae_reference_matches_monte_carlo():
    """The closed-form E_q log p(x|z) of the oracle against 200000 samples of z ~ q:
    within 5 standard errors (the MC error, about 3e-3 here)."""
    x, mu, s, w, b, sigma = _gaussian_vae()
    ref = _gaussian_vae_reference(x, mu, s, w, b, sigma)
    gen = torch.Generator().manual_seed(0)
    z = mu + s * torch.randn(200_000, 3, 2, generator=gen, dtype=F64)
    log_lik = Normal(z @ w.T + b, sigma).log_prob(x).sum(-1)  # (N, B)
    mc = log_lik.mean(0)
    stderr = log_lik.std(0) / math.sqrt(log_lik.shape[0])
    for k in range(3):
        assert abs(mc[k].item() - float(ref[k][0])) < 5 * stderr[k].item()


def test_gaussian_vae_end_to_end():
    """Inputs from torch.distributions (the Gaussian log-density at the decoded mean minus
    the trace term; kl_divergence per latent dimension); ELBO(Beta(1.0)) equals elbo(...)
    bit for bit and the negative of the mpmath textbook ELBO within 1e-14 relative."""
    x, mu, s, w, b, sigma = _gaussian_vae()
    decoded = mu @ w.T + b
    trace = (s**2 @ (w**2).T).sum(-1) / (2 * sigma**2)  # sum_i sum_j W_ij^2 s_j^2 / (2 s^2)
    recon = Normal(decoded, sigma).log_prob(x).sum(-1) - trace
    kl = kl_divergence(Normal(mu, s), Normal(0.0, 1.0))

    functional = elbo(recon, kl, data_dims=3)
    module = ELBO(Beta(1.0), data_dims=3)(recon, kl)
    default = ELBO(data_dims=3)(recon, kl)
    for field in ELBOResult._fields:
        a, m, d = getattr(functional, field), getattr(module, field), getattr(default, field)
        assert (torch.equal(a, m) and torch.equal(a, d)) if torch.is_tensor(a) else a == m == d

    ref = _gaussian_vae_reference(x, mu, s, w, b, sigma)
    neg_elbo = -sum(e - sum(k) for e, k in ref) / 3
    assert rel_close(functional.loss, neg_elbo, 1e-14)
    assert rel_close(functional.nats, neg_elbo, 1e-14)
    assert rel_close(functional.bits_per_dim, neg_elbo / (3 * mp.log(2)), 1e-14)
    assert rel_close(functional.reconstruction, sum(e for e, _ in ref) / 3, 1e-14)
    for j in range(2):
        assert rel_close(functional.kl_per_dim[j], sum(k[j] for _, k in ref) / 3, 1e-14)
    assert rel_close(functional.kl, sum(sum(k) for _, k in ref) / 3, 1e-14)


# ======================================================================================
# Reductions
# ======================================================================================


def test_sum_is_batch_times_mean():
    """reduction="sum": loss = B * the "mean" loss; reconstruction, kl, kl_per_dim are the
    sums over examples (exactly: the same torch sums); nats and bits_per_dim unchanged."""
    recon, kl = random_inputs(5, 3)
    mean = elbo(recon, kl, data_dims=7, beta=2.5)
    total = elbo(recon, kl, data_dims=7, beta=2.5, reduction="sum")
    assert rel_close(total.loss, 5 * mean.loss, 1e-15)
    assert rel_close(total.loss, -recon.sum() + 2.5 * kl.sum(), 1e-14)
    assert torch.equal(total.reconstruction, recon.sum())
    assert torch.equal(total.kl_per_dim, kl.sum(0))
    assert torch.equal(total.kl, kl.sum(0).sum())
    assert torch.equal(total.nats, mean.nats) and torch.equal(total.bits_per_dim, mean.bits_per_dim)
    assert total.beta == mean.beta == 2.5


@pytest.mark.parametrize(
    "make",
    [lambda: FreeBits(1.2), lambda: Capacity(2.0, steps=1), lambda: GECO(30.0)],
    ids=["free-bits", "capacity", "geco"],
)
def test_sum_keeps_per_example_thresholds(make):
    """With "sum" the strategies still see per-example means, so thresholds, capacities
    and tolerances keep their meaning: the loss is exactly B times the "mean" loss
    (before any step, and after one)."""
    recon, kl = random_inputs(4, 3, seed=3)
    for steps in (0, 1):
        mean_fn, sum_fn = ELBO(make(), data_dims=5), ELBO(make(), data_dims=5, reduction="sum")
        for fn in (mean_fn, sum_fn):
            for _ in range(steps):
                fn(recon, kl)
                fn.step()
        mean, total = mean_fn(recon, kl), sum_fn(recon, kl)
        assert torch.equal(total.loss, 4 * mean.loss) and total.beta == mean.beta


@pytest.mark.parametrize(("reduction", "scale"), [("mean", 0.25), ("sum", 1.0)])
def test_gradients_of_each_reduction(reduction, scale):
    """d loss / d recon_b = -1/B ("mean") or -1 ("sum"); d loss / d k_bd = beta/B or beta."""
    recon, kl = random_inputs(4, 2)
    recon.requires_grad_()
    kl.requires_grad_()
    out = elbo(recon, kl, data_dims=3, beta=3.0, reduction=reduction)
    assert not out.nats.requires_grad and not out.bits_per_dim.requires_grad
    out.loss.backward()
    assert torch.equal(recon.grad, torch.full((4,), -scale, dtype=F64))
    assert torch.equal(kl.grad, torch.full((4, 2), 3.0 * scale, dtype=F64))


def test_effective_beta_of_averaging():
    """The claims of normalised_beta's docstring: with per-pixel NLLs (B, D) and KLs (B, L),
    nll.mean() + kl.sum(-1).mean() is the ELBO with beta = D, divided by D;
    nll.mean() + kl.mean() is beta = D / L = normalised_beta(1, L, D), divided by D."""
    gen = torch.Generator().manual_seed(5)
    batch, data_dims, latent = 4, 12, 3
    nll = torch.rand(batch, data_dims, generator=gen, dtype=F64)
    kl = torch.rand(batch, latent, generator=gen, dtype=F64)
    recon = -nll.sum(-1)
    sum_kl = elbo(recon, kl, data_dims=data_dims, beta=data_dims).loss / data_dims
    assert rel_close(nll.mean() + kl.sum(-1).mean(), sum_kl, 1e-14)
    beta = normalised_beta(1.0, latent, data_dims)
    assert beta == data_dims / latent
    mean_kl = elbo(recon, kl, data_dims=data_dims, beta=beta).loss / data_dims
    assert rel_close(nll.mean() + kl.mean(), mean_kl, 1e-14)


# ======================================================================================
# Units
# ======================================================================================


@settings(max_examples=100)
@given(
    st.integers(1, 8),
    st.integers(1, 6),
    st.integers(1, 10**6),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["mean", "sum"]),
)
def test_units_property(batch, latent, data_dims, seed, reduction):
    """nats = mean over examples of -(r_b - sum_d k_bd) and bits_per_dim = nats / (D ln 2),
    for either reduction. Reference: math.fsum of the float64 terms (exact sum, rounded
    once); bound 8 eps times the sum of |terms| (cancellation between the parts)."""
    recon, kl = random_inputs(batch, latent, seed=seed)
    out = elbo(recon, kl, data_dims=data_dims, reduction=reduction)
    terms = [-r for r in recon.tolist()] + kl.flatten().tolist()
    exact = math.fsum(terms) / batch
    bound = 8 * 2.0**-52 * sum(abs(v) for v in terms) / batch
    assert abs(out.nats.item() - exact) <= bound
    assert rel_close(out.bits_per_dim, out.nats / (data_dims * LN2), 2.0**-52)


@pytest.mark.parametrize(
    "weighting",
    [Beta(4.0), FreeBits(5.0), Capacity(1.0, steps=3), GECO(0.0, init_lambda=7.0)],
    ids=["beta", "free-bits", "capacity", "geco"],
)
def test_nats_report_the_true_bound_whatever_the_weighting(weighting):
    recon, kl = random_inputs(3, 4, seed=7)
    plain = elbo(recon, kl, data_dims=9)
    out = ELBO(weighting, data_dims=9)(recon, kl)
    assert not torch.equal(out.loss, plain.loss)
    assert torch.equal(out.nats, plain.nats) and torch.equal(out.bits_per_dim, plain.bits_per_dim)
    assert torch.equal(out.kl, plain.kl) and torch.equal(out.kl_per_dim, plain.kl_per_dim)


# ======================================================================================
# Module, dtypes, errors
# ======================================================================================


def test_module_step_advances_the_weighting():
    loss_fn = ELBO(Beta(LinearWarmup(4)), data_dims=2)
    recon, kl = random_inputs(2, 2)
    assert loss_fn(recon, kl).beta == 0.0
    loss_fn.step()
    loss_fn.step()
    assert loss_fn(recon, kl).beta == 0.5
    assert loss_fn.weighting.steps_done == 2
    assert "data_dims=2, reduction='mean'" in repr(loss_fn)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_inputs_give_float32(dtype):
    recon, kl = random_inputs(3, 2, dtype=dtype)
    out = elbo(recon, kl, data_dims=4, beta=0.5)
    ref = elbo(recon.float(), kl.float(), data_dims=4, beta=0.5)
    for field in ("loss", "reconstruction", "kl", "kl_per_dim", "nats", "bits_per_dim"):
        got = getattr(out, field)
        assert got.dtype == torch.float32 and torch.equal(got, getattr(ref, field))


@pytest.mark.parametrize(
    ("recon_shape", "kl_shape", "match"),
    [
        ((4, 1), (4, 2), r"recon_log_prob must have shape \(B,\).*got \(4, 1\)"),
        ((4,), (4,), r"kl_per_dim must have shape \(B, L\), got \(4,\)"),
        ((4,), (3, 2), r"batch sizes differ: recon_log_prob \(4,\), kl_per_dim \(3, 2\)"),
        ((0,), (0, 2), r"need B >= 1 and L >= 1, got kl_per_dim \(0, 2\)"),
        ((2,), (2, 0), r"need B >= 1 and L >= 1, got kl_per_dim \(2, 0\)"),
    ],
)
def test_bad_shapes(recon_shape, kl_shape, match):
    recon, kl = torch.zeros(recon_shape), torch.zeros(kl_shape)
    with pytest.raises(ValueError, match=match):
        elbo(recon, kl, data_dims=3)
    with pytest.raises(ValueError, match=match):
        ELBO(data_dims=3)(recon, kl)


def test_bad_arguments():
    recon, kl = torch.zeros(2), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="data_dims"):
        elbo(recon, kl, data_dims=0)
    with pytest.raises(TypeError, match="data_dims"):
        elbo(recon, kl, data_dims=3.0)
    with pytest.raises(ValueError, match="reduction"):
        elbo(recon, kl, data_dims=3, reduction="none")
    with pytest.raises(ValueError, match="beta"):
        elbo(recon, kl, data_dims=3, beta=-1.0)
    with pytest.raises(TypeError, match="recon_log_prob"):
        elbo(torch.zeros(2, dtype=torch.int64), kl, data_dims=3)
    with pytest.raises(TypeError, match="weighting"):
        ELBO(torch.nn.Identity(), data_dims=3)
    with pytest.raises(ValueError, match="data_dims"):
        ELBO(data_dims=0)
    with pytest.raises(ValueError, match="reduction"):
        ELBO(data_dims=3, reduction="mean_per_dim")
