"""torch's ``Normal`` (same positional meaning), computed in log space from ``log_scale``."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from .._core.constants import LOG_2PI
from .._core.dtype import upcast
from .._core.params import log_scale_from
from .._core.validation import distribution_validate_args, set_validation
from ..functional.normal import normal_log_prob
from ..special import mul_exp

_HALF_LOG_2PI_E = 0.5 * (LOG_2PI + 1.0)  # log(2 pi e)/2
_SQRT1_2 = math.sqrt(0.5)
_SQRT_2PI = math.sqrt(2.0 * math.pi)


def _saturation(dtype: torch.dtype) -> float:
    """``|z|`` beyond which ``ndtr(z)`` is exactly 0 or 1 and its density underflows.

    ``phi(z) < e^{-z^2/2}`` is below the smallest subnormal for ``z^2 / 2 >
    -log(tiny eps)`` (14.4 in float32, 38.6 in float64), and so is ``ndtr(-z) < phi(z)/z``.
    """
    finfo = torch.finfo(dtype)
    return math.sqrt(-2.0 * math.log(finfo.tiny * finfo.eps))


def _loc_plus_scaled(loc: Tensor, z: Tensor, log_scale: Tensor) -> Tensor:
    """``loc + z e^{log_scale}`` as ``2 (loc/2 + (z/2) e^{log_scale})``: the halvings and the
    doubling are exact, and the terms may exceed ``finfo.max`` where the sum does not
    (-3.4e38 + 6.2e38 in float32)."""
    half = 0.5 * loc + mul_exp(0.5 * z, log_scale)
    return half + half


class _NormalIcdf(torch.autograd.Function):
    """``loc + e^{log_scale} ndtri(p)`` with ``d/dp = sqrt(2 pi) e^{log_scale + z^2/2}`` as one
    ``mul_exp``: autograd would multiply ``1/phi(z)`` (inf at the smallest subnormals in
    float64) by an underflowed ``e^{log_scale}``, 0 * inf = NaN."""

    generate_vmap_rule = True

    @staticmethod
    def forward(p: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
        return _loc_plus_scaled(loc, torch.special.ndtri(p), log_scale)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0], inputs[2])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p, log_scale = ctx.saved_tensors
        z = torch.special.ndtri(p)  # differentiable again when the graph is built
        d_p = mul_exp(grad * _SQRT_2PI, log_scale + 0.5 * z * z)
        d_log_scale = mul_exp(grad * z, log_scale)
        return d_p, grad, d_log_scale


class Normal(torch.distributions.Normal):
    r"""``torch.distributions.Normal`` with a log-space ``log_prob``; ``log_scale`` by keyword.

    .. math::
        \log p(x) = -\tfrac12 z^2 - \log\sigma - \tfrac12\log 2\pi,
        \qquad z = (x - \mu)\, e^{-\log\sigma}

    A drop-in for torch's class: ``Normal(loc, scale)`` means what it means in torch (the
    second positional argument is the standard deviation). The stable, unconstrained form
    is the keyword ``log_scale=``; ``scale`` is converted to it once, through the
    project's scale-form resolver, and kept as given (``Normal(0.0, 2.0).scale`` is 2).
    ``log_prob`` is :func:`~probloss.functional.normal_log_prob` of the form given
    (``scale=`` or ``log_scale=``) and ``entropy`` is
    :math:`\tfrac12\log 2\pi e + \log\sigma`, from ``log_scale`` directly (no
    ``log(scale)`` of an ``exp`` that under- or overflows: ``log_scale = -120`` is fine in
    float32); both are float32 for half-precision parameters. ``cdf`` is
    ``erfc(-z / sqrt 2) / 2`` at ``z = (x - mu) e^{-log_scale}`` and ``icdf`` is
    ``mu + e^{log_scale} ndtri(p)``, both accurate in the lower tail, where the
    ``erf``/``erfinv`` forms (and torch's ``ndtr``) lose it: torch's ``icdf`` is ``-inf``
    at ``p = e^{-32}`` in float32 (true -7.62); products with
    ``e^{+-log_scale}`` formed by :func:`~probloss.special.mul_exp` (so ``x - mu`` and
    the scale may be huge or tiny where the result is not), and ``rsample`` (``sample``) is
    ``mu + e^{log_scale} eps`` the same way; half precision is evaluated in float32 and
    returned in the parameters' dtype. ``kl_divergence`` with another probloss or torch
    ``Normal`` is :func:`~probloss.functional.normal_kl` (registered in
    :mod:`probloss.distributions.kl`).

    Args:
        loc: mean, any shape.
        scale: standard deviation (positive), broadcastable with ``loc``; torch's meaning.
        validate_args: as in ``torch.distributions`` (checks CPU tensors only by default);
            third positionally, as in torch.
        log_scale: keyword-only alternative, the log standard deviation (any real); pass
            exactly one of ``scale`` and ``log_scale``.

    Raises:
        ValueError: not exactly one of ``scale`` / ``log_scale``; a non-positive ``scale``
            or a NaN parameter when validating.

    Example:
        >>> Normal(0.0, 2.0).scale  # positional: the scale, as in torch
        tensor(2.)
        >>> d = Normal(torch.tensor(0.0), log_scale=torch.tensor(-120.0))
        >>> d.log_prob(torch.tensor(0.0)), d.scale  # torch's Normal cannot even be built
        (tensor(119.0811), tensor(0.))
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "loc": constraints.real,
        "log_scale": constraints.real,
    }

    def __init__(
        self,
        loc: Tensor | float,
        scale: Tensor | float | None = None,
        validate_args: bool | None = None,
        *,
        log_scale: Tensor | float | None = None,
    ) -> None:
        if (scale is None) == (log_scale is None):
            raise ValueError(
                "Normal: pass exactly one of scale (positional, as in torch) and log_scale "
                "(keyword)"
            )
        if scale is not None:
            loc, scale = broadcast_all(loc, scale)
            check = distribution_validate_args(validate_args, scale)
            try:
                log_scale = log_scale_from(scale=scale, validate_args=check)
            except ValueError as error:  # say what changed for code written for the old order
                raise ValueError(
                    f"{error}; Normal's second positional argument is the scale, as in torch: "
                    "pass a log-scale as log_scale="
                ) from None
        loc, log_scale = broadcast_all(loc, log_scale)
        self.log_scale = log_scale
        self._scale_given = scale is not None  # log_prob then uses the given scale itself
        validate_args = distribution_validate_args(validate_args, loc, log_scale)
        scale = log_scale.exp() if scale is None else scale.expand(log_scale.shape)
        super().__init__(loc, scale, validate_args=False)  # checked next, faster
        set_validation(self, validate_args)

    def expand(self, batch_shape: torch.Size, _instance=None) -> Normal:
        new = self._get_checked_instance(Normal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        new.log_scale = self.log_scale.expand(batch_shape)
        new._scale_given = self._scale_given
        torch.distributions.Distribution.__init__(new, batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        # the form it was given in: a scale is not sent through log and exp (the core's rule)
        form = {"scale": self.scale} if self._scale_given else {"log_scale": self.log_scale}
        return normal_log_prob(value, self.loc, **form, validate_args=False)

    def entropy(self) -> Tensor:
        log_scale = upcast(self.log_scale)  # half: computed and returned in float32
        return _HALF_LOG_2PI_E + log_scale  # 1/2 log(2 pi e sigma^2)

    def cdf(self, value: Tensor) -> Tensor:
        r"""``Phi(z) = erfc(-z / sqrt 2) / 2``, ``z = (x - mu) e^{-log_scale}``, both tails.

        ``z`` is ``2 mul_exp(x/2 - mu/2, -log_scale)`` (the halves cannot overflow where
        ``x - mu`` does); beyond :func:`_saturation` the CDF is the exact 0 or 1 with zero
        gradients (``z`` is then not formed, so no ``0 * inf`` reaches the backward).
        """
        if self._validate_args:
            self._validate_sample(value)
        value, loc, log_scale = torch.broadcast_tensors(
            torch.as_tensor(value, dtype=self.loc.dtype, device=self.loc.device),
            self.loc,
            self.log_scale,
        )
        dtype = torch.promote_types(value.dtype, self.loc.dtype)
        value, loc, log_scale = upcast(value.to(dtype)), upcast(loc), upcast(log_scale)
        # x - mu, or 2 (x/2 - mu/2) where x - mu overflows (halving x - mu always would
        # round a subnormal difference to 0)
        step = value - loc
        overflow = torch.isinf(step) & torch.isfinite(value) & torch.isfinite(loc)
        step = torch.where(overflow, 0.5 * value - 0.5 * loc, step)
        cut = _saturation(step.dtype)
        with torch.no_grad():
            z = mul_exp(step, -log_scale)
            saturated = z.abs() > torch.where(overflow, 0.5 * cut, cut)  # NaN compares False
        z = mul_exp(torch.where(saturated, 0.0, step), -log_scale)
        z = torch.where(overflow, z + z, z)
        step = torch.where(step > 0, 1.0, 0.0)
        # Phi(z) = erfc(-z / sqrt 2) / 2: relative accuracy in both tails (torch's ndtr is
        # 0 at z = -10 even in float64, true 7.6e-24)
        cdf = 0.5 * torch.special.erfc(z * -_SQRT1_2)
        return torch.where(saturated, step, cdf).to(dtype)

    def icdf(self, value: Tensor) -> Tensor:
        r"""``mu + e^{log_scale} ndtri(p)``: exact to the smallest subnormal ``p``.

        ``ndtri(0) = -inf`` and ``ndtri(1) = inf``; ``p`` outside ``[0, 1]`` gives NaN.
        """
        if self._validate_args:
            self._validate_sample(value)
        value = torch.as_tensor(value, dtype=self.loc.dtype, device=self.loc.device)
        dtype = torch.promote_types(value.dtype, self.loc.dtype)
        p, loc, log_scale = torch.broadcast_tensors(
            upcast(value.to(dtype)), upcast(self.loc), upcast(self.log_scale)
        )
        return _NormalIcdf.apply(p, loc, log_scale).to(dtype)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """``mu + e^{log_scale} eps``, ``eps ~ N(0, 1)``, formed by ``mul_exp``."""
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        out = _loc_plus_scaled(upcast(self.loc), upcast(eps), upcast(self.log_scale))
        return out.to(self.loc.dtype)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """:meth:`rsample` without a graph (torch's would draw with ``exp(log_scale)``)."""
        with torch.no_grad():
            return self.rsample(sample_shape)
