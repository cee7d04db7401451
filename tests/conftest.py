"""Shared pytest setup for the proxjax tests."""

import os

# The brute-force prox reference (tests/prox_reference.py) runs many tiny L-BFGS-B problems; with a multi-threaded
# OpenBLAS each one pays thread start-up/synchronisation costs (about 10x slower on a busy machine). This must be set
# before NumPy/SciPy are imported, which is why it lives here; an explicit setting in the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# tests/mesh/ needs 8 fake CPU devices, which must be configured before JAX is imported: tests/test_mesh.py runs it
# in a subprocess with XLA_FLAGS set (and PROXJAX_MESH_TESTS=1); the main session does not collect it.
collect_ignore = [] if os.environ.get("PROXJAX_MESH_TESTS") else ["mesh"]


def pytest_collection_modifyitems(session, config, items):  # noqa: ARG001
  """Starts the 8-device subprocess of tests/test_mesh.py early when any of its cases is selected."""
  if any(item.nodeid.split("::")[0].endswith("test_mesh.py") for item in items):
    import test_mesh  # noqa: PLC0415  (tests/ is on sys.path)
    test_mesh.start_mesh_run()
