"""Tests of ``probloss.audit.guard.NaNGuard`` and its report.

Every failure here is built on purpose, with the offending rows known in advance from a
closed form (IEEE 754 arithmetic in float32):

* ``log(h) = NaN`` for ``h < 0``: the "forward" models use an identity ``Linear`` (weight
  ``I``, bias 0) so the rows with a negative input are exactly the NaN rows;
* the Euclidean norm ``sqrt(sum h^2)`` at ``h = 0``: the value 0 is finite, its gradient
  ``h / |h|`` is ``0 * inf = NaN`` in autograd (``d sqrt(s)/ds = 1 / (2 sqrt s) = inf`` at
  ``s = 0``, times ``ds/dh = 2h = 0``);
* ``exp(-z^2 / 2)`` underflows to 0 in float32 for ``z^2 / 2 > 103.3`` (the smallest
  subnormal is ``e^-103.28``), so ``-log`` of it is ``inf``;
* a custom ``autograd.Function`` whose backward returns NaN.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from probloss.audit.guard import NaNGuard, row_sums
from probloss.audit.guard_report import (
    GradientFinding,
    NonFiniteError,
    NonFiniteReport,
    NonFiniteWarning,
)

NAN = float("nan")


# --------------------------------------------------------------------------------------
# Models that fail in known places
# --------------------------------------------------------------------------------------


def identity_linear(n: int = 2) -> nn.Linear:
    lin = nn.Linear(n, n)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(n))
        lin.bias.zero_()
    return lin


class Log(nn.Module):
    def forward(self, h):
        return torch.log(h)


class Norm(nn.Module):
    """Euclidean norm of each row: finite value, NaN gradient at a zero row."""

    def forward(self, h):
        return torch.sqrt((h * h).sum(-1))


class LogNet(nn.Module):
    """``head(log(lin(x)))`` with ``lin`` the identity: NaN exactly where ``x < 0``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential()
        self.body.add_module("lin", identity_linear())
        self.body.add_module("log", Log())
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        return self.head(self.body(x)).squeeze(-1)


class InlineLogNet(nn.Module):
    """The log between two submodules, in the parent's own forward code."""

    def __init__(self) -> None:
        super().__init__()
        self.a = identity_linear()
        self.b = nn.Linear(2, 1)

    def forward(self, x):
        return self.b(torch.log(self.a(x))).squeeze(-1)


