"""The command line: ``probloss demo`` (the MDN demo, tested in tests/test_demo_mdn.py), one
subcommand per demo with its own ``--help``, and ``probloss demo cb``, which shows what user
story 4 promises."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from probloss.cli import DEMOS, main, parse_args
from probloss.demos import mdn, vae
from probloss.demos.continuous_bernoulli import mean_table, torch_comparison_table


def test_demo_defaults_to_mdn_and_keeps_cb():
    for argv in (["demo"], ["demo", "--quick"], ["demo", "mdn", "--quick"]):
        args = parse_args(argv)
        assert args.name == "mdn" and args.out == "probloss-demo" and args.epochs is None
        assert args.quick == ("--quick" in argv)
    assert parse_args(["demo", "cb"]).name == "cb"
    assert parse_args(["demo", "vae", "--epochs", "3", "--seed", "2"]).epochs == 3
    assert parse_args(["demo", "nan", "--quick"]).quick


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_demo_help_lists_every_demo(capsys):
    text = _help(capsys, ["demo", "--help"])
    for name in DEMOS:
        assert f"    {name} " in text, name
    assert "probloss demo NAME --help" in text


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_each_demo_has_its_own_help(capsys, name):
    """Its own usage line and description, ``--quick`` on each, ``--epochs`` only where the
    demo takes it, and no pointer back to another help."""
    text = _help(capsys, ["demo", name, "--help"])
    assert text.startswith(f"usage: probloss demo {name} [-h] [--quick]")
    assert " ".join(DEMOS[name].description.split()[:6]) in " ".join(text.split())
    assert ("--epochs" in text) == (name in ("mdn", "vae"))
    assert ("--out DIR" in text) == (name != "cb")
    assert "--help)" not in text and "see probloss" not in text


def test_epochs_help_states_the_demos_own_defaults():
    """The numbers in the help are the modules' settings, not a copy that drifts."""
    assert f"default {mdn.FULL.steps}, {mdn.QUICK.steps} with --quick" in DEMOS["mdn"].epochs
    assert f"default {vae.FULL.epochs}, {vae.QUICK.epochs} with --quick" in DEMOS["vae"].epochs


def test_options_of_another_demo_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "nan", "--epochs", "3"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --epochs 3" in capsys.readouterr().err


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
