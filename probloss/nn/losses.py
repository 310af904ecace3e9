"""Loss modules: settings in ``__init__``, ``forward`` is one call into the functional core."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..functional._reduction import check_reduction, check_value_batch
from ..functional.bivariate import bivariate_normal_nll
from ..functional.normal import normal_nll

_SCALE_FORMS = ("log_scale", "log_var", "scale", "var")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class NormalNLLLoss(nn.Module):
    """Gaussian negative log-likelihood from a predicted mean and a scale parameter.

    ``forward(loc, scale_param, target)`` is :func:`probloss.functional.normal_nll` with
    ``scale_param`` passed as the form chosen by ``scale_form`` (``"log_scale"`` by default:
    unconstrained and stable; ``"log_var"``, ``"scale"``, ``"var"`` accepted).

    Args:
        scale_form: which parameter ``forward`` receives.
        beta: beta-NLL exponent (Seitzer et al. 2022); 0 is the plain NLL.
        min_scale: optional soft floor, the scale used is ``scale + min_scale``.
        reduction: ``"mean"`` (over events, i.e. elements), ``"sum"`` or ``"none"``.
        nan_policy: ``"raise"`` or ``"mask"`` (NaN targets ignored, "mean" over the rest).

    Reduced losses refuse parameters that would broadcast ``target``'s shape to a larger
    one (``ValueError`` from :func:`~probloss.functional.normal_nll`); an empty batch
    gives NaN for ``"mean"`` and 0 for ``"sum"``, like torch's losses.

    Example:
        >>> loss = NormalNLLLoss()
        >>> loss(torch.zeros(3), torch.zeros(3), torch.tensor([0.0, 1.0, 1e18]))
        tensor(1.6667e+35)
    """

    def __init__(
        self,
        *,
        scale_form: str = "log_scale",
        beta: float = 0.0,
        min_scale: float | None = None,
        reduction: str = "mean",
        nan_policy: str = "raise",
    ) -> None:
        super().__init__()
        if scale_form not in _SCALE_FORMS:
            raise ValueError(f"scale_form must be one of {_SCALE_FORMS}, got {scale_form!r}")
        check_reduction(reduction)
        self.scale_form = scale_form
        self.beta = beta
        self.min_scale = min_scale
        self.reduction = reduction
        self.nan_policy = nan_policy

    def forward(self, loc: Tensor, scale_param: Tensor, target: Tensor) -> Tensor:
        return normal_nll(
            target,
            loc,
            **{self.scale_form: scale_param},
            beta=self.beta,
            min_scale=self.min_scale,
            reduction=self.reduction,
            nan_policy=self.nan_policy,
        )

    def extra_repr(self) -> str:
        return (
            f"scale_form={self.scale_form!r}, beta={self.beta}, min_scale={self.min_scale}, "
            f"reduction={self.reduction!r}, nan_policy={self.nan_policy!r}"
        )


class GaussianNLLLoss(nn.Module):
    r"""Drop-in for ``torch.nn.GaussianNLLLoss`` that broadcasts ``var`` and never syncs.

    .. math::
        \ell = \tfrac12\big(\log(\sigma^2 + \epsilon) + (x - \mu)^2 / (\sigma^2 + \epsilon)\big)
            \;[+\; \tfrac12 \log 2\pi \text{ if full}]

    Same signature and semantics as torch's (``forward(input, target, var)``, ``full``,
    ``eps``, ``reduction``), with three differences:

    * ``var`` broadcasts against ``input`` like any torch operation: ``(N, C, 1, 1)``,
      ``(1, C, 1, W)`` or a scalar against ``(N, C, H, W)``, which torch rejects ("var is of
      incorrect size"; it accepts one size-1 dimension or a missing trailing one). torch's
      special case is kept: a ``var`` of shape ``input.shape[:-1]`` gets a trailing dimension.
    * ``eps`` is a soft floor: the loss is that of ``var + eps``, with its exact gradient.
      torch clamps ``var`` at ``eps`` in place under ``no_grad``, a straight-through clamp:
      below ``eps`` the value is constant but the gradient is that of ``var = eps``, the same
      for every smaller ``var``. Where ``var >= eps`` the two differ per element by at most
      :math:`\tfrac12 (\epsilon/\sigma^2)(1 + (x - \mu)^2/\sigma^2)` (first order in
      :math:`\epsilon/\sigma^2`, from :math:`\log(1 + t) \le t`).
    * A negative ``var`` raises ``ValueError`` only when values are validated
      (``validate_args=None``: CPU tensors only), so a GPU step never waits for the host.

    Reduced losses (``"mean"``, ``"sum"``) refuse a silent outer product: the batch is
    the larger of ``input`` and ``target`` where one broadcasts up to the other (torch's
    ``target`` with a size-1 dimension, and the converse); ``input`` and ``target`` whose
    broadcast exceeds both (``(8,)`` and ``(8, 1)``, an ``(8, 8)`` matrix that torch
    averages) or a ``var`` that enlarges the batch raise ``ValueError`` naming the
    argument and both shapes. ``reduction="none"`` broadcasts freely.

    ``"mean"`` averages over elements (each element is one univariate event); over an
    empty batch it is NaN and ``"sum"`` is 0, as in torch.
    """

    def __init__(
        self,
        *,
        full: bool = False,
        eps: float = 1e-6,
        reduction: str = "mean",
        validate_args: bool | None = None,
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.full = full
        self.eps = eps
        self.reduction = reduction
        self.validate_args = validate_args

    def forward(self, input: Tensor, target: Tensor, var: Tensor | float) -> Tensor:
        var = torch.as_tensor(var, dtype=input.dtype, device=input.device)
        if var.dim() == input.dim() - 1 and var.shape == input.shape[:-1] and var.dim() > 0:
            var = var.unsqueeze(-1)  # torch's rule: one fewer (trailing) dimension
        if self.reduction != "none":
            target = self._batch_target(input, target, var)
        nll = normal_nll(
            target,
            input,
            var=var + self.eps,
            reduction=self.reduction,
            validate_args=self.validate_args,
        )
        # normal_nll includes 1/2 log(2 pi) per event; torch's default (full=False) omits it.
        if self.full:
            return nll
        if self.reduction == "sum":
            return (
                nll
                - _HALF_LOG_2PI
                * torch.broadcast_shapes(input.shape, target.shape, var.shape).numel()
            )
        return nll - _HALF_LOG_2PI

    @staticmethod
    def _batch_target(input: Tensor, target: Tensor, var: Tensor) -> Tensor:
        """``target`` expanded to the batch shape of a reduced loss, after checking that
        neither ``input`` nor ``var`` enlarges it.

        The batch is the larger of ``input`` and ``target`` where one broadcasts up to the
        other (torch's documented ``target`` with a size-1 dimension, and its converse);
        where their broadcast exceeds both (``input`` ``(8,)``, ``target`` ``(8, 1)``) it
        is ``target``'s shape and ``input`` is refused. ``var`` may broadcast up to the
        batch, never beyond it.
        """
        try:
            both = torch.broadcast_shapes(input.shape, target.shape)
        except RuntimeError:
            return target  # incompatible shapes: normal_nll names them
        batch = both if both in (input.shape, target.shape) else target.shape
        check_value_batch(batch, input=input.shape, var=var.shape)
        return target.expand(batch)  # a view; normal_nll then sees value = the batch

    def extra_repr(self) -> str:
        return f"full={self.full}, eps={self.eps}, reduction={self.reduction!r}"


class BivariateNormalNLLLoss(nn.Module):
    """Negative log-likelihood of 2-D targets under a correlated normal (sketch, handwriting).

    ``forward(loc, log_scale, atanh_rho, target)`` is
    :func:`probloss.functional.bivariate_normal_nll`: ``loc``, ``log_scale`` and ``target``
    of shape ``(*, 2)``, ``atanh_rho`` of shape ``(*)``; ``"mean"`` averages over events
    (points), not coordinates. Reduced losses refuse parameters that would broadcast the
    target's batch shape to a larger one (``atanh_rho`` of shape ``(N, 1)`` against
    targets ``(N, 2)``; ``ValueError`` from the functional call); an empty batch gives NaN
    for ``"mean"`` and 0 for ``"sum"``, like torch's losses.
    """

    def __init__(self, *, reduction: str = "mean", nan_policy: str = "raise") -> None:
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction
        self.nan_policy = nan_policy

    def forward(self, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor, target: Tensor) -> Tensor:
        return bivariate_normal_nll(
            target,
            loc,
            log_scale,
            atanh_rho,
            reduction=self.reduction,
            nan_policy=self.nan_policy,
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, nan_policy={self.nan_policy!r}"
