r"""User story: "why does my loss turn NaN at step 40?", answered by :class:`NaNGuard`.

A small trajectory model, the kind used for handwriting and sketches (Graves 2013,
arXiv:1308.0850; sketch-rnn, Ha & Eck 2017, arXiv:1704.03477), predicts a bivariate
Gaussian over the next pen offset from the previous one: an MLP (two tanh layers of 64
units) outputs :math:`\mu_x, \mu_y, \log\sigma_x, \log\sigma_y` and a raw correlation
:math:`a` with :math:`\rho = \tanh a`.

Built-in synthetic data: the previous offset has a random direction :math:`\theta` and
length in :math:`[0.5, 1.5]`; the next one continues it, with noise of sd 0.2 along the
stroke and 0.01 across it (so the offsets are strongly correlated for diagonal strokes),
except for rare pen-up jumps (0.2% of the points) to a uniform point of
:math:`[-5, 5]^2`.

The model is trained twice with the same seed, data, batches, initialisation and Adam
settings, both times under ``NaNGuard(policy="raise")``:

1. with the loss as users write it, in probability space (Graves eqs. 24-25):
   :math:`-\log\big(\exp(-\tfrac{Z}{2(1-\rho^2)}) / (2\pi\sigma_x\sigma_y
   \sqrt{1-\rho^2})\big)`. Once the model has learnt the narrow, correlated bulk, a jump
   lies hundreds of standard deviations away: the density is below float32's smallest
   positive number (:math:`e^{-103.3}`), ``exp`` returns 0 and ``-log 0 = inf``; or, for
   a point a little closer, the density is a subnormal number (below :math:`e^{-87.3}`):
   the loss is finite but its gradient :math:`-1/p` overflows. The guard stops the run at
   that step and prints which loss term (or gradient), which rows, that every module
   output was finite (the loss computation did it), and the inputs and model outputs at
   those rows; the demo adds the log-space NLL at those rows, which says which of the two
   happened;
2. with :func:`probloss.functional.bivariate_normal_nll` from ``log_scale`` and
   ``atanh_rho`` (the same network outputs): in log space the far point costs a large
   but finite loss, and training runs through.

A figure of both loss curves is written to ``out/nan_loss_curves.png``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..audit.guard import NaNGuard, NonFiniteError, NonFiniteReport
from ..audit.naive import naive_bivariate_normal_nll
from ..functional.bivariate import bivariate_normal_nll
from ._common import (
    Progress,
    isolated_cpu_run,
    run_demo,
)

FIGURE = "nan_loss_curves.png"
ALONG, ACROSS = 0.2, 0.01  # noise sd along and across the stroke direction
JUMP_PROBABILITY, JUMP_BOX = 0.002, 5.0
_F32 = torch.finfo(torch.float32)
LOG_TINY_F32 = math.log(_F32.tiny * _F32.eps)  # the smallest subnormal, e^-103.3
LOG_NORMAL_F32 = math.log(_F32.tiny)  # the smallest normal number, e^-87.3
LOG_MAX_F32 = math.log(_F32.max)  # e^88.7


@dataclass(frozen=True)
class Settings:
    num_points: int
    batch_size: int
    steps: int
    hidden: int
    lr: float


FULL = Settings(num_points=8192, batch_size=256, steps=1000, hidden=64, lr=5e-4)
QUICK = Settings(num_points=4096, batch_size=256, steps=200, hidden=64, lr=5e-4)


def pen_offsets(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(previous, next)`` pen offsets, each ``(n, 2)`` (see the module docstring).

    Example:
        >>> previous, following = pen_offsets(1000, torch.Generator().manual_seed(0))
        >>> previous.shape, bool((previous.norm(dim=-1) - 1.0).abs().max() <= 0.5)
        (torch.Size([1000, 2]), True)
    """
    theta = torch.rand(n, generator=generator) * (2.0 * math.pi)
    along = torch.stack([theta.cos(), theta.sin()], -1)
    across = torch.stack([-theta.sin(), theta.cos()], -1)
    previous = (0.5 + torch.rand(n, 1, generator=generator)) * along
    noise = ALONG * torch.randn(n, 1, generator=generator) * along
    noise = noise + ACROSS * torch.randn(n, 1, generator=generator) * across
    jump = torch.rand(n, 1, generator=generator) < JUMP_PROBABILITY
    far = (2.0 * torch.rand(n, 2, generator=generator) - 1.0) * JUMP_BOX
    return previous, torch.where(jump, far, previous + noise)


