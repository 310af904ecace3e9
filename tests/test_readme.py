"""The README's Python examples run as written, and the claims in their comments hold.

Every ```python block of README.md is executed in a fresh namespace with a fixed seed. The
training-loop sketch of ``NaNGuard`` names things the reader brings (``model``, ``loader``,
``optimizer``, ``per_example_nll``); this file supplies small stand-ins for exactly those
names and nothing else. Claims made in comments are then checked against an independent
oracle: the continuous-Bernoulli variance from mpmath (``tests/reference.py``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from tests import reference as ref

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def _reader_supplied() -> dict:
    """Stand-ins for the names the NaNGuard sketch leaves to the reader."""
    model = torch.nn.Linear(3, 1)
    loader = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(2)]

    def per_example_nll(pred, y):
        return 0.5 * (pred - y).square().sum(-1)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return {
        "model": model,
        "loader": loader,
        "optimizer": optimizer,
        "per_example_nll": per_example_nll,
    }


def _run(block: str) -> dict:
    torch.manual_seed(0)
    namespace = _reader_supplied() if "NaNGuard" in block else {}
    exec(compile(block, str(README), "exec"), namespace)
    return namespace


def test_readme_has_the_examples():
    # one block per section: special/CB, MDN, bivariate, VAE, CRPS, NaNGuard
    assert len(BLOCKS) == 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    _run(BLOCKS[index])


def test_cb_mean_gradient_is_the_exact_variance():
    # README: "x.grad ... tensor([0.0833, 0.0833, 0.0004]): the exact variance"
    ns = _run(BLOCKS[0])
    x, grad = ns["x"].detach(), ns["x"].grad
    expected = torch.tensor([float(ref.cb_variance(float(v))) for v in x])
    # float32 special functions: 1e-6 relative (the project's stated float32 bound)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(grad, torch.tensor([0.0833, 0.0833, 0.0004]), rtol=0, atol=5e-5)


def test_bivariate_nll_finite_where_tanh_rounds_to_one():
    # README: "finite even where tanh(atanh_rho) rounds to 1 (atanh_rho = 10 in float32)"
    ns = _run(BLOCKS[2])
    assert torch.tanh(torch.tensor(10.0)) == 1.0  # the premise: float32 tanh saturates
    out = ns["out"].detach().clone()
    out[:, 4] = 10.0
    out.requires_grad_(True)
    from probloss.functional import bivariate_normal_nll

    loss = bivariate_normal_nll(ns["target"], out[:, 0:2], out[:, 2:4], out[:, 4])
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(out.grad).all()


def test_mdn_example_shapes():
    ns = _run(BLOCKS[1])
    assert ns["mixture"].batch_shape == (256,) and ns["mixture"].event_shape == (1,)
    assert ns["samples"].shape == (10, 256, 1)
    assert math.isfinite(ns["loss"].item())


def test_reduced_loss_refuses_the_slice_mistake_and_reduces_empty_batches_like_torch():
    # README, Validation: out[:, 4:5] against (64, 2) targets is a ValueError naming the
    # argument and both shapes; unreduced broadcasts; an empty batch: mean NaN, sum 0.
    from probloss.functional import bivariate_normal_log_prob, bivariate_normal_nll

    out, target = torch.randn(64, 5), torch.randn(64, 2)
    with pytest.raises(ValueError, match=r"atanh_rho.*\(64, 1\).*\(64,\).*\(64, 64\)"):
        bivariate_normal_nll(target, out[:, 0:2], out[:, 2:4], out[:, 4:5])
    unreduced = bivariate_normal_log_prob(target, out[:, 0:2], out[:, 2:4], out[:, 4:5])
    assert unreduced.shape == (64, 64)
    empty = torch.zeros(0, 5)
    args = (torch.zeros(0, 2), empty[:, 0:2], empty[:, 2:4], empty[:, 4])
    assert torch.isnan(bivariate_normal_nll(*args))
    assert bivariate_normal_nll(*args, reduction="sum") == 0
    assert bivariate_normal_nll(*args, reduction="none").shape == (0,)


def test_crps_example_values():
    # README: "crps_normal(y, loc, log_scale)  # tensor([0.2337, 0.6024, 1e30])"; the
    # closed form sigma (z erf(z / sqrt 2) + 2 phi(z) - 1 / sqrt(pi)) in float64
    block = next(b for b in BLOCKS if "crps_normal" in b)
    ns = _run(block)
    got = ns["crps_normal"](ns["y"], ns["loc"], ns["log_scale"])
    phi2 = 2 * math.exp(-0.5) / math.sqrt(2 * math.pi)
    at_one = math.erf(1 / math.sqrt(2)) + phi2 - 1 / math.sqrt(math.pi)
    want = torch.tensor([(math.sqrt(2) - 1) / math.sqrt(math.pi), at_one, 1e30])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
