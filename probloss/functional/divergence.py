r"""KL divergences between distributions of the same family, in closed form from logits.

Each returns one value per element, unreduced, never negative, with finite gradients
wherever the parameters are finite. Half-precision inputs are computed and returned in
float32. Every parameter here is unconstrained (logits, means, log-variances): there is no
value to validate, and NaN propagates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._core.dtype import as_loss_tensors, loss_tensors
from .._core.shapes import batch_shape, broadcast_shapes
from ..special import cb_log_partition, cb_mean, cb_variance, log_cosh, softplus
from ..special.exp import expm1mx, mul_exp
from ._bregman import bregman_divergence
from ._params import standardized_residual


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
    tail = delta / a - mul_exp(delta, -a) / -torch.expm1(-a)
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
    root = mul_exp(a, -0.5 * a) / -torch.expm1(-a)
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
    mahalanobis = _HalfSquareOverVariance.apply(loc_q_t, loc_p_t, log_var_p_b)
    return _half_expm1mx_of_difference(t["log_var_q"], log_var_p_t) + mahalanobis


def _half_square_over_variance(loc_q: Tensor, loc_p: Tensor, log_var_p: Tensor) -> Tensor:
    """``(loc_q - loc_p)^2 exp(-log_var_p) / 2`` as ``2 w^2``, ``w = (Delta/2) e^{-lv/2}``.

    ``Delta / 2 = loc_q/2 - loc_p/2`` cannot overflow where ``Delta`` does (-3.4e38 against
    3.4e38 in float32), the halvings are exact (to the subnormals, where the term is
    dominated by the other anyway), and ``w`` comes from ``mul_exp``: nothing overflows unless
    the result does.
    """
    w = mul_exp(0.5 * loc_q - 0.5 * loc_p, -0.5 * log_var_p)
    return (w * w) * 2.0


class _HalfSquareOverVariance(torch.autograd.Function):
    """:func:`_half_square_over_variance` with the backward written from the result.

    ``dM/dlog_var_p = -M`` and ``dM/dloc_q = -dM/dloc_p = Delta e^{-lv} = 2 (Delta/2) e^{-lv}``
    (by ``mul_exp``): each overflows only if it is itself out of range, where autograd of
    ``2 w^2`` would form ``dM/dw * w = 2 M`` and overflow for ``M > max / 2``. The backward
    is differentiable again (built from this function and ``mul_exp``).
    """

    @staticmethod
    def forward(ctx, loc_q: Tensor, loc_p: Tensor, log_var_p: Tensor) -> Tensor:
        out = _half_square_over_variance(loc_q, loc_p, log_var_p)
        ctx.save_for_backward(loc_q, loc_p, log_var_p, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loc_q, loc_p, log_var_p, out = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: rebuild the result differentiably
            out = _HalfSquareOverVariance.apply(loc_q, loc_p, log_var_p)
        # grad first: the slope may be near max while grad is small (a mean over a batch)
        slope = mul_exp(grad * (0.5 * loc_q - 0.5 * loc_p), -log_var_p)
        slope = slope + slope
        return slope, -slope, -(grad * out)


def _half_expm1mx_of_difference(a: Tensor, b: Tensor) -> Tensor:
    """``expm1mx(a - b) / 2`` for the exact difference of the floats ``a`` and ``b``.

    Rounding ``d = a - b`` costs ``|d| eps / 2`` of relative accuracy in ``e^d`` (5e-6 in
    float32 at ``d = 88``); the rounding error ``err = (a - b) - d`` is recovered exactly
    (Knuth's TwoSum) and added to first order, ``expm1mx(d + err) = expm1mx(d) +
    expm1(d) err + O(e^d err^2)``. ``err`` is detached (as a function of ``a`` and ``b`` it
    is the constant 0 of exact arithmetic), so the gradient ``expm1(d) / 2`` is corrected
    the same way through ``d``. Where ``exp(d)`` is within a factor e of ``finfo.max``,
    ``e^d e^err / 2`` is formed by ``mul_exp``, which overflows (value or gradient)
    only if the result does.
    """
    d = a - b
    b_virtual = d - a  # TwoSum of (a, -b): err = (a - a_virtual) + (-b - b_virtual), exact
    err = ((a - (d - b_virtual)) - (b + b_virtual)).detach()
    err = torch.where(torch.isfinite(d), err, 0.0)  # inf - inf where a - b overflows
    top = math.log(torch.finfo(d.dtype).max) - 1.0
    big = d > top
    # Far below 0, e^d - 1 - d = (b/2 - a/2) * 2 + e^d - 1: -d may exceed finfo.max (-3.4e38
    # against 1e32 in float32) while its half cannot; its rounding is relative (no TwoSum)
    very_negative = d < -top
    # safe inputs for the unselected branches; where a - b overflows to inf (the result is
    # inf), finfo.max stands in for it, as inf - (1 + inf) / 2 would be NaN
    d_big = torch.where(big, torch.where(torch.isinf(d), torch.finfo(d.dtype).max, d), top)
    err_big = torch.where(d_big < 2.0 * (top + 1.0), err, 0.0)  # e^d e^err: no 0 * inf
    d_small = torch.where(big | very_negative, 0.0, d)
    d_negative = torch.where(very_negative, d, -top)
    a_negative = torch.where(very_negative, a, 0.0)
    b_negative = torch.where(very_negative, b, top)
    negative = (0.5 * b_negative - 0.5 * a_negative) + 0.5 * (torch.exp(d_negative) - 1.0)
    # e^{d + err} / 2 = e^d (e^err / 2): err, exact but not small when |b| dwarfs |a| (-1.07
    # against -1e19 is lost in d entirely), is taken whole, not to first order
    near_overflow = mul_exp(0.5 * torch.exp(err_big), d_big) - 0.5 * (1.0 + d_big)
    moderate = 0.5 * (expm1mx(d_small) + torch.expm1(d_small) * torch.where(big, 0.0, err))
    return torch.where(big, near_overflow, torch.where(very_negative, negative, moderate))


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
    ``tanh`` rounds to 1 (``atanh_rho = 20`` in float32), finite wherever the KL is.

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
    first = normal_kl(mq1, 2.0 * lq1, mp1, 2.0 * lp1)  # log var = 2 log sigma (exact)
    lc_q, lc_p = log_cosh(a_q), log_cosh(a_p)
    z1, z2 = standardized_residual(mq1, mp1, lp1), standardized_residual(mq2, mp2, lp2)
    d1, d2 = lq1 - lp1, lq2 - lp2
    # normal_kl of the conditionals in parts: log-variances' difference 2 d2 - 2 (lc_q - lc_p)
    # (equal correlations cancel exactly), mean part (z2 - rho_p z1)^2 cosh^2(a_p) / 2
    second = _half_expm1mx_of_difference(2.0 * d2, 2.0 * (lc_q - lc_p))
    z2, shift, log_var = torch.broadcast_tensors(z2, torch.tanh(a_p) * z1, -2.0 * lc_p)
    second = second + _HalfSquareOverVariance.apply(z2, shift, log_var)
    # 2 cosh(h) e^{(d1 + d2)/2} = e^{d1} + e^{d2}: its log by logaddexp, no |h| to cancel
    x1, t1 = torch.tanh(a_q) * torch.tanh(0.5 * (d2 - d1)), torch.logaddexp(d1, d2) + lc_p
    x2, t2 = torch.tanh(a_q - a_p), log_cosh(a_q - a_p) + d1 - lc_q
    w = mul_exp(x1, t1) + mul_exp(x2, t2)
    # the split cancels unless rho_q e^{d2} and rho_p e^{d1} nearly agree: elsewhere their
    # difference (times cosh a_p) directly, which loses at most a factor 3 there
    w_q, w_p = mul_exp(torch.tanh(a_q), d2 + lc_p), mul_exp(torch.tanh(a_p), d1 + lc_p)
    apart = (w_q * w_p <= 0) | (w_q.abs() >= 2 * w_p.abs()) | (w_p.abs() >= 2 * w_q.abs())
    w = torch.where(apart & (w_q - w_p).isfinite(), w_q - w_p, w)
    # inf - inf: the same sum from L_i = log|x_i| + t_i, sign e^{L_big} (1 - e^{L_sm - L_big})
    far = w.isnan()
    l1 = torch.log(torch.where(far, x1, 1.0).abs()) + torch.where(far, t1, 0.0)  # safe inputs
    l2 = torch.log(torch.where(far, x2, 1.0).abs()) + torch.where(far, t2, 0.0)
    big, small = torch.maximum(l1, l2), torch.minimum(l1, l2)
    sign = torch.where(l1 >= l2, x1.sign(), x2.sign())
    w_far = mul_exp(sign * -torch.expm1(torch.where(far, small - big, 0.0)), big)
    w = torch.where(far, w_far, w)
    # KL >= KL(q_i || p_i) >= max(|d_i| - 1/2, z_i^2 / 2): an overflowed d_i or z_i, KL = inf
    overflow = (d1.isinf() | d2.isinf() | z1.isinf() | z2.isinf()).expand_as(w)
    kl = first + second + (0.5 * w) * w  # (w/2) w: no w^2 overflow below the result's
    return torch.where(overflow, math.inf, kl)
