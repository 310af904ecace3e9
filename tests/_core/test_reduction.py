"""Tests of ``probloss._core.reduction`` (``reduce_loss``, ``check_reduction``,
``check_nan_policy``, ``mask_nan_events``, ``check_value_batch``).

Numbers: per-event losses are seeded random float64 tensors; expected reductions are the
same sums formed independently (``torch.sum`` over the selected events, ``numpy`` for the
count), so "sum" and "mean" must agree to float64 rounding of a sum of at most 60 terms
(bound 1e-15 relative). Gradients of a mean are exactly ``1/count`` (a power of two or a
correctly rounded reciprocal), of a sum exactly 1, of masked events exactly 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from probloss._core.reduction import (
    REDUCTIONS,
    check_nan_policy,
    check_reduction,
    check_value_batch,
    mask_nan_events,
    reduce_loss,
)


def _losses(shape=(3, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen, dtype=torch.float64) * 10 - 3


def test_none_sum_mean():
    loss = _losses((2, 3, 4))
    assert torch.equal(reduce_loss(loss, "none"), loss)
    torch.testing.assert_close(reduce_loss(loss, "sum"), loss.sum(), rtol=1e-15, atol=0.0)
    mean = reduce_loss(loss, "mean")
    assert mean.shape == ()
    torch.testing.assert_close(mean, loss.sum() / 24, rtol=1e-15, atol=0.0)


def test_zero_dim_loss():
    loss = torch.tensor(2.5, dtype=torch.float64)
    for reduction in REDUCTIONS:
        assert reduce_loss(loss, reduction).item() == 2.5


def test_mean_gradient_is_one_over_the_number_of_events():
    loss = _losses((5, 4)).requires_grad_()
    reduce_loss(loss, "mean").backward()
    assert torch.equal(loss.grad, torch.full_like(loss, 1 / 20))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mask_semantics(reduction):
    """Masked events (False) are 0 under 'none', left out of 'sum', and 'mean' divides by
    the number of unmasked events."""
    loss = _losses((3, 4))
    mask = torch.tensor(
        [[True, False, True, True], [False, False, True, True], [True, True, True, False]]
    )
    out = reduce_loss(loss, reduction, mask=mask)
    kept = loss[mask]
    if reduction == "none":
        assert torch.equal(out[mask], kept)
        assert (out[~mask] == 0).all()
    elif reduction == "sum":
        torch.testing.assert_close(out, kept.sum(), rtol=1e-15, atol=0.0)
    else:
        count = int(mask.sum())
        assert count == 8
        torch.testing.assert_close(out, kept.sum() / count, rtol=1e-15, atol=0.0)


def test_mask_broadcasts_over_the_loss():
    """A (N, 1) mask against an (N, K) loss masks whole rows; 'mean' counts K per kept row."""
    loss = _losses((3, 5))
    mask = torch.tensor([[True], [False], [True]])
    out = reduce_loss(loss, "mean", mask=mask)
    torch.testing.assert_close(out, loss[[0, 2]].sum() / 10, rtol=1e-15, atol=0.0)
    assert (reduce_loss(loss, "none", mask=mask)[1] == 0).all()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_masked_event_with_finite_loss_gets_zero_gradient(reduction):
    """A masked event whose loss is finite (the contract: feed it a safe value) contributes
    exactly 0 to the gradient of every input, including a shared parameter; unmasked events
    get 1 (sum) or 1/count (mean)."""
    x = torch.tensor([0.5, 1e10, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss = (x * scale) ** 2  # large but finite at the masked event
    mask = torch.tensor([True, False, True, True])
    reduce_loss(loss, reduction, mask=mask).backward()
    assert x.grad[1] == 0
    weight = 1.0 if reduction == "sum" else 1 / 3
    expected_x = weight * 2 * x.detach() * scale.detach() ** 2
    torch.testing.assert_close(x.grad[mask], expected_x[mask], rtol=1e-15, atol=0.0)
    expected_scale = weight * (2 * x.detach()[mask] ** 2 * scale.detach()).sum()
    torch.testing.assert_close(scale.grad, expected_scale, rtol=1e-15, atol=0.0)


def test_masked_event_with_nan_from_upstream_poisons_the_gradient():
    """Why the contract asks for a safe value: masking the *output* does not stop a NaN
    produced upstream (here ``(nan - loc)^2``) from reaching ``loc``'s gradient as
    ``0 * nan``. (``normal_nll(nan_policy='mask')`` feeds ``loc`` instead of the NaN.)"""
    loc = torch.tensor([0.0, 0.0], requires_grad=True)
    value = torch.tensor([1.0, math.nan])
    loss = (value - loc) ** 2
    reduce_loss(loss, "sum", mask=~torch.isnan(value)).backward()
    assert loc.grad[0] == -2.0
    assert torch.isnan(loc.grad[1])


@pytest.mark.parametrize("bad", ["average", "MEAN", "", "elementwise_mean", None])
def test_bad_reduction(bad):
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none', got"):
        reduce_loss(torch.zeros(2), bad)
    with pytest.raises(ValueError, match=repr(bad).replace("(", r"\(")):
        check_reduction(bad)


def test_check_value_batch_refuses_enlarging_broadcast():
    # the (B, 1) slice mistake: a (64, 1) parameter against a (64,) value batch
    with pytest.raises(ValueError, match=r"atanh_rho of batch shape \(64, 1\).*\(64, 64\)"):
        check_value_batch(torch.Size([64]), atanh_rho=torch.Size([64, 1]))
    # broadcasting up to the value's batch shape is fine
    check_value_batch(torch.Size([64]), loc=torch.Size([64]), scale=torch.Size([]))
    check_value_batch(torch.Size([4, 64]), log_scale=torch.Size([1, 64]))


def test_check_reduction_with_a_narrower_set():
    """A loss without an unreduced form passes its own set; the message lists it."""
    check_reduction("sum", ("mean", "sum"))
    with pytest.raises(ValueError, match=r"^reduction must be 'mean' or 'sum', got 'none'$"):
        check_reduction("none", ("mean", "sum"))


@pytest.mark.parametrize("bad", ["omit", "propagate", "", None])
def test_bad_nan_policy(bad):
    check_nan_policy("raise")
    check_nan_policy("mask")
    with pytest.raises(ValueError, match=r"^nan_policy must be 'raise' or 'mask', got "):
        check_nan_policy(bad)


def test_mask_nan_events_scalar_events():
    """Event shape (): each NaN element is its own event, filled with the location."""
    value = torch.tensor([0.5, math.nan, -1.0])
    loc = torch.tensor([7.0, 8.0, 9.0])
    filled, mask = mask_nan_events(value, loc)
    assert filled.tolist() == [0.5, 8.0, -1.0]
    assert mask.tolist() == [True, False, True]


def test_mask_nan_events_vector_events():
    """Event shape (2,): an event with one NaN coordinate is filled whole (both
    coordinates), the mask has the batch shape; a shared fill broadcasts."""
    value = torch.tensor([[1.0, 2.0], [math.nan, 3.0], [4.0, math.nan], [math.nan, math.nan]])
    filled, mask = mask_nan_events(value, torch.tensor([-1.0, -2.0]), event_dims=1)
    assert mask.tolist() == [True, False, False, False]
    assert filled.tolist() == [[1.0, 2.0], [-1.0, -2.0], [-1.0, -2.0], [-1.0, -2.0]]
    matrix = torch.zeros(3, 2, 2)
    matrix[1, 0, 1] = math.nan
    _, mask = mask_nan_events(matrix, torch.ones(2, 2), event_dims=2)
    assert mask.tolist() == [True, False, True]


def test_mask_nan_events_then_reduce_gives_exact_zero_gradient():
    """The contract of the pair: masked events filled with the (detached) location get
    loss 0 and gradient exactly 0 for every parameter, where the unmasked NaN gave NaN
    (test_masked_event_with_nan_from_upstream_poisons_the_gradient). Expected gradient of
    the mean of (value - loc)^2 over the 2 kept events: -(value - loc) = [-1, 0, -3]."""
    loc = torch.tensor([0.0, 5.0, -1.0], requires_grad=True)
    value, mask = mask_nan_events(torch.tensor([1.0, math.nan, 2.0]), loc)
    assert not value.requires_grad  # the fill is detached
    out = reduce_loss((value - loc) ** 2, "mean", mask=mask)
    out.backward()
    assert out.item() == 5.0  # (1 + 9) / 2
    assert loc.grad.tolist() == [-1.0, 0.0, -3.0]
