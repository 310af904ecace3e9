"""User story 4 (docs/user_stories.md): ``1/(1 - exp(-x)) - 1/x`` turns NaN; torch's CB.

Prints, for the continuous-Bernoulli mean, the value and autograd gradient of the naive
formula, of the usual ``where(|x| < 0.1, 0.5 + x/12, ...)`` patch and of
:func:`probloss.special.cb_mean`; then the mean, ``log_prob`` and KL of
``torch.distributions.ContinuousBernoulli`` against :class:`probloss.distributions.
ContinuousBernoulli` in float32 at large logits, with float64 probloss as the reference.
The naive and patched means are :func:`probloss.audit.naive.naive_cb_mean_unpatched` and
:func:`probloss.audit.naive.naive_cb_mean`.
"""

from __future__ import annotations

import torch

from ..audit.naive import naive_cb_mean, naive_cb_mean_unpatched
from ..distributions import ContinuousBernoulli
from ..special import cb_mean


def _value_and_grad(fn, points: list[float], dtype: torch.dtype) -> tuple[list, list]:
    x = torch.tensor(points, dtype=dtype, requires_grad=True)
    y = fn(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    return y.tolist(), grad.tolist()


def _fmt(v: float) -> str:
    return f"{v:>12.6g}"


def mean_table(dtype: torch.dtype = torch.float32) -> list[str]:
    """Rows comparing the naive, patched and probloss continuous-Bernoulli mean."""
    points = [0.0, 1e-8, 1e-4, 0.05, 1.0, 30.0, 100.0]
    lines = [
        f"mean(x) = 1/(1 - exp(-x)) - 1/x and d mean/dx in {str(dtype)[6:]}",
        f"{'x':>8}"
        + "".join(
            f"{h:>12}" for h in ("naive", "d naive", "where", "d where", "probloss", "d probloss")
        ),
    ]
    columns = [
        _value_and_grad(fn, points, dtype)
        for fn in (naive_cb_mean_unpatched, naive_cb_mean, cb_mean)
    ]
    for i, x in enumerate(points):
        cells = [c[k][i] for c in columns for k in (0, 1)]
        lines.append(f"{x:>8.2g}" + "".join(_fmt(v) for v in cells))
    return lines


def torch_comparison_table() -> list[str]:
    """Rows comparing torch's and probloss's continuous Bernoulli in float32 at large logits."""
    logits = [5.0, 17.0, 30.0, 50.0]
    ours32 = ContinuousBernoulli(logits=torch.tensor(logits))
    ref = ContinuousBernoulli(logits=torch.tensor(logits, dtype=torch.float64))
    theirs = torch.distributions.ContinuousBernoulli(logits=torch.tensor(logits))
    value = torch.tensor(0.99)
    kl_to = [lg - 10.0 for lg in logits]
    kl = torch.distributions.kl_divergence
    rows = {
        "mean": (theirs.mean, ours32.mean, ref.mean),
        "log_prob(0.99)": (
            theirs.log_prob(value),
            ours32.log_prob(value),
            ref.log_prob(value.double()),
        ),
        "KL(eta || eta - 10)": (
            kl(theirs, torch.distributions.ContinuousBernoulli(logits=torch.tensor(kl_to))),
            kl(ours32, ContinuousBernoulli(logits=torch.tensor(kl_to))),
            kl(ref, ContinuousBernoulli(logits=torch.tensor(kl_to, dtype=torch.float64))),
        ),
    }
    lines = [
        "torch.distributions.ContinuousBernoulli vs probloss, float32 "
        "(reference: probloss float64)",
        f"{'quantity':<22}{'logits':>8}{'torch f32':>14}{'probloss f32':>14}{'reference':>14}",
    ]
    for name, (t, o, r) in rows.items():
        for i, lg in enumerate(logits):
            lines.append(
                f"{name:<22}{lg:>8g}{t[i].item():>14.6g}{o[i].item():>14.6g}{r[i].item():>14.6g}"
            )
    return lines


def run(*, quick: bool = False) -> int:
    """Print both tables; return a process exit status (0).

    Args:
        quick: accepted like every demo's; the tables take well under a second either way.
    """
    print("\n".join(mean_table()))
    print()
    print("\n".join(torch_comparison_table()))
    return 0
