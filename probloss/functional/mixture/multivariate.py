r"""Mixtures of Gaussians with full covariances from ``scale_tril``: the log density."""

from __future__ import annotations

from torch import Tensor

from ..._core.dtype import as_loss_tensors
from ..multivariate import multivariate_normal_log_prob
from ._inputs import _broadcast_batch, _mixture_shapes, _shape_error
from .general import mixture_log_prob

__all__ = [
    "multivariate_normal_mixture_log_prob",
]


def multivariate_normal_mixture_log_prob(
    value: Tensor,
    logits: Tensor,
    loc: Tensor,
    scale_tril: Tensor,
    *,
    validate_args: bool | None = None,
) -> Tensor:
    r"""Log density of a mixture of Gaussians with full covariances :math:`L_k L_k^\top`.

    .. math::
        \log p(x) = \operatorname{logsumexp}_k\Big(\log\operatorname{softmax}(\ell)_k
            - \tfrac12\lVert L_k^{-1}(x - \mu_k)\rVert^2 - \sum_i \log (L_k)_{ii}\Big)
            - \tfrac D2 \log 2\pi

    The components are
    :func:`~probloss.functional.multivariate.multivariate_normal_log_prob` (one triangular
    solve, no covariance formed) combined by :func:`mixture_log_prob` with plain autograd.
    Build ``scale_tril`` from unconstrained network outputs with
    :func:`~probloss.functional.multivariate.scale_tril_from_raw`.

    Args:
        value: targets, shape ``(*, D)``.
        logits: mixture logits, shape ``(*, K)``.
        loc: means, shape ``(*, K, D)``.
        scale_tril: lower-triangular factors :math:`L_k` with positive diagonals, shape
            ``(*, K, D, D)``.
        validate_args: checks of ``multivariate_normal_log_prob`` (no NaN, positive
            diagonal, lower triangular); ``None`` checks CPU tensors only.

    Returns:
        Tensor of shape ``(*)``, the broadcast batch shape (torch's broadcasting, as for
        every unreduced density); float32 for half-precision inputs.

    Raises:
        ValueError: shapes (``scale_tril`` must be ``(*, K, D, D)``), or the checks above.

    Example:
        >>> L = torch.tensor([[[1.0, 0.0], [0.9, 0.1]], [[2.0, 0.0], [0.0, 2.0]]])
        >>> loc, logits = torch.zeros(2, 2), torch.tensor([1.0, 0.0])
        >>> multivariate_normal_mixture_log_prob(torch.tensor([1.0, 0.9]), logits, loc, L)
        tensor(-0.3365)
    """
    value, logits, loc, scale_tril = as_loss_tensors(
        value=value, logits=logits, loc=loc, scale_tril=scale_tril
    )
    k, d, batch = _mixture_shapes(value, logits, {"loc": loc}, None)
    if scale_tril.dim() < 3 or scale_tril.shape[-3:] != (k, d, d):
        raise _shape_error(
            "scale_tril",
            scale_tril,
            f"(*, K, D, D) = (*, {k}, {d}, {d})",
            f"K = {k} from logits {tuple(logits.shape)}, D = {d} from value {tuple(value.shape)}",
        )
    _broadcast_batch({"batch of value, logits, loc": batch, "scale_tril": scale_tril.shape[:-3]})
    component = multivariate_normal_log_prob(
        value.unsqueeze(-2), loc, scale_tril, validate_args=validate_args
    )
    return mixture_log_prob(component, logits)
