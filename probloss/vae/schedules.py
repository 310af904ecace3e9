r"""KL weight schedules: :math:`\beta(t)` as a pure function of the optimizer step ``t``.

Each schedule is a small frozen dataclass; calling it with the number of optimizer steps
done so far (``0`` before the first) returns the KL weight as a Python float. Being pure,
a schedule has no state of its own: :class:`~probloss.vae.weighting.Beta` keeps the step
counter (in its ``state_dict``) and asks the schedule for :math:`\beta(t)`.

* :class:`Constant`: a fixed weight (beta-VAE, Higgins et al. 2017);
* :class:`LinearWarmup`: a linear ramp after a delay (KL warm-up);
* :class:`SigmoidAnnealing`: a logistic ramp (Bowman et al. 2015, arXiv:1511.06349);
* :class:`CyclicalAnnealing`: a ramp repeated every ``period`` steps (Fu et al. 2019,
  arXiv:1903.10145);
* :class:`ExponentialApproach`: a geometric approach to ``end`` (sketch-rnn, Ha & Eck 2017,
  arXiv:1704.03477).

Arguments are checked when a schedule is built (``ValueError`` naming the argument); the
step must be a non-negative integer (``TypeError`` / ``ValueError``).
"""

from __future__ import annotations

import abc
import math
import operator
from dataclasses import dataclass

from .._core.validation import check_choice

_SHAPES = ("linear", "sigmoid", "cosine")
_TWO_SINH_3 = 2.0 * math.sinh(3.0)


# ======================================================================================
# Argument checks and shared arithmetic
# ======================================================================================


def _check_step(step: int) -> int:
    """``step`` as an int, or a TypeError (not an integer) / ValueError (negative)."""
    if isinstance(step, bool):
        raise TypeError(f"step must be a non-negative integer, got {step!r}")
    try:
        t = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be a non-negative integer, got {step!r}") from None
    if t < 0:
        raise ValueError(f"step must be a non-negative integer, got {t}")
    return t


def _check_weight(name: str, value: float) -> None:
    """A KL weight: a finite real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def _check_count(name: str, value: int, minimum: int) -> None:
    """A number of steps or cycles: an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _lerp(start: float, end: float, fraction: float) -> float:
    """``start`` at fraction 0, ``end`` at fraction 1 (each exactly), linear between."""
    return start * (1.0 - fraction) + end * fraction  # exact at both ends, unlike s + (e-s) f


def _logistic(x: float) -> float:
    """``1 / (1 + exp(-x))`` for every float ``x`` without OverflowError."""
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)  # exp of a non-positive argument only: never overflows
    return e / (1.0 + e)


# ======================================================================================
# Schedules
# ======================================================================================


class Schedule(abc.ABC):
    """A KL weight as a pure function of the number of optimizer steps done."""

    @abc.abstractmethod
    def __call__(self, step: int) -> float:
        """The KL weight after ``step`` optimizer steps (``step = 0`` before the first)."""


@dataclass(frozen=True)
class Constant(Schedule):
    r"""A constant KL weight, :math:`\beta(t) = \beta`.

    ``Constant(1.0)`` gives the plain ELBO; ``beta > 1`` is the beta-VAE of Higgins et al.
    2017 ("beta-VAE: learning basic visual concepts with a constrained variational
    framework", ICLR).

    Args:
        beta: the weight, finite and ``>= 0``.

    Raises:
        ValueError: ``beta`` negative or not finite.

    Example:
        >>> Constant(4.0)(0), Constant(4.0)(10_000)
        (4.0, 4.0)
    """

    beta: float = 1.0

    def __post_init__(self) -> None:
        _check_weight("beta", self.beta)

    def __call__(self, step: int) -> float:
        _check_step(step)
        return float(self.beta)