class NaNGrad(torch.autograd.Function):
    """Identity forward; NaN gradient."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, NAN)


class Gain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log_gain = nn.Parameter(torch.zeros(1))

    def forward(self, h):
        return h * NaNGrad.apply(self.log_gain).exp()


# rows 1 and 3 hold a negative entry: log NaN there, finite elsewhere
X = torch.tensor([[1.0, 2.0], [-1.0, 2.0], [3.0, 4.0], [2.0, -5.0], [0.5, 0.5]])
Y = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
X_FINITE = X.abs()


def squared_error_step(guard, model, optimizer, x, y, step=None):
    """One training step as a user writes it; returns whether the optimizer stepped."""
    optimizer.zero_grad()
    with guard.step(step, inputs={"x": x, "y": y}):
        nll = guard.loss("nll", (model(x) - y) ** 2)
        nll.mean().backward()
        return guard.optimizer_step(optimizer)


def count_hooks(model: nn.Module) -> int:
    forward = sum(len(m._forward_hooks) for m in model.modules())
    post = sum(
        len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters()
    )
    return forward + post


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


# --------------------------------------------------------------------------------------
# Where: forward
# --------------------------------------------------------------------------------------


def test_forward_nan_names_module_rows_term_and_input_values():
    torch.manual_seed(0)
    model = LogNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model)
    guard = NaNGuard(model)  # policy "raise"
    with pytest.raises(NonFiniteError) as info:
        squared_error_step(guard, model, optimizer, X, Y, step=7)
    assert isinstance(info.value, RuntimeError)
    report = info.value.report
    assert report is guard.last_report
    assert report.step == 7 and report.phase == "forward"
    first = report.first_module
    assert (first.name, first.type, first.output) == ("body.log", "Log", "")
    assert (first.rows, first.num_rows, first.inputs_finite) == ([1, 3], 2, True)
    assert report.nonfinite_modules == ["body.log", "body", "head", ""]
    [term] = report.terms
    assert (term.name, term.shape, term.rows, term.num_rows) == ("nll", (5,), [1, 3], 2)
    assert all(math.isnan(v) for v in term.values)
    assert report.rows == [1, 3]
    assert report.values["x"] == [[-1.0, 2.0], [2.0, -5.0]]  # the offending inputs, exactly
    assert report.values["y"] == [[Y[1].item()], [Y[3].item()]]
    assert all(math.isnan(v) for row in report.values["output"] for v in row)
    assert report.nonfinite_inputs == [] and report.nonfinite_parameter_values == []
    assert "'body.log' (Log) turned finite inputs into non-finite output" in report.cause
    text = str(report)
    for piece in ("step 7", "forward pass", "'body.log' (Log)", "loss term 'nll'", "[1, 3]"):
        assert piece in text
    assert "x[3] = [2, -5]" in text and "x[1] = [-1, 2]" in text
    assert_same(before, snapshot(model))  # raised before the optimizer step


def test_nan_made_between_modules_is_traced_to_the_parent_forward():
    model = InlineLogNet()
    guard = NaNGuard(model, policy="skip")
    squared_error_step(guard, model, torch.optim.SGD(model.parameters(), lr=0.1), X, Y)
    first = guard.last_report.first_module
    assert (first.name, first.rows, first.inputs_finite) == ("b", [1, 3], False)
    assert first.input_source == "computed outside any submodule"
    assert "in the forward of the guarded module" in guard.last_report.cause


def test_nan_in_a_step_input_is_named_as_the_cause():
    x = X_FINITE.clone()
    x[2, 1] = NAN
    model = LogNet()
    guard = NaNGuard(model, policy="skip")
    squared_error_step(guard, model, torch.optim.SGD(model.parameters(), lr=0.1), x, Y)
    report = guard.last_report
    assert report.nonfinite_inputs == ["x"]
    assert report.first_module.name == "body.lin"
    assert report.first_module.input_source == "step input 'x'"
    assert report.cause == "the step input(s) x contain non-finite values"
    assert report.rows == [2]


def test_loss_computation_itself_is_blamed_when_every_module_output_is_finite():
    """-log(exp(-z^2/2)) in probability space: exp underflows to 0 for z^2/2 > 103.3
    (float32), so the term is inf exactly at the rows with |z| > 14.4 (here 20 and 30)."""
    model = identity_linear(1)
    z = torch.tensor([[0.5], [20.0], [1.0], [30.0]])
    guard = NaNGuard(model, policy="skip")
    with guard.step(inputs={"z": z}):
        term = guard.loss("nll", -torch.log(torch.exp(-0.5 * model(z) ** 2)).squeeze(-1))
        term.mean().backward()
        guard.check()
    report = guard.last_report
    assert report.first_module is None and report.phase == "forward"
    assert report.terms[0].rows == [1, 3] and report.terms[0].values == [math.inf] * 2
    assert "loss computation itself" in report.cause
    assert report.values["z"] == [[20.0], [30.0]]


def test_dict_and_tuple_outputs_are_checked_by_path():
    class Heads(nn.Module):
        def forward(self, h):
            return {"loc": h, "log_scale": torch.log(h)}, (h, torch.log(h))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = identity_linear()
            self.heads = Heads()

        def forward(self, x):
            return self.heads(self.lin(x))

    model = Net()
    guard = NaNGuard(model, policy="skip")
    with guard.step(inputs={"x": X}):
        (d, (_, log_h)) = model(X)
        guard.loss("nll", (d["loc"] + log_h).sum(-1)).sum().backward()
    first = guard.last_report.first_module
    assert (first.name, first.output, first.rows) == ("heads", "[0]['log_scale']", [1, 3])


def test_in_place_edit_after_a_module_is_not_mistaken_for_its_output():
    """``log_`` in place between two modules: the tensor object is the one 'a' returned,
    but its version counter moved, so 'b' is told its input came from outside."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = identity_linear()
            self.b = nn.Linear(2, 1)

        def forward(self, x):
            h = self.a(x)
            with torch.no_grad():
                h.log_()
            return self.b(h).squeeze(-1)

    model = Net()
    guard = NaNGuard(model, policy="skip")
    squared_error_step(guard, model, torch.optim.SGD(model.parameters(), lr=0.1), X, Y)
    first = guard.last_report.first_module
    assert (first.name, first.inputs_finite, first.rows) == ("b", False, [1, 3])
    assert first.input_source == "computed outside any submodule"


