"""The command line: ``probloss demo`` (the MDN demo, tested in tests/test_demo_mdn.py) and
``probloss demo cb``, which shows what user story 4 promises."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from probloss.cli import build_parser, main
from probloss.demos.continuous_bernoulli import mean_table, torch_comparison_table


def test_demo_defaults_to_mdn_and_keeps_cb():
    parser = build_parser()
    default = parser.parse_args(["demo", "--quick"])
    assert default.name == "mdn" and default.quick and default.out == "probloss-demo"
    assert parser.parse_args(["demo", "mdn"]).name == "mdn"
    assert parser.parse_args(["demo", "cb"]).name == "cb"


def test_demo_epochs_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--epochs", "0"])
    assert exc.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err


def test_cb_demo_runs_and_prints_both_tables(capsys):
    assert main(["demo", "cb", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "d probloss" in out
    assert "torch.distributions.ContinuousBernoulli vs probloss" in out


def test_mean_table_naive_breaks_and_probloss_does_not():
    rows = [line.split() for line in mean_table()[2:]]
    by_x = {float(r[0]): [float(v) for v in r[1:]] for r in rows}
    naive, d_naive, _, d_where, ours, d_ours = by_x[0.0]
    assert math.isnan(naive) and math.isnan(d_naive) and math.isnan(d_where)
    # Exact values at 0: mean 1/2, derivative (the variance) 1/12.
    assert ours == 0.5 and d_ours == pytest.approx(1 / 12, rel=1e-6)
    for values in by_x.values():
        assert all(math.isfinite(v) for v in values[4:])


def test_torch_comparison_shows_torch_saturating():
    rows = [line.split() for line in torch_comparison_table()[2:]]
    mean_50 = next(r for r in rows if r[0] == "mean" and r[1] == "50")
    torch_value, ours, reference = map(float, mean_50[2:])
    assert torch_value == pytest.approx(0.937, abs=1e-3)  # torch's saturation
    assert ours == pytest.approx(reference, rel=1e-6) and reference == pytest.approx(0.98)


def test_unknown_demo_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "no-such-demo"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_entry_point_version():
    result = subprocess.run(
        [sys.executable, "-m", "probloss", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("probloss ")
