"""Signed quarter-logs: real numbers carried as ``S e^{4 (L + E)}`` with ``L + E`` a
double-float, so that sums of products whose terms overflow keep their exact sign and
magnitude (the fallback of :mod:`._second_moments`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...special import log1mexp

# A real number x is carried as (L, E, S) with x = S e^{4 (L + E)}: L + E = log|x| / 4 as a
# double-float (E the low part, |E| <= ulp(L) / 2), S = sign(x); zero is (-inf, 0, 0).


def _two_sum(a: Tensor, b) -> tuple[Tensor, Tensor]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e = a + b`` exactly (Knuth's TwoSum);
    ``e = 0`` where ``s`` is not finite (an infinite exponent has no low part)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, torch.where(torch.isfinite(s), e, 0.0)


def _qadd(*terms) -> tuple[Tensor, Tensor]:
    """The double-float sum of ``(L, E)`` pairs (``E`` may be 0.0: an exact float), i.e.
    the quarter-log of a product. Each step is a TwoSum of the high parts, whose error
    joins the low parts, then renormalised (``|E| <= ulp(L) / 2``, so that pairs compare
    by ``L`` first); exact unless the sum needs more than 106 bits."""
    h, e = terms[0]
    for h2, e2 in terms[1:]:
        h, err = _two_sum(h, h2)
        h, e = _two_sum(h, (err + e) + e2)  # |err + e + e2| << |h|: fast renormalisation
    return h, e


def _qlog(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(log|x| / 4, 0, sign x)``; 0 is ``(-inf, 0, 0)``."""
    return torch.log(x.abs()) / 4.0, torch.zeros_like(x), torch.sign(x)


def _qzero(L: Tensor, E: Tensor, S: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(L, E, S)`` where ``keep``, else exactly zero (``L`` replaced: no ``-inf + inf``)."""
    return torch.where(keep, L, -math.inf), torch.where(keep, E, 0.0), torch.where(keep, S, 0.0)


def _qlse(L: Tensor, E: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``log(sum e^{4 (L + E)}) / 4`` along ``dim``: the shift by the (finite) largest pair
    keeps every ``4 (L + E - top) <= 0`` (``L - top`` exact where it matters: Sterbenz), so
    nothing overflows although ``4 L`` may."""
    top = L.amax(dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)  # all -inf: the sum is 0, log -inf
    top_e = torch.where(L == top, E, -math.inf).amax(dim, keepdim=True)
    top_e = torch.where(torch.isfinite(top_e), top_e, 0.0)
    d = (L - top) + (E - top_e)
    log_sum = torch.log(torch.exp(4.0 * d).sum(dim, keepdim=True)) / 4.0
    h, e = _qadd((top, top_e), (log_sum, 0.0))
    return h.squeeze(dim), e.squeeze(dim)


def _qsum(L: Tensor, E: Tensor, S: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Signed sum along ``dim``: positive and negative parts by :func:`_qlse`, then
    ``e^{4P} - e^{4N} = +-e^{4 max} (1 - e^{-4 |P - N|})`` (``log1mexp``), with ``P - N``
    formed from the double-floats; an exact cancellation (or no term) is 0."""
    pos, pos_e = _qlse(torch.where(S > 0, L, -math.inf), torch.where(S > 0, E, 0.0), dim)
    neg, neg_e = _qlse(torch.where(S < 0, L, -math.inf), torch.where(S < 0, E, 0.0), dim)
    gap = (pos - neg) + (pos_e - neg_e)  # NaN where both are -inf (or both +inf)
    alive = (gap != 0) & ~torch.isnan(gap)
    up = gap > 0
    size = torch.where(alive, gap.abs(), 1.0)
    h, e = _qadd(
        (torch.where(up, pos, neg), torch.where(up, pos_e, neg_e)),
        (log1mexp(4.0 * size) / 4.0, 0.0),
    )
    return _qzero(h, e, torch.where(up, 1.0, -1.0), alive)


def _qvalue(L: Tensor, E: Tensor, S: Tensor) -> Tensor:
    """``S e^{4 (L + E)}`` (``+-inf`` beyond the range; 0 for ``S = 0``)."""
    x = torch.where(S == 0, 0.0, L + E)
    return torch.where(S == 0, 0.0, S * torch.exp(4.0 * x))