def test_scalar_and_two_dim_loss_terms():
    model = LogNet()
    guard = NaNGuard(model, policy="skip")
    with guard.step(inputs={"x": X}):
        out = model(X)
        wide = guard.loss("wide", torch.stack([out, out.detach() * 0.0], -1))  # (5, 2)
        total = guard.loss("total", wide.sum())
        total.backward()
    wide_term, total_term = guard.last_report.terms
    assert (wide_term.shape, wide_term.rows, wide_term.num_rows) == ((5, 2), [1, 3], 2)
    assert (total_term.shape, total_term.rows, total_term.num_rows) == ((), [], 1)
    assert "loss term 'total' []: non-finite (0-dim)" in str(guard.last_report)


def test_max_rows_caps_the_listed_rows_not_the_count():
    x = -torch.ones(10, 2)
    model = LogNet()
    guard = NaNGuard(model, policy="skip", max_rows=3)
    squared_error_step(guard, model, torch.optim.SGD(model.parameters(), lr=0.1), x, Y.new_ones(10))
    report = guard.last_report
    assert report.terms[0].rows == [0, 1, 2] and report.terms[0].num_rows == 10
    assert report.rows == [0, 1, 2] and len(report.values["x"]) == 3


# --------------------------------------------------------------------------------------
# Where: backward
# --------------------------------------------------------------------------------------


def _norm_model() -> nn.Sequential:
    model = nn.Sequential()
    model.add_module("lin", identity_linear())
    model.add_module("norm", Norm())
    return model


X_ZERO_ROW = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])


def test_nan_made_only_in_backward_names_the_parameter_and_the_consumer():
    """Default (activation_grads=False): the first non-finite gradient in backward order is
    a parameter of 'lin', whose output went into 'norm'."""
    model = _norm_model()
    guard = NaNGuard(model, policy="skip")
    with guard.step(inputs={"x": X_ZERO_ROW}):
        norm = guard.loss("norm", model(X_ZERO_ROW))
        norm.sum().backward()
    report = guard.last_report
    assert report.phase == "backward"
    assert report.first_module is None and report.terms == []  # the forward was finite
    gradient = report.first_gradient
    assert gradient.kind == "parameter" and gradient.name in ("lin.weight", "lin.bias")
    assert gradient.consumer == "norm"
    assert report.nonfinite_gradients == ["lin.weight", "lin.bias"]
    assert "the output of 'lin' went into 'norm'" in report.cause
    text = str(report)
    assert "backward pass" in text and "activation_grads=True" in text  # the hint


def test_activation_gradients_name_the_activation_its_rows_and_consumer():
    model = _norm_model()
    guard = NaNGuard(model, policy="skip", activation_grads=True)
    with guard.step(inputs={"x": X_ZERO_ROW}):
        guard.loss("norm", model(X_ZERO_ROW)).sum().backward()
    report = guard.last_report
    assert report.first_gradient == GradientFinding("activation", "lin", "", [2], 1, "norm")
    assert report.nonfinite_gradients == ["lin.weight", "lin.bias"]
    assert "backward of 'norm' produced the first non-finite gradient" in report.cause
    assert report.rows == [2] and report.values["x"] == [[0.0, 0.0]]
    assert "activation_grads=True" not in str(report)


def test_nan_gradient_of_a_parameter_from_a_custom_function():
    model = nn.Sequential()
    model.add_module("lin", identity_linear())
    model.add_module("gain", Gain())
    guard = NaNGuard(model, policy="skip")
    with guard.step(inputs={"x": X_FINITE}):
        guard.loss("out", model(X_FINITE).sum(-1)).sum().backward()
    report = guard.last_report
    assert report.phase == "backward"
    assert report.first_gradient.kind == "parameter"
    assert report.first_gradient.name == "gain.log_gain"
    assert report.nonfinite_gradients == ["gain.log_gain"]
    assert "parameter 'gain.log_gain'" in report.cause


