"""Forward+backward time and peak memory of probloss' mixture log densities.

(a) diagonal normal mixture (a mixture density network head):
    ``normal_mixture_log_prob`` (fused kernel, and ``fused=False``) against
    ``torch.distributions.MixtureSameFamily(Categorical(logits), Independent(Normal(loc,
    exp(log_scale)), 1))`` and a hand-written eager log-sum-exp
    (``logsumexp(log_softmax(logits) + sum_d(-z^2/2 - log_scale) - D/2 log 2 pi)``);
(b) bivariate normal mixture with correlation (Graves 2013, sketch-rnn):
    ``bivariate_normal_mixture_log_prob`` against ``MixtureSameFamily(Categorical(logits),
    MultivariateNormal(loc, scale_tril=L))`` with ``L = [[sx, 0], [rho sy, sy sqrt(1 -
    rho^2)]]`` and against the hand-written eager log-space sketch-rnn formula.

Inputs are well conditioned (every method is finite on them): ``loc ~ N(0, 1)``,
``log_scale ~ 0.3 N(0, 1)``, ``atanh_rho ~ U(-3, 3)``, targets near the means. Defaults:
B = 65536 events, K = 16 components, D = 2, float32, as an MDN training step would see.

What is measured, per method, in one run:

* time: the median over ``--repeats`` of the wall-clock time of one
  ``fn(value, *params).sum().backward()`` with fresh leaves for every parameter (the
  target ``value`` is data, no gradient). The methods are run interleaved (one call of
  each per round) so they share machine conditions; "cpu ms" is the median process CPU
  time of the same calls (all threads), steadier than wall time on a loaded machine.
  "x slower" is the time over probloss' fused time.
* peak MB: the largest total size of live tensors allocated by torch's CPU allocator
  during one forward+backward, above the level before it (the inputs), from the
  allocation events of ``torch.profiler(profile_memory=True)``. It counts autograd's
  saved tensors, temporaries and the gradients produced; not Python objects or memory the
  C library keeps cached. (``tracemalloc`` does not see torch's allocations.)

Run: ``python benchmarks/bench_mixture.py [--batch 65536] [--components 16]
[--repeats 31] [--threads 2] [--compile]``. ``--compile`` adds the hand-written formulas
compiled by ``torch.compile``. On a shared machine, compare the "cpu ms" column and rerun
when the load average (printed before and after) is high.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

import torch
from _timing import median_timings
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from probloss.functional.mixture import (
    bivariate_normal_mixture_log_prob,
    normal_mixture_log_prob,
)

_LOG_2PI = math.log(2.0 * math.pi)

Method = Callable[..., torch.Tensor]

# --- (a) diagonal normal mixture -------------------------------------------------------


def normal_fused(x, logits, loc, log_scale):
    return normal_mixture_log_prob(x, logits, loc, log_scale)


def normal_plain(x, logits, loc, log_scale):
    return normal_mixture_log_prob(x, logits, loc, log_scale, fused=False)


def normal_torch(x, logits, loc, log_scale):
    components = Independent(Normal(loc, log_scale.exp()), 1)
    return MixtureSameFamily(Categorical(logits=logits), components).log_prob(x)


def normal_eager(x, logits, loc, log_scale):
    """The usual hand-written log-space MDN loss (finite, unlike the pdf-product form)."""
    z = (x.unsqueeze(-2) - loc) * torch.exp(-log_scale)
    component = (-0.5 * z * z - log_scale).sum(-1) - 0.5 * x.shape[-1] * _LOG_2PI
    return torch.logsumexp(torch.log_softmax(logits, -1) + component, -1)


# --- (b) bivariate normal mixture ------------------------------------------------------


def bivariate_fused(x, logits, loc, log_scale, atanh_rho):
    return bivariate_normal_mixture_log_prob(x, logits, loc, log_scale, atanh_rho)


def bivariate_plain(x, logits, loc, log_scale, atanh_rho):
    return bivariate_normal_mixture_log_prob(x, logits, loc, log_scale, atanh_rho, fused=False)


def bivariate_torch(x, logits, loc, log_scale, atanh_rho):
    sx, sy = log_scale.exp().unbind(-1)
    rho = torch.tanh(atanh_rho)
    zero = torch.zeros_like(sx)
    tril = torch.stack((sx, zero, rho * sy, sy * torch.sqrt(1 - rho * rho)), -1)
    components = MultivariateNormal(loc, scale_tril=tril.unflatten(-1, (2, 2)))
    return MixtureSameFamily(Categorical(logits=logits), components).log_prob(x)


def bivariate_eager(x, logits, loc, log_scale, atanh_rho):
    """sketch-rnn's offset likelihood written in log space (breaks at |rho| -> 1)."""
    sx, sy = log_scale.exp().unbind(-1)
    rho = torch.tanh(atanh_rho)
    dx, dy = (x.unsqueeze(-2) - loc).unbind(-1)
    zx, zy = dx / sx, dy / sy
    one_minus = 1 - rho * rho
    q = (zx * zx + zy * zy - 2 * rho * zx * zy) / one_minus
    component = -0.5 * q - _LOG_2PI - log_scale.sum(-1) - 0.5 * torch.log(one_minus)
    return torch.logsumexp(torch.log_softmax(logits, -1) + component, -1)


# --- measurement -----------------------------------------------------------------------


def peak_megabytes(fn: Method, inputs: tuple[torch.Tensor, ...]) -> float | None:
    """Peak MB of live tensors allocated during one forward+backward (profiler events)."""
    try:
        from torch._C._profiler import _EventType
    except ImportError:  # pragma: no cover - private API of torch's profiler
        return None
    value, *params = inputs
    leaves = [p.detach().requires_grad_(True) for p in params]
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn(value, *leaves).sum().backward()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:  # alloc_size < 0 is a free
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak / 2**20


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp(min=1.0)).max())


