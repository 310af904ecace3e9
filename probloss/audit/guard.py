r"""A NaN guard for training loops: catch the first non-finite loss or gradient, say where.

"Why does my loss turn NaN at epoch 40?" :class:`NaNGuard` watches a real training loop at
the cost of a few cheap tensor operations per module and **one host synchronisation per
step**. When a named loss term or a gradient of the step is not finite, it reports which
term and which batch rows, which module output went non-finite first in the forward pass
(and whether that module was given finite inputs, i.e. created the values itself), which
gradient went non-finite first in the backward pass, which parameters got non-finite
gradients, and the step inputs and model outputs at the offending rows; then it raises,
skips the optimizer step, or warns.

.. code-block:: python

    guard = NaNGuard(model, policy="raise")  # forward hooks on every submodule
    for step, (x, y) in enumerate(loader):
        optimizer.zero_grad()
        with guard.step(step, inputs={"x": x, "y": y}):
            out = model(x)
            nll = guard.loss("nll", per_example_nll(out, y))  # (B,), returned unchanged
            kl = guard.loss("kl", per_example_kl(out))
            (nll + kl).mean().backward()
            guard.optimizer_step(optimizer)  # checks, then steps unless told to skip

What triggers the policy: a NaN or an infinity in a loss term registered with
:meth:`NaNGuard.loss` or in a parameter's gradient, the two things that poison training.
Non-finite module outputs or activation gradients alone do not trigger (a ``-inf`` mask
can be intended, a ``relu`` can mask an infinite gradient); they are what the report uses
to locate the origin. Register every loss term (at least the total): a NaN loss can have
finite gradients (``d log(x)/dx`` at ``x = -1`` is finite).

How it records without a host sync per module: for every floating tensor it sees (module
inputs and outputs; with ``activation_grads=True`` also the gradients of module outputs)
it keeps a *row screen*, the sum over each row (index of the first dimension), on the
tensor's device. A row holding a NaN or an infinity always has a non-finite sum, so a
finite screen proves the row finite; a non-finite one is NaN/inf or, for values of order
``finfo.max / width``, an overflowing sum (used only to locate, never to trigger). A module
input that is the very tensor another module returned (same object, not modified in place
since, by its version counter) reuses that screen and links the two modules. The order in
which parameter gradients are accumulated is recorded by a hook that does no tensor work.

The end-of-step check sums the loss terms and takes one fused 2-norm of all parameter
gradients (per device), multiplies by 0 (``0 * x`` is NaN exactly for non-finite ``x``),
and reads one number: the step's only host synchronisation. If that number is NaN, the
loss terms and gradients are checked exactly with ``isfinite`` (a sum or a norm can
overflow on finite values), and only then are the screens read row by row to build the
:class:`~probloss.audit.guard_report.NonFiniteReport`.

Scope: outputs that are tensors or (nested) tuples, lists and dicts of tensors are checked;
other objects (a ``Distribution`` returned by a head) are not inspected, the tensors of
their submodules are. Rows are indices of the first dimension of every tensor. Outside
:meth:`NaNGuard.step` (evaluation, ``torch.no_grad()``) the hooks return at once.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .guard_report import (
    GuardLayout,
    NonFiniteError,
    NonFiniteReport,
    NonFiniteWarning,
    build_report,
    confirm_nonfinite,
)

POLICIES = ("raise", "skip", "warn")

__all__ = ["POLICIES", "NaNGuard", "NonFiniteError", "NonFiniteReport", "NonFiniteWarning"]


def row_sums(t: Tensor) -> Tensor:
    r"""One finiteness screen per row (index of the first dimension) of ``t``, no host sync.

    .. math::
        s_r = \sum_j t_{rj}, \qquad t_{r\cdot} \text{ not finite} \implies s_r
        \text{ not finite}

    since ``inf + x = inf``, ``inf - inf = NaN`` and ``NaN + x = NaN`` (IEEE 754): a finite
    screen proves the row finite; a non-finite one means a NaN/inf in the row or, for
    values of order ``finfo.max / width``, a sum that overflowed.

    Args:
        t: floating tensor of shape ``(B, *)`` (or ``()``).

    Returns:
        Shape ``(B,)`` (``(1,)`` for a 0-dim tensor), on ``t``'s device, detached: a copy of
        ``t`` itself when it is 1-D; float16 / bfloat16 rows are summed in float32, so
        their screens cannot overflow at 65504.

    Example:
        >>> t = torch.tensor([[1.0, 2.0], [float("inf"), 0.0], [3e38, 3e38]])
        >>> row_sums(t)  # row 2 is finite but its sum overflows
        tensor([3., inf, inf])
        >>> row_sums(torch.full((2, 2), 6e4, dtype=torch.float16))  # in float32: no overflow
        tensor([120000., 120000.])
    """
    t = t.detach()
    if t.dim() <= 1:
        return t.reshape(-1).clone()  # a copy: a later in-place edit must not change it
    # a plain sum is one pass without a temporary, 3x faster than (0 * t).sum() on CPU
    dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    return t.sum(dim=tuple(range(1, t.dim())), dtype=dtype)


def _tensors(obj: Any, path: tuple = ()) -> list[tuple[tuple, Tensor]]:
    """``(path, tensor)`` for each floating tensor in nested tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        return [(path, obj)] if obj.is_floating_point() else []
    found: list[tuple[tuple, Tensor]] = []
    if isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            found += _tensors(item, (*path, i))
    elif isinstance(obj, Mapping):
        for key, item in obj.items():
            found += _tensors(item, (*path, key))
    return found


