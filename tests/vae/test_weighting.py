"""Tests of ``probloss.vae.weighting``: beta, free bits, and the state and inputs of every
strategy (capacity and GECO themselves are tested in ``test_constrained.py``).

Where the numbers come from
---------------------------
Every expected value is hand arithmetic from the paper's formula, written out in the test
(Higgins et al. 2017 beta and its normalised form; Kingma et al. 2016 free bits
``sum_d max(lambda, k_d)``). Inputs are chosen exactly representable (small binary
fractions) so that float64 results can be compared exactly where the formula involves one
rounding. The state tests compare a restored strategy with the original bit for bit.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from probloss.vae.constrained import GECO, Capacity
from probloss.vae.elbo import ELBO
from probloss.vae.schedules import (
    Constant,
    CyclicalAnnealing,
    ExponentialApproach,
    LinearWarmup,
    SigmoidAnnealing,
)
from probloss.vae.weighting import (
    Beta,
    FreeBits,
    WeightedLoss,
    Weighting,
    normalised_beta,
)
from tests.vae._helpers import F64, advance, leaves, t64, vec

# ======================================================================================
# normalised beta, Beta and schedules
# ======================================================================================


def test_normalised_beta():
    """beta = beta_norm * D / L: 0.005 * 4096 / 10 = 2.048; 1 * 784 / 16 = 49."""
    assert normalised_beta(0.005, latent_dims=10, data_dims=4096) == 2.048
    assert normalised_beta(1.0, 16, 784) == 49.0
    for kwargs, match in [
        ({"beta_norm": -1.0, "latent_dims": 2, "data_dims": 3}, "beta_norm"),
        ({"beta_norm": 1.0, "latent_dims": 0, "data_dims": 3}, "latent_dims"),
        ({"beta_norm": 1.0, "latent_dims": 2, "data_dims": 2.5}, "data_dims"),
    ]:
        with pytest.raises(ValueError, match=match):
            normalised_beta(**kwargs)


def test_beta_value_and_gradient():
    """loss = 10 + 3 * (0.5 + 1.25) = 15.25 exactly; d loss / d distortion = 1, / d k = 3."""
    d, k = leaves(10.0, [0.5, 1.25])
    out = Beta(3.0)(d, k)
    assert isinstance(out, WeightedLoss)
    assert out.loss.item() == 15.25 and out.beta == 3.0 and out.kl_term.item() == 1.75
    out.loss.backward()
    assert d.grad.item() == 1.0 and k.grad.tolist() == [3.0, 3.0]


def test_beta_one_is_the_negative_elbo():
    d, k = leaves(7.0, [0.25, 2.0])
    assert Beta()(d, k).loss.item() == 9.25  # distortion + sum KL


SCHEDULES = [
    Constant(0.5),
    LinearWarmup(10, start=0.1, end=2.0, delay=3),
    SigmoidAnnealing(midpoint=8, steepness=0.4),
    CyclicalAnnealing(period=6, ratio=0.5, shape="cosine", cycles=2),
    ExponentialApproach(start=0.01, decay=0.8),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("with_free_bits", [False, True])
def test_strategies_report_the_schedule_at_the_current_step(schedule, with_free_bits):
    """After n step() calls the weight in force is schedule(n), and the loss uses it:
    loss = distortion + schedule(n) * kl_term, exactly (the formula rounds once)."""
    weighting = FreeBits(0.0, beta=schedule) if with_free_bits else Beta(schedule)
    d, k = t64(4.0), vec(0.75, 1.5)
    done = 0
    for n in (0, 1, 3, 7, 12, 20):
        advance(weighting, n - done)
        done = n
        out = weighting(d, k)
        assert weighting.steps_done == n == int(weighting.num_steps)
        assert out.beta == schedule(n) == weighting.beta
        assert torch.equal(out.loss, d + schedule(n) * k.sum())


def test_beta_accepts_a_callable_and_checks_its_values():
    weighting = Beta(lambda step: 0.5 * step)
    advance(weighting, 4)
    assert weighting(t64(1.0), vec(1.0, 1.0)).beta == 2.0
    bad = Beta(lambda step: 1.0 - step)  # negative from step 2 on
    advance(bad, 2)
    with pytest.raises(ValueError, match=r"beta schedule returned -1\.0 at step 2"):
        bad(t64(1.0), vec(1.0, 1.0))
    with pytest.raises(ValueError, match="beta"):
        Beta(-0.5)
    with pytest.raises(TypeError, match="beta"):
        Beta("1")


# ======================================================================================
# Free bits
# ======================================================================================


def test_free_bits_value_and_gradient_per_dimension():
    """threshold 0.5, beta 3, k = [0.125, 0.5, 0.875, 2]: kl_term = 0.5 + 0.5 + 0.875 + 2
    = 3.875, loss = 1 + 3 * 3.875 = 12.625. Gradient: 0 below the threshold (free), 0 at
    the tie (documented: the floor wins), beta = 3 above it."""
    d, k = leaves(1.0, [0.125, 0.5, 0.875, 2.0])
    out = FreeBits(threshold=0.5, beta=3.0)(d, k)
    assert out.kl_term.item() == 3.875 and out.loss.item() == 12.625 and out.beta == 3.0
    out.loss.backward()
    assert k.grad.tolist() == [0.0, 0.0, 3.0, 3.0]
    assert d.grad.item() == 1.0


def test_free_bits_uses_the_batch_mean_kl_of_each_dimension():
    """Through ELBO (batch of 4, reduction mean): dimension 0 has KLs [0, 0, 0, 1.75],
    batch mean 0.4375 < 0.5, so every example's KL input gets exactly zero gradient, even
    the one above the threshold; dimension 1 has mean 1 > 0.5, each input gets 1/B = 0.25."""
    kl = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.75, 1.0]], requires_grad=True)
    recon = torch.zeros(4, requires_grad=True)
    out = ELBO(FreeBits(0.5), data_dims=3)(recon, kl)
    assert out.loss.item() == 0.5 + 1.0  # max(0.5, 0.4375) + max(0.5, 1)
    out.loss.backward()
    assert kl.grad[:, 0].tolist() == [0.0] * 4
    assert kl.grad[:, 1].tolist() == [0.25] * 4
    assert recon.grad.tolist() == [-0.25] * 4


def test_free_bits_zero_threshold_matches_beta():
    """threshold 0: same value and gradient as Beta for positive KLs."""
    gen = torch.Generator().manual_seed(1)
    kl_values = torch.rand(6, generator=gen, dtype=F64) + 1e-3
    results = []
    for weighting in (FreeBits(0.0, beta=2.5), Beta(2.5)):
        d, k = t64(3.0).requires_grad_(), kl_values.clone().requires_grad_()
        out = weighting(d, k)
        out.loss.backward()
        results.append((out.loss, k.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_free_bits_arguments():
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="threshold"):
            FreeBits(bad)


# ======================================================================================
# State: save / restore, dtype casts
# ======================================================================================

STRATEGIES = {
    "beta-constant": lambda: Beta(2.0),
    "beta-linear": lambda: Beta(LinearWarmup(7, delay=2)),
    "beta-sigmoid": lambda: Beta(SigmoidAnnealing(5, 0.7)),
    "beta-cyclical": lambda: Beta(CyclicalAnnealing(4, shape="sigmoid")),
    "beta-exponential": lambda: Beta(ExponentialApproach(0.01, 0.9)),
    "free-bits": lambda: FreeBits(0.3, beta=LinearWarmup(5)),
    "capacity": lambda: Capacity(3.0, steps=8, gamma=100.0),
    "geco": lambda: GECO(2.0, alpha=0.8, lr=0.05),
}


def _batch(i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + i)
    return 1.0 + 4.0 * torch.rand((), generator=gen, dtype=dtype), torch.rand(
        4, generator=gen, dtype=dtype
    )


def _run(weighting: Weighting, start: int, n: int, dtype: torch.dtype) -> list[tuple]:
    results = []
    for i in range(start, start + n):
        out = weighting(*_batch(i, dtype))
        results.append((out.loss, out.beta, out.kl_term))
        weighting.step()
    return results


def _same(a: list[tuple], b: list[tuple]) -> bool:
    return all(
        torch.equal(x[0], y[0]) and x[1] == y[1] and torch.equal(x[2], y[2])
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_state_dict_round_trip_resumes_bit_for_bit(name, dtype):
    """Six steps, torch.save / torch.load into a fresh object, six more steps on both:
    identical losses, betas and KL terms bit for bit. A fresh object that was not restored
    gives different results (except for the constant beta), so the test can fail."""
    make = STRATEGIES[name]
    original = make()
    _run(original, 0, 6, dtype)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = make()
    restored.load_state_dict(torch.load(buffer))
    assert restored.steps_done == 6
    expected = _run(original, 6, 6, dtype)
    assert _same(_run(restored, 6, 6, dtype), expected)
    if name != "beta-constant":
        assert not _same(_run(make(), 6, 6, dtype), expected)


def test_geco_round_trip_between_forward_and_step():
    """Saved after a forward and before its step: the recorded constraint is restored."""
    original = GECO(1.0, alpha=0.5, lr=0.1)
    _run(original, 0, 3, F64)
    original(*_batch(3, F64))
    restored = GECO(1.0, alpha=0.5, lr=0.1)
    restored.load_state_dict(original.state_dict())
    original.step()
    restored.step()
    assert _same(_run(restored, 4, 3, F64), _run(original, 4, 3, F64))


def test_state_lives_in_the_parent_state_dict():
    loss_fn = ELBO(GECO(1.0), data_dims=10)
    keys = set(loss_fn.state_dict())
    assert {"weighting.num_steps", "weighting.log_lambda", "weighting.c_ma"} <= keys
    loss_fn(torch.zeros(2), torch.ones(2, 3))
    loss_fn.step()
    assert int(loss_fn.state_dict()["weighting.num_steps"]) == 1


def test_half_cast_keeps_the_state_in_float64():
    """model.half() / .to(bfloat16) cast floating buffers; the multiplier and averages keep
    their float64 values bit for bit (exp(0.01 * 0.3) is not a float16 number; a float16
    log-multiplier near 1 would drop updates below 5e-4)."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), ELBO(GECO(1.0), data_dims=2))
    geco = model[1].weighting
    model[1](torch.tensor([-1.3]), torch.tensor([[0.5]]))
    geco.step()
    before = {name: getattr(geco, name).clone() for name in ("log_lambda", "c_ma", "c_pending")}
    assert before["log_lambda"].item() != before["log_lambda"].half().item()
    model.half()
    assert model[0].weight.dtype == torch.float16
    for name, value in before.items():
        assert getattr(geco, name).dtype == F64 and torch.equal(getattr(geco, name), value)
    assert geco.num_steps.dtype == torch.int64 and geco.has_pending.dtype == torch.bool
    model.to(torch.bfloat16)
    assert torch.equal(geco.log_lambda, before["log_lambda"])


# ======================================================================================
# Inputs
# ======================================================================================


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_inputs_give_float32(name, dtype):
    """Half inputs are computed and returned in float32, equal to passing the same values
    as float32."""
    d, k = _batch(0, torch.float32)
    d_half, k_half = d.to(dtype), k.to(dtype)
    out = STRATEGIES[name]()(d_half, k_half)
    ref = STRATEGIES[name]()(d_half.float(), k_half.float())
    assert out.loss.dtype == out.kl_term.dtype == torch.float32
    assert torch.equal(out.loss, ref.loss) and out.beta == ref.beta


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_bad_input_shapes(name):
    weighting = STRATEGIES[name]()
    with pytest.raises(ValueError, match=r"distortion must be a scalar, shape \(\), got \(1,\)"):
        weighting(torch.zeros(1), torch.zeros(3))
    with pytest.raises(ValueError, match=r"kl_per_dim must have shape \(L,\).*got \(2, 3\)"):
        weighting(torch.tensor(0.0), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"got \(0,\)"):
        weighting(torch.tensor(0.0), torch.zeros(0))
    with pytest.raises(TypeError, match="kl_per_dim"):
        weighting(torch.tensor(0.0), torch.zeros(3, dtype=torch.int64))
