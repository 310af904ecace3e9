"""Kernels as operators: how probloss defines a computation with a hand-written gradient.

A kernel is two pieces, so that ``torch.compile``, ``torch.export`` and ``torch.func`` all
see it as one operation:

- its value is a ``torch.library.custom_op`` (:func:`kernel_op`), with a fake (shape-only)
  implementation for tracing and a vmap rule for ``torch.vmap``. Inside the operator the
  tensors are real, so a CPU fast path may read them on the host (:func:`host_readable`)
  even when the caller is being compiled;
- its gradient is a ``torch.autograd.Function`` in the ``setup_context`` form with
  ``generate_vmap_rule = True``, whose ``forward`` calls the operator. That form is what
  ``torch.func.grad`` / ``vmap`` / ``jacrev`` require; torch 2.13's
  ``custom_op.register_autograd`` does not work under ``torch.func`` (pytorch issue 170834),
  so the gradient does not live on the operator.

Outside an operator, code that picks a fast path by looking at values asks
:func:`host_readable` first: the answer is False while tracing, off the CPU and inside a
``torch.func`` transform, where both paths are built and selected with ``torch.where``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

NAMESPACE = "probloss"
KERNELS: dict[str, Kernel] = {}  # name -> kernel, every one defined (tests run opcheck on each)


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def has_values(*tensors: Tensor) -> bool:
    """Whether the tensors have values to read at all: not tracing, and every tensor a
    plain one (no fake or functional tensor of a tracer, none wrapped by a ``torch.func``
    transform: a batched tensor of ``vmap`` has no single value)."""
    if torch.compiler.is_compiling():
        return False
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return all(type(t) in _PLAIN_TYPES and not is_wrapped(t) for t in tensors)


def host_readable(*tensors: Tensor) -> bool:
    """True when reading the values of ``tensors`` on the host is free and allowed: eager
    (not tracing, no ``torch.func`` transform) and every tensor on the CPU."""
    return has_values(*tensors) and all(t.device.type == "cpu" for t in tensors)


def _align_batch(arg: Tensor, in_dim: int | None, event_dims: int, batch_rank: int) -> Tensor:
    """``arg`` with the vmapped dimension first, then ``batch_rank`` batch dimensions.

    A kernel broadcasts its arguments over their leading (batch) dimensions, right-aligned
    against their event dimensions. An argument with fewer batch dimensions gets singleton
    ones after the vmapped dimension, so the vmapped dimensions of all arguments line up.
    """
    arg = arg.unsqueeze(0) if in_dim is None else arg.movedim(in_dim, 0)
    missing = batch_rank - (arg.dim() - 1 - event_dims)
    return arg.reshape(arg.shape[:1] + (1,) * missing + arg.shape[1:])


class Kernel:
    """A kernel callable as a function: in plain eager code it runs the Python directly
    (the operator's dispatch costs about 15 us a call and buys nothing there); while
    tracing or under a ``torch.func`` transform it calls the operator :attr:`op`, except
    that a :attr:`fusible` kernel is traced into while compiling (see :func:`kernel_op`)."""

    def __init__(self, name: str, fn: Callable[..., object], op, fusible: bool = False) -> None:
        self.name, self.fn, self.op, self.fusible = name, fn, op, fusible
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, Tensor)]
        if has_values(*tensors) or (self.fusible and torch.compiler.is_compiling()):
            return self.fn(*args)
        return self.op(*args)


def kernel_op(
    name: str,
    event_dims: Sequence[int | None],
    fake: Callable[..., object],
    mutates: tuple[str, ...] = (),
    fusible: bool = False,
) -> Callable[[Callable[..., object]], Kernel]:
    """Decorator: the function becomes a :class:`Kernel` over the operator ``probloss::name``.

    Args:
        name: the operator's name in the ``probloss`` namespace.
        event_dims: for each positional argument, how many trailing dimensions are event
            dimensions (the kernel broadcasts over the ones before them); ``None`` for an
            argument that is not a tensor. It defines the vmap rule: every output carries the
            vmapped dimension first.
        fake: the shape-only implementation (same signature), run while tracing.
        mutates: the names of the arguments the kernel overwrites as scratch space (a
            backward reusing the forward's saved buffers): eager code saves the copies,
            and tracers, told of it, copy first where the buffer is still needed.
        fusible: while compiling, trace the Python instead of calling the operator, so that
            the compiler fuses it with its neighbours (an elementwise kernel called once
            per element: as one opaque call it costs a pass over memory of its own, 1.4 ms
            of a 25 ms MDN training step for ``log_softplus``). Only for a function whose
            branch-free form (:func:`host_readable` is False while tracing) is exact and
            which writes no buffer in place; ``torch.func`` transforms and non-strict
            tracing still see the operator.

    The decorated function must not return its inputs or views of them (``custom_op``
    forbids aliasing), nor modify any other argument in place.
    """

    def register(fn: Callable[..., object]):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates)(fn)
        op.register_fake(fake)

        def vmap_rule(info, in_dims, *args):
            specs = list(zip(args, in_dims, event_dims, strict=True))
            # the batch rank of the broadcast: the most logical batch dimensions of any tensor
            batch_rank = max(a.dim() - (d is not None) - e for a, d, e in specs if e is not None)
            aligned = [
                a if e is None else _align_batch(a, d, e, batch_rank)
                for a, d, e in specs
            ]
            out = op(*aligned)
            out_dims = tuple(0 for _ in out) if isinstance(out, tuple) else 0
            return out, out_dims

        op.register_vmap(vmap_rule)
        KERNELS[name] = Kernel(name, fn, op, fusible)
        return KERNELS[name]

    return register
