"""Tests of ``mixture_log_prob`` (``probloss.functional.mixture.general``): weights as
logits or probs, zero weights, impossible rows, ties of huge terms.

Where the numbers come from and the bounds: the module docstring of
``tests/functional/mixture/_density_oracles.py``
(the references, oracles and inputs these files share).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from probloss.functional.mixture import (
    mixture_log_prob,
)
from tests.functional._checks import assert_within, dtype_id
from tests.functional.mixture._density_oracles import (
    INF,
    REF_EPS,
    _eps,
    _flush_eps,
    _seeded,
    _value_and_grads,
)


def test_mixture_log_prob_matches_scipy():
    """Random (unnormalised) logits and component log densities, float64, against
    ``scipy.special.logsumexp(logits - logsumexp(logits) + lp)``: ``|err| <= 32 eps S`` with
    ``S = |ref| + max_k |log pi_k + lp_k|``; gradients ``r`` and ``r - pi`` (scipy) within
    ``32 eps`` times ``r (1 + |joint| + |ref|)`` (+ the same for ``pi``): the rounding of
    an exponent of that size."""
    g = _seeded(0)
    lp = 30 * torch.randn(50, 7, generator=g, dtype=torch.float64)
    logits = 5 * torch.randn(50, 7, generator=g, dtype=torch.float64) + 3.0
    got, d_lp, d_logits = _value_and_grads(mixture_log_prob, (lp, logits))
    log_w = scipy.special.log_softmax(logits.numpy(), axis=-1)
    joint = log_w + lp.numpy()
    ref = scipy.special.logsumexp(joint, axis=-1)
    s = np.abs(ref) + np.abs(joint).max(-1)
    assert_within(got, ref, REF_EPS * 2.2e-16 * s, list(range(50)), "mixture_log_prob")
    # r = exp(joint - lse) and pi inherit the absolute rounding of their exponents
    r, pi = np.exp(joint - ref[:, None]), np.exp(log_w)
    scale_r = r * (1 + np.abs(joint) + np.abs(ref)[:, None])
    scale_pi = pi * (1 + np.abs(log_w) + np.abs(logits.numpy()))
    bound = REF_EPS * 2.2e-16
    assert_within(d_lp.ravel(), r.ravel(), (bound * scale_r).ravel(), range(350), "d/dlp")
    assert_within(
        d_logits.ravel(),
        (r - pi).ravel(),
        (bound * (scale_r + scale_pi)).ravel(),
        range(350),
        "d/dlogits",
    )


def test_mixture_log_prob_zero_weights_and_impossible_rows():
    """-inf logits, -inf component log densities and all--inf rows: exact expected values
    (hand-computed: log(1/2 e^-1 + 1/2 e^-3)) and gradients, never NaN."""
    logits = torch.tensor([[0.0, 0.0, -INF], [0.0, 0.0, -INF], [1.0, 2.0, 3.0]], requires_grad=True)
    lp = torch.tensor(
        [[-1.0, -3.0, 5.0], [-INF, -INF, 5.0], [-INF, -2.0, -INF]],
        dtype=torch.float64,
        requires_grad=True,
    )
    out = mixture_log_prob(lp, logits)
    assert out.dtype == torch.float64
    expected_0 = math.log(0.5 * math.exp(-1.0) + 0.5 * math.exp(-3.0))
    pi = torch.softmax(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), -1)
    torch.testing.assert_close(
        out.detach(),
        torch.tensor([expected_0, -INF, math.log(pi[1]) - 2.0], dtype=torch.float64),
        rtol=1e-15,
        atol=0,
    )
    out.sum().backward()
    r0 = 1.0 / (1.0 + math.exp(-2.0))
    expected_lp = [[r0, 1 - r0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    torch.testing.assert_close(lp.grad, torch.tensor(expected_lp, dtype=torch.float64))
    # row 1 (impossible, value -inf): gradient 0; row 2: r - pi with r = (0, 1, 0)
    expected_logits = [[r0 - 0.5, 0.5 - r0, 0.0], [0.0, 0.0, 0.0], [-pi[0], 1 - pi[1], -pi[2]]]
    torch.testing.assert_close(
        logits.grad, torch.tensor(expected_logits, dtype=torch.float32), rtol=1e-6, atol=1e-7
    )


def test_mixture_log_prob_gradcheck_and_gradgradcheck():
    """float64 finite-difference checks (torch defaults), also with a zero-weight component
    and an impossible component; the backward is differentiable again."""
    g = _seeded(1)
    lp = torch.randn(4, 3, generator=g, dtype=torch.float64)
    lp[1, 2] = -INF
    logits = torch.randn(4, 3, generator=g, dtype=torch.float64)
    logits[2, 0] = -INF
    lp.requires_grad_(True)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(mixture_log_prob, (lp, logits))
    assert torch.autograd.gradgradcheck(mixture_log_prob, (lp, logits))


def test_mixture_log_prob_half_precision_and_broadcast():
    """float16 inputs are computed in float32 (reference: the float32 call on the same
    rounded values, identical); logits ``(K,)`` broadcast against ``(*, K)``."""
    lp = torch.tensor([[-1.0, -2.0], [300.0, -300.0]], dtype=torch.float16)
    logits = torch.tensor([0.5, -0.5], dtype=torch.float16)
    out = mixture_log_prob(lp, logits)
    assert out.dtype == torch.float32 and out.shape == (2,)
    torch.testing.assert_close(out, mixture_log_prob(lp.float(), logits.float()), rtol=0, atol=0)


# (dtype, magnitude): terms whose ulp exceeds log K, so that logsumexp rounds back to the
# term itself (float32 ulp at 1e8 is 8, float64 ulp at 1e17 is 16; bfloat16 is computed
# in float32, and -1e8 is close to a bfloat16 value, rounded on input)
TIES = [(torch.float32, -1e8), (torch.bfloat16, -1e8), (torch.float64, -1e17)]


@pytest.mark.parametrize(("dtype", "magnitude"), TIES, ids=lambda v: str(v))
@pytest.mark.parametrize("k", [2, 3, 5])
def test_mixture_log_prob_ties_of_huge_terms_give_responsibilities_one_over_k(k, dtype, magnitude):
    """Issue 10: ``mixture_log_prob([[-1e8, -1e8]], zeros)`` back-propagated ``[[1, 1]]``
    (``exp(x - lse)`` with ``lse`` rounded back to ``-1e8``); exact: equal components of
    equal weight have responsibility ``1/K`` each (closed form) and logit gradient
    ``r - pi = 0``. Bound: 2 eps of the compute dtype (``1/K`` and the division each round
    once) plus half an ulp of the input dtype (the gradient is returned in it); the logit
    gradient within twice that (a difference of two such numbers)."""
    lp = torch.full((1, k), magnitude, dtype=dtype, requires_grad=True)
    logits = torch.zeros(1, k, dtype=dtype, requires_grad=True)
    mixture_log_prob(lp, logits).sum().backward()
    bound = 2 * _eps(dtype) + torch.finfo(dtype).eps / 2
    assert (lp.grad.double() - 1.0 / k).abs().max() <= bound
    assert logits.grad.double().abs().max() <= 2 * bound


def _probs_reference(lp: np.ndarray, probs: np.ndarray, flush: float) -> tuple[np.ndarray, ...]:
    """float64 numpy/scipy: ``log sum_k w_k e^{lp_k} - log sum w``, ``r_k`` and
    ``d/dw_k = e^{lp_k - log sum_j w_j e^{lp_j}} - 1 / sum w``, with scales (the rounding
    of each exponent: ``r (1 + |lp| + |lse|)``; ``1/S`` for the normalisation; ``flush``
    (in units of eps) times ``w_k / D`` for the documented flush of ``e^{lp_k - c}``, the
    shift ``c`` the largest ``lp`` of positive weight, ``D = sum_j w_j e^{lp_j - c}``)."""
    lse = scipy.special.logsumexp(lp, b=probs, axis=-1)
    total = probs.sum(-1)
    value = lse - np.log(total)
    with np.errstate(divide="ignore"):
        r = probs * np.exp(lp - lse[..., None])
    ratio = np.exp(lp - lse[..., None])
    d_probs = ratio - 1.0 / total[..., None]
    s_value = np.abs(value) + np.abs(lse) + np.abs(np.log(total))
    c = np.where(probs > 0, lp, -np.inf).max(-1, keepdims=True)
    d = (probs * np.exp(np.where(probs > 0, lp, c) - c)).sum(-1, keepdims=True)
    s_r = r * (1 + np.abs(lp) + np.abs(lse)[..., None]) + flush * probs / d
    s_probs = ratio * (1 + np.abs(lp) + np.abs(lse)[..., None]) + 1.0 / total[..., None]
    return value, r, d_probs, s_value, s_r, s_probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_mixture_log_prob_from_probs_with_exact_zeros(dtype):
    """Issue 10 / numpyro 1870: weights with exact zeros. ``log(probs)`` as logits gives a
    NaN gradient at each zero weight; ``probs=`` gives the value and the gradients
    ``r`` (component log densities) and ``p_k / sum_j w_j p_j - 1 / sum w`` (probs, finite
    at ``w_k = 0``) within 32 eps S of float64 scipy (``logsumexp(lp, b=probs)``)."""
    g = _seeded(210)
    lp = (20 * torch.randn(30, 4, generator=g, dtype=torch.float64)).to(dtype)
    probs = torch.rand(30, 4, generator=g, dtype=torch.float64).to(dtype)
    probs[::3, 1] = 0.0
    probs[1::3, 3] = 0.0
    probs[2::5, :3] = 0.0  # one component left
    probs[2::5, 3] = 0.5
    leaves = [lp.clone().requires_grad_(True), probs.clone().requires_grad_(True)]
    out = mixture_log_prob(leaves[0], probs=leaves[1])
    out.sum().backward()
    value, r, d_probs, s_value, s_r, s_probs = _probs_reference(
        lp.double().numpy(), probs.double().numpy(), _flush_eps(dtype)
    )
    bound = REF_EPS * _eps(dtype)
    labels = list(np.ndindex(30, 4))
    assert_within(out.detach().double().numpy(), value, bound * s_value, range(30), "value")
    assert_within(leaves[0].grad.double().numpy().ravel(), r.ravel(), (bound * s_r).ravel(),
                  labels, "d/dlp")  # fmt: skip
    assert_within(leaves[1].grad.double().numpy().ravel(), d_probs.ravel(),
                  (bound * s_probs).ravel(), labels, "d/dprobs")  # fmt: skip
    # the naive form: log(probs) as logits has a NaN gradient at the zeros
    naive = probs.clone().requires_grad_(True)
    mixture_log_prob(lp, torch.log(naive)).sum().backward()
    assert torch.isnan(naive.grad).any()


def test_mixture_log_prob_probs_agree_with_logits_and_ties():
    """With positive probs the value equals that from ``logits = log(probs)`` (float64,
    1e-14 relative to max(1, |value|): the same terms); a tie of huge terms (float32,
    ``-1e8``) with probs ``(1/4, 1/4)``: responsibilities 1/2 and d/dprobs
    ``1/(1/2) - 1/(1/2) = 0`` exactly (closed form), which a shift by the rounded
    ``log p`` would miss by 1."""
    g = _seeded(211)
    lp = 5 * torch.randn(10, 3, generator=g, dtype=torch.float64)
    probs = torch.rand(10, 3, generator=g, dtype=torch.float64) + 0.1
    torch.testing.assert_close(
        mixture_log_prob(lp, probs=probs), mixture_log_prob(lp, torch.log(probs)),
        rtol=1e-14, atol=1e-14,
    )  # fmt: skip
    lp = torch.full((1, 2), -1e8, requires_grad=True)
    probs = torch.full((1, 2), 0.25, requires_grad=True)
    mixture_log_prob(lp, probs=probs).sum().backward()
    assert torch.equal(lp.grad, torch.full((1, 2), 0.5))
    assert torch.equal(probs.grad, torch.zeros(1, 2))


def test_mixture_log_prob_probs_edge_rows_gradcheck_and_half():
    """An impossible row (every weighted term -inf) has value -inf and gradient exactly 0;
    the probs form passes float64 gradcheck and gradgradcheck at positive probs (finite
    differences at 0 would leave the domain); half-precision probs are computed in float32
    (identical to the float32 call)."""
    lp = torch.tensor([[-INF, 0.0, -INF], [-1.0, -2.0, 3.0]], dtype=torch.float64,
                      requires_grad=True)  # fmt: skip
    probs = torch.tensor([[0.5, 0.0, 0.5], [0.2, 0.3, 0.0]], dtype=torch.float64,
                         requires_grad=True)  # fmt: skip
    out = mixture_log_prob(lp, probs=probs)
    assert out[0] == -INF and torch.isfinite(out[1])
    out.sum().backward()
    assert (lp.grad[0] == 0).all() and (probs.grad[0] == 0).all()
    assert torch.isfinite(probs.grad).all()
    g = _seeded(212)
    lp = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    probs = (torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.1).requires_grad_(True)

    def fn(lp, probs):
        return mixture_log_prob(lp, probs=probs)

    assert torch.autograd.gradcheck(fn, (lp, probs))
    assert torch.autograd.gradgradcheck(fn, (lp, probs))
    half = torch.tensor([[0.25, 0.75]], dtype=torch.float16)
    lp16 = torch.tensor([[-1.0, 2.0]], dtype=torch.float16)
    out = mixture_log_prob(lp16, probs=half)
    assert out.dtype == torch.float32
    assert torch.equal(out, mixture_log_prob(lp16.float(), probs=half.float()))


def test_mixture_log_prob_weight_form_errors():
    """Exactly one of logits / probs (a ValueError naming both); probs negative, NaN,
    infinite or all 0 in a row are ValueErrors naming probs and its shape (CPU,
    ``validate_args=None``); ``validate_args=False`` skips the check."""
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"exactly one of logits, probs.*got neither"):
        mixture_log_prob(lp)
    with pytest.raises(ValueError, match=r"exactly one of logits, probs.*got both"):
        mixture_log_prob(lp, torch.zeros(3), probs=torch.ones(3))
    for bad, pattern in (
        (torch.tensor([0.5, -0.1, 0.6]), r"probs of shape \(3,\) must lie in"),
        (torch.tensor([0.5, math.nan, 0.6]), r"probs of shape \(3,\) contains 1 NaN"),
        (torch.tensor([0.5, INF, 0.6]), r"probs of shape \(3,\) must lie in"),
        (torch.zeros(2, 3), r"probs of shape \(2, 3\) must have a positive sum.*1|2 row"),
    ):
        with pytest.raises(ValueError, match=pattern):
            mixture_log_prob(lp, probs=bad)
    out = mixture_log_prob(lp, probs=torch.zeros(3), validate_args=False)
    assert torch.isnan(out).all()
    with pytest.raises(ValueError, match=r"component_log_prob \(\*, K\) and probs \(\*, K\)"):
        mixture_log_prob(lp, probs=torch.ones(2))


def test_undefined_mixture_weights_give_nan():
    """The documented NaN: a row of logits that is all ``-inf`` (no mixture) or has a
    ``+inf``; and torch.logsumexp's NaN gradient at an all ``-inf`` row, which ours (the
    documented contrast) replaces by 0."""
    lp = torch.zeros(2, 2)
    out = mixture_log_prob(lp, torch.tensor([[-INF, -INF], [INF, 0.0]]))
    assert torch.isnan(out).all()
    x = torch.full((1, 2), -INF, requires_grad=True)
    torch.logsumexp(x, -1).sum().backward()
    assert torch.isnan(x.grad).all()
    y = torch.full((1, 2), -INF, requires_grad=True)
    mixture_log_prob(y, torch.zeros(2)).sum().backward()
    assert torch.equal(y.grad, torch.zeros(1, 2))
