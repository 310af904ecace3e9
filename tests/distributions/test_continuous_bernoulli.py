"""Tests of ``probloss.distributions.ContinuousBernoulli``.

Where the numbers come from
---------------------------
* Moments and entropy: mpmath closed forms (``tests/functional/cb_reference.py``):
  ``mean = 1/(1 - e^-eta) - 1/eta``, ``var = 1/eta^2 - 1/(4 sinh^2(eta/2))``,
  ``entropy = A(eta) - eta mean(eta)`` with ``A = log(expm1(eta)/eta)``, evaluated at the
  logits after the cast to the dtype under test and converged to 25 digits.
* Sampling: a fixed seed, N = 200000 draws; the sample mean is compared with the mpmath
  mean using the mpmath variance for the standard error, and the sample is tested with
  ``scipy.stats.kstest`` against the implementation's own float64 CDF (itself checked
  against mpmath in ``tests/functional/test_continuous_bernoulli.py``).
* ``torch.distributions.ContinuousBernoulli`` is used as a second implementation only where
  it is accurate (float64, 0.5 <= |logits| <= 5, outside its Taylor window
  ``0.499 < probs < 0.501``; measured error there against mpmath <= 1e-13), and as the
  documented counter-example in float32 at large logits.

Bounds: mean / variance / entropy are ``cb_mean``, ``cb_variance`` and ``cb_entropy`` of the
logits, so they are held to the special functions' contract (``tests/special/_helpers.py``
``value_rtol``: relative 1e-6 = 8.4 ulp in float32 from at most ~6 accurately rounded
operations with condition <= 1.5 per branch, 1e-13 in float64) where the exact value is
>= tiny (measured 1.9e-7 / 3.4e-16); half-precision mean and variance within one eps of the
half dtype (computed in float32, rounded once: eps/2 plus the float32 error).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch.distributions import ContinuousBernoulli as TorchCB
from torch.distributions import kl_divergence

from probloss.distributions import ContinuousBernoulli
from probloss.functional import (
    continuous_bernoulli_cdf,
    continuous_bernoulli_icdf,
    continuous_bernoulli_log_prob,
)
from tests.functional import _checks as checks
from tests.functional import cb_reference as ref

LOGITS = [0.0, *checks.signed([1e-30, 1e-6, 0.1, 1.0, 3.9, 4.0, 4.1, 17.0, 50.0, 1e3, 1e4, 1e20])]
MOMENTS = {
    "mean": (lambda d: d.mean, ref.mean),
    "variance": (lambda d: d.variance, ref.variance),
    "entropy": (lambda d: d.entropy(), ref.entropy),
}


# ======================================================================================
# Moments and entropy
# ======================================================================================


@pytest.mark.parametrize("dtype", checks.FLOAT_DTYPES, ids=checks.dtype_id)
@pytest.mark.parametrize("name", list(MOMENTS))
def test_moments_match_mpmath(name, dtype):
    """mean / variance keep the logits' dtype, entropy of half logits is float32."""
    get, oracle = MOMENTS[name]
    etas = [e for e in checks.cast(LOGITS, dtype) if math.isfinite(e)]  # 1e20 overflows float16
    d = ContinuousBernoulli(logits=torch.tensor(etas, dtype=torch.float64).to(dtype))
    got = get(d)
    half = dtype in checks.HALF_DTYPES
    expected_dtype = torch.float32 if half and name == "entropy" else dtype
    assert got.dtype == expected_dtype and got.shape == (len(etas),)
    expected = np.array([ref.to_float64(oracle(e)) for e in etas])
    if expected_dtype in checks.F32_F64:
        rtol = checks.RTOL[expected_dtype]
    else:
        rtol = torch.finfo(dtype).eps
    bound = checks.relative_bound(expected, rtol, expected_dtype)
    checks.assert_within(got.double().numpy(), expected, bound, etas, f"{name} {dtype}")