@dataclass(frozen=True)
class LinearWarmup(Schedule):
    r"""Hold ``start`` for ``delay`` steps, ramp linearly to ``end`` over ``steps`` steps.

    .. math::
        \beta(t) = \begin{cases}
            s & t < \delta \\
            s + (e - s)\,\dfrac{t - \delta}{n} & \delta \le t < \delta + n \\
            e & t \ge \delta + n
        \end{cases}

    with :math:`s` = ``start``, :math:`e` = ``end``, :math:`n` = ``steps``,
    :math:`\delta` = ``delay``. The usual KL warm-up (KL cost annealing, Bowman et al. 2015,
    arXiv:1511.06349, with a linear instead of a logistic ramp).

    Args:
        steps: length of the ramp, an integer ``>= 1``.
        start: weight before and at the start of the ramp, finite and ``>= 0``.
        end: weight from step ``delay + steps`` on, finite and ``>= 0``.
        delay: steps at ``start`` before the ramp begins, an integer ``>= 0``.

    Raises:
        ValueError: an argument out of range (naming it).

    Example:
        >>> warmup = LinearWarmup(steps=4, delay=2)
        >>> [warmup(t) for t in range(8)]
        [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """

    steps: int
    start: float = 0.0
    end: float = 1.0
    delay: int = 0

    def __post_init__(self) -> None:
        _check_count("steps", self.steps, 1)
        _check_weight("start", self.start)
        _check_weight("end", self.end)
        _check_count("delay", self.delay, 0)

    def __call__(self, step: int) -> float:
        t = _check_step(step) - self.delay
        if t <= 0:
            return float(self.start)
        if t >= self.steps:
            return float(self.end)
        return _lerp(self.start, self.end, t / self.steps)


@dataclass(frozen=True)
class SigmoidAnnealing(Schedule):
    r"""Logistic KL annealing of Bowman et al. 2015 (arXiv:1511.06349).

    .. math::
        \beta(t) = \frac{e}{1 + \exp(-k (t - t_0))}

    with :math:`e` = ``end``, :math:`k` = ``steepness``, :math:`t_0` = ``midpoint``:
    :math:`\beta(t_0) = e/2`, rising from about 0 to ``end``; the width of the rise is
    about :math:`8/k` steps (from 2 % to 98 % of ``end``). Evaluated with ``exp`` of a
    non-positive argument only, so no step overflows.

    Args:
        midpoint: step :math:`t_0` at which the weight is ``end / 2``, finite.
        steepness: :math:`k > 0`, per step.
        end: the limit as ``t -> inf``, finite and ``>= 0``.

    Raises:
        ValueError: an argument out of range (naming it).

    Example:
        >>> anneal = SigmoidAnnealing(midpoint=1000, steepness=0.01)
        >>> [round(anneal(t), 6) for t in (0, 1000, 2000, 10**9)]
        [4.5e-05, 0.5, 0.999955, 1.0]
    """

    midpoint: float
    steepness: float
    end: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.midpoint):
            raise ValueError(f"midpoint must be finite, got {self.midpoint!r}")
        if not (math.isfinite(self.steepness) and self.steepness > 0.0):
            raise ValueError(f"steepness must be finite and > 0, got {self.steepness!r}")
        _check_weight("end", self.end)

    def __call__(self, step: int) -> float:
        t = _check_step(step)
        return self.end * _logistic(self.steepness * (t - self.midpoint))


