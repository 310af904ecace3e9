r"""Gaussian mixtures (mixture density networks) as ``torch.distributions.Distribution`` s.

What they share (weights, ``log_prob``, sampling at a temperature, ``expand``, mean and
mode) is :class:`~._mixture_base.GaussianMixture`; each class here names its parameters,
its functional log density and sampler, its components and its second moments.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor
from torch.distributions import MultivariateNormal, constraints

from .._core.dtype import compute_dtype, promote_float_tensors, upcast
from ..functional.mixture import (
    bivariate_normal_mixture_covariance,
    bivariate_normal_mixture_log_prob,
    bivariate_normal_mixture_sample,
    multivariate_normal_mixture_log_prob,
    normal_mixture_log_prob,
    normal_mixture_sample,
    normal_mixture_variance,
)
from ..functional.mixture._second_moments import second_moments
from ..functional.mixture.sampling import _check_temperature, _component_index, _pick
from ._mixture_base import MATRIX, VECTOR, GaussianMixture
from .bivariate_normal import BivariateNormal
from .normal import Normal


class NormalMixture(GaussianMixture):
    r"""Mixture of ``K`` diagonal normals in ``D`` dimensions (the MDN of Bishop 1994).

    .. math::
        p(x) = \sum_{k=1}^K \pi_k \prod_{d=1}^D \mathcal N(x_d \mid \mu_{kd}, \sigma_{kd}^2),
        \qquad \pi = \operatorname{softmax}(\ell), \quad \sigma = e^{\log\sigma}

    from unconstrained parameters. ``log_prob`` is
    :func:`~probloss.functional.mixture.normal_mixture_log_prob` (log-sum-exp of log
    densities, finite far from every component); half-precision parameters give a float32
    ``log_prob`` (docs/numerics.md, half precision), while samples and moments are
    computed in float32 and returned in the parameters' dtype. ``mean`` and ``variance``
    are the exact mixture moments (law of total variance); ``mode`` is the mean of the
    most probable component, **not** the mode of the mixture density (see
    :func:`~probloss.functional.normal_mixture_mode`).
    :meth:`sample_with_temperature` samples as sketch-rnn does (weights
    :math:`\operatorname{softmax}(\ell/\tau)`, variances :math:`\tau\sigma^2`).

    ``has_rsample`` is ``False`` and :meth:`rsample` raises ``NotImplementedError`` (as for
    ``torch.distributions.MixtureSameFamily``): a mixture has no standard
    reparameterisation with respect to its weights, and code that checks ``has_rsample``
    (Monte-Carlo ELBOs and other pathwise objectives) expects unbiased gradients for
    *every* parameter. The differentiable draw that exists, the conditional pathwise
    estimator (component drawn without gradient, pathwise gradient to ``loc`` and
    ``log_scale`` only, none to ``logits``: unbiased for the component
    parameters, biased for the weights), is available by name for those who want exactly
    that: :mod:`probloss.functional.mixture.sampling`. :meth:`sample` and
    :meth:`sample_with_temperature` run under ``torch.no_grad()``.

    Args:
        logits: mixture logits :math:`\ell`, shape ``(*, K)``.
        loc: component means, shape ``(*, K, D)``.
        log_scale: component log standard deviations, shape ``(*, K, D)``.
        validate_args: as in ``torch.distributions``.

    ``batch_shape`` is the broadcast ``(*)``, ``event_shape`` is ``(D,)``.

    Example:
        >>> d = NormalMixture(torch.tensor([0.0, 2.0]), torch.tensor([[-5.0], [5.0]]),
        ...                   torch.zeros(2, 1))
        >>> d.log_prob(torch.tensor([[-5.0], [5.0], [50.0]]))  # finite far from both
        tensor([   -3.0459,    -1.0459, -1013.5459])
        >>> d.mean, d.variance, d.mode
        (tensor([3.8080]), tensor([11.4994]), tensor([5.]))
        >>> g = torch.Generator().manual_seed(0)
        >>> d.sample_with_temperature(0.5, (3,), generator=g)
        tensor([[5.8941],
                [4.5139],
                [5.1134]])
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "logits": VECTOR,
        "loc": MATRIX,
        "log_scale": MATRIX,
    }
    _log_prob_fn = staticmethod(normal_mixture_log_prob)
    _sample_fn = staticmethod(normal_mixture_sample)

    def __init__(
        self,
        logits: Tensor,
        loc: Tensor,
        log_scale: Tensor,
        validate_args: bool | None = None,
    ) -> None:
        self._init_params(None, validate_args, logits=logits, loc=loc, log_scale=log_scale)

    @property
    def component_distribution(self) -> Normal:
        """The components as :class:`~probloss.distributions.Normal` with batch
        ``(*, K, D)`` (scalar events; ``Independent(..., 1)`` makes ``D`` the event)."""
        return Normal(self.loc, log_scale=self.log_scale, validate_args=self._validate_args)

    @property
    def variance(self) -> Tensor:
        """Law of total variance, shape ``(*batch_shape, D)``."""
        return normal_mixture_variance(self.logits, self.loc, self.log_scale)


