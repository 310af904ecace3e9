"""Every kernel operator passes ``torch.library.opcheck`` on the inputs the library gives it.

The inputs are captured while the fuzz records (one per public function and distribution
method) run on a few rows of their draws in float64 and float32, and on moderate inputs
(the fused mixture kernels run only inside their exact domain): each kernel's first call
is kept. A kernel no record reaches fails the test (an operator without a caller, or a
record missing). ``opcheck`` checks the schema (no undeclared mutation or aliasing), the
fake implementation against the real one (shapes, dtypes, strides) and ahead-of-time
tracing with dynamic shapes.
"""

from __future__ import annotations

import pytest
import torch

import probloss  # defines every kernel
from probloss._core import ops
from tests.fuzz.checks import make_inputs
from tests.fuzz.records import RECORDS

ROWS = 4


def _moderate(arg, dtype) -> torch.Tensor:
    """A well-conditioned input of the argument's domain, ``ROWS`` rows."""
    gen = torch.Generator().manual_seed(0)
    shape = (ROWS, *arg.shape)
    if arg.domain == "tril":
        d = arg.shape[-1]
        return (torch.eye(d) + 0.1 * torch.randn(shape, generator=gen)).tril().to(dtype)
    if arg.domain in ("positive", "probability", "open_probability"):
        return (0.2 + 0.6 * torch.rand(shape, generator=gen)).to(dtype)
    return (0.5 * torch.randn(shape, generator=gen)).to(dtype)


def _captured() -> dict[str, tuple]:
    seen: dict[str, tuple] = {}
    call = ops.Kernel.__call__

    def recording(self, *args):
        seen.setdefault(
            self.name,
            tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args),
        )
        return call(self, *args)

    ops.Kernel.__call__ = recording
    try:
        for record in RECORDS:
            for dtype in (torch.float64, torch.float32, None):
                if dtype is None:  # moderate inputs
                    inputs = [_moderate(a, torch.float64) for a in record.args]
                else:
                    inputs = [t.to(dtype) for t in make_inputs(record, dtype, ROWS, salt="opcheck")]
                for x, a in zip(inputs, record.args, strict=True):
                    x.requires_grad_(a.grad)
                out = record.fn(*inputs)
                if out.requires_grad:
                    out.sum().backward()
    finally:
        ops.Kernel.__call__ = call
    return seen


CAPTURED = _captured()


@pytest.mark.parametrize("name", sorted(ops.KERNELS))
def test_kernel_passes_opcheck(name):
    assert name in CAPTURED, f"no fuzz record reaches the kernel {name!r}"
    torch.library.opcheck(ops.KERNELS[name].op, CAPTURED[name])


def _operators_run(fn, x: torch.Tensor) -> set[str]:
    with torch.profiler.profile() as prof:
        fn(x)
    return {e.key for e in prof.key_averages() if e.key.startswith("probloss::")}


def test_fusible_kernel_is_traced_into_while_compiling():
    """A ``fusible`` kernel (``log_softplus``) is compiled from its Python, so the compiled
    code calls no ``probloss`` operator for it and equals eager; the operator itself still
    serves ``vmap`` (its vmap rule runs)."""
    assert ops.KERNELS["log_softplus"].fusible
    x = torch.linspace(-200.0, 50.0, 1001, dtype=torch.float64)
    compiled = torch.compile(probloss.special.log_softplus, fullgraph=True, dynamic=False)
    assert "probloss::log_softplus" not in _operators_run(compiled, x)
    torch.testing.assert_close(compiled(x), probloss.special.log_softplus(x), rtol=1e-12, atol=0)
    ran = _operators_run(torch.vmap(probloss.special.log_softplus), x.reshape(7, 143))
    assert "probloss::log_softplus" in ran
