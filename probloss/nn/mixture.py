r"""Mixture density networks (Bishop 1994): a head from features to a mixture, and its loss.

:class:`MixtureDensityHead` maps features ``(*, in_features)`` through one linear layer to
the parameters of a mixture of ``K`` Gaussians over ``D``-dimensional targets and returns
the mixture as a distribution, so that ``loss = -head(h).log_prob(y).mean()``.
:class:`MixtureNLLLoss` is that loss as a module, with ``reduction`` and ``nan_policy``.

.. math::
    p(y \mid h) = \sum_{k=1}^K \pi_k(h)\, \mathcal N\big(y \mid \mu_k(h), \Sigma_k(h)\big),
    \qquad \pi(h) = \operatorname{softmax}(\text{logits}(h))

The network never forms :math:`\pi_k` or :math:`\sigma_k` by ``softmax`` / ``exp`` and then
takes logs: it predicts mixture ``logits`` and log-scales, and the mixtures evaluate
:math:`\log p` by ``log_softmax`` plus a log-sum-exp over components, which stays finite
where the naive product of per-dimension pdfs underflows to ``log 0``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution

from .._validation import check_not_nan, distribution_validate_args, should_validate
from ..distributions.mixture import (
    BivariateNormalMixture,
    MultivariateNormalMixture,
    NormalMixture,
)
from ..functional._reduction import check_reduction, check_value_batch, reduce_loss
from ..functional.multivariate import default_min_diag, scale_tril_from_raw
from .heads import _log_scale, _raw_for_scale

COMPONENTS = ("normal", "bivariate", "full")
_NAN_POLICIES = ("raise", "mask")


class MixtureDensityOutput(NamedTuple):
    """What :class:`MixtureDensityHead` returns when ``pen_states > 0``.

    Attributes:
        mixture: the mixture over the ``D``-dimensional target (batch shape ``(*)``).
        pen: a ``torch.distributions.Categorical`` over the ``pen_states`` pen states
            (sketch-rnn: pen down, pen up, end of sketch), batch shape ``(*)``.
    """

    mixture: Distribution
    pen: Categorical


class MixtureDensityHead(nn.Module):
    r"""Features ``(*, in_features)`` to a mixture of ``num_components`` Gaussians.

    One linear layer predicts, per input, the mixture ``logits`` (``K``), the component
    means (``K x D``) and the component scales, in one of three forms (``component``):

    * ``"normal"``: diagonal covariances, ``K x D`` raw scales; returns a
      :class:`~probloss.distributions.mixture.NormalMixture` (batch shape ``(*)``, event
      shape ``(D,)``).
    * ``"bivariate"``: ``D = 2`` with a correlation per component (Graves 2013 eqs. 23-25,
      sketch-rnn), ``K x 2`` raw scales and ``K`` values of ``atanh_rho``; returns a
      :class:`~probloss.distributions.mixture.BivariateNormalMixture`. ``rho = tanh``
      of the output is never formed, so a saturated correlation cannot make ``1 - rho^2``
      round to 0.
    * ``"full"``: a full covariance :math:`L_k L_k^\top` per component, ``K x D(D+1)/2``
      raw entries of :math:`L_k` through
      :func:`~probloss.functional.multivariate.scale_tril_from_raw`; returns a
      :class:`~probloss.distributions.mixture.MultivariateNormalMixture`, whose
      ``log_prob`` is :func:`~probloss.functional.mixture.multivariate_normal_mixture_log_prob`
      (one triangular solve per component, an overflow-safe squared norm, no Cholesky
      decomposition and so no "not positive definite").

    Scales (``"normal"``, ``"bivariate"``) are :math:`\sigma = \operatorname{softplus}(r)
    + m` with ``m = min_scale``, formed as a log-scale ``log(softplus(r) + m)`` (via
    :func:`~probloss.special.log_softplus`, exact for every ``r``, as in
    :class:`~probloss.nn.NormalHead`): for :math:`r \to -\infty` the log-scale is
    :math:`\approx r` (or :math:`\log m`), never ``log 0``; ``m`` is a soft floor that keeps
    its gradient. For ``"full"`` the diagonal of :math:`L_k` is ``softplus(r) + m`` with
    ``m = min_scale`` if positive, else the float32 default of
    :func:`~probloss.functional.multivariate.default_min_diag` (``3.45e-4``, in the units
    of the target): a zero diagonal would make the triangular solve divide by 0, so this
    form always has a floor.

    Initialisation: the raw-scale biases (the diagonal ones for ``"full"``) start at
    ``softplus_inverse(init_scale - m)`` and the ``atanh_rho`` and off-diagonal biases at 0,
    so that with zero features every component has scale ``init_scale`` and no
    correlation; the mixture-logit biases start at 0 (equal weights). Weights, and the
    biases of the means, keep ``nn.Linear``'s default initialisation (uniform in
    ``+-1/sqrt(in_features)``): the means then differ between components from the start,
    which breaks the symmetry between components (equal initial means get equal
    gradients and may never separate). Scale the targets to unit order (or choose
    ``init_scale`` in their units) so that these initial means and scales are sensible.

    Empty batches: features of shape ``(0, in_features)`` give a mixture of batch shape
    ``(0,)`` whose ``log_prob``, samples and moments are empty.

    Dtypes: the head follows its parameters (``head.to(torch.bfloat16)``). As for every
    probloss distribution, the mixture's ``log_prob`` of half-precision parameters is
    computed and returned in float32 (DESIGN.md, half-precision policy); samples,
    ``mean``, ``variance`` and ``mode`` are computed in float32 and returned in the
    parameters' dtype (values of the random variable, like the target).

    Output layout of ``self.linear`` (the last dimension): ``logits`` (``K``), ``loc``
    (``K*D``, component-major), scale parameters (``K*D``, ``K*2 + K`` for ``"bivariate"``
    as scales then ``atanh_rho``, or ``K*D(D+1)/2`` for ``"full"``), then ``pen_states``
    pen logits.

    With ``pen_states > 0`` (sketch-style data, Ha & Eck 2017) the head also predicts the
    logits of a categorical over ``pen_states`` classes (bias 0), and ``forward`` returns a
    :class:`MixtureDensityOutput` ``(mixture, pen)`` instead of the mixture alone; the
    sketch-rnn reconstruction loss is then
    ``-(out.mixture.log_prob(offsets) + out.pen.log_prob(pen_state)).mean()``.

    Args:
        in_features: size of the last dimension of the features.
        out_features: the target dimension ``D`` (must be 2 for ``"bivariate"``).
        num_components: the number of mixture components ``K``.
        component: ``"normal"``, ``"bivariate"`` or ``"full"`` (see above).
        init_scale: the initial component scale, in the units of the target.
        min_scale: soft floor ``m >= 0`` on the scales (see above).
        pen_states: number of pen-state classes, 0 for none.

    Raises:
        ValueError: an unknown ``component``, ``out_features != 2`` for ``"bivariate"``, a
            non-positive size, a negative ``pen_states`` or ``min_scale``, or
            ``init_scale <= min_scale``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> head = MixtureDensityHead(16, 1, 5, init_scale=0.5)
        >>> mixture = head(torch.zeros(8, 16))
        >>> mixture.batch_shape, mixture.event_shape
        (torch.Size([8]), torch.Size([1]))
        >>> loss = -mixture.log_prob(torch.randn(8, 1)).mean()
        >>> sketch = MixtureDensityHead(16, 2, 20, component="bivariate", pen_states=3)
        >>> out = sketch(torch.zeros(8, 16))
        >>> out.mixture.sample().shape, out.pen.sample().shape
        (torch.Size([8, 2]), torch.Size([8]))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_components: int,
        *,
        component: str = "normal",
        init_scale: float = 1.0,
        min_scale: float = 0.0,
        pen_states: int = 0,
    ) -> None:
        super().__init__()
        if component not in COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
        for name, size in (
            ("in_features", in_features),
            ("out_features", out_features),
            ("num_components", num_components),
        ):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive int, got {size!r}")
        if component == "bivariate" and out_features != 2:
            raise ValueError(
                f"component='bivariate' needs out_features == 2, got {out_features}; "
                "use 'normal' (diagonal) or 'full' for other sizes"
            )
        if isinstance(pen_states, bool) or not isinstance(pen_states, int) or pen_states < 0:
            raise ValueError(f"pen_states must be an int >= 0, got {pen_states!r}")
        if not min_scale >= 0.0:
            raise ValueError(f"min_scale must be >= 0, got {min_scale!r}")
        k, d = num_components, out_features
        self.in_features = in_features
        self.out_features = d
        self.num_components = k
        self.component = component
        self.min_scale = float(min_scale)
        self.pen_states = pen_states
        if component == "full":
            # The diagonal of L needs a floor (see the class docstring); fixed here, in the
            # float32 default, so that it does not change when the module changes dtype.
            floor = self.min_scale if self.min_scale > 0 else default_min_diag(torch.float32)
            self.min_diag = floor
            scale_sizes = [k * d * (d + 1) // 2]
        elif component == "bivariate":
            floor = self.min_scale
            scale_sizes = [2 * k, k]  # raw scales, atanh_rho
        else:
            floor = self.min_scale
            scale_sizes = [k * d]
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
                bias[-1].zero_()

    def forward(self, features: Tensor) -> Distribution | MixtureDensityOutput:
        """The mixture for each feature vector (and the pen-state categorical, if any).

        Args:
            features: shape ``(*, in_features)``.

        Returns:
            A mixture with batch shape ``(*)`` and event shape ``(D,)``; with
            ``pen_states > 0`` a :class:`MixtureDensityOutput` ``(mixture, pen)``.
        """
        k, d = self.num_components, self.out_features
        parts = self.linear(features).split(self._sizes, dim=-1)
        logits = parts[0]
        loc = parts[1].unflatten(-1, (k, d))
        # torch.distributions' argument checks read values (a host sync on a GPU): run them
        # for CPU tensors only, like every probloss validation (DESIGN.md).
        check = should_validate(None, features)
        if self.component == "normal":
            log_scale = _log_scale(parts[2].unflatten(-1, (k, d)), self.min_scale)
            mixture = NormalMixture(logits, loc, log_scale, validate_args=check)
        elif self.component == "bivariate":
            log_scale = _log_scale(parts[2].unflatten(-1, (k, 2)), self.min_scale)
            mixture = BivariateNormalMixture(logits, loc, log_scale, parts[3], validate_args=check)
        else:
            raw = parts[2].unflatten(-1, (k, d * (d + 1) // 2))
            # scale_tril_from_raw computes half precision in float32; the mixture's
            # parameters keep the module's dtype, like loc (and like the other components)
            scale_tril = scale_tril_from_raw(raw, d, min_diag=self.min_diag).to(loc.dtype)
            mixture = MultivariateNormalMixture(logits, loc, scale_tril, validate_args=check)
        if self.pen_states:
            pen_logits = parts[-1]
            pen = Categorical(
                logits=pen_logits, validate_args=distribution_validate_args(check, pen_logits)
            )
            return MixtureDensityOutput(mixture, pen)
        return mixture

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_components={self.num_components}, component={self.component!r}, "
            f"min_scale={self.min_scale}, pen_states={self.pen_states}"
        )


class MixtureNLLLoss(nn.Module):
    r"""Negative log-likelihood of targets under a predicted mixture (or any distribution).

    ``forward(mixture, target)`` is ``-mixture.log_prob(target)``, one value per event
    (target point), reduced: ``"mean"`` averages over events (points, not coordinates),
    ``"sum"`` adds them, ``"none"`` returns them with shape ``(*)``. ``mixture`` is what
    :class:`MixtureDensityHead` returns (its ``.mixture`` when it predicts pen states),
    or any ``torch.distributions.Distribution`` with ``log_prob``.

    A reduced loss (``"mean"``, ``"sum"``) refuses a ``mixture`` whose batch shape would
    broadcast the target's batch shape to a larger one (``ValueError`` naming both
    shapes): a mixture of batch shape ``(64, 1)`` against targets ``(64, 2)`` would
    average all 64 x 64 pairs. ``"none"`` broadcasts like ``log_prob``. An empty batch
    reduces like torch's losses: ``"mean"`` is NaN (0 / 0 events), ``"sum"`` is 0.

    Args:
        reduction: ``"mean"`` (over events), ``"sum"`` or ``"none"``.
        nan_policy: ``"raise"`` raises ``ValueError`` for NaN in ``target`` (checked for
            CPU tensors only, so a GPU step never waits for the host); ``"mask"``
            ignores every event with a NaN coordinate: it is evaluated at the mixture's
            (detached) mean instead, its loss and gradient are 0, and ``"mean"`` divides
            by the number of the other events.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> head = MixtureDensityHead(4, 2, 3)
        >>> target = torch.tensor([[0.0, 1.0], [float("nan"), 0.0]])
        >>> MixtureNLLLoss(nan_policy="mask", reduction="none")(head(torch.ones(2, 4)), target)
        tensor([3.0852, 0.0000], grad_fn=<WhereBackward0>)
    """

    def __init__(self, reduction: str = "mean", nan_policy: str = "raise") -> None:
        super().__init__()
        check_reduction(reduction)
        if nan_policy not in _NAN_POLICIES:
            raise ValueError(f"nan_policy must be 'raise' or 'mask', got {nan_policy!r}")
        self.reduction = reduction
        self.nan_policy = nan_policy

    def forward(self, mixture: Distribution, target: Tensor) -> Tensor:
        if self.reduction != "none":
            event = mixture.event_shape
            value_batch = target.shape[: target.dim() - len(event)]
            where = f" (event shape {tuple(event)} last)" if event else ""
            check_value_batch(value_batch, where, mixture=mixture.batch_shape)
        mask = None
        if self.nan_policy == "mask":
            event_dims = tuple(range(-len(mixture.event_shape), 0))
            nan = torch.isnan(target)
            mask = ~(nan.any(dim=event_dims) if event_dims else nan)
            target = torch.where(nan, mixture.mean.detach(), target)  # finite loss, grad 0
        elif should_validate(None, target):
            check_not_nan(target, "target")
        return reduce_loss(-mixture.log_prob(target), self.reduction, mask=mask)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, nan_policy={self.nan_policy!r}"
