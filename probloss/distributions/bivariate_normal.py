r"""A bivariate normal with correlation, parameterised by ``log_scale`` and ``atanh_rho``."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

from .._core.constants import LOG_2PI
from .._core.dtype import as_loss_tensors, promote_float_tensors, upcast
from .._core.shapes import BIVARIATE_LAYOUTS
from .._core.shapes import batch_shape as layout_batch_shape
from .._core.validation import distribution_validate_args, set_validation, validate_sample
from ..functional._bivariate_forms import CorrelatedStep, sech
from ..functional.bivariate import bivariate_normal_log_prob
from ..functional.mixture import bivariate_normal_mixture_covariance
from ..special import log_cosh, mul_exp

_ONE_PLUS_LOG_2PI = 1.0 + LOG_2PI


class BivariateNormal(Distribution):
    r"""Bivariate normal (Graves 2013 eqs. 24-25) from unconstrained parameters.

    .. math::
        x \sim \mathcal N\!\left(\mu, \begin{pmatrix} \sigma_1^2 & \rho\sigma_1\sigma_2 \\
            \rho\sigma_1\sigma_2 & \sigma_2^2 \end{pmatrix}\right), \qquad
        \sigma_i = e^{\text{log\_scale}_i}, \quad \rho = \tanh(\text{atanh\_rho})

    ``log_prob`` is :func:`~probloss.functional.bivariate.bivariate_normal_log_prob`
    (log space, exact where ``tanh`` rounds to ``+-1``). Samples are reparameterised,
    :math:`x = \mu + \sigma \odot (\epsilon_1,\ \rho\epsilon_1 + \epsilon_2/\cosh a)`,
    using :math:`\sqrt{1-\rho^2} = 1/\cosh a` (never ``1 - tanh^2``). The entropy is
    :math:`1 + \log 2\pi + \log\sigma_1 + \log\sigma_2 - \log\cosh a`, finite for every
    finite ``a``. ``log_prob`` and ``entropy`` of half-precision parameters are float32;
    samples (computed in float32) and moments are returned in the parameters' dtype.
    ``kl_divergence`` with another ``BivariateNormal`` or a torch ``MultivariateNormal`` of
    event size 2 is in closed form (:mod:`probloss.distributions.kl`).

    Args:
        loc: mean, shape ``(*, 2)``.
        log_scale: log standard deviations, shape ``(*, 2)``, broadcastable with ``loc``.
        atanh_rho: ``atanh`` of the correlation, shape ``(*)`` (no event dimension).
        validate_args: as in ``torch.distributions``.

    Example:
        >>> d = BivariateNormal(torch.zeros(2), torch.zeros(2), torch.tensor(20.0))
        >>> d.log_prob(torch.tensor([1.0, 1.0])), d.entropy()
        (tensor(16.9690), tensor(-16.4690))
        >>> _ = torch.manual_seed(0)
        >>> d.sample((2,))  # on the line x1 = x2 up to 1/cosh(20) = 4e-9 scales
        tensor([[ 1.5410,  1.5410],
                [-2.1788, -2.1788]])
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "loc": constraints.real_vector,
        "log_scale": constraints.real_vector,
        "atanh_rho": constraints.real,
    }
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        loc: Tensor,
        log_scale: Tensor,
        atanh_rho: Tensor,
        validate_args: bool | None = None,
    ) -> None:
        loc, log_scale, atanh_rho = promote_float_tensors(
            loc=loc, log_scale=log_scale, atanh_rho=atanh_rho
        )
        batch_shape = layout_batch_shape(
            BIVARIATE_LAYOUTS, loc=loc, log_scale=log_scale, atanh_rho=atanh_rho
        )
        self.loc = loc.expand((*batch_shape, 2))
        self.log_scale = log_scale.expand((*batch_shape, 2))
        self.atanh_rho = atanh_rho.expand(batch_shape)
        validate_args = distribution_validate_args(validate_args, loc, log_scale, atanh_rho)
        super().__init__(batch_shape, torch.Size((2,)), validate_args=False)  # checked next, faster
        set_validation(self, validate_args)

    def expand(self, batch_shape: torch.Size, _instance=None) -> BivariateNormal:
        new = self._get_checked_instance(BivariateNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand((*batch_shape, 2))
        new.log_scale = self.log_scale.expand((*batch_shape, 2))
        new.atanh_rho = self.atanh_rho.expand(batch_shape)
        super(BivariateNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def rho(self) -> Tensor:
        """The correlation ``tanh(atanh_rho)`` (may round to exactly +-1 where the log density,
        entropy and ``scale_tril`` stay exact)."""
        return torch.tanh(self.atanh_rho)

    @property
    def scale(self) -> Tensor:
        """Standard deviations ``exp(log_scale)``, shape ``(*batch_shape, 2)``."""
        return torch.exp(self.log_scale)

    @property
    def _sech(self) -> Tensor:
        # sqrt(1 - rho^2) = 1 / cosh(a), never 1 - tanh^2 (the samplers' one helper)
        return sech(self.atanh_rho)

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        return torch.exp(2.0 * self.log_scale)

    @property
    def stddev(self) -> Tensor:
        return self.scale

    @property
    def covariance_matrix(self) -> Tensor:
        """``[[s1^2, rho s1 s2], [rho s1 s2, s2^2]]``, shape ``batch_shape + (2, 2)``.

        The one-component case of
        :func:`~probloss.functional.bivariate_normal_mixture_covariance`:
        ``rho s1 s2 = rho e^{log s1 + log s2}`` in one product (``s1 s2`` alone overflows
        where the entry does not; ``0 * inf`` at ``rho = 0``), and ``d/d atanh_rho =
        sech^2(a) s1 s2`` formed as one exponential (``inf * 0`` through ``tanh``'s
        backward).
        """
        logits = torch.zeros((*self.batch_shape, 1), dtype=self.loc.dtype, device=self.loc.device)
        return bivariate_normal_mixture_covariance(
            logits,
            torch.zeros_like(self.loc).unsqueeze(-2),
            self.log_scale.unsqueeze(-2),
            self.atanh_rho.unsqueeze(-1),
        )

    @property
    def scale_tril(self) -> Tensor:
        """Cholesky factor ``[[s1, 0], [rho s2, s2 / cosh(a)]]`` (``L L^T`` = covariance)."""
        s1, s2 = self.scale.unbind(-1)
        zero = torch.zeros_like(s1)
        return torch.stack((s1, zero, self.rho * s2, s2 * self._sech), -1).unflatten(-1, (2, 2))

    def entropy(self) -> Tensor:
        r"""``1 + log 2 pi + log s1 + log s2 - log cosh a`` (``log(1 - rho^2) = -2 log cosh a``).

        The terms may each be near ``finfo.max`` and cancel (``log s1 = a = 3.4e38``): they
        are summed as halves, so no partial sum overflows unless the entropy does, and
        float32 (and half) parameters in float64 (not on MPS, which has none), where the
        sum of three float32 numbers is exact but for one rounding, then rounded once. The
        error is at most ``2 eps (|log s1| + |log s2| + log cosh a + 3)`` with ``eps`` that
        of the compute dtype (float64 for float32 inputs).
        """
        log_scale, atanh_rho = as_loss_tensors(log_scale=self.log_scale, atanh_rho=self.atanh_rho)
        dtype = log_scale.dtype
        if dtype == torch.float32 and log_scale.device.type != "mps":
            log_scale, atanh_rho = log_scale.double(), atanh_rho.double()
        ls1, ls2 = log_scale.unbind(-1)
        # 2 (x/2 + y/2 + z/2) = x + y + z: halving is exact (but for subnormals, below the bound)
        half = (0.5 * _ONE_PLUS_LOG_2PI - 0.5 * log_cosh(atanh_rho)) + 0.5 * ls1 + 0.5 * ls2
        return (2.0 * half).to(dtype)

    def log_prob(self, value: Tensor) -> Tensor:
        validate_sample(self, value)
        return bivariate_normal_log_prob(
            value, self.loc, self.log_scale, self.atanh_rho, validate_args=False
        )

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Reparameterised samples: ``loc + scale * (e1, rho e1 + e2 / cosh a)``.

        Computed in float32 for half-precision parameters (``exp(log_scale)`` alone
        overflows float16 at ``log_scale > 11.1``) and returned in their dtype; ``scale *
        z`` is :func:`~probloss.special.mul_exp`, finite wherever the draw is.
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        loc, log_scale, atanh_rho = (upcast(t) for t in (self.loc, self.log_scale, self.atanh_rho))
        eps = torch.randn(shape, dtype=loc.dtype, device=loc.device)
        e1, e2 = eps.unbind(-1)
        ls1, ls2 = log_scale.unbind(-1)
        # the second step's d/d atanh_rho as one exponential (the mixture sampler's helper)
        step = torch.stack((mul_exp(e1, ls1), CorrelatedStep.apply(atanh_rho, ls2, e1, e2)), -1)
        return (loc + step).to(self.loc.dtype)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)