def test_torch_is_wrong_at_large_logits_float32_and_ours_is_right():
    """The user story: torch's float32 ContinuousBernoulli saturates beyond |logits| ~ 17.

    Measured (torch 2.13, float32) at logits 50: mean 0.937274 (exact 0.98, rel error
    4.4e-2), variance 0.0039344 (exact 0.0004, 8.8x), entropy -1.76898 (exact -2.91202,
    39%), log_prob(0.5) -22.2310 (exact -21.0880, 5.4%); its mean is 0.937274 for every
    logit >= 17. Ours meets the float32 bound (1e-6 relative) at the same points.
    """
    etas = [17.0, 20.0, 30.0, 50.0, 100.0, -50.0]
    logits = torch.tensor(etas)
    theirs, ours = TorchCB(logits=logits), ContinuousBernoulli(logits=logits)
    x = torch.full_like(logits, 0.5)
    quantities = {
        "mean": (theirs.mean, ours.mean, [ref.mean(e) for e in etas]),
        "variance": (theirs.variance, ours.variance, [ref.variance(e) for e in etas]),
        "entropy": (theirs.entropy(), ours.entropy(), [ref.entropy(e) for e in etas]),
        "log_prob": (theirs.log_prob(x), ours.log_prob(x), [ref.log_prob(0.5, e) for e in etas]),
    }
    for name, (t, o, exact) in quantities.items():
        exact = np.array([ref.to_float64(v) for v in exact])
        torch_rel = np.abs(t.double().numpy() - exact) / np.abs(exact)
        at_50 = etas.index(50.0)
        assert torch_rel[at_50] > 1e-2, f"torch's {name} was expected to be >1% off at 50"
        assert (torch_rel[etas.index(30.0) :] > 1e-2).all(), name
        checks.assert_within(o.double().numpy(), exact, 1e-6 * np.abs(exact), etas, f"ours {name}")
    # the saturation itself: torch's mean does not move between logits 17 and 100
    assert theirs.mean[0] == theirs.mean[etas.index(100.0)]


@pytest.mark.parametrize("name", ["log_prob", "mean", "variance", "entropy", "cdf", "icdf"])
def test_agrees_with_torch_float64_at_moderate_logits(name):
    """torch is accurate in float64 for 0.5 <= |logits| <= 5 (outside its Taylor window
    around probs = 0.5; measured <= 1e-13 against mpmath): agree within 1e-9 relative."""
    logits = torch.tensor(checks.signed([0.5, 1.0, 2.5, 3.7, 5.0]), dtype=torch.float64)
    theirs, ours = TorchCB(logits=logits), ContinuousBernoulli(logits=logits)
    pts = torch.tensor([0.05, 0.3, 0.5, 0.77, 0.95], dtype=torch.float64)[:, None]
    x = pts.expand(-1, logits.numel())
    pick = {
        "log_prob": lambda d: d.log_prob(x),
        "mean": lambda d: d.mean,
        "variance": lambda d: d.variance,
        "entropy": lambda d: d.entropy(),
        "cdf": lambda d: d.cdf(x),
        "icdf": lambda d: d.icdf(x),
    }[name]
    t, o = pick(theirs).detach(), pick(ours).detach()
    assert o.shape == t.shape
    labels = list(np.broadcast_to(logits.numpy(), t.shape).ravel())
    t, o = t.numpy().ravel(), o.numpy().ravel()
    checks.assert_within(o, t, 1e-9 * np.abs(t), labels, f"{name} vs torch")


# ======================================================================================
# Delegation, parameters, construction
# ======================================================================================


@pytest.mark.parametrize("dtype", checks.F32_F64, ids=checks.dtype_id)
def test_methods_delegate_to_functional(dtype):
    logits = torch.tensor([-50.0, -1.0, 0.0, 0.3, 20.0], dtype=dtype)
    d = ContinuousBernoulli(logits=logits)
    x = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0], dtype=dtype)
    assert torch.equal(d.log_prob(x), continuous_bernoulli_log_prob(x, logits))
    assert torch.equal(d.cdf(x), continuous_bernoulli_cdf(x, logits))
    assert torch.equal(d.icdf(x), continuous_bernoulli_icdf(x, logits))
    # broadcasting a sample batch against the batch shape
    xs = torch.rand(7, 5, dtype=dtype)
    assert d.log_prob(xs).shape == (7, 5)
    assert torch.equal(d.log_prob(xs), continuous_bernoulli_log_prob(xs, logits))


