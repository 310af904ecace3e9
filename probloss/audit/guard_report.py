r"""What :class:`~probloss.audit.guard.NaNGuard` found: the report, its error and its warning.

The guard records cheap per-row *screens* during a training step: the row sums
:math:`s_r = \sum_j t_{rj}` of each recorded tensor (row: index of the first dimension),
non-finite whenever the row holds a NaN or an infinity (IEEE 754: ``inf + x = inf``,
``inf - inf = NaN``, ``NaN + x = NaN``), see :mod:`probloss.audit.guard`. Only when its
single end-of-step check fails does this module read them on the host and turn them into a
:class:`NonFiniteReport`: which named loss terms went non-finite at which batch rows (checked
exactly, the terms are held), which module output went non-finite first in the forward pass
(and whether its inputs were finite, i.e. whether that module created the values), which
gradient went non-finite first in the backward pass, which parameters got non-finite
gradients, and the step inputs and model outputs at the offending rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

VALUES_PER_ROW = 8  # numbers shown per tensor row; the rest is elided
_OUTSIDE = "computed outside any submodule"


class NonFiniteWarning(RuntimeWarning):
    """Warned by ``NaNGuard(policy="warn")`` with the report as its message."""


class NonFiniteError(RuntimeError):
    """Raised by ``NaNGuard(policy="raise")``; ``.report`` holds the :class:`NonFiniteReport`."""

    def __init__(self, report: NonFiniteReport) -> None:
        super().__init__(str(report))
        self.report = report


@dataclass
class TermFinding:
    """A named loss term with non-finite values: rows (first dimension) and their values."""

    name: str
    shape: tuple[int, ...]
    rows: list[int]  # the first ``max_rows`` non-finite rows (empty for a 0-dim term)
    num_rows: int  # how many rows are non-finite in total
    values: list[float]  # the term at ``rows`` (first element of each row)


@dataclass
class ModuleFinding:
    """The first module (in execution order) whose output was non-finite."""

    name: str  # as in ``named_modules()``; "" is the guarded module itself
    type: str
    output: str  # which output: "" for a tensor, else the path such as "[0]" or "['loc']"
    rows: list[int]
    num_rows: int
    inputs_finite: bool  # True: this module created the non-finite values
    input_source: str | None  # where non-finite inputs came from, when they were


@dataclass
class GradientFinding:
    """The first non-finite gradient in backward order."""

    kind: str  # "activation" (gradient of a module output) or "parameter"
    name: str  # module name (activation) or parameter name
    output: str  # activation: which output of the module; "" otherwise
    rows: list[int]
    num_rows: int
    # activation: the module whose backward computed this gradient (it consumed the output in
    # forward), or None when the output was consumed outside any submodule
    consumer: str | None


@dataclass
class NonFiniteReport:
    """Where the first non-finite loss or gradient of a training step came from.

    ``str(report)`` is a readable summary; :meth:`to_dict` gives plain Python types. Rows
    are indices of the first dimension; ``values`` holds, for each of ``rows``, the first
    values of every step input and model output (:class:`NaNGuard` fills it).

    Example:
        >>> report = NonFiniteReport(
        ...     step=3, phase="forward", cause="loss term 'nll' became non-finite",
        ...     terms=[TermFinding("nll", (4,), [2], 1, [float("inf")])],
        ...     rows=[2], values={"x": [[-1.5, 0.25]]},
        ... )
        >>> print(report)
        NaNGuard: non-finite loss or gradient at step 3 (first in the forward pass)
          cause: loss term 'nll' became non-finite
          loss term 'nll' [4]: 1 non-finite row(s) [2]
            values: [inf]
          forward: every module output was finite
          backward: no recorded gradient was non-finite
          values at rows [2]:
            x[2] = [-1.5, 0.25]
        >>> report.to_dict()["terms"][0]["rows"]
        [2]
    """

    step: int | None
    phase: str  # "forward" or "backward": where non-finite values first appeared
    cause: str  # one sentence naming the likely origin
    terms: list[TermFinding] = field(default_factory=list)
    first_module: ModuleFinding | None = None
    nonfinite_modules: list[str] = field(default_factory=list)  # every one, execution order
    nonfinite_inputs: list[str] = field(default_factory=list)  # step inputs holding NaN/inf
    nonfinite_parameter_values: list[str] = field(default_factory=list)  # parameters themselves
    first_gradient: GradientFinding | None = None
    nonfinite_gradients: list[str] = field(default_factory=list)  # parameters, non-finite .grad
    activation_grads: bool = True  # whether gradients of module outputs were recorded
    rows: list[int] = field(default_factory=list)  # the rows whose values are shown
    # name -> one list of values per row of ``rows`` (step inputs, then model outputs)
    values: dict[str, list[list[float]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The report as nested dicts and lists of plain Python values (JSON-ready but for
        non-finite floats, which ``json.dumps`` writes as ``NaN`` / ``Infinity``)."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        lines = [f"NaNGuard: non-finite loss or gradient{at} (first in the {self.phase} pass)"]
        lines.append(f"  cause: {self.cause}")
        for term in self.terms:
            lines.append(f"  loss term {term.name!r} {list(term.shape)}: {_rows_text(term)}")
            if term.values:
                lines.append(f"    values: {_numbers(term.values)}")
        if self.nonfinite_inputs:
            lines.append(f"  non-finite step inputs: {', '.join(self.nonfinite_inputs)}")
        if self.nonfinite_parameter_values:
            names = ", ".join(self.nonfinite_parameter_values)
            lines.append(f"  parameters holding non-finite values: {names}")
        lines.append("  forward: " + self._forward_text())
        lines.append("  backward: " + self._backward_text())
        if self.rows:
            lines.append(f"  values at rows {self.rows}:")
            for name, per_row in self.values.items():
                for row, numbers in zip(self.rows, per_row, strict=True):
                    lines.append(f"    {name}[{row}] = {_numbers(numbers)}")
        return "\n".join(lines)

    def _forward_text(self) -> str:
        first = self.first_module
        if first is None:
            return "every module output was finite"
        inputs = "finite inputs" if first.inputs_finite else "non-finite inputs"
        text = (
            f"first non-finite module output {_module(first.name, first.type)}{first.output} "
            f"({inputs}), {_rows_text(first)}"
        )
        later = [_module_name(n) for n in self.nonfinite_modules if n != first.name]
        if later:
            text += f"; then {', '.join(later[:6])}" + (" ..." if len(later) > 6 else "")
        return text

    def _backward_text(self) -> str:
        first = self.first_gradient
        if first is None:
            text = "no recorded gradient was non-finite"
        elif first.kind == "parameter":
            text = f"first non-finite gradient: parameter {first.name!r}" + _via(first)
        else:
            by = f", computed by the backward of {_module_name(first.consumer)}"
            text = (
                f"first non-finite gradient: d loss / d output{first.output} of "
                f"{_module_name(first.name)}, {_rows_text(first)}"
                + (
                    by
                    if first.consumer is not None
                    else ", computed outside any submodule (e.g. the loss)"
                )
            )
        if not self.activation_grads and self.phase == "backward":
            text += (
                " (gradients of module outputs were not recorded: "
                "NaNGuard(..., activation_grads=True) shows which went non-finite first)"
            )
        if self.nonfinite_gradients:
            shown = ", ".join(self.nonfinite_gradients[:8])
            more = " ..." if len(self.nonfinite_gradients) > 8 else ""
            text += f"; non-finite parameter gradients: {shown}{more}"
        return text


# ======================================================================================
# Formatting
# ======================================================================================


def _module_name(name: str | None) -> str:
    return "the guarded module itself" if name == "" else repr(name)


def _module(name: str, type_name: str) -> str:
    return f"{_module_name(name)} ({type_name})"


def _via(gradient: GradientFinding) -> str:
    """For a parameter: the module its own module's output went into (a likely culprit)."""
    if gradient.consumer is None:
        return ""
    owner = _module_name(gradient.name.rpartition(".")[0])
    return (
        f" (the output of {owner} went into {_module_name(gradient.consumer)}: the backward "
        "of one of the two made it)"
    )


