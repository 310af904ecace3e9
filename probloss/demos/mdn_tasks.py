r"""The data of the MDN demo (:mod:`probloss.demos.mdn`): three built-in regression tasks.

``forward`` and ``inverse``: Bishop's toy problem :math:`y = x + 7 \sin(0.75 x) + \varepsilon`
and its inverse (multi-valued); ``spiral``: a 2-D point given its direction, on a
2.5-turn Archimedean spiral. See the demo's docstring for what each shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Task:
    """One regression problem: inputs, targets, and the fixed scales used for training."""

    name: str
    title: str
    x_train: Tensor  # (N, in)
    y_train: Tensor  # (N, D)
    x_test: Tensor
    y_test: Tensor
    y_scale: float  # targets are divided by this for training; NLLs are in data units
    num_components: int
    component: str
    x_scale: float = 1.0
    curves: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.y_train.shape[-1]


def bishop_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``x ~ U(-10.5, 10.5)``, ``y = x + 7 sin(0.75 x) + N(0, 1)``, each of shape ``(n, 1)``."""
    x = torch.rand(n, 1, generator=generator) * 21.0 - 10.5
    y = x + 7.0 * torch.sin(0.75 * x) + torch.randn(n, 1, generator=generator)
    return x, y


SPIRAL_TURNS = 2.5
SPIRAL_NOISE = 0.08


def spiral_radius(t: Tensor) -> Tensor:
    return 0.3 + t / (2.0 * math.pi)  # one unit of radius per turn


def spiral_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Direction ``(cos t, sin t)`` and noisy point ``r(t) (cos t, sin t) + noise``."""
    t = torch.rand(n, generator=generator) * (2.0 * math.pi * SPIRAL_TURNS)
    direction = torch.stack([torch.cos(t), torch.sin(t)], dim=-1)
    point = spiral_radius(t)[:, None] * direction
    point = point + SPIRAL_NOISE * torch.randn(n, 2, generator=generator)
    return direction, point


def make_tasks(n_train: int, n_test: int, seed: int) -> list[Task]:
    g = torch.Generator().manual_seed(seed)
    x, y = bishop_data(n_train, g)
    xt, yt = bishop_data(n_test, g)
    d, p = spiral_data(n_train, g)
    dt, pt = spiral_data(n_test, g)
    common = {"y_scale": 10.0, "x_scale": 5.0, "num_components": 8, "component": "normal"}
    return [
        Task("forward", "forward: y = x + 7 sin(0.75 x) + noise", x, y, xt, yt, **common),
        Task("inverse", "inverse: x given y (multi-valued)", y, x, yt, xt, **common),
        Task("spiral", "spiral: point given its direction", d, p, dt, pt, 2.0, 6, "bivariate"),
    ]
