"""Heads: shapes, initial scale, gradients to every parameter, extreme raw outputs."""

from __future__ import annotations

import io

import pytest
import torch

from probloss.distributions.bivariate_normal import BivariateNormal
from probloss.distributions.normal import Normal
from probloss.nn import BivariateNormalHead, NormalHead

HEADS = {
    "normal": lambda **kw: NormalHead(6, 3, **kw),
    "bivariate": lambda **kw: BivariateNormalHead(6, **kw),
}
TARGET_SHAPE = {"normal": (5, 3), "bivariate": (5, 2)}


@pytest.mark.parametrize("name", list(HEADS))
def test_head_returns_distribution_with_batch_shape(name):
    head = HEADS[name]()
    d = head(torch.randn(5, 6))
    assert isinstance(d, Normal if name == "normal" else BivariateNormal)
    assert tuple(d.sample().shape) == TARGET_SHAPE[name]
    assert d.log_prob(torch.zeros(TARGET_SHAPE[name])).shape == (5,) + (
        (3,) if name == "normal" else ()
    )


@pytest.mark.parametrize("min_scale", [0.0, 1e-3])
@pytest.mark.parametrize("init_scale", [0.01, 1.0, 30.0])
@pytest.mark.parametrize("name", list(HEADS))
def test_head_starts_at_init_scale(name, init_scale, min_scale):
    """With zero features the scale is exactly the bias mapping: init_scale to float32
    rounding (relative 1e-6); rho starts at 0."""
    head = HEADS[name](init_scale=init_scale, min_scale=min_scale)
    d = head(torch.zeros(2, 6))
    scale = d.scale if name == "normal" else d.log_scale.exp()
    torch.testing.assert_close(scale, torch.full_like(scale, init_scale), rtol=1e-6, atol=0)
    if name == "bivariate":
        assert (d.atanh_rho == 0).all()


@pytest.mark.parametrize("name", list(HEADS))
def test_gradient_reaches_every_parameter(name):
    head = HEADS[name]()
    x = torch.randn(5, 6)
    loss = -head(x).log_prob(torch.randn(TARGET_SHAPE[name])).mean()
    loss.backward()
    for pname, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert (p.grad != 0).any(), pname


@pytest.mark.parametrize("raw", [-1e4, -200.0, 0.0, 200.0, 1e4])
@pytest.mark.parametrize("name", list(HEADS))
def test_extreme_raw_scales_stay_finite(name, raw):
    """softplus(-200) underflows to 0 in float32; the log-scale is still -200, and the loss
    at the mean (log-scale plus a constant, per coordinate) and its gradient stay finite:
    d loss / d raw = d log_softplus(raw) / d raw -> 1 (closed form: sigmoid / softplus)."""
    head = HEADS[name]()
    with torch.no_grad():
        head.linear.weight.zero_()
        scale_bias = head.linear.bias[3:] if name == "normal" else head.linear.bias[2:4]
        scale_bias.fill_(raw)
    d = head(torch.zeros(2, 6))
    loss = -d.log_prob(d.mean.detach()).sum()
    loss.backward()
    assert torch.isfinite(loss)
    grad = head.linear.bias.grad
    assert torch.isfinite(grad).all()
    scale_grad = grad[3:] if name == "normal" else grad[2:4]
    r = torch.tensor(raw, dtype=torch.float64)
    # 2 rows x d log_softplus / d raw = 2 sigmoid(raw) / softplus(raw), softplus exact in
    # float64 as -logsigmoid(-raw); for raw << 0 the ratio is 1 to within e^raw.
    expected = (
        2 * torch.sigmoid(r) / -torch.nn.functional.logsigmoid(-r) if raw > -30 else r / r * 2
    )
    torch.testing.assert_close(
        scale_grad.double(), expected.expand_as(scale_grad), rtol=1e-6, atol=0
    )


def test_init_scale_must_exceed_min_scale():
    with pytest.raises(ValueError, match="init_scale"):
        NormalHead(3, 1, init_scale=1e-3, min_scale=1e-3)


@pytest.mark.parametrize("name", list(HEADS))
def test_state_dict_round_trip(name):
    head = HEADS[name](init_scale=0.3)
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    clone = HEADS[name]()
    clone.load_state_dict(torch.load(buffer))
    x = torch.randn(4, 6)
    y = torch.randn(TARGET_SHAPE[name][0] - 1, TARGET_SHAPE[name][1])
    assert torch.equal(head(x).log_prob(y), clone(x).log_prob(y))
