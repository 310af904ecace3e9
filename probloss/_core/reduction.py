"""``reduction`` and ``nan_policy`` of the losses: checks, the reduction, NaN masking.

A loss is one value per event (event dimensions already reduced); ``reduction`` averages
or sums over events, never over the scalars of the target. ``nan_policy="mask"`` ignores
events with a NaN coordinate (:func:`mask_nan_events` then :func:`reduce_loss` with the
mask); ``"raise"`` makes NaN a ValueError when validating.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .validation import check_choice

REDUCTIONS = ("mean", "sum", "none")
NAN_POLICIES = ("raise", "mask")


def check_reduction(reduction: str, allowed: tuple[str, ...] = REDUCTIONS) -> None:
    """Raise ValueError unless ``reduction`` is one of ``allowed`` (``"mean"``, ``"sum"``,
    ``"none"`` by default; a loss that has no unreduced form passes ``("mean", "sum")``)."""
    check_choice("reduction", reduction, allowed)


def check_nan_policy(nan_policy: str) -> None:
    """Raise ValueError unless ``nan_policy`` is ``"raise"`` or ``"mask"``."""
    check_choice("nan_policy", nan_policy, NAN_POLICIES)


def mask_nan_events(value: Tensor, fill: Tensor, event_dims: int = 0) -> tuple[Tensor, Tensor]:
    """``(value, mask)``: events of ``value`` with a NaN coordinate replaced by ``fill``.

    The fill, the one rule for every loss: the location of the model's (first) component
    at that event, detached here: ``loc`` for a normal or bivariate normal,
    ``loc[..., 0, :]`` for a mixture, the mean for a distribution with no component
    locations. There the residual of that component is 0, so the event's loss is finite
    for finite parameters and its zero weight in :func:`reduce_loss` zeroes its gradient
    exactly (a NaN left in would reach the parameters as ``0 * NaN``).

    Args:
        value: targets, shape ``(*, *event)`` with ``event_dims`` event dimensions.
        fill: broadcastable to ``value``.
        event_dims: number of trailing event dimensions of ``value``.

    Returns:
        ``value`` with masked events filled (the broadcast shape of ``value`` and ``fill``)
        and ``mask`` of shape ``(*)``, ``False`` at the masked events.
    """
    nan = torch.isnan(value)
    missing = nan.flatten(-event_dims).any(-1) if event_dims else nan
    where = missing.reshape(missing.shape + (1,) * event_dims)
    return torch.where(where, fill.detach(), value), ~missing


def reduce_loss(loss: Tensor, reduction: str, *, mask: Tensor | None = None) -> Tensor:
    """Reduce one loss value per event.

    Args:
        loss: per-event losses, shape ``(*)`` (event dimensions already reduced).
        reduction: ``"none"`` returns ``loss`` (masked events set to 0), ``"sum"`` sums it,
            ``"mean"`` averages over events: the sum divided by the number of (unmasked)
            events, never by the number of scalars in the target. Like ``torch.mean`` of
            an empty tensor, the mean over zero events (all masked) is NaN.
        mask: optional boolean tensor of shape ``(*)``; ``False`` marks events to ignore.
            Their loss must already be finite (feed them a safe value,
            :func:`mask_nan_events`), so that the zero weight also zeroes their gradient.

    Returns:
        A scalar for ``"mean"`` / ``"sum"``, else a tensor of shape ``(*)``.
    """
    check_reduction(reduction)
    if mask is not None:
        loss = torch.where(mask, loss, 0.0)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    count = loss.numel() if mask is None else mask.expand(loss.shape).sum()
    return total / count


def check_value_batch(
    value_batch: torch.Size, event: str = "", **param_batches: torch.Size
) -> None:
    """In a reduced loss, raise ValueError if a parameter would enlarge the value's batch shape.

    ``normal_nll(value of shape (8,), loc of shape (8, 1))`` broadcasts to an (8, 8) matrix of
    every target against every prediction, and its mean is a finite, silently wrong loss (the
    classic ``out[:, 4:5]`` slice where ``out[:, 4]`` was meant). Unreduced log densities keep
    torch's broadcasting; a reduced loss refuses it. Parameters may still broadcast *up to*
    the value's batch shape (a shared scale of shape ``()`` or ``(1,)`` is fine).

    Args:
        value_batch: the batch shape of the value (its shape less the event dimensions).
        event: the event shape in words, for the message (e.g. ``" (event dimension 2 last)"``).
        **param_batches: each parameter's batch shape, by argument name.
    """
    for name, batch in param_batches.items():
        try:
            full = torch.broadcast_shapes(value_batch, batch)
        except RuntimeError:
            continue  # shape errors are reported by the caller's own broadcast check
        if full != value_batch:
            raise ValueError(
                f"{name} of batch shape {tuple(batch)} would broadcast the value's batch shape "
                f"{tuple(value_batch)}{event} to {tuple(full)}, and a reduced loss would then "
                f"average every value against every parameter; give {name} the value's batch "
                f"shape (e.g. out[:, 4] rather than out[:, 4:5]), or use reduction='none' to "
                f"broadcast on purpose"
            )