class BivariateNormalMixture(GaussianMixture):
    r"""Mixture of ``K`` correlated bivariate normals (Graves 2013 eqs. 23-25, sketch-rnn).

    .. math::
        p(x) = \sum_{k=1}^K \pi_k\, \mathcal N(x \mid \mu_k, \sigma_k, \rho_k), \qquad
        \pi = \operatorname{softmax}(\ell), \quad \sigma_k = e^{\log\sigma_k}, \quad
        \rho_k = \tanh a_k

    from unconstrained parameters; each component is a
    :class:`~probloss.distributions.BivariateNormal`. ``log_prob`` is
    :func:`~probloss.functional.mixture.bivariate_normal_mixture_log_prob` (log space,
    exact where ``tanh`` rounds to ``+-1``; float32 for half-precision parameters, whose
    samples and moments are computed in float32 and returned in the parameters' dtype).
    ``mean`` and ``covariance_matrix`` are the exact mixture moments (law of total
    covariance), ``variance`` its diagonal; ``mode`` is the mean of the most probable
    component, **not** the mode of the mixture density. Samples use
    :math:`\sqrt{1-\rho^2} = 1/\cosh a`, so saturated correlations give points on the
    line, never NaN; :meth:`sample_with_temperature` is sketch-rnn's temperature
    (weights :math:`\operatorname{softmax}(\ell/\tau)`, covariances :math:`\tau\Sigma_k`,
    correlations unchanged).

    ``has_rsample`` is ``False`` and :meth:`rsample` raises ``NotImplementedError`` (as for
    ``torch.distributions.MixtureSameFamily``): a mixture has no standard
    reparameterisation with respect to its weights, and code that checks ``has_rsample``
    (Monte-Carlo ELBOs and other pathwise objectives) expects unbiased gradients for
    *every* parameter. The differentiable draw that exists, the conditional pathwise
    estimator (component drawn without gradient, pathwise gradient to ``loc`` /
    ``log_scale`` / ``atanh_rho`` only, none to ``logits``: unbiased for the component
    parameters, biased for the weights), is available by name for those who want exactly
    that: :mod:`probloss.functional.mixture.sampling`. :meth:`sample` and
    :meth:`sample_with_temperature` run under ``torch.no_grad()``.

    Args:
        logits: mixture logits :math:`\ell`, shape ``(*, K)``.
        loc: component means, shape ``(*, K, 2)``.
        log_scale: component log standard deviations, shape ``(*, K, 2)``.
        atanh_rho: :math:`a_k = \operatorname{atanh}\rho_k`, shape ``(*, K)``.
        validate_args: as in ``torch.distributions``.

    ``batch_shape`` is the broadcast ``(*)``, ``event_shape`` is ``(2,)``.

    Example:
        >>> d = BivariateNormalMixture(torch.zeros(2), torch.tensor([[-1.0, -1.0], [1.0, 1.0]]),
        ...                            torch.zeros(2, 2), torch.tensor([0.0, 50.0]))
        >>> d.log_prob(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))  # rho = tanh(50) = 1.0
        tensor([46.7758, -4.5310])
        >>> d.covariance_matrix
        tensor([[2.0000, 1.5000],
                [1.5000, 2.0000]])
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "logits": VECTOR,
        "loc": MATRIX,
        "log_scale": MATRIX,
        "atanh_rho": VECTOR,
    }
    _log_prob_fn = staticmethod(bivariate_normal_mixture_log_prob)
    _sample_fn = staticmethod(bivariate_normal_mixture_sample)

    def __init__(
        self,
        logits: Tensor,
        loc: Tensor,
        log_scale: Tensor,
        atanh_rho: Tensor,
        validate_args: bool | None = None,
    ) -> None:
        self._init_params(
            2, validate_args, logits=logits, loc=loc, log_scale=log_scale, atanh_rho=atanh_rho
        )

    @property
    def component_distribution(self) -> BivariateNormal:
        """The components as :class:`~probloss.distributions.BivariateNormal`, batch
        ``(*, K)``, event ``(2,)``."""
        return BivariateNormal(
            self.loc, self.log_scale, self.atanh_rho, validate_args=self._validate_args
        )

    @property
    def covariance_matrix(self) -> Tensor:
        """Law of total covariance, shape ``(*batch_shape, 2, 2)``."""
        return bivariate_normal_mixture_covariance(
            self.logits, self.loc, self.log_scale, self.atanh_rho
        )

    @property
    def variance(self) -> Tensor:
        """The diagonal of :attr:`covariance_matrix`, shape ``(*batch_shape, 2)``."""
        return normal_mixture_variance(self.logits, self.loc, self.log_scale)


def multivariate_normal_mixture_sample(
    logits: Tensor,
    loc: Tensor,
    scale_tril: Tensor,
    *,
    temperature: float = 1.0,
    sample_shape: torch.Size | tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Draw from a full-covariance normal mixture at temperature :math:`\tau`.

    :math:`k \sim \operatorname{Categorical}(\operatorname{softmax}(\ell/\tau))`,
    :math:`x = \mu_k + \sqrt\tau\, L_k \epsilon`, :math:`\epsilon \sim \mathcal N(0, I_D)`:
    the temperature semantics and the component draw of
    :mod:`probloss.functional.mixture.sampling`. Computed in float32 for half-precision
    parameters and returned in the parameters' dtype; shape ``(*sample_shape, *, D)``.
    """
    tau = _check_temperature(temperature)
    dtype = loc.dtype
    compute = compute_dtype(dtype)
    logits, loc, scale_tril = (t.to(compute) for t in (logits, loc, scale_tril))
    index = _component_index(logits, tau, torch.Size(sample_shape), generator)
    mean = _pick(loc, index, 1)
    if tau == 0.0:
        return mean.to(dtype)
    tril = _pick(scale_tril, index, 2)
    eps = torch.randn(mean.shape, generator=generator, dtype=compute, device=mean.device)
    step = (tril @ eps.unsqueeze(-1)).squeeze(-1)
    return (mean + math.sqrt(tau) * step).to(dtype)


