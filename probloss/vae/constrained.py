r"""KL weighting strategies that steer a term towards a target: capacity and GECO.

:class:`Capacity` (Burgess et al. 2018) pulls the KL towards a growing target capacity;
:class:`GECO` (Rezende & Viola 2018) holds the reconstruction error at a tolerance through a
Lagrange multiplier. Both are :class:`~probloss.vae.weighting.Weighting` modules (inputs,
``step()``, state in buffers, float64 state) returning a
:class:`~probloss.vae.weighting.WeightedLoss`; see :mod:`probloss.vae.weighting`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedules import LinearWarmup, _check_weight
from .weighting import _F64, WeightedLoss, Weighting


class Capacity(Weighting):
    r"""Controlled capacity increase of Burgess et al. 2018 (arXiv:1804.03599).

    .. math::
        \mathcal{L} = D + \gamma\,\Big|\sum_{d=1}^{L} k_d - C(t)\Big|,
        \qquad C(t) = C_{\max} \min\!\big(t / T, 1\big)

    with :math:`C_{\max}` = ``max_capacity`` (nats), :math:`T` = ``steps``, :math:`\gamma`
    = ``gamma``: the KL is pulled towards a target that grows linearly from 0 to
    :math:`C_{\max}`, letting the encoder use more information as training proceeds
    (Burgess et al. use :math:`\gamma = 1000` and :math:`C_{\max} = 25` nats on dSprites).

    The reported ``beta`` is the derivative of the loss in the KL,
    :math:`\gamma\,\operatorname{sign}(\mathrm{KL} - C(t))`: ``+gamma`` while the KL is
    above the target (pushed down), ``-gamma`` below it (pushed up), 0 on it; ``kl_term``
    is the signed excess :math:`\mathrm{KL} - C(t)`, so ``loss = distortion + beta *
    kl_term``. Reading the sign synchronises a GPU once per call.

    Args:
        max_capacity: :math:`C_{\max} \ge 0`, nats.
        steps: :math:`T \ge 1`, steps of the linear increase.
        gamma: :math:`\gamma \ge 0`.

    Raises:
        ValueError: an argument out of range (naming it).

    Example:
        >>> capacity = Capacity(max_capacity=25.0, steps=100, gamma=1000.0)
        >>> for _ in range(20):
        ...     capacity.step()
        >>> capacity.capacity
        5.0
        >>> capacity(torch.tensor(80.0), torch.tensor([1.0, 2.0]))
        WeightedLoss(loss=tensor(2080.), beta=tensor(-1000.), kl_term=tensor(-2.))
    """

    def __init__(self, max_capacity: float, steps: int, gamma: float = 1000.0) -> None:
        super().__init__()
        _check_weight("max_capacity", max_capacity)
        _check_weight("gamma", gamma)
        self.target = LinearWarmup(steps, start=0.0, end=float(max_capacity))
        self.gamma = float(gamma)

    @property
    def capacity(self) -> float:
        """The target :math:`C(t)` in nats at the current step."""
        return self.target(self._steps)

    def _weigh(self, distortion: Tensor, kl_per_dim: Tensor) -> WeightedLoss:
        excess = kl_per_dim.sum() - self.capacity
        # d|x|/dx = sign(x), 0 at 0; a tensor: reading it would wait for an accelerator
        beta = self.gamma * torch.sign(excess.detach())
        return WeightedLoss(distortion + self.gamma * excess.abs(), beta, excess)

    def extra_repr(self) -> str:
        return f"max_capacity={self.target.end}, steps={self.target.steps}, gamma={self.gamma}"


class GECO(Weighting):
    r"""GECO, the constrained optimisation of Rezende & Viola 2018 (arXiv:1810.00597, alg. 1).

    Minimise the KL subject to a reconstruction constraint, through a Lagrange multiplier
    :math:`\lambda > 0`:

    .. math::
        \min \sum_d k_d \quad \text{s.t.} \quad C = D - \tau \le 0, \qquad
        \mathcal{L} = \sum_d k_d + \lambda\,\hat C

    with :math:`\tau` = ``tolerance`` (the reconstruction NLL, in nats per example, that is
    good enough). :math:`\hat C` is the constraint smoothed over batches, with the
    straight-through trick of the paper: its value is the moving average and its gradient
    that of the current batch,

    .. math::
        \bar C_t = \alpha \bar C_{t-1} + (1 - \alpha) C_t \;(\bar C_0 = C_0), \qquad
        \hat C = C_t + \operatorname{sg}(\bar C_t - C_t).

    ``step()`` commits :math:`\bar C_t` (from the last ``forward`` in training mode) and
    updates the multiplier in log space, so it stays positive:

    .. math::
        \lambda \leftarrow \lambda \exp(\eta\,\bar C_t)

    with :math:`\eta` = ``lr``: a violated constraint (:math:`\bar C > 0`) raises
    :math:`\lambda` and the weight on reconstruction, a satisfied one lowers it.

    Scale: dividing by :math:`\lambda` gives :math:`\hat C + \beta \sum_d k_d` with the
    reported ``beta`` :math:`= 1/\lambda`: GECO acts as a beta-VAE whose beta is adapted,
    but its loss is :math:`\lambda` times that, on a different scale from the ELBO's
    (divide by :math:`\lambda` to compare; the ELBO's ``nats`` report the true bound).
    ``forward`` in eval mode (``.eval()``) uses the committed average but records nothing,
    so evaluation batches never reach the multiplier. With gradient accumulation the last
    training ``forward`` before ``step()`` provides the constraint. The average delays the
    multiplier's response by about :math:`1/(1 - \alpha)` steps; if :math:`\lambda`
    overshoots or oscillates, lower ``lr`` or ``alpha``, or bound it with ``max_lambda``.
    Choose ``lr`` for the size of the constraint: :math:`\eta |\bar C|` is the change of
    :math:`\log\lambda` per step and should stay around 0.01 or below. The default suits
    constraints of a few nats; a distortion summed over 64 pixels starts about 100 nats
    from its target, and ``probloss demo vae`` uses ``lr=1e-4`` (with 1e-2 its
    :math:`\lambda` reached 1e8).
    Reading :math:`1/\lambda` synchronises a GPU once per call.

    Args:
        tolerance: :math:`\tau`, nats (same reduction as ``distortion``); any finite value.
        alpha: moving-average factor in ``[0, 1)``.
        lr: :math:`\eta > 0`, speed of the multiplier (per nat of constraint).
        init_lambda: initial :math:`\lambda > 0` (the paper starts at 1).
        min_lambda, max_lambda: optional bounds on :math:`\lambda`
            (``0 <= min_lambda <= init_lambda <= max_lambda``), the default leaves it free.

    Returns (forward):
        :class:`WeightedLoss` with ``beta`` :math:`= 1/\lambda` and ``kl_term``
        :math:`\sum_d k_d`.

    Raises:
        ValueError: an argument out of range (naming it).
        RuntimeError: ``step()`` without a training-mode ``forward`` since the last step.

    Example:
        >>> geco = GECO(tolerance=50.0, lr=0.01)
        >>> out = geco(torch.tensor(60.0), torch.tensor([3.0, 1.0]))  # constraint 10 > 0
        >>> out.loss, out.beta
        (tensor(14.), tensor(1.))
        >>> geco.step()
        >>> round(geco.lambda_, 4)  # exp(0.01 * 10)
        1.1052
    """

    log_lambda: Tensor
    c_ma: Tensor
    c_pending: Tensor
    has_pending: Tensor

    def __init__(
        self,
        tolerance: float,
        *,
        alpha: float = 0.99,
        lr: float = 1e-2,
        init_lambda: float = 1.0,
        min_lambda: float = 0.0,
        max_lambda: float = math.inf,
    ) -> None:
        super().__init__()
        if not math.isfinite(tolerance):
            raise ValueError(f"tolerance must be finite, got {tolerance!r}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must lie in [0, 1), got {alpha!r}")
        if not (math.isfinite(lr) and lr > 0.0):
            raise ValueError(f"lr must be finite and > 0, got {lr!r}")
        if not (math.isfinite(init_lambda) and init_lambda > 0.0):
            raise ValueError(f"init_lambda must be finite and > 0, got {init_lambda!r}")
        if not 0.0 <= min_lambda <= init_lambda <= max_lambda:
            raise ValueError(
                "need 0 <= min_lambda <= init_lambda <= max_lambda, got "
                f"min_lambda={min_lambda!r}, init_lambda={init_lambda!r}, "
                f"max_lambda={max_lambda!r}"
            )
        self.tolerance = float(tolerance)
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.min_lambda = float(min_lambda)
        self.max_lambda = float(max_lambda)
        self.register_buffer("log_lambda", torch.tensor(math.log(init_lambda), dtype=_F64))
        self.register_buffer("c_ma", torch.zeros((), dtype=_F64))
        self.register_buffer("c_pending", torch.zeros((), dtype=_F64))
        self.register_buffer("has_pending", torch.zeros((), dtype=torch.bool))

    @property
    def lambda_(self) -> float:
        """The current multiplier :math:`\\lambda`."""
        return float(self.log_lambda.exp())

    def _weigh(self, distortion: Tensor, kl_per_dim: Tensor) -> WeightedLoss:
        constraint = distortion - self.tolerance
        current = constraint.detach().to(_F64)
        if self._steps == 0:
            average = current  # C_ma^0 = C_0 (algorithm 1)
        else:
            average = self.alpha * self.c_ma + (1.0 - self.alpha) * current
        if self.training:
            self.c_pending.copy_(average)
            self.has_pending.fill_(True)
        # straight through: the value of the moving average, the gradient of this batch
        smoothed = constraint + (average.to(constraint.dtype) - constraint).detach()
        kl_term = kl_per_dim.sum()
        loss = kl_term + self.log_lambda.exp().to(constraint.dtype) * smoothed
        beta = torch.exp(-self.log_lambda).to(constraint.dtype)  # a tensor: no host read
        return WeightedLoss(loss, beta, kl_term)

    def _update(self) -> None:
        if not bool(self.has_pending):
            raise RuntimeError(
                "GECO.step() needs the constraint of the current batch: call forward() "
                "(in training mode) before each step()"
            )
        self.c_ma.copy_(self.c_pending)
        log_lambda = self.log_lambda + self.lr * self.c_ma
        if self.min_lambda > 0.0 or self.max_lambda < math.inf:
            # lambda is a multiplier, not differentiated: bounding it is the documented
            # projection onto [min_lambda, max_lambda] and loses no gradient
            low = math.log(self.min_lambda) if self.min_lambda > 0.0 else -math.inf
            log_lambda = log_lambda.clamp(low, math.log(self.max_lambda))
        self.log_lambda.copy_(log_lambda)
        self.has_pending.fill_(False)

    def extra_repr(self) -> str:
        return (
            f"tolerance={self.tolerance}, alpha={self.alpha}, lr={self.lr}, "
            f"min_lambda={self.min_lambda}, max_lambda={self.max_lambda}"
        )
