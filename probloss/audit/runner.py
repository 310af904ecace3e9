r"""The stability audit: run a function over hard inputs in every dtype, judge value and gradient.

:func:`audit` evaluates ``fn`` and its gradient at the points of
:func:`~probloss.audit.domains.build_points`, rounded to each dtype, in one batched call
per dtype, and compares them with a reference: ``fn`` itself in float64 at the same
(rounded) inputs, or a given ``reference`` function in float64. The rules:

* **NaN is always a failure**, in the value or any gradient, whatever the reference says
  (a NaN where the reference is NaN too means the function is NaN inside the domain it
  was given: narrow the domain if that is intended).
* **An infinity is a failure** where the reference is finite and rounds to a finite
  number of the result's dtype. Where the true value (the reference) lies beyond
  ``finfo(dtype).max``, an infinity of its sign is the correctly rounded result.
* **Unjudged points**: where the reference value (or a reference gradient) is itself not
  finite, that value (gradient) is not judged on error; the report counts these points.
  Where the value correctly overflowed (the previous rule), the gradients are judged only
  for NaN: a loss of ``inf`` cannot be trained on at that point, whatever its gradient.
  So are values (gradients) whose condition sum below is infinite: a reference derivative
  that is infinite at a nonzero input (NaN derivatives are left out of the sum).
* **Exceptions**: ``fn`` must run on typical float64 inputs (else a usage error); if it
  raises on the grid of a dtype (say, a validating function refusing a correlation that
  rounded to 1.0), that dtype gets one ``exception`` failure with the message.
* **Half precision**: float16 / bfloat16 inputs are compared in the output's dtype
  (probloss returns float32 for them): the overflow rule uses the range of the dtype the
  function returned, the tolerance the ``eps`` of the input dtype.
* **Tolerance** (``eps`` of the input dtype, ``r`` the reference, ``x_j`` the inputs):

  .. math::
      |v - r| \le k_v\,\epsilon\,\Big(\max(|r|, 1) + \sum_j |x_j\,\partial_j r|\Big),
      \qquad
      |g_i - \partial_i r| \le k_g\,\epsilon\,\Big(\max(|\partial_i r|, 1)
          + \sum_j |x_j\,\partial_j \partial_i r|\Big),

  with :data:`VALUE_FACTOR` :math:`k_v = 8` and :data:`GRAD_FACTOR` :math:`k_g = 32`.
  Why this scale: a loss is a sum of terms of order one and a value near 0 is a
  cancellation of such terms, so below 1 the error is judged on the absolute scale of
  those terms (a relative test would fail every correct loss that crosses 0); above 1 a
  large loss must keep its relative accuracy, and does in a correct implementation. The
  sums are the condition of the value and of each gradient: what a relative change of
  every input by ``eps`` does to them. A result is accepted if it is as good as the exact
  result at inputs a few ulps away (backward stability; Higham 2002, *Accuracy and
  Stability of Numerical Algorithms*, ch. 1), so a cancellation the inputs themselves
  force (``log_scale`` of 88 against -88) is not blamed on the implementation; the
  second derivatives come from a double backward of the float64 reference (without one,
  that term is 0, and the report says so). The factors are measured, in ``eps`` units
  (``error / (eps * scale)``): correct implementations (probloss's special functions,
  KL terms, normal, bivariate and mixture log densities on moderate inputs) reach at
  most 1.2 in the value and 8.8 in a gradient (mixture responsibilities), so
  :math:`k_v = 8` and :math:`k_g = 32` (gradients take about twice the operations)
  leave a margin of 4 or more. Lost digits are caught: the naive continuous-Bernoulli
  mean ``where(|x| < 0.1, 0.5 + x/12, 1/(1 - exp(-x)) - 1/x)`` in float32 is off by up
  to 42 ``eps`` (value) and 890 ``eps`` (gradient) for ``0.1 < |x| < 0.2``, 11 and 108
  for ``0.2 < |x| < 0.5``, 2.5 and 9 above (passes), and its series branch by 11.5 and
  350 near ``|x| = 0.1``; without the ``where`` the formula is off by 5e2 ``eps`` at
  ``|x| = 0.03..0.1`` and 4e5 at ``1e-3``. The condition sums do not see intermediate
  quantities rounded separately: mixture responsibilities from ``z_k^2 / 2`` of nearly
  equal components lose up to 3 digits of the gradient at ``|z|`` of 20 to 90 in
  float32, and the audit reports them.

Arguments audited: every parameter without a default, plus those with a default that
``domains`` names (the others keep their defaults); ``*args`` / ``**kwargs`` are not
audited. The function must be elementwise: it gets one 1-D tensor of ``N`` points per
argument and must return one value per point, shape ``(N,)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from .domains import DTYPES, AuditUsageError, Domain, build_points
from .report import AuditReport, Example, Failure

VALUE_FACTOR = 8.0
GRAD_FACTOR = 32.0
DEFAULT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_PROBE_POINTS = 4

__all__ = [
    "DEFAULT_DTYPES",
    "GRAD_FACTOR",
    "VALUE_FACTOR",
    "AuditUsageError",
    "assert_stable",
    "audit",
    "audited_arguments",
]


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def audited_arguments(
    fn: Callable, domains: Mapping[str, str | Domain] | None = None
) -> dict[str, Domain]:
    """The audited arguments of ``fn`` and their domains, in signature order.

    Parameters without a default are audited (``real`` unless named in ``domains``),
    parameters with a default only when ``domains`` names them.

    Raises:
        AuditUsageError: the signature cannot be read, ``domains`` names a parameter
            ``fn`` does not have, a domain is malformed, or nothing is left to audit.

    Example:
        >>> audited_arguments(lambda x, rho, scale=1.0: x, {"rho": "correlation"})
        {'x': Domain('real'), 'rho': Domain('correlation')}
    """
    domains = dict(domains or {})
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as err:
        raise AuditUsageError(
            f"cannot read the signature of {_name(fn)} ({err}); wrap it in a def"
        ) from None
    named = [p for p in params.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = [k for k in domains if k not in {p.name for p in named}]
    if unknown:
        have = ", ".join(p.name for p in named)
        raise AuditUsageError(
            f"--domain names {', '.join(map(repr, unknown))}, not a parameter of "
            f"{_name(fn)}({have})"
        )
    chosen = {
        p.name: Domain.parse(domains.get(p.name, "real"))
        for p in named
        if p.default is p.empty or p.name in domains
    }
    if not chosen:
        raise AuditUsageError(f"{_name(fn)} has no parameter to audit")
    return chosen


def _caller(fn: Callable, names: list[str]) -> Callable[[list[Tensor]], object]:
    """Call ``fn`` with the audited columns: positional-only ones by position, others by name."""
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind == p.POSITIONAL_ONLY]
    last = max((i for i, p in enumerate(positional) if p.name in names), default=-1)

    def call(columns: list[Tensor]) -> object:
        values = dict(zip(names, columns, strict=True))
        args = [values.get(p.name, p.default) for p in positional[: last + 1]]
        kwargs = {k: v for k, v in values.items() if k not in {p.name for p in positional}}
        return fn(*args, **kwargs)

    return call


def _check_shape(out: object, n: int, arity: int, label: str) -> Tensor:
    if isinstance(out, Tensor) and out.is_floating_point() and out.shape == (n,):
        return out
    got = type(out).__name__
    if isinstance(out, Tensor):
        got = f"dtype {out.dtype}" if not out.is_floating_point() else f"shape {tuple(out.shape)}"
    raise AuditUsageError(
        f"{label} must be elementwise (unreduced): given {arity} argument(s) of shape ({n},) "
        f"it must return a floating tensor of shape ({n},), got {got}; use reduction='none'"
    )


def _evaluate(
    call, columns: list[Tensor], label: str, *, second: bool = False
) -> tuple[Tensor, list[Tensor], list[Tensor] | None]:
    """Value (shape ``(N,)``), gradient per column and, with ``second``, the condition of
    each gradient, ``sum_j |x_j d_j g_i|`` (``None`` if ``fn`` is not twice differentiable).

    The function is elementwise, so the gradient of the sum is the gradient per point, and
    the gradient of ``g_i.sum()`` is row ``i`` of the Hessian per point.
    """
    leaves = [c.detach().clone().requires_grad_(True) for c in columns]
    with torch.enable_grad():
        out = _check_shape(call(leaves), columns[0].shape[0], len(columns), label)
        grads: list[Tensor | None] = [None] * len(leaves)
        if out.requires_grad:
            grads = list(
                torch.autograd.grad(
                    out, leaves, torch.ones_like(out), allow_unused=True, create_graph=second
                )
            )
        # an argument the value does not depend on has gradient 0
        grads = [
            torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)
        ]
        conditions = None
        if second:
            try:
                conditions = [_condition(g, leaves) for g in grads]
            except RuntimeError:  # a backward without double backward support
                conditions = None
    return out.detach(), [g.detach() for g in grads], conditions


def _condition_term(x: Tensor, derivative: Tensor) -> Tensor:
    """``|x d|`` in float64, with 0 where ``x == 0`` (a zero input has no relative change,
    even at a pole) and where ``d`` is NaN (a broken derivative says nothing about the
    conditioning; an infinite one makes the tolerance infinite: unjudged)."""
    term = (x.detach().double() * derivative.detach().double()).abs()
    return torch.where((x == 0.0) | torch.isnan(term), 0.0, term)


def _condition(g: Tensor, leaves: list[Tensor]) -> Tensor:
    """``sum_j |x_j d_j g|`` per point, from one row of the Hessian."""
    total = torch.zeros_like(g, dtype=torch.float64).detach()
    if not g.requires_grad:
        return total  # g does not depend on the inputs
    row = torch.autograd.grad(g, leaves, torch.ones_like(g), allow_unused=True, retain_graph=True)
    for x, h in zip(leaves, row, strict=True):
        if h is not None:
            total = total + _condition_term(x, h)
    return total


def _overflowed(got: Tensor, ref: Tensor) -> Tensor:
    """Where ``got`` is the infinity that the true value ``ref``, beyond the range of
    ``got``'s dtype, correctly rounds to."""
    rounded = ref.to(got.dtype).double()
    return torch.isinf(rounded) & (got.double() == rounded)


