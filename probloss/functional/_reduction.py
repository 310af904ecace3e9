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
