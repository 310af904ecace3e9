r"""Log-partition, mean, variance and entropy of the continuous Bernoulli distribution.

The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019, arXiv:1907.06845) with natural
parameter (logit) :math:`\eta` has density :math:`p(x) = \exp(\eta x - A(\eta))` on
:math:`[0, 1]` with log-partition

.. math::
    A(\eta) = \log \int_0^1 e^{\eta x}\,dx = \log\frac{e^\eta - 1}{\eta},
    \qquad A' = \text{mean}, \quad A'' = \text{variance}.

Every closed form of these functions cancels catastrophically near :math:`\eta = 0` (the
mean ``1/(1 - exp(-eta)) - 1/eta`` is ``inf - inf`` at 0, and its autograd gradient is NaN
even behind a ``where``). Writing :math:`h = \eta / 2` and :math:`u = h^2`,

.. math::
    A(\eta) = h + \log\frac{\sinh h}{h}, \qquad
    \frac{\sinh h - h}{h^3} = S(u) = \sum_{k \ge 0} \frac{u^k}{(2k+3)!}, \qquad
    \frac{h \cosh h - \sinh h}{h^3} = T(u) = \sum_{k \ge 0} \frac{2(k+1)\,u^k}{(2k+3)!},

gives cancellation-free forms for :math:`|\eta| \le 4` from two entire series with
positive terms:

.. math::
    A = h + \operatorname{log1p}(uS), \quad
    \text{mean} = \tfrac12 + \tfrac{h T}{2(1 + uS)}, \quad
    \text{var} = \frac{S\,(2 + uS)}{4\,(1 + uS)^2}, \quad
    H = \operatorname{log1p}(uS) - \frac{uT}{1 + uS}.

For :math:`a = |\eta| > 4` the closed forms below do not cancel by more than a factor of 3.
The switch point is dtype-independent (it is where the closed forms become accurate); the
series length is derived from ``torch.finfo(dtype).eps`` so that the truncation error is
below a sixteenth of an ulp at ``|eta| = 4``.

The log-partition, mean and entropy are ``torch.autograd.Function`` s whose backward is the
next function in the chain (``A' = mean``, ``mean' = variance``, ``H' = -eta * variance``),
so first derivatives are as exact as the values; the variance is plain differentiable
torch code with safe branch inputs, so derivatives of every order are finite. At
``eta = +-inf`` every function returns its limit (a point mass at 1 or 0: mean 1 or 0,
variance 0, log-partition +-inf, entropy -inf) with the limiting first derivative.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._core.dtype import as_float_tensor, upcast
from .._core.ops import kernel_op
from .exp import expm1
from .where import safe_where

_SERIES_MAX_ABS_ETA = 4.0
_SAFE_LARGE_ETA = 8.0  # any |eta| > 4: fed to the closed forms where the series is selected


def _series_coefficients(dtype: torch.dtype) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Coefficients of S(u) and T(u), truncated where a term is < eps/16 of the first at u=4."""
    eps = torch.finfo(dtype).eps
    u_max = (_SERIES_MAX_ABS_ETA / 2) ** 2
    s_coefs, t_coefs = [], []
    k = 0
    while True:
        s_k = 1.0 / math.factorial(2 * k + 3)
        t_k = 2.0 * (k + 1) / math.factorial(2 * k + 3)
        s_coefs.append(s_k)
        t_coefs.append(t_k)
        # Terms decrease faster than geometrically (ratio < 1/5 from here), so the tail
        # after the last kept term is below 1.25x the first omitted one.
        next_s = u_max ** (k + 1) / math.factorial(2 * k + 5) * 6.0
        next_t = 2.0 * (k + 2) * u_max ** (k + 1) / math.factorial(2 * k + 5) * 3.0
        if max(next_s, next_t) < eps / 16:
            return tuple(s_coefs), tuple(t_coefs)
        k += 1


_COEFFICIENTS = {dtype: _series_coefficients(dtype) for dtype in (torch.float32, torch.float64)}


