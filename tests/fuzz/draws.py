r"""Argument domains of the fuzz and their extreme draws.

Every draw is made in float64 and then cast to the dtype under test, so it saturates
there as a user's number would: a magnitude of ``1e38`` is ``inf`` in float16 and bfloat16
keeps it, ``1e-40`` is a float32 subnormal and 0 in float16. The float64 reference of a
check is evaluated on these cast values converted back to float64 (exactly).

Each argument draws from a mixture (per element, independently):

* 1/2 *extreme*: magnitudes log-uniform in ``[1e-40, 1e38]``;
* 1/4 *moderate*: magnitudes log-uniform in ``[1e-3, 1e3]`` (where terms of similar size
  meet, e.g. a log-scale near ``log(tiny)``);
* 1/4 *special*: exact 0 and the saturation points of **every** dtype (a float16 input is
  computed in float32, so float32's points matter for it too; those outside the dtype's
  range saturate on the cast): ``tiny``, the smallest subnormal, ``eps``, ``eps/2``, 1,
  ``sqrt(max)``, ``max``; ``log(max)`` (``exp`` overflows just above), ``log(tiny)``
  and ``log(smallest subnormal)`` (``exp`` goes subnormal, then 0 below),
  ``log(2/eps)`` (``sigmoid`` rounds to 1 above, ``exp(-x)`` is lost next to 1),
  ``log(4/eps)/2`` (``tanh`` rounds to 1), each also one above; for ``probability``
  also ``1 - eps/2``, ``1 - eps``.

with a random sign for the unbounded kinds. ``inf`` is drawn only for arguments whose
record says it is meaningful (``Arg.inf``, e.g. the input of a special function or the
value of a log density: its limit is defined). For the others a value whose magnitude
exceeds ``finfo(dtype).max`` is replaced by ``+-finfo(dtype).max`` *before* the cast: a
log-scale or a parameter of ``inf`` is not a valid input, the largest finite one is.

Kinds (``Arg.domain``):

=================  ==================================================================
``real``           :math:`(-\infty, \infty)` (values, locations, logits, log-scales,
                   ``atanh_rho``, raw network outputs)
``positive``       :math:`(0, \infty)` (scales, variances, degrees of freedom, diagonal
                   of a triangular factor); exact 0 is left out
``probability``    :math:`[0, 1]` (quantiles, continuous-Bernoulli values): uniform,
                   log-uniform down to ``1e-40`` near 0 and near 1, and the endpoints
``open_probability`` :math:`(0, 1)`: the same without the endpoints
``mixture_logits`` ``(*, K)`` logits: ``real``; components ``k >= 1`` are ``-inf``
                   (zero weight) with probability 1/8, component 0 never, so every row
                   is a mixture
``tril``           ``(*, D, D)`` lower-triangular factor: ``positive`` diagonal, ``real``
                   strictly lower part, zeros above
=================  ==================================================================
"""

from __future__ import annotations

import math
import os
import zlib

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KINDS = ("real", "positive", "probability", "open_probability", "mixture_logits", "tril")

DRAWS = int(os.environ.get("PROBLOSS_FUZZ_DRAWS", "2000"))
SEED = int(os.environ.get("PROBLOSS_FUZZ_SEED", "0"))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def generator(*key: object) -> torch.Generator:
    """A generator seeded from ``SEED`` and a stable hash of ``key`` (record, dtype)."""
    text = "/".join(str(k) for k in key)
    return torch.Generator().manual_seed(SEED * 1_000_003 + zlib.crc32(text.encode()))


def _saturation_points() -> list[float]:
    points = {1.0}
    for dt in DTYPES:
        f = torch.finfo(dt)
        sub = f.tiny * f.eps  # smallest subnormal (every dtype here has them)
        for p in (
            f.tiny,
            sub,
            f.eps,
            f.eps / 2,
            math.sqrt(f.max),
            f.max,
            math.log(f.max),
            -math.log(f.tiny),
            -math.log(sub),
            math.log(2 / f.eps),
            math.log(4 / f.eps) / 2,
        ):
            points.add(p)
            if 1.0 < p < 1e6:
                points.add(p + 1.0)
    return sorted(points)


SATURATION = _saturation_points()


def _near_one_points() -> list[float]:
    points = set()
    for dt in DTYPES:
        f = torch.finfo(dt)
        points.update((1 - f.eps / 2, 1 - f.eps, 0.5))
    return sorted(points)


def _log_uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.pow(10.0, math.log10(lo) + u * (math.log10(hi) - math.log10(lo)))