def report(title: str, rows: list[tuple[str, Method]], inputs, repeats: int) -> dict:
    """Time and measure the rows; the first row is probloss' fused kernel (the reference)."""
    print(f"\n{title}")
    reference = rows[0][1](*inputs).detach()
    for name, fn in rows[1:]:
        diff = max_relative_difference(fn(*inputs).detach(), reference)
        print(f"  {name:<40} max |diff| / max(1, |value|) vs fused: {diff:.1e}")
    times = median_timings([fn for _, fn in rows], inputs, repeats, grad_from=1)
    peaks = [peak_megabytes(fn, inputs) for _, fn in rows]
    wall0, cpu0 = times[0].wall, times[0].cpu
    print(f"{'method':<42}{'wall ms':>9}{'x slower':>9}{'cpu ms':>9}{'x slower':>9}{'peak MB':>9}")
    for (name, _), timing, peak in zip(rows, times, peaks, strict=True):
        wall, cpu = timing.wall, timing.cpu
        peak_text = "n/a" if peak is None else f"{peak:.1f}"
        print(
            f"{name:<42}{1e3 * wall:>9.2f}{wall / wall0:>9.2f}"
            f"{1e3 * cpu:>9.2f}{cpu / cpu0:>9.2f}{peak_text:>9}"
        )
    measured = zip(rows, times, peaks, strict=True)
    return {name: (t.wall, t.cpu, peak) for (name, _), t, peak in measured}


def targets(results: dict, fused: str, torch_name: str, eager_name: str) -> None:
    """Print the three targets: >= 5x torch.distributions, >= 1.5x eager, <= 1/2 memory."""
    f_wall, f_cpu, f_peak = results[fused]
    t_wall, t_cpu, t_peak = results[torch_name]
    e_wall, e_cpu, _ = results[eager_name]
    print(
        f"  speed-up vs torch.distributions: {t_wall / f_wall:.2f}x wall, "
        f"{t_cpu / f_cpu:.2f}x cpu (target >= 5)"
    )
    print(
        f"  speed-up vs hand-written eager:  {e_wall / f_wall:.2f}x wall, "
        f"{e_cpu / f_cpu:.2f}x cpu (target >= 1.5)"
    )
    if f_peak is not None and t_peak:
        print(f"  peak memory / torch.distributions': {f_peak / t_peak:.2f} (target <= 0.5)")


def compiled_row(name: str, fn: Method, enabled: bool) -> list[tuple[str, Method]]:
    """``[(name, torch.compile(fn))]`` when asked for, else ``[]``.

    The compiled formula is what a user gets from fusing the plain formula with the best tool
    PyTorch ships (inductor: one generated C++ loop nest per fused region, forward and
    backward). Compilation happens in the first call, the warm-up, outside the timings.
    """
    return [(name, torch.compile(fn, dynamic=False))] if enabled else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=65536, help="events B")
    parser.add_argument("--components", type=int, default=16, help="mixture components K")
    parser.add_argument("--dim", type=int, default=2, help="event size D of (a)")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the hand-written formulas compiled by torch.compile (inductor, C++ "
        "through the system compiler; about 25 s of compilation per formula)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, k, d = args.batch, args.components, args.dim
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"B = {b}, K = {k}, repeats = {args.repeats}, "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )

    logits = torch.randn(b, k)
    loc = torch.randn(b, k, d)
    log_scale = 0.3 * torch.randn(b, k, d)
    pick = torch.randint(k, (b, 1, 1)).expand(b, 1, d)
    x = loc.gather(1, pick).squeeze(1) + torch.randn(b, d)
    normal = report(
        f"(a) diagonal normal mixture, D = {d}",
        [
            ("probloss normal_mixture_log_prob (fused)", normal_fused),
            ("probloss fused=False (plain autograd)", normal_plain),
            ("torch MixtureSameFamily(Normal)", normal_torch),
            ("hand-written eager log-sum-exp", normal_eager),
            *compiled_row("hand-written log-sum-exp, torch.compile", normal_eager, args.compile),
        ],
        (x, logits, loc, log_scale),
        args.repeats,
    )
    targets(
        normal,
        "probloss normal_mixture_log_prob (fused)",
        "torch MixtureSameFamily(Normal)",
        "hand-written eager log-sum-exp",
    )

    loc2 = torch.randn(b, k, 2)
    log_scale2 = 0.3 * torch.randn(b, k, 2)
    atanh_rho = 6.0 * torch.rand(b, k) - 3.0  # |rho| <= tanh(3) = 0.995
    pick = torch.randint(k, (b, 1, 1)).expand(b, 1, 2)
    x2 = loc2.gather(1, pick).squeeze(1) + 0.5 * torch.randn(b, 2)
    bivariate = report(
        "(b) bivariate normal mixture with correlation",
        [
            ("probloss bivariate_normal_mixture (fused)", bivariate_fused),
            ("probloss fused=False (plain autograd)", bivariate_plain),
            ("torch MixtureSameFamily(MVN scale_tril)", bivariate_torch),
            ("hand-written eager sketch-rnn formula", bivariate_eager),
            *compiled_row("hand-written sketch-rnn, torch.compile", bivariate_eager, args.compile),
        ],
        (x2, logits, loc2, log_scale2, atanh_rho),
        args.repeats,
    )
    targets(
        bivariate,
        "probloss bivariate_normal_mixture (fused)",
        "torch MixtureSameFamily(MVN scale_tril)",
        "hand-written eager sketch-rnn formula",
    )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