def _rows_text(finding: TermFinding | ModuleFinding | GradientFinding) -> str:
    if not finding.rows and finding.num_rows:
        return "non-finite (0-dim)"
    more = " ..." if finding.num_rows > len(finding.rows) else ""
    return f"{finding.num_rows} non-finite row(s) {finding.rows}{more}"


def _numbers(values: list[float]) -> str:
    shown = ", ".join(f"{v:.6g}" for v in values[:VALUES_PER_ROW])
    return f"[{shown}{', ...' if len(values) > VALUES_PER_ROW else ''}]"


# ======================================================================================
# Analysis (host side, only after a failed check)
# ======================================================================================


def bad_rows(screen: Tensor) -> list[int]:
    """Indices of the non-finite entries of a row screen (row sums), ascending."""
    return torch.nonzero(~torch.isfinite(screen)).flatten().tolist()


def exact_bad_rows(t: Tensor) -> list[int]:
    """Indices of the rows (first dimension) of ``t`` holding a NaN or an infinity."""
    bad = ~torch.isfinite(t.detach())
    bad = bad.reshape(len(bad), -1).any(1) if bad.dim() > 1 else bad.reshape(-1)
    return torch.nonzero(bad).flatten().tolist()


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t.detach()).all())


def confirm_nonfinite(
    terms: list[tuple[str, Tensor]], parameters: list[tuple[str, Tensor]]
) -> bool:
    """Exactly: does a loss term or a parameter gradient hold a NaN or an infinity?"""
    return not all(_finite(t) for _, t in terms) or not all(
        _finite(p.grad) for _, p in parameters if p.grad is not None
    )


