"""Batched extreme-input fuzz of the public API (issue 10, "Make the fuzz part of the project").

* :mod:`.draws`: the argument domains and how their extreme draws are made;
* :mod:`.records`: one record per public function / distribution method (name, callable,
  argument domains, which arguments get gradients, output dtype policy, mpmath oracle,
  where the math is undefined);
* :mod:`.oracle`: the mpmath closed forms the records' float64 paths are checked against
  (special functions, and their limits at ``+-inf``, from :mod:`tests.reference`);
* :mod:`.checks`: the checks (NaN, inf where the reference is representable, dtype,
  fused = plain, float64 path = mpmath) and the failure report.

Running it
----------
Short form (CI, the default; about 10 s on 2 cores)::

    python -m pytest -q tests/fuzz

Full form (10^5 draws per record and dtype; minutes)::

    PROBLOSS_FUZZ_DRAWS=100000 python -m pytest -q tests/fuzz

``PROBLOSS_FUZZ_DRAWS`` is the number of draws per (record, dtype) (default 2000; the
mpmath subsample is ``max(8, 8 * DRAWS // 2000)`` rows per dtype). ``PROBLOSS_FUZZ_SEED``
(default 0) seeds every draw, together with a hash of the record's name and the dtype, so
a failure reproduces with the same two variables; each failure also prints a one-line
Python repro of its first offending row.

The NaN rule
------------
A NaN value or gradient is a failure unless the exact mathematical result is undefined
there. With finite, valid inputs (the draws' domains) the exact result is always a real
number (exact arithmetic does not overflow: a result beyond ``finfo.max`` is ``+-inf``,
not NaN), so NaN is never acceptable there. With an infinite input the result is the
limit; it is undefined only where that limit does not exist, e.g. ``inf - inf`` whose
limit depends on the path (two infinite coordinates of a correlated bivariate value).
Where that happens is stated once, per record (:class:`.records.Undefined`: the rows, the
outputs, and the reason), and applied in one place (:func:`.checks.acceptable_nan`). The
statements are checked against mpmath on the oracle subsample (for the value, and the
gradients that have an mpmath oracle: a row mpmath finds undefined must be stated, a stated
row must be undefined in mpmath), and their path-dependence with mpmath in
``test_checks.py``. That the float64 reference is NaN too never
excuses a NaN: float64 overflows where the math does not.

Disputed rows
-------------
An ``inf`` gradient where the float64 reference is finite is a failure, unless the
record's mpmath ``dispute_oracle`` (the exact gradient of the closed form at the cast
inputs) shows the exact gradient beyond ``finfo.max`` of the gradient's dtype (the input's
dtype) with the same sign (:func:`.checks.confirmed_overflow`): the float64 reference
itself can be wrong there (the bivariate records: it rounds ``z = r e^{-l}`` to 0, or
``cosh^2 a z^2`` overflows). Only the disputed rows are evaluated.

Known limits (open library holes)
---------------------------------
Where the library is known wrong and not yet fixed, a :class:`.records.KnownLimit`
(reason, rows, outputs, dtypes, issue) in ``records.KNOWN_LIMITS`` excuses every failure
of the named outputs on exactly those rows, applied next to ``Undefined`` in
:func:`.checks.check` (and, for its float64 rows, in the mpmath check
:func:`.checks.run_oracle`). ``test_records.py::test_known_limits_are_not_stale`` fails
once a statement matches no draw (nor, for a rarer hole, fails on its ``example`` row any
more): then the hole is fixed and the statement must go. A predicate receives the float64
inputs and the draws' ``dtype``. Today:

* multivariate_normal_log_prob (float64): the gradients' solve ``L^{-T} z`` overflows at
  finite inputs (a subnormal or smallest-normal diagonal entry): ``0 * inf`` in the back
  substitution, ``inf - inf`` in ``d/dL_ii`` where ``1/L_ii`` overflows too.
* normal_mixture_log_prob, normal_mixture_nll, NormalMixture.log_prob, and the bivariate
  and multivariate (dense) mixtures' log densities and NLLs (every dtype):
  the two leading component terms ``T_k = log w_k + log N_k`` carry a working-precision
  error ``4 eps (|log w_k| + |log N_k|) > 1`` and lie within it (+104) of each other:
  responsibilities unresolved, a gradient weighted by a wrong one can overflow. A
  rigorous bound, wider than the rows that fail (about 1 in 4000 extreme draws fails; the
  bound covers 7-45%). For bivariate components, also where the residuals' rounding
  (``4 eps (|z1| + |z2|)``, plus ``2 tiny`` for underflow), amplified by ``e^{2|a|}``
  along the correlation line, lets a term that is ``-inf`` in the working precision come
  out finite, or an underflowed narrow coordinate move a term by more than 1, within 104
  of the leading term (``a = -65504``, mean ``(-65504, 65504)``, target ``(0.000488, 0)`` in
  float16: the narrow coordinate 0.000488 rounds to 0 in float32; about 1% of the draws).
* lowrank_multivariate_normal_log_prob (every dtype): ``log p < -sqrt(finfo(float64).max)``:
  the value is right, the gradients go through a QR whose backward multiplies quantities
  of that size (``inf - inf``). In float64 also where the scaled path's factor ``C`` has a
  subnormal pivot (``Sigma``'s condition number beyond ``1/tiny``): the QR's backward
  divides by it.
* metrics.crps_normal_mixture (every dtype): a component whose ``w_k sigma_k`` exceeds
  float64's range while ``w_k^2 sigma_k`` need not (a weight ``e^{-300568}`` on a scale
  ``e^{366000}``): the Grimit form's target and cross terms cancel to ``O(w_k^2 sigma_k)``
  but overflow first, so the score is ``inf`` where it may be finite.
"""
