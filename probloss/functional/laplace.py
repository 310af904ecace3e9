r"""The Laplace log density, in log space from the standardised residual.

.. math::
    \log p(x) = -\frac{|x - \mu|}{b} - \log b - \log 2 .

``value`` first, then ``loc``, then ``log_scale`` (positional, unconstrained); ``scale`` is
the keyword-only alternative (exactly one), resolved by the one resolver
:func:`~probloss._core.params.log_scale_from`. There is no ``var`` form: the variance
of the Laplace distribution is :math:`2 b^2`, not the square of its scale parameter, and a
keyword of that name would invite the mistake. Half-precision inputs are computed and
returned in float32.
"""

from __future__ import annotations

from torch import Tensor

from .._core.constants import LOG_2
from ._location_scale import location_scale_inputs
from ._params import standardized_residual


def laplace_log_prob(
    value: Tensor,
    loc: Tensor,
    log_scale: Tensor | float | None = None,
    *,
    scale: Tensor | float | None = None,
    validate_args: bool | None = None,
) -> Tensor:
    r"""Log density of the Laplace distribution with location ``loc`` and scale :math:`b`.

    .. math::
        \log p(x) = -\frac{|x - \mu|}{b} - \log b - \log 2, \qquad \log b = \text{log\_scale}

    ``|x - mu| / b`` is ``|x - mu| * exp(-log_scale)`` without overflow of the exponential
    where the quotient is finite. At ``x = mu`` the gradient in ``value`` / ``loc`` is 0 (the
    midpoint of the subgradient). A ``scale`` given instead goes through ``log`` once
    (``z`` then carries a relative error ``eps |log b|`` more).

    Args:
        value: observations, shape broadcastable with the parameters.
        loc: location :math:`\mu`, shape ``(*)``.
        log_scale: :math:`\log b`, unconstrained (positional).
        scale: alternatively :math:`b > 0` (keyword-only; exactly one of the two).
        validate_args: check ``value`` has no NaN and ``scale`` is positive; ``None``
            checks CPU tensors only (no GPU host sync), ``False`` never checks.

    Returns:
        Tensor of the broadcast shape, one value per element; float32 for half-precision
        inputs.

    Raises:
        ValueError: not exactly one of ``log_scale`` / ``scale``, shapes do not broadcast,
            or (when validating) NaN in ``value`` or a ``scale`` that is not positive.

    Example:
        >>> x = torch.tensor([0.0, 1e-30, 1e30])
        >>> laplace_log_prob(x, torch.tensor(0.0), torch.tensor([-80.0, -80.0, 60.0]))
        tensor([    79.3069, -55326.9180,  -8817.2041])
        >>> laplace_log_prob(torch.tensor(1.0), 0.0, scale=2.0)  # -1/2 - log 4
        tensor(-1.8863)
    """
    forms = {"log_scale": log_scale, "scale": scale}
    t, _, _, log_scale = location_scale_inputs(value, loc, forms, validate_args)
    value, loc = t["value"], t["loc"]
    # |r e^{-s}|, not |r| e^{-s}: at r = 0 the abs's zero gradient then reaches mul_exp's
    # backward, which gives 0 * e^{-s} = 0 even where e^{-s} overflows (not sign(0) * inf);
    # z finite where value - loc overflows, its value / loc gradients formed directly
    return -standardized_residual(value, loc, log_scale).abs() - log_scale - LOG_2
