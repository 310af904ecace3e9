"""Private helpers shared by every probloss package, each idea in one module.

* :mod:`.dtype`: the half-precision policy (losses in float32, special functions in their
  input dtype) and float tensor conversion.
* :mod:`.validation`: when value checks run (``validate_args``) and the checks themselves.
* :mod:`.shapes`: broadcasting that names every argument in its error.
* :mod:`.reduction`: ``reduction`` and ``nan_policy`` of losses, NaN masking.
* :mod:`.params`: the one resolver of the scale forms (``scale``, ``log_scale``, ...).
* :mod:`.constants`: ``log 2``, ``log 2 pi`` and the like, as Python floats.

Nothing here is public API; other packages import from these modules only.
"""
