"""Magnitude, Wanda and SparseGPT baselines (``proxjax.pruning.baselines``).

Every reference here is written in the PyTorch ``(d_out, d_in)`` layout (groups along a row) and compared with the
transposed result of the Flax-layout ``(d_in, d_out)`` implementation, on non-square and on square layers: a
transposed implementation passes silently on square layers unless the data tells the two axes apart.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import proxjax
from proxjax.pruning import baselines as bl
from proxjax.core.toy import correlated_pairs_layer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "benchmarks"))
from sparsegpt_torch import sparsegpt_torch  # noqa: E402


def _keep_rows(scores: np.ndarray, n: int = 2, m: int = 4) -> np.ndarray:
  """NumPy N:M keep-mask of a ``(d_out, d_in)`` score array, groups along each row (stable: lower index wins)."""
  r, c = scores.shape
  g = scores.reshape(r, c // m, m)
  order = np.argsort(-g, axis=-1, kind="stable")
  keep = np.zeros(g.shape, bool)
  np.put_along_axis(keep, order[..., :n], True, axis=-1)
  return keep.reshape(r, c)


def _toy(d_in: int = 64, d_out: int = 32, tokens: int = 4000, seed: int = 0):
  """toy layer: the kernel ``(d_in, d_out)`` float32, ``X`` float64 and ``H = X Xᵀ / n`` float64."""
  return correlated_pairs_layer(d_in, d_out, tokens, seed=seed)


def _anisotropic_h(d: int, seed: int) -> np.ndarray:
  """A positive definite H whose diagonal spans four orders of magnitude (so the input axis matters)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(d, 3 * d)) * 10.0 ** rng.uniform(-2, 2, size=(d, 1))
  return x @ x.T / (3 * d)


def _loss(k: np.ndarray, k0: np.ndarray, h: np.ndarray) -> float:
  dk = np.asarray(k, np.float64) - np.asarray(k0, np.float64)
  return float(np.trace(dk.T @ h @ dk))


def _check_24_on_input_axis(kernel, mask):
  pruned = jnp.asarray(kernel) * mask
  assert bool(proxjax.is_nm(pruned, axis=0))
  assert not bool(proxjax.is_nm(pruned, axis=1))  # a wrong group axis would pass the line above only by luck
  assert np.all(np.asarray(mask).reshape(-1, 4, mask.shape[1]).sum(1) == 2)


# ---------------------------------------------------------------------------------------------------------------
# Magnitude and Wanda


@pytest.mark.parametrize("d_in,d_out", [(32, 12), (32, 32)])
def test_magnitude_matches_row_layout_reference(d_in, d_out):
  rng = np.random.default_rng(d_in + d_out)
  k = (rng.integers(-3, 4, size=(d_in, d_out)) * 0.5).astype(np.float32)  # many exact ties
  mask = np.asarray(bl.magnitude_mask(jnp.asarray(k)))
  np.testing.assert_array_equal(mask, _keep_rows(np.abs(k.T)).T)
  _check_24_on_input_axis(k, mask)
  k = rng.normal(size=(d_in, d_out)).astype(np.float32)
  mask = np.asarray(bl.magnitude_mask(k))
  np.testing.assert_array_equal(mask, _keep_rows(np.abs(k.T)).T)
  _check_24_on_input_axis(k, mask)


@pytest.mark.parametrize("d_in,d_out", [(48, 20), (48, 48)])
def test_wanda_matches_row_layout_reference(d_in, d_out):
  rng = np.random.default_rng(d_in * d_out)
  h = _anisotropic_h(d_in, d_in + d_out)
  k = rng.normal(size=(d_in, d_out)).astype(np.float32)
  w = k.T.astype(np.float64)
  norms = np.sqrt(np.diag(h))  # ‖X_j‖ up to the common factor sqrt(n)
  want = _keep_rows(np.abs(w) * norms[None, :]).T
  mask = np.asarray(bl.wanda_mask(jnp.asarray(k), jnp.asarray(h, jnp.float32)))
  np.testing.assert_array_equal(mask, want)
  _check_24_on_input_axis(k, mask)
  # The data tells the layouts apart: the magnitude mask and a norms-on-the-output-axis variant both differ.
  assert (mask != np.asarray(bl.magnitude_mask(k))).mean() > 0.05
  if d_in == d_out:
    wrong = _keep_rows(np.abs(w) * norms[:, None]).T
    assert (mask != wrong).mean() > 0.05


