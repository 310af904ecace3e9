"""Heads: shapes, initial scale, gradients to every parameter, extreme raw outputs, options.

References: torch.distributions in float64 at the head's own parameters (the dtype test);
closed forms for the gradients of log_softplus (stated per test).
"""

from __future__ import annotations

import types

import pytest
import torch

from probloss.distributions.bivariate_normal import BivariateNormal
from probloss.distributions.normal import Normal
from probloss.distributions.stroke import StrokeMixture
from probloss.nn import BivariateNormalHead, MixtureDensityHead, NormalHead

HEADS = {
    "normal": lambda **kw: NormalHead(6, 3, **kw),
    "bivariate": lambda **kw: BivariateNormalHead(6, **kw),
}
TARGET_SHAPE = {"normal": (5, 3), "bivariate": (5, 2)}


@pytest.mark.parametrize("name", list(HEADS))
def test_head_returns_distribution_over_points(name):
    """Batch (5,), event (D,): log_prob is one value per point, so "mean" is over points
    (for NormalHead the sum over coordinates of its probloss Normal, exactly)."""
    head = HEADS[name]()
    d = head(torch.randn(5, 6))
    assert d.batch_shape == (5,) and d.event_shape == TARGET_SHAPE[name][1:]
    assert tuple(d.sample().shape) == TARGET_SHAPE[name]
    y = torch.randn(TARGET_SHAPE[name])
    assert d.log_prob(y).shape == (5,)
    if name == "normal":
        assert isinstance(d.base_dist, Normal)
        assert torch.equal(d.log_prob(y), d.base_dist.log_prob(y).sum(-1))
    else:
        assert isinstance(d, BivariateNormal)


@pytest.mark.parametrize("min_scale", [0.0, 1e-3])
@pytest.mark.parametrize("init_scale", [0.01, 1.0, 30.0])
@pytest.mark.parametrize("name", list(HEADS))
def test_head_starts_at_init_scale(name, init_scale, min_scale):
    """With zero features the scale is exactly the bias mapping: init_scale to float32
    rounding (relative 1e-6); rho starts at 0."""
    head = HEADS[name](init_scale=init_scale, min_scale=min_scale)
    d = head(torch.zeros(2, 6))
    scale = d.base_dist.scale if name == "normal" else d.log_scale.exp()
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


# --------------------------------------------------------------------------------------
# Every head, every component, every dtype: empty batches and the half-precision policy
# --------------------------------------------------------------------------------------

ALL_HEADS = {
    "normal": lambda: NormalHead(8, 3),
    "bivariate": lambda: BivariateNormalHead(8),
    "mdn-normal": lambda: MixtureDensityHead(8, 3, 4, component="normal"),
    "mdn-bivariate": lambda: MixtureDensityHead(8, 2, 4, component="bivariate"),
    "mdn-full": lambda: MixtureDensityHead(8, 3, 4, component="full"),
    "mdn-pen": lambda: MixtureDensityHead(8, 2, 4, component="bivariate", pen_states=3),
}
EVENT = {"normal": (3,), "bivariate": (2,), "mdn-normal": (3,), "mdn-bivariate": (2,),
         "mdn-full": (3,), "mdn-pen": (5,)}  # fmt: skip
HALF = (torch.float16, torch.bfloat16)


def _reference64(name: str, d):
    """The head's distribution rebuilt by torch.distributions in float64 from its own
    (exactly representable) parameters: an independent evaluation of log_prob, mean and
    variance. Returns the distribution and a function giving the largest component
    log-density magnitude (for the error bound of a log-sum-exp)."""
    f = lambda t: t.detach().double()  # noqa: E731
    if name == "normal":
        base = torch.distributions.Normal(f(d.base_dist.loc), f(d.base_dist.log_scale).exp())
        ref = torch.distributions.Independent(base, 1)
        return ref, lambda y: base.log_prob(y).abs().sum(-1)
    if name == "mdn-pen":
        offsets, magnitude = _reference64("mdn-bivariate", d.offsets)
        log_pen = torch.log_softmax(f(d.pen_logits), -1)

        def log_prob(y):  # the offsets' mixture + log_softmax of the pen logits at the state
            state = y[..., 2:].argmax(-1, keepdim=True)
            return offsets.log_prob(y[..., :2]) + log_pen.gather(-1, state).squeeze(-1)

        ref = types.SimpleNamespace(log_prob=log_prob)
        return ref, lambda y: magnitude(y[..., :2]) + log_pen.abs().amax(-1)
    if name == "bivariate":
        s = f(d.log_scale).exp()
        rho = torch.tanh(f(d.atanh_rho))
        off = rho * s[..., 0] * s[..., 1]
        cov = torch.stack((s[..., 0] ** 2, off, off, s[..., 1] ** 2), -1).unflatten(-1, (2, 2))
        ref = torch.distributions.MultivariateNormal(f(d.loc), covariance_matrix=cov)
        return ref, lambda y: ref.log_prob(y).abs()
    if name == "mdn-full":
        comp = torch.distributions.MultivariateNormal(f(d.loc), scale_tril=f(d.scale_tril))
    elif name == "mdn-normal":
        comp = torch.distributions.Independent(
            torch.distributions.Normal(f(d.loc), f(d.log_scale).exp()), 1
        )
    else:
        s = f(d.log_scale).exp()
        rho = torch.tanh(f(d.atanh_rho))
        off = rho * s[..., 0] * s[..., 1]
        cov = torch.stack((s[..., 0] ** 2, off, off, s[..., 1] ** 2), -1).unflatten(-1, (2, 2))
        comp = torch.distributions.MultivariateNormal(f(d.loc), covariance_matrix=cov)
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=f(d.logits)), comp
    )
    return ref, lambda y: comp.log_prob(y.unsqueeze(-2)).abs().amax(-1)


