"""Timing shared by the benchmark scripts: interleaved medians of forward+backward passes.

Interleaving the candidates (one run of each per round) gives them the same machine state:
timing them in back-to-back blocks let allocator warm-up and other load move the ratios by
2x between runs on the 2-core CI machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def forward_backward(
    fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], *, grad_from: int = 0
) -> float:
    """Wall time (s) of one ``fn(*inputs).sum().backward()``, ``inputs[grad_from:]`` as leaves."""
    leaves = [t if i < grad_from else t.detach().requires_grad_(True) for i, t in enumerate(inputs)]
    start = time.perf_counter()
    fn(*leaves).sum().backward()
    return time.perf_counter() - start


def median_times(
    fns: Sequence[Callable[..., torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    repeats: int,
    *,
    grad_from: int = 0,
) -> list[float]:
    """Median forward+backward times of several functions, run interleaved."""
    for fn in fns:  # warm-up (allocator, thread pool, lazy initialisation)
        forward_backward(fn, inputs, grad_from=grad_from)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, samples, strict=True):
            times.append(forward_backward(fn, inputs, grad_from=grad_from))
    return [statistics.median(times) for times in samples]