def _judge(got: Tensor, ref: Tensor, tol: Tensor, skip: Tensor | None = None):
    """Masks ``(nonfinite, error, unjudged)`` and ``(error, ratio)`` of ``got`` against ``ref``.

    The range of ``got``'s dtype decides correct overflow. ``skip``: points judged only for
    NaN (a gradient where the value itself correctly overflowed).
    """
    overflow_ok = _overflowed(got, ref)
    got = got.double()
    ref_ok = torch.isfinite(ref)
    nonfinite = torch.isnan(got) | (torch.isinf(got) & ref_ok & ~overflow_ok)
    unjudged = ~(ref_ok & torch.isfinite(tol))
    if skip is not None:
        nonfinite = torch.isnan(got) | (nonfinite & ~skip)
        unjudged = unjudged | skip
    judged = ~unjudged & torch.isfinite(got)
    error = torch.where(judged, (got - ref).abs(), 0.0)
    ratio = torch.where(judged, error / tol, 0.0)
    return nonfinite, judged & (error > tol), unjudged, error, ratio


def _first(mask: Tensor, nan: Tensor) -> int:
    """Index of the first set point, preferring one where ``nan`` is set."""
    preferred = mask & nan
    return int((preferred if bool(preferred.any()) else mask).nonzero()[0, 0])


