"""One training step of a mixture density network, eager and compiled, three ways.

The model: an MLP (``--features`` -> 256 -> 256, tanh) and a linear mixture head of
``K = 20`` components over ``D = 2`` outputs, diagonal or correlated bivariate. One step is
forward, the mean negative log-likelihood, backward and an Adam update. Written three ways:

* **probloss**: ``MixtureDensityHead`` and ``MixtureNLLLoss`` (the fused kernels);
* **torch.distributions**: the same linear head feeding ``MixtureSameFamily(Categorical,
  Independent(Normal))`` (diagonal) or ``MixtureSameFamily(Categorical,
  MultivariateNormal(scale_tril=[[sx, 0], [rho sy, sy sqrt(1 - rho^2)]]))`` (bivariate),
  scales ``softplus(raw) + 1e-4``, ``rho = tanh(raw)``, validation off (as in a tuned
  training loop);
* **hand-written**: the same parameterisation and the textbook log-sum-exp formula in
  plain torch ops (the sketch-rnn form for the bivariate head).

Each is timed eager and under ``torch.compile`` (default mode; ``fullgraph=True`` for
probloss, which must not break the graph); the compile time is the wall time of the first
compiled step. Times are medians over ``--repeats`` interleaved rounds (``_timing``);
ratios are against eager probloss. Targets (issue 12): compiled probloss at least as fast
as compiled torch.distributions and faster than eager probloss; eager probloss at least as
fast as eager torch.distributions.

``--no-body`` times the head and its loss alone (``MixtureDensityHead(256, 2, 20)`` on
fixed features, forward, backward and Adam on the head), where the loss is a larger share.

Run: ``python benchmarks/bench_compile.py [--batch 4096 65536] [--repeats 7]
[--threads 2] [--device cpu] [--no-body]``.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as tnf
from _timing import interleaved_medians, measure
from torch import nn
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from probloss.nn import MixtureDensityHead, MixtureNLLLoss

K, D, HIDDEN = 20, 2, 256
NO_BODY = False  # set by --no-body


def _body(features: int) -> nn.Module:
    if features == HIDDEN and NO_BODY:
        return nn.Identity()  # --no-body: the head and its loss alone, on (B, 256) features
    return nn.Sequential(
        nn.Linear(features, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh()
    )


class ProblossMDN(nn.Module):
    def __init__(self, features: int, component: str):
        super().__init__()
        self.body = _body(features)
        self.head = MixtureDensityHead(HIDDEN, D, K, component=component)
        self.nll = MixtureNLLLoss()

    def forward(self, x, y):
        return self.nll(y, self.head(self.body(x)))


class RawMDN(nn.Module):
    """The same linear head; the density is built by ``density(raw, y)``."""

    def __init__(self, features: int, component: str, density):
        super().__init__()
        self.body = _body(features)
        per = 1 + 2 * D + (1 if component == "bivariate" else 0)
        self.linear = nn.Linear(HIDDEN, K * per)
        self.density, self.component = density, component

    def forward(self, x, y):
        raw = self.linear(self.body(x))
        logits, loc, raw_scale = raw[..., :K], raw[..., K : K + K * D], raw[..., K + K * D :]
        loc = loc.unflatten(-1, (K, D))
        scale = tnf.softplus(raw_scale[..., : K * D].unflatten(-1, (K, D))) + 1e-4
        rho = torch.tanh(raw_scale[..., K * D :]) if self.component == "bivariate" else None
        return -self.density(y, logits, loc, scale, rho).mean()


def torch_distributions(y, logits, loc, scale, rho):
    if rho is None:
        components = Independent(Normal(loc, scale, validate_args=False), 1)
    else:
        sx, sy = scale[..., 0], scale[..., 1]
        zero = torch.zeros_like(sx)
        tril = torch.stack(
            [torch.stack([sx, zero], -1), torch.stack([rho * sy, sy * torch.sqrt(1 - rho**2)], -1)],
            -2,
        )
        components = MultivariateNormal(loc, scale_tril=tril, validate_args=False)
    mixture = MixtureSameFamily(Categorical(logits=logits, validate_args=False), components)
    return mixture.log_prob(y)


def hand_written(y, logits, loc, scale, rho):
    z = (y.unsqueeze(-2) - loc) / scale
    if rho is None:
        log_comp = (-0.5 * z.square() - torch.log(scale)).sum(-1) - D / 2 * math.log(2 * math.pi)
    else:
        one_m = 1 - rho**2
        q = (z[..., 0] ** 2 + z[..., 1] ** 2 - 2 * rho * z[..., 0] * z[..., 1]) / one_m
        log_comp = (
            -0.5 * q - torch.log(scale).sum(-1) - 0.5 * torch.log(one_m) - math.log(2 * math.pi)
        )
    return torch.logsumexp(torch.log_softmax(logits, -1) + log_comp, -1)


def _step(model, x, y):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        optimizer.step()

    return step


def run(batch: int, component: str, repeats: int, features: int, device: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(batch, features, device=device)
    y = torch.randn(batch, D, device=device)
    builders = {
        "probloss": lambda: ProblossMDN(features, component),
        "torch.distributions": lambda: RawMDN(features, component, torch_distributions),
        "hand-written": lambda: RawMDN(features, component, hand_written),
    }
    steps, compile_s = {}, {}
    for name, build in builders.items():
        steps[f"{name} eager"] = _step(build().to(device), x, y)
        compiled = torch.compile(build().to(device), fullgraph=name == "probloss")
        step = _step(compiled, x, y)
        start = time.perf_counter()
        step()  # compiles forward and backward
        compile_s[name] = time.perf_counter() - start
        steps[f"{name} compiled"] = step
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    samplers = [lambda s=s: measure(lambda: (s(), sync())) for s in steps.values()]
    timings = interleaved_medians(samplers, repeats, warmup=2)
    base = timings[0].wall
    print(f"\n{component} head, B = {batch}, K = {K}, D = {D}, float32, {device}")
    print(f"{'method':<32}{'ms/step':>10}{'cpu ms':>10}{'x eager probloss':>18}{'compile s':>11}")
    for (label, _), t in zip(steps.items(), timings, strict=True):
        name = label.rsplit(" ", 1)[0]
        comp = f"{compile_s[name]:>11.1f}" if label.endswith("compiled") else ""
        print(f"{label:<32}{t.wall * 1e3:>10.2f}{t.cpu * 1e3:>10.2f}{t.wall / base:>18.2f}{comp}")
    by = {label: t.wall for label, t in zip(steps, timings, strict=True)}
    print(
        "targets: compiled probloss / compiled torch.distributions = "
        f"{by['probloss compiled'] / by['torch.distributions compiled']:.2f} (<= 1); "
        f"compiled / eager probloss = {by['probloss compiled'] / by['probloss eager']:.2f} (< 1); "
        f"eager probloss / eager torch.distributions = "
        f"{by['probloss eager'] / by['torch.distributions eager']:.2f} (<= 1)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--component", nargs="+", default=["normal", "bivariate"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--no-body",
        action="store_true",
        help="time the head and its loss alone (the MLP replaced by 256 fixed features)",
    )
    args = parser.parse_args()
    if args.no_body:
        global NO_BODY
        NO_BODY, args.features = True, HIDDEN
    torch.set_num_threads(args.threads)
    for component in args.component:
        for batch in args.batch:
            run(batch, component, args.repeats, args.features, args.device)


if __name__ == "__main__":
    main()
