r"""Every closed-form KL divergence of probloss's distributions, registered with torch.

``torch.distributions.kl_divergence(q, p)`` looks up the most specific registered pair of
classes. This module registers, and is the only place that registers, each family's closed
form through the functional core:

* ``Normal`` with ``Normal`` or torch's ``Normal``: :func:`~probloss.functional.normal_kl`;
* ``ContinuousBernoulli`` with ``ContinuousBernoulli`` or torch's:
  :func:`~probloss.functional.continuous_bernoulli_kl`;
* ``BivariateNormal`` with ``BivariateNormal`` or a torch ``MultivariateNormal`` of event
  size 2: :func:`bivariate_normal_kl` (two :func:`~probloss.functional.normal_kl` terms);

each pair in both orders. probloss's ``Normal`` subclasses torch's, so without these
entries torch's own formula (``var_q / var_p`` from ``scale ** 2``) would be used: NaN at
``log_scale = -120`` in float32, where the scale underflows to 0 (the KL to
``log_scale = -119`` is 0.5677). A
torch parameter (``scale``, ``logits``, ``scale_tril``) is converted to the stable form
once; a probloss parameter is used as it is stored.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import ContinuousBernoulli as TorchContinuousBernoulli
from torch.distributions import MultivariateNormal, register_kl
from torch.distributions import Normal as TorchNormal

from .._core.constants import LOG_2
from .._core.dtype import as_loss_tensors
from .._core.params import log_scale_from
from ..functional import continuous_bernoulli_kl, normal_kl
from ..functional._params import standardized_residual
from ..special import log_cosh, mul_exp
from .bivariate_normal import BivariateNormal
from .continuous_bernoulli import ContinuousBernoulli
from .normal import Normal


def _normal_kl_of(q: TorchNormal, p: TorchNormal) -> Tensor:
    """:func:`~probloss.functional.normal_kl` of two normals, each probloss's or torch's."""
    ls_q, ls_p = _log_scale(q), _log_scale(p)
    # log var = 2 log sigma (the doubling is exact)
    return normal_kl(loc_q=q.loc, log_var_q=2.0 * ls_q, loc_p=p.loc, log_var_p=2.0 * ls_p)


def _log_scale(d: TorchNormal) -> Tensor:
    if isinstance(d, Normal):
        return d.log_scale
    return log_scale_from(scale=d.scale, validate_args=False)  # torch checked it, if asked


register_kl(Normal, Normal)(_normal_kl_of)
register_kl(Normal, TorchNormal)(_normal_kl_of)
register_kl(TorchNormal, Normal)(_normal_kl_of)


def _continuous_bernoulli_kl_of(q, p) -> Tensor:
    """:func:`~probloss.functional.continuous_bernoulli_kl` of the two ``logits``."""
    return continuous_bernoulli_kl(q.logits, p.logits)


register_kl(ContinuousBernoulli, ContinuousBernoulli)(_continuous_bernoulli_kl_of)
register_kl(ContinuousBernoulli, TorchContinuousBernoulli)(_continuous_bernoulli_kl_of)
register_kl(TorchContinuousBernoulli, ContinuousBernoulli)(_continuous_bernoulli_kl_of)


def bivariate_normal_kl(
    loc_q: Tensor,
    log_scale_q: Tensor,
    atanh_rho_q: Tensor,
    loc_p: Tensor,
    log_scale_p: Tensor,
    atanh_rho_p: Tensor,
) -> Tensor:
    r"""``KL(q || p)`` between bivariate normals in the parameters of :class:`BivariateNormal`.

    By the chain rule, first coordinate then the second given the first:

    .. math::
        \mathrm{KL}(q\,\|\,p) = \mathrm{KL}(q_1\,\|\,p_1)
            + \mathrm{KL}\big(\mathcal N(\mu_{q2}, \sigma_{q2}^2/\cosh^2 a_q)\,\big\|\,
              \mathcal N(\mu_{p2} + \rho_p\sigma_{p2} z_1, \sigma_{p2}^2/\cosh^2 a_p)\big)
            + \tfrac12 w^2,

    :math:`z_1 = (\mu_{q1} - \mu_{p1})/\sigma_{p1}`: the conditionals
    :math:`x_2 \mid x_1` are normal with variance :math:`\sigma_2^2 (1 - \rho^2) =
    \sigma_2^2 / \cosh^2 a` and a mean linear in :math:`x_1`; averaged over
    :math:`x_1 \sim q_1` their KL is the one at :math:`x_1 = \mu_{q1}` plus the slopes'
    difference, :math:`w = (\rho_q e^{\delta_2} - \rho_p e^{\delta_1}) \cosh a_p` with
    :math:`\delta_i = \log\sigma_{qi} - \log\sigma_{pi}`. The first two terms are
    :func:`~probloss.functional.normal_kl` (log-variances ``2 (log_scale - log_cosh(a))``,
    never ``1 - tanh^2``), so all three are non-negative, the sum is 0 at ``q == p`` and,
    at zero correlations, exactly the sum of the two marginal ``normal_kl``. ``w`` is
    formed without cancellation or overflow from

    .. math::
        w = 2\rho_q \tanh(h)\, e^{\log\cosh h + (\delta_1 + \delta_2)/2 + \log\cosh a_p}
            + \tanh(a_q - a_p)\, e^{\log\cosh(a_q - a_p) + \delta_1 - \log\cosh a_q},
        \qquad h = (\delta_2 - \delta_1)/2,

    (:math:`e^{\delta_2} - e^{\delta_1} = 2 e^{(\delta_1+\delta_2)/2}\sinh h` and
    :math:`(\tanh a_q - \tanh a_p)\cosh a_p = \sinh(a_q - a_p)/\cosh a_q`), each product by
    :func:`~probloss.special.mul_exp`: exact where ``tanh`` rounds to 1 and finite wherever
    the KL is.

    Args:
        loc_q, loc_p: means, shape ``(*, 2)``.
        log_scale_q, log_scale_p: log standard deviations, shape ``(*, 2)``.
        atanh_rho_q, atanh_rho_p: ``atanh`` of the correlations, shape ``(*)``.

    Returns:
        Tensor of the broadcast batch shape ``(*)``; float32 for half-precision inputs.

    Example:
        >>> zero, one = torch.zeros(2), torch.ones(2)
        >>> bivariate_normal_kl(zero, zero, torch.tensor(20.0), one, zero, torch.tensor(20.0))
        tensor(0.5000)
    """
    loc_q, ls_q, a_q, loc_p, ls_p, a_p = as_loss_tensors(
        loc_q=loc_q,
        log_scale_q=log_scale_q,
        atanh_rho_q=atanh_rho_q,
        loc_p=loc_p,
        log_scale_p=log_scale_p,
        atanh_rho_p=atanh_rho_p,
    )
    (mq1, mq2), (mp1, mp2) = loc_q.unbind(-1), loc_p.unbind(-1)
    (lq1, lq2), (lp1, lp2) = ls_q.unbind(-1), ls_p.unbind(-1)
    first = normal_kl(loc_q=mq1, log_var_q=2.0 * lq1, loc_p=mp1, log_var_p=2.0 * lp1)
    lc_q, lc_p = log_cosh(a_q), log_cosh(a_p)
    z1 = standardized_residual(mq1, mp1, lp1)
    # p's conditional mean at x1 = mu_q1: mu_p2 + rho_p sigma_p2 z1
    cond_loc_p = mp2 + mul_exp(torch.tanh(a_p) * z1, lp2)
    second = normal_kl(
        loc_q=mq2,
        log_var_q=2.0 * (lq2 - lc_q),
        loc_p=cond_loc_p,
        log_var_p=2.0 * (lp2 - lc_p),
    )
    d1, d2 = lq1 - lp1, lq2 - lp2
    h, da = 0.5 * (d2 - d1), a_q - a_p
    w = mul_exp(
        torch.tanh(a_q) * torch.tanh(h), LOG_2 + log_cosh(h) + (0.5 * d1 + 0.5 * d2) + lc_p
    ) + mul_exp(torch.tanh(da), log_cosh(da) + d1 - lc_q)
    return first + second + (0.5 * w) * w  # (w/2) w: no w^2 overflow below the result's


def _bivariate_parameters(d) -> tuple[Tensor, Tensor, Tensor]:
    """``(loc, log_scale, atanh_rho)`` of a ``BivariateNormal`` or a torch
    ``MultivariateNormal`` of event size 2 (from its Cholesky factor ``L``)."""
    if isinstance(d, BivariateNormal):
        return d.loc, d.log_scale, d.atanh_rho
    if d.event_shape != (2,):
        raise ValueError(
            "kl_divergence between a BivariateNormal and a MultivariateNormal needs event "
            f"shape (2,); got {tuple(d.event_shape)}"
        )
    tril = d.scale_tril
    l11, l21, l22 = tril[..., 0, 0], tril[..., 1, 0], tril[..., 1, 1]
    scale = torch.stack((l11, torch.hypot(l21, l22)), -1)  # sigma_2^2 = L21^2 + L22^2
    log_scale = log_scale_from(scale=scale, validate_args=False)
    # rho = L21 / hypot(L21, L22), so sinh(atanh rho) = rho / sqrt(1 - rho^2) = L21 / L22
    return d.loc, log_scale, torch.asinh(l21 / l22)


def _bivariate_normal_kl_of(q, p) -> Tensor:
    """:func:`bivariate_normal_kl` of two bivariate normals, probloss's or torch's."""
    return bivariate_normal_kl(*_bivariate_parameters(q), *_bivariate_parameters(p))


register_kl(BivariateNormal, BivariateNormal)(_bivariate_normal_kl_of)
register_kl(BivariateNormal, MultivariateNormal)(_bivariate_normal_kl_of)
register_kl(MultivariateNormal, BivariateNormal)(_bivariate_normal_kl_of)
