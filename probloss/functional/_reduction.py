"""Reductions of per-event losses, with optional masking of events (NaN targets)."""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    """Raise ValueError unless ``reduction`` is ``"mean"``, ``"sum"`` or ``"none"``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def reduce_loss(loss: Tensor, reduction: str, *, mask: Tensor | None = None) -> Tensor:
    """Reduce one loss value per event.

    Args:
        loss: per-event losses, shape ``(*)`` (event dimensions already reduced).
        reduction: ``"none"`` returns ``loss`` (masked events set to 0), ``"sum"`` sums it,
            ``"mean"`` averages over events: the sum divided by the number of (unmasked)
            events, never by the number of scalars in the target. Like ``torch.mean`` of
            an empty tensor, the mean over zero events (all masked) is NaN.
        mask: optional boolean tensor of shape ``(*)``; ``False`` marks events to ignore.
            Their loss must already be finite (feed them a safe value), so that the zero
            weight also zeroes their gradient.

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
