r"""The fuzz checks of one record in one dtype, and the failure report.

:func:`run` draws ``N`` rows, evaluates the record in the dtype under test and, as the
reference, in float64 on the same (exactly converted) inputs, with the gradient of
``out.sum()`` with respect to every floating input marked ``grad``. Per row it flags:

* ``dtype``: the output dtype breaks the record's policy (whole batch);
* ``nan value`` / ``nan grad``: any NaN outside the rows where the record states that
  the exact result is undefined (:func:`acceptable_nan`, the rule of :mod:`tests.fuzz`);
  never excused by the float64 reference being NaN too;
* ``inf value``: ``+-inf`` where the float64 reference is finite and representable in the
  output dtype, ``|ref| <= max (1 - 4 eps)``: the output is claimed accurate to a few ulp,
  so only a reference within 4 ulp of ``max`` may round to ``inf``;
* ``inf grad``: the same for a gradient, in the dtype of its input, with ``16 eps`` (the
  backward of a half input is computed in float32 and rounded once, but the gradients'
  own error bounds are several roundings of float32 terms, not one).

:func:`run_fused` checks ``fused=True`` against ``fused=False`` inside the fused kernels'
domain (``|log_scale|, |atanh_rho| < -log(tiny) - 1`` of the compute dtype): identical
finiteness (value and every gradient element), and where both are finite

.. math::
    |f - p| \le 16\,\epsilon\,(T + 1)\,(|p| + 1)

with :math:`\epsilon` the compute dtype's eps and :math:`T` the row's sum of term
magnitudes :math:`\sum_k (|\ell_k| + |\operatorname{lse}\,\ell| + \sum_d (z_{kd}^2/2 +
|\log\sigma_{kd}|) + \log 2\pi)` (float64). Both paths round each term a few times
(relative error ``< 4 eps`` each), so the log density's error is at most ``8 eps T``
in each path and the responsibilities ``r_k = exp(term_k - lse)`` carry a relative error
at most ``8 eps (T + 1)``; every gradient is a responsibility times a factor of relative
error ``< 4 eps`` (``z / sigma``, ``z^2 - 1`` with the ``1`` absorbed by ``+ 1``), or
``r_k - pi_k`` (absolute error ``<= 8 eps (T + 1)``). Two paths: twice that, ``16``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .draws import DTYPES, draw, dtype_name, generator
from .records import KNOWN_LIMITS, Record

HALF = (torch.float16, torch.bfloat16)
SHOW = 5  # offending rows printed per failure kind


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF else dtype


def expected_dtype(record: Record, dtype: torch.dtype) -> torch.dtype:
    return compute_dtype(dtype) if record.policy == "promote" else dtype


def make_inputs(record: Record, dtype: torch.dtype, n: int, salt: str = "") -> list[torch.Tensor]:
    """float64 draws, exactly representable in ``dtype``, one tensor per argument."""
    gen = generator(record.name, dtype_name(dtype), salt)
    return [draw(a.domain, (n, *a.shape), dtype, gen, a.inf) for a in record.args]


@dataclass
class Evaluation:
    out: torch.Tensor  # (N, -1), detached
    grads: list[torch.Tensor | None]  # per argument, (N, -1), None if not differentiated


def evaluate(record: Record, inputs64: list[torch.Tensor], dtype: torch.dtype, **kw) -> Evaluation:
    xs = []
    for a, t in zip(record.args, inputs64, strict=True):
        x = t.to(dtype)
        if a.grad:
            x.requires_grad_(True)
        xs.append(x)
    out = (record.fused or record.fn)(*xs, **kw) if kw else record.fn(*xs)
    n = inputs64[0].shape[0]
    wanted = [x for a, x in zip(record.args, xs, strict=True) if a.grad]
    grads: list[torch.Tensor | None] = [None] * len(xs)
    if out.requires_grad and wanted:
        got = torch.autograd.grad(out.sum(), wanted, allow_unused=True)
        it = iter(got)
        for i, a in enumerate(record.args):
            if a.grad:
                g = next(it)
                grads[i] = (torch.zeros_like(xs[i]) if g is None else g).reshape(n, -1)
    return Evaluation(out.detach().reshape(n, -1), grads)


def representable(ref: torch.Tensor, dtype: torch.dtype, ulps: float) -> torch.Tensor:
    """Finite and at most ``max (1 - ulps eps)`` in magnitude in ``dtype``."""
    f = torch.finfo(dtype)
    return ref.isfinite() & (ref.abs() <= f.max * (1 - ulps * f.eps))


def _fmt(t: torch.Tensor) -> str:
    vals = t.reshape(-1).tolist()
    return "[" + ", ".join(repr(float(v)) for v in vals) + "]"


def report(
    record: Record,
    dtype: torch.dtype,
    kind: str,
    rows: torch.Tensor,
    inputs64,
    got,
    ref,
    extra: str = "",
) -> str:
    idx = rows.nonzero().reshape(-1)
    lines = [
        f"{record.name} [{dtype_name(dtype)}]: {kind} in {idx.numel()} of {rows.numel()} rows"
        + (f" ({extra})" if extra else "")
    ]
    for i in idx[:SHOW].tolist():
        args = ", ".join(
            f"{a.name}={_fmt(t[i])}" for a, t in zip(record.args, inputs64, strict=True)
        )
        lines.append(f"  row {i}: {args}")
        lines.append(f"    got={_fmt(got[i])}  ref={_fmt(ref[i])}")
    if idx.numel():
        lines.append("  " + repro(record, dtype, [t[idx[0]] for t in inputs64]))
    return "\n".join(lines)


def repro(record: Record, dtype: torch.dtype, row: list[torch.Tensor]) -> str:
    """A line of Python that evaluates ``record`` on one row (batch of 1), for a bug report."""
    values = ", ".join(repr([t.tolist()]).replace("inf", "float('inf')") for t in row)
    grad = [a.grad for a in record.args]
    return (
        "repro: import torch; from tests.fuzz.records import BY_NAME; "
        f"xs = [torch.tensor(v, dtype=torch.{dtype_name(dtype)}, requires_grad=g) "
        f"for v, g in zip(({values},), {grad})]; "
        f"y = BY_NAME[{record.name!r}].fn(*xs); "
        "print(y); y.sum().backward() if y.requires_grad else None; print([x.grad for x in xs])"
    )


def known_limit(
    record: Record, dtype: torch.dtype, inputs64: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per output, the ``(N,)`` rows a :class:`~tests.fuzz.records.KnownLimit` of the
    record names in ``dtype`` (an open library hole: any failure of that output excused)."""
    n = inputs64[0].shape[0]
    keys = ("value", *(f"d/d{a.name}" for a in record.args))
    ok = {k: torch.zeros(n, dtype=torch.bool) for k in keys}
    for lim in KNOWN_LIMITS.get(record.name, ()):
        if dtype not in lim.dtypes:
            continue
        rows = lim.where(*inputs64, dtype=dtype)
        if lim.value:
            ok["value"] |= rows
        for a in record.args:
            if lim.grads is None or a.name in lim.grads:
                ok[f"d/d{a.name}"] |= rows
    return ok