def _screens(terms: list[tuple[str, Tensor]], grads: list[Tensor]) -> list[Tensor]:
    """Per device, a 0-dim tensor that is 0 if every loss term and gradient is finite.

    Loss terms by their sums, gradients by one fused 2-norm call per device. A NaN result
    means a non-finite value, or a sum or norm that overflowed on finite values: the
    caller confirms a failed screen exactly.
    """
    by_device: dict[torch.device, list[Tensor]] = {}
    for _, term in terms:
        half = term.dtype in (torch.float16, torch.bfloat16)
        total = term.sum(dtype=torch.float32) if half else term.sum()
        by_device.setdefault(term.device, []).append(total.reshape(1))
    grouped: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        g = g.coalesce().values() if g.is_sparse else g
        grouped.setdefault(g.device, []).append(g)
    for device, gs in grouped.items():
        # torch's fused norm (as in clip_grad_norm_) is NaN or inf if any entry is
        by_device.setdefault(device, []).append(torch.stack(torch._foreach_norm(gs, 2.0)))
    # 0 * x is NaN exactly for non-finite x, else 0: the sum of the products cannot overflow
    return [(torch.cat(parts) * 0).sum() for parts in by_device.values()]


class _StepRecord:
    """What one training step recorded; read by ``guard_report.build_report`` on failure."""

    __slots__ = ("backward", "calls", "dirty", "inputs", "known", "model_outputs", "step", "terms")

    def __init__(self, step: int, inputs: Mapping[str, Any]) -> None:
        self.step = step
        self.inputs = dict(inputs)
        # (module index, input screens, input sources, [(output path, screen)]) per module
        # call, in the order the calls finished (children before their parents). A source is
        # (call, output), the name of a step input (screen None: checked exactly on failure)
        # or None (a tensor made outside the modules).
        self.calls: list[tuple[int, list[Tensor | None], list[Any], list[tuple]]] = []
        # id(tensor) -> (weakref, version, screen, source); the weakref and the version
        # counter tell a reused id or an in-place edit since
        self.known: dict[int, tuple[Any, int, Tensor | None, Any]] = {}
        self.terms: list[tuple[str, Tensor]] = []
        # in firing order: (call, output, screen) for a module output's gradient,
        # (-1, parameter index, None) when a parameter's gradient was accumulated
        self.backward: list[tuple[int, int, Tensor | None]] = []
        self.model_outputs: list[tuple[tuple, Tensor]] = []
        self.dirty = False  # something to check since the last check
        for name, t in self.inputs.items():
            if isinstance(t, Tensor) and t.is_floating_point():
                self.known[id(t)] = (weakref.ref(t), t._version, None, name)