# --------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------


def test_skip_leaves_parameters_and_adam_state_bit_identical():
    torch.manual_seed(0)
    model = LogNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = NaNGuard(model, policy="skip")
    for _ in range(3):  # Adam state exists (step, exp_avg, exp_avg_sq)
        assert squared_error_step(guard, model, optimizer, X_FINITE, Y)
    params, state = snapshot(model), copy.deepcopy(optimizer.state_dict())
    assert not squared_error_step(guard, model, optimizer, X, Y)  # NaN step: skipped
    assert guard.num_skipped == 1 and guard.last_report is not None
    assert_same(params, snapshot(model))
    after = optimizer.state_dict()["state"]
    for index, entries in state["state"].items():
        for key, value in entries.items():
            assert torch.equal(after[index][key], value), (index, key)
    assert all(p.grad is None for p in model.parameters())
    assert squared_error_step(guard, model, optimizer, X_FINITE, Y)  # training goes on
    assert optimizer.state_dict()["state"][0]["step"] == 4
    assert not torch.equal(params[0], next(model.parameters()))


def test_why_skip_drops_gradients_instead_of_zeroing_them():
    """The docstring's reason: Adam with a zero gradient still moves (momentum, step)."""
    torch.manual_seed(0)
    model = LogNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    squared_error_step(NaNGuard(model), model, optimizer, X_FINITE, Y)
    params = snapshot(model)
    optimizer.zero_grad(set_to_none=False)
    optimizer.step()
    assert not all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))


def test_skip_at_the_end_of_the_step_drops_gradients_for_a_later_optimizer_step():
    model = LogNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NaNGuard(model, policy="skip")
    before = snapshot(model)
    with guard.step(inputs={"x": X}):
        guard.loss("nll", (model(X) - Y) ** 2).mean().backward()
    optimizer.step()  # the user's own step, after the guarded block
    assert guard.num_skipped == 1
    assert_same(before, snapshot(model))


def test_raise_at_the_end_of_the_step_without_optimizer_step():
    model = LogNet()
    guard = NaNGuard(model)
    with pytest.raises(NonFiniteError, match=r"'body\.log'"), guard.step(inputs={"x": X}):
        guard.loss("nll", (model(X) - Y) ** 2).mean().backward()
    assert guard._record is None  # the step is closed after the error


def test_warn_reports_then_steps_and_the_next_report_blames_the_parameters():
    model = LogNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NaNGuard(model, policy="warn")
    with pytest.warns(NonFiniteWarning, match=r"'body\.log'") as record:
        assert squared_error_step(guard, model, optimizer, X, Y)
    assert record[0].filename == __file__  # points at the caller of optimizer_step
    assert not torch.isfinite(model.head.weight).all()  # it stepped with NaN gradients
    with pytest.warns(NonFiniteWarning):
        squared_error_step(guard, model, optimizer, X_FINITE, Y)
    report = guard.last_report
    assert "head.weight" in report.nonfinite_parameter_values
    assert "already hold non-finite values" in report.cause


def test_warning_at_the_end_of_the_step_points_at_the_with_statement():
    model = LogNet()
    guard = NaNGuard(model, policy="warn")
    with pytest.warns(NonFiniteWarning) as record:
        with guard.step(inputs={"x": X}):
            guard.loss("nll", (model(X) - Y) ** 2).mean().backward()
    assert record[0].filename == __file__


# --------------------------------------------------------------------------------------
# On, off, removed; no false positives; one host read
# --------------------------------------------------------------------------------------


