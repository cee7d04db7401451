"""Masked refinement (``proxjax.pruning.refine``) against the exact per-column masked least-squares solution."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import proxjax
from proxjax.pruning import refine


def _layer(d_in: int = 32, d_out: int = 8, n: int = 400, seed: int = 0, dead=(), rank=None):
  """A small layer with correlated, unevenly scaled features: (K0, H, mask) as float32 NumPy arrays."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(d_in, n if rank is None else rank))
  x = z.copy()
  x[1::2] = 0.9 * z[0::2] + np.sqrt(1 - 0.9**2) * z[1::2]
  x *= rng.uniform(0.5, 2.0, size=(d_in, 1))
  x[list(dead)] = 0.0
  h = (x @ x.T / x.shape[1]).astype(np.float32)
  k0 = rng.normal(size=(d_in, d_out)).astype(np.float32)
  mask = np.asarray(proxjax.nm_mask(np.abs(k0) * np.sqrt(np.diag(h))[:, None]))
  return k0, h, mask


def _exact(k0: np.ndarray, h: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Per output column c with support S: the minimum-norm solution of H[S,S] k_S = H[S,:] k0[:, c] (float64)."""
  h64, k64 = h.astype(np.float64), k0.astype(np.float64)
  out = np.zeros_like(k64)
  for c in range(k0.shape[1]):
    s = mask[:, c]
    out[s, c] = np.linalg.lstsq(h64[np.ix_(s, s)], h64[s] @ k64[:, c], rcond=None)[0]
  return out


def _rel_loss(k, k0, h) -> float:
  d = np.asarray(k, np.float64) - k0
  return float(np.sum(d * (h @ d)) / np.sum(k0 * (h @ k0)))


def _rel_err(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_precondition():
  k0, h, _ = _layer(dead=(3,))
  p = refine.precondition(h)
  d = np.sqrt(np.diag(h))
  np.testing.assert_allclose(np.asarray(p.scale), d, rtol=1e-6)
  live = np.diag(h) > 0
  np.testing.assert_array_equal(np.asarray(p.live), live)
  ht = np.asarray(p.hessian)
  np.testing.assert_array_equal(np.diag(ht), live.astype(np.float32))
  np.testing.assert_array_equal(ht[3], 0.0)
  ref = h / np.outer(np.where(live, d, 1), np.where(live, d, 1)) * np.outer(live, live)
  np.testing.assert_allclose(ht, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(p.lipschitz), np.linalg.eigvalsh(ref.astype(np.float64))[-1], rtol=1e-5)


def test_relative_local_loss():
  k0, h, mask = _layer()
  k = np.where(mask, k0, 0)
  np.testing.assert_allclose(float(refine.relative_local_loss(k, k0, h)), _rel_loss(k, k0, h), rtol=1e-5)


class TestCGUnderJit(chex.TestCase):
  """``refine_cg`` reaches the exact masked least-squares solution, called as it is and nested in a caller's
  ``jax.jit`` (as inside the pruner's compiled pieces), with its step count a traced argument there."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_cg_reaches_the_exact_solution_within_support_size_steps(self):
    k0, h, mask = _layer()
    want = _exact(k0, h, mask)
    support = int(mask[:, 0].sum())  # 16 per column
    cg = self.variant(lambda k, msk, kk, hh, steps: refine.refine_cg(k, msk, kk, hh, steps=steps, tol=1e-7))
    got = cg(np.where(mask, k0, 0), mask, k0, h, support)
    chex.assert_shape(got, k0.shape)
    chex.assert_type(got, jnp.float32)
    assert _rel_err(got, want) < 1e-5
    np.testing.assert_array_equal(np.asarray(got)[~mask], 0.0)
    assert abs(_rel_loss(got, k0, h) - _rel_loss(want, k0, h)) <= 1e-6 * _rel_loss(want, k0, h)


def test_gd_converges_monotonically_to_the_exact_solution():
  k0, h, mask = _layer()
  want = _exact(k0, h, mask)
  start = np.where(mask, k0, 0)
  losses = [_rel_loss(refine.refine_gd(start, mask, k0, h, steps=s), k0, h) for s in (0, 10, 100, 3000)]
  assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]
  got = refine.refine_gd(start, mask, k0, h, steps=3000)
  assert _rel_err(got, want) < 1e-4
  assert losses[-1] <= _rel_loss(want, k0, h) * (1 + 1e-5)
  np.testing.assert_array_equal(np.asarray(got)[~mask], 0.0)


def test_dtype_and_exact_zeros_bf16():
  k0, h, mask = _layer()
  kb = jnp.asarray(k0, jnp.bfloat16)
  for fn in (refine.refine_gd, refine.refine_cg):
    got = fn(kb, mask, kb, h, steps=50)
    assert got.dtype == jnp.bfloat16
    assert bool(jnp.all(got[~mask] == 0))
    assert bool(proxjax.is_nm(got))


@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_singular_hessian_and_dead_inputs(damp):
  # 12 tokens for 32 inputs: H has rank <= 12; inputs 5 and 18 are dead (H_jj = 0).
  k0, h, mask = _layer(rank=12, dead=(5, 18))
  want = _exact(k0, h, mask)
  for fn, kw in ((refine.refine_cg, dict(steps=200)), (refine.refine_gd, dict(steps=2000))):
    got = np.asarray(fn(np.where(mask, k0, 0), mask, k0, h, ridge=damp, **kw))
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[[5, 18]], 0.0)
    np.testing.assert_array_equal(got[~mask], 0.0)
    # The minimizer is not unique; its loss is. Damping trades a little loss for a unique answer.
    tol = 1e-4 if damp == 0 else 0.05
    assert _rel_loss(got, k0, h) <= _rel_loss(want, k0, h) + tol


def test_cg_is_much_faster_than_gd():
  k0, h, mask = _layer()
  start = np.where(mask, k0, 0)
  cg = _rel_loss(refine.refine_cg(start, mask, k0, h, steps=8, tol=0.0), k0, h)
  gd = _rel_loss(refine.refine_gd(start, mask, k0, h, steps=8), k0, h)
  opt = _rel_loss(_exact(k0, h, mask), k0, h)
  assert cg - opt < 0.1 * (gd - opt)