@pytest.mark.parametrize(
    "dtype", [*HALF, torch.float32, torch.float64], ids=["f16", "bf16", "f32", "f64"]
)
@pytest.mark.parametrize("name", list(ALL_HEADS))
def test_every_head_and_dtype_samples_evaluates_and_backpropagates(name, dtype):
    """The one dtype rule of every head and distribution (issue 10: the full-covariance
    head raised "expected scalar type Float but found BFloat16" in sample()):

    * ``log_prob`` is float32 for half precision (else the head's dtype) and equals a
      float64 torch.distributions evaluation at the head's own parameters within
      ``32 eps (1 + |ref| + m)`` (eps of log_prob's dtype), ``m`` the largest component
      log-density magnitude: each component term is an evaluation with at most 16
      roundings relative to its own size, and the log-sum-exp adds an ulp of the result;
    * samples (also at temperature 0, which is the mode exactly), ``mean``, ``variance``
      and ``mode`` come back in the parameters' dtype, finite;
    * back-propagation reaches every parameter with a finite, not all-zero gradient.
    """
    torch.manual_seed(0)
    head = ALL_HEADS[name]().to(dtype)
    features = torch.randn(5, 8).to(dtype)
    d = head(features)
    draws = d.sample((7,))
    assert draws.dtype == dtype and draws.shape == (7, 5, *EVENT[name])
    assert torch.isfinite(draws).all()
    for moment in ("mean", "variance", "mode"):
        value = getattr(d, moment)
        assert value.dtype == dtype and value.shape == (5, *EVENT[name]), moment
        assert torch.isfinite(value).all(), moment

    y = torch.randn(5, *EVENT[name]).to(dtype)
    if name == "mdn-pen":  # stroke-5 points: the pen part one-hot
        y[:, 2:] = torch.nn.functional.one_hot(torch.arange(5) % 3, 3).to(dtype)
    lp = d.log_prob(y)
    assert lp.dtype == (torch.float32 if dtype in HALF else dtype)
    ref, magnitude = _reference64(name, d)
    y64 = y.double()
    expected = ref.log_prob(y64)
    tol = 32 * torch.finfo(lp.dtype).eps * (1 + expected.abs() + magnitude(y64))
    assert ((lp.double() - expected).abs() <= tol).all(), (lp, expected)

    lp.sum().backward()
    for pname, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert (p.grad != 0).any(), pname
    if name.startswith("mdn"):
        cold = d.sample_with_temperature(0.0)
        assert cold.dtype == dtype and torch.equal(cold, d.mode)
        warm = d.sample_with_temperature(0.5, (3,))
        assert warm.dtype == dtype and warm.shape == (3, 5, *EVENT[name])


@pytest.mark.parametrize("name", list(ALL_HEADS))
def test_empty_batch_in_empty_out(name):
    """Features (0, in_features) (issue 10: "cannot reshape tensor of 0 elements" from
    torch's argument validation and torch's Independent): the distribution has batch
    shape (0,); log_prob, samples, moments and the gradient of a summed loss are empty (or
    zero), never an error. Validation stays on (CPU tensors) and has no element to check."""
    head = ALL_HEADS[name]()
    d = head(torch.zeros(0, 8))
    event = EVENT[name]
    assert d.batch_shape == (0,) and d.event_shape == event
    lp = d.log_prob(torch.zeros(0, *event))
    assert lp.shape == (0,)
    lp.sum().backward()
    assert (head.linear.weight.grad == 0).all()
    assert d.sample().shape == (0, *event)
    assert d.sample((3,)).shape == (3, 0, *event)
    for moment in ("mean", "variance", "mode"):
        assert getattr(d, moment).shape == (0, *event), moment
    if name.startswith("mdn"):
        assert d.sample_with_temperature(0.5, (2,)).shape == (2, 0, *event)
        assert d.sample_with_temperature(0.0).shape == (0, *event)
    if name in ("normal", "bivariate"):
        assert d.entropy().shape == (0,)
    if name == "mdn-pen":
        assert isinstance(d, StrokeMixture)
        assert d.pen.sample().shape == (0,) and d.pen.log_prob(torch.zeros(0)).shape == (0,)