class TrajectoryMLP(nn.Module):
    """Previous offset ``(B, 2)`` to ``(B, 5)``: ``mu (2), log_sigma (2), atanh_rho``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.head = nn.Linear(hidden, 5)

    def forward(self, previous: Tensor) -> Tensor:
        return self.head(self.trunk(previous))


def naive_nll(out: Tensor, offset: Tensor) -> Tensor:
    r"""The per-point loss as usually written: the density in probability space, then -log.

    .. math::
        \ell = -\log\frac{\exp\!\big(-Z / (2(1-\rho^2))\big)}
            {2\pi\sigma_x\sigma_y\sqrt{1-\rho^2}}, \qquad
        Z = z_x^2 + z_y^2 - 2\rho z_x z_y

    (Graves 2013 eqs. 24-25): :func:`probloss.audit.naive.naive_bivariate_normal_nll` of
    ``out`` ``(B, 5)`` = ``mu (2), log_sigma (2), raw`` with :math:`\rho = \tanh(\text{raw})`;
    ``offset`` ``(B, 2)``; returns ``(B,)``.

    Example:
        >>> out = torch.tensor([[0.0, 0.0, -1.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
        >>> offset = torch.tensor([[4.0, -3.0], [0.5, 0.5]])
        >>> naive_nll(out, offset)  # the first density is below 1.4e-45: exp gives 0
        tensor([   inf, 2.0879])
        >>> probloss_nll(out, offset)
        tensor([169.2631,   2.0879])
    """
    return naive_bivariate_normal_nll(offset, out[:, :2], out[:, 2:4], out[:, 4])


def probloss_nll(out: Tensor, offset: Tensor) -> Tensor:
    """The same loss in log space, from the same outputs read as log-scales and atanh(rho):
    :func:`probloss.functional.bivariate_normal_nll` with ``reduction="none"``, ``(B,)``."""
    return bivariate_normal_nll(offset, out[:, :2], out[:, 2:4], out[:, 4], reduction="none")


@dataclass
class Run:
    """One training run: batch NLLs, and the guard's report if it stopped the run."""

    name: str
    losses: list[float] = field(default_factory=list)
    report: NonFiniteReport | None = None
    final_nll: float = math.nan


def train(loss_fn, settings: Settings, seed: int, name: str, progress: Progress) -> Run:
    """Adam on shuffled minibatches under ``NaNGuard(policy="raise")``; stop at its error."""
    data = torch.Generator().manual_seed(seed)
    previous, offset = pen_offsets(settings.num_points, data)
    torch.manual_seed(seed)
    model = TrajectoryMLP(settings.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    batches = torch.Generator().manual_seed(seed + 1)
    per_epoch = settings.num_points // settings.batch_size
    run = Run(name)
    losses: list[Tensor] = []  # kept on the device: no host read per step beyond the guard's
    order = torch.randperm(settings.num_points, generator=batches)
    with NaNGuard(model, policy="raise") as guard:
        for step in progress(range(settings.steps), desc=name, leave=False):
            if step % per_epoch == 0:
                order = torch.randperm(settings.num_points, generator=batches)
            rows = order[(step % per_epoch) * settings.batch_size :][: settings.batch_size]
            x, y = previous[rows], offset[rows]
            optimizer.zero_grad()
            try:
                with guard.step(step, inputs={"previous_offset": x, "offset": y}):
                    nll = guard.loss("nll", loss_fn(model(x), y))
                    loss = nll.mean()
                    loss.backward()
                    guard.optimizer_step(optimizer)
            except NonFiniteError as error:
                run.report = error.report
                break
            finally:
                losses.append(loss.detach())
    run.losses = torch.stack(losses).tolist()
    if run.report is None:
        with torch.no_grad():
            run.final_nll = float(loss_fn(model(previous), offset).mean())
    return run


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(figure_cls, runs: list[Run], settings: Settings, path: Path) -> None:
    """Left: the first steps, both runs (identical until the naive one breaks). Right: the
    whole probloss run, batch NLL and its moving average."""
    fig = figure_cls(figsize=(11, 4.2), layout="tight")
    left, right = fig.subplots(1, 2)
    naive, ours = runs
    stop = len(naive.losses) - 1 if naive.report is not None else None
    shown = min(len(ours.losses), 3 * (stop or 30) + 1)
    # the naive curve wide and underneath: until it breaks it is the probloss curve
    naive_finite = [v if math.isfinite(v) else math.nan for v in naive.losses]
    left.plot(naive_finite, c="tab:red", lw=4, alpha=0.5, label="naive (probability space)")
    left.plot(ours.losses[:shown], c="tab:blue", lw=1, label="probloss bivariate_normal_nll")
    if stop is not None:
        last = next((v for v in reversed(naive_finite) if math.isfinite(v)), 0.0)
        left.scatter([stop], [last], marker="X", s=120, c="k", zorder=5)
        left.annotate(
            f"naive loss = inf at step {stop}:\nNaNGuard stopped the run",
            (stop, last),
            xytext=(14, 20),
            textcoords="offset points",
            fontsize=9,
            bbox={"boxstyle": "round", "fc": "white", "alpha": 0.9},
        )
    left.set(
        xlabel=f"Adam step (batch {settings.batch_size})",
        ylabel="batch NLL (nats per offset)",
        title="The first steps: the same run until the naive loss breaks",
    )
    left.legend(fontsize=9)
    window = max(1, min(50, len(ours.losses) // 10))
    right.plot(ours.losses, c="tab:blue", lw=0.6, alpha=0.35, label="batch NLL")
    right.plot(_moving_average(ours.losses, window), c="tab:blue", lw=2, label=f"mean of {window}")
    right.set(
        xlabel=f"Adam step (batch {settings.batch_size})",
        ylabel="NLL (nats per offset)",
        title="probloss: trains through (spikes: batches with a pen-up jump)",
    )
    right.legend(fontsize=9)
    fig.savefig(path, dpi=110)


def _explain(report: NonFiniteReport) -> str:
    """Why the naive loss failed at the offending rows, from the log-space NLL of the model
    outputs shown in the report."""
    out = torch.tensor(report.values["output"])
    offset = torch.tensor(report.values["offset"])
    exact = probloss_nll(out, offset).tolist()
    worst = max(exact)
    values = ", ".join(f"{v:.1f}" for v in exact)
    text = f"probloss's NLL of the same outputs at these rows: {values} nats. "
    if worst > -LOG_TINY_F32:
        return text + (
            f"A density of e^-{worst:.1f} is below float32's smallest positive number "
            f"(e^{LOG_TINY_F32:.1f}): exp() returned 0 and -log(0) = inf."
        )
    return text + (
        f"A density of e^-{worst:.1f} is a float32 subnormal (below e^{LOG_NORMAL_F32:.1f}): "
        f"the forward value survives, but the gradient of -log(pdf), -1/pdf = -e^{worst:.1f}, "
        f"overflows float32 (largest e^{LOG_MAX_F32:.1f}): the gradient is not finite."
    )


def run(*, quick: bool = False, out: str | Path = "probloss-demo", seed: int = 0) -> int:
    """Train with the naive and the probloss loss, print the guard's report, plot both.

    Args:
        quick: a short form for CI (fewer points and steps; under a minute).
        out: output directory for the figure (created if missing).
        seed: seed of the data, the batches and the initialisation.

    Returns:
        0 if the naive run went non-finite and the guard caught it while the probloss run
        finished finite; 1 otherwise; 2 if matplotlib or tqdm is missing.
    """
    settings = QUICK if quick else FULL
    return run_demo("nan", out, functools.partial(_train_and_report, settings, seed))


def _train_and_report(
    settings: Settings, seed: int, figure_cls: type, progress: Progress, out: Path
) -> int:
    """Both runs, the guard's report and the figure; the exit status of :func:`run`."""
    print(
        f"A trajectory model (MLP -> bivariate Gaussian over the next pen offset) on "
        f"{settings.num_points} synthetic offsets ({100 * JUMP_PROBABILITY:.1f}% pen-up "
        f"jumps), batch {settings.batch_size}, Adam lr {settings.lr:g}, float32, seed {seed}, "
        f"up to {settings.steps} steps, under NaNGuard(policy='raise').\n"
    )
    with isolated_cpu_run():  # tiny tensors: one thread
        naive = train(naive_nll, settings, seed, "naive", progress)
        ours = train(probloss_nll, settings, seed, "probloss", progress)

    print("1) naive loss  -log(exp(-Z / (2(1 - rho^2))) / (2 pi sx sy sqrt(1 - rho^2)))")
    if naive.report is None:
        print(f"   trained {len(naive.losses)} steps without a non-finite value (unexpected)")
    else:
        step = naive.report.step
        epoch = step // (settings.num_points // settings.batch_size)
        print(f"   NaNGuard stopped the run at step {step} (epoch {epoch}):\n")
        print("\n".join("   " + line for line in str(naive.report).splitlines()))
        if "output" in naive.report.values and "offset" in naive.report.values:
            print("\n   " + _explain(naive.report))
    print("\n2) probloss.functional.bivariate_normal_nll(offset, mu, log_sigma, atanh_rho)")
    finite = all(math.isfinite(v) for v in ours.losses) and math.isfinite(ours.final_nll)
    if ours.report is None:
        print(
            f"   same model, data, batches and optimizer: {len(ours.losses)} steps, every "
            f"loss finite; final NLL {ours.final_nll:.3f} nats per offset over all "
            f"{settings.num_points} points (a density: it can be negative)"
        )
    else:
        print("   NaNGuard stopped this run too (unexpected):\n" + str(ours.report))

    path = out / FIGURE
    plot(figure_cls, [naive, ours], settings, path)
    print(f"\nfigure written to {path}")
    return 0 if naive.report is not None and ours.report is None and finite else 1