def _horner(u: Tensor, coefs: tuple[float, ...], fused: bool | None = None) -> Tensor:
    """``sum(c_k u^k)`` by Horner's rule, in place on one new buffer (no graph recorded).

    ``fused`` (default: on CPU) takes one ``addcmul`` pass per coefficient, else two."""
    fused = u.device.type == "cpu" if fused is None else fused
    p = torch.full_like(u, coefs[-1])
    for c in reversed(coefs[:-1]):
        if fused:
            # p = c + p * u as one fused pass; a 0-dim CPU tensor as addcmul's input works
            # only beside CPU tensors (CUDA refuses it, meta cannot copy it).
            torch.addcmul(torch.tensor(c, dtype=u.dtype), p, u, out=p)
        else:
            p.mul_(u).add_(c)
    return p


# Forward kernels. They run without recording a graph and work in place on as few fresh
# buffers as possible: on CPU, first touching a fresh buffer of a large tensor (page faults)
# costs more than several arithmetic passes over it, and ``torch.where`` with a random mask
# is several times slower than a multiply. Branches are therefore blended arithmetically
# (see ``_blend_``), which is exact because both branches only ever see finite, safe inputs.
# A trailing underscore marks a helper that consumes (overwrites) its tensor arguments.


def _prelude(eta: Tensor, *, need_h: bool, need_t: bool):
    """Shared intermediates: (series mask, h, u, S(u), T(u) or None, safe |eta|).

    The series branch is fed ``eta = 0`` where the closed form is selected, the closed
    branch ``|eta| + 8 > 4`` where the series is.
    """
    s_coefs, t_coefs = _COEFFICIENTS[eta.dtype]
    a = eta.abs()
    series = torch.le(a, _SERIES_MAX_ABS_ETA, out=torch.empty_like(eta))  # 1.0: series branch
    h = torch.mul(eta, series).mul_(0.5)
    u = h * h if need_h else h.square_()
    s = _horner(u, s_coefs)  # S = (sinh h - h) / h^3
    t = _horner(u, t_coefs) if need_t else None  # T = (h cosh h - sinh h) / h^3
    a.add_(series, alpha=_SAFE_LARGE_ETA)
    return series, (h if need_h else None), u, s, t, a


def _blend_(on_closed: Tensor, on_series: Tensor, series: Tensor) -> Tensor:
    """``on_series`` where ``series == 1`` else ``on_closed``, into ``on_closed``, exactly."""
    # c - c * s is exactly 0 or c; adding v * s then gives exactly v or c.
    return on_closed.addcmul_(on_closed, series, value=-1.0).addcmul_(on_series, series)


def _mean_(eta, series, h, t, d, q, r) -> Tensor:
    """mean = 1/2 + h T / (2 D)  |  [eta > 0] - sign(eta) (1/a - 1/expm1(a)). Consumes h, t."""
    on_series = h.mul_(t).div_(d).mul_(0.5).add_(0.5)
    sign = torch.sign(eta)
    on_closed = torch.sub(q, r).mul_(sign).add_(sign.add_(1.0).mul_(0.5))
    return _blend_(on_closed, on_series, series)


def _variance_(series, s, d, q, r) -> Tensor:
    """var = S (1 + D) / (4 D^2)  |  1/a^2 - q (1 + q). Consumes s, q, r."""
    on_series = s.addcmul_(s, d).div_(d).div_(d).mul_(0.25)
    on_closed = r.mul_(r).sub_(q.addcmul_(q, q))
    return _blend_(on_closed, on_series, series)


def _log_partition_and_mean(eta: Tensor, with_mean: bool) -> tuple[Tensor, Tensor | None]:
    series, h, u, s, t, a = _prelude(eta, need_h=True, need_t=with_mean)
    w = u.mul_(s)  # uS = sinh(h)/h - 1
    q = expm1(a).reciprocal_()  # 1/expm1(a); 0 once expm1 overflows
    # A = h + log1p(w)  |  max(eta, 0) + log1mexp(a) - log(a), where
    # log(a) - log1mexp(a) = log(a) + log1p(1/expm1(a)) = log(a (1 + q)).
    on_series = torch.log1p(w).add_(h)
    on_closed = torch.relu(eta).sub_(torch.addcmul(a, a, q).log_())
    log_partition = _blend_(on_closed, on_series, series)
    if not with_mean:
        return log_partition, None
    return log_partition, _mean_(eta, series, h, t, w.add_(1.0), q, a.reciprocal_())