@dataclass(frozen=True)
class CyclicalAnnealing(Schedule):
    r"""Cyclical KL annealing of Fu et al. 2019 (arXiv:1903.10145).

    .. math::
        \tau = \frac{t \bmod P}{P}, \qquad
        \beta(t) = \begin{cases}
            s + (e - s)\, r(\tau / R) & \tau < R \\
            e & \tau \ge R
        \end{cases}

    with :math:`P` = ``period``, :math:`R` = ``ratio``, :math:`s` = ``start``,
    :math:`e` = ``end``: every cycle of ``period`` steps rises from ``start`` to ``end``
    over its first ``ratio`` fraction, then holds ``end``. With ``cycles`` given, the weight
    stays at ``end`` from step ``cycles * period`` on (the paper's total of
    :math:`M` cycles; Fu et al. use :math:`M = 4`, :math:`R = 0.5`). The ramp
    :math:`r(u)`, :math:`0 \le u < 1`, has one of three shapes, each going exactly from 0 to 1:

    * ``"linear"``: :math:`r(u) = u` (the paper's choice);
    * ``"sigmoid"``: the logistic over :math:`[-6, 6]`, shifted and scaled to end exactly at
      0 and 1, :math:`r(u) = \tfrac12\big(1 + \tanh(6u - 3)/\tanh 3\big)`, evaluated as
      :math:`\sinh(6u) / (2 \sinh 3 \cosh(6u - 3))`;
    * ``"cosine"``: :math:`r(u) = \tfrac12 (1 - \cos \pi u) = \sin^2(\pi u / 2)`.

    The sigmoid and cosine ramps are evaluated in these forms to keep full relative accuracy
    near :math:`u = 0`.

    Args:
        period: steps per cycle, an integer ``>= 1``.
        ratio: fraction of each cycle spent rising, in ``(0, 1]``.
        start, end: weights at the start of a cycle and on its plateau, finite, ``>= 0``.
        shape: ``"linear"``, ``"sigmoid"`` or ``"cosine"``.
        cycles: number of cycles before the weight stays at ``end``; ``None`` repeats forever.

    Raises:
        ValueError: an argument out of range (naming it).

    Example:
        >>> cyc = CyclicalAnnealing(period=4, ratio=0.5, cycles=2)
        >>> [cyc(t) for t in range(10)]
        [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    """

    period: int
    ratio: float = 0.5
    start: float = 0.0
    end: float = 1.0
    shape: str = "linear"
    cycles: int | None = None

    def __post_init__(self) -> None:
        _check_count("period", self.period, 1)
        if not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio <= 1.0):
            raise ValueError(f"ratio must lie in (0, 1], got {self.ratio!r}")
        _check_weight("start", self.start)
        _check_weight("end", self.end)
        check_choice("shape", self.shape, _SHAPES)
        if self.cycles is not None:
            _check_count("cycles", self.cycles, 1)

    def __call__(self, step: int) -> float:
        t = _check_step(step)
        if self.cycles is not None and t >= self.cycles * self.period:
            return float(self.end)
        u = (t % self.period) / (self.ratio * self.period)  # integer modulus: exactly periodic
        if u >= 1.0:
            return float(self.end)
        return _lerp(self.start, self.end, self._ramp(u))

    def _ramp(self, u: float) -> float:
        if self.shape == "linear":
            return u
        if self.shape == "sigmoid":
            # (1 + tanh(6u - 3) / tanh 3) / 2 with tanh a + tanh b = sinh(a + b) / (cosh a cosh b):
            # no cancellation near u = 0, r(0) = 0 and r(1/2) = 1/2 exactly
            return math.sinh(6.0 * u) / (_TWO_SINH_3 * math.cosh(6.0 * u - 3.0))
        return math.sin(0.5 * math.pi * u) ** 2  # (1 - cos x) / 2 = sin^2(x / 2), no cancellation


@dataclass(frozen=True)
class ExponentialApproach(Schedule):
    r"""The KL weight schedule of sketch-rnn (Ha & Eck 2017, arXiv:1704.03477).

    .. math::
        \beta(t) = e - (e - s)\, d^{\,t} = s\, d^{\,t} + e\,(1 - d^{\,t})

    with :math:`s` = ``start``, :math:`e` = ``end``, :math:`d` = ``decay``: ``start`` at
    step 0, approaching ``end`` geometrically, halfway after :math:`\ln 2 / (-\ln d)` steps
    (13863 steps for the paper's :math:`d = 0.99995`). Evaluated as the right-hand form
    with :math:`1 - d^t = -\operatorname{expm1}(t \ln d)`: exact at ``t = 0`` and
    accurate for small ``t``, where ``1 - d**t`` would cancel.

    Args:
        start: weight at step 0 (sketch-rnn: 0.01), finite and ``>= 0``.
        decay: :math:`d \in (0, 1)`, the per-step factor of the remaining gap.
        end: the limit (sketch-rnn's ``kl_weight``), finite and ``>= 0``.

    Raises:
        ValueError: an argument out of range (naming it).

    Example:
        >>> approach = ExponentialApproach(start=0.01, decay=0.99995)
        >>> [round(approach(t), 6) for t in (0, 1000, 13863, 10**7)]
        [0.01, 0.058284, 0.50501, 1.0]
    """

    start: float = 0.01
    decay: float = 0.99995
    end: float = 1.0

    def __post_init__(self) -> None:
        _check_weight("start", self.start)
        if not (isinstance(self.decay, (int, float)) and 0.0 < self.decay < 1.0):
            raise ValueError(f"decay must lie in (0, 1), got {self.decay!r}")
        _check_weight("end", self.end)

    def __call__(self, step: int) -> float:
        t = _check_step(step)
        gap = -math.expm1(t * math.log(self.decay))  # 1 - d^t = -expm1(t ln d), no cancellation
        return self.start * self.decay**t + self.end * gap
