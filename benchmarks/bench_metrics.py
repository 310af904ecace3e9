"""The closed-form mixture CRPS against the sampled estimate people use instead.

``crps_normal_mixture`` (Grimit et al. 2006, ``O(K^2)`` per event, exact) against the
``M``-sample estimate ``mean|X - y| - mean|X - X'| / 2`` computed by sorting the draws
(``O(M log M)`` per event; what neuralforecast and most training loops do), forward and
backward, at ``B`` events of a ``K``-component, ``D = 1`` mixture: time per call (medians of
``--repeats`` interleaved rounds) and the error of each against the exact value (the closed
form in float64), as a median and a 99th percentile of ``|error| / CRPS``.

Run: ``python benchmarks/bench_metrics.py [--batch 65536] [--components 16] [--samples 1000]
[--repeats 5] [--threads 2]``.
"""

from __future__ import annotations

import argparse

import torch
from _timing import interleaved_medians, measure

from probloss.metrics import crps_normal_mixture


def sampled_crps(value, logits, loc, log_scale, samples: int, generator) -> torch.Tensor:
    """The ``M``-draw estimate: component by ``Categorical(logits)``, then a normal draw;
    ``E|X - X'|`` from the sorted draws, ``2 / M^2 sum_i (2i - M - 1) x_(i)``."""
    b = logits.shape[0]
    index = torch.multinomial(torch.softmax(logits, -1), samples, True, generator=generator)
    mu = loc[..., 0].gather(-1, index)
    sigma = log_scale[..., 0].exp().gather(-1, index)
    x = mu + sigma * torch.randn(b, samples, generator=generator, dtype=loc.dtype)
    to_target = (x - value).abs().mean(-1)
    ranks = torch.arange(1, samples + 1, dtype=x.dtype)
    spread = 2.0 / samples**2 * ((2.0 * ranks - samples - 1.0) * x.sort(-1).values).sum(-1)
    return to_target - 0.5 * spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--components", type=int, default=16)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    b, k = args.batch, args.components
    logits = torch.randn(b, k, generator=g)
    loc = 2.0 * torch.randn(b, k, 1, generator=g)
    log_scale = 0.5 * torch.randn(b, k, 1, generator=g)
    value = 2.0 * torch.randn(b, 1, generator=g)
    params = [t.clone().requires_grad_() for t in (logits, loc, log_scale)]

    def closed_form():
        crps_normal_mixture(value, *params).mean().backward()

    def sampled():
        # a reparameterised estimate gives no gradient to the logits (categorical draw)
        sampled_crps(value, *params, args.samples, g).mean().backward()

    t_closed, t_sampled = interleaved_medians(
        [lambda: measure(closed_form), lambda: measure(sampled)], args.repeats, warmup=1
    )
    exact = crps_normal_mixture(value.double(), logits.double(), loc.double(), log_scale.double())
    with torch.no_grad():
        errors = {
            "closed form (float32)": crps_normal_mixture(value, logits, loc, log_scale).double(),
            f"{args.samples}-sample estimate": sampled_crps(
                value, logits, loc, log_scale, args.samples, g
            ).double(),
        }
    print(f"crps_normal_mixture, B = {b}, K = {k}, D = 1, float32, forward + backward")
    print(f"{'method':<28}{'ms/call':>10}{'median rel err':>16}{'p99 rel err':>14}")
    for (name, est), t in zip(errors.items(), (t_closed, t_sampled), strict=True):
        rel = ((est - exact).abs() / exact).float()
        median, p99 = rel.median().item(), rel.quantile(0.99).item()
        print(f"{name:<28}{t.wall * 1e3:>10.1f}{median:>16.2e}{p99:>14.2e}")
    print(f"speed-up of the closed form: {t_sampled.wall / t_closed.wall:.1f}x")


if __name__ == "__main__":
    main()
