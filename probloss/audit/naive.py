r"""The naive losses of the user stories, written as users write them, and probloss's versions.

Each naive function is the textbook formula in probability space, exactly as it appears in
tutorials and issue threads, and each breaks; its ``stable_`` twin takes the same arguments
and calls probloss. They exist to be audited (``probloss audit FILE.py:FUNCTION``)::

    probloss audit probloss/audit/naive.py:naive_cb_mean          # fails, exit 1
    probloss audit probloss.audit.naive:stable_cb_mean            # passes, exit 0
    probloss audit probloss.audit.naive:naive_bivariate_nll \
        --domain x1=real[-1,1] --domain x2=real[-1,1] --domain mu1=real[-1,1] \
        --domain mu2=real[-1,1] --domain log_sigma1=real[-1,1] \
        --domain log_sigma2=real[-1,1] --domain raw_rho=real[-20,20]
    probloss audit probloss.audit.naive:naive_mixture_nll \
        --domain logit=real[-5,5] --domain mu1=real[-5,5] --domain mu2=real[-5,5] \
        --domain log_sigma1=real[-3,3] --domain log_sigma2=real[-3,3]

All arguments are per-point scalars (one tensor per argument, broadcast elementwise) and
every function returns one loss per point, unreduced.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..functional import bivariate_normal_nll, normal_mixture_log_prob
from ..special import cb_mean

__all__ = [
    "BIVARIATE_DOMAINS",
    "MIXTURE_DOMAINS",
    "domain_options",
    "naive_bivariate_nll",
    "naive_cb_mean",
    "naive_mixture_nll",
    "stable_bivariate_nll",
    "stable_cb_mean",
    "stable_mixture_nll",
]

# The domains the examples are audited on (the docstring's commands): unit-order data and
# parameters, with the correlation's raw output up to 20, where tanh saturates in float32.
BIVARIATE_DOMAINS = {
    **{k: "real[-1,1]" for k in ("x1", "x2", "mu1", "mu2", "log_sigma1", "log_sigma2")},
    "raw_rho": "real[-20,20]",
}
MIXTURE_DOMAINS = {
    "logit": "real[-5,5]",
    "mu1": "real[-5,5]",
    "mu2": "real[-5,5]",
    "log_sigma1": "real[-3,3]",
    "log_sigma2": "real[-3,3]",
}


def domain_options(domains: dict[str, str]) -> list[str]:
    """``{"rho": "correlation"}`` as the CLI's ``["--domain=rho=correlation"]``."""
    return [f"--domain={name}={kind}" for name, kind in domains.items()]


def naive_bivariate_nll(
    x1: Tensor,
    x2: Tensor,
    mu1: Tensor,
    mu2: Tensor,
    log_sigma1: Tensor,
    log_sigma2: Tensor,
    raw_rho: Tensor,
) -> Tensor:
    r"""Bivariate Gaussian NLL in probability space, as in Graves (2013) eqs. 20-25.

    .. math::
        -\log\Big(\frac{1}{2\pi\sigma_1\sigma_2\sqrt{1-\rho^2}}
            \exp\Big(-\frac{Z}{2(1-\rho^2)}\Big)\Big),
        \quad Z = \frac{(x_1-\mu_1)^2}{\sigma_1^2} + \frac{(x_2-\mu_2)^2}{\sigma_2^2}
            - \frac{2\rho(x_1-\mu_1)(x_2-\mu_2)}{\sigma_1\sigma_2}

    with the network outputs mapped as in Graves eqs. 21-22: :math:`\sigma = e^{\hat\sigma}`,
    :math:`\rho = \tanh\hat\rho`. Breaks (user story 1): ``tanh(raw_rho)`` rounds to 1 for
    ``|raw_rho| > 9.01`` in float32 (``0/0``: NaN), the density underflows to 0 a few scales
    from the mean (``log 0``), and ``exp(log_sigma)`` overflows.

    Args:
        x1, x2: the point, shape ``(*)`` each.
        mu1, mu2: the means, shape ``(*)``.
        log_sigma1, log_sigma2: :math:`\hat\sigma_i = \log\sigma_i`, shape ``(*)``.
        raw_rho: :math:`\hat\rho`, the pre-``tanh`` correlation, shape ``(*)``.

    Returns:
        The NLL per point, shape ``(*)``.

    Example:
        >>> zero = torch.tensor([0.0, 0.0])
        >>> naive_bivariate_nll(zero, zero, zero, zero, zero, zero, torch.tensor([0.0, 10.0]))
        tensor([1.8379,    nan])
    """
    sigma1, sigma2 = torch.exp(log_sigma1), torch.exp(log_sigma2)
    rho = torch.tanh(raw_rho)
    d1, d2 = x1 - mu1, x2 - mu2
    z = (d1 / sigma1) ** 2 + (d2 / sigma2) ** 2 - 2 * rho * d1 * d2 / (sigma1 * sigma2)
    one_minus_rho2 = 1 - rho**2
    pdf = torch.exp(-z / (2 * one_minus_rho2)) / (
        2 * math.pi * sigma1 * sigma2 * torch.sqrt(one_minus_rho2)
    )
    return -torch.log(pdf)


