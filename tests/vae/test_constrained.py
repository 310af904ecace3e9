"""Tests of ``probloss.vae.constrained``: the capacity objective and GECO.

Where the numbers come from
---------------------------
Every expected value is hand arithmetic from the paper's formula, written out in the test
(Burgess et al. 2018 ``gamma |KL - C(t)|`` with ``C`` linear in ``t``; Rezende & Viola
2018 algorithm 1: ``C_ma = alpha C_ma + (1 - alpha) C``, ``lambda <- lambda exp(lr C_ma)``).
Inputs are chosen exactly representable (small binary fractions) so that float64 results
can be compared exactly where the formula involves one rounding, and within ``1e-15``
relative where it involves ``exp``. The GECO toy problem has the closed-form KKT point
``theta = 2``, ``lambda = 2`` (minimise ``theta^2`` s.t. ``(theta - 3)^2 <= 1``).
"""

from __future__ import annotations

import math

import pytest
import torch

from probloss.vae.constrained import GECO, Capacity
from probloss.vae.weighting import Beta, Weighting
from tests.vae._helpers import F64, advance, leaves, t64, vec

# ======================================================================================
# Capacity
# ======================================================================================


def test_capacity_target_grows_linearly():
    """C(t) = 25 min(t / 100, 1): 0, 10, 25, 25 at t = 0, 40, 100, 1000."""
    capacity = Capacity(max_capacity=25.0, steps=100)
    got = []
    for t in (0, 40, 100, 1000):
        advance(capacity, t - capacity.steps_done)
        got.append(capacity.capacity)
    assert got == [0.0, 10.0, 25.0, 25.0]


@pytest.mark.parametrize(
    ("kl", "loss", "beta", "grad"),
    [
        # C(40) = 10; KL = 12 above: 5 + 1000 |12 - 10| = 2005, pushed down
        ([4.0, 8.0], 2005.0, 1000.0, 1000.0),
        # KL = 8 below: 5 + 1000 |8 - 10| = 2005, pushed up
        ([3.0, 5.0], 2005.0, -1000.0, -1000.0),
        # KL = 10 on target: loss 5, beta 0, zero gradient (|x|' = sign(x) = 0 at 0)
        ([2.5, 7.5], 5.0, 0.0, 0.0),
    ],
)
def test_capacity_value_sign_and_gradient(kl, loss, beta, grad):
    capacity = Capacity(max_capacity=25.0, steps=100, gamma=1000.0)
    advance(capacity, 40)
    d, k = leaves(5.0, kl)
    out = capacity(d, k)
    assert out.loss.item() == loss and out.beta == beta
    assert out.kl_term.item() == sum(kl) - 10.0
    assert torch.equal(out.loss, d + out.beta * out.kl_term)  # the documented identity
    out.loss.backward()
    assert k.grad.tolist() == [grad, grad] and d.grad.item() == 1.0


def test_capacity_arguments():
    with pytest.raises(ValueError, match="max_capacity"):
        Capacity(-1.0, 10)
    with pytest.raises(ValueError, match="steps"):
        Capacity(5.0, 0)
    with pytest.raises(ValueError, match="gamma"):
        Capacity(5.0, 10, gamma=-1.0)


# ======================================================================================
# GECO
# ======================================================================================


@pytest.mark.parametrize(("distortion", "grows"), [(60.0, True), (45.0, False)])
def test_geco_multiplier_direction(distortion, grows):
    """tolerance 50: distortion 60 violates the constraint (C = 10) and lambda grows to
    exp(0.01 * 10); 45 satisfies it (C = -5) and lambda shrinks to exp(-0.05). On the first
    step the moving average is C itself (algorithm 1, C_ma^0 = C_0)."""
    geco = GECO(tolerance=50.0, lr=0.01)
    geco(t64(distortion), vec(1.0, 2.0))
    geco.step()
    constraint = distortion - 50.0
    assert (geco.lambda_ > 1.0) == grows
    assert math.isclose(geco.lambda_, math.exp(0.01 * constraint), rel_tol=1e-15)
    assert geco.c_ma.item() == constraint


def test_geco_moving_average_and_straight_through_gradient():
    """alpha 0.75, lr 0.125, tolerance 1. Step 0: C0 = 3, lambda1 = exp(0.375).
    Step 1: C1 = -1, average 0.75 * 3 + 0.25 * (-1) = 2 -> loss = KL + lambda1 * 2 = 1.5 +
    2 exp(0.375) in value, but d loss / d distortion = lambda1 (the current batch's
    gradient, not (1 - alpha) lambda1), d loss / d k = 1. Then lambda2 = lambda1 exp(0.25)."""
    geco = GECO(tolerance=1.0, alpha=0.75, lr=0.125)
    geco(t64(4.0), vec(0.5))
    geco.step()
    lam1 = math.exp(0.375)
    d, k = leaves(0.0, [0.5, 1.0])
    out = geco(d, k)
    assert math.isclose(out.loss.item(), 1.5 + 2.0 * lam1, rel_tol=1e-15)
    assert math.isclose(out.beta, 1.0 / lam1, rel_tol=1e-15)
    assert out.kl_term.item() == 1.5
    # loss / lambda = C_hat + beta * kl_term: the documented change of scale
    assert math.isclose(out.loss.item() / lam1, 2.0 + out.beta * 1.5, rel_tol=1e-15)
    out.loss.backward()
    assert math.isclose(d.grad.item(), lam1, rel_tol=1e-15)
    assert k.grad.tolist() == [1.0, 1.0]
    geco.step()
    assert geco.c_ma.item() == 2.0
    assert math.isclose(geco.lambda_, math.exp(0.375 + 0.25), rel_tol=1e-15)