def _row_values(t: Tensor, row: int) -> list[float]:
    return t[row].detach().flatten()[: VALUES_PER_ROW + 1].double().tolist()


def _path_text(path: tuple) -> str:
    return "".join(f"[{key!r}]" for key in path)


@dataclass
class GuardLayout:
    """What the guard knows about its module: names and types by hook index, parameters."""

    module_names: list[str]
    module_types: list[str]
    parameters: list[tuple[str, Tensor]]
    max_rows: int
    activation_grads: bool


def build_report(record: Any, layout: GuardLayout) -> NonFiniteReport:
    """Turn the screens of one failed step (a ``guard._StepRecord``) into a report."""
    max_rows = layout.max_rows
    names = layout.module_names

    def finding_rows(screen: Tensor) -> tuple[list[int], int]:
        rows = bad_rows(screen)
        return rows[:max_rows], len(rows)

    terms = []
    for name, term in record.terms:
        exact = exact_bad_rows(term)
        rows, count = exact[:max_rows], len(exact)
        if count:
            picked = term.detach().reshape(-1) if term.dim() == 0 else term.detach()[rows]
            values = picked.reshape(len(picked), -1)[:, 0].double().tolist() if len(picked) else []
            terms.append(
                TermFinding(name, tuple(term.shape), rows if term.dim() else [], count, values)
            )

    bad_inputs = [
        name
        for name, t in record.inputs.items()
        if isinstance(t, Tensor) and t.is_floating_point() and not _finite(t)
    ]
    bad_param_values = [name for name, p in layout.parameters if not _finite(p)]

    first_module, bad_modules = None, []
    for index, in_screens, in_sources, outputs in record.calls:
        for path, screen in outputs:
            rows, count = finding_rows(screen)
            if not count:
                continue
            if names[index] not in bad_modules:
                bad_modules.append(names[index])
            if first_module is None:
                source = _input_source(in_screens, in_sources, names, record.inputs)
                first_module = ModuleFinding(
                    names[index],
                    layout.module_types[index],
                    _path_text(path),
                    rows,
                    count,
                    inputs_finite=source is None,
                    input_source=source,
                )

    first_gradient = _first_gradient(record, layout, finding_rows)
    bad_grads = [
        name for name, p in layout.parameters if p.grad is not None and not _finite(p.grad)
    ]

    report = NonFiniteReport(
        step=record.step,
        phase="backward",
        cause="",
        terms=terms,
        first_module=first_module,
        nonfinite_modules=bad_modules,
        nonfinite_inputs=bad_inputs,
        nonfinite_parameter_values=bad_param_values,
        first_gradient=first_gradient,
        nonfinite_gradients=bad_grads,
        activation_grads=layout.activation_grads,
    )
    forward = bool(terms or first_module or bad_inputs or bad_param_values)
    report.phase = "forward" if forward else "backward"
    report.rows = _offending_rows(report, record, max_rows)
    report.cause = _cause(report, layout)
    report.values = _values_at(report.rows, record)
    return report


def _input_source(
    screens: list[Tensor | None], sources: list[Any], names: list[str], inputs: dict[str, Any]
) -> str | None:
    """None if every input was finite, else where the first non-finite input came from."""
    for screen, source in zip(screens, sources, strict=True):
        if screen is None:  # a step input: held, so checked exactly
            if _finite(inputs[source]):
                continue
        elif not bad_rows(screen):
            continue
        if isinstance(source, str):
            return f"step input {source!r}"
        if source is not None:
            return f"output of {_module_name(names[source[0]])}"
        return _OUTSIDE
    return None