def _dtype_failures(
    dtype_name: str,
    names: list[str],
    x: Tensor,
    result: tuple[Tensor, list[Tensor], list[Tensor] | None],
    reference: tuple[Tensor, list[Tensor], list[Tensor] | None],
    factors: tuple[float, float],
) -> tuple[list[Failure], dict[str, int]]:
    """Failures of one dtype and its unjudged counts."""
    (value, grads, _), (ref, ref_grads, grad_conditions) = result, reference
    eps = torch.finfo(DTYPES[dtype_name]).eps
    x64 = x.double()
    condition = torch.stack(
        [_condition_term(xi, g) for xi, g in zip(x64.T, ref_grads, strict=True)]
    ).sum(0)
    ones = torch.ones_like(ref)
    value_tol = factors[0] * eps * (torch.maximum(ref.abs(), ones) + condition)
    v_bad, v_err, v_unjudged, v_error, v_ratio = _judge(value, ref, value_tol)
    # a loss that correctly overflowed to +-inf cannot be trained on at that point: its
    # gradient is judged only for NaN
    value_overflowed = _overflowed(value, ref)
    if grad_conditions is None:
        grad_conditions = [torch.zeros_like(ref)] * len(grads)
    g_parts = [
        _judge(g, gr, factors[1] * eps * (torch.maximum(gr.abs(), ones) + c), value_overflowed)
        for g, gr, c in zip(grads, ref_grads, grad_conditions, strict=True)
    ]
    g_bad, g_err, g_unjudged, g_error, g_ratio = (
        torch.stack(p) for p in zip(*g_parts, strict=True)
    )

    def inputs(p: int) -> dict[str, float]:
        return {k: float(x64[p, i]) for i, k in enumerate(names)}

    def by_argument(mask: Tensor) -> dict[str, int]:
        return {k: int(m.sum()) for k, m in zip(names, mask, strict=True) if bool(m.any())}

    failures = []
    if bool(v_bad.any()):
        p = _first(v_bad, torch.isnan(value))
        ex = Example(inputs(p), float(value[p]), float(ref[p]))
        failures.append(Failure("nonfinite_value", dtype_name, int(v_bad.sum()), ex))
    if bool(g_bad.any()):
        nan = torch.stack([torch.isnan(g) for g in grads])
        p = _first(g_bad.any(0), (g_bad & nan).any(0))
        i = _first(g_bad[:, p], nan[:, p])
        ex = Example(inputs(p), float(grads[i][p]), float(ref_grads[i][p]), names[i])
        count = int(g_bad.any(0).sum())
        failures.append(Failure("nonfinite_grad", dtype_name, count, ex, by_argument(g_bad)))
    if bool(v_err.any()):
        p = int(v_ratio.argmax())
        tol = float(v_error[p] / v_ratio[p])
        ex = Example(inputs(p), float(value[p]), float(ref[p]), None, float(v_error[p]), tol)
        failures.append(Failure("value_error", dtype_name, int(v_err.sum()), ex))
    if bool(g_err.any()):
        i, p = divmod(int(g_ratio.argmax()), g_ratio.shape[1])
        tol = float(g_error[i, p] / g_ratio[i, p])
        got, expected = float(grads[i][p]), float(ref_grads[i][p])
        ex = Example(inputs(p), got, expected, names[i], float(g_error[i, p]), tol)
        count = int(g_err.any(0).sum())
        failures.append(Failure("grad_error", dtype_name, count, ex, by_argument(g_err)))
    unjudged = {"value": int(v_unjudged.sum()), "grad": int(g_unjudged.any(0).sum())}
    return failures, unjudged


