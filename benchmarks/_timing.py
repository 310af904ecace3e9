"""Timing shared by every benchmark script: warm-up, then interleaved medians of repeats.

Interleaving the candidates (one run of each per round) gives them the same machine state:
timing them in back-to-back blocks let allocator warm-up and other load move the ratios by
2x between runs on the 2-core CI machine. Each sample records wall time and process CPU
time (all threads); on a loaded machine the CPU time is the steadier of the two.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds of one run, or the medians of several."""

    wall: float
    cpu: float  # process CPU time, every thread


def measure(run: Callable[[], object]) -> Timing:
    """Wall and CPU seconds of one ``run()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def interleaved_medians(
    samplers: Sequence[Callable[[], Timing]], repeats: int, *, warmup: int = 1
) -> list[Timing]:
    """Median wall and CPU times of each sampler, one sample of each per round.

    A sampler returns the :class:`Timing` of one run it makes, so that what it prepares
    (fresh leaves, say) stays outside the clock; ``lambda: measure(run)`` times all of
    ``run``. Each sampler first runs ``warmup`` times untimed (allocator, thread pool,
    lazy initialisation, ``torch.compile``).
    """
    for sampler in samplers:
        for _ in range(warmup):
            sampler()
    samples: list[list[Timing]] = [[] for _ in samplers]
    for _ in range(repeats):
        for sampler, timings in zip(samplers, samples, strict=True):
            timings.append(sampler())
    return [
        Timing(statistics.median(t.wall for t in ts), statistics.median(t.cpu for t in ts))
        for ts in samples
    ]


def forward_backward(
    fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], *, grad_from: int = 0
) -> Timing:
    """Time of one ``fn(*inputs).sum().backward()``, ``inputs[grad_from:]`` as fresh leaves
    (made before the clock starts)."""
    leaves = [t if i < grad_from else t.detach().requires_grad_(True) for i, t in enumerate(inputs)]
    return measure(lambda: fn(*leaves).sum().backward())


def median_timings(
    fns: Sequence[Callable[..., torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    repeats: int,
    *,
    grad_from: int = 0,
) -> list[Timing]:
    """Median forward+backward times of several functions on the same inputs, interleaved."""
    samplers = [lambda fn=fn: forward_backward(fn, inputs, grad_from=grad_from) for fn in fns]
    return interleaved_medians(samplers, repeats)


def median_times(
    fns: Sequence[Callable[..., torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    repeats: int,
    *,
    grad_from: int = 0,
) -> list[float]:
    """The wall seconds of :func:`median_timings`."""
    return [t.wall for t in median_timings(fns, inputs, repeats, grad_from=grad_from)]
