"""Figures of the MDN demo (:mod:`probloss.demos.mdn`), drawn on matplotlib ``Figure`` objects.

Each function takes the ``Figure`` class (no pyplot: no global backend switch, nothing left
open), the tasks, the trained models keyed by ``(task name, "MSE" | "MDN")`` and the
output path.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ._common import to_numpy as _np  # short: the plotting calls take several
from .mdn_tasks import SPIRAL_TURNS, Task

LOG_DENSITY_FLOOR = -8.0  # heatmaps: log densities below this share the darkest colour


def _labels(task: Task) -> tuple[str, str]:
    return ("x", "y") if task.name == "forward" else ("y (input)", "x (target)")


def _grid_log_density(model: nn.Module, task: Task, inputs: Tensor, targets: Tensor) -> Tensor:
    """log p(target | input) in data units, shape ``(len(targets), len(inputs))`` (D = 1)."""
    mixture = model(inputs[:, None] / task.x_scale)
    values = (targets / task.y_scale)[:, None, None]  # (T, 1, 1) against batch (N,)
    return mixture.log_prob(values) - math.log(task.y_scale)


@torch.no_grad()
def plot_data_and_mse(figure_cls, tasks: list[Task], models: dict, path: Path) -> None:
    fig = figure_cls(figsize=(15, 4.6), layout="tight")
    axes = fig.subplots(1, 3)
    for ax, task in zip(axes, tasks, strict=True):
        mse = models[task.name, "MSE"]
        if task.dim == 1:
            x, y = _np(task.x_test[:, 0]), _np(task.y_test[:, 0])
            ax.scatter(x, y, s=3, c="0.6", label="test data")
            grid = torch.linspace(float(task.x_test.min()), float(task.x_test.max()), 400)
            pred = mse(grid[:, None] / task.x_scale)[:, 0] * task.y_scale
            half = float(torch.special.ndtri(torch.tensor(0.95))) * float(mse.sigma[0])
            half *= task.y_scale
            ax.plot(_np(grid), _np(pred), c="tab:red", lw=2, label="MSE fit (conditional mean)")
            ax.fill_between(
                _np(grid), _np(pred - half), _np(pred + half), color="tab:red", alpha=0.15,
                label="MSE Gaussian 90% interval",
            )  # fmt: skip
            xlabel, ylabel = _labels(task)
        else:
            ax.scatter(*_np(task.y_test).T, s=3, c="0.6", label="test data")
            t = torch.linspace(0, 2 * math.pi, 400)
            pred = mse(torch.stack([torch.cos(t), torch.sin(t)], -1) / task.x_scale)
            pred = pred * task.y_scale
            ax.plot(*_np(pred).T, c="tab:red", lw=2, label="MSE prediction per direction")
            ax.set_aspect("equal")
            xlabel, ylabel = "point x", "point y"
        ax.set(title=task.title, xlabel=xlabel, ylabel=ylabel)
        ax.legend(loc="upper left", fontsize=8, markerscale=3)
    fig.suptitle(
        "Plain MSE regression: fine on the forward task, useless where the target is multi-valued"
    )
    fig.savefig(path, dpi=110)


@torch.no_grad()
def plot_mdn_density(figure_cls, tasks: list[Task], models: dict, path: Path) -> None:
    fig = figure_cls(figsize=(13, 5.2), layout="tight")
    axes = fig.subplots(1, 2)
    for ax, task in zip(axes, tasks[:2], strict=True):
        mdn, mse = models[task.name, "MDN"], models[task.name, "MSE"]
        lo_x, hi_x = float(task.x_test.min()), float(task.x_test.max())
        lo_y, hi_y = float(task.y_test.min()) - 2, float(task.y_test.max()) + 2
        inputs = torch.linspace(lo_x, hi_x, 300)
        targets = torch.linspace(lo_y, hi_y, 300)
        # display only (no gradient): the colour scale stops at the floor
        log_p = _grid_log_density(mdn, task, inputs, targets).clamp(min=LOG_DENSITY_FLOOR)
        image = ax.pcolormesh(_np(inputs), _np(targets), _np(log_p), cmap="viridis", shading="auto")
        fig.colorbar(image, ax=ax, label=f"log p(target | input), floored at {LOG_DENSITY_FLOOR:g}")
        u = torch.rand(600) * (hi_x - lo_x) + lo_x
        samples = mdn(u[:, None] / task.x_scale).sample()[:, 0] * task.y_scale
        ax.scatter(
            _np(u), _np(samples), s=4, c="white", edgecolors="none", label="samples from the MDN"
        )
        pred = mse(inputs[:, None] / task.x_scale)[:, 0] * task.y_scale
        ax.plot(_np(inputs), _np(pred), "--", c="tab:red", lw=1.5, label="MSE fit")
        ax.set(xlim=(lo_x, hi_x), ylim=(lo_y, hi_y))
        xlabel, ylabel = _labels(task)
        ax.set(title=f"MDN, {task.title}", xlabel=xlabel, ylabel=ylabel)
        ax.legend(loc="upper left", fontsize=8, markerscale=3, facecolor="0.85")
    fig.suptitle("MDN conditional density (heatmap) and samples drawn from it (white)")
    fig.savefig(path, dpi=110)


@torch.no_grad()
def plot_spiral(figure_cls, task: Task, models: dict, path: Path) -> None:
    mdn, mse = models[task.name, "MDN"], models[task.name, "MSE"]
    angles = (60.0, 200.0, 300.0)  # 3, 2 and 2 crossings of the ray with the spiral
    fig = figure_cls(figsize=(4.2 * (1 + len(angles)), 4.6), layout="tight")
    axes = fig.subplots(1, 1 + len(angles))
    lim = 3.2
    data = _np(task.y_test).T
    ax = axes[0]
    ax.scatter(*data, s=3, c="0.6", label="test data")
    samples = mdn(task.x_test / task.x_scale).sample() * task.y_scale
    ax.scatter(*_np(samples).T, s=3, c="tab:blue", label="MDN sample per direction")
    mse_pred = mse(task.x_test / task.x_scale) * task.y_scale
    ax.scatter(*_np(mse_pred).T, s=3, c="tab:red", label="MSE prediction")
    ax.set(title="one MDN sample per test direction", xlabel="point x", ylabel="point y")
    ax.legend(loc="upper left", fontsize=7, markerscale=3)
    grid = torch.linspace(-lim, lim, 250)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    points = torch.stack([gx, gy], -1) / task.y_scale  # (250, 250, 2)
    for ax, deg in zip(axes[1:], angles, strict=True):
        t = math.radians(deg)
        direction = torch.tensor([[math.cos(t), math.sin(t)]])
        mixture = mdn(direction / task.x_scale)  # batch shape (1,)
        log_p = mixture.log_prob(points[:, :, None, :])[..., 0] - 2 * math.log(task.y_scale)
        ax.pcolormesh(
            # display only (no gradient): the colour scale stops at the floor
            _np(gx), _np(gy), _np(log_p.clamp(min=LOG_DENSITY_FLOOR)), cmap="viridis",
            shading="auto",
        )  # fmt: skip
        ax.scatter(*data, s=1, c="0.8", alpha=0.5)
        ax.plot([0, 2 * lim * math.cos(t)], [0, 2 * lim * math.sin(t)], c="w", lw=0.8, ls=":")
        s = mixture.sample((150,))[:, 0] * task.y_scale
        ax.scatter(*_np(s).T, s=5, c="white", edgecolors="none", label="MDN samples")
        m = _np(mse(direction / task.x_scale)[0] * task.y_scale)
        ax.scatter([m[0]], [m[1]], marker="x", s=60, c="tab:red", label="MSE prediction")
        ax.set(title=f"log p(point | direction {deg:g}°)", xlabel="point x", ylabel="point y")
        ax.legend(loc="upper left", fontsize=7, facecolor="0.85")
    for ax in axes:
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    fig.suptitle(
        f"Spiral ({SPIRAL_TURNS:g} turns): given a direction, the point lies on one of 2-3 arms "
        "(dotted: the ray of that direction)"
    )
    fig.savefig(path, dpi=110)


def plot_loss_curves(figure_cls, tasks: list[Task], path: Path) -> None:
    fig = figure_cls(figsize=(5 * len(tasks), 4), layout="tight")
    axes = fig.subplots(1, len(tasks))
    colors = {"MSE": "tab:red", "MDN": "tab:blue"}
    for ax, task in zip(axes, tasks, strict=True):
        for kind, curve in task.curves.items():
            steps, train_nll, test_nll = zip(*curve, strict=True)
            ax.plot(steps, train_nll, c=colors[kind], label=f"{kind} train")
            ax.plot(steps, test_nll, c=colors[kind], ls="--", label=f"{kind} test")
        finals = [c[-1][2] for c in task.curves.values()] + [c[-1][1] for c in task.curves.values()]
        first = max(c[0][1] for c in task.curves.values())
        ax.set_ylim(min(finals) - 0.3, max(first, max(finals)) + 0.3)
        ax.set(title=task.title, xlabel="Adam step (full batch)", ylabel="NLL (nats per point)")
        ax.legend(fontsize=8)
    fig.suptitle("Training: NLL per point (MSE model: Gaussian with the residual variance)")
    fig.savefig(path, dpi=110)