class _StepContext:
    __slots__ = ("_guard", "_inputs", "_step")

    def __init__(self, guard: NaNGuard, step: int | None, inputs: Mapping[str, Any]) -> None:
        self._guard, self._step, self._inputs = guard, step, inputs

    def __enter__(self) -> NaNGuard:
        self._guard._begin(self._step, self._inputs)
        return self._guard

    def __exit__(self, exc_type, exc, tb) -> None:
        self._guard._end(check=exc_type is None)


class NaNGuard:
    r"""Catch the first non-finite loss or gradient of a training step and report its origin.

    Registers a forward hook on every submodule of ``module`` (named by ``named_modules``)
    and a post-accumulate-gradient hook on every parameter that requires a gradient.
    Inside :meth:`step` they record row screens (see the module docstring); the check at
    :meth:`optimizer_step`, :meth:`check` or the end of the step reads one number. On
    failure it builds a :class:`~probloss.audit.guard_report.NonFiniteReport` (also kept
    as :attr:`last_report`) and applies the policy:

    * ``"raise"`` (default): raise :class:`~probloss.audit.guard_report.NonFiniteError`
      (a ``RuntimeError``; ``.report``), before any optimizer step. Gradients are left as
      they are, for inspection.
    * ``"skip"``: no optimizer step, and every gradient of the module's (and the
      optimizer's) parameters is set to ``None``, so parameters and optimizer state stay
      bit-identical (a *zero* gradient would still move Adam's moments and step count).
      Counted in :attr:`num_skipped`; no warning.
    * ``"warn"``: warn :class:`~probloss.audit.guard_report.NonFiniteWarning` with the
      report, then step as usual: the guard only observes (the parameters may become
      non-finite; the next reports then say so).

    Overhead when nothing goes wrong: one row sum of each module output (and of each
    module input that no other module returned), a few microseconds of Python per module
    call, one fused norm of the parameter gradients and one host read per step; with
    ``activation_grads=True`` also a tensor hook and a row sum per module output's gradient,
    about as much again. ``benchmarks/bench_nanguard.py`` measures it. ``enabled=False``
    (or ``guard.enabled = False``) removes every hook; the guard's methods then pass
    through.

    References: skipping an optimizer step on non-finite gradients is what loss scaling
    does (Micikevicius et al. 2018, "Mixed Precision Training", arXiv:1710.03740;
    ``torch.amp.GradScaler``); ``torch.autograd.detect_anomaly`` finds the backward
    operation that made a NaN by checking every one of them (a host sync per operation).

    Args:
        module: the model, an ``nn.Module`` (wrap several in an ``nn.ModuleDict``).
        policy: ``"raise"``, ``"skip"`` or ``"warn"``.
        enabled: register the hooks now (``False``: a pass-through guard).
        activation_grads: also record the gradient of every module output (a tensor hook
            and a row sum each): the report then names the first non-finite activation
            gradient in backward order, its rows and the module whose backward made it.
            Without it the backward order is that of the parameter gradients.
        max_rows: at most this many offending rows are listed per finding and shown.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: an unknown ``policy`` or ``max_rows < 1``.

    Example:
        >>> from torch import nn
        >>> class Log(nn.Module):
        ...     def forward(self, h):
        ...         return torch.log(h)
        >>> model = nn.Sequential(nn.Linear(1, 1), Log())
        >>> _ = nn.init.ones_(model[0].weight), nn.init.zeros_(model[0].bias)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x = torch.tensor([[1.0], [-2.0], [3.0]])
        >>> with NaNGuard(model, policy="skip") as guard:
        ...     with guard.step(0, inputs={"x": x}):
        ...         nll = guard.loss("nll", -model(x).squeeze(-1))
        ...         nll.mean().backward()
        ...         stepped = guard.optimizer_step(optimizer)
        >>> stepped, guard.last_report.rows, guard.last_report.values["x"]
        (False, [1], [[-2.0]])
        >>> guard.last_report.cause
        "module '1' (Log) turned finite inputs into non-finite output at 1 row(s)"
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        policy: str = "raise",
        enabled: bool = True,
        activation_grads: bool = False,
        max_rows: int = 5,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be 'raise', 'skip' or 'warn', got {policy!r}")
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
        self.module = module
        self.policy = policy
        self.activation_grads = activation_grads
        self.max_rows = max_rows
        self.last_report: NonFiniteReport | None = None
        self.num_skipped = 0
        self._modules = list(module.named_modules())
        self._parameters = list(module.named_parameters())
        self._handles: list[Any] = []
        self._record: _StepRecord | None = None
        self._next_step = 0
        self._enabled = False
        self.enabled = enabled

    # ----------------------------------------------------------------------------------
    # Switching on and off
    # ----------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether the hooks are registered; setting ``False`` removes them all."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if value and not self._enabled:
            for index, (_, module) in enumerate(self._modules):
                hook = functools.partial(self._on_forward, index)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            for index, (_, p) in enumerate(self._parameters):
                if p.requires_grad:  # frozen parameters take no hook (and get no gradient)
                    hook = functools.partial(self._on_parameter_grad, index)
                    self._handles.append(p.register_post_accumulate_grad_hook(hook))
        elif not value:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._record = None
        self._enabled = bool(value)

    def remove(self) -> None:
        """Remove every hook (the same as ``guard.enabled = False``)."""
        self.enabled = False

    def __enter__(self) -> NaNGuard:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"NaNGuard({type(self.module).__name__}, policy={self.policy!r}, "
            f"enabled={self._enabled}, modules={len(self._modules)})"
        )

    # ----------------------------------------------------------------------------------
    # The training step
    # ----------------------------------------------------------------------------------

    def step(
        self, step: int | None = None, inputs: Mapping[str, Any] | None = None
    ) -> _StepContext:
        """Context manager around one training step; checks at its end if not checked yet.

        Args:
            step: the step number shown in the report (default: one more than the last).
            inputs: named batch tensors (``{"x": x, "y": y}``), held for the step: their
                rows at the offending indices are shown in the report, a failed step checks
                them too, and a module fed one of them directly is linked to it. Non-tensor
                values are ignored.

        Raises:
            TypeError: ``inputs`` is not a mapping.
            RuntimeError: steps are nested.
        """
        if inputs is not None and not isinstance(inputs, Mapping):
            raise TypeError(f"inputs must be a mapping of names to tensors, got {type(inputs)}")
        return _StepContext(self, step, inputs or {})

    def loss(self, name: str, value: Tensor) -> Tensor:
        """Record a named loss term (per example, shape ``(B, *)``, or a scalar); return it.

        Raises:
            TypeError: ``name`` is not a string or ``value`` not a floating tensor.
        """
        if not isinstance(name, str):
            raise TypeError(f"loss term name must be a str, got {type(name).__name__}")
        if not isinstance(value, Tensor) or not value.is_floating_point():
            got = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"loss term {name!r} must be a floating tensor, got {got}")
        record = self._record
        if record is not None:
            record.terms.append((name, value.detach()))
            record.dirty = True
        return value

    def check(self) -> NonFiniteReport | None:
        """Check what the step recorded so far (one host read) and apply the policy.

        Call it after backward. ``"skip"`` sets the module's gradients to ``None`` (an
        optimizer stepped afterwards then leaves those parameters alone).

        Returns:
            The report, or ``None`` if everything was finite (or the guard is disabled).

        Raises:
            NonFiniteError: under ``"raise"``, if something was not finite.
            RuntimeError: called outside :meth:`step` while enabled.
        """
        return self._check(stacklevel=3)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Check, then ``optimizer.step()`` unless the policy skips it; True if it stepped.

        Under ``"skip"`` a failed check sets the gradients of the optimizer's parameters to
        ``None`` as well, and the optimizer is not called.
        """
        report = self._check(stacklevel=3) if self._record is not None else None
        if report is not None and self.policy == "skip":
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            return False
        optimizer.step()
        return True

    # ----------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------

    def _begin(self, step: int | None, inputs: Mapping[str, Any]) -> None:
        if self._record is not None:
            raise RuntimeError("NaNGuard steps cannot be nested")
        step = self._next_step if step is None else step
        self._next_step = step + 1
        if self._enabled:
            self._record = _StepRecord(step, inputs)

    def _end(self, check: bool) -> None:
        record = self._record
        try:
            if check and record is not None and record.dirty:
                self._check(stacklevel=4)
        finally:
            self._record = None

    def _check(self, stacklevel: int) -> NonFiniteReport | None:
        record = self._record
        if record is None:
            if self._enabled:
                raise RuntimeError("NaNGuard.check() must be called inside guard.step()")
            return None
        record.dirty = False
        grads = [p.grad for _, p in self._parameters if p.grad is not None]
        # the one host read of a step (one per device)
        if all(screen.item() == 0 for screen in _screens(record.terms, grads)):
            return None
        if not confirm_nonfinite(record.terms, self._parameters):
            return None  # a sum or norm overflowed on finite values
        layout = GuardLayout(
            [name for name, _ in self._modules],
            [type(m).__name__ for _, m in self._modules],
            self._parameters,
            self.max_rows,
            self.activation_grads,
        )
        report = build_report(record, layout)
        self.last_report = report
        if self.policy == "raise":
            raise NonFiniteError(report)
        if self.policy == "warn":
            warnings.warn(str(report), NonFiniteWarning, stacklevel=stacklevel)
        else:
            for _, p in self._parameters:
                p.grad = None
            self.num_skipped += 1
        return report

    def _on_forward(self, index: int, module: nn.Module, args, kwargs, output) -> None:
        record = self._record
        if record is None:
            return
        known = record.known
        screens, sources = [], []
        for _, t in _tensors((args, kwargs)) if kwargs else _tensors(args):
            entry = known.get(id(t))
            if entry is not None and entry[0]() is t and entry[1] == t._version:
                screens.append(entry[2])  # another module's output (or a step input): reuse
                sources.append(entry[3])
            else:  # made outside the modules: screened once, for every module it enters
                screen = row_sums(t)
                known[id(t)] = (weakref.ref(t), t._version, screen, None)
                screens.append(screen)
                sources.append(None)
        call = len(record.calls)
        found = _tensors(output)
        outputs = []
        for path, t in found:
            entry = known.get(id(t))
            if entry is not None and entry[0]() is t and entry[1] == t._version:
                # returned as is: a child's output or an input (a step input has no screen)
                outputs.append((path, row_sums(t) if entry[2] is None else entry[2]))
                continue
            screen = row_sums(t)
            known[id(t)] = (weakref.ref(t), t._version, screen, (call, len(outputs)))
            if self.activation_grads and t.requires_grad:
                t.register_hook(functools.partial(self._on_grad, record, call, len(outputs)))
            outputs.append((path, screen))
        record.calls.append((index, screens, sources, outputs))
        if index == 0:  # the guarded module itself: keep its outputs for the report
            record.model_outputs = [(path, t.detach()) for path, t in found]

    def _on_grad(self, record: _StepRecord, call: int, output: int, grad: Tensor) -> None:
        if self._record is record:  # not a stale graph from an earlier step
            record.backward.append((call, output, row_sums(grad)))
            record.dirty = True

    def _on_parameter_grad(self, index: int, param: Tensor) -> None:
        record = self._record
        if record is not None:
            record.backward.append((-1, index, None))
            record.dirty = True