def acceptable_nan(record: Record, inputs64: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per output (``"value"``, and ``"d/d<name>"`` for each gradient), the ``(N,)`` rows
    where a NaN is acceptable: those where the exact result is undefined, as the record's
    :class:`~tests.fuzz.records.Undefined` statements say (checked against mpmath by
    :func:`run_oracle`). Nowhere else, whatever the float64 reference gives."""
    n = inputs64[0].shape[0]
    keys = ("value", *(f"d/d{a.name}" for a in record.args))
    ok = {k: torch.zeros(n, dtype=torch.bool) for k in keys}
    for u in record.undefined:
        rows = u.where(*inputs64)
        if u.value:
            ok["value"] |= rows
        for a in record.args:
            if u.grads is None or a.name in u.grads:
                ok[f"d/d{a.name}"] |= rows
    return ok


def confirmed_overflow(
    record: Record, name: str, inputs64: list[torch.Tensor], g: torch.Tensor, bad: torch.Tensor
) -> torch.Tensor:
    """The disputed elements (``bad``: ``+-inf`` where the float64 reference is finite)
    whose exact gradient, from the record's mpmath ``dispute_oracle``, exceeds ``finfo.max``
    of the gradient's dtype with the same sign: there the float64 reference is what is
    wrong (it rounds ``z = r e^{-l}`` to 0, or ``cosh^2 a z^2`` overflows). Only the few
    disputed rows are evaluated; without an oracle nothing is confirmed."""
    ok = torch.zeros_like(bad)
    if record.dispute_oracle is None:
        return ok
    big = torch.finfo(g.dtype).max
    for i in bad.any(-1).nonzero().reshape(-1).tolist():
        exact = record.dispute_oracle(*(t[i].reshape(-1).tolist() for t in inputs64))
        if name not in exact:
            continue
        for j in bad[i].nonzero().reshape(-1).tolist():
            e, x = exact[name][j], float(g[i, j])
            ok[i, j] = bool(abs(e) > big) and (e > 0) == (x > 0)
    return ok


def run(record: Record, dtype: torch.dtype, n: int) -> list[str]:
    """Every failure of ``record`` in ``dtype`` on ``n`` draws, as report paragraphs."""
    return check(record, dtype, make_inputs(record, dtype, n))


def check(record: Record, dtype: torch.dtype, inputs64: list[torch.Tensor]) -> list[str]:
    """The checks of :func:`run` on given rows (float64 tensors exact in ``dtype``)."""
    test = evaluate(record, inputs64, dtype)
    failures = []
    want = expected_dtype(record, dtype)
    if test.out.dtype != want:
        failures.append(
            f"{record.name} [{dtype_name(dtype)}]: output dtype {test.out.dtype}, "
            f"policy {record.policy!r} says {want}"
        )
    out_dtype = test.out.dtype
    ref = None if record.random else evaluate(record, inputs64, torch.float64)

    def flag(kind, rows, got, refv, extra=""):
        if rows.any():
            failures.append(report(record, dtype, kind, rows, inputs64, got, refv, extra))

    nan_ref = torch.full_like(test.out, math.nan, dtype=torch.float64)
    ref_out = nan_ref if ref is None else ref.out
    undefined = acceptable_nan(record, inputs64)
    known = known_limit(record, dtype, inputs64)  # open holes: every failure excused there
    undefined = {k: v | known[k] for k, v in undefined.items()}
    flag("NaN value", test.out.isnan().any(-1) & ~undefined["value"], test.out, ref_out)
    if ref is not None:
        bad = test.out.isinf() & representable(ref.out, out_dtype, 4)
        bad &= ~known["value"][:, None]
        flag(
            "inf value where the float64 reference is representable", bad.any(-1), test.out, ref.out
        )
    for i, (a, g) in enumerate(zip(record.args, test.grads, strict=True)):
        if g is None:
            continue
        rg = None if ref is None else ref.grads[i]
        rg_show = torch.full_like(g, math.nan, dtype=torch.float64) if rg is None else rg
        nan = g.isnan().any(-1) & ~undefined[f"d/d{a.name}"]
        flag(f"NaN gradient d/d{a.name}", nan, g, rg_show)
        if rg is not None:
            bad = g.isinf() & representable(rg, g.dtype, 16)
            bad &= ~known[f"d/d{a.name}"][:, None]
            bad &= ~confirmed_overflow(record, a.name, inputs64, g, bad)
            flag(
                f"inf gradient d/d{a.name} where the float64 reference is representable",
                bad.any(-1),
                g,
                rg,
            )
    return failures


# ---------------------------------------------------------------- fused = plain


def _term_scale(record: Record, inputs64: list[torch.Tensor]) -> torch.Tensor:
    """Per row, ``T`` of the module docstring (float64, ``inf`` where a term overflows)."""
    names = [a.name for a in record.args]
    get = dict(zip(names, inputs64, strict=True))
    value, logits, loc, log_scale = get["value"], get["logits"], get["loc"], get["log_scale"]
    z = (value.unsqueeze(-2) - loc) * torch.exp(-log_scale)
    comp = (z * z / 2 + log_scale.abs()).sum(-1) + math.log(2 * math.pi)
    if "atanh_rho" in get:  # |z|^2 / (1 - rho^2) <= (z1^2 + z2^2) cosh(a)^2
        a = get["atanh_rho"]
        comp = comp * torch.cosh(a) ** 2 + a.abs()
    lse = torch.logsumexp(logits, -1, keepdim=True)
    finite = logits.isfinite()
    terms = torch.where(finite, logits.abs() + lse.abs() + comp, torch.zeros_like(comp))
    return terms.sum(-1)


def fused_inputs(record: Record, dtype: torch.dtype, n: int) -> list[torch.Tensor]:
    """Draws with the ``fused_args`` moved inside the fused domain of the compute dtype."""
    inputs64 = make_inputs(record, dtype, n, salt="fused")
    bound = -math.log(torch.finfo(compute_dtype(dtype)).tiny) - 1.0
    gen = generator(record.name, dtype_name(dtype), "fused-domain")
    out = []
    for a, t in zip(record.args, inputs64, strict=True):
        if a.name in record.fused_args:
            inside = (torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
            inside = inside.to(dtype).to(torch.float64)
            t = torch.where(t.abs() < bound, t, inside)
        out.append(t)
    return out


def run_fused(record: Record, dtype: torch.dtype, n: int) -> list[str]:
    inputs64 = fused_inputs(record, dtype, n)
    fused = evaluate(record, inputs64, dtype, fused=True)
    plain = evaluate(record, inputs64, dtype, fused=False)
    eps = torch.finfo(compute_dtype(dtype)).eps
    scale = _term_scale(record, inputs64).unsqueeze(-1)
    failures = []

    def compare(what, f, p):
        f64, p64 = f.to(torch.float64), p.to(torch.float64)
        same_class = (f64.isnan() == p64.isnan()) & (f64.isinf() == p64.isinf())
        same_class &= ~(f64.isinf() & p64.isinf() & (f64 != p64))
        both = f64.isfinite() & p64.isfinite()
        err = torch.where(both, (f64 - p64).abs(), torch.zeros_like(f64))
        tol = 16 * eps * (scale + 1) * (p64.abs() + 1)
        bad = ~same_class | (err > tol)
        if bad.any():
            failures.append(
                report(
                    record,
                    dtype,
                    f"fused != plain in {what}",
                    bad.any(-1),
                    inputs64,
                    f,
                    p,
                    "got = fused, ref = plain",
                )
            )

    compare("value", fused.out, plain.out)
    for a, gf, gp in zip(record.args, fused.grads, plain.grads, strict=True):
        if gf is not None:
            compare(f"d/d{a.name}", gf, gp)
    return failures


# ---------------------------------------------------------------- the float64 path vs mpmath


def run_oracle(record: Record, rows_per_dtype: int) -> list[str]:
    """The float64 path against the record's mpmath oracle on a subsample.

    Rows come from the draws of every dtype (so float16's saturated and float64's extreme
    inputs both appear), evaluated in float64. Where the exact value, rounded to float64,
    is finite the float64 path must be finite and within ``REL * T`` (see
    :mod:`tests.fuzz.oracle`; a finiteness-only oracle gives ``T = inf``); where it is
    ``+-inf`` the path must be the same infinity. Gradients likewise, against the oracle's
    exact gradient. Where mpmath finds the closed form undefined (NaN) the row is not
    judged, but the record must state it (:func:`acceptable_nan`), and a row the record
    states undefined must be NaN in mpmath: the statements and the oracle agree.
    """
    from mpmath import mp

    from tests.reference import to_float64

    from .oracle import REL

    failures = []
    grad_args = [a.name for a in record.args if a.grad]
    for dtype in DTYPES:
        inputs64 = [t[:rows_per_dtype] for t in make_inputs(record, dtype, rows_per_dtype)]
        got = evaluate(record, inputs64, torch.float64)
        stated = acceptable_nan(record, inputs64)
        known = known_limit(record, torch.float64, inputs64)  # open holes: not judged here
        grads = [g for g in got.grads if g is not None]
        n = inputs64[0].shape[0]
        for i in range(n):
            row = [t[i].reshape(-1).tolist() for t in inputs64]
            checks = [("value", got.out[i], record.oracle(*row))]
            if record.grad_oracle is not None:
                exact = record.grad_oracle(*row)
                for name, g, e in zip(grad_args, grads, exact, strict=False):
                    checks.append((f"d/d{name}", g[i], [(v, abs(v)) for v in e]))
            for what, g, pairs in checks:
                for j, (v, t) in enumerate(pairs):
                    if v is None or bool(known[what][i]):  # beyond the oracle's precision
                        continue  # budget, or an open hole (KnownLimit): not judged
                    x = float(g[j])
                    if mp.isnan(v) or bool(stated[what][i]):
                        ok = bool(mp.isnan(v)) == bool(stated[what][i])
                        exact = "undefined" if mp.isnan(v) else repr(to_float64(v))
                        note = "; the record states it undefined" * bool(stated[what][i])
                    else:
                        exact = to_float64(v)
                        note = ""
                        if math.isinf(exact):
                            # that infinity, unless the exact value is itself within the
                            # tolerance REL * T of 0 (terms of size e^65504 cancelling to
                            # e^64082): then any finite x is as right as the scale allows
                            near_zero = mp.isfinite(t) and abs(v) <= REL * t
                            ok = x == exact or (near_zero and math.isfinite(x))
                        elif math.isnan(x) or math.isinf(x):
                            ok = False
                        else:
                            tol = REL * float(t) + torch.finfo(torch.float64).tiny
                            ok = abs(x - exact) <= tol
                        exact = repr(exact)
                    if not ok:
                        args = ", ".join(
                            f"{a.name}={r!r}" for a, r in zip(record.args, row, strict=True)
                        )
                        failures.append(
                            f"{record.name} [float64 path, inputs from {dtype_name(dtype)} draws]:"
                            f" {what}[{j}] got={x!r} mpmath={exact}{note}"
                            f" (scale T={float(t):.3g})"
                            f"\n  inputs: {args}"
                            f"\n  {repro(record, torch.float64, [t[i] for t in inputs64])}"
                        )
    return failures