def test_disabled_guard_has_no_hooks_and_lets_nan_pass():
    model = LogNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NaNGuard(model, enabled=False)
    assert count_hooks(model) == 0
    term = torch.full((5,), NAN)
    with guard.step(inputs={"x": X}):
        assert guard.loss("nll", term) is term
    assert squared_error_step(guard, model, optimizer, X, Y)  # stepped, silently
    assert guard.last_report is None and guard.check() is None
    guard.enabled = True
    assert count_hooks(model) == 5 + 4  # root, body, body.lin, body.log, head; 4 parameters
    with pytest.raises(NonFiniteError):
        squared_error_step(guard, model, optimizer, X_FINITE, Y)  # NaN parameters now
    guard.enabled = False
    assert count_hooks(model) == 0


def test_remove_and_context_manager_remove_every_hook():
    model = LogNet()
    base = count_hooks(model)
    guard = NaNGuard(model)
    assert count_hooks(model) > base
    guard.remove()
    assert count_hooks(model) == base and not guard.enabled
    with NaNGuard(model) as guard:
        assert count_hooks(model) > base
    assert count_hooks(model) == base


def test_no_false_positive_on_a_finite_training_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(inplace=True), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = NaNGuard(model)
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    losses = []
    for step in range(8):
        optimizer.zero_grad()
        with guard.step(step, inputs={"x": x, "y": y}):
            nll = guard.loss("nll", ((model(x) - y) ** 2).squeeze(-1))
            nll.mean().backward()
            assert guard.optimizer_step(optimizer)
        losses.append(nll.mean().item())
    assert guard.last_report is None and guard.num_skipped == 0
    assert losses[-1] < losses[0]  # it trained


def test_no_false_positive_where_sums_and_norms_overflow_on_finite_values():
    """Loss terms of 3e38 (their sum overflows float32) and gradients of 1e30 (their 2-norm
    overflows): the screens fail, the exact check clears them."""
    model = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = NaNGuard(model)
    x = torch.ones(4, 4)
    with guard.step(inputs={"x": x}):
        out = model(x)
        guard.loss("huge", torch.full((4,), 3e38) + 0.0 * out.sum(-1))
        (1e30 * out).sum().backward()
        assert math.isinf(torch.linalg.vector_norm(model.weight.grad).item())
        assert guard.optimizer_step(optimizer)
    assert guard.last_report is None


def test_nonfinite_activations_alone_do_not_trigger():
    """A -inf mask is legitimate: the loss and every gradient stay finite."""

    class Mask(nn.Module):
        def forward(self, logits):
            return logits.masked_fill(torch.tensor([False, True, False]), -math.inf)

    model = nn.Sequential(nn.Linear(2, 3), Mask())
    guard = NaNGuard(model)
    with guard.step(inputs={"x": X_FINITE}):
        ce = nn.functional.cross_entropy(model(X_FINITE), torch.zeros(5, dtype=torch.long))
        guard.loss("ce", ce).backward()
        assert guard.optimizer_step(torch.optim.SGD(model.parameters(), lr=0.1))
    assert guard.last_report is None


def test_an_infinite_activation_gradient_masked_by_relu_does_not_trigger():
    """sqrt(relu(h)) with h = 0 in row 2: d sqrt/du = inf there, but relu's backward sends
    0 for h <= 0, so every parameter gradient stays finite: nothing to report."""

    class Sqrt(nn.Module):
        def forward(self, u):
            return torch.sqrt(u)

    model = nn.Sequential(identity_linear(), nn.ReLU(), Sqrt())
    guard = NaNGuard(model, activation_grads=True)
    seen = []
    with guard.step(inputs={"x": X_ZERO_ROW}):
        relu_out = model[1](model[0](X_ZERO_ROW))
        relu_out.register_hook(lambda g: seen.append(g.clone()))  # to see the gradient
        guard.loss("out", model[2](relu_out).sum(-1)).sum().backward()
        assert guard.optimizer_step(torch.optim.SGD(model.parameters(), lr=0.1))
    assert math.isinf(seen[0][2].max().item())  # the activation gradient was infinite
    assert guard.last_report is None


def test_evaluation_outside_a_step_and_no_grad_inside_are_left_alone():
    model = LogNet()
    guard = NaNGuard(model)
    with torch.no_grad():
        assert torch.isnan(model(X)).any()  # evaluation: no step, nothing recorded or raised
    assert guard.last_report is None and guard._record is None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    with guard.step(inputs={"x": X_FINITE}):
        with torch.no_grad():
            target = model(X_FINITE)  # a no-grad forward inside the step: no gradient hooks
        loss = guard.loss("nll", (model(X_FINITE) - target - 1.0) ** 2)
        loss.mean().backward()
        assert guard.optimizer_step(optimizer)
    assert guard.last_report is None


