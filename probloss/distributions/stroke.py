r"""Sketch points (stroke-5) as one distribution: pen offsets and pen state together."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution, constraints

from .._core.dtype import promote_float_tensors, upcast
from .._core.validation import distribution_validate_args, set_validation, validate_sample
from ..functional.mixture import bivariate_normal_mixture_log_prob
from ..functional.mixture.sampling import (
    _check_temperature,
    _component_index,
    bivariate_normal_mixture_sample,
)
from ._mixture_base import MATRIX, VECTOR, expand_parameters
from .mixture import BivariateNormalMixture


class _StrokePoints(constraints.Constraint):
    """Stroke points ``(*, 2 + P)``: two offsets (not NaN), then a one-hot pen state."""

    is_discrete = False
    event_dim = 1

    def __init__(self, pen_states: int) -> None:
        self.pen_states = pen_states
        super().__init__()

    def check(self, value: Tensor) -> Tensor:
        offsets, pen = value[..., :2], value[..., 2:]
        one_hot = ((pen == 0) | (pen == 1)).all(-1) & (pen.sum(-1) == 1)
        return (offsets == offsets).all(-1) & one_hot  # x == x is False only for NaN

    def __repr__(self) -> str:
        return (
            f"StrokePoints(2 real offsets, then a one-hot pen state over {self.pen_states} "
            "states: entries 0 or 1, exactly one 1)"
        )


class StrokeMixture(Distribution):
    r"""A whole sketch point: a bivariate normal mixture over the pen offsets times a
    categorical over the pen states (sketch-rnn, Ha & Eck 2017, arXiv:1704.03477).

    A point is ``(dx, dy, p_1, ..., p_P)`` (stroke-5 for ``P = 3``: pen down, pen up, end
    of sketch), the offsets followed by the pen state one-hot. Offsets and pen state are
    independent given the parameters:

    .. math::
        \log p(x) = \operatorname{logsumexp}_k\big(\log\operatorname{softmax}(\ell)_k
            + \log\mathcal N((dx, dy) \mid \mu_k, \sigma_k, \rho_k)\big)
            + \sum_{j=1}^P p_j \log\operatorname{softmax}(q)_j

    with :math:`\rho_k = \tanh a_k` and :math:`q` the pen logits: sketch-rnn's
    reconstruction loss :math:`L_s + L_p` of one point is :math:`-\log p(x)`. The offset
    term is :func:`~probloss.functional.mixture.bivariate_normal_mixture_log_prob` (the
    :class:`~probloss.distributions.BivariateNormalMixture` of the offsets); the pen term
    is ``log_softmax`` of the pen logits read at the one-hot's state (a gather, so a pen
    logit of ``-inf`` for another state gives no ``0 * -inf``). Half-precision parameters
    give a float32 ``log_prob``; samples and moments are computed in float32 and returned
    in the parameters' dtype.

    Summaries, each ``(*batch_shape, 2 + P)``:

    * ``mean``: the exact mean of the point, the offset mixture's mean followed by the pen
      probabilities :math:`\operatorname{softmax}(q)` (the mean of a one-hot), so its pen
      part is **not** one-hot;
    * ``variance``: the offset mixture's variances, then :math:`\pi_j(1 - \pi_j)`;
    * ``mode``: the mean of the most probable offset component, then the one-hot of the
      most probable pen state (what ``sample_with_temperature(0)`` returns).

    :meth:`sample_with_temperature` applies one temperature :math:`\tau` to both parts as
    sketch-rnn does: offset weights :math:`\operatorname{softmax}(\ell/\tau)`, covariances
    :math:`\tau\Sigma_k` (correlations unchanged, as in
    :class:`~probloss.distributions.BivariateNormalMixture`), pen probabilities
    :math:`\operatorname{softmax}(q/\tau)`; ``tau = 0`` is the ``mode``. No ``rsample``
    (the component and the pen state are discrete); :meth:`sample` runs under
    ``torch.no_grad()``.

    When validating (``validate_args``, CPU tensors by default), ``log_prob`` refuses a
    value whose pen part is not one-hot (entries 0 or 1, exactly one 1) or whose offsets
    are NaN. Without validation the pen state is read as the position of the largest pen
    entry.

    Args:
        logits: offset mixture logits :math:`\ell`, shape ``(*, K)``.
        loc: component means, shape ``(*, K, 2)``.
        log_scale: component log standard deviations, shape ``(*, K, 2)``.
        atanh_rho: :math:`a_k = \operatorname{atanh}\rho_k`, shape ``(*, K)``.
        pen_logits: pen-state logits :math:`q`, shape ``(*, P)``, ``P >= 2``.
        validate_args: as in ``torch.distributions``.

    ``batch_shape`` is the broadcast ``(*)``, ``event_shape`` is ``(2 + P,)``.

    Example:
        >>> d = StrokeMixture(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2),
        ...                   torch.zeros(1), torch.tensor([0.0, 0.0, -50.0]))
        >>> d.log_prob(torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]]))
        tensor([ -2.5310, -52.5310])
        >>> d.mode
        tensor([0., 0., 1., 0., 0.])
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "logits": VECTOR,
        "loc": MATRIX,
        "log_scale": MATRIX,
        "atanh_rho": VECTOR,
        "pen_logits": VECTOR,
    }
    has_rsample = False

    def __init__(
        self,
        logits: Tensor,
        loc: Tensor,
        log_scale: Tensor,
        atanh_rho: Tensor,
        pen_logits: Tensor,
        validate_args: bool | None = None,
    ) -> None:
        # one dtype for both parts (half stays half), then the offsets' shape checks
        params = promote_float_tensors(
            logits=logits, loc=loc, log_scale=log_scale, atanh_rho=atanh_rho, pen_logits=pen_logits
        )
        pen_logits = params[-1]
        if pen_logits.dim() < 1 or pen_logits.shape[-1] < 2:
            raise ValueError(
                f"pen_logits must have shape (*, P) with P >= 2 pen states; got shape "
                f"{tuple(pen_logits.shape)}"
            )
        offsets = BivariateNormalMixture(*params[:-1], validate_args=False)
        try:
            batch = torch.broadcast_shapes(offsets.batch_shape, pen_logits.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"shapes do not broadcast: the offsets' batch shape {tuple(offsets.batch_shape)} "
                f"(logits, loc, log_scale, atanh_rho) and pen_logits {tuple(pen_logits.shape)} "
                "(batch shape, then P)"
            ) from None
        offsets = offsets.expand(batch)
        for name in BivariateNormalMixture.arg_constraints:
            setattr(self, name, getattr(offsets, name))
        self.pen_logits = pen_logits.expand((*batch, pen_logits.shape[-1]))
        validate_args = distribution_validate_args(validate_args, *params)
        super().__init__(batch, torch.Size((2 + self.pen_states,)), validate_args=False)
        set_validation(self, validate_args)  # torch's parameter check, faster

    def expand(self, batch_shape: torch.Size, _instance=None) -> StrokeMixture:
        return expand_parameters(self, batch_shape, _instance)

    @property
    def pen_states(self) -> int:
        """The number of pen states ``P``."""
        return self.pen_logits.shape[-1]

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def support(self) -> constraints.Constraint:
        return _StrokePoints(self.pen_states)

    @property
    def offsets(self) -> BivariateNormalMixture:
        """The offsets' mixture alone (event ``(2,)``), batch ``(*)``."""
        return BivariateNormalMixture(
            self.logits, self.loc, self.log_scale, self.atanh_rho, validate_args=False
        )

    @property
    def pen(self) -> Categorical:
        """The pen state alone, ``torch.distributions.Categorical(logits=pen_logits)``."""
        return Categorical(logits=self.pen_logits, validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        """``log p(value)`` for points ``(*, 2 + P)``; shape ``(*)`` broadcast with the batch."""
        if value.dim() < 1 or value.shape[-1] != 2 + self.pen_states:
            raise ValueError(
                f"value must have shape (*, 2 + P) = (*, {2 + self.pen_states}): offsets, then "
                f"the one-hot pen state; got shape {tuple(value.shape)}"
            )
        validate_sample(self, value)
        offsets = bivariate_normal_mixture_log_prob(
            value[..., :2], self.logits, self.loc, self.log_scale, self.atanh_rho
        )
        log_pen = torch.log_softmax(upcast(self.pen_logits), -1)  # log softmax(q)_j, (*, P)
        state = value[..., 2:].argmax(-1, keepdim=True)  # j with p_j = 1 (one-hot)
        shape = torch.broadcast_shapes(state.shape[:-1], log_pen.shape[:-1])
        pen = log_pen.expand((*shape, self.pen_states)).gather(-1, state.expand((*shape, 1)))
        return offsets + pen.squeeze(-1)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Points ``(*sample_shape, *batch_shape, 2 + P)`` from torch's global RNG."""
        return self.sample_with_temperature(1.0, sample_shape)

    def sample_with_temperature(
        self,
        temperature: float,
        sample_shape: torch.Size | tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Points drawn at temperature ``tau`` (``0``: the ``mode``), see the class docstring;
        offsets first, then the pen state, both from ``generator``."""
        tau = _check_temperature(temperature)
        with torch.no_grad():
            offsets = bivariate_normal_mixture_sample(
                self.logits,
                self.loc,
                self.log_scale,
                self.atanh_rho,
                temperature=tau,
                sample_shape=sample_shape,
                generator=generator,
            )
            state = _component_index(
                upcast(self.pen_logits), tau, torch.Size(sample_shape), generator
            )
            return torch.cat((offsets, self._one_hot(state)), -1)

    def _one_hot(self, state: Tensor) -> Tensor:
        # a comparison, not F.one_hot: one_hot checks its input's range on the host
        states = torch.arange(self.pen_states, device=state.device)
        return (state.unsqueeze(-1) == states).to(self.loc.dtype)

    @property
    def mean(self) -> Tensor:
        """The offsets' mixture mean, then the pen probabilities ``softmax(pen_logits)``."""
        probs = torch.softmax(upcast(self.pen_logits), -1).to(self.loc.dtype)
        return torch.cat((self.offsets.mean, probs), -1)

    @property
    def variance(self) -> Tensor:
        """The offsets' mixture variances, then ``pi_j (1 - pi_j)`` of the pen states."""
        probs = torch.softmax(upcast(self.pen_logits), -1)
        pen = (probs * (1.0 - probs)).to(self.loc.dtype)
        return torch.cat((self.offsets.variance, pen), -1)

    @property
    def mode(self) -> Tensor:
        """The most probable component's mean, then the most probable pen state (one-hot)."""
        return torch.cat((self.offsets.mode, self._one_hot(self.pen_logits.argmax(-1))), -1)
