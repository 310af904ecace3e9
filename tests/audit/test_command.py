"""Tests of ``probloss audit`` (``probloss.audit.command`` through ``probloss.cli.main``).

Exit status 0 / 1 / 2 for pass / failures / usage errors, the report on the shipped naive
examples and their probloss twins, JSON output, and the one-line usage messages. The
failures asserted are facts about the functions (see ``test_naive.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import probloss.audit.naive as naive_module
from probloss.cli import build_parser, main

NAIVE_FILE = naive_module.__file__  # the FILE.py:FUNCTION form
BIVARIATE = naive_module.domain_options(naive_module.BIVARIATE_DOMAINS)
MIXTURE = naive_module.domain_options(naive_module.MIXTURE_DOMAINS)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["audit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def failures(out: str) -> set[tuple[str, str]]:
    return {(f["kind"], f["dtype"]) for f in json.loads(out)["failures"]}


def test_audit_is_registered_next_to_demo():
    args = build_parser().parse_args(["audit", "m:f", "--domain", "x=unit", "--json"])
    assert args.command == "audit" and args.target == "m:f" and args.domain == ["x=unit"]
    assert args.dtype == "float32,float16,bfloat16,float64" and args.json and args.seed == 0
    assert build_parser().parse_args(["demo", "cb"]).name == "cb"


def test_naive_cb_mean_fails_and_stable_passes(capsys):
    code, out, _ = run(capsys, f"{NAIVE_FILE}:naive_cb_mean")
    assert code == 1
    assert "nonfinite_grad" in out and "at (x=0): d/dx = nan" in out and "FAILED" in out
    code, out, _ = run(capsys, "probloss.audit.naive:stable_cb_mean")
    assert code == 0 and out.rstrip().endswith("no error above tolerance.")


def test_json_output(capsys):
    code, out, _ = run(capsys, "probloss.audit.naive:naive_cb_mean", "--json", "--dtype=float32")
    assert code == 1
    data = json.loads(out)
    assert data["function"] == "naive_cb_mean" and data["dtypes"] == ["float32"]
    assert ("nonfinite_grad", "float32") in failures(out)
    assert data["ok"] is False and data["points"]["float32"] > 1000


def test_naive_bivariate_fails_in_float32_and_stable_passes(capsys):
    target = "probloss.audit.naive:{}"
    code, out, _ = run(capsys, target.format("naive_bivariate_nll"), *BIVARIATE, "--json")
    assert code == 1 and ("nonfinite_value", "float32") in failures(out)
    code, out, _ = run(capsys, target.format("stable_bivariate_nll"), *BIVARIATE, "--dtype=float32")
    assert code == 0, out


def test_naive_mixture_fails_with_non_finite_values(capsys):
    code, out, _ = run(
        capsys, "probloss.audit.naive:naive_mixture_nll", *MIXTURE, "--dtype=float32", "--json"
    )
    assert code == 1
    assert {("nonfinite_value", "float32"), ("nonfinite_grad", "float32")} <= failures(out)


def test_reference_catches_a_wrong_function(tmp_path, capsys):
    module = tmp_path / "user_loss.py"
    module.write_text(
        textwrap.dedent(
            """
            def wrong(x):
                return x * (1 + 1e-3)

            def exact(x):
                return x
            """
        )
    )
    code, out, _ = run(
        capsys, f"{module}:wrong", f"--reference={module}:exact", "--dtype=float64", "--json"
    )
    assert code == 1 and failures(out) == {("value_error", "float64"), ("grad_error", "float64")}
    assert json.loads(out)["reference"] == "exact in float64"


def test_a_file_can_import_its_neighbours(tmp_path, capsys):
    (tmp_path / "helpers.py").write_text("def double(x):\n    return 2 * x\n")
    (tmp_path / "loss.py").write_text(
        "from helpers import double\n\ndef f(x):\n    return double(x)\n"
    )
    code, _, _ = run(capsys, f"{tmp_path / 'loss.py'}:f", "--dtype=float32")
    assert code == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["no/such/file.py:f"], "no such file: no/such/file.py"),
        (["probloss.audit.naive:nothing"], "probloss.audit.naive has no function 'nothing'"),
        (["no_such_module_xyz:f"], "cannot import no_such_module_xyz: ModuleNotFoundError"),
        (["probloss.audit.naive"], "expected FILE.py:FUNCTION or MODULE:FUNCTION"),
        (["probloss.audit.naive:__doc__"], "is not callable"),
        (["probloss.audit.naive:naive_cb_mean", "--domain=x=reals"], "unknown domain kind"),
        (["probloss.audit.naive:naive_cb_mean", "--domain=x=real[2,1]"], "bad bounds"),
        (["probloss.audit.naive:naive_cb_mean", "--domain=x"], "bad --domain 'x'"),
        (["probloss.audit.naive:naive_cb_mean", "--domain=y=real"], "'y', not a parameter"),
        (
            ["probloss.audit.naive:naive_cb_mean", "--domain=x=real", "--domain=x=unit"],
            "--domain x given twice",
        ),
        (["probloss.audit.naive:naive_cb_mean", "--dtype=float32,int8"], "unknown dtype 'int8'"),
        (
            ["probloss.audit.naive:naive_cb_mean", "--reference=probloss.audit.naive:nope"],
            "bad --reference: probloss.audit.naive has no function 'nope'",
        ),
        (
            ["probloss.audit.naive:naive_cb_mean", "--reference=probloss.special:cb_mean"],
            "the reference cb_mean must take the audited arguments (x)",  # its argument is eta
        ),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("probloss audit: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_reduced_function_is_a_usage_error(tmp_path, capsys):
    module = tmp_path / "reduced.py"
    module.write_text("def loss(x):\n    return (x * x).mean()\n")
    code, _, err = run(capsys, f"{module}:loss")
    assert code == 2 and "must be elementwise (unreduced)" in err


def test_a_file_that_fails_to_load_is_a_usage_error(tmp_path, capsys):
    module = tmp_path / "broken.py"
    module.write_text("raise RuntimeError('boom')\n")
    code, _, err = run(capsys, f"{module}:f")
    assert code == 2 and "loading" in err and "RuntimeError: boom" in err


def test_console_entry_point():
    target = "probloss.audit.naive:stable_cb_mean"
    command = [sys.executable, "-m", "probloss", "audit", target, "--dtype", "float32"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0 and "OK: no non-finite value" in result.stdout