def test_positional_meaning_and_signature_are_torchs():
    """Issue 11: ``ContinuousBernoulli(0.3)`` meant logits 0.3; torch's first positional is
    ``probs``. The signature (names, order, defaults) is torch's, ``probs`` is kept as
    given, and moments, ``log_prob``, ``cdf``, ``icdf`` equal torch's in float64 at
    ``probs`` outside its Taylor window (logits 0.85 to 2.9, where it is accurate: relative
    1e-12, module docstring); ``logits`` second positionally, ``lims`` accepted."""

    def parameters(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]

    assert parameters(ContinuousBernoulli) == parameters(TorchCB)
    assert ContinuousBernoulli(0.3).probs.item() == TorchCB(0.3).probs.item()
    probs = torch.tensor([0.05, 0.3, 0.7, 0.95], dtype=torch.float64)
    x = torch.tensor([0.1, 0.5, 0.25, 0.9], dtype=torch.float64)
    u = torch.tensor([0.2, 0.5, 0.6, 0.99], dtype=torch.float64)
    logits = torch.log(probs) - torch.log1p(-probs)
    for ours, theirs in [
        (ContinuousBernoulli(probs), TorchCB(probs)),
        (ContinuousBernoulli(None, logits), TorchCB(None, logits)),
        (
            ContinuousBernoulli(probs, None, (0.4, 0.6), True),
            TorchCB(probs, None, (0.4, 0.6), True),
        ),
    ]:
        assert torch.equal(ours.probs, theirs.probs)
        for name, f in [
            ("mean", lambda d: d.mean),
            ("variance", lambda d: d.variance),
            ("entropy", lambda d: d.entropy()),
            ("log_prob", lambda d: d.log_prob(x)),
            ("cdf", lambda d: d.cdf(x)),
            ("icdf", lambda d: d.icdf(u)),
        ]:
            torch.testing.assert_close(f(ours), f(theirs), rtol=1e-12, atol=0, msg=name)
    d = ContinuousBernoulli(probs)
    assert torch.equal(d.log_prob(x), continuous_bernoulli_log_prob(x, d.logits))
    assert torch.equal(d.expand((2, 4)).probs, probs.expand(2, 4))
    with pytest.raises(ValueError, match=r"first positional argument is probs.*logits="):
        ContinuousBernoulli(torch.tensor([-2.0, 0.5]))  # logits in the old positional place


def test_probs_property_and_probs_constructor():
    logits = torch.tensor([-30.0, -2.0, 0.0, 0.5, 30.0], dtype=torch.float64)
    d = ContinuousBernoulli(logits=logits)
    assert torch.equal(d.probs, torch.sigmoid(logits))
    probs = [0.01, 0.25, 0.5, 0.8, 0.999]
    e = ContinuousBernoulli(probs=torch.tensor(probs, dtype=torch.float64))
    expected = [math.log(p) - math.log1p(-p) for p in probs]  # logit(p), exact to 1 ulp
    checks.assert_within(
        e.logits.numpy(), expected, 1e-15 * np.abs(expected) + 1e-300, probs, "logit"
    )
    assert e.batch_shape == (5,)
    assert torch.equal(e.probs, torch.tensor(probs, dtype=torch.float64))  # as given


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"logits": torch.zeros(2), "probs": torch.full((2,), 0.5)},
        {"probs": torch.tensor([0.0, 0.5])},
        {"probs": torch.tensor([0.5, 1.0])},
    ],
    ids=["neither", "both", "probs-0", "probs-1"],
)
def test_constructor_errors(kwargs):
    with pytest.raises(ValueError):
        ContinuousBernoulli(**kwargs)


