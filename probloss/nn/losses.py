"""Loss modules: settings in ``__init__``, ``forward`` is one call into the functional core."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._core.constants import HALF_LOG_2PI as _HALF_LOG_2PI
from .._core.reduction import check_nan_policy, check_reduction, check_value_batch
from .._core.validation import check_renamed_keywords
from ..functional.bivariate import bivariate_normal_nll
from ..functional.normal import normal_nll
from ._options import ShowOptions, check_flag, check_number

_NORMAL_FORMS = "loss(target, loc, log_scale), or scale=, var= or log_var= by keyword"


class _EventLoss(ShowOptions, nn.Module):
    """The options of a loss over events with NaN masking, checked and stored in one place
    (the whole ``__init__`` of a loss that has no other option)."""

    def __init__(
        self, *, reduction: str = "mean", nan_policy: str = "raise",
        validate_args: bool | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        check_reduction(reduction)
        check_nan_policy(nan_policy)
        self.reduction = reduction
        self.nan_policy = nan_policy
        self.validate_args = check_flag("validate_args", validate_args, allow_none=True)


class NormalNLLLoss(_EventLoss):
    """Gaussian negative log-likelihood: ``forward(target, loc, log_scale)``.

    ``forward`` is :func:`probloss.functional.normal_nll` with the same arguments: the
    target first, then ``loc``, then ``log_scale`` (unconstrained and stable) positionally,
    or exactly one of the keyword alternatives ``scale=``, ``var=``, ``log_var=``.
    Each element is one event: ``"mean"`` averages over elements.

    Args:
        beta: beta-NLL exponent in ``[0, 1]`` (Seitzer et al. 2022); 0 is the plain NLL.
        min_scale: ``None`` or a soft floor ``> 0``: the scale used is ``scale + min_scale``.
        reduction: ``"mean"`` (over events, i.e. elements), ``"sum"`` or ``"none"``.
        nan_policy: ``"raise"`` or ``"mask"`` (NaN targets ignored, "mean" over the rest).
        validate_args: value checks (``None``: CPU tensors only), as in the functional call.

    Reduced losses refuse parameters that would broadcast ``target``'s shape to a larger
    one (``ValueError`` from :func:`~probloss.functional.normal_nll`); an empty batch
    gives NaN for ``"mean"`` and 0 for ``"sum"``, like torch's losses.

    Raises:
        ValueError: an option outside the allowed values (named in the message).
        TypeError: ``scale_form=`` (removed: pass the form to ``forward`` by keyword).

    Example:
        >>> loss = NormalNLLLoss()
        >>> target, loc = torch.tensor([0.0, 1.0, 1e18]), torch.zeros(3)
        >>> loss(target, loc, torch.zeros(3))  # log_scale, positional
        tensor(1.6667e+35)
        >>> loss(target, loc, var=torch.ones(3))  # or one keyword form
        tensor(1.6667e+35)
    """

    _shown = ("beta", "min_scale", "reduction", "nan_policy", "validate_args")

    def __init__(
        self,
        *,
        beta: float = 0.0,
        min_scale: float | None = None,
        reduction: str = "mean",
        nan_policy: str = "raise",
        validate_args: bool | None = None,
        **removed: object,
    ) -> None:
        super().__init__(reduction=reduction, nan_policy=nan_policy, validate_args=validate_args)
        if "scale_form" in removed:
            raise TypeError(
                "NormalNLLLoss(): scale_form was removed; the scale form is chosen per call: "
                + _NORMAL_FORMS
            )
        check_renamed_keywords("NormalNLLLoss", removed, {})
        self.beta = check_number("beta", beta, low=0.0, high=1.0)
        self.min_scale = check_number("min_scale", min_scale, low=0.0, strict=True,
                                      allow_none=True)  # fmt: skip

    def forward(
        self,
        target: Tensor,
        loc: Tensor,
        log_scale: Tensor | float | None = None,
        *,
        scale: Tensor | float | None = None,
        var: Tensor | float | None = None,
        log_var: Tensor | float | None = None,
    ) -> Tensor:
        return normal_nll(
            target,
            loc,
            log_scale,
            scale=scale,
            var=var,
            log_var=log_var,
            beta=self.beta,
            min_scale=self.min_scale,
            reduction=self.reduction,
            nan_policy=self.nan_policy,
            validate_args=self.validate_args,
        )


class GaussianNLLLoss(ShowOptions, nn.Module):
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

    _shown = ("full", "eps", "reduction", "validate_args")

    def __init__(
        self,
        *,
        full: bool = False,
        eps: float = 1e-6,
        reduction: str = "mean",
        validate_args: bool | None = None,
    ) -> None:
        super().__init__()
        self.full = check_flag("full", full)
        self.eps = check_number("eps", eps, low=0.0)
        check_reduction(reduction)
        self.reduction = reduction
        self.validate_args = check_flag("validate_args", validate_args, allow_none=True)

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


class BivariateNormalNLLLoss(_EventLoss):
    """Negative log-likelihood of 2-D targets under a correlated normal (sketch, handwriting).

    ``forward(target, loc, log_scale, atanh_rho)`` is
    :func:`probloss.functional.bivariate_normal_nll` with the same arguments: ``target``,
    ``loc`` and ``log_scale`` of shape ``(*, 2)``, ``atanh_rho`` of shape ``(*)``
    positionally, or ``rho=`` (``|rho| < 1``) by keyword instead of ``atanh_rho``.
    ``"mean"`` averages over events (points), not coordinates. Reduced losses refuse
    parameters that would broadcast the target's batch shape to a larger one
    (``atanh_rho`` of shape ``(N, 1)`` against targets ``(N, 2)``; ``ValueError`` from the
    functional call); an empty batch gives NaN for ``"mean"`` and 0 for ``"sum"``, like
    torch's losses.

    Args:
        reduction: ``"mean"`` (over points), ``"sum"`` or ``"none"``.
        nan_policy: ``"raise"`` or ``"mask"`` (points with a NaN coordinate ignored).
        validate_args: value checks (``None``: CPU tensors only), as in the functional call.

    Example:
        >>> loss = BivariateNormalNLLLoss()
        >>> loss(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4))
        tensor(1.8379)
    """

    _shown = ("reduction", "nan_policy", "validate_args")

    def forward(
        self,
        target: Tensor,
        loc: Tensor,
        log_scale: Tensor,
        atanh_rho: Tensor | None = None,
        *,
        rho: Tensor | None = None,
    ) -> Tensor:
        return bivariate_normal_nll(
            target,
            loc,
            log_scale,
            atanh_rho,
            rho=rho,
            reduction=self.reduction,
            nan_policy=self.nan_policy,
            validate_args=self.validate_args,
        )