def stable_bivariate_nll(
    x1: Tensor,
    x2: Tensor,
    mu1: Tensor,
    mu2: Tensor,
    log_sigma1: Tensor,
    log_sigma2: Tensor,
    raw_rho: Tensor,
) -> Tensor:
    r""":func:`naive_bivariate_nll` through :func:`probloss.functional.bivariate_normal_nll`.

    The same loss in log space, with ``raw_rho`` as ``atanh_rho``, unreduced.

    Example:
        >>> zero = torch.tensor([0.0, 0.0])
        >>> stable_bivariate_nll(zero, zero, zero, zero, zero, zero, torch.tensor([0.0, 10.0]))
        tensor([ 1.8379, -7.4690])
    """
    value = torch.stack((x1, x2), dim=-1)
    loc = torch.stack((mu1, mu2), dim=-1)
    log_scale = torch.stack((log_sigma1, log_sigma2), dim=-1)
    return bivariate_normal_nll(value, loc, log_scale, raw_rho, reduction="none")


def _normal_pdf(x: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    return torch.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


def naive_mixture_nll(
    x: Tensor,
    logit: Tensor,
    mu1: Tensor,
    mu2: Tensor,
    log_sigma1: Tensor,
    log_sigma2: Tensor,
) -> Tensor:
    r"""Two-component 1-D mixture NLL from pdfs, as in mixture density network tutorials.

    .. math::
        -\log\big(w\,\mathcal N(x; \mu_1, \sigma_1) + (1 - w)\,\mathcal N(x; \mu_2, \sigma_2)\big),
        \qquad w = \operatorname{sigmoid}(\text{logit}), \quad \sigma_i = e^{\log\sigma_i}

    (Bishop 1994; a softmax of two logits is the sigmoid of their difference). Breaks (user
    story 2): both pdfs underflow to 0 once ``x`` is 14.4 scales from both means in
    float32 (38.6 in float64), giving ``-log 0 = inf`` and a NaN gradient.

    Args:
        x: targets, shape ``(*)``.
        logit: log-odds of the first component, shape ``(*)``.
        mu1, mu2: means, shape ``(*)``.
        log_sigma1, log_sigma2: log standard deviations, shape ``(*)``.

    Returns:
        The NLL per point, shape ``(*)``.

    Example:
        >>> zero = torch.tensor([0.0, 0.0])
        >>> naive_mixture_nll(torch.tensor([0.0, 20.0]), zero, zero, zero, zero, zero)
        tensor([0.9189,    inf])
    """
    w = torch.sigmoid(logit)
    pdf1 = _normal_pdf(x, mu1, torch.exp(log_sigma1))
    pdf2 = _normal_pdf(x, mu2, torch.exp(log_sigma2))
    return -torch.log(w * pdf1 + (1 - w) * pdf2)


def stable_mixture_nll(
    x: Tensor,
    logit: Tensor,
    mu1: Tensor,
    mu2: Tensor,
    log_sigma1: Tensor,
    log_sigma2: Tensor,
) -> Tensor:
    r""":func:`naive_mixture_nll` through :func:`probloss.functional.normal_mixture_log_prob`.

    The logits of the two components are ``(logit, 0)``; ``K = 2``, ``D = 1``.

    Audited on :data:`MIXTURE_DOMAINS` it has no non-finite value or gradient in any dtype,
    but the audit still exits 1: in float32, a target 20 to 90 scales from two nearly
    coincident components loses 2 to 3 digits of the gradient (up to 30x the tolerance; 7
    of 6357 points). ``z_k^2 / 2`` of each component is rounded on its own, while the
    responsibilities depend on their small difference, so the roundings do not cancel.
    Every log-sum-exp mixture shares this. ``torch.distributions.MixtureSameFamily`` on the
    same grid has 18 such points, plus 220 with NaN gradients at ``|x| = 1e36``.

    Example:
        >>> zero = torch.tensor([0.0, 0.0])
        >>> stable_mixture_nll(torch.tensor([0.0, 20.0]), zero, zero, zero, zero, zero)
        tensor([  0.9189, 200.9189])
    """
    logits = torch.stack((logit, torch.zeros_like(logit)), dim=-1)
    loc = torch.stack((mu1, mu2), dim=-1).unsqueeze(-1)
    log_scale = torch.stack((log_sigma1, log_sigma2), dim=-1).unsqueeze(-1)
    return -normal_mixture_log_prob(x.unsqueeze(-1), logits, loc, log_scale)


def naive_cb_mean(x: Tensor) -> Tensor:
    r"""Continuous-Bernoulli mean with the usual ``where`` patch (user story 4).

    .. math::
        \mu(x) = \begin{cases} \tfrac12 + \tfrac{x}{12} & |x| < 0.1 \\
            \dfrac{1}{1 - e^{-x}} - \dfrac{1}{x} & \text{otherwise} \end{cases}

    The value is finite, but autograd differentiates the unselected branch too: at
    ``x = 0`` its gradient is ``0 * inf = NaN`` (also in float64). Just above the cutoff
    ``1 - exp(-x)`` cancels, and the series is truncated too early for float32.

    Args:
        x: natural parameter, shape ``(*)``.

    Returns:
        The mean per point, shape ``(*)``.

    Example:
        >>> x = torch.tensor(0.0, requires_grad=True)
        >>> naive_cb_mean(x).backward()
        >>> x.grad
        tensor(nan)
    """
    return torch.where(x.abs() < 0.1, 0.5 + x / 12, 1 / (1 - torch.exp(-x)) - 1 / x)


def stable_cb_mean(x: Tensor) -> Tensor:
    r""":func:`naive_cb_mean` through :func:`probloss.special.cb_mean`: exact, finite gradient.

    Example:
        >>> x = torch.tensor(0.0, requires_grad=True)
        >>> stable_cb_mean(x).backward()
        >>> x.grad
        tensor(0.0833)
    """
    return cb_mean(x)
