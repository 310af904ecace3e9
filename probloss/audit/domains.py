r"""Argument domains of the stability audit, their hard values and the grid of points.

A :class:`Domain` is one of six kinds, optionally cut to closed bounds
(``"real[-100,100]"``, ``"positive[1e-3,1e3]"``; ``inf`` / ``-inf`` leave a side open):

===============  ===========  =========================================================
kind             interval     typical random draws
===============  ===========  =========================================================
``real``         (-inf, inf)  :math:`\pm 10^{U(-3, 1)}`, magnitudes 1e-3 .. 10
``logit``        (-inf, inf)  :math:`\pm 10^{U(-3, 1.5)}`, on into sigmoid saturation
``positive``     (0, inf)     :math:`10^{U(-3, 1)}`
``nonnegative``  [0, inf)     :math:`10^{U(-3, 1)}`
``unit``         (0, 1)       :math:`U(0, 1)`
``correlation``  (-1, 1)      :math:`U(-1, 1)`
===============  ===========  =========================================================

Hard values (:func:`special_values`, from ``f = torch.finfo(dtype)``; all magnitudes):
``tiny`` (``f.tiny``, the smallest normal), ``subnormal`` (``f.tiny * f.eps``, the
smallest subnormal: every dtype here has them), ``eps``, ``sqrt_eps``, ``one``, ``1e4``,
``sqrt_max`` and ``huge`` (the largest powers of ten below ``sqrt(f.max)`` and
``f.max / 100``: squares of the first still fit, of the second not), ``exp_max``
(``log(f.max)``, where ``exp`` overflows) and ``exp_overflow`` (one more), ``exp_tiny``
(``|log(f.tiny)|``) and ``exp_underflow`` (``|log(subnormal)| + 1``, ``exp(-x)`` rounds to 0),
``sigmoid_saturation`` (``log(4/eps) + 1``: ``sigmoid(x)`` rounds to 1) and
``tanh_saturation`` (``log(8/eps)/2 + 1``: ``tanh(x)`` rounds to 1, from 9.01 on in
float32; so ``tanh(10) == 1`` exactly).

The grid of a kind (:meth:`Domain.hard_values`): ``real`` and ``logit`` take 0 and every
magnitude with both signs; ``positive`` the magnitudes, ``nonnegative`` also 0. ``unit``
takes ``tiny``, ``subnormal``, ``eps``, ``sqrt_eps``, 1/2 and ``1 - sqrt_eps``,
``1 - eps``, ``1 - eps/2`` (the largest number below 1), and ``1 - eps/8``;
``correlation`` takes 0, the same small values with both signs, ``+-1/2``,
``+-(1 - sqrt_eps)``, ``+-(1 - eps)``, ``+-(1 - eps/2)``, ``+-tanh(10)`` and
``+-(1 - eps/8)``. Every hard value lies strictly inside the domain in float64. Rounded to
a narrower dtype, ``tanh(10)`` and ``1 - eps/8`` land *on* the boundary 1: exactly what a
correlation from ``tanh`` does in float32, the failure the audit must catch (the float64
grid has no ``1 - eps/8``: with float64's own ``eps`` it is not a float64 number). Near 0
no such value is added: the dtype holds numbers down to ``subnormal``, and a caller's
value only rounds to 0 below that. Bounds cut the grid to the closed interval and add
the bounds; values beyond the dtype's range are left out (they would round to inf).

:func:`build_points` crosses the grids (one design for any arity up to about 8):

1. one-at-a-time sweeps: every hard value of each argument, the others typical, three
   times with fresh typical draws;
2. all pairs of hard values of every pair of arguments, the others typical, subsampled
   uniformly when the pairs exceed ``max_pair_points`` (20 000 by default; 2 ``real``
   arguments with 29 hard values each give 841 pairs, 8 of them 23 548, which are cut);
3. ``mixed_points`` draws mixing hard values (each coordinate with probability 1/4) and
   typical values, and ``typical_points`` purely typical draws.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

KINDS = ("real", "logit", "positive", "nonnegative", "unit", "correlation")
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
# (low, high, low closed, high closed) of each kind.
_NATURAL = {
    "real": (-math.inf, math.inf, False, False),
    "logit": (-math.inf, math.inf, False, False),
    "positive": (0.0, math.inf, False, False),
    "nonnegative": (0.0, math.inf, True, False),
    "unit": (0.0, 1.0, False, False),
    "correlation": (-1.0, 1.0, False, False),
}
# log10 range of the magnitude of typical draws, per unbounded kind.
_TYPICAL_LOG10 = {"real": (-3.0, 1.0), "logit": (-3.0, 1.5)}
_LARGE = ("1e4", "sqrt_max", "huge", "exp_max", "exp_overflow", "exp_tiny", "exp_underflow")
_LARGE += ("sigmoid_saturation", "tanh_saturation")
_DOMAIN_RE = re.compile(r"^\s*([a-z]+)\s*(?:\[\s*([^,\]]+?)\s*,\s*([^\]]+?)\s*\])?\s*$")


class AuditUsageError(ValueError):
    """The audit was asked something it cannot do (bad domain, argument, function shape)."""


def special_values(dtype: torch.dtype) -> dict[str, float]:
    """The named hard magnitudes of ``dtype`` (see the module docstring), as float64 numbers.

    Example:
        >>> v = special_values(torch.float32)
        >>> v["tiny"], v["subnormal"], round(v["exp_max"], 4), round(v["tanh_saturation"], 4)
        (1.1754943508222875e-38, 1.401298464324817e-45, 88.7228, 10.0109)
    """
    f = torch.finfo(dtype)
    subnormal = f.tiny * f.eps  # 2^(emin - mantissa bits): the smallest positive number
    return {
        "tiny": f.tiny,
        "subnormal": subnormal,
        "eps": f.eps,
        "sqrt_eps": math.sqrt(f.eps),
        "one": 1.0,
        "1e4": 1e4,
        "sqrt_max": 10.0 ** math.floor(math.log10(math.sqrt(f.max))),
        "huge": 10.0 ** math.floor(math.log10(f.max / 100.0)),
        "exp_max": math.log(f.max),
        "exp_overflow": math.log(f.max) + 1.0,
        "exp_tiny": -math.log(f.tiny),
        "exp_underflow": -math.log(subnormal) + 1.0,
        # below 1 the spacing is eps/2, so 1 - sigmoid(x) < e^-x < eps/4 rounds sigmoid to 1;
        # one more for margin (any rounding of the implementation)
        "sigmoid_saturation": math.log(4.0 / f.eps) + 1.0,
        # likewise 1 - tanh(x) < 2 e^-2x < eps/4 rounds tanh(x) to 1
        "tanh_saturation": 0.5 * math.log(8.0 / f.eps) + 1.0,
    }


def _unique_rounded(values: list[float], dtype: torch.dtype) -> Tensor:
    """``values`` as float64, keeping the first of those that round to the same ``dtype`` value."""
    t = torch.tensor(values, dtype=torch.float64)
    seen: set[float] = set()
    keep = []
    for i, r in enumerate(t.to(dtype).tolist()):
        if r not in seen:
            seen.add(r)
            keep.append(i)
    return t[keep]


@dataclass(frozen=True)
class Domain:
    """The set of inputs of one argument: a kind, optionally cut to closed bounds.

    Args:
        kind: one of ``real``, ``logit``, ``positive``, ``nonnegative``, ``unit``,
            ``correlation``.
        low, high: optional closed bounds inside the kind's interval (``None``: none).

    Example:
        >>> d = Domain.parse("positive[1e-3,1e3]")
        >>> d, d.interval()
        (Domain('positive[0.001,1000]'), (0.001, 1000.0, True, True))
    """

    kind: str
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AuditUsageError(
                f"unknown domain kind {self.kind!r}; expected one of {', '.join(KINDS)}"
            )
        a, b, _, _ = _NATURAL[self.kind]
        low = a if self.low is None else self.low
        high = b if self.high is None else self.high
        if math.isnan(low) or math.isnan(high) or not (a <= low < high <= b):
            raise AuditUsageError(
                f"bad bounds [{low:g}, {high:g}] for {self.kind}: need {a:g} <= low < high <= {b:g}"
            )

    @classmethod
    def parse(cls, text: str | Domain) -> Domain:
        """A domain from ``"kind"`` or ``"kind[low,high]"`` (a Domain is returned as is)."""
        if isinstance(text, Domain):
            return text
        if not isinstance(text, str):
            raise AuditUsageError(f"a domain must be a string or Domain, got {text!r}")
        match = _DOMAIN_RE.match(text)
        if match is None:
            raise AuditUsageError(
                f"bad domain {text!r}: expected KIND or KIND[LOW,HIGH], e.g. real[-100,100]"
            )
        kind, low, high = match.groups()
        try:
            bounds = [None if v is None else float(v) for v in (low, high)]
        except ValueError:
            raise AuditUsageError(f"bad domain {text!r}: bounds must be numbers") from None
        return cls(kind, *bounds)

    def __str__(self) -> str:
        if self.low is None and self.high is None:
            return self.kind
        a, b, _, _ = self.interval()
        return f"{self.kind}[{a:g},{b:g}]"

    def __repr__(self) -> str:
        return f"Domain({str(self)!r})"

    def interval(self) -> tuple[float, float, bool, bool]:
        """``(low, high, low_closed, high_closed)``: the kind's interval cut to the bounds."""
        a, b, a_closed, b_closed = _NATURAL[self.kind]
        if self.low is not None and self.low > a:
            a, a_closed = self.low, True
        if self.high is not None and self.high < b:
            b, b_closed = self.high, True
        return a, b, a_closed, b_closed

    def contains(self, x: Tensor) -> Tensor:
        """Elementwise membership of ``x`` (compared in its own dtype; NaN is outside)."""
        a, b, a_closed, b_closed = self.interval()
        above = x >= a if a_closed else x > a
        below = x <= b if b_closed else x < b
        return above & below

    def hard_values(self, dtype: torch.dtype) -> Tensor:
        """The hard values of this domain for ``dtype``: float64, strictly inside the domain.

        Values that round to the same ``dtype`` number are kept once (the first).

        Example:
            >>> Domain("correlation").hard_values(torch.float32).to(torch.float32)[-4:]
            tensor([ 1.0000, -1.0000,  1.0000, -1.0000])
        """
        self._finite_interval(dtype)  # raises if the domain lies beyond the dtype's range
        v = special_values(dtype)
        small = [v["tiny"], v["subnormal"], v["eps"], v["sqrt_eps"]]
        near_one = [1.0 - v["sqrt_eps"], 1.0 - v["eps"], 1.0 - 0.5 * v["eps"], math.tanh(10.0)]
        if dtype != torch.float64:  # a float64 number inside, on the boundary 1 in dtype
            near_one.append(1.0 - 0.125 * v["eps"])
        if self.kind == "unit":
            values = [*small, 0.5, *near_one]
        elif self.kind == "correlation":
            values = [0.0] + [s * m for m in [*small, 0.5, *near_one] for s in (1.0, -1.0)]
        else:
            magnitudes = [v["one"], *small] + [v[k] for k in _LARGE]
            values = [0.0] + [s * m for m in magnitudes for s in (1.0, -1.0)]
        a, b, a_closed, b_closed = self.interval()
        values += [bound for bound, closed in ((a, a_closed), (b, b_closed)) if closed]
        t = torch.tensor(values, dtype=torch.float64)
        keep = self.contains(t) & torch.isfinite(t.to(dtype))  # a bound may overflow dtype
        return _unique_rounded(t[keep].tolist(), dtype)

    def _finite_interval(self, dtype: torch.dtype) -> tuple[float, float]:
        """The interval cut to ``dtype``'s finite range; raises if nothing is left."""
        big = torch.finfo(dtype).max
        a, b, _, _ = self.interval()
        a, b = max(a, -big), min(b, big)
        if a > b:
            dtype_name = str(dtype).removeprefix("torch.")
            raise AuditUsageError(f"domain {self} holds no finite {dtype_name} number")
        return a, b

    def sample(
        self, n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64
    ) -> Tensor:
        """``n`` typical float64 values inside the domain (the table of the module docstring).

        Draws outside the bounds, or beyond the range of ``dtype``, are replaced by uniform
        draws between the bounds cut to that range (log-uniform for positive bounds more
        than a factor 100 apart).
        """
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
        if self.kind == "unit":
            x = torch.where(u == 0.0, 0.5, u)  # rand is in [0, 1): keep 0 out
        elif self.kind == "correlation":
            x = torch.where(u == 0.0, 0.5, u) * sign
        else:
            lo, hi = _TYPICAL_LOG10.get(self.kind, (-3.0, 1.0))
            x = 10.0 ** (lo + (hi - lo) * u)
            if self.kind in _TYPICAL_LOG10:
                x = x * sign
        a, b = self._finite_interval(dtype)  # finite ends for the uniform fallback
        inside = self.contains(x) & (x >= a) & (x <= b)
        if bool(inside.all()):
            return x
        w = torch.rand(n, generator=generator, dtype=torch.float64)
        if a > 0.0 and b / a > 100.0:
            fallback = a * (b / a) ** w
        else:
            fallback = a * (1.0 - w) + b * w  # b - a may overflow
        # a point surely inside, should rounding push a draw out: the midpoint, or a
        # closed end of an interval too narrow to have one (such as (0, 5e-324])
        anchors = torch.tensor([0.5 * a + 0.5 * b, b, a], dtype=torch.float64)
        anchor = anchors[self.contains(anchors)][0]
        fallback = torch.where(self.contains(fallback), fallback, anchor)
        return torch.where(inside, x, fallback)


