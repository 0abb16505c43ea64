"""Benchmarks, parity checks and test-material builders, run from the repository root as
``python -m tools.<name> --help``. Shared helpers are in :mod:`tools.common`; the ctypes and NumPy
references they compare against are in :mod:`ggufq_ref`."""
