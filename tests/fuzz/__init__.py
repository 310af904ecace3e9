"""Batched extreme-input fuzz of the public API (issue 10, "Make the fuzz part of the project").

* :mod:`.draws`: the argument domains and how their extreme draws are made;
* :mod:`.records`: one record per public function / distribution method (name, callable,
  argument domains, which arguments get gradients, output dtype policy, mpmath oracle);
* :mod:`.oracle`: the mpmath closed forms the records' float64 paths are checked against;
* :mod:`.checks`: the checks (NaN, inf where the reference is representable, dtype,
  fused = plain) and the failure report.

Size: ``PROBLOSS_FUZZ_DRAWS`` draws per (function, dtype) (default 2000, the CI short form;
``PROBLOSS_FUZZ_DRAWS=100000`` is the full run); seed ``PROBLOSS_FUZZ_SEED`` (default 0).
"""