def test_geco_step_needs_a_training_forward():
    geco = GECO(tolerance=1.0)
    with pytest.raises(RuntimeError, match="forward"):
        geco.step()
    geco(t64(2.0), vec(1.0))
    geco.step()
    with pytest.raises(RuntimeError, match="forward"):
        geco.step()  # no forward since the last step
    geco.eval()
    geco(t64(5.0), vec(1.0))  # evaluation batches are not recorded
    with pytest.raises(RuntimeError, match="forward"):
        geco.step()
    assert geco.steps_done == 1


def test_geco_eval_forward_does_not_move_the_multiplier():
    """A training forward, then an eval forward with a wildly different batch: the step
    uses the training batch's constraint (C = 1, lambda = exp(0.01))."""
    geco = GECO(tolerance=1.0, lr=0.01)
    geco(t64(2.0), vec(1.0))
    geco.eval()
    geco(t64(1000.0), vec(1.0))
    geco.train()
    geco.step()
    assert math.isclose(geco.lambda_, math.exp(0.01), rel_tol=1e-15)


def test_geco_bounds_on_the_multiplier():
    """max_lambda 1.5 with C = 100 per step: exp(1) > 1.5, capped at 1.5; min_lambda 0.5
    with C = -100: capped at 0.5. Unbounded, lambda would be e and 1/e."""
    high = GECO(tolerance=0.0, lr=0.01, max_lambda=1.5)
    low = GECO(tolerance=0.0, lr=0.01, min_lambda=0.5)
    for _ in range(3):
        high(t64(100.0), vec(1.0))
        high.step()
        low(t64(-100.0), vec(1.0))
        low.step()
    assert math.isclose(high.lambda_, 1.5, rel_tol=1e-15)
    assert math.isclose(low.lambda_, 0.5, rel_tol=1e-15)


def _optimise(weighting: Weighting, steps: int = 1000) -> float:
    """Minimise the weighted loss of KL = theta^2, distortion (theta - 3)^2 by SGD (lr 0.01)
    from theta = 0, calling step() after each update; return the final distortion."""
    theta = torch.zeros((), dtype=F64, requires_grad=True)
    optimizer = torch.optim.SGD([theta], lr=0.01)
    for _ in range(steps):
        out = weighting((theta - 3.0) ** 2, (theta**2).reshape(1))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        weighting.step()
    return ((theta.detach() - 3.0) ** 2).item()


def test_geco_drives_the_distortion_to_the_tolerance():
    """Toy problem: minimise KL = theta^2 subject to distortion (theta - 3)^2 <= 1, GECO
    with alpha 0.9, lr 0.01. The KKT point is theta = 2 (distortion = tolerance = 1) with
    multiplier lambda = 2 (2 theta + 2 lambda (theta - 3) = 0). Measured after 1000 steps:
    |distortion - 1| = 9e-10, |lambda - 2| = 1.1e-9; bounds 1e-5. Beta(1) instead settles
    at theta = 1.5, distortion 2.25 (the minimum of theta^2 + (theta - 3)^2)."""
    geco = GECO(tolerance=1.0, alpha=0.9, lr=0.01)
    assert abs(_optimise(geco) - 1.0) < 1e-5
    assert abs(geco.lambda_ - 2.0) < 1e-5
    assert abs(_optimise(Beta(1.0)) - 2.25) < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tolerance": math.nan}, "tolerance"),
        ({"tolerance": 1.0, "alpha": 1.0}, "alpha"),
        ({"tolerance": 1.0, "alpha": -0.1}, "alpha"),
        ({"tolerance": 1.0, "lr": 0.0}, "lr"),
        ({"tolerance": 1.0, "init_lambda": 0.0}, "init_lambda"),
        ({"tolerance": 1.0, "min_lambda": 2.0}, "min_lambda"),
        ({"tolerance": 1.0, "max_lambda": 0.5}, "max_lambda"),
    ],
)
def test_geco_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GECO(**kwargs)


@pytest.mark.parametrize(
    "make",
    [lambda: GECO(tolerance=50.0), lambda: Capacity(25.0, steps=10)],
    ids=["GECO", "Capacity"],
)
def test_forward_compiles_without_host_reads(make):
    """The weighting's forward reads no value on the host (its ``beta`` is a tensor):
    ``torch.compile(fullgraph=True)`` traces it and gives the eager loss and beta."""
    distortion, kl = torch.tensor(60.0), torch.tensor([3.0, 1.0])
    eager, compiled = make(), make()
    out = torch.compile(compiled, fullgraph=True)(distortion, kl)
    ref = eager(distortion, kl)
    assert isinstance(out.beta, torch.Tensor)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.beta, ref.beta)
