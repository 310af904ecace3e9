"""Overhead of ``probloss.audit.NaNGuard`` on a training step when nothing goes wrong.

Two models, each trained with Adam on random data (all finite, so the guard never fires):

(a) an MLP: 32 inputs, three hidden layers of 256 (ReLU), one output, batch 512, a
    per-example squared error;
(b) an MDN-like model: a two-layer tanh trunk of 128 units and a
    ``probloss.nn.MixtureDensityHead`` (5 correlated bivariate components), batch 512,
    per-example NLL.

Each model is trained four ways, from the same initialisation: without a guard; with
``NaNGuard(model)`` (forward hooks on every submodule, parameter-gradient hooks,
``guard.loss`` and ``guard.optimizer_step``, one host read per step); the same with
``activation_grads=True`` (a gradient hook and row sum per module output as well); and
with the same calls on a disabled guard (``enabled=False``: no hooks). A sample is the wall
time of ``--block`` consecutive steps (zero_grad, forward, loss, backward, Adam step); the
variants are timed interleaved (one block of each per round) and the median over
``--repeats`` rounds is reported, with its ratio to the unguarded step.

Measured on the shared 2-core machine (torch 2.13 CPU, ``--threads 1 --repeats 41``,
three runs): MLP 4.5 ms per step, guard 1.08-1.12x, with activation gradients
1.15-1.18x, disabled 0.99-1.00x; MDN 2.8 ms, 1.10-1.12x, 1.14-1.15x, 1.00-1.01x. With
two threads the ratios were 1.16x and 1.21x (MLP), 1.10x and 1.14x (MDN).
Run: ``python benchmarks/bench_nanguard.py [--repeats 21] [--block 5] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from _timing import interleaved_medians, measure
from torch import nn

from probloss.audit.guard import NaNGuard
from probloss.nn import MixtureDensityHead

BATCH = 512


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 1),
    )


def mlp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).squeeze(-1) - y).square()  # per example, (B,)


class MDN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh())
        self.head = MixtureDensityHead(128, 2, 5, component="bivariate")

    def forward(self, x: torch.Tensor):
        return self.head(self.trunk(x))


def mdn_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -model(x).log_prob(y)  # per example, (B,)


def make_step(model, loss_fn, x, y, guard: NaNGuard | None) -> Callable[[], None]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def plain() -> None:
        optimizer.zero_grad()
        loss_fn(model, x, y).mean().backward()
        optimizer.step()

    def guarded() -> None:
        optimizer.zero_grad()
        with guard.step(inputs={"x": x, "y": y}):
            nll = guard.loss("nll", loss_fn(model, x, y))
            nll.mean().backward()
            guard.optimizer_step(optimizer)

    return plain if guard is None else guarded


def median_block_times(steps: list[Callable[[], None]], repeats: int, block: int) -> list[float]:
    """Median wall time per step of each candidate, blocks of ``block`` steps interleaved
    (one block of each as warm-up)."""

    def sampler(step: Callable[[], None]):
        return lambda: measure(lambda: [step() for _ in range(block)])

    timings = interleaved_medians([sampler(step) for step in steps], repeats)
    return [t.wall / block for t in timings]


def bench(title: str, build: Callable[[], nn.Module], loss_fn, x, y, args) -> None:
    torch.manual_seed(0)
    base = build()
    models = [copy.deepcopy(base) for _ in range(4)]
    guards = [
        None,
        NaNGuard(models[1]),
        NaNGuard(models[2], activation_grads=True),
        NaNGuard(models[3], enabled=False),
    ]
    steps = [make_step(m, loss_fn, x, y, g) for m, g in zip(models, guards, strict=True)]
    times = median_block_times(steps, args.repeats, args.block)
    print(f"\n{title}")
    print(f"{'variant':<40}{'ms/step':>10}{'ratio':>8}")
    names = (
        "no guard",
        "NaNGuard(model)",
        "NaNGuard(model, activation_grads=True)",
        "NaNGuard(model, enabled=False)",
    )
    for name, t in zip(names, times, strict=True):
        print(f"{name:<40}{1e3 * t:>10.3f}{t / times[0]:>8.3f}")
    for guard in guards[1:]:
        assert guard.last_report is None and guard.num_skipped == 0  # the data are finite
        guard.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--block", type=int, default=5, help="steps per timed sample")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, 32, generator=g), torch.randn(BATCH, generator=g)
    bench("(a) MLP 32-256-256-256-1, ReLU, Adam", mlp, mlp_loss, x, y, args)
    x, y = torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 2, generator=g)
    bench("(b) MDN: tanh trunk 8-128-128, 5 bivariate components, Adam", MDN, mdn_loss, x, y, args)


if __name__ == "__main__":
    main()