def _pick(n: int, table: list[float], gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(len(table), (n,), generator=gen)
    return torch.tensor(table, dtype=torch.float64)[idx]


def _magnitudes(n: int, gen: torch.Generator, *, zero: bool) -> torch.Tensor:
    """Non-negative magnitudes: 1/2 extreme, 1/4 moderate, 1/4 special points (and 0)."""
    which = torch.randint(4, (n,), generator=gen)
    extreme = _log_uniform(n, 1e-40, 1e38, gen)
    moderate = _log_uniform(n, 1e-3, 1e3, gen)
    special = _pick(n, ([0.0] if zero else []) + SATURATION, gen)
    return torch.where(which < 2, extreme, torch.where(which == 2, moderate, special))


def _signs(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(2, (n,), generator=gen).to(torch.float64) * 2 - 1


def _with_inf(x: torch.Tensor, gen: torch.Generator, signed: bool) -> torch.Tensor:
    """Replace 1/32 of the draws by inf (signed: random sign)."""
    n = x.numel()
    hit = torch.rand(n, generator=gen, dtype=torch.float64) < 1 / 32
    inf = torch.full_like(x, math.inf) * (_signs(n, gen) if signed else 1.0)
    return torch.where(hit, inf, x)


def _probability(n: int, gen: torch.Generator, *, endpoints: bool) -> torch.Tensor:
    which = torch.randint(4, (n,), generator=gen)
    uniform = torch.rand(n, generator=gen, dtype=torch.float64)
    tiny = _log_uniform(n, 1e-40, 1.0, gen)
    special = _pick(
        n,
        ([0.0, 1.0] if endpoints else []) + [p for p in SATURATION if p < 1] + _near_one_points(),
        gen,
    )
    near_one = 1.0 - _log_uniform(n, 1e-17, 1.0, gen)  # 1 - 1e-17 rounds to 1: allowed...
    if not endpoints:  # ...only with endpoints; else keep it strictly below 1
        near_one = torch.minimum(near_one, torch.tensor(1 - 2**-53, dtype=torch.float64))
    return torch.where(
        which == 0,
        uniform,
        torch.where(which == 1, tiny, torch.where(which == 2, near_one, special)),
    )


def _flat(kind: str, n: int, gen: torch.Generator, inf: bool) -> torch.Tensor:
    if kind == "real":
        x = _magnitudes(n, gen, zero=True) * _signs(n, gen)
        return _with_inf(x, gen, signed=True) if inf else x
    if kind == "positive":
        x = _magnitudes(n, gen, zero=False)
        return _with_inf(x, gen, signed=False) if inf else x
    if kind in ("probability", "open_probability"):
        return _probability(n, gen, endpoints=kind == "probability")
    raise ValueError(f"unknown flat domain {kind!r}; known: {KINDS}")


def _fit(x: torch.Tensor, dtype: torch.dtype, kind: str, inf: bool) -> torch.Tensor:
    """Cast to ``dtype`` and back: the exact float64 value the dtype under test holds.

    Without ``inf``, magnitudes beyond ``finfo(dtype).max`` become ``+-max`` first. A
    positive or open-probability draw that underflows to 0 (or an open-probability draw
    that rounds to 1) becomes the nearest value inside the domain, ``tiny * eps`` (``1 -
    eps/2``): a valid input must stay valid in the dtype.
    """
    f = torch.finfo(dtype)
    if not inf:
        x = torch.where(x.isinf() | (x.abs() > f.max), x.sign() * f.max, x)
    y = x.to(dtype).to(torch.float64)
    if kind in ("positive", "tril_diag", "open_probability"):
        y = torch.where(y == 0, torch.full_like(y, f.tiny * f.eps), y)
    if kind == "open_probability":
        y = torch.where(y == 1, torch.full_like(y, 1 - f.eps / 2), y)
    return y


def draw(
    kind: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, inf: bool = False
) -> torch.Tensor:
    """float64 draws of ``shape`` from domain ``kind``, exactly representable in ``dtype``."""
    n = math.prod(shape)
    if kind == "mixture_logits":
        x = _fit(_flat("real", n, gen, False), dtype, "real", False).reshape(shape)
        zero_weight = torch.rand(shape, generator=gen) < 1 / 8
        zero_weight[..., 0] = False
        return x.masked_fill(zero_weight, -math.inf)
    if kind == "tril":
        d = shape[-1]
        off = _fit(_flat("real", n, gen, False), dtype, "real", False).reshape(shape)
        diag = _fit(_flat("positive", n, gen, False), dtype, "tril_diag", False).reshape(shape)
        eye = torch.eye(d, dtype=torch.bool)
        return torch.where(eye, diag, off).tril()
    return _fit(_flat(kind, n, gen, inf), dtype, kind, inf).reshape(shape)
