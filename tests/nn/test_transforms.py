"""A mixture density network under torch.export, torch.func and torch.compile.

The model is what a user ships: an MLP, a :class:`MixtureDensityHead` of each component
type and the mixture's negative log-likelihood. Tolerances: the exported / compiled /
vmapped programs evaluate the same formulas in float64, up to the order of sums and
inductor's fused elementwise code; ``rtol = 1e-9`` allows 4.5e6 ulps (a condition number
of 1e5 over a graph of a few hundred operations), ``atol = 1e-12`` for gradients that are
sums of terms of size 1 cancelling to near 0.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from probloss.nn import MixtureDensityHead, MixtureNLLLoss

RTOL, ATOL = 1e-9, 1e-12
FEATURES, HIDDEN, K = 3, 8, 4
SETTINGS = {
    "normal": dict(out_features=2, component="normal"),
    "bivariate": dict(out_features=2, component="bivariate"),
    "stroke": dict(out_features=2, component="bivariate", pen_states=3),
    "full": dict(out_features=3, component="full"),
}


class MDN(nn.Module):
    """MLP -> mixture head -> per-point NLL (``reduction="none"``)."""

    def __init__(self, **head):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh())
        self.head = MixtureDensityHead(HIDDEN, num_components=K, **head)
        self.nll = MixtureNLLLoss(reduction="none")

    def forward(self, x, y):
        return self.nll(y, self.head(self.body(x)))


def _model(setting: str) -> tuple[MDN, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = MDN(**SETTINGS[setting]).double()
    x = torch.randn(5, FEATURES, dtype=torch.float64)
    d = SETTINGS[setting]["out_features"]
    y = torch.randn(5, d, dtype=torch.float64)
    if setting == "stroke":  # stroke-5 points: offsets and a one-hot pen state
        pen = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1]), 3).double()
        y = torch.cat([y, pen], -1)
    return model, x, y


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_export_with_a_dynamic_batch_gives_the_eager_result(setting, strict):
    model, x, y = _model(setting)
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(
        model, (x, y), dynamic_shapes=({0: batch}, {0: batch}), strict=strict
    )
    _, x7, y7 = _model(setting)
    x7, y7 = x7.repeat(2, 1)[:7], y7.repeat(2, 1)[:7]  # another batch size
    torch.testing.assert_close(program.module()(x7, y7), model(x7, y7), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("setting", SETTINGS)
def test_per_example_gradients_in_one_call(setting):
    model, x, y = _model(setting)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return functional_call(model, p, (xi.unsqueeze(0), yi.unsqueeze(0))).squeeze(0)

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(x.shape[0]):
        model.zero_grad()
        model(x[i : i + 1], y[i : i + 1]).sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(
                per_example[name][i], p.grad, rtol=RTOL, atol=ATOL, msg=f"{setting} {name} row {i}"
            )


@pytest.mark.parametrize("setting", SETTINGS)
def test_compiles_fullgraph_forward_and_backward(setting):
    torch._dynamo.reset()
    model, x, y = _model(setting)
    eager = model(x, y)
    eager_grads = torch.autograd.grad(eager.sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, y)
    grads = torch.autograd.grad(out.sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager, rtol=RTOL, atol=ATOL)
    for g, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, want, rtol=RTOL, atol=ATOL)
