"""Shared pytest setup for the proxjax tests."""

import os

# The brute-force prox reference (tests/prox_reference.py) runs many tiny L-BFGS-B problems; with a multi-threaded
# OpenBLAS each one pays thread start-up/synchronisation costs (about 10x slower on a busy machine). This must be set
# before NumPy/SciPy are imported, which is why it lives here; an explicit setting in the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