def build_points(
    domains: list[Domain],
    dtype: torch.dtype,
    generator: torch.Generator,
    *,
    sweep_repeats: int = 3,
    max_pair_points: int = 20_000,
    mixed_points: int = 2_000,
    typical_points: int = 500,
) -> Tensor:
    """The audit points for ``dtype``: float64 of shape ``(N, n)``, one column per argument.

    Sweeps first, then pairs, mixed and typical draws (module docstring), so the first
    failing point of a kind has as few hard coordinates as possible. Every point lies in
    the domains in float64; the caller rounds to ``dtype``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> build_points([Domain("real"), Domain("unit")], torch.float32, g).shape
        torch.Size([2875, 2])
    """
    n = len(domains)
    hard = [d.hard_values(dtype) for d in domains]

    def typical(count: int) -> Tensor:
        return torch.stack([d.sample(count, generator, dtype) for d in domains], dim=1)

    blocks = []
    for i, h in enumerate(hard):
        for _ in range(sweep_repeats if n > 1 else 1):
            block = typical(len(h))
            block[:, i] = h
            blocks.append(block)
    pairs = list(itertools.combinations(range(n), 2))
    total = sum(len(hard[i]) * len(hard[j]) for i, j in pairs)
    fraction = min(1.0, max_pair_points / total) if total else 1.0
    for i, j in pairs:
        hi_, hj = torch.meshgrid(hard[i], hard[j], indexing="ij")
        chosen = torch.randperm(hi_.numel(), generator=generator)
        chosen = chosen[: round(fraction * hi_.numel())].sort().values
        block = typical(len(chosen))
        block[:, i], block[:, j] = hi_.reshape(-1)[chosen], hj.reshape(-1)[chosen]
        blocks.append(block)
    block = typical(mixed_points)
    for i, h in enumerate(hard):
        pick = torch.randint(len(h), (mixed_points,), generator=generator)
        use = torch.rand(mixed_points, generator=generator) < 0.25
        block[:, i] = torch.where(use, h[pick], block[:, i])
    blocks += [block, typical(typical_points)]
    return torch.cat(blocks)