def _mean_and_variance(eta: Tensor, with_variance: bool) -> tuple[Tensor, Tensor | None]:
    series, h, u, s, t, a = _prelude(eta, need_h=True, need_t=True)
    d = u.mul_(s).add_(1.0)  # D = 1 + uS = sinh(h)/h
    q = expm1(a).reciprocal_()
    r = a.reciprocal_()
    mean = _mean_(eta, series, h, t, d, q, r)
    return mean, (_variance_(series, s, d, q, r) if with_variance else None)


def _variance_only(eta: Tensor) -> Tensor:
    series, _, u, s, _, a = _prelude(eta, need_h=False, need_t=False)
    d = u.mul_(s).add_(1.0)
    q = expm1(a).reciprocal_()
    return _variance_(series, s, d, q, a.reciprocal_())


def _entropy_and_gradient(eta: Tensor, with_gradient: bool) -> tuple[Tensor, Tensor | None]:
    """Entropy and, if asked, its derivative ``-eta * var``, formed without underflow."""
    series, _, u, s, t, a = _prelude(eta, need_h=False, need_t=True)
    ut = t.mul_(u)
    w = u.mul_(s)
    q = expm1(a).reciprocal_()
    # H = log1p(w) - u T / (1 + w)  |  1 - log a + log1mexp(a) - a / expm1(a)
    log1p_w = torch.log1p(w)
    d = w.add_(1.0)
    on_series = ut.div_(d).neg_().add_(log1p_w)
    on_closed = torch.mul(a, q).add_(torch.addcmul(a, a, q).log_()).neg_().add_(1.0)
    entropy = _blend_(on_closed, on_series, series)
    if not with_gradient:
        return entropy, None
    # -eta var = -eta S (1 + D) / (4 D^2)  |  sign(eta) (a q (1 + q) - 1/a): not -eta * var,
    # whose var ~ 1/eta^2 underflows long before the gradient ~ -1/eta does.
    on_series = s.addcmul_(s, d).div_(d).div_(d).mul_(-0.25).mul_(eta)
    on_closed = q.addcmul_(q, q).mul_(a).sub_(a.reciprocal_()).mul_(torch.sign(eta))
    return entropy, _blend_(on_closed, on_series, series)


def _variance_derivative(eta: Tensor) -> Tensor:
    r"""``d var / d eta`` (third cumulant), in plain differentiable torch ops.

    Only used where a graph of the variance's gradient is requested (second derivative of
    the mean, third of the log-partition). With :math:`D = 1 + uS`, :math:`W' = S + uS'`,

    .. math::
        rac{d\,\mathrm{var}}{d\eta} = h\Big[\frac{S'(1+D) + S W'}{4D^2}
            - \frac{S(1+D) W'}{2D^3}\Big] \;\Big|\;
        \operatorname{sign}(\eta)\big(-2r^3 + q(1+q)(1+2q)\big)

    with :math:`r = 1/a`, :math:`q = 1/\operatorname{expm1}(a)`.
    """
    s_coefs, _ = _COEFFICIENTS[eta.dtype]
    ds_coefs = tuple(k * c for k, c in enumerate(s_coefs))[1:]

    def poly(u: Tensor, coefs: tuple[float, ...]) -> Tensor:
        p = torch.full_like(u, coefs[-1])
        for c in reversed(coefs[:-1]):
            p = p * u + c
        return p

    def on_series(e: Tensor) -> Tensor:
        h = 0.5 * e
        u = h * h
        s, ds = poly(u, s_coefs), poly(u, ds_coefs)
        d = 1.0 + u * s
        dw = s + u * ds
        return h * ((ds * (1.0 + d) + s * dw) / (4.0 * d**2) - s * (1.0 + d) * dw / (2.0 * d**3))

    def on_closed(e: Tensor) -> Tensor:
        a = e.abs()
        r, q = a.reciprocal(), expm1(a).reciprocal()
        return torch.sign(e) * (q * (1.0 + q) * (1.0 + 2.0 * q) - 2.0 * r**3)

    return safe_where(
        eta.abs() <= _SERIES_MAX_ABS_ETA,
        eta,
        on_series,
        on_closed,
        safe_true=0.0,
        safe_false=_SAFE_LARGE_ETA,
    )


