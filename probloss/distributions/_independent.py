"""``Independent`` that also works on an empty batch (what the heads return)."""

from __future__ import annotations

from torch import Tensor
from torch.distributions import Independent


class EventIndependent(Independent):
    """torch's ``Independent(base, n)`` whose ``log_prob`` and ``entropy`` sum the last ``n``
    dimensions with ``sum``: torch's reshape to ``(*batch, -1)`` fails on an empty batch
    ("cannot reshape tensor of 0 elements"). Same constructor and meaning as torch's."""

    def _event_sum(self, t: Tensor) -> Tensor:
        n = self.reinterpreted_batch_ndims
        return t.sum(tuple(range(-n, 0))) if n else t  # log p(x) = sum over the event dims

    def log_prob(self, value: Tensor) -> Tensor:
        return self._event_sum(self.base_dist.log_prob(value))

    def entropy(self) -> Tensor:
        return self._event_sum(self.base_dist.entropy())
