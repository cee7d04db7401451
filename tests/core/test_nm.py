"""N:M masks, projections and checks (``proxjax.core.nm``) and ``regularizer_24`` against NumPy brute force."""

from __future__ import annotations

import itertools

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import proxjax

NM = [(2, 4), (1, 4), (2, 8), (4, 8), (0, 4), (3, 4)]


def _np_keep(scores: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
  """NumPy N:M mask: the ``n`` largest scores of every group along ``axis`` (stable sort: lower index wins ties,
  NaN ranks above everything)."""
  s = np.moveaxis(np.asarray(scores, np.float64), axis, -1)
  shape = s.shape
  g = s.reshape(shape[:-1] + (shape[-1] // m, m))
  key = np.where(np.isnan(g), -np.inf, -g)
  order = np.argsort(key, axis=-1, kind="stable")
  mask = np.zeros(g.shape, bool)
  np.put_along_axis(mask, order[..., :n], True, axis=-1)
  return np.moveaxis(mask.reshape(shape), -1, axis)


def _np_project(x: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
  return np.where(_np_keep(np.abs(x), n, m, axis), x, np.zeros((), x.dtype))


def _tied(shape, seed: int, dtype=np.float32) -> np.ndarray:
  """Random array with many exact ties (and zeros of both signs): values in {0, +-0.5, +-1, +-1.5}."""
  rng = np.random.default_rng(seed)
  return (rng.integers(-3, 4, shape) * 0.5).astype(dtype)


@pytest.mark.parametrize("n,m", NM)
def test_project_nm_matches_numpy(n, m):
  for seed in range(3):
    x = _tied((16, 24), seed)
    np.testing.assert_array_equal(np.asarray(proxjax.project_nm(jnp.asarray(x), n, m)), _np_project(x, n, m, 0))
  x = np.random.default_rng(7).normal(size=(8, 16)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(proxjax.project_nm(x, n, m)), _np_project(x, n, m, 0))


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2, -3])
def test_project_nm_axis_3d(axis):
  x = _tied((8, 12, 16), 11)
  got = np.asarray(proxjax.project_nm(x, 2, 4, axis=axis))
  np.testing.assert_array_equal(got, _np_project(x, 2, 4, axis % 3))
  assert bool(proxjax.is_nm(got, 2, 4, axis=axis))


class TestMaskUnderJit(chex.TestCase):
  """``nm_mask`` and ``project_nm`` give NumPy's answer on heavily tied data, called eagerly and inside ``jax.jit``."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*NM)
  def test_nm_mask_counts_and_ties(self, n, m):
    scores = _tied((16, 8), 3)
    mask = self.variant(lambda s: proxjax.nm_mask(s, n, m))(jnp.asarray(scores))
    chex.assert_shape(mask, scores.shape)
    chex.assert_type(mask, bool)
    mask = np.asarray(mask)
    np.testing.assert_array_equal(mask, _np_keep(scores, n, m, 0))
    np.testing.assert_array_equal(mask.reshape(16 // m, m, 8).sum(axis=1), n)
    projected = self.variant(lambda x: proxjax.project_nm(x, n, m, axis=1))(jnp.asarray(scores.T))
    chex.assert_type(projected, jnp.float32)
    np.testing.assert_array_equal(np.asarray(projected), _np_project(scores.T, n, m, 1))


def test_nm_mask_ties_lowest_index_and_non_floating_refused():
  np.testing.assert_array_equal(np.asarray(proxjax.nm_mask(jnp.array([3.0, 1.0, 3.0, 2.0]))), [1, 0, 1, 0])
  np.testing.assert_array_equal(np.asarray(proxjax.nm_mask(jnp.array([1.0, 1.0, 1.0, 1.0]))), [1, 1, 0, 0])
  for bad in (jnp.array([0, 5, 5, 5]), jnp.array([True, False, True, False])):  # non-floating: refused
    with pytest.raises(ValueError, match="floating"):
      proxjax.nm_mask(bad)
    with pytest.raises(ValueError, match="floating"):
      proxjax.is_nm(bad)
    with pytest.raises(ValueError, match="floating"):
      proxjax.project_nm(bad)


def test_nan_is_kept():
  x = np.array([0.5, np.nan, 2.0, 1.0], np.float32)
  got = np.asarray(proxjax.project_nm(x))
  np.testing.assert_array_equal(np.isnan(got), [False, True, False, False])
  np.testing.assert_array_equal(np.nan_to_num(got), [0.0, 0.0, 2.0, 0.0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_project_nm_keeps_dtype(dtype):
  x = jnp.asarray(_tied((8, 4), 5)).astype(dtype)
  out = proxjax.project_nm(x)
  assert out.dtype == dtype
  np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)),
                                _np_project(np.asarray(x.astype(jnp.float32)), 2, 4, 0))


def test_is_nm_cases():
  assert bool(proxjax.is_nm(np.zeros((8, 3), np.float32)))
  assert bool(proxjax.is_nm(np.array([1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0])))
  assert not bool(proxjax.is_nm(np.array([1.0, 0.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0])))
  assert not bool(proxjax.is_nm(np.random.default_rng(0).normal(size=(8, 4))))
  assert bool(proxjax.is_nm(np.array([1.0, 0.0, 0.0, 0.0]), 1, 4))
  assert not bool(proxjax.is_nm(np.array([1.0, 1.0, 0.0, 0.0]), 1, 4))
  assert bool(proxjax.is_nm(np.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), 4, 8))
  # 2:4 along axis 1 but not along axis 0.
  x = np.array([[1.0, 1.0, 0.0, 0.0]] * 4, np.float32)
  assert bool(proxjax.is_nm(x, axis=1))
  assert bool(proxjax.is_nm(x, axis=-1))
  assert not bool(proxjax.is_nm(x, axis=0))
  assert bool(proxjax.is_nm(np.array([-0.0, 0.0, 1.0, 1.0])))  # -0.0 is a zero


def _np_regularizer(x: np.ndarray, axis: int) -> float:
  g = np.moveaxis(np.abs(np.asarray(x, np.float64)), axis, -1)
  g = g.reshape(-1, 4)
  total = 0.0
  for row in g:
    total += sum(row[i] * row[j] * row[k] for i, j, k in itertools.combinations(range(4), 3))
  return total


def test_regularizer_24_matches_loop():
  x = np.random.default_rng(1).normal(size=(8, 12)).astype(np.float32)
  for axis, xx in ((0, x), (1, x.T.copy()), (-1, x.T.copy())):
    got = proxjax.regularizer_24(xx, axis=axis)
    assert got.shape == () and got.dtype == jnp.float32
    assert float(got) == pytest.approx(_np_regularizer(xx, axis % 2), rel=1e-5)
  # Zero exactly on 2:4 arrays.
  assert float(proxjax.regularizer_24(proxjax.project_nm(x))) == 0.0
  assert float(proxjax.regularizer_24(np.array([1.0, -2.0, 3.0, 0.5]))) == pytest.approx(
      1 * 2 * 3 + 1 * 2 * 0.5 + 1 * 3 * 0.5 + 2 * 3 * 0.5)


def test_errors():
  x = jnp.ones((8, 4))
  for n, m in ((4, 4), (5, 4), (-1, 4)):
    with pytest.raises(ValueError):
      proxjax.project_nm(x, n, m)
    with pytest.raises(ValueError):
      proxjax.nm_mask(x, n, m)
    with pytest.raises(ValueError):
      proxjax.is_nm(x, n, m)
  with pytest.raises(ValueError):
    proxjax.project_nm(x, 2.0, 4)
  with pytest.raises(ValueError, match="divisible"):
    proxjax.project_nm(jnp.ones((6, 4)))
  with pytest.raises(ValueError, match="divisible"):
    proxjax.project_nm(x, 2, 8, axis=1)
  with pytest.raises(ValueError, match="divisible"):
    proxjax.nm_mask(jnp.ones((6,)))
  with pytest.raises(ValueError, match="divisible"):
    proxjax.is_nm(jnp.ones((10,)))
  with pytest.raises(ValueError, match="divisible"):
    proxjax.regularizer_24(jnp.ones((6, 4)))
  with pytest.raises(ValueError, match="float"):
    proxjax.project_nm(jnp.ones((8, 4), jnp.int32))
  with pytest.raises(ValueError, match="float"):
    proxjax.project_nm(np.ones((8, 4), bool))
  with pytest.raises(ValueError):
    proxjax.project_nm(jnp.float32(1.0))
  with pytest.raises(ValueError, match="out of range"):
    proxjax.project_nm(x, axis=2)