def _dtype_names(dtypes: Iterable[str | torch.dtype]) -> tuple[str, ...]:
    if isinstance(dtypes, str | torch.dtype):
        dtypes = [dtypes]
    names = []
    for d in dtypes:
        name = str(d).removeprefix("torch.")
        if name not in DTYPES:
            raise AuditUsageError(f"unknown dtype {d!r}; expected some of {', '.join(DTYPES)}")
        if name not in names:
            names.append(name)
    if not names:
        raise AuditUsageError("no dtype to audit")
    return tuple(names)


def audit(
    fn: Callable[..., Tensor],
    domains: Mapping[str, str | Domain] | None = None,
    reference: Callable[..., Tensor] | None = None,
    dtypes: Iterable[str | torch.dtype] = DEFAULT_DTYPES,
    seed: int = 0,
    *,
    value_factor: float = VALUE_FACTOR,
    grad_factor: float = GRAD_FACTOR,
    max_pair_points: int = 20_000,
    mixed_points: int = 2_000,
    typical_points: int = 500,
) -> AuditReport:
    """Audit ``fn`` over hard inputs in every dtype: non-finite values/gradients and errors.

    See the module docstring for the rules and the tolerance
    :math:`|v - r| \\le k_v \\epsilon (\\max(|r|, 1) + \\sum_i |x_i \\partial_i r|)`.

    Args:
        fn: elementwise function of tensors; given ``N`` points it returns shape ``(N,)``.
        domains: argument name -> domain (``"correlation"``, ``"real[-100,100]"`` or a
            :class:`~probloss.audit.domains.Domain`); unnamed arguments are ``real``.
        reference: a trusted function with the same arguments, evaluated in float64;
            default ``fn`` itself in float64 (then float64 is judged on NaN only).
        dtypes: dtype names or torch dtypes to audit.
        seed: seed of the random draws (the report is deterministic for a seed).
        value_factor, grad_factor: :math:`k_v` and :math:`k_g` of the tolerance.
        max_pair_points, mixed_points, typical_points: sizes of the grid (see
            :func:`~probloss.audit.domains.build_points`).

    Returns:
        An :class:`~probloss.audit.report.AuditReport` (``.ok``, ``.failures``, the table
        as ``str``).

    Raises:
        AuditUsageError: a bad domain, dtype or argument name, or ``fn`` / ``reference``
            fails on typical float64 inputs or does not return one value per point.

    Example:
        >>> def naive_cb_mean(x):
        ...     return torch.where(x.abs() < 0.1, 0.5 + x / 12, 1 / (1 - torch.exp(-x)) - 1 / x)
        >>> report = audit(naive_cb_mean, dtypes=["float32"])
        >>> report.ok, [(f.kind, f.example.inputs, f.example.got) for f in report.failures][0]
        (False, ('nonfinite_grad', {'x': 0.0}, nan))
    """
    arguments = audited_arguments(fn, domains)
    names = list(arguments)
    dtype_names = _dtype_names(dtypes)
    call = _caller(fn, names)
    ref_call = call if reference is None else _caller(reference, names)
    if reference is not None:
        try:
            audited_arguments(reference, {k: "real" for k in names})  # same argument names
        except AuditUsageError:
            raise AuditUsageError(
                f"the reference {_name(reference)} must take the audited arguments "
                f"({', '.join(names)}) by name"
            ) from None
    probe_generator = torch.Generator().manual_seed(seed)
    probe = [d.sample(_PROBE_POINTS, probe_generator) for d in arguments.values()]
    for label, c in (("fn", call), ("reference", ref_call)):
        try:
            _evaluate(c, probe, label)
        except AuditUsageError:
            raise
        except Exception as err:
            raise AuditUsageError(
                f"{label} raised on typical float64 inputs: {type(err).__name__}: {err}"
            ) from None

    failures: list[Failure] = []
    points: dict[str, int] = {}
    unjudged: dict[str, dict[str, int]] = {}
    output_dtypes: dict[str, str] = {}
    second_derivatives = True
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        generator = torch.Generator().manual_seed(seed)
        grid = build_points(
            list(arguments.values()),
            dtype,
            generator,
            max_pair_points=max_pair_points,
            mixed_points=mixed_points,
            typical_points=typical_points,
        )
        x = grid.to(dtype)
        points[dtype_name] = x.shape[0]
        columns = list(x.T.contiguous())
        try:
            result = _evaluate(call, columns, "fn")
            if reference is None and dtype == torch.float64:
                expected = result  # identical: only NaN can be found
            else:
                columns64 = [c.double() for c in columns]
                expected = _evaluate(ref_call, columns64, "reference", second=True)
                second_derivatives &= expected[2] is not None
        except AuditUsageError:
            raise
        except Exception as err:
            message = f"raised {type(err).__name__}: {err}".splitlines()[0]
            failures.append(Failure("exception", dtype_name, x.shape[0], message=message))
            continue
        output_dtypes[dtype_name] = str(result[0].dtype).removeprefix("torch.")
        found, unjudged[dtype_name] = _dtype_failures(
            dtype_name, names, x, result, expected, (value_factor, grad_factor)
        )
        failures += found
    return AuditReport(
        function=_name(fn),
        reference="itself in float64" if reference is None else f"{_name(reference)} in float64",
        arguments=tuple(names),
        domains={k: str(d) for k, d in arguments.items()},
        dtypes=dtype_names,
        output_dtypes=output_dtypes,
        points=points,
        unjudged=unjudged,
        tolerance={
            "value_factor": value_factor,
            "grad_factor": grad_factor,
            "rule": f"|v - r| <= {value_factor:g} eps (max(|r|, 1) + sum |x dr/dx|), "
            f"|g_i - d_i r| <= {grad_factor:g} eps (max(|d_i r|, 1) + sum |x d d_i r/dx|)",
            "second_derivatives": second_derivatives,
        },
        failures=failures,
    )


def assert_stable(fn: Callable[..., Tensor], *args, **kwargs) -> AuditReport:
    """:func:`audit` for a test suite: raise ``AssertionError`` with the table on failure.

    Takes the arguments of :func:`audit`; returns the report when nothing failed.

    Example:
        >>> from probloss.special import cb_mean
        >>> assert_stable(cb_mean, dtypes=["float32"]).ok
        True
    """
    report = audit(fn, *args, **kwargs)
    if not report.ok:
        raise AssertionError("\n" + str(report))
    return report
