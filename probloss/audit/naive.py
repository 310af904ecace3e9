r"""The naive losses of the user stories (docs/user_stories.md), and probloss's versions.

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

The audited functions take per-point scalars (one tensor per argument, broadcast
elementwise) and return one loss per point, unreduced. They are thin wrappers of the
batched forms, which take the functional core's arguments (``value, loc, log_scale, ...``)
and are what the demos, tests and benchmarks import: :func:`naive_bivariate_normal_nll`,
:func:`naive_bivariate_normal_mixture_nll`, :func:`naive_normal_mixture_nll` and
:func:`naive_cb_mean_unpatched`.
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
    "naive_bivariate_normal_mixture_nll",
    "naive_bivariate_normal_nll",
    "naive_bivariate_normal_pdf",
    "naive_cb_mean",
    "naive_cb_mean_unpatched",
    "naive_mixture_nll",
    "naive_normal_mixture_nll",
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


def naive_bivariate_normal_pdf(
    value: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor
) -> Tensor:
    r"""The bivariate Gaussian density in probability space, Graves (2013) eqs. 24-25.

    .. math::
        \frac{1}{2\pi\sigma_1\sigma_2\sqrt{1-\rho^2}} \exp\Big(-\frac{Z}{2(1-\rho^2)}\Big),
        \quad Z = \frac{(x_1-\mu_1)^2}{\sigma_1^2} + \frac{(x_2-\mu_2)^2}{\sigma_2^2}
            - \frac{2\rho(x_1-\mu_1)(x_2-\mu_2)}{\sigma_1\sigma_2}

    with the network outputs mapped as in Graves eqs. 21-22: :math:`\sigma = e^{\hat\sigma}`,
    :math:`\rho = \tanh\hat\rho`.

    Args:
        value: the points, shape ``(*, 2)``.
        loc: the means, shape ``(*, 2)``.
        log_scale: :math:`\hat\sigma = \log\sigma`, shape ``(*, 2)``.
        atanh_rho: :math:`\hat\rho`, the pre-``tanh`` correlation, shape ``(*)``.

    Returns:
        The density per point, shape ``(*)`` (broadcast).
    """
    sigma1, sigma2 = torch.exp(log_scale).unbind(-1)
    rho = torch.tanh(atanh_rho)
    d1, d2 = (value - loc).unbind(-1)
    z = (d1 / sigma1) ** 2 + (d2 / sigma2) ** 2 - 2 * rho * d1 * d2 / (sigma1 * sigma2)
    one_minus_rho2 = 1 - rho**2
    return torch.exp(-z / (2 * one_minus_rho2)) / (
        2 * math.pi * sigma1 * sigma2 * torch.sqrt(one_minus_rho2)
    )


def naive_bivariate_normal_nll(
    value: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor
) -> Tensor:
    r"""Bivariate Gaussian NLL in probability space: ``-log`` of
    :func:`naive_bivariate_normal_pdf`, as in Graves (2013) and sketch-rnn.

    The naive twin of :func:`probloss.functional.bivariate_normal_nll` (``reduction="none"``),
    same arguments. Breaks (user story 1): ``tanh(atanh_rho)`` rounds to 1 for
    ``|atanh_rho| > 9.01`` in float32 (``0/0``: NaN), the density underflows to 0 a few
    scales from the mean (``log 0``), and ``exp(log_scale)`` overflows.

    Args:
        value, loc, log_scale: shape ``(*, 2)`` each; atanh_rho: shape ``(*)``.

    Returns:
        The NLL per point, shape ``(*)``.

    Example:
        >>> zero = torch.zeros(2, 2)
        >>> naive_bivariate_normal_nll(zero, zero, zero, torch.tensor([0.0, 10.0]))
        tensor([1.8379,    nan])
    """
    return -torch.log(naive_bivariate_normal_pdf(value, loc, log_scale, atanh_rho))


def naive_bivariate_normal_mixture_nll(
    value: Tensor, logits: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor
) -> Tensor:
    r"""Mixture of bivariate Gaussians in probability space, Graves (2013) eqs. 23-25.

    .. math::
        -\log \sum_k \operatorname{softmax}(\text{logits})_k\, p_k(x)

    with :math:`p_k` the :func:`naive_bivariate_normal_pdf` of component ``k``. Breaks as
    that density does: ``-log 0 = inf`` once every component underflows, NaN once a
    ``tanh`` rounds to 1.

    Args:
        value: the points, shape ``(*, 2)``.
        logits: mixture logits, shape ``(*, K)``.
        loc, log_scale: shape ``(*, K, 2)`` each.
        atanh_rho: shape ``(*, K)``.

    Returns:
        The NLL per point, shape ``(*)``.

    Example:
        >>> x = torch.tensor([[50.0, -50.0]])
        >>> naive_bivariate_normal_mixture_nll(x, torch.zeros(1, 2), torch.zeros(1, 2, 2),
        ...                                    torch.zeros(1, 2, 2), torch.zeros(1, 2))
        tensor([inf])
    """
    pdf = naive_bivariate_normal_pdf(value.unsqueeze(-2), loc, log_scale, atanh_rho)
    return -torch.log((torch.softmax(logits, -1) * pdf).sum(-1))


def _bivariate_point(*scalars: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The per-point scalars of :func:`naive_bivariate_nll` (``x1, x2, mu1, mu2, log_sigma1,
    log_sigma2, raw_rho``) as the batched ``(value, loc, log_scale, atanh_rho)``."""
    x1, x2, mu1, mu2, log_sigma1, log_sigma2, raw_rho = scalars
    value = torch.stack((x1, x2), dim=-1)
    loc = torch.stack((mu1, mu2), dim=-1)
    log_scale = torch.stack((log_sigma1, log_sigma2), dim=-1)
    return value, loc, log_scale, raw_rho


