"""Setup for the 8-device sharding tests (run by tests/test_mesh.py in a subprocess; see there)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

if len(jax.devices()) != 8:
  raise pytest.UsageError(f"tests/mesh needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 before "
                          f"JAX is imported), got {len(jax.devices())}")
