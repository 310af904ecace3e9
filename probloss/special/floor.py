"""Soft floors: a lower bound that keeps a gradient, instead of a clamp that kills it."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._core.dtype import as_float_tensor, upcast
from .._core.ops import host_readable, kernel_op
from .exp import expm1


def softplus(x: Tensor) -> Tensor:
    r"""``log(1 + exp(x))``, exact for every ``x`` (no threshold switch).

    ``torch.nn.functional.softplus`` returns ``x`` itself above ``threshold=20``, dropping
    ``log1p(exp(-x))`` (a relative 2e-10 in float64); here
    :math:`\operatorname{softplus}(x) = -\log\sigma(-x)` through ``logsigmoid``, exact
    everywhere. Returns the input dtype (half inputs evaluated in float32).

    Example:
        >>> softplus(torch.tensor([-100.0, 0.0, 30.0], dtype=torch.float64))
        tensor([3.7201e-44, 6.9315e-01, 3.0000e+01], dtype=torch.float64)
    """
    x = as_float_tensor(x, "x")
    return (-torch.nn.functional.logsigmoid(-upcast(x))).to(x.dtype)


def soft_floor(x: Tensor, floor: float | Tensor) -> Tensor:
    r"""A smooth lower bound: ``floor + softplus(x - floor)``.

    .. math::
        \operatorname{soft\_floor}(x, m) = m + \log(1 + e^{x - m}) > m,
        \qquad \frac{d}{dx} = \sigma(x - m) \in (0, 1)

    Far above the floor it is ``x`` (error ``e^{-(x - m)}``); at the floor it is
    ``m + log 2``; below it tends to ``m`` with a gradient that shrinks smoothly instead of
    vanishing at a kink as ``clamp(x, min=m)``'s does. ``softplus`` has unit width, so apply
    it to quantities on a unit scale, such as a log-scale: in log space it is exactly an
    additive floor, ``soft_floor(log s, log m) = log(s + m)``, which is how probloss floors
    scales and variances (``min_scale``, ``eps``) without changing the objective by more
    than ``m`` in the scale.

    Args:
        x: tensor of shape ``(*)``, any floating dtype (half evaluated in float32).
        floor: the bound, a number or a tensor broadcastable with ``x``.

    Returns:
        Tensor of the broadcast shape, in torch's promoted dtype of ``x`` and ``floor`` (the
        dtype of ``x`` for a number).

    Example:
        >>> log_scale = torch.tensor([-30.0, 0.0, 5.0])
        >>> soft_floor(log_scale, -7.0).exp()  # = exp(log_scale) + exp(-7)
        tensor([9.1188e-04, 1.0009e+00, 1.4841e+02])
    """
    x = as_float_tensor(x, "x")
    # torch's promotion (torch.result_type, which a tracer cannot run): a number, or a 0-dim
    # tensor next to a dimensioned one, does not change the floating dtype of the other
    if not isinstance(floor, Tensor) or floor.dim() == 0 < x.dim():
        dtype = x.dtype
    elif x.dim() == 0 < floor.dim() and floor.is_floating_point():
        dtype = floor.dtype
    else:
        dtype = torch.promote_types(x.dtype, floor.dtype)
    floor = torch.as_tensor(floor, dtype=dtype, device=x.device)
    # m + log(1 + e^{x - m}) = log(e^m + e^x): logaddexp is exact also where the result is
    # near 0, where the sum of m and softplus(x - m) would cancel. Half precision is
    # evaluated in float32 and rounded once (docs/numerics.md, half precision).
    out = torch.logaddexp(upcast(x.to(dtype)), upcast(floor.to(dtype)))
    return out.to(dtype)


_LOG_SOFTPLUS_TAIL = -20.0  # below: e^x < 2.1e-9, so the dropped e^{2x}/3 is < 1.5e-18 (abs)
# The root x0 = log(e - 1) of log_softplus, as hi + lo with hi exactly representable, so that
# (x - hi) - lo carries x - x0 to twice the working precision (lo from 50-digit mpmath).
_ROOT = 0.5413248546129181
_ROOT_LO_FLOAT64 = -1.8138570925507325e-17
_ROOT_SPLIT = {
    torch.float64: (_ROOT, _ROOT_LO_FLOAT64),
    torch.float32: (
        float(torch.tensor(_ROOT, dtype=torch.float32)),
        (_ROOT - float(torch.tensor(_ROOT, dtype=torch.float32))) + _ROOT_LO_FLOAT64,
    ),
}


def log_softplus(x: Tensor) -> Tensor:
    r"""``log(softplus(x)) = log(log1p(exp(x)))``, exact for every finite ``x``.

    .. math::
        \log\operatorname{softplus}(x) = \begin{cases}
            x + \operatorname{log1p}(-e^x / 2) & x < -20 \\
            \operatorname{log1p}\big(\operatorname{log1p}((1 - e^{-1})
                \operatorname{expm1}(x - x_0))\big) & 1/4 \le x \le 1 \\
            \log(\operatorname{softplus}(x)) & \text{otherwise}
        \end{cases}

    (``log1p(t) = t (1 - t/2 + t^2/3 - ...)``, so the first form is off by at most
    ``e^{2x}/3 < 1.5e-18``; the second, with :math:`x_0 = \log(e - 1)` carried in two
    pieces, is exact through the root, where ``softplus(x) - 1 = log(1 + (1 - 1/e)
    expm1(x - x0))``.) The log-scale of a ``softplus``-parameterised scale: it stays
    finite, with derivative ``sigmoid(x) / softplus(x) -> 1``, where ``softplus(x)``
    underflows to 0 (``x < -104`` in float32) and ``log`` of it would be ``-inf``.

    Args:
        x: tensor of shape ``(*)``, any floating dtype (half evaluated in float32).

    Returns:
        Tensor of shape ``(*)`` and the dtype of ``x``.

    Example:
        >>> log_softplus(torch.tensor([-200.0, 0.0, 50.0]))
        tensor([-200.0000,   -0.3665,    3.9120])
    """
    x = as_float_tensor(x, "x")
    return _LogSoftplus.apply(upcast(x)).to(x.dtype)


def _near_root(t: Tensor) -> Tensor:
    """``log(softplus(t))`` for ``1/4 <= t <= 1``, through the root ``x0 = log(e - 1)``:
    ``softplus(t) = 1 + log1p((1 - 1/e) expm1(t - x0))``."""
    root_hi, root_lo = _ROOT_SPLIT[t.dtype]
    return torch.log1p(torch.log1p((1.0 - math.exp(-1.0)) * expm1((t - root_hi) - root_lo)))


def _tail(t: Tensor) -> Tensor:
    """``log(softplus(t))`` for ``t < -20``: ``t + log1p(-e^t / 2)`` (error < e^{2t}/3)."""
    return t + torch.log1p(-0.5 * torch.exp(t))


@kernel_op("log_softplus", event_dims=(0,), fake=torch.empty_like, fusible=True)
def _log_softplus_value(x: Tensor) -> Tensor:
    """The value of :func:`log_softplus` (float32 or float64 ``x``).

    The three forms are selected with one ``where`` each (the gradient is written by hand,
    so no branch needs a safe input). On CPU a form no element needs is not computed, and
    where every element lies in ``[1/4, 1]`` (a head's log-scales at their initial
    ``softplus(raw) = 1``, ``raw = x0``) only the form through the root is: in a network's
    log-scales most elements lie in one or two of the three ranges.
    """
    need_near = need_tail = True  # branch-free unless the values can be read
    if host_readable(x) and x.numel() > 0:
        # one float aminmax pass decides (6x faster on CPU than a bool mask's any / all)
        low, high = (float(v) for v in torch.aminmax(x))
        if low >= 0.25 and high <= 1.0:
            return _near_root(x)
        need_near, need_tail = low <= 1.0 and high >= 0.25, low < _LOG_SOFTPLUS_TAIL
    out = torch.log(-torch.nn.functional.logsigmoid(-x))  # log(softplus(x))
    if need_near:
        out = torch.where((x >= 0.25) & (x <= 1.0), _near_root(x), out)
    if need_tail:
        out = torch.where(x < _LOG_SOFTPLUS_TAIL, _tail(x), out)
    return out


def _log_softplus_derivative(x: Tensor) -> Tensor:
    """``d/dx log(softplus(x)) = sigmoid(x) / softplus(x)``; below -20, where both underflow,
    the derivative of the tail form, ``1 - (e^x/2) / (1 - e^x/2)``. Double where: both
    forms are fed a safe input where unselected, so a second derivative is finite too. On
    CPU (:func:`host_readable`) the tail form is built only if some element needs it.
    (Not ``sigmoid(x) e^{-out}`` from the saved value: ``exp`` turns the absolute error of
    ``out = log x`` into a relative ``|out| eps``, 3.5e-6 at ``x = 3.7e34`` in float32.)"""
    if host_readable(x) and (x.numel() == 0 or bool(x.amin() >= _LOG_SOFTPLUS_TAIL)):
        return torch.sigmoid(x) / -torch.nn.functional.logsigmoid(-x)
    tail = x < _LOG_SOFTPLUS_TAIL
    body_x = torch.where(tail, 0.0, x)
    body = torch.sigmoid(body_x) / -torch.nn.functional.logsigmoid(-body_x)
    half_e = 0.5 * torch.exp(torch.where(tail, x, 2.0 * _LOG_SOFTPLUS_TAIL))
    return torch.where(tail, 1.0 - half_e / (1.0 - half_e), body)


class _LogSoftplus(torch.autograd.Function):
    """:func:`_log_softplus_value` with the closed-form derivative (differentiable again)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return _log_softplus_value(x)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad * _log_softplus_derivative(ctx.saved_tensors[0])