@pytest.mark.parametrize("activation_grads", [False, True])
def test_one_host_read_per_finite_step(monkeypatch, activation_grads):
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    guard = NaNGuard(model, activation_grads=activation_grads)
    x, y = torch.randn(16, 3), torch.randn(16)
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with guard.step(inputs={"x": x, "y": y}):
        guard.loss("nll", (model(x).squeeze(-1) - y) ** 2).mean().backward()
        assert guard.check() is None
    assert reads == ["item"]


def test_steps_are_numbered_and_report_serialises():
    model = LogNet()
    guard = NaNGuard(model, policy="skip")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    squared_error_step(guard, model, optimizer, X, Y, step=41)
    squared_error_step(guard, model, optimizer, X, Y)  # next step number: 42
    report = guard.last_report
    assert isinstance(report, NonFiniteReport) and report.step == 42
    data = json.loads(json.dumps(report.to_dict()))
    assert data["first_module"]["name"] == "body.log" and data["rows"] == [1, 3]
    assert data["terms"][0]["name"] == "nll"


def test_bad_arguments_raise_clear_errors():
    model = LogNet()
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        NaNGuard(lambda x: x)
    with pytest.raises(ValueError, match="policy"):
        NaNGuard(model, policy="ignore")
    with pytest.raises(ValueError, match="max_rows"):
        NaNGuard(model, max_rows=0)
    guard = NaNGuard(model)
    with pytest.raises(TypeError, match="inputs"):
        guard.step(0, inputs=[X])
    with pytest.raises(TypeError, match="name"):
        guard.loss(1, Y)
    with pytest.raises(TypeError, match=r"'nll'.*floating"):
        guard.loss("nll", torch.ones(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"inside guard\.step"):
        guard.check()
    with pytest.raises(RuntimeError, match="nested"), guard.step(), guard.step():
        pass


# --------------------------------------------------------------------------------------
# Row screens
# --------------------------------------------------------------------------------------

SPECIALS = [math.inf, -math.inf, NAN]
SCREEN_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@settings(max_examples=60)
@given(
    st.sampled_from(SCREEN_DTYPES),
    st.integers(1, 6),
    st.integers(1, 5),
    st.data(),
)
def test_row_screen_is_finite_exactly_for_finite_rows(dtype, rows, cols, data):
    """Oracle: numpy.isfinite per row. Values up to finfo.max / (2 cols) cannot overflow a
    row sum, so there the screen is exact; huge values may only add non-finite screens,
    never hide a NaN or inf (checked with values up to finfo.max)."""
    limit = torch.finfo(dtype).max
    bounded = st.floats(-limit / (2 * cols), limit / (2 * cols), width=64)
    anything = st.floats(-limit, limit, width=64)
    for values in (bounded, anything):
        cells = st.one_of(values, st.sampled_from(SPECIALS))
        table = data.draw(
            st.lists(st.lists(cells, min_size=cols, max_size=cols), min_size=rows, max_size=rows)
        )
        t = torch.tensor(table, dtype=torch.float64).to(dtype)
        finite = np.isfinite(t.double().numpy()).all(axis=1)
        screen = torch.isfinite(row_sums(t)).numpy()
        assert screen.shape == (rows,)
        assert not (screen & ~finite).any()  # a non-finite row always has a non-finite screen
        if values is bounded or dtype == torch.float16:  # float16 rows are summed in float32
            assert (screen == finite).all()


def test_row_screen_of_0_and_1_dim_tensors_and_copies():
    t = torch.tensor([1.0, NAN, 3.0])
    screen = row_sums(t)
    t[0] = math.inf  # an in-place edit afterwards does not change the screen
    assert torch.isfinite(screen).tolist() == [True, False, True]
    assert row_sums(torch.tensor(2.0)).shape == (1,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert row_sums(torch.ones(3, 2, 2, requires_grad=True)).requires_grad is False
