"""Print the measured worst errors of ``probloss.special`` against the
mpmath oracle on the test grids (not a test; run it by hand):

    python -m tests.special.report_errors

For every function, dtype and derivative order it prints the worst relative
error over the points whose exact result is in the dtype's normal range
(with the input where it happens), the worst error/bound ratio under the
test's rules (ratio > 1 means the test fails), and the number of failing
points.
"""

from __future__ import annotations

import torch

from tests.special._helpers import (
    DTYPE_IDS,
    DTYPES,
    NAMES,
    error_report,
    evaluate,
    reference_table,
    third_derivative_tol,
    value_rtol,
)


def _bounds(name: str, kind: str, dtype: torch.dtype) -> tuple[float, float]:
    third = (name == "cb_variance" and kind == "grad") or (name == "cb_mean" and kind == "grad2")
    return third_derivative_tol(dtype) if third else (value_rtol(dtype), 0.0)


def main() -> None:
    print(
        f"{'function':<18}{'kind':<7}{'dtype':<6}{'points':>7}{'max rel err':>13}"
        f"{'at x':>25}{'max err/bound':>15}{'fails':>7}"
    )
    for name in NAMES:
        kinds = ["value", "grad"] + (["grad2"] if name in ("cb_mean", "cb_log_partition") else [])
        for dtype in DTYPES:
            x = reference_table(name, dtype, "value")[0]
            outs = evaluate(name, x, dtype, order=len(kinds) - 1)
            for kind, got in zip(kinds, outs, strict=True):
                _, expected = reference_table(name, dtype, kind)
                rtol, atol = _bounds(name, kind, dtype)
                rep = error_report(x, got, expected, dtype, rtol, atol)
                i = rep.argmax_rel
                worst_ratio = float(rep.ratio.max()) if rep.ratio.size else 0.0
                print(
                    f"{name:<18}{kind:<7}{DTYPE_IDS[dtype]:<6}{x.size:>7}"
                    f"{rep.max_rel:>13.3e}{x[i]:>25.17g}{worst_ratio:>15.3g}"
                    f"{rep.failures.size:>7}"
                )


if __name__ == "__main__":
    main()
