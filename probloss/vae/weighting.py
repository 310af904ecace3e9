r"""KL weighting strategies: the base class, beta (with schedules) and free bits.

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
returned in float32. The strategies that steer a term towards a target, :class:`Capacity`
and :class:`GECO`, are in :mod:`probloss.vae.constrained`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .._core.dtype import loss_tensors
from .schedules import Constant, Schedule, _check_weight

BetaLike = float | Schedule | Callable[[int], float]
_F64 = torch.float64


class WeightedLoss(NamedTuple):
    """What a :class:`Weighting` returns.

    Attributes:
        loss: the scalar to minimise.
        beta: the weight on the KL term in force (GECO: the effective ``1 / lambda``): a
            float where it is fixed by the step count, a 0-dim tensor where it depends on
            the data (:class:`~probloss.vae.constrained.GECO`,
            :class:`~probloss.vae.constrained.Capacity`), so that no step reads a value on
            the host; ``float(beta)`` where a number is wanted (a log line).
        kl_term: the KL term as penalised (after the free-bits floor; for capacity the
            signed excess ``KL - C(t)``), a scalar tensor.
    """

    loss: Tensor
    beta: float | Tensor
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
