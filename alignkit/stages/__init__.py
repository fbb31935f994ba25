"""Stage modules, one per kind (see :mod:`alignkit.core.stage`)."""
