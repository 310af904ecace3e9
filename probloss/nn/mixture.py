r"""Mixture density networks (Bishop 1994): a head from features to a mixture, and its loss.

:class:`MixtureDensityHead` maps features ``(*, in_features)`` through one linear layer to
the parameters of a mixture of ``K`` Gaussians over ``D``-dimensional targets and returns
the mixture as a distribution, so that ``loss = -head(h).log_prob(y).mean()``.
:class:`MixtureNLLLoss` is that loss as a module, ``MixtureNLLLoss()(y, head(h))``, with
``reduction`` and ``nan_policy``.

.. math::
    p(y \mid h) = \sum_{k=1}^K \pi_k(h)\, \mathcal N\big(y \mid \mu_k(h), \Sigma_k(h)\big),
    \qquad \pi(h) = \operatorname{softmax}(\text{logits}(h))

The network never forms :math:`\pi_k` or :math:`\sigma_k` by ``softmax`` / ``exp`` and then
takes logs: it predicts mixture ``logits`` and log-scales, and the mixtures evaluate
:math:`\log p` by ``log_softmax`` plus a log-sum-exp over components, which stays finite
where the naive product of per-dimension pdfs underflows to ``log 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from .._core.reduction import (
    check_nan_policy,
    check_reduction,
    check_value_batch,
    mask_nan_events,
    reduce_loss,
)
from .._core.validation import (
    check_choice,
    check_not_nan,
    check_renamed_keywords,
    should_validate,
)
from ..distributions.mixture import (
    BivariateNormalMixture,
    MultivariateNormalMixture,
    NormalMixture,
)
from ..distributions.stroke import StrokeMixture
from ..functional.multivariate import default_min_scale, scale_tril_from_raw
from ._options import ShowOptions, check_init_scale, check_number, check_size
from .heads import _log_scale, _raw_for_scale

COMPONENTS = ("normal", "bivariate", "full")
_REMOVED = {
    "MixtureDensityOutput": (
        "probloss.nn.MixtureDensityOutput was removed: MixtureDensityHead(..., pen_states=P) "
        "now returns one distribution, a probloss.distributions.StrokeMixture, over the whole "
        "point (dx, dy, one-hot pen state): loss = -out.log_prob(points).mean() or "
        "MixtureNLLLoss()(points, out); out.offsets and out.pen are the two parts (what "
        "out.mixture and out.pen were)"
    ),
}


def __getattr__(name: str) -> object:
    if name in _REMOVED:
        raise AttributeError(_REMOVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class MixtureDensityHead(ShowOptions, nn.Module):
    r"""Features ``(*, in_features)`` to a mixture of ``num_components`` Gaussians.

    One linear layer predicts, per input, the mixture ``logits`` (``K``), the component
    means (``K x D``) and the component scales, in one of three forms (``component``):

    * ``"normal"``: diagonal covariances, ``K x D`` raw scales; returns a
      :class:`~probloss.distributions.NormalMixture` (batch shape ``(*)``, event shape
      ``(D,)``).
    * ``"bivariate"``: ``D = 2`` with a correlation per component (Graves 2013 eqs. 23-25,
      sketch-rnn), ``K x 2`` raw scales and ``K`` values of ``atanh_rho``; returns a
      :class:`~probloss.distributions.BivariateNormalMixture`. ``rho = tanh`` of the
      output is never formed, so a saturated correlation cannot make ``1 - rho^2`` round
      to 0.
    * ``"full"``: a full covariance :math:`L_k L_k^\top` per component, ``K x D(D+1)/2``
      raw entries of :math:`L_k` through
      :func:`~probloss.functional.multivariate.scale_tril_from_raw`; returns a
      :class:`~probloss.distributions.MultivariateNormalMixture`, whose ``log_prob`` is
      :func:`~probloss.functional.mixture.multivariate_normal_mixture_log_prob` (one
      triangular solve per component, an overflow-safe squared norm, no Cholesky
      decomposition and so no "not positive definite").

    With ``pen_states = P > 0`` (sketch-style data, Ha & Eck 2017; ``component`` must be
    ``"bivariate"``) the head also predicts ``P`` pen-state logits and returns a
    :class:`~probloss.distributions.StrokeMixture` over the whole point
    ``(dx, dy, p_1, ..., p_P)`` (stroke-5 for ``P = 3``), event shape ``(2 + P,)``: the
    sketch-rnn reconstruction loss is ``-head(h).log_prob(points).mean()``.

    Whatever the options, the head returns one kind of thing: a probloss distribution over
    the whole target point with ``log_prob`` (one value per point), ``sample``,
    ``sample_with_temperature``, ``mean``, ``variance`` and ``mode``.

    Scales: :math:`\sigma = \operatorname{softplus}(r) + m` with ``m = min_scale`` (the
    diagonal of :math:`L_k` for ``"full"``), a soft floor that keeps its gradient. For
    ``"normal"`` and ``"bivariate"`` it is formed as a log-scale ``log(softplus(r) + m)``
    (via :func:`~probloss.special.log_softplus`, exact for every ``r``): for
    :math:`r \to -\infty` the log-scale is :math:`\approx r` (or :math:`\log m`), never
    ``log 0``; ``m`` defaults to 0. For ``"full"`` a zero diagonal would make the
    triangular solve divide by 0, so ``m`` must be positive and defaults to
    :func:`~probloss.functional.multivariate.default_min_scale` of float32 (``3.45e-4``,
    in the units of the target).

    Initialisation: the raw-scale biases (the diagonal ones for ``"full"``) start at
    ``softplus_inverse(init_scale - m)`` and the ``atanh_rho`` and off-diagonal biases at 0,
    so that with zero features every component has scale ``init_scale`` and no
    correlation; the mixture-logit and pen-logit biases start at 0 (equal weights).
    Weights, and the biases of the means, keep ``nn.Linear``'s default initialisation
    (uniform in ``+-1/sqrt(in_features)``): the means then differ between components from
    the start, which breaks the symmetry between components (equal initial means get equal
    gradients and may never separate). Scale the targets to unit order (or choose
    ``init_scale`` in their units) so that these initial means and scales are sensible.

    Empty batches: features of shape ``(0, in_features)`` give a distribution of batch
    shape ``(0,)`` whose ``log_prob``, samples and moments are empty.

    Dtypes: the head follows its parameters (``head.to(torch.bfloat16)``). The
    distribution's ``log_prob`` of half-precision parameters is computed and returned in
    float32 (docs/numerics.md, half precision); samples, ``mean``, ``variance`` and
    ``mode`` are computed in float32 and returned in the parameters' dtype (values of the
    random variable, like the target).

    Output layout of ``self.linear`` (the last dimension): ``logits`` (``K``), ``loc``
    (``K*D``, component-major), scale parameters (``K*D``, ``K*2 + K`` for ``"bivariate"``
    as scales then ``atanh_rho``, or ``K*D(D+1)/2`` for ``"full"``), then ``pen_states``
    pen logits.

    Args:
        in_features: size of the last dimension of the features.
        out_features: the target dimension ``D`` (must be 2 for ``"bivariate"``).
        num_components: the number of mixture components ``K``.
        component: ``"normal"``, ``"bivariate"`` or ``"full"`` (see above).
        init_scale: the initial component scale, ``> min_scale``, in the units of the target.
        min_scale: soft floor ``m`` on the scales (see above); ``None`` for the default.
        pen_states: number of pen states ``P``: 0 for none, else at least 2.

    Raises:
        ValueError: an unknown ``component``, ``out_features != 2`` for ``"bivariate"``, a
            size that is not a positive int, ``pen_states`` not 0 or >= 2 or with a
            component other than ``"bivariate"``, ``min_scale`` negative (or 0 for
            ``"full"``), ``init_scale <= min_scale``.
        TypeError: ``min_diag=`` (renamed ``min_scale``, same units).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> head = MixtureDensityHead(16, 1, 5, init_scale=0.5)
        >>> mixture = head(torch.zeros(8, 16))
        >>> mixture.batch_shape, mixture.event_shape
        (torch.Size([8]), torch.Size([1]))
        >>> loss = -mixture.log_prob(torch.randn(8, 1)).mean()
        >>> sketch = MixtureDensityHead(16, 2, 20, component="bivariate", pen_states=3)
        >>> points = sketch(torch.zeros(8, 16))
        >>> type(points).__name__, points.event_shape, points.sample().shape
        ('StrokeMixture', torch.Size([5]), torch.Size([8, 5]))
    """

    _shown = (
        "in_features",
        "out_features",
        "num_components",
        "component",
        "min_scale",
        "pen_states",
    )

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_components: int,
        *,
        component: str = "normal",
        init_scale: float = 1.0,
        min_scale: float | None = None,
        pen_states: int = 0,
        **renamed: object,
    ) -> None:
        super().__init__()
        check_renamed_keywords("MixtureDensityHead", renamed, {"min_diag": "min_scale"})
        check_choice("component", component, COMPONENTS)
        k = check_size("num_components", num_components)
        d = check_size("out_features", out_features)
        self.in_features = check_size("in_features", in_features)
        if component == "bivariate" and out_features != 2:
            raise ValueError(
                f"component='bivariate' needs out_features == 2, got {out_features}; "
                "use 'normal' (diagonal) or 'full' for other sizes"
            )
        if check_size("pen_states", pen_states, low=0) and (
            pen_states < 2 or component != "bivariate"
        ):
            raise ValueError(
                f"pen_states must be 0 (none) or an int >= 2 with component='bivariate' "
                f"(pen offsets (dx, dy) and a pen state); got pen_states={pen_states!r} with "
                f"component={component!r}"
            )
        if component == "full":
            # The diagonal of L needs a floor (class docstring); the float32 default is fixed
            # here so that it does not change when the module changes dtype.
            floor = default_min_scale(torch.float32) if min_scale is None else min_scale
            floor = check_number("min_scale", floor, low=0.0, strict=True)
        else:
            floor = check_number("min_scale", 0.0 if min_scale is None else min_scale, low=0.0)
        init_scale = check_init_scale(init_scale, floor)
        self.out_features = d
        self.num_components = k
        self.component = component
        self.min_scale = floor
        self.pen_states = pen_states
        scale_sizes = {
            "full": [k * d * (d + 1) // 2],
            "bivariate": [2 * k, k],  # raw scales, atanh_rho
            "normal": [k * d],
        }[component]
        self._sizes = [k, k * d, *scale_sizes] + ([pen_states] if pen_states else [])
        self.linear = nn.Linear(in_features, sum(self._sizes))

        raw_init = _raw_for_scale(init_scale, floor)
        with torch.no_grad():
            bias = list(self.linear.bias.split(self._sizes))
            bias[0].zero_()  # equal initial mixture weights
            if component == "full":
                tri = bias[2].view(k, d * (d + 1) // 2)
                tri.zero_()  # off-diagonal entries of L: no initial correlation
                diag = torch.arange(d)
                tri[:, diag * (diag + 3) // 2] = raw_init  # L_ii sits at i(i+3)/2
            else:
                bias[2].fill_(raw_init)
                if component == "bivariate":
                    bias[3].zero_()  # atanh_rho = 0
            if pen_states:
                bias[-1].zero_()  # equal initial pen-state probabilities

    def forward(self, features: Tensor) -> Distribution:
        """The distribution of the target for each feature vector.

        Args:
            features: shape ``(*, in_features)``.

        Returns:
            A mixture with batch shape ``(*)`` and event shape ``(D,)``; with
            ``pen_states = P > 0`` a :class:`~probloss.distributions.StrokeMixture` with
            event shape ``(2 + P,)``.
        """
        k, d = self.num_components, self.out_features
        parts = self.linear(features).split(self._sizes, dim=-1)
        logits = parts[0]
        loc = parts[1].unflatten(-1, (k, d))
        # validation: the distributions' default (torch's global switch; values read only
        # where that is free: CPU, eager, no torch.func transform), like every probloss check
        if self.component == "normal":
            log_scale = _log_scale(parts[2].unflatten(-1, (k, d)), self.min_scale)
            return NormalMixture(logits, loc, log_scale)
        if self.component == "bivariate":
            log_scale = _log_scale(parts[2].unflatten(-1, (k, 2)), self.min_scale)
            if self.pen_states:
                return StrokeMixture(logits, loc, log_scale, parts[3], parts[4])
            return BivariateNormalMixture(logits, loc, log_scale, parts[3])
        raw = parts[2].unflatten(-1, (k, d * (d + 1) // 2))
        # scale_tril_from_raw computes half precision in float32; the mixture's parameters
        # keep the module's dtype, like loc (and like the other components)
        scale_tril = scale_tril_from_raw(raw, d, min_scale=self.min_scale).to(loc.dtype)
        return MultivariateNormalMixture(logits, loc, scale_tril)


def _nan_fill(distribution: Distribution) -> Tensor:
    """A point of the support with a finite log density, for events with a NaN target:
    the mean, or the ``mode`` of a :class:`StrokeMixture` (its mean's pen part is the
    probability vector, not a one-hot)."""
    return distribution.mode if isinstance(distribution, StrokeMixture) else distribution.mean


class MixtureNLLLoss(ShowOptions, nn.Module):
    r"""Negative log-likelihood of targets under a predicted distribution (a head's output).

    ``forward(target, distribution)`` is ``-distribution.log_prob(target)``, one value
    per event (target point), reduced: ``"mean"`` averages over events (points, not
    coordinates), ``"sum"`` adds them, ``"none"`` returns them with shape ``(*)``.
    ``distribution`` is what any probloss head returns (:class:`MixtureDensityHead`, with
    or without pen states, :class:`~probloss.nn.NormalHead`,
    :class:`~probloss.nn.BivariateNormalHead`), or any
    ``torch.distributions.Distribution``. The value comes first, as in every probloss loss;
    a distribution passed first is a ``TypeError``.

    A reduced loss (``"mean"``, ``"sum"``) refuses a distribution whose batch shape would
    broadcast the target's batch shape to a larger one (``ValueError`` naming both
    shapes): a mixture of batch shape ``(64, 1)`` against targets ``(64, 2)`` would
    average all 64 x 64 pairs. ``"none"`` broadcasts like ``log_prob``. An empty batch
    reduces like torch's losses: ``"mean"`` is NaN (0 / 0 events), ``"sum"`` is 0.

    Args:
        reduction: ``"mean"`` (over events), ``"sum"`` or ``"none"``.
        nan_policy: ``"raise"`` raises ``ValueError`` for NaN in ``target`` (checked for
            CPU tensors only, so a GPU step never waits for the host); ``"mask"``
            ignores every event with a NaN coordinate: the whole event is evaluated at
            the distribution's (detached) mean instead (the ``mode`` for a
            :class:`~probloss.distributions.StrokeMixture`, whose pen state must stay
            one-hot), its loss and gradient are 0, and ``"mean"`` divides by the number of
            the other events.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> head = MixtureDensityHead(4, 2, 3)
        >>> target = torch.tensor([[0.0, 1.0], [float("nan"), 0.0]])
        >>> MixtureNLLLoss(nan_policy="mask", reduction="none")(target, head(torch.ones(2, 4)))
        tensor([3.0852, 0.0000], grad_fn=<WhereBackward0>)
    """

    _shown = ("reduction", "nan_policy")

    def __init__(self, *, reduction: str = "mean", nan_policy: str = "raise") -> None:
        super().__init__()
        check_reduction(reduction)
        check_nan_policy(nan_policy)
        self.reduction = reduction
        self.nan_policy = nan_policy

    def forward(self, target: Tensor, distribution: Distribution) -> Tensor:
        if isinstance(target, Distribution) or not isinstance(distribution, Distribution):
            raise TypeError(
                "MixtureNLLLoss()(target, distribution): the order is (value, distribution), "
                f"got ({type(target).__name__}, {type(distribution).__name__})"
            )
        event = distribution.event_shape
        if self.reduction != "none":
            value_batch = target.shape[: target.dim() - len(event)]
            where = f" (event shape {tuple(event)} last)" if event else ""
            check_value_batch(value_batch, where, distribution=distribution.batch_shape)
        mask = None
        if self.nan_policy == "mask":
            target, mask = mask_nan_events(target, _nan_fill(distribution), len(event))
        elif should_validate(None, target):
            check_not_nan(target, "target")
        return reduce_loss(-distribution.log_prob(target), self.reduction, mask=mask)