def _finite(eta: Tensor) -> Tensor:
    """``eta`` with +-inf replaced by +-finfo.max (double where for the limits at +-inf).

    Every kernel output at +-max is the limit at +-inf in floating point (mean 1 or 0,
    variance 0, the entropy's derivative -0) or finite where the limit is infinite
    (log-partition, entropy), which the callers then set; in a differentiable graph the
    infinite elements get a zero gradient.
    """
    big = torch.full_like(eta, torch.finfo(eta.dtype).max)
    return torch.where(torch.isinf(eta), torch.copysign(big, eta), eta)


# The values are operators (probloss._core.ops); each gradient is the next function of
# the chain A' = mean, mean' = variance, H' = -eta variance, formed by the operators again,
# so every gradient is differentiable again.


@kernel_op("cb_log_partition", event_dims=(0,), fake=torch.empty_like)
def _log_partition_value(eta: Tensor) -> Tensor:
    log_partition, _ = _log_partition_and_mean(_finite(eta), False)
    # A(eta) -> +-inf as eta -> +-inf (A(eta) ~ max(eta, 0) - log|eta|)
    return torch.where(torch.isinf(eta), eta, log_partition)


@kernel_op("cb_mean", event_dims=(0,), fake=torch.empty_like)
def _mean_value(eta: Tensor) -> Tensor:
    mean, _ = _mean_and_variance(_finite(eta), False)
    # the limits 1 and 0 at +-inf (at -max the kernel gives 1/max, not 0)
    return torch.where(torch.isinf(eta), (eta > 0).to(mean.dtype), mean)


@kernel_op("cb_variance", event_dims=(0,), fake=torch.empty_like)
def _variance_value(eta: Tensor) -> Tensor:
    return _variance_only(_finite(eta))


@kernel_op("cb_entropy", event_dims=(0,), fake=torch.empty_like)
def _entropy_value(eta: Tensor) -> Tensor:
    entropy, _ = _entropy_and_gradient(_finite(eta), False)
    # H(eta) -> -inf as |eta| -> inf (H ~ 1 - log|eta|)
    return torch.where(torch.isinf(eta), -torch.inf, entropy)


@kernel_op("cb_entropy_derivative", event_dims=(0,), fake=torch.empty_like)
def _entropy_derivative_value(eta: Tensor) -> Tensor:
    _, gradient = _entropy_and_gradient(_finite(eta), True)
    return torch.where(torch.isinf(eta), 0.0, gradient)  # the limit 0 at +-inf (-1/max at max)


class _OfEta(torch.autograd.Function):
    """Base of the four: one input ``eta``, saved for the backward."""

    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])


class _LogPartition(_OfEta):
    @staticmethod
    def forward(eta: Tensor) -> Tensor:
        return _log_partition_value(eta)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad * _Mean.apply(ctx.saved_tensors[0])


class _Mean(_OfEta):
    @staticmethod
    def forward(eta: Tensor) -> Tensor:
        return _mean_value(eta)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad * _Variance.apply(ctx.saved_tensors[0])


class _Variance(_OfEta):
    @staticmethod
    def forward(eta: Tensor) -> Tensor:
        return _variance_value(eta)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # plain torch ops, so that it is differentiable again
        return grad * _variance_derivative(_finite(ctx.saved_tensors[0]))


class _Entropy(_OfEta):
    @staticmethod
    def forward(eta: Tensor) -> Tensor:
        return _entropy_value(eta)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (eta,) = ctx.saved_tensors
        if not torch.is_grad_enabled():  # the accurate closed form of H'(eta)
            return grad * _entropy_derivative_value(eta)
        # a differentiable graph: H' = -eta var(eta) (underflows for |eta| > 1e19 in float32)
        finite = _finite(eta)
        return grad * torch.where(torch.isinf(eta), 0.0, -finite * _Variance.apply(finite))


