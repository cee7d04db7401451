"""Streaming calibration statistics (``proxjax.pruning.calibration``) against NumPy float64 computed at once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxjax.pruning import calibration as cal

D_IN = 24


def _batches(seed: int):
  rng = np.random.default_rng(seed)
  scale = rng.uniform(0.1, 10.0, size=D_IN)  # very different feature scales
  shapes = [(3, 5, D_IN), (7, D_IN), (2, 2, 4, D_IN), (D_IN,), (1, 9, D_IN)]
  return [(rng.normal(size=s) * scale + 0.5).astype(np.float32) for s in shapes]


def _reference(batches):
  x = np.concatenate([b.reshape(-1, D_IN).astype(np.float64) for b in batches])
  return x.T @ x / x.shape[0], np.linalg.norm(x, axis=0), x.shape[0]


def test_streaming_equals_all_at_once():
  batches = _batches(0)
  state = cal.hessian_init(D_IN)
  for b in batches:
    state = cal.hessian_update(state, jnp.asarray(b))
  h_ref, norms_ref, count = _reference(batches)
  assert state.xtx.dtype == jnp.float32 and int(state.count) == count
  h = np.asarray(cal.hessian_from_state(state))
  assert h.dtype == np.float32
  np.testing.assert_allclose(h, h_ref, rtol=2e-6, atol=2e-6 * np.abs(h_ref).max())
  np.testing.assert_allclose(np.asarray(cal.input_norms(state)), norms_ref, rtol=2e-6)
  # The Wanda norm is sqrt(n·H_jj).
  np.testing.assert_allclose(np.asarray(cal.input_norms(state)), np.sqrt(count * np.diag(h_ref)), rtol=2e-6)


def test_bfloat16_activations_are_upcast():
  b = _batches(1)[0]
  xb = jnp.asarray(b, jnp.bfloat16)
  state = cal.hessian_update(cal.hessian_init(D_IN), xb)
  x64 = np.asarray(xb.astype(jnp.float32), np.float64).reshape(-1, D_IN)  # the bf16-rounded values, exactly
  np.testing.assert_allclose(np.asarray(cal.hessian_from_state(state)), x64.T @ x64 / x64.shape[0], rtol=2e-6,
                             atol=1e-6)
  assert state.xtx.dtype == jnp.float32


def test_token_mask_and_merge():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(4, 6, D_IN)).astype(np.float32)
  mask = rng.random((4, 6)) < 0.6
  s = cal.hessian_update(cal.hessian_init(D_IN), x, mask)
  kept = x[mask].astype(np.float64)
  assert int(s.count) == kept.shape[0]
  np.testing.assert_allclose(np.asarray(cal.hessian_from_state(s)), kept.T @ kept / kept.shape[0], rtol=2e-6,
                             atol=1e-6)
  a = cal.hessian_update(cal.hessian_init(D_IN), x[:2])
  b = cal.hessian_update(cal.hessian_init(D_IN), x[2:])
  full = cal.hessian_update(cal.hessian_init(D_IN), x)
  merged = cal.hessian_merge(a, b)
  assert int(merged.count) == int(full.count)
  np.testing.assert_allclose(np.asarray(merged.xtx), np.asarray(full.xtx), rtol=2e-6,
                             atol=2e-6 * np.abs(np.asarray(full.xtx)).max())


def test_one_compile_per_shape_and_scan():
  rng = np.random.default_rng(3)
  state = cal.hessian_init(D_IN)
  d_in_odd = 13  # a shape no other test uses
  s13 = cal.hessian_init(d_in_odd)
  before = cal._update._cache_size()
  for _ in range(3):
    s13 = cal.hessian_update(s13, jnp.asarray(rng.normal(size=(5, d_in_odd)), jnp.float32))
  assert cal._update._cache_size() == before + 1
  s13 = cal.hessian_update(s13, jnp.asarray(rng.normal(size=(2, 5, d_in_odd)), jnp.float32))
  assert cal._update._cache_size() == before + 2
  assert int(s13.count) == 25

  # Functional state: usable as a scan carry.
  xs = jnp.asarray(rng.normal(size=(6, 8, D_IN)), jnp.float32)
  final, _ = jax.lax.scan(lambda s, x: (cal.hessian_update(s, x), None), cal.hessian_init(D_IN), xs)
  x64 = np.asarray(xs, np.float64).reshape(-1, D_IN)
  np.testing.assert_allclose(np.asarray(cal.hessian_from_state(final)), x64.T @ x64 / 48, rtol=2e-6, atol=1e-6)


def test_large_count_is_exact():
  # 2**25 tokens: a float32 count would no longer be exact; int32 is.
  state = cal.HessianState(jnp.zeros((2, 2), jnp.float32), jnp.asarray(2**25 - 1, jnp.int32))
  state = cal.hessian_update(state, jnp.ones((2, 2)))
  assert int(state.count) == 2**25 + 1


def test_errors():
  with pytest.raises(ValueError, match="count = 0"):
    cal.hessian_from_state(cal.hessian_init(3))
  with pytest.raises(ValueError, match="d_in"):
    cal.hessian_update(cal.hessian_init(3), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="floating"):
    cal.hessian_update(cal.hessian_init(3), jnp.ones((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="mask"):
    cal.hessian_update(cal.hessian_init(3), jnp.ones((2, 3)), jnp.ones((3,), bool))