def test_wanda_dead_inputs_and_shape_errors():
  k = jnp.asarray(np.arange(1.0, 17.0, dtype=np.float32).reshape(8, 2))
  h = jnp.diag(jnp.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]))
  mask = np.asarray(bl.wanda_mask(k, h))
  # Group 0: inputs 0 and 3 are alive. Group 1: only 7 alive; the tie among dead ones goes to the lowest index (4).
  np.testing.assert_array_equal(mask[:, 0], [True, False, False, True, True, False, False, True])
  with pytest.raises(ValueError, match="hessian"):
    bl.wanda_mask(k, jnp.eye(2))
  with pytest.raises(ValueError, match="divisible"):
    bl.magnitude_mask(jnp.ones((6, 3)))


# ---------------------------------------------------------------------------------------------------------------
# SparseGPT


def _sparsegpt_vs_torch(k, h, blocksize, max_group_diff=0.005):
  new, mask = bl.sparsegpt(jnp.asarray(k), jnp.asarray(h, jnp.float32), blocksize=blocksize)
  new, mask = np.asarray(new), np.asarray(mask)
  w_ref, keep_ref = sparsegpt_torch(torch.from_numpy(np.asarray(k, np.float64).T.copy()), torch.from_numpy(h),
                                    blocksize=blocksize, dtype=torch.float64)
  k_ref, mask_ref = w_ref.numpy().T, keep_ref.numpy().T
  assert np.all(np.isfinite(new))
  assert bool(proxjax.is_nm(new, axis=0))
  assert np.all(new[~mask] == 0)
  assert np.all(mask.reshape(-1, 4, mask.shape[1]).sum(1) == 2)
  groups_differ = (mask != mask_ref).reshape(-1, 4, mask.shape[1]).any(1)
  assert groups_differ.mean() <= max_group_diff, f"{groups_differ.sum()} of {groups_differ.size} groups differ"
  same = ~np.repeat(groups_differ, 4, axis=0)  # compare the weights of the groups with the same mask
  scale = np.abs(k_ref).max()
  np.testing.assert_allclose(new[same], k_ref[same], rtol=1e-4, atol=1e-4 * scale)
  return new, mask, groups_differ.sum()


@pytest.mark.parametrize("d_in,blocksize", [(64, 16), (40, 16), (36, 16), (64, 128)])
def test_sparsegpt_matches_torch_reference(d_in, blocksize):
  k, _, h = _toy(d_in=d_in, d_out=32, tokens=2000, seed=d_in)
  _, _, ndiff = _sparsegpt_vs_torch(k, h, blocksize)
  assert ndiff == 0


def test_sparsegpt_square_layer_against_row_layout_reference():
  d = 48
  h = _anisotropic_h(d, 5) + np.diag(np.linspace(0.0, 0.5, d))
  k = np.random.default_rng(6).normal(size=(d, d)).astype(np.float32)
  new, mask, ndiff = _sparsegpt_vs_torch(k, h, 16)
  assert ndiff == 0
  # The transposed call (weights read in the other layout) gives a different answer on this data.
  new_t, _ = bl.sparsegpt(jnp.asarray(k.T), jnp.asarray(h, jnp.float32), blocksize=16)
  assert np.abs(np.asarray(new_t).T - new).max() > 0.1


