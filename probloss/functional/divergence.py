r"""KL divergences between distributions of the same family, in closed form from logits.

Each returns one value per element, unreduced, never negative, with finite gradients
wherever the parameters are finite. Half-precision inputs are computed and returned in
float32. Every parameter here is unconstrained (logits, means, log-variances): there is no
value to validate, and NaN propagates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._core.dtype import as_loss_tensors, loss_tensors
from .._core.shapes import batch_shape, broadcast_shapes
from ..special import cb_log_partition, cb_mean, cb_variance, softplus
from ..special.exp import expm1, mul_exp
from ._bivariate_kl import bivariate_kl
from ._bregman import bregman_divergence
from ._normal_kl_parts import HalfSquareOverVariance, half_expm1mx_of_difference


def bernoulli_kl(logits_q: Tensor, logits_p: Tensor) -> Tensor:
    r"""``KL(Bernoulli(logits_q) || Bernoulli(logits_p))``, from logits.

    .. math::
        \mathrm{KL}(q \,\|\, p) = \operatorname{softplus}(\ell_p) - \operatorname{softplus}(\ell_q)
            - \sigma(\ell_q)(\ell_p - \ell_q)

    (the Bregman divergence of the Bernoulli log-partition ``softplus``), evaluated without
    forming probabilities: exact and with finite gradients when ``sigmoid`` saturates (logits
    30 against 0, or 1e4 against -1e4), non-negative near ``logits_q == logits_p``.

    Args:
        logits_q: logits of ``q``, shape broadcastable with ``logits_p``.
        logits_p: logits of ``p``.

    Returns:
        Tensor of the broadcast shape; float32 for half-precision inputs.

    Example:
        >>> bernoulli_kl(torch.tensor([30.0, 0.0]), torch.tensor([0.0, 0.0]))
        tensor([0.6931, 0.0000])
    """
    logits_q, logits_p = as_loss_tensors(logits_q=logits_q, logits_p=logits_p)
    broadcast_shapes(logits_q=logits_q, logits_p=logits_p)
    return bregman_divergence(
        softplus,
        # sigmoid(x) delta = delta e^{-softplus(-x)}: no subnormal sigmoid (e^-88.7 in float32)
        # rounded or flushed before it meets a huge delta
        lambda x, delta: mul_exp(delta, -softplus(-x)),
        lambda x, delta: delta.square() * torch.sigmoid(x) * torch.sigmoid(-x),
        logits_q,
        logits_p,
        near_width=2.0,
    )


def continuous_bernoulli_kl(logits_q: Tensor, logits_p: Tensor) -> Tensor:
    r"""``KL(CB(logits_q) || CB(logits_p))`` between continuous Bernoulli distributions.

    .. math::
        \mathrm{KL}(q \,\|\, p) = A(\eta_p) - A(\eta_q) - \mu(\eta_q)(\eta_p - \eta_q)
            = \Delta^2 \int_0^1 (1 - t)\,\sigma^2(\eta_q + t\Delta)\,dt

    with :math:`A` = :func:`~probloss.special.cb_log_partition`, :math:`\mu` =
    :func:`~probloss.special.cb_mean`, :math:`\sigma^2` = :func:`~probloss.special.cb_variance`.
    The integral form (Gauss-Legendre) is used for :math:`|\Delta| \le \max(4, |\eta_q|/2)`,
    so the result is never negative and keeps its relative accuracy as ``q -> p``; the
    closed form elsewhere, reflected so no large terms cancel. ``torch.distributions``'
    version is built from clamped probabilities and is wrong (even negative) for
    ``|logits|`` beyond about 17 in float32.

    Args:
        logits_q: natural parameter of ``q``, shape broadcastable with ``logits_p``.
        logits_p: natural parameter of ``p``.

    Returns:
        Tensor of the broadcast shape; float32 for half-precision inputs.

    Example:
        >>> continuous_bernoulli_kl(torch.tensor([50.0, 1.0]), torch.tensor([40.0, 1.0]))
        tensor([0.0231, 0.0000])
    """
    logits_q, logits_p = as_loss_tensors(logits_q=logits_q, logits_p=logits_p)
    broadcast_shapes(logits_q=logits_q, logits_p=logits_p)
    # |Delta| <= |eta_q| / 2 keeps p on q's side of 0, where 1/eta^2 dominates the variance
    # and the quadrature converges; the closed form then only meets |Delta| > |eta_q| / 2.
    near_width = torch.maximum(logits_q.abs() * 0.5, torch.tensor(4.0, dtype=logits_q.dtype))
    return bregman_divergence(
        cb_log_partition,
        _cb_mean_times,
        _cb_curvature_times_square,
        logits_q,
        logits_p,
        near_width,
    )


def _cb_mean_times(eta: Tensor, delta: Tensor) -> Tensor:
    """``mean(eta) * delta``, with a gradient in ``eta`` that is finite where it is.

    For ``a = |eta| > 8``, ``mean = [eta > 0] - sign(eta) (1/a - 1/expm1(a))`` is applied to
    ``delta`` term by term: the derivative of ``delta / a`` is formed by autograd as
    ``(delta / a) / a``, which stays finite (3e-24 at ``delta = 1.7e38``, ``a = 1e31``) where
    ``var(eta) = 1/a^2`` underflows to 0 and ``cb_mean``'s backward would give ``0 * inf``.
    """
    big = eta.abs() > 8.0
    eta_small = torch.where(big, 0.0, eta)  # safe inputs for the unselected branch
    delta_small = torch.where(big, 0.0, delta)
    eta_big = torch.where(big, eta, -16.0)
    a = eta_big.abs()
    # delta / expm1(a) = delta e^{-a} / (1 - e^{-a}); mul_exp: 0 with a 0 gradient for huge a
    tail = delta / a - mul_exp(delta, -a) / -expm1(-a)
    on_big = torch.where(eta_big > 0, delta, 0.0) - torch.sign(eta_big) * tail
    return torch.where(big, on_big, cb_mean(eta_small) * delta_small)


def _cb_curvature_times_square(eta: Tensor, delta: Tensor) -> Tensor:
    """``delta^2 var(eta)`` without overflow of ``delta^2`` or underflow of ``var``.

    For ``|eta| > 8`` it is ``(delta/eta)^2 (eta^2 var)`` with
    ``eta^2 var = 1 - eta^2 q (1 + q) = 1 - (a e^{-a/2} / (1 - e^{-a}))^2``,
    ``q = 1/expm1(a)``, ``a = |eta|`` (from ``var = 1/eta^2 - q (1 + q)``), which tends to 1
    instead of underflowing; on the
    quadrature branch ``|delta| <= |eta_q| / 2`` keeps ``delta / eta`` of order one there,
    and ``|eta| <= 8`` at a node implies ``|delta| <= 8``.
    """
    big = eta.abs() > 8.0
    eta_small = torch.where(big, 0.0, eta)  # safe inputs for the unselected branch
    eta_big = torch.where(big, eta, 16.0)
    # delta too: at a node with |eta| > 8 it may be huge (1e33 at eta 3e34), and delta^2 = inf
    # on the unselected branch would turn its zero gradient into 0 * inf = NaN
    delta_small = torch.where(big, 0.0, delta)
    a = eta_big.abs()
    # eta^2 q (1 + q) = (a e^{-a/2} / (1 - e^{-a}))^2, as 1 + q = 1 / (1 - e^{-a}): a e^{-a/2}
    # by mul_exp is 0 with a 0 gradient for huge a, where eta^2 * q would meet inf * 0
    root = mul_exp(a, -0.5 * a) / -expm1(-a)
    scaled = 1.0 - root.square()  # eta^2 var
    return torch.where(
        big, (delta / eta_big).square() * scaled, delta_small.square() * cb_variance(eta_small)
    )


def normal_kl(
    loc_q: Tensor,
    log_var_q: Tensor,
    loc_p: Tensor | float | None = None,
    log_var_p: Tensor | float | None = None,
) -> Tensor:
    r"""``KL(N(loc_q, exp(log_var_q)) || N(loc_p, exp(log_var_p)))`` per element.

    .. math::
        \mathrm{KL}(q \,\|\, p) = \tfrac12\Big(\operatorname{expm1mx}(d)
            + \frac{(\mu_q - \mu_p)^2}{\sigma_p^2}\Big),
        \qquad d = \log\sigma_q^2 - \log\sigma_p^2,

    with :math:`\operatorname{expm1mx}(d) = e^d - 1 - d \ge 0`
    (:func:`~probloss.special.exp.expm1mx`). The textbook form
    :math:`\log(\sigma_p/\sigma_q) + (\sigma_q^2 + \Delta\mu^2)/(2\sigma_p^2) - \tfrac12`
    cancels to nothing as ``q -> p`` (and can come out negative); this one is a sum of two
    non-negative terms, each exact in relative error, so the KL is never negative, exactly
    0 at ``q == p`` and keeps its relative accuracy near it; the rounding error of
    :math:`d` itself is carried along (TwoSum), which matters when :math:`e^d` is large.
    :math:`\Delta\mu^2/(2\sigma_p^2)` is formed as ``2 w^2``,
    ``w = (mu_q/2 - mu_p/2) exp(-log_var_p / 2)`` by ``mul_exp``, and far below 0 the
    difference ``d`` enters as ``log_var_p/2 - log_var_q/2``: the means and log-variances
    may differ by more than ``finfo.max`` (-3.4e38 against 3.4e38 in float32), and nothing
    overflows where the KL is finite. Gradients: ``dKL/dlog_var_q = expm1(d)/2`` and
    ``dKL/dlog_var_p = -expm1(d)/2 - Delta mu^2 / (2 sigma_p^2)`` (the latter written from
    the result, not as twice it), finite wherever they are representable.

    Parameter form: the log-variance, positional, is the documented exception to
    ``log_scale`` being the positional form of the functional core. It is what a VAE
    encoder outputs and the form in which the KL is exact (``d`` above is a difference of
    log-variances, and ``-log_var_p / 2`` the exponent of ``w``); a ``log_scale`` would
    enter only as ``2 log_scale``. All parameters are unconstrained, so there is no value
    to validate (no ``validate_args``): NaN propagates.

    With ``p`` omitted it is the KL to the standard normal prior of a VAE
    (Kingma & Welling 2013, arXiv:1312.6114, appendix B); if only one of ``loc_p`` /
    ``log_var_p`` is given, the other is 0. Half-precision inputs are computed and returned
    in float32: ``log_var_q = 30`` against the prior gives ``5.3e12``, a fine float32 and an
    overflow in float16.

    Args:
        loc_q, log_var_q: mean and log-variance of ``q``, shape ``(*)``.
        loc_p, log_var_p: mean and log-variance of ``p`` (broadcastable), default 0.

    Returns:
        Tensor of the broadcast shape (sum over a latent dimension yourself); float32 for
        half-precision inputs.

    Raises:
        ValueError: shapes do not broadcast.

    Example:
        >>> normal_kl(torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1e-4]))
        tensor([0.0000e+00, 5.0000e-01, 2.5001e-09])
        >>> half = torch.tensor([0.0, 30.0], dtype=torch.float16)
        >>> normal_kl(half[:1], half[1:])  # float16 in, float32 out
        tensor([5.3432e+12])
    """
    given = {"loc_q": loc_q, "log_var_q": log_var_q, "loc_p": loc_p, "log_var_p": log_var_p}
    t = loss_tensors(**given)
    broadcast_shapes(**t)
    zero = torch.zeros((), dtype=t["loc_q"].dtype, device=t["loc_q"].device)
    loc_p_t, log_var_p_t = t.get("loc_p", zero), t.get("log_var_p", zero)
    loc_q_t, loc_p_t, log_var_p_b = torch.broadcast_tensors(t["loc_q"], loc_p_t, log_var_p_t)
    mahalanobis = HalfSquareOverVariance.apply(loc_q_t, loc_p_t, log_var_p_b)
    return half_expm1mx_of_difference(t["log_var_q"], log_var_p_t) + mahalanobis


_BIVARIATE_KL_LAYOUTS = {
    **{f"{name}_{side}": "(*, 2)" for name in ("loc", "log_scale") for side in "qp"},
    **{f"atanh_rho_{side}": "(*)" for side in "qp"},
}


def bivariate_normal_kl(
    loc_q: Tensor,
    log_scale_q: Tensor,
    atanh_rho_q: Tensor,
    loc_p: Tensor | float | None = None,
    log_scale_p: Tensor | float | None = None,
    atanh_rho_p: Tensor | float | None = None,
) -> Tensor:
    r"""``KL(q || p)`` between correlated bivariate normals, each ``(loc, log_scale, atanh_rho)``.

    By the chain rule, the first coordinate, then the second given the first:

    .. math::
        \mathrm{KL}(q\,\|\,p) = \mathrm{KL}(q_1\,\|\,p_1)
            + \mathrm{KL}\big(\mathcal N(\mu_{q2}, \sigma_{q2}^2/\cosh^2 a_q)\,\big\|\,
              \mathcal N(\mu_{p2} + \rho_p\sigma_{p2} z_1, \sigma_{p2}^2/\cosh^2 a_p)\big)
            + \tfrac12 w^2,

    :math:`z_1 = (\mu_{q1} - \mu_{p1})/\sigma_{p1}`, :math:`\rho = \tanh a`: the
    conditionals :math:`x_2 \mid x_1` are normal with variance :math:`\sigma_2^2 (1 - \rho^2)
    = \sigma_2^2 / \cosh^2 a` and a mean linear in :math:`x_1`; averaged over
    :math:`x_1 \sim q_1` their KL is the one at :math:`x_1 = \mu_{q1}` plus the slopes'
    difference, :math:`w = (\rho_q e^{\delta_2} - \rho_p e^{\delta_1}) \cosh a_p`,
    :math:`\delta_i = \log\sigma_{qi} - \log\sigma_{pi}`. The first two terms are
    :func:`normal_kl`'s (log-variances ``2 (log_scale - log_cosh(a))``, never ``1 - tanh^2``;
    the second's difference of log-variances as ``2 delta_2 - 2 (log cosh a_q - log cosh
    a_p)``, exact at equal correlations), so all three are non-negative, the sum is 0 at
    ``q == p`` and, at zero correlations, exactly the sum of the two marginal
    :func:`normal_kl`. Where :math:`\rho_q e^{\delta_2}` and :math:`\rho_p e^{\delta_1}` agree
    in sign to within a factor 2, ``w`` is formed without cancellation or overflow from

    .. math::
        w = \rho_q \tanh(h)\, e^{\log(e^{\delta_1} + e^{\delta_2}) + \log\cosh a_p}
            + \tanh(a_q - a_p)\, e^{\log\cosh(a_q - a_p) + \delta_1 - \log\cosh a_q},
        \qquad h = (\delta_2 - \delta_1)/2

    (:math:`e^{\delta_2} - e^{\delta_1} = \tanh(h) (e^{\delta_1} + e^{\delta_2})`,
    :math:`(\tanh a_q - \tanh a_p)\cosh a_p = \sinh(a_q - a_p)/\cosh a_q`), elsewhere as the
    difference itself; each product by :func:`~probloss.special.mul_exp`, exact where
    ``tanh`` rounds to 1 (``atanh_rho = 20`` in float32), finite wherever the KL is. The
    log-variances are never formed where doubling a log-scale or ``log cosh a`` would
    overflow (``log_scale_q = -3e38`` against 0 in float32 is ``3e38``, not inf).

    Gradients are closed forms in the same quantities (``expm1(2 d)``, ``w`` and the mean
    parts times ``e^{d_i}``, ``cosh a_p`` by ``mul_exp``; float64 for float32 inputs), not
    autograd through the chain rule: exact and finite wherever they are representable and
    the KL is finite, at any log-scale or ``atanh_rho``; where the KL itself overflows some
    entries may be NaN. Differentiable again.

    Parameter form: as :func:`normal_kl` (not value-first): ``q`` then ``p``, each as in
    :class:`~probloss.distributions.BivariateNormal`, unconstrained (no value to validate,
    NaN propagates). ``p`` omitted is the standard bivariate normal (a 2-d VAE prior); an
    omitted parameter of ``p`` is 0.

    Args:
        loc_q, loc_p: means, shape ``(*, 2)``.
        log_scale_q, log_scale_p: log standard deviations, shape ``(*, 2)``.
        atanh_rho_q, atanh_rho_p: ``atanh`` of the correlations, shape ``(*)`` (no event
            dimension); all six broadcast in ``(*)``.

    Returns:
        Tensor of the broadcast batch shape ``(*)``; float32 for half inputs.

    Raises:
        ValueError: a last dimension not 2, or shapes that do not broadcast (named).

    Example:
        >>> zero, one = torch.zeros(2), torch.ones(2)
        >>> bivariate_normal_kl(zero, zero, torch.tensor(20.0), one, zero, torch.tensor(20.0))
        tensor(0.5000)
        >>> bivariate_normal_kl(zero, zero, torch.tensor(0.5))  # to N(0, I): log cosh(0.5)
        tensor(0.1201)
    """
    given = {"loc_q": loc_q, "log_scale_q": log_scale_q, "atanh_rho_q": atanh_rho_q}
    given |= {"loc_p": loc_p, "log_scale_p": log_scale_p, "atanh_rho_p": atanh_rho_p}
    t = loss_tensors(**given)
    batch_shape(_BIVARIATE_KL_LAYOUTS, **t)
    zero = t["loc_q"].new_zeros(())
    (mq1, mq2), (lq1, lq2) = t["loc_q"].unbind(-1), t["log_scale_q"].unbind(-1)
    mp1, mp2 = t.get("loc_p", zero.expand(2)).unbind(-1)
    lp1, lp2 = t.get("log_scale_p", zero.expand(2)).unbind(-1)
    a_q, a_p = t["atanh_rho_q"], t.get("atanh_rho_p", zero)
    # one Function of ten (*) tensors: value and closed-form gradient in _bivariate_kl
    return bivariate_kl(*torch.broadcast_tensors(mq1, mq2, lq1, lq2, a_q, mp1, mp2, lp1, lp2, a_p))