def naive_bivariate_nll(
    x1: Tensor,
    x2: Tensor,
    mu1: Tensor,
    mu2: Tensor,
    log_sigma1: Tensor,
    log_sigma2: Tensor,
    raw_rho: Tensor,
) -> Tensor:
    r""":func:`naive_bivariate_normal_nll` of per-point scalars, for the audit's grid.

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
    point = _bivariate_point(x1, x2, mu1, mu2, log_sigma1, log_sigma2, raw_rho)
    return naive_bivariate_normal_nll(*point)


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
    point = _bivariate_point(x1, x2, mu1, mu2, log_sigma1, log_sigma2, raw_rho)
    return bivariate_normal_nll(*point, reduction="none")


def _normal_pdf(x: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    return torch.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


def naive_normal_mixture_nll(
    value: Tensor, logits: Tensor, loc: Tensor, log_scale: Tensor
) -> Tensor:
    r"""Diagonal Gaussian mixture NLL from pdfs, as in mixture density network tutorials.

    .. math::
        -\log \sum_k \operatorname{softmax}(\text{logits})_k
            \prod_d \mathcal N(x_d; \mu_{kd}, e^{\log\sigma_{kd}})

    The naive twin of ``-probloss.functional.normal_mixture_log_prob`` (Bishop 1994), same
    arguments. Breaks (user story 2): every pdf underflows to 0 once ``x`` is 14.4 scales
    from every mean in float32 (38.6 in float64), giving ``-log 0 = inf`` and a NaN
    gradient.

    Args:
        value: targets, shape ``(*, D)``.
        logits: mixture logits, shape ``(*, K)``.
        loc, log_scale: shape ``(*, K, D)`` each.

    Returns:
        The NLL per point, shape ``(*)``.

    Example:
        >>> x = torch.tensor([[0.0], [20.0]])
        >>> naive_normal_mixture_nll(x, torch.zeros(2, 2), torch.zeros(2, 2, 1),
        ...                          torch.zeros(2, 2, 1))
        tensor([0.9189,    inf])
    """
    pdf = _normal_pdf(value.unsqueeze(-2), loc, torch.exp(log_scale)).prod(-1)
    return -torch.log((torch.softmax(logits, -1) * pdf).sum(-1))


def _two_components(*scalars: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The per-point scalars of :func:`naive_mixture_nll` (``x, logit, mu1, mu2,
    log_sigma1, log_sigma2``) as ``(value, logits, loc, log_scale)``: ``K = 2``, ``D = 1``,
    the logits ``(logit, 0)`` (a softmax of two logits is the sigmoid of their difference)."""
    x, logit, mu1, mu2, log_sigma1, log_sigma2 = scalars
    logits = torch.stack((logit, torch.zeros_like(logit)), dim=-1)
    loc = torch.stack((mu1, mu2), dim=-1).unsqueeze(-1)
    log_scale = torch.stack((log_sigma1, log_sigma2), dim=-1).unsqueeze(-1)
    return x.unsqueeze(-1), logits, loc, log_scale


def naive_mixture_nll(
    x: Tensor,
    logit: Tensor,
    mu1: Tensor,
    mu2: Tensor,
    log_sigma1: Tensor,
    log_sigma2: Tensor,
) -> Tensor:
    r"""Two-component 1-D mixture NLL from pdfs: :func:`naive_normal_mixture_nll` of
    per-point scalars, for the audit's grid.

    .. math::
        -\log\big(w\,\mathcal N(x; \mu_1, \sigma_1) + (1 - w)\,\mathcal N(x; \mu_2, \sigma_2)\big),
        \qquad w = \operatorname{sigmoid}(\text{logit}), \quad \sigma_i = e^{\log\sigma_i}

    (Bishop 1994; the logits are ``(logit, 0)``). Breaks (user story 2): both pdfs
    underflow to 0 once ``x`` is 14.4 scales from both means in float32 (38.6 in float64),
    giving ``-log 0 = inf`` and a NaN gradient.

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
    return naive_normal_mixture_nll(*_two_components(x, logit, mu1, mu2, log_sigma1, log_sigma2))


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
    mixture = _two_components(x, logit, mu1, mu2, log_sigma1, log_sigma2)
    return -normal_mixture_log_prob(*mixture)


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
    return torch.where(x.abs() < 0.1, 0.5 + x / 12, naive_cb_mean_unpatched(x))


def naive_cb_mean_unpatched(x: Tensor) -> Tensor:
    r"""Continuous-Bernoulli mean as the closed form is written, with no patch at all.

    .. math::
        \mu(x) = \frac{1}{1 - e^{-x}} - \frac{1}{x}

    NaN at ``x = 0`` (``inf - inf``), in value and gradient; near 0 ``1 - exp(-x)``
    cancels and the two terms, each about ``1/x``, cancel again.

    Args:
        x: natural parameter, shape ``(*)``.

    Returns:
        The mean per point, shape ``(*)``.

    Example:
        >>> naive_cb_mean_unpatched(torch.tensor([0.0, 1.0]))
        tensor([   nan, 0.5820])
    """
    return 1 / (1 - torch.exp(-x)) - 1 / x


def stable_cb_mean(x: Tensor) -> Tensor:
    r""":func:`naive_cb_mean` through :func:`probloss.special.cb_mean`: exact, finite gradient.

    Example:
        >>> x = torch.tensor(0.0, requires_grad=True)
        >>> stable_cb_mean(x).backward()
        >>> x.grad
        tensor(0.0833)
    """
    return cb_mean(x)