def test_validate_args():
    d = ContinuousBernoulli(logits=torch.tensor([0.0, 3.0]), validate_args=True)
    for bad in (torch.tensor([0.5, 1.5]), torch.tensor([-0.1, 0.5])):
        with pytest.raises(ValueError):
            d.log_prob(bad)
        with pytest.raises(ValueError):
            d.cdf(bad)
    with pytest.raises(ValueError):
        d.icdf(torch.tensor([0.5, 1.5]))
    assert torch.isfinite(d.log_prob(torch.tensor([0.0, 1.0]))).all()
    with pytest.raises(ValueError):
        ContinuousBernoulli(logits=torch.tensor([float("nan")]), validate_args=True)
    # validate_args=False: no check (the closed form is evaluated as is)
    unchecked = ContinuousBernoulli(logits=torch.tensor([3.0]), validate_args=False)
    assert torch.isfinite(unchecked.log_prob(torch.tensor([1.5]))).all()


def test_expand():
    d = ContinuousBernoulli(logits=torch.tensor([-2.0, 40.0]), validate_args=True)
    e = d.expand(torch.Size([3, 2]))
    assert isinstance(e, ContinuousBernoulli)
    assert e.batch_shape == (3, 2) and e.event_shape == ()
    assert torch.equal(e.mean, d.mean.expand(3, 2))
    assert torch.equal(e.entropy(), d.entropy().expand(3, 2))
    assert e.rsample((4,)).shape == (4, 3, 2)
    assert e._validate_args
    with pytest.raises(ValueError):
        e.log_prob(torch.full((3, 2), 2.0))


@pytest.mark.parametrize("dtype", checks.HALF_DTYPES, ids=checks.dtype_id)
def test_half_precision_dtypes(dtype):
    """log_prob and entropy of half logits are float32; mean, variance, samples keep the
    dtype; the float32 log_prob equals the computation on the upcast inputs."""
    logits = torch.tensor([-50.0, -1.0, 0.0, 2.0, 100.0], dtype=dtype)
    d = ContinuousBernoulli(logits=logits)
    x = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=dtype)
    lp = d.log_prob(x)
    assert lp.dtype == torch.float32
    assert torch.equal(lp, continuous_bernoulli_log_prob(x.float(), logits.float()))
    assert d.entropy().dtype == torch.float32
    assert d.mean.dtype == dtype and d.variance.dtype == dtype
    s = d.sample((10,))
    assert s.dtype == dtype and s.shape == (10, 5)
    assert ((s >= 0) & (s <= 1)).all()
    assert d.rsample().dtype == dtype


# ======================================================================================
# Sampling
# ======================================================================================

EXTREME_LOGITS = [-1e4, -50.0, 0.0, 50.0, 1e4]


@pytest.mark.parametrize("dtype", checks.F32_F64, ids=checks.dtype_id)
def test_rsample_shape_range_and_gradient(dtype):
    """Shape sample_shape + batch_shape, values in [0, 1], and a finite pathwise gradient
    reaching the logits, for logits in {-1e4, -50, 0, 50, 1e4}."""
    torch.manual_seed(0)
    logits = torch.tensor(EXTREME_LOGITS, dtype=dtype, requires_grad=True)
    d = ContinuousBernoulli(logits=logits)
    s = d.rsample((1000, 2))
    assert s.shape == (1000, 2, len(EXTREME_LOGITS)) and s.dtype == dtype
    assert ((s >= 0) & (s <= 1)).all()
    s.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # the pathwise gradient pushes samples towards 1 as logits grow: d sample/d eta >= 0
    assert (logits.grad >= 0).all() and logits.grad[2] > 0
    assert not d.sample((3,)).requires_grad


_N = 200_000
_STAT_LOGITS = {
    torch.float32: [-30.0, -2.5, 0.0, 0.7, 4.0, 50.0],
    torch.float64: [-1e4, -30.0, -2.5, 0.0, 0.7, 4.0, 50.0, 1e4],
}


