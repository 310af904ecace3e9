r"""Every closed-form KL divergence of probloss's distributions, registered with torch.

``torch.distributions.kl_divergence(q, p)`` looks up the most specific registered pair of
classes. This module registers, and is the only place that registers, each family's closed
form through the functional core:

* ``Normal`` with ``Normal`` or torch's ``Normal``: :func:`~probloss.functional.normal_kl`;
* ``ContinuousBernoulli`` with ``ContinuousBernoulli`` or torch's:
  :func:`~probloss.functional.continuous_bernoulli_kl`;
* ``BivariateNormal`` with ``BivariateNormal`` or a torch ``MultivariateNormal`` of event
  size 2: :func:`~probloss.functional.bivariate_normal_kl` (the chain rule over two
  :func:`~probloss.functional.normal_kl` terms);

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

from .._core.params import log_scale_from
from ..functional import bivariate_normal_kl, continuous_bernoulli_kl, normal_kl
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
    """:func:`~probloss.functional.bivariate_normal_kl` of two bivariate normals, probloss's
    or torch's."""
    return bivariate_normal_kl(*_bivariate_parameters(q), *_bivariate_parameters(p))


register_kl(BivariateNormal, BivariateNormal)(_bivariate_normal_kl_of)
register_kl(BivariateNormal, MultivariateNormal)(_bivariate_normal_kl_of)
register_kl(MultivariateNormal, BivariateNormal)(_bivariate_normal_kl_of)
