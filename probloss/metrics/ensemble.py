r"""The CRPS of an ensemble (a set of draws), in ``O(M log M)`` by sorting.

.. math::
    \widehat{\operatorname{CRPS}}_\kappa = \frac1M \sum_i |x_i - y|
        - \frac{1}{2 M (M - \kappa)} \sum_{i,j} |x_i - x_j|

:math:`\kappa = 1` is the fair (unbiased) estimator of the CRPS of the distribution the
draws come from (Ferro 2014; scoringrules' ``crps_ensemble(..., estimator="fair")``),
:math:`\kappa = 0` the CRPS of the empirical distribution of the draws (``"nrg"``;
properscoring's ``crps_ensemble``). Both are written here as a sum of non-negative terms,
one per gap between consecutive sorted draws :math:`x_{(i)} < x_{(i+1)}`: with
:math:`L_i` / :math:`R_i` the parts of the gap left / right of :math:`y`,

.. math::
    \widehat{\operatorname{CRPS}}_\kappa = \sum_{i=1}^{M-1} \frac{L_i\, i (i - \kappa)
        + R_i\, (M - i)(M - i - \kappa)}{M (M - \kappa)}
        + (x_{(1)} - y)^+ + (y - x_{(M)})^+

(a gap is straddled by :math:`i (M - i)` pairs and lies below :math:`y` for
:math:`i` of the draws: the two sums' coefficients combine into
:math:`\big((i/M)^2 - i(M - i)/(M^2 (M - \kappa))\big) = i (i - \kappa)/(M (M - \kappa))
\ge 0`), so no term cancels another: the fair score of two draws is exactly 0 for a target
between them, where the two-sum form subtracts two equal numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._core.dtype import as_loss_tensors
from .._core.validation import check_choice

__all__ = ["crps_ensemble"]

_UNIT = 0.125  # a power of two: scaling by it is exact


def crps_ensemble(value: Tensor, samples: Tensor, *, fair: bool = True) -> Tensor:
    r"""CRPS of the ensemble ``samples`` at ``value``, by sorting (module docstring).

    .. math::
        \widehat{\operatorname{CRPS}} = \frac1M \sum_i |x_i - y|
            - \frac{1}{2 M (M - \kappa)} \sum_{i,j} |x_i - x_j|

    ``O(M log M)`` per event instead of the ``O(M^2)`` pairs, as a sum of non-negative
    terms over the gaps between sorted draws (module docstring): nothing cancels, so the
    score is accurate relative to itself (draws of ``1e30 + O(1)`` keep their ``O(1)``
    spread; two draws around the target score exactly 0), and in units of 8 (exact) no
    partial sum overflows unless the score does. Differentiable in ``value`` and
    ``samples`` (the sort is a permutation).

    Args:
        value: observations :math:`y`, shape ``(*)``.
        samples: draws :math:`x_i`, shape ``(M, *)``: the sample dimension first, as
            ``Distribution.sample((M,))`` returns them; ``M >= 2`` for ``fair=True``.
        fair: ``True`` (default) divides the spread term by ``M (M - 1)``, the unbiased
            estimator of the CRPS of the distribution sampled; ``False`` by ``M^2``, the
            CRPS of the draws' own empirical distribution.

    Returns:
        Tensor of shape ``(*)``, one score per event (unreduced); float32 for half inputs.

    Raises:
        ValueError: ``samples`` is not ``(M, *)`` with ``*`` broadcastable to ``value``'s
            shape, ``M < 2`` with ``fair=True``, or ``fair`` not a bool.

    Example:
        >>> draws = torch.tensor([[0.0], [1.0], [2.0]])  # M = 3, one event
        >>> crps_ensemble(torch.tensor([1.0]), draws)  # 2/3 - (2 (1 + 1 + 2)) / (2 * 3 * 2)
        tensor([0.])
        >>> crps_ensemble(torch.tensor([1.0]), draws, fair=False)  # 2/3 - 8 / 18
        tensor([0.2222])
    """
    check_choice("fair", fair, (True, False))
    value, samples = as_loss_tensors(value=value, samples=samples)
    if samples.dim() == 0:
        raise ValueError("samples must have the sample dimension first, shape (M, *); got ()")
    m = samples.shape[0]
    if m < 1 or (fair and m < 2):
        raise ValueError(
            f"samples of shape {tuple(samples.shape)} has M = {m} draws; the "
            f"{'fair' if fair else 'plain'} estimator needs at least {2 if fair else 1}"
        )
    try:
        batch = torch.broadcast_shapes(value.shape, samples.shape[1:])
    except RuntimeError:
        raise ValueError(
            f"samples of shape {tuple(samples.shape)} (M, *) and value of shape "
            f"{tuple(value.shape)} do not broadcast"
        ) from None
    # the draws' event shape right-aligned against the batch (new leading 1s after M)
    x = samples.reshape((m, *(1,) * (len(batch) - samples.dim() + 1), *samples.shape[1:]))
    # everything in units of 8 (exact), multiplied back last: |x - y| <= 2 max, and the
    # sorted sum's terms are divided by M (M - kappa) first, so no partial sum overflows
    # unless the score does
    x, y = x.expand((m, *batch)) * _UNIT, value * _UNIT
    ordered = x.sort(0).values
    low, high = ordered[:-1], ordered[1:]  # the M - 1 gaps
    # each clamp at 0 is exact, not a floor: the length of an interval's part on one side
    # of y is max(., 0) (0 for a gap wholly on the other side; its gradient there is 0 too)
    left = (torch.minimum(high, y) - low).clamp(min=0.0)  # L_i: the part below y
    right = (high - torch.maximum(low, y)).clamp(min=0.0)  # R_i: the part above y
    i = torch.arange(1, m, dtype=x.dtype, device=x.device).reshape((m - 1, *(1,) * len(batch)))
    kappa = 1.0 if fair else 0.0
    norm = m * (m - kappa)
    gaps = (left * (i * (i - kappa) / norm) + right * ((m - i) * (m - i - kappa) / norm)).sum(0)
    # the stretches between y and the draws when y lies outside them (exact lengths, as above)
    outside = (ordered[0] - y).clamp(min=0.0) + (y - ordered[-1]).clamp(min=0.0)
    return (gaps + outside) / _UNIT
