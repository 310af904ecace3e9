"""Every public function and distribution method under ``torch.func`` and ``torch.compile``.

The fuzz records (``tests/fuzz/records.py``, one per public function and distribution
method) are run on a few rows of their extreme-input draws, in float64:

* ``torch.func.vmap`` over the rows of ``fn`` gives the eager value, and
  ``vmap(grad(...))`` (per-row gradients in one call) the eager gradient;
* ``torch.compile(fullgraph=True)`` compiles the record with no graph break, forward and
  backward, and gives the eager value and gradient. Compiling costs seconds per record:
  by default one record per module runs (every module touched); all of them run with
  ``PROBLOSS_COMPILE_ALL=1``.

Tolerance: the transformed call evaluates the same formulas on the same numbers; what may
differ is the order of floating-point sums (vectorised reductions, fused kernels) and
inductor's fused elementwise code (fma contraction, its own ``exp`` / ``log``). Each
operation's rounding error is then at most a few ulps, amplified by the condition number
of what follows; on the records' extreme draws we allow ``rtol = 1e-9`` (4.5e6 float64
ulps, a condition number of 1e5 on a hundred-operation formula) with ``atol = 1e-300``
for results that are exactly zero in one form. Compiled float32 is checked too, with
``rtol = 1e-4`` (840 float32 ulps: a condition number of 10 on the same formulas) and
``atol = 1e-30``: it catches inductor's own functions losing digits (its CPU vector
``expm1`` is ``exp(x) - 1``, which returned 0 for continuous-Bernoulli CDFs of 1e-26).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from torch.func import grad, vmap

from tests.fuzz.checks import make_inputs
from tests.fuzz.records import RECORDS

ROWS = 6
RTOL, ATOL = 1e-9, 1e-300
RTOL32, ATOL32 = 1e-4, 1e-30
DETERMINISTIC = [r for r in RECORDS if not r.random]


def _inputs(record, dtype=torch.float64) -> list[torch.Tensor]:
    """Draws exactly representable in ``dtype`` (a float32 scale does not round to 0)."""
    return [t.to(dtype) for t in make_inputs(record, dtype, ROWS, salt="transforms")]


def _row_fn(record):
    """``fn`` on one row: each argument gets its row dimension back."""
    return lambda *row: record.fn(*(t.unsqueeze(0) for t in row)).squeeze(0)


def _eager(record, inputs):
    xs = [t.clone().requires_grad_(a.grad) for a, t in zip(record.args, inputs, strict=True)]
    out = record.fn(*xs)
    wanted = [x for x in xs if x.requires_grad]
    grads = torch.autograd.grad(out.sum(), wanted, allow_unused=True) if out.requires_grad else ()
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(wanted, grads, strict=True)]
    return out.detach(), grads


def _close(got, want, what):
    rtol, atol = (RTOL, ATOL) if got.dtype == torch.float64 else (RTOL32, ATOL32)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True, msg=what)


@pytest.mark.parametrize("record", DETERMINISTIC, ids=lambda r: r.name)
def test_vmap_and_per_row_grad_match_eager(record):
    inputs = _inputs(record)
    out, grads = _eager(record, inputs)
    _close(vmap(_row_fn(record))(*inputs), out, f"{record.name}: vmap value")
    argnums = tuple(i for i, a in enumerate(record.args) if a.grad)
    if not argnums or not grads:
        return
    per_row = vmap(grad(lambda *row: _row_fn(record)(*row).sum(), argnums=argnums))(*inputs)
    for i, (g, want) in enumerate(zip(per_row, grads, strict=True)):
        _close(g, want, f"{record.name}: vmap(grad) d/d{record.args[argnums[i]].name}")


def _compile_cases():
    if os.environ.get("PROBLOSS_COMPILE_ALL"):
        return DETERMINISTIC
    seen, cases = set(), []
    for record in DETERMINISTIC:
        package, name = record.target.split(".")[:2]
        covered = getattr(importlib.import_module(f"probloss.{package}"), name)
        # a distribution class, or the module that defines a function
        key = record.target.rsplit(".", 1)[0] if isinstance(covered, type) else covered.__module__
        if key not in seen:
            seen.add(key)
            cases.append(record)
    return cases


@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")  # torch's
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("record", _compile_cases(), ids=lambda r: r.name)
def test_compiles_fullgraph_and_matches_eager(record, dtype):
    torch._dynamo.reset()
    inputs = _inputs(record, dtype)
    out, grads = _eager(record, inputs)
    compiled = torch.compile(record.fn, fullgraph=True, dynamic=False)
    xs = [t.clone().requires_grad_(a.grad) for a, t in zip(record.args, inputs, strict=True)]
    got = compiled(*xs)
    _close(got.detach(), out, f"{record.name}: compiled value")
    wanted = [x for x in xs if x.requires_grad]
    if got.requires_grad and wanted:
        got_grads = torch.autograd.grad(got.sum(), wanted, allow_unused=True)
        for x, g, want in zip(wanted, got_grads, grads, strict=True):
            _close(torch.zeros_like(x) if g is None else g, want, f"{record.name}: compiled grad")
