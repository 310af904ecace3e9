r"""Sampling with temperature, and the most-probable-component modes, of Gaussian mixtures.

The mixtures of a mixture density network (Bishop 1994) and of handwriting / sketch models
(Graves 2013, arXiv:1308.0850; Ha & Eck 2017, sketch-rnn, arXiv:1704.03477), given by
unconstrained parameters: mixture ``logits`` :math:`\ell` of shape ``(*, K)`` (weights
:math:`\pi = \operatorname{softmax}(\ell)`), component means ``loc`` and ``log_scale``
:math:`\log\sigma` of shape ``(*, K, D)`` and, for the bivariate mixture, ``atanh_rho``
:math:`a` of shape ``(*, K)`` (:math:`\rho = \tanh a`). The batch dimensions ``(*)``
broadcast like torch.

Everything is vectorised: one call draws every point of every batch element, with no
Python loop over points or components. A batch of no mixtures, or a ``sample_shape`` with
a 0, gives an empty result of the documented shape.

**Temperature** (sketch-rnn, section 3.3): sampling at temperature :math:`\tau \ge 0` draws
from the mixture with

.. math::
    \pi_k(\tau) = \frac{e^{\ell_k / \tau}}{\sum_j e^{\ell_j / \tau}}
               = \frac{\pi_k^{1/\tau}}{\sum_j \pi_j^{1/\tau}}, \qquad
    \sigma_{k}^2(\tau) = \tau\,\sigma_k^2, \qquad \rho_k(\tau) = \rho_k .

:math:`\tau = 1` is the mixture itself; :math:`\tau < 1` sharpens the weights towards the
most probable component and shrinks every component; :math:`\tau \to 0` (and
``temperature=0`` exactly) returns the mean of the most probable component, deterministic.

**Component draw** (Gumbel-max): :math:`k = \arg\max_k\,((\ell_k - \max_j \ell_j)/\tau +
G_k)` with :math:`G_k = -\log(-\log U_k)`, :math:`U_k \sim U[0, 1)` independent, is a
draw from :math:`\operatorname{Categorical}(\pi(\tau))` (subtracting the maximum keeps
the scaled logits :math:`\le 0`, so a tiny :math:`\tau` cannot overflow to ``inf``).
A component with logit ``-inf`` is never drawn. The uniforms have the resolution of the
compute dtype (``torch.rand``'s float32 values are multiples of :math:`2^{-24}`, so
:math:`G_k \le 16.6`), and a uniform of exactly 0 is read as the middle of its cell,
:math:`\epsilon/4` (:math:`2^{-25}`: :math:`G_k \ge -2.85`; as 0 it would give
:math:`G_k = -\infty` and hand the draw to any other component): a component whose
scaled logit lies more than 19.5 below the largest (probability below
:math:`e^{-19.5} = 3 \cdot 10^{-9}`) is never drawn in float32; in float64 the cut-off
is 40.4.

**Gradients**: the draw :math:`x = \mu_k + \sigma_k\sqrt\tau\,\epsilon` is differentiable
in ``loc``, ``log_scale`` and ``atanh_rho`` *for the drawn component* (the conditional
pathwise, or "reparameterise given the component", estimator). The component index is
discrete and gets no gradient, so nothing flows to ``logits``: as an estimator of
:math:`\nabla \mathbb E[f(x)]` this is unbiased for the component parameters
(:math:`\partial/\partial\mu_k = \pi_k \mathbb E[f'(x) \mid k]`, which is what it computes
on average) and biased (zero) for the logits. Use a score-function or marginalised
estimator where the weights must be learnt through samples.

**Dtypes**: float16 / bfloat16 parameters are computed in float32 and the samples and
summaries returned in the parameters' dtype (they are values of the random variable, not
log densities). Every random number comes from ``generator`` (or torch's global generator
when it is ``None``), so a seeded ``torch.Generator`` makes samples reproducible.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..._core.shapes import mixture_parameters
from ...special import mul_exp
from .._bivariate_forms import CorrelatedStep

__all__ = [
    "bivariate_normal_mixture_mode",
    "bivariate_normal_mixture_sample",
    "normal_mixture_mode",
    "normal_mixture_sample",
]


def _check_temperature(temperature: float) -> float:
    tau = float(temperature)
    if not (0.0 <= tau < math.inf):  # also rejects NaN
        raise ValueError(f"temperature must be a finite number >= 0; got {temperature!r}")
    return tau


def _component_index(
    logits: Tensor, tau: float, sample_shape: torch.Size, generator: torch.Generator | None
) -> Tensor:
    """Component indices ``(*sample_shape, *)`` drawn from ``softmax(logits / tau)``.

    ``tau == 0``: the argmax (the first one on ties), no randomness. Otherwise Gumbel-max
    on the shifted logits ``(l - max l) / tau <= 0`` (no overflow for tiny ``tau``).
    """
    logits = logits.detach()  # the index is discrete: no gradient, no graph
    if tau == 0.0:
        return logits.argmax(-1).expand((*sample_shape, *logits.shape[:-1]))
    shifted = (logits - logits.amax(-1, keepdim=True)) / tau
    u = torch.rand(
        (*sample_shape, *logits.shape),
        generator=generator,
        dtype=logits.dtype,
        device=logits.device,
    )
    # U = 0 stands for the cell [0, eps/2) of torch.rand's grid: read it as its middle, eps/4
    # (exact for the grid: no other value moves); as 0, G = -inf would make the most
    # probable component lose to any other, probability eps/2 per draw whatever the logits
    u.clamp_(min=torch.finfo(u.dtype).eps / 4)
    gumbel = -torch.log(-torch.log(u))  # -log(-log U) ~ Gumbel(0, 1)
    return (shifted + gumbel).argmax(-1)


def _pick(t: Tensor, index: Tensor, event_dims: int) -> Tensor:
    """``t[..., index, ...]``: the drawn component of ``t`` (``(*, K)`` or ``(*, K, D)``).

    ``index`` is ``(*sample_shape, *)``; the result ``(*sample_shape, *)`` or
    ``(*sample_shape, *, D)``, differentiable in ``t``.
    """
    lead = index.dim() - (t.dim() - 1 - event_dims)  # number of sample dimensions
    t = t[(None,) * lead]
    idx = index[(..., *(None,) * (event_dims + 1))]
    return torch.take_along_dim(t, idx, dim=-1 - event_dims).squeeze(-1 - event_dims)


def normal_mixture_sample(
    logits: Tensor,
    loc: Tensor,
    log_scale: Tensor,
    *,
    temperature: float = 1.0,
    sample_shape: torch.Size | tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Draw from a mixture of diagonal normals, at a temperature, in one vectorised call.

    .. math::
        k \sim \operatorname{Categorical}\big(\operatorname{softmax}(\ell / \tau)\big),
        \qquad x = \mu_k + \sqrt\tau\, e^{\log\sigma_k} \odot \epsilon,
        \quad \epsilon \sim \mathcal N(0, I_D)

    (sketch-rnn temperature, see the module docstring: :math:`\pi_k \to \pi_k^{1/\tau}`
    renormalised, :math:`\sigma^2 \to \tau\sigma^2`). ``temperature=0`` returns exactly
    ``loc`` of the component with the largest logit (the first on ties), draws no random
    number and never divides by zero. :math:`\sqrt\tau\sigma` is applied as
    ``mul_exp(eps, log_scale + log(tau) / 2)``: finite wherever the draw is
    (``log_scale = 100`` in float32 gives ``inf`` only where ``exp(100) * eps`` truly
    exceeds the range).

    Differentiable in ``loc`` and ``log_scale`` given the drawn component (conditional
    pathwise estimator); no gradient reaches ``logits`` (module docstring).

    Args:
        logits: mixture logits :math:`\ell`, shape ``(*, K)`` (unnormalised).
        loc: component means, shape ``(*, K, D)``.
        log_scale: component log standard deviations, shape ``(*, K, D)``.
        temperature: :math:`\tau \ge 0`, a Python number.
        sample_shape: leading shape of independent draws.
        generator: the ``torch.Generator`` every random number is drawn from (``None``:
            torch's global generator); same seed, same samples.

    Returns:
        Tensor of shape ``(*sample_shape, *, D)``, ``*`` the broadcast batch shape, in the
        parameters' dtype (half precision computed in float32).

    Raises:
        ValueError: ``temperature`` negative, NaN or infinite; shapes not ``(*, K)`` /
            ``(*, K, D)`` or not broadcastable (naming each argument and its shape).

    Example:
        >>> logits = torch.tensor([0.0, 2.0])  # weights softmax: 0.1192, 0.8808
        >>> loc = torch.tensor([[-5.0], [5.0]])  # K = 2 components, D = 1
        >>> log_scale = torch.zeros(2, 1)
        >>> g = torch.Generator().manual_seed(0)
        >>> x = normal_mixture_sample(logits, loc, log_scale, sample_shape=(10000,), generator=g)
        >>> x.shape, (x < 0).float().mean()  # the share of component 0
        (torch.Size([10000, 1]), tensor(0.1186))
        >>> x = normal_mixture_sample(
        ...     logits, loc, log_scale, temperature=0.5, sample_shape=(10000,), generator=g)
        >>> (x < 0).float().mean(), x[x > 0].var()  # softmax(logits / 0.5): 0.0180; var 0.5
        (tensor(0.0190), tensor(0.4887))
        >>> normal_mixture_sample(logits, loc, log_scale, temperature=0.0)
        tensor([5.])
    """
    tau = _check_temperature(temperature)
    (logits, loc, log_scale), dtype = mixture_parameters(
        None, logits=logits, loc=loc, log_scale=log_scale
    )
    index = _component_index(logits, tau, torch.Size(sample_shape), generator)
    mean = _pick(loc, index, 1)
    if tau == 0.0:
        return mean.to(dtype)
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    # sqrt(tau) sigma eps = eps exp(log_scale + log(tau)/2); log(1) = 0 exactly
    return (mean + mul_exp(eps, _pick(log_scale, index, 1) + 0.5 * math.log(tau))).to(dtype)