def _consumer(record: Any, names: list[str], call: int, output: int | None) -> str | None:
    """The first module that took output ``output`` (any, if None) of ``call`` as input."""
    for index, _, sources, _ in record.calls:
        for source in sources:
            if isinstance(source, tuple) and source[0] == call and output in (None, source[1]):
                return names[index]
    return None


def _first_gradient(record: Any, layout: GuardLayout, finding_rows) -> GradientFinding | None:
    names = layout.module_names
    for call, output, screen in record.backward:
        if screen is None:  # a parameter's gradient was accumulated: check the .grad now
            name, p = layout.parameters[output]
            if p.grad is None or _finite(p.grad):
                continue
            owner = name.rpartition(".")[0]
            calls = [c for c, entry in enumerate(record.calls) if names[entry[0]] == owner]
            consumer = _consumer(record, names, calls[0], None) if calls else None
            consumer = None if consumer == owner else consumer  # a recurrent cell: no news
            return GradientFinding("parameter", name, "", [], 1, consumer)
        rows, count = finding_rows(screen)
        if count:
            index, _, _, outputs = record.calls[call]
            path = _path_text(outputs[output][0])
            consumer = _consumer(record, names, call, output)
            return GradientFinding("activation", names[index], path, rows, count, consumer)
    return None


def _offending_rows(report: NonFiniteReport, record: Any, max_rows: int) -> list[int]:
    """Rows to show: those of the non-finite loss terms, else of the first module output,
    else of the non-finite step inputs, else of the first non-finite gradient."""
    rows: set[int] = set()
    for _, term in record.terms:
        if term.dim():
            rows.update(exact_bad_rows(term))
    if not rows and report.first_module is not None:
        rows.update(report.first_module.rows)
    if not rows:
        for name in report.nonfinite_inputs:
            rows.update(exact_bad_rows(record.inputs[name]))
    if not rows and report.first_gradient is not None:
        rows.update(report.first_gradient.rows)
    return sorted(rows)[:max_rows]


def _cause(report: NonFiniteReport, layout: GuardLayout) -> str:
    first, terms = report.first_module, report.terms
    if report.nonfinite_parameter_values:
        return (
            f"parameter(s) {', '.join(report.nonfinite_parameter_values[:4])} already hold "
            "non-finite values (an earlier update wrote them)"
        )
    if report.nonfinite_inputs and (first is None or not first.inputs_finite):
        return f"the step input(s) {', '.join(report.nonfinite_inputs)} contain non-finite values"
    if first is not None:
        where = _module(first.name, first.type)
        if first.inputs_finite:
            return (
                f"module {where} turned finite inputs into non-finite output{first.output} "
                f"at {first.num_rows} row(s)"
            )
        if first.input_source != _OUTSIDE:
            return f"module {where} received non-finite inputs ({first.input_source})"
        parent = first.name.rpartition(".")[0]
        owner = "the guarded module" if parent == "" else repr(parent)
        return (
            f"module {where} received non-finite inputs {_OUTSIDE}: they were created in "
            f"code between the modules (in the forward of {owner} or in the training step)"
        )
    if terms:
        names = ", ".join(repr(t.name) for t in terms)
        return (
            f"every module output was finite, but loss term(s) {names} became non-finite: "
            "the loss computation itself produced them"
        )
    gradient = report.first_gradient
    if gradient is None:
        return "parameter gradients became non-finite (no recorded gradient shows where)"
    if gradient.kind == "parameter":
        return (
            f"the forward pass was finite; the first non-finite gradient was that of "
            f"parameter {gradient.name!r}" + _via(gradient)
        )
    by = (
        f"the backward of {_module_name(gradient.consumer)}"
        if gradient.consumer is not None
        else "code outside any submodule (e.g. the loss)"
    )
    return (
        f"the forward pass was finite; {by} produced the first non-finite gradient (of the "
        f"output{gradient.output} of {_module_name(gradient.name)})"
    )


def _values_at(rows: list[int], record: Any) -> dict[str, list[list[float]]]:
    values: dict[str, list[list[float]]] = {}
    if not rows:
        return values
    named = [(name, t) for name, t in record.inputs.items() if isinstance(t, Tensor)]
    named += [(f"output{_path_text(path)}", t) for path, t in record.model_outputs]
    for name, t in named:
        if t.dim() and t.shape[0] > max(rows):
            values[name] = [_row_values(t, row) for row in rows]
    return values