class MultivariateNormalMixture(GaussianMixture):
    r"""Mixture of ``K`` normals in ``D`` dimensions with full covariances :math:`L_k L_k^\top`.

    .. math::
        p(x) = \sum_{k=1}^K \pi_k\, \mathcal N(x \mid \mu_k, L_k L_k^\top), \qquad
        \pi = \operatorname{softmax}(\ell)

    ``log_prob`` is
    :func:`~probloss.functional.mixture.multivariate_normal_mixture_log_prob` (one
    triangular solve per component, no covariance formed, no Cholesky decomposition);
    ``mean`` and ``variance`` (the diagonal of the covariance) are the exact mixture
    moments (law of total variance); ``mode`` is the mean of the most probable component,
    **not** the mode of the mixture density. :meth:`sample_with_temperature` draws at
    temperature :math:`\tau` (weights :math:`\operatorname{softmax}(\ell/\tau)`,
    covariances :math:`\tau L_k L_k^\top`). ``mixture_distribution`` and
    ``component_distribution`` are ``torch.distributions``' ``Categorical`` and
    ``MultivariateNormal``, as for a ``MixtureSameFamily``.

    Dtypes, as for every probloss distribution: half-precision parameters give a float32
    ``log_prob`` (docs/numerics.md, half precision); samples, ``mean``, ``variance`` and
    ``mode`` are computed in float32 and returned in the parameters' dtype. No
    ``rsample`` (see :class:`NormalMixture`); :meth:`sample` runs under
    ``torch.no_grad()``.

    Args:
        logits: mixture logits :math:`\ell`, shape ``(*, K)``.
        loc: component means, shape ``(*, K, D)``.
        scale_tril: lower-triangular :math:`L_k` with positive diagonals, shape
            ``(*, K, D, D)`` (from network outputs:
            :func:`~probloss.functional.multivariate.scale_tril_from_raw`).
        validate_args: as in ``torch.distributions``.

    ``batch_shape`` is the broadcast ``(*)``, ``event_shape`` is ``(D,)``.

    Example:
        >>> L = torch.tensor([[[1.0, 0.0], [0.9, 0.1]], [[2.0, 0.0], [0.0, 2.0]]])
        >>> d = MultivariateNormalMixture(torch.tensor([1.0, 0.0]), torch.zeros(2, 2), L)
        >>> d.log_prob(torch.tensor([1.0, 0.9]))
        tensor(-0.3365)
        >>> d.variance  # 0.7311 * (1, 0.82) + 0.2689 * (4, 4)
        tensor([1.8068, 1.6752])
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "logits": VECTOR,
        "loc": MATRIX,
        "scale_tril": constraints.independent(constraints.lower_cholesky, 1),
    }
    # the parameters were checked once, at construction (when validating)
    @staticmethod
    def _log_prob_fn(value: Tensor, *parameters: Tensor) -> Tensor:
        # a function, not functools.partial: torch.export (strict) cannot trace a partial
        return multivariate_normal_mixture_log_prob(value, *parameters, validate_args=False)
    _sample_fn = staticmethod(multivariate_normal_mixture_sample)

    def __init__(
        self,
        logits: Tensor,
        loc: Tensor,
        scale_tril: Tensor,
        validate_args: bool | None = None,
    ) -> None:
        logits, loc, scale_tril = promote_float_tensors(
            logits=logits, loc=loc, scale_tril=scale_tril
        )
        d = loc.shape[-1] if loc.dim() >= 2 else None
        if d is not None and scale_tril.dim() >= 3 and scale_tril.shape[-2:] != (d, d):
            raise ValueError(
                f"scale_tril must have shape (*, K, D, D) = (*, K, {d}, {d}) (D = {d} from loc "
                f"{tuple(loc.shape)}); got shape {tuple(scale_tril.shape)}"
            )
        self._init_params(None, validate_args, logits=logits, loc=loc, scale_tril=scale_tril)

    @property
    def component_distribution(self) -> MultivariateNormal:
        """The components as ``torch.distributions.MultivariateNormal``, batch ``(*, K)``."""
        return MultivariateNormal(self.loc, scale_tril=self.scale_tril, validate_args=False)

    @property
    def variance(self) -> Tensor:
        """``sum_k pi_k (diag(L_k L_k^T) + (mu_k - mean)^2)``, shape ``(*batch_shape, D)``."""
        logits, loc, scale_tril = (upcast(t) for t in (self.logits, self.loc, self.scale_tril))
        # (Sigma_k)_ii = sum_j (L_k)_ij^2, differentiated by L directly (second_moments)
        return second_moments(logits, loc, None, None, scale_tril).to(self.loc.dtype)