def normal_mixture_mode(logits: Tensor, loc: Tensor) -> Tensor:
    r"""The mean of the most probable component, :math:`\mu_{\arg\max_k \ell_k}`, ``(*, D)``.

    This is the "most-probable-component mode": the ``temperature -> 0`` limit of
    :func:`normal_mixture_sample`, and what sketch-rnn-style greedy decoding uses. It is
    *not* in general the mode (highest point) of the mixture density: overlapping
    components shift and merge peaks, and a heavy component with a large scale can have a
    lower peak than a light narrow one. Ties go to the first component. Cheap and
    deterministic; the true density mode has no closed form.

    Args:
        logits: mixture logits, shape ``(*, K)``.
        loc: component means, shape ``(*, K, D)``.

    Example:
        >>> normal_mixture_mode(torch.tensor([0.1, 0.0]), torch.tensor([[-1.0], [3.0]]))
        tensor([-1.])
    """
    (logits, loc), dtype = mixture_parameters(None, logits=logits, loc=loc)
    return _pick(loc, logits.detach().argmax(-1), 1).to(dtype)


def bivariate_normal_mixture_sample(
    logits: Tensor,
    loc: Tensor,
    log_scale: Tensor,
    atanh_rho: Tensor,
    *,
    temperature: float = 1.0,
    sample_shape: torch.Size | tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Draw from a mixture of correlated bivariate normals at a temperature (sketch-rnn).

    .. math::
        k \sim \operatorname{Categorical}\big(\operatorname{softmax}(\ell / \tau)\big),
        \qquad x = \mu_k + \sqrt\tau\,\sigma_k \odot
            \big(\epsilon_1,\ \rho_k\epsilon_1 + \sqrt{1 - \rho_k^2}\,\epsilon_2\big)

    with :math:`\epsilon_1, \epsilon_2 \sim \mathcal N(0, 1)` independent, so
    :math:`\operatorname{Cov}(x \mid k) = \tau\Sigma_k`; the correlation is unchanged by the
    temperature. :math:`\sqrt{1 - \rho^2}` is computed as :math:`1/\cosh a`
    (``2 e^{-|a|} / (1 + e^{-2|a|})``), never as ``1 - tanh(a)^2`` (0 in float32 once
    ``tanh(a)`` rounds to 1, from ``|a|`` of about 9): at ``|atanh_rho| = 50`` the points
    lie on the line :math:`x_2 - \mu_2 = \pm(\sigma_2/\sigma_1)(x_1 - \mu_1)`, finite.
    ``temperature=0`` returns exactly ``loc`` of the component with the largest logit.

    Differentiable in ``loc``, ``log_scale`` and ``atanh_rho`` given the drawn component
    (conditional pathwise estimator); no gradient reaches ``logits`` (module docstring).

    Args:
        logits: mixture logits, shape ``(*, K)``.
        loc: component means, shape ``(*, K, 2)``.
        log_scale: component log standard deviations, shape ``(*, K, 2)``.
        atanh_rho: :math:`\operatorname{atanh}` of the component correlations, ``(*, K)``.
        temperature: :math:`\tau \ge 0`, a Python number.
        sample_shape: leading shape of independent draws.
        generator: the ``torch.Generator`` every random number is drawn from.

    Returns:
        Tensor of shape ``(*sample_shape, *, 2)`` in the parameters' dtype.

    Raises:
        ValueError: bad ``temperature``; shapes not ``(*, K)`` / ``(*, K, 2)`` or not
            broadcastable.

    Example:
        >>> logits, loc = torch.zeros(1), torch.zeros(1, 2)  # one component
        >>> g = torch.Generator().manual_seed(0)
        >>> bivariate_normal_mixture_sample(  # rho = tanh(50) = 1: on the line x1 = x2
        ...     logits, loc, torch.zeros(1, 2), torch.tensor([50.0]), sample_shape=(2,),
        ...     generator=g)
        tensor([[-0.2905, -0.2905],
                [ 1.2645,  1.2645]])
    """
    tau = _check_temperature(temperature)
    (logits, loc, log_scale, atanh_rho), dtype = mixture_parameters(
        2, logits=logits, loc=loc, log_scale=log_scale, atanh_rho=atanh_rho
    )
    index = _component_index(logits, tau, torch.Size(sample_shape), generator)
    mean = _pick(loc, index, 1)
    if tau == 0.0:
        return mean.to(dtype)
    a = _pick(atanh_rho, index, 0)
    e1, e2 = torch.randn(
        mean.shape, generator=generator, dtype=mean.dtype, device=mean.device
    ).unbind(-1)
    ls1, ls2 = (_pick(log_scale, index, 1) + 0.5 * math.log(tau)).unbind(-1)
    x1 = mul_exp(e1, ls1)
    x2 = CorrelatedStep.apply(a, ls2, e1, e2)
    return (mean + torch.stack((x1, x2), -1)).to(dtype)


def bivariate_normal_mixture_mode(logits: Tensor, loc: Tensor) -> Tensor:
    r"""The mean of the most probable component, shape ``(*, 2)``.

    The "most-probable-component mode" (the ``temperature -> 0`` sample), not in general
    the mode of the mixture density; see :func:`normal_mixture_mode`.

    Example:
        >>> bivariate_normal_mixture_mode(
        ...     torch.tensor([0.0, 1.0]), torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
        tensor([2., 3.])
    """
    (logits, loc), dtype = mixture_parameters(2, logits=logits, loc=loc)
    return _pick(loc, logits.detach().argmax(-1), 1).to(dtype)
