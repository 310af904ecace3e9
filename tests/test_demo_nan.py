"""``probloss demo nan``: the naive bivariate loss goes non-finite, NaNGuard names the cause,
probloss's loss trains through.

One ``quick=True`` run (seed 0: 4096 points, 200 Adam steps) shared by the tests. What it
prints was measured while choosing the data (see ``probloss/demos/nan.py``): over seeds 0-7
the naive run stops between steps 29 and 52, at a pen-up jump whose log-space NLL is 98 to
172 nats (a density below float32's smallest normal or subnormal number); the probloss run
always finishes, with a final NLL between -0.98 and -0.04 nats per offset. At seed 0 the
naive loss term itself is ``inf`` (NLL 109.3 > 103.3), so the report names the term.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import sys

import pytest
import torch

from probloss.demos import nan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "figures"  # does not exist yet: created
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = nan.run(quick=True, out=str(out), seed=0)
    print(stdout.getvalue())  # shown by pytest on failure
    return status, out, stdout.getvalue()


def test_quick_demo_succeeds_and_writes_the_figure(quick_run):
    status, out, text = quick_run
    assert status == 0
    data = (out / nan.FIGURE).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert f"figure written to {out / nan.FIGURE}" in text


def test_report_names_the_term_the_step_the_rows_and_the_loss_computation(quick_run):
    _, _, text = quick_run
    step = int(re.search(r"NaNGuard stopped the run at step (\d+)", text).group(1))
    assert 0 < step < nan.QUICK.steps
    assert f"non-finite loss or gradient at step {step}" in text
    assert "loss term 'nll' [256]" in text
    assert "the loss computation itself produced them" in text  # every module was finite
    assert "forward: every module output was finite" in text
    for name in ("previous_offset", "offset", "output"):
        assert re.search(rf"^\s+{name}\[\d+\] = \[", text, re.MULTILINE), name


def test_the_offending_point_is_a_far_jump_whose_density_underflows(quick_run):
    """The shown output and offset give a log-space NLL above 103.28 = -log(smallest
    float32 subnormal): exp() of it is exactly 0 in float32."""
    _, _, text = quick_run
    found = re.search(r"at these rows: ([\d.]+) nats", text)
    assert float(found.group(1)) > -math.log(torch.finfo(torch.float32).tiny * 2.0**-23)
    offset = re.search(r"^\s+offset\[\d+\] = \[([^\]]*)\]", text, re.MULTILINE).group(1)
    assert max(abs(float(v)) for v in offset.split(",")) > 2.0  # far beyond the strokes


def test_probloss_run_trains_through(quick_run):
    _, _, text = quick_run
    found = re.search(r"(\d+) steps, every loss finite; final NLL (-?[\d.]+)", text)
    assert int(found.group(1)) == nan.QUICK.steps
    final = float(found.group(2))
    assert math.isfinite(final) and final < 0.0  # below the initial 2.5: it learnt


def _scipy_nll(out: torch.Tensor, offset: torch.Tensor) -> list[float]:
    """Oracle: scipy.stats.multivariate_normal.logpdf in float64."""
    from scipy.stats import multivariate_normal

    values = []
    for o, y in zip(out.double().tolist(), offset.double().tolist(), strict=True):
        sx, sy, rho = math.exp(o[2]), math.exp(o[3]), math.tanh(o[4])
        cov = [[sx * sx, rho * sx * sy], [rho * sx * sy, sy * sy]]
        values.append(-multivariate_normal(o[:2], cov).logpdf(y))
    return values


def test_naive_and_probloss_losses_are_the_same_function_until_float32_breaks():
    """Moderate points (|raw rho| <= 1, log sigma in [-0.5, 0.5], offsets within 3 of the
    mean; NLLs up to 20): both agree with scipy (float64) to 2e-5, ten float32 ulps at 20
    (measured: 1.4e-6 naive, 4.8e-6 probloss). A point 30 away: scipy's NLL is 1438.45,
    the naive one inf, probloss's within a relative 1e-6 of scipy (measured 4.6e-8)."""
    g = torch.Generator().manual_seed(0)
    out = 2.0 * torch.rand(32, 5, generator=g) - 1.0
    out[:, 2:4] *= 0.5
    offset = out[:, :2] + (6.0 * torch.rand(32, 2, generator=g) - 3.0)
    expected = torch.tensor(_scipy_nll(out, offset), dtype=torch.float32)
    torch.testing.assert_close(nan.naive_nll(out, offset), expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(nan.probloss_nll(out, offset), expected, rtol=0, atol=2e-5)
    far = out[:1, :2] + torch.tensor([[30.0, -30.0]])
    reference = _scipy_nll(out[:1], far)[0]
    assert math.isinf(nan.naive_nll(out[:1], far).item())
    assert nan.probloss_nll(out[:1], far).item() == pytest.approx(reference, rel=1e-6)


def test_missing_demo_dependencies_exit_2_with_install_hint(monkeypatch, capsys, tmp_path):
    for name in ("matplotlib", "matplotlib.figure"):  # import -> ImportError, even if loaded
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "figures"
    assert nan.run(quick=True, out=out) == 2
    assert "pip install 'probloss[demo]'" in capsys.readouterr().err
    assert not out.exists()