@pytest.mark.parametrize("dtype", checks.F32_F64, ids=checks.dtype_id)
def test_sample_mean_within_five_standard_errors(dtype):
    """Sample mean of N = 200000 draws (seed 1) within 5 sqrt(var / N) of the exact mean."""
    torch.manual_seed(1)
    etas = checks.cast(_STAT_LOGITS[dtype], dtype)
    d = ContinuousBernoulli(logits=torch.tensor(etas, dtype=dtype))
    samples = d.sample((_N,)).double()
    means = samples.mean(0).numpy()
    exact = np.array([ref.to_float64(ref.mean(e)) for e in etas])
    se = np.sqrt([ref.to_float64(ref.variance(e)) / _N for e in etas])
    checks.assert_within(means, exact, 5 * se, etas, f"sample mean {dtype}")


def test_samples_pass_kolmogorov_smirnov():
    """Kolmogorov-Smirnov test of N = 200000 float64 draws (seed 2) per logit against the
    float64 CDF: no rejection at p > 1e-3."""
    torch.manual_seed(2)
    etas = _STAT_LOGITS[torch.float64]
    logits = torch.tensor(etas, dtype=torch.float64)
    samples = ContinuousBernoulli(logits=logits).sample((_N,))
    for k, eta in enumerate(etas):
        eta_t = torch.tensor(eta, dtype=torch.float64)

        def cdf(x, eta_t=eta_t):
            return continuous_bernoulli_cdf(torch.from_numpy(np.asarray(x)), eta_t).numpy()

        result = scipy.stats.kstest(samples[:, k].numpy(), cdf)
        assert result.pvalue > 1e-3, (eta, result)


def test_kolmogorov_smirnov_detects_a_wrong_distribution():
    """Control for the test above: samples of logits 0.7 are rejected against the CDF of
    logits 0.6 (so the KS check has power at this N)."""
    torch.manual_seed(3)
    samples = ContinuousBernoulli(logits=torch.tensor(0.7, dtype=torch.float64)).sample((_N,))
    wrong = torch.tensor(0.6, dtype=torch.float64)

    def cdf(x):
        return continuous_bernoulli_cdf(torch.from_numpy(np.asarray(x)), wrong).numpy()

    assert scipy.stats.kstest(samples.numpy(), cdf).pvalue < 1e-3


def test_cdf_outside_the_support_is_zero_or_one():
    """Regression (issue 10): the example of the issue, ``probs=0.2`` without validation,
    gave ``[-20.0, 0.4537, 1.0431]``; a CDF is 0 below and 1 above the support, as torch's
    (which is accurate at this moderate logit, so it is the reference; float32 inside the
    support to 1e-6 relative, the module bound)."""
    d = ContinuousBernoulli(probs=0.2, validate_args=False)
    x = torch.tensor([-2.0, 0.3, 1.1])
    got = d.cdf(x)
    theirs = TorchCB(probs=0.2, validate_args=False).cdf(x)
    assert got[0].item() == 0.0 and got[2].item() == 1.0
    assert theirs[0].item() == 0.0 and theirs[2].item() == 1.0
    assert math.isclose(got[1].item(), theirs[1].item(), rel_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_empty_batch(dtype):
    """Empty in, empty out (issue 10): a batch of 0 logits (or probs) evaluates, samples and
    back-propagates to empty results."""
    logits = torch.zeros(0, 2, dtype=dtype, requires_grad=True)
    d = ContinuousBernoulli(logits=logits)
    x = torch.zeros(0, 2, dtype=dtype)
    outs = [d.log_prob(x), d.cdf(x), d.icdf(x), d.mean, d.variance, d.entropy()]
    outs += [d.rsample((3,)), kl_divergence(d, d)]
    for y in outs:
        assert y.numel() == 0
        (g,) = torch.autograd.grad(y.sum(), logits)
        assert g.shape == (0, 2)
    assert d.rsample((3,)).shape == (3, 0, 2)
    assert ContinuousBernoulli(probs=torch.zeros(0, dtype=dtype)).mean.shape == (0,)