def test_sparsegpt_factor_diagonal_is_not_inverse_diagonal():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(32, 32)) @ rng.normal(size=(32, 500))  # densely correlated inputs
  h = x @ x.T / 500
  u = np.asarray(bl.sparsegpt_inverse_factor(jnp.asarray(h, jnp.float32)), np.float64)
  hs = 2 * h + 0.01 * np.mean(2 * np.diag(h)) * np.eye(32)
  hinv = np.linalg.inv(hs)
  np.testing.assert_allclose(u.T @ u, hinv, rtol=1e-3, atol=1e-4 * np.abs(hinv).max())
  assert np.all(np.tril(u, -1) == 0)
  np.testing.assert_allclose(u[0, 0] ** 2, hinv[0, 0], rtol=1e-4)  # equal only for the first column ...
  assert np.all(np.abs(np.diag(u)[1:] ** 2 / np.diag(hinv)[1:] - 1) > 1e-2)  # ... and differ for all the others


def test_sparsegpt_beats_wanda_on_correlated_toy():
  k, _, h = _toy()
  hj = jnp.asarray(h, jnp.float32)
  ref = _loss(np.zeros_like(k), k, h)  # tr(Kᵀ H K)
  mag = _loss(k * np.asarray(bl.magnitude_mask(k)), k, h) / ref
  wanda = _loss(k * np.asarray(bl.wanda_mask(k, hj)), k, h) / ref
  new, mask = bl.sparsegpt(jnp.asarray(k), hj)
  sgpt = _loss(np.asarray(new), k, h) / ref
  assert sgpt < 0.8 * wanda < 0.8 * mag, (sgpt, wanda, mag)
  # SparseGPT's updates must help on its own mask, too.
  assert sgpt < _loss(k * np.asarray(mask), k, h) / ref


def test_sparsegpt_dead_inputs():
  k, x, _ = _toy(d_in=32, d_out=16, tokens=1000, seed=9)
  dead = [1, 2, 3, 8, 21]  # three dead in group 0, one each in groups 2 and 5
  x[dead] = 0.0
  h = x @ x.T / x.shape[1]
  new, mask, ndiff = _sparsegpt_vs_torch(k, h, 16)
  assert ndiff == 0
  assert np.all(new[dead] == 0)
  # Dead inputs score 0, so they are pruned before any live input.
  assert not mask[[8, 21]].any()
  assert mask[0].all()


def test_sparsegpt_not_positive_definite_is_an_error():
  k = jnp.ones((8, 3))
  with pytest.raises(ValueError, match="positive definite"):
    bl.sparsegpt(k, -jnp.eye(8))
  h = jnp.eye(8).at[2, 5].set(jnp.nan)
  with pytest.raises(ValueError, match="positive definite"):
    bl.sparsegpt(k, h)
  with pytest.raises(ValueError, match="blocksize"):
    bl.sparsegpt(k, jnp.eye(8), blocksize=6)
  with pytest.raises(ValueError, match="divisible"):
    bl.sparsegpt(jnp.ones((6, 3)), jnp.eye(6))


def test_sparsegpt_jit_vmap_dtype_and_compiles():
  k, _, h = _toy(d_in=32, d_out=8, tokens=400, seed=11)
  hj = jnp.asarray(h, jnp.float32)
  new, mask = bl.sparsegpt(jnp.asarray(k), hj, blocksize=16)
  # Same shape, other values: no new compile.
  before = bl._sparsegpt._cache_size()
  bl.sparsegpt(jnp.asarray(k) * 2.0, hj * 3.0, blocksize=16, damp=0.02)
  assert bl._sparsegpt._cache_size() == before
  # Under jit and vmap (two layers sharing H).
  f = jax.jit(jax.vmap(lambda kk: bl.sparsegpt_unchecked(kk, hj, blocksize=16)))
  ks = jnp.stack([jnp.asarray(k), -jnp.asarray(k)])
  new2, mask2, ok2 = f(ks)
  assert bool(ok2.all())
  np.testing.assert_allclose(np.asarray(new2[0]), np.asarray(new), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new2[1]), -np.asarray(new), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(mask2[0]), np.asarray(mask))
  # bfloat16 in, bfloat16 out, computed in float32.
  nb, mb = bl.sparsegpt(jnp.asarray(k, jnp.bfloat16), hj, blocksize=16)
  assert nb.dtype == jnp.bfloat16 and bool(proxjax.is_nm(nb, axis=0))