def cb_log_partition(eta: Tensor) -> Tensor:
    r"""Log-partition of the continuous Bernoulli: ``log((exp(eta) - 1) / eta)``, 0 at 0.

    .. math::
        A(\eta) = \log\frac{e^\eta - 1}{\eta} = \begin{cases}
            h + \operatorname{log1p}(u S(u)) & |\eta| \le 4 \\
            \max(\eta, 0) + \operatorname{log1mexp}(|\eta|) - \log|\eta| & |\eta| > 4
        \end{cases}

    with :math:`h = \eta/2`, :math:`u = h^2`, :math:`S` the series of the module docstring.
    Relative error of a few ulp for every finite ``eta``; the gradient is
    :func:`cb_mean` (exact, any order).

    Args:
        eta: natural parameter (logit), shape ``(*)``, any floating dtype.

    Returns:
        Tensor of shape ``(*)`` and the dtype of ``eta``.

    Example:
        >>> cb_log_partition(torch.tensor([0.0, 1e-30, 50.0]))
        tensor([0.0000e+00, 5.0000e-31, 4.6088e+01])
    """
    eta = as_float_tensor(eta, "eta")
    return _LogPartition.apply(upcast(eta)).to(eta.dtype)


def cb_mean(eta: Tensor) -> Tensor:
    r"""Mean of the continuous Bernoulli: ``1/(1 - exp(-eta)) - 1/eta``, 0.5 at 0.

    .. math::
        \mu(\eta) = \frac{1}{1 - e^{-\eta}} - \frac{1}{\eta}
        = \tfrac12 + \tfrac12\Big(\coth\frac{\eta}{2} - \frac{2}{\eta}\Big),
        \qquad \mu(-\eta) = 1 - \mu(\eta)

    This is the function whose naive ``where(|x| < 0.1, 0.5 + x/12, ...)`` form gives NaN
    gradients: here value, gradient (:func:`cb_variance`) and second derivative are exact
    and finite for every finite input, in every dtype.

    Args:
        eta: natural parameter (logit), shape ``(*)``, any floating dtype.

    Returns:
        Tensor of shape ``(*)`` and the dtype of ``eta``, in ``[0, 1]``.

    Example:
        >>> cb_mean(torch.tensor([0.0, 1e-6, -50.0]))
        tensor([0.5000, 0.5000, 0.0200])
    """
    eta = as_float_tensor(eta, "eta")
    return _Mean.apply(upcast(eta)).to(eta.dtype)


def cb_variance(eta: Tensor) -> Tensor:
    r"""Variance of the continuous Bernoulli: ``1/eta^2 - 1/(4 sinh(eta/2)^2)``, 1/12 at 0.

    .. math::
        \sigma^2(\eta) = \mu'(\eta) = \frac{1}{\eta^2} - \frac{1}{4\sinh^2(\eta/2)}
        = \frac{1}{\eta^2} - \frac{e^{-|\eta|}}{\operatorname{expm1}(-|\eta|)^2}

    Differentiable to any order with finite derivatives everywhere.

    Args:
        eta: natural parameter (logit), shape ``(*)``, any floating dtype.

    Returns:
        Tensor of shape ``(*)`` and the dtype of ``eta``, in ``[0, 1/12]``: about
        ``1/eta^2`` for large ``|eta|``, so in float32 subnormal beyond ``|eta| = 9.2e18``
        and 0 beyond ``3.8e22``.

    Example:
        >>> cb_variance(torch.tensor([0.0, 10.0]))
        tensor([0.0833, 0.0100])
    """
    eta = as_float_tensor(eta, "eta")
    return _Variance.apply(upcast(eta)).to(eta.dtype)


def cb_entropy(eta: Tensor) -> Tensor:
    r"""Differential entropy of the continuous Bernoulli, ``A(eta) - eta * mean(eta)``.

    .. math::
        H(\eta) = \begin{cases}
            \operatorname{log1p}(uS) - \dfrac{uT}{1 + uS} & |\eta| \le 4 \\
            1 - \log a + \operatorname{log1mexp}(a) - \dfrac{a}{\operatorname{expm1}(a)}
                & a = |\eta| > 4
        \end{cases}

    Even in ``eta``, 0 at 0 (the uniform density) and negative elsewhere, about
    ``-eta^2/24`` near 0 and ``1 - log|eta|`` for large ``|eta|``. The gradient is
    ``-eta * cb_variance(eta)``.

    Args:
        eta: natural parameter (logit), shape ``(*)``, any floating dtype.

    Returns:
        Tensor of shape ``(*)`` and the dtype of ``eta``.

    Example:
        >>> cb_entropy(torch.tensor([0.0, 1.0, 1e4]))
        tensor([ 0.0000, -0.0407, -8.2103])
    """
    eta = as_float_tensor(eta, "eta")
    return _Entropy.apply(upcast(eta)).to(eta.dtype)
