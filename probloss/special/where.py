"""Branch selection whose gradient cannot be ``0 * inf``.

``torch.where(c, f(x), g(x))`` back-propagates through both ``f`` and ``g`` at every
element; where the unselected branch has an infinite or NaN derivative the product with the
zero upstream gradient is NaN. Feeding each branch a safe input where it is not selected
(the "double-where" pattern) removes that failure.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def safe_where(
    condition: Tensor,
    x: Tensor,
    if_true: Callable[[Tensor], Tensor],
    if_false: Callable[[Tensor], Tensor],
    *,
    safe_true: float,
    safe_false: float,
) -> Tensor:
    """``where(condition, if_true(x), if_false(x))`` with each branch fed a safe input elsewhere.

    ``if_true`` sees ``x`` where ``condition`` holds and ``safe_true`` elsewhere; ``if_false``
    sees ``x`` where it does not and ``safe_false`` elsewhere. Choose the safe values inside
    each branch's well-behaved domain; then value and gradient are those of the selected
    branch, finite wherever that branch is.

    Args:
        condition: boolean tensor broadcastable with ``x``.
        x: input tensor, shape ``(*)``.
        if_true, if_false: elementwise functions of one tensor.
        safe_true, safe_false: inputs at which the respective branch is finite with a
            finite derivative.

    Returns:
        Tensor of shape ``broadcast(condition, x)``.

    Example:
        >>> x = torch.tensor([0.0, 4.0], requires_grad=True)
        >>> y = safe_where(x > 1, x, torch.log, lambda t: t, safe_true=1.0, safe_false=0.0)
        >>> y.sum().backward(); x.grad
        tensor([1.0000, 0.2500])
    """
    x_true = torch.where(condition, x, safe_true)
    x_false = torch.where(condition, safe_false, x)
    return torch.where(condition, if_true(x_true), if_false(x_false))
