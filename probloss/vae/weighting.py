r"""KL weighting strategies: beta (with schedules), free bits, capacity and GECO.

A strategy turns the two parts of a negative ELBO into the scalar to minimise:

* ``distortion`` :math:`D`: the reconstruction negative log-likelihood in nats, reduced to a
  scalar (by :class:`~probloss.vae.elbo.ELBO`: the mean over examples of the sum over the
  data's dimensions);
* ``kl_per_dim`` :math:`k_d`, shape ``(L,)``: the KL of each latent dimension, reduced over
  examples the same way, so :math:`\sum_d k_d` is the KL term of the plain ELBO and
  :math:`D + \sum_d k_d` the negative ELBO.

Every strategy returns a :class:`WeightedLoss` ``(loss, beta, kl_term)``. For
:class:`Beta`, :class:`FreeBits` and :class:`Capacity`, ``loss = distortion + beta *
kl_term`` holds exactly (``beta`` is the derivative of the loss in the KL term); for
:class:`GECO` the loss is on the scale of its multiplier, ``loss = lambda * (C_hat + beta *
kl_term)`` with ``beta = 1 / lambda``.

Strategies are :class:`torch.nn.Module`\ s driven by the training step: call ``step()``
once per optimizer step. All their state (the step counter ``num_steps``, GECO's
multiplier and moving average) lives in buffers, so a strategy inside a model is saved in
the model's ``state_dict`` and a restored one resumes bit for bit. Floating-point state is
kept in float64 even when the owning model is cast with ``.half()`` / ``.to(dtype)`` (a
float16 multiplier could not record small updates). Half-precision inputs are computed and
returned in float32 (DESIGN.md, half-precision policy).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .._dtype import loss_tensors
from .schedules import Constant, LinearWarmup, Schedule, _check_weight

BetaLike = float | Schedule | Callable[[int], float]
_F64 = torch.float64


class WeightedLoss(NamedTuple):
    """What a :class:`Weighting` returns.

    Attributes:
        loss: the scalar to minimise.
        beta: the weight on the KL term in force (GECO: the effective ``1 / lambda``).
        kl_term: the KL term as penalised (after the free-bits floor; for capacity the
            signed excess ``KL - C(t)``), a scalar tensor.
    """

    loss: Tensor
    beta: float
    kl_term: Tensor


def normalised_beta(beta_norm: float, latent_dims: int, data_dims: int) -> float:
    r"""The KL weight that corresponds to a normalised beta of Higgins et al. 2017.

    .. math::
        \beta_{\text{norm}} = \beta\,\frac{L}{D}
        \quad\Longleftrightarrow\quad \beta = \beta_{\text{norm}}\,\frac{D}{L}

    with :math:`L` the number of latent dimensions and :math:`D` the number of data
    dimensions per example (pixels times channels). Higgins et al. ("beta-VAE: learning
    basic visual concepts with a constrained variational framework", ICLR 2017) normalise
    beta this way so that one value transfers across image and latent sizes: the
    reconstruction term is a sum over :math:`D` dimensions and the KL a sum over :math:`L`,
    so their ratio, and the weight that balances them, scales with :math:`D / L`.

    The same arithmetic explains the "hand-tuned KL weight" of user code: the mean over
    :math:`D` pixels of a per-pixel NLL is the summed NLL divided by :math:`D`, so
    ``nll.mean() + kl.sum()`` is :math:`\tfrac1D(\text{NLL} + D\cdot\text{KL})`, the ELBO
    with :math:`\beta = D` (3072 for 32x32 RGB); ``nll.mean() + kl.mean()`` is
    :math:`\beta = D / L`. The probloss ELBO sums over both and weights explicitly.

    Args:
        beta_norm: the normalised weight, finite and ``>= 0``.
        latent_dims: :math:`L \ge 1`.
        data_dims: :math:`D \ge 1`.

    Returns:
        :math:`\beta` for :class:`Beta` (and the ``beta`` of :func:`~probloss.vae.elbo.elbo`).

    Raises:
        ValueError: ``beta_norm`` negative or not finite, a size below 1.

    Example:
        >>> normalised_beta(0.005, latent_dims=10, data_dims=64 * 64)  # dSprites-sized
        2.048
    """
    _check_weight("beta_norm", beta_norm)
    for name, size in (("latent_dims", latent_dims), ("data_dims", data_dims)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {size!r}")
    return beta_norm * data_dims / latent_dims


# ======================================================================================
# Shared pieces
# ======================================================================================


def _as_schedule(beta: BetaLike) -> Callable[[int], float]:
    """A number becomes :class:`Constant` (checked); a schedule or callable is kept."""
    if isinstance(beta, (int, float)) and not isinstance(beta, bool):
        return Constant(beta)
    if callable(beta):
        return beta
    raise TypeError(f"beta must be a number or a schedule (step -> float), got {beta!r}")


def _weight_at(schedule: Callable[[int], float], step: int) -> float:
    """The schedule's weight at ``step``, checked (a user callable may return anything)."""
    beta = float(schedule(step))
    if not (math.isfinite(beta) and beta >= 0.0):
        raise ValueError(f"the beta schedule returned {beta!r} at step {step}; need >= 0")
    return beta


def _check_inputs(distortion: Tensor, kl_per_dim: Tensor) -> tuple[Tensor, Tensor]:
    """Common loss dtype (half -> float32); distortion of shape (), kl_per_dim of (L,)."""
    t = loss_tensors(distortion=distortion, kl_per_dim=kl_per_dim)
    distortion, kl_per_dim = t["distortion"], t["kl_per_dim"]
    if distortion.dim() != 0:
        raise ValueError(f"distortion must be a scalar, shape (), got {tuple(distortion.shape)}")
    if kl_per_dim.dim() != 1 or kl_per_dim.numel() == 0:
        raise ValueError(
            f"kl_per_dim must have shape (L,) with L >= 1, got {tuple(kl_per_dim.shape)}"
        )
    return distortion, kl_per_dim


def _beta_loss(distortion: Tensor, kl_per_dim: Tensor, beta: float) -> WeightedLoss:
    """``distortion + beta * kl_per_dim.sum()``: the one formula of :class:`Beta` and
    :func:`~probloss.vae.elbo.elbo` (inputs already checked)."""
    kl = kl_per_dim.sum()
    return WeightedLoss(distortion + beta * kl, beta, kl)


# ======================================================================================
# Base class
# ======================================================================================


class Weighting(nn.Module, abc.ABC):
    """Base class of the KL weighting strategies.

    ``forward(distortion, kl_per_dim)`` checks the inputs and returns a
    :class:`WeightedLoss`; ``step()`` marks one optimizer step done. The number of steps
    done is the int64 buffer ``num_steps`` (mirrored on the host, so that reading it never
    synchronises a GPU); subclasses keep any other state in buffers too.
    """

    num_steps: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.int64))
        self._steps = 0  # host copy of num_steps, refreshed by load_state_dict

    @property
    def steps_done(self) -> int:
        """The number of ``step()`` calls so far (restored by ``load_state_dict``)."""
        return self._steps

    def forward(self, distortion: Tensor, kl_per_dim: Tensor) -> WeightedLoss:
        """Weigh the reduced distortion (shape ``()``) against the KL per dimension ``(L,)``.

        Raises:
            ValueError: a shape other than ``()`` and ``(L,)``.
            TypeError: a non-floating tensor.
        """
        distortion, kl_per_dim = _check_inputs(distortion, kl_per_dim)
        return self._weigh(distortion, kl_per_dim)

    @abc.abstractmethod
    def _weigh(self, distortion: Tensor, kl_per_dim: Tensor) -> WeightedLoss:
        """The strategy, on checked inputs of one floating dtype."""

    def step(self) -> None:
        """One optimizer step done: update the strategy's state, advance ``num_steps``."""
        with torch.no_grad():
            self._update()
            self.num_steps.add_(1)
        self._steps += 1

    def _update(self) -> None:
        """State update at the end of an optimizer step, before the counter advances."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._steps = int(self.num_steps)

    def _apply(self, fn, recurse=True):
        # State, not activations: a cast of the model (.half(), .to(dtype)) must not round
        # it (a float16 log-multiplier near 1 has an ulp of 1e-3 and would drop GECO's
        # updates), so float64 buffers keep their values and only follow the device.
        state = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == _F64}
        super()._apply(fn, recurse)
        for name, before in state.items():
            after = self._buffers[name]
            if after is not None and after.dtype != _F64:
                self._buffers[name] = before.to(after.device)
        return self


# ======================================================================================
# Strategies
# ======================================================================================


class Beta(Weighting):
    r"""A (scheduled) KL weight: the beta-VAE and KL annealing.

    .. math::
        \mathcal{L} = D + \beta(t) \sum_{d=1}^{L} k_d

    with :math:`D` the distortion. ``Beta(1.0)`` is the plain negative ELBO (Kingma &
    Welling 2013, arXiv:1312.6114); a constant ``beta > 1`` is the beta-VAE of Higgins et
    al. 2017, whose size-independent normalised beta is ``beta * latent_dims /
    data_dims`` (convert with :func:`normalised_beta`, whose docstring also explains why
    averaging instead of summing over pixels or latents silently changes the effective
    beta); a schedule from :mod:`probloss.vae.schedules` gives KL annealing (Bowman et al.
    2015, Fu et al. 2019, Ha & Eck 2017). :math:`t` is ``num_steps``, the number of
    ``step()`` calls so far.

    Args:
        beta: a number ``>= 0``, a :class:`~probloss.vae.schedules.Schedule`, or any
            callable ``step -> float`` (its values are checked to be ``>= 0``).

    Returns (forward):
        :class:`WeightedLoss` with ``beta = beta(t)`` and ``kl_term`` :math:`\sum_d k_d`.

    Raises:
        ValueError: a negative or non-finite ``beta`` (also as returned by a schedule).
        TypeError: ``beta`` neither a number nor callable.

    Example:
        >>> from probloss.vae.schedules import LinearWarmup
        >>> weighting = Beta(LinearWarmup(steps=10))
        >>> kl = torch.tensor([2.0, 0.5])
        >>> for _ in range(4):
        ...     weighting.step()
        >>> weighting(torch.tensor(100.0), kl)
        WeightedLoss(loss=tensor(101.), beta=0.4, kl_term=tensor(2.5000))
    """

    def __init__(self, beta: BetaLike = 1.0) -> None:
        super().__init__()
        self.schedule = _as_schedule(beta)

    @property
    def beta(self) -> float:
        """The weight in force at the current step."""
        return _weight_at(self.schedule, self._steps)

    def _weigh(self, distortion: Tensor, kl_per_dim: Tensor) -> WeightedLoss:
        return _beta_loss(distortion, kl_per_dim, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.schedule!r}"


class FreeBits(Weighting):
    r"""Free bits of Kingma et al. 2016 (arXiv:1606.04934, appendix C.8).

    .. math::
        \mathcal{L} = D + \beta(t) \sum_{d=1}^{L} \max(\lambda, k_d)

    with :math:`\lambda` = ``threshold`` in nats per latent dimension and :math:`k_d` the
    KL of dimension :math:`d` averaged over the minibatch (as the ELBO reduces it). A
    dimension whose batch-mean KL is at or below the threshold costs the constant
    :math:`\lambda`: its KL gets **exactly zero gradient**, so the encoder may use it up to
    :math:`\lambda` nats for free; a dimension above the threshold gets the full gradient
    :math:`\beta(t)`. At a tie, :math:`k_d = \lambda`, the floor wins (zero gradient; the
    subgradient of the max there is any value in :math:`[0, \beta]`). With
    ``threshold=0`` the value is that of :class:`Beta` and so is the gradient wherever
    :math:`k_d > 0`. The threshold is in nats; ``b`` bits are ``b * ln 2`` nats.

    Args:
        threshold: :math:`\lambda \ge 0`, nats per latent dimension (Kingma et al. use
            groups of latents; pass the KL per group as ``kl_per_dim`` to do the same).
        beta: weight on the floored KL, a number or a schedule as in :class:`Beta`.

    Returns (forward):
        :class:`WeightedLoss` with ``beta = beta(t)`` and ``kl_term``
        :math:`\sum_d \max(\lambda, k_d)`.

    Raises:
        ValueError: a negative or non-finite ``threshold`` or ``beta``.

    Example:
        >>> kl = torch.tensor([0.1, 2.0], requires_grad=True)
        >>> out = FreeBits(threshold=0.5)(torch.tensor(10.0), kl)
        >>> out.kl_term
        tensor(2.5000, grad_fn=<SumBackward0>)
        >>> out.loss.backward(); kl.grad
        tensor([0., 1.])
    """

    def __init__(self, threshold: float, beta: BetaLike = 1.0) -> None:
        super().__init__()
        _check_weight("threshold", threshold)
        self.threshold = float(threshold)
        self.schedule = _as_schedule(beta)

    @property
    def beta(self) -> float:
        """The weight in force at the current step."""
        return _weight_at(self.schedule, self._steps)

    def _weigh(self, distortion: Tensor, kl_per_dim: Tensor) -> WeightedLoss:
        beta = self.beta
        # The floor is the method itself (the KL a dimension may carry for free), not a
        # stability fix; strict ">" makes the floor win a tie: zero gradient at equality.
        floored = torch.where(kl_per_dim > self.threshold, kl_per_dim, self.threshold)
        kl_term = floored.sum()
        return WeightedLoss(distortion + beta * kl_term, beta, kl_term)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, beta={self.schedule!r}"


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
        WeightedLoss(loss=tensor(2080.), beta=-1000.0, kl_term=tensor(-2.))
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
        beta = self.gamma * float(torch.sign(excess.detach()))  # d|x|/dx = sign(x), 0 at 0
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
        (tensor(14.), 1.0)
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
        return WeightedLoss(loss, float(torch.exp(-self.log_lambda)), kl_term)

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
