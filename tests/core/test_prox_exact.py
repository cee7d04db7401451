"""Exactness of ``proxjax.prox_24`` against an independent brute-force reference, plus its API properties.

Exactness is checked one-sidedly on the objective, which is what "exact" can mean for a non-convex problem whose
minimizer may be non-unique: for every group, with our float32 result ``w`` evaluated in float64,

    objective(w, y, lam) <= ref_obj * (1 + 1e-6) + 1e-12 * max|y|**2,

where ``ref_obj`` is the objective of the brute-force minimizer (``tests/support/prox_reference.py``, a feasible
point, hence an upper bound of the true minimum). The absolute floor ``1e-12 * scale**2`` (``scale = max|y|`` of the group) is the size
of the float32 round-off of the returned weights, ``~(6e-8 * scale)**2 * 4``, with margin: the objective scales as
``scale**2`` (see the scale invariance in ``prox_reference``). No misses are allowed.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import time
import warnings
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import proxjax

from tests.support import prox_reference

_TESTS = Path(__file__).resolve().parents[1]
FIXTURE = _TESTS / "fixtures" / "prox_fixture.npz"
REL_TOL = 1e-6
ABS_TOL_FACTOR = 1e-12
LIVE_SEED = 8675309
LIVE_PER_REGIME = 8  # x 9 regimes = 72 fresh groups a run (a few seconds); the fixture's 5000+ are the main check
_CHUNK = 1024  # groups per vmapped call: every batch is padded to this, so the fixture and live tests share 1 compile


@functools.cache
def _fixture_module():
  """``tests/fixtures/make_prox_fixture.py`` loaded by path (it is a script, not a package module)."""
  spec = importlib.util.spec_from_file_location("_proxjax_make_prox_fixture", _TESTS / "fixtures" /
                                                "make_prox_fixture.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


@functools.cache
def _batched_prox(fast: bool):
  options = proxjax.CPU_FAST_MATH if fast else None
  return jax.jit(jax.vmap(lambda y, lam: proxjax.prox_24(y, lam)), compiler_options=options)


def run_prox_groups(y: np.ndarray, lam: np.ndarray, fast: bool = False) -> np.ndarray:
  """``prox_24`` of every row of ``y`` (shape ``(N, 4)``) with its own ``lam``, via ``vmap``; float32 ``(N, 4)``."""
  n = y.shape[0]
  n_pad = -(-n // _CHUNK) * _CHUNK
  yp = np.zeros((n_pad, 4), np.float32)
  yp[:n] = y
  lp = np.ones(n_pad, np.float32)
  lp[:n] = lam
  f = _batched_prox(fast)
  out = [np.asarray(f(jnp.asarray(yp[i:i + _CHUNK]), jnp.asarray(lp[i:i + _CHUNK]))) for i in range(0, n_pad, _CHUNK)]
  w = np.concatenate(out)[:n]
  assert w.dtype == np.float32
  return w


def check_one_sided(y: np.ndarray, lam: np.ndarray, w: np.ndarray, ref_obj: np.ndarray, labels: np.ndarray,
                    ref_w: np.ndarray | None = None, what: str = "") -> None:
  """Asserts the one-sided objective bound, sign preservation and ``|w| <= |y|``, with a per-regime report."""
  y = np.asarray(y, np.float64)
  w64 = np.asarray(w, np.float64)
  ours = prox_reference.objective(w64, y, lam)
  scale = np.max(np.abs(y), axis=1)
  tol = REL_TOL * np.abs(ref_obj) + ABS_TOL_FACTOR * scale**2
  excess = ours - ref_obj - tol
  finite = np.all(np.isfinite(w64), axis=1)
  miss = ~finite | ~(excess <= 0)
  bad_sign = ~np.all(w64 * y >= 0, axis=1)
  bad_mag = ~np.all(np.abs(w64) <= np.abs(y), axis=1)

  beaten = finite & (ours < ref_obj - tol)
  if beaten.any():  # Not a failure of prox_24, but a sign the reference missed a global minimum.
    warnings.warn(f"{what}: prox_24 beats the brute-force reference on {int(beaten.sum())} groups "
                  f"(regimes {sorted(set(labels[beaten].tolist()))}); the reference may be too weak")

  problems = []
  for name, mask in (("objective misses", miss), ("sign flips", bad_sign), ("|w| > |y|", bad_mag)):
    if not mask.any():
      continue
    per_regime = {r: int(np.sum(mask & (labels == r))) for r in sorted(set(labels[mask].tolist()))}
    problems.append(f"{name}: {int(mask.sum())} of {len(y)} groups, per regime {per_regime}")
    if name == "objective misses":
      order = np.argsort(-np.where(finite, excess / np.maximum(tol, 1e-300), np.inf))[:min(8, int(mask.sum()))]
    else:
      order = np.flatnonzero(mask)[:8]
    for i in order:
      line = (f"  [{i}] {labels[i]}: y={y[i].tolist()} lam={lam[i]:.9g} ours={w[i].tolist()} "
              f"obj={ours[i]:.12g} ref_obj={ref_obj[i]:.12g} excess={excess[i]:.3g} (tol {tol[i]:.3g})")
      if ref_w is not None:
        line += f" ref_w={ref_w[i].tolist()}"
      problems.append(line)
  assert not problems, f"{what}:\n" + "\n".join(problems)


def _groups(x: np.ndarray) -> np.ndarray:
  """Groups of 4 along axis 0 of a 2-D array, as rows: ``(L, C) -> (L // 4 * C, 4)``."""
  x = np.asarray(x)
  l, c = x.shape
  return x.reshape(l // 4, 4, c).transpose(0, 2, 1).reshape(-1, 4)


def _ungroups(g: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
  """The inverse of :func:`_groups`: rows of 4 back to a ``shape`` (default ``SHAPE``) array, groups along axis 0."""
  l, c = SHAPE if shape is None else shape
  return np.asarray(g).reshape(l // 4, c, 4).transpose(0, 2, 1).reshape(l, c)


def _top2_mask(groups: np.ndarray) -> np.ndarray:
  """NumPy 2:4 mask: the two largest |.| per row, ties broken by the lower index (stable sort)."""
  order = np.argsort(-np.abs(groups), axis=1, kind="stable")
  mask = np.zeros(groups.shape, bool)
  np.put_along_axis(mask, order[:, :2], True, axis=1)
  return mask


def _normal(shape, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


SHAPE = (8, 16)  # most property tests share this shape (and so one compilation)
LAM = 0.7  # with N(0, 1) groups: a mix of dense, 3-sparse and 2-sparse results


def _prox(x, lam, **kw) -> np.ndarray:
  return np.asarray(proxjax.prox_24(jnp.asarray(x), lam, **kw))


# ----------------------------------------------------------------------------------------------------------------------
# Sanity of the reference itself


def test_reference_known_cases():
  y = np.array([0.3, -1.2, 0.7, -0.05])
  w, obj = prox_reference.brute_force_prox(y, 0.0)
  np.testing.assert_array_equal(w, y)
  assert obj == 0.0

  # lam * a1 * a2 >= a3 holds here, yet the 3-sparse point beats keeping the top two.
  w, obj = prox_reference.brute_force_prox(np.array([0.954, 0.926, 0.919, 0.912]), 1.134)
  np.testing.assert_allclose(w, [0.623, 0.552, 0.529, 0.0], atol=1.5e-3)
  top2 = 0.5 * (0.919**2 + 0.912**2)
  assert obj < top2 - 1e-3

  # Huge lam: keep the top two exactly.
  w, obj = prox_reference.brute_force_prox(np.array([0.5, -2.0, 1.5, 1.0]), 1e6)
  np.testing.assert_array_equal(w, [0.0, -2.0, 1.5, 0.0])
  assert obj == pytest.approx(0.5 * (0.25 + 1.0), rel=1e-15)

  # Tiny lam: dense shrinkage y - lam * grad R(y), up to O(lam^2).
  lam = 1e-6
  a = np.abs(y)
  grad = np.array([sum(a[p] * a[q] for p, q in itertools.combinations([j for j in range(4) if j != i], 2))
                   for i in range(4)])
  w, _ = prox_reference.brute_force_prox(y, lam)
  np.testing.assert_allclose(w, y - lam * np.sign(y) * grad, rtol=0, atol=1e-10)

  # Scale invariance: prox_{lam R}(s y) = s prox_{s lam R}(y).
  w1, o1 = prox_reference.brute_force_prox(y, 0.9)
  w2, o2 = prox_reference.brute_force_prox(1e15 * y, 0.9e-15)
  np.testing.assert_allclose(w2, 1e15 * w1, rtol=1e-12, atol=0)
  assert o2 == pytest.approx(1e30 * o1, rel=1e-12)


def test_reference_beats_grid():
  """The reference is never worse than the best point of a 21^4 grid over the box (its global search works)."""
  rng = np.random.default_rng(3)
  ys = np.concatenate([rng.normal(size=(6, 4)), [[0.954, 0.926, 0.919, 0.912], [1.0, 1.0, 1.0, 1.0]]])
  lams = np.concatenate([10.0 ** rng.uniform(-1, 1, 6), [1.134, 0.9]])
  t = np.linspace(0.0, 1.0, 21)
  unit = np.stack(np.meshgrid(t, t, t, t, indexing="ij"), axis=-1).reshape(-1, 4)
  for y, lam in zip(ys, lams):
    _, obj = prox_reference.brute_force_prox(y, lam)
    grid_min = np.min(prox_reference.objective(unit * y, y, lam))
    assert obj <= grid_min + 1e-15, (y, lam, obj, grid_min)


# ----------------------------------------------------------------------------------------------------------------------
# Exactness


@pytest.fixture(scope="module")
def fixture_data() -> dict[str, np.ndarray]:
  if not FIXTURE.exists():
    pytest.fail(f"{FIXTURE} is missing; run `python tests/fixtures/make_prox_fixture.py`")
  with np.load(FIXTURE) as f:
    data = {k: f[k] for k in f.files}
  data["labels"] = data["regime_names"][data["regime"]]
  return data


def test_fixture_is_consistent(fixture_data):
  y, lam, w, obj = fixture_data["y"], fixture_data["lam"], fixture_data["w"], fixture_data["obj"]
  assert y.shape[0] >= 5000 and y.shape == w.shape == (y.shape[0], 4) and lam.shape == obj.shape == (y.shape[0],)
  np.testing.assert_array_equal(y.astype(np.float32).astype(np.float64), y)  # float32-representable problems
  np.testing.assert_array_equal(lam.astype(np.float32).astype(np.float64), lam)
  np.testing.assert_allclose(prox_reference.objective(w, y, lam), obj, rtol=1e-12, atol=0)


@pytest.mark.parametrize("fast", [False, True], ids=["strict", "cpu_fast_math"])
def test_fixture_exact(fixture_data, fast):
  """Exact under XLA's strict floating point and under ``proxjax.CPU_FAST_MATH`` (reassociation, FMA)."""
  y, lam, labels = fixture_data["y"], fixture_data["lam"], fixture_data["labels"]
  w = run_prox_groups(y, lam, fast)
  check_one_sided(y, lam, w, fixture_data["obj"], labels, fixture_data["w"],
                  what=f"fixture (vmap over groups, {'fast math' if fast else 'strict'})")


def test_fixture_exact_plain_layout(fixture_data):
  """The lambda_sweep groups through a plain ``SHAPE`` call per lambda (no vmap; groups along axis 0, zero padded:
  the compile of the property tests below), same bound."""
  sel = fixture_data["labels"] == "lambda_sweep"
  y, lam, obj = fixture_data["y"][sel], fixture_data["lam"][sel], fixture_data["obj"][sel]
  uniq = np.unique(lam)
  slots = SHAPE[0] // 4 * SHAPE[1]
  assert max(int(np.sum(lam == v)) for v in uniq) <= slots
  w = np.empty((y.shape[0], 4), np.float32)
  for v in uniq:
    idx = np.flatnonzero(lam == v)
    groups = np.zeros((slots, 4), np.float32)
    groups[:idx.size] = y[idx]
    w[idx] = _groups(_prox(_ungroups(groups), np.float32(v), axis=0))[:idx.size]
  check_one_sided(y, lam, w, obj, fixture_data["labels"][sel], fixture_data["w"][sel], what="fixture (plain layout)")


def test_live_random_groups():
  mk = _fixture_module()
  rng = np.random.default_rng(LIVE_SEED)
  ys, lams, labels = [], [], []
  for name in mk.REGIMES:
    yy, ll = mk.generate_groups(name, LIVE_PER_REGIME, rng)
    ys.append(yy)
    lams.append(ll)
    labels += [name] * LIVE_PER_REGIME
  y, lam, labels = np.concatenate(ys), np.concatenate(lams), np.asarray(labels)
  t0 = time.perf_counter()
  ref_w, ref_obj = prox_reference.brute_force_prox_batch(y, lam, seed=LIVE_SEED)
  elapsed = time.perf_counter() - t0
  w = run_prox_groups(y, lam)
  check_one_sided(y, lam, w, ref_obj, labels, ref_w, what=f"live groups (reference took {elapsed:.1f} s)")


# ----------------------------------------------------------------------------------------------------------------------
# Properties


def test_nonpositive_lambda_is_identity():
  x = _normal(SHAPE, 0)
  for lam in (0.0, -1.0, -1e-30, np.float32(-3.0)):
    out = _prox(x, lam)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x)
  np.testing.assert_array_equal(_prox(x, 5.0, scaling=0.0), x)


def test_scaling_multiplies_hyperparams():
  x = _normal(SHAPE, 1)
  np.testing.assert_array_equal(_prox(x, 2.0, scaling=0.25), _prox(x, 0.5))


def test_huge_lambda_keeps_top2():
  x = _normal(SHAPE, 2)
  g = _groups(x)
  lam = 1e8 / np.min(np.max(np.abs(g), axis=1))  # lam * max|y| >= 1e8 in every group
  out = _groups(_prox(x, np.float32(lam)))
  np.testing.assert_array_equal(out, np.where(_top2_mask(g), g, 0.0))
  assert bool(proxjax.is_nm(jnp.asarray(_prox(x, np.float32(lam)))))


TIE_GROUPS = np.array([
    [1.0, 1.0, 1.0, 1.0],
    [0.5, 2.0, 2.0, 2.0],
    [3.0, 1.0, 1.0, 1.0],
    [2.0, -2.0, 1.0, 1.0],
    [1.0, -1.0, 1.0, -1.0],
    [0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 1.0],
    [0.0, 1.5, 0.0, -1.5],
    [1.0, 2.0, 1.0, 0.5],
    [-0.25, 0.75, 0.75, 0.75],
    [2.0, 1.0, 0.0, 1.0],
    [1.0, 1.0, 2.0, 0.0],
], np.float32)


def _tie_array(seed: int) -> np.ndarray:
  """A SHAPE array whose first groups are TIE_GROUPS (the rest random)."""
  g = _groups(_normal(SHAPE, seed))
  g[:len(TIE_GROUPS)] = TIE_GROUPS
  return _ungroups(g)


class TestTiesUnderJit(chex.TestCase):
  """Ties keep the lowest indices, called eagerly (the fast-math program) and inside a caller's ``jax.jit`` (the
  strict program, nested in the caller's), with ``λ`` a traced argument there."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_ties_keep_lowest_indices(self):
    x = _tie_array(3)
    g = _groups(x)
    assert np.array_equal(g[:len(TIE_GROUPS)], TIE_GROUPS)
    out = self.variant(proxjax.prox_24)(jnp.asarray(x), jnp.float32(1e8 / 0.25))
    chex.assert_shape(out, SHAPE)
    chex.assert_type(out, jnp.float32)
    assert bool(proxjax.is_nm(out))
    np.testing.assert_array_equal(_groups(np.asarray(out)), np.where(_top2_mask(g), g, 0.0))


def test_permutation_invariance():
  x = _normal(SHAPE, 4)
  g = _groups(x)
  base = _groups(_prox(x, LAM))
  base_obj = prox_reference.objective(base, g, LAM)
  base_sorted = -np.sort(-np.abs(base), axis=1)
  scale = np.max(np.abs(g), axis=1)
  l, c = SHAPE
  for perm in itertools.permutations(range(4)):
    xp = x.reshape(l // 4, 4, c)[:, list(perm), :].reshape(SHAPE)
    out = _groups(_prox(xp, LAM))
    np.testing.assert_allclose(prox_reference.objective(out, g[:, list(perm)], LAM), base_obj,
                               rtol=1e-6, atol=1e-12, err_msg=f"permutation {perm}")
    np.testing.assert_allclose(-np.sort(-np.abs(out), axis=1), base_sorted, rtol=0,
                               atol=1e-6 * float(np.max(scale)), err_msg=f"permutation {perm}")


def test_deterministic():
  x = _normal(SHAPE, 5)
  first = _prox(x, LAM)
  _prox(_normal(SHAPE, 6), 0.3)
  second = _prox(x, LAM)
  np.testing.assert_array_equal(first.view(np.uint32), second.view(np.uint32))


def test_bfloat16_matches_float32_rounded():
  xb = jnp.asarray(_normal(SHAPE, 7)).astype(jnp.bfloat16)
  out = proxjax.prox_24(xb, LAM)
  assert out.dtype == jnp.bfloat16
  expected = proxjax.prox_24(xb.astype(jnp.float32), LAM).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), np.asarray(expected.astype(jnp.float32)))


@pytest.mark.parametrize("s", [1e-20, 1e-10, 1e10, 1e20])
def test_extreme_magnitudes_scale_invariance(s):
  x = _normal(SHAPE, 8)
  ref = _prox(x, LAM).astype(np.float64)
  xs = (x.astype(np.float64) * s).astype(np.float32)
  out = _prox(xs, np.float32(LAM / s))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out.astype(np.float64) / s, ref, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(x))))


def test_mixed_magnitudes_are_finite_and_shrink():
  rng = np.random.default_rng(9)
  x = (10.0 ** rng.uniform(-20, 20, SHAPE) * rng.choice([-1.0, 1.0], SHAPE)).astype(np.float32)
  for lam in (1e-20, 1.0, 1e20):
    out = _prox(x, lam)
    assert np.all(np.isfinite(out)), f"lam={lam}: non-finite output"
    bad = np.flatnonzero(out.astype(np.float64) * x < 0)
    assert not bad.size, f"lam={lam}: sign flips at {bad}: y={x.ravel()[bad]}, w={out.ravel()[bad]}"
    bad = np.flatnonzero(np.abs(out) > np.abs(x))
    assert not bad.size, f"lam={lam}: |w| > |y| at {bad}: y={x.ravel()[bad]}, w={out.ravel()[bad]}"


def test_one_compile_per_shape_pytree_and_axis_layouts(monkeypatch):
  """Three checks on the two fresh shapes of part 1 (each prox shape is a compile of its own; parts 2 and 3 reuse
  part 1's instead of compiling two more):

  1. ``prox_24`` traces, and so compiles, once per shape: a new λ value or type (Python float, NumPy or JAX scalar)
     reuses the compiled program. Counted two ways, neither of which can pass vacuously: Python-level traces of the
     jitted body (a counter in the function it calls while tracing) and the entries of the jit's executable cache.
  2. A pytree is processed leaf-wise (leaves of two shapes, in dicts and a list).
  3. Axis layouts: ``(d_out, d_in)`` with groups along ``axis=1`` and ``axis=-1`` equals the transposed ``axis=0``
     call.
  """
  from proxjax.core import prox as prox_module  # pylint: disable=import-outside-toplevel

  traces: list[tuple[int, ...]] = []
  body = prox_module._prox_components  # looked up in the module when prox_leaf's body is traced

  def counting_body(y, lam):
    traces.append(y[0].shape)
    return body(y, lam)

  monkeypatch.setattr(prox_module, "_prox_components", counting_body)
  jitted = prox_module.prox_leaf.fast  # the eager call on CPU arrays takes the fast-math jit
  a = jnp.asarray(_normal((44, 3), 10))  # shapes no other test uses: their first call must trace and compile
  b = jnp.asarray(_normal((3, 44), 11))  # groups along axis 1
  cached = jitted._cache_size()
  jax.block_until_ready(proxjax.prox_24(a, 0.5))
  assert traces == [(11, 3)], traces  # groups of 4 along axis 0: 44 / 4 = 11
  assert jitted._cache_size() == cached + 1
  for lam in (0.1, 2.0, np.float32(3.0), np.float64(0.3), jnp.float32(0.25), jnp.asarray(1.5), 1e6):
    jax.block_until_ready(proxjax.prox_24(a, lam))
    assert len(traces) == 1, f"lambda {lam!r} ({type(lam).__name__}) retraced (weak vs. strong typed scalar?)"
  assert jitted._cache_size() == cached + 1
  jax.block_until_ready(proxjax.prox_24(b, 0.5, axis=1))
  assert traces == [(11, 3), (3, 11)], traces  # a new shape: one more trace and one more executable
  assert jitted._cache_size() == cached + 2

  # 2. leaf-wise on a pytree (was test_pytree_is_leafwise)
  tree = {"dense": {"kernel": _normal(SHAPE, 13), "other": _normal(SHAPE, 14)}, "list": [_normal((44, 3), 15)]}
  out = proxjax.prox_24(tree, LAM)
  chex.assert_trees_all_equal_structs(out, tree)
  chex.assert_trees_all_close(out, jax.tree.map(lambda leaf: _prox(leaf, LAM), tree), rtol=1e-6, atol=1e-30)

  # 3. axis layouts (was test_axis_layouts)
  x_oi = _normal((3, 44), 19)  # (d_out, d_in), groups along d_in
  expected = _prox(x_oi.T, LAM, axis=0).T
  for axis in (1, -1):
    np.testing.assert_allclose(_prox(x_oi, LAM, axis=axis), expected, rtol=1e-6, atol=1e-7)


def test_vmap_matches_unbatched():
  xb = np.stack([_normal(SHAPE, 16 + i) for i in range(3)])
  lams = np.array([0.3, LAM, 2.0], np.float32)
  out = jax.vmap(lambda x, lam: proxjax.prox_24(x, lam))(jnp.asarray(xb), jnp.asarray(lams))
  for i in range(3):
    np.testing.assert_allclose(np.asarray(out[i]), _prox(xb[i], lams[i]), rtol=1e-5, atol=1e-6)


def test_errors():
  with pytest.raises(ValueError, match="divisible"):
    proxjax.prox_24(jnp.ones((6, 4)), 1.0)
  with pytest.raises(ValueError, match="divisible"):
    proxjax.prox_24(jnp.ones((8, 6)), 1.0, axis=1)
  with pytest.raises(ValueError, match="divisible"):
    proxjax.prox_24({"ok": jnp.ones((8, 4)), "bad": jnp.ones((8, 6))}, 1.0, axis=-1)
  with pytest.raises(ValueError, match="float"):
    proxjax.prox_24(jnp.ones((8, 4), jnp.int32), 1.0)
  with pytest.raises(ValueError, match="float"):
    proxjax.prox_24(np.arange(8), 1.0)
  with pytest.raises(ValueError):
    proxjax.prox_24(jnp.ones((8, 4)), 1.0, axis=2)


# ----------------------------------------------------------------------------------------------------------------------
# The 2-sparse certificate and the compacted prox of the prox-gradient loop (proxjax.core.prox.certify_24,
# prox_24_listed)


@functools.cache
def _batched(fn_name: str, fast: bool):
  from proxjax.core import prox as prox_module  # pylint: disable=import-outside-toplevel
  options = proxjax.CPU_FAST_MATH if fast else None
  if fn_name == "certify":
    fn = lambda g, lam: prox_module.certify_24(g[:, None], lam)[0, 0]
  elif fn_name == "convex":
    fn = lambda g, lam: prox_module._convex_sorted(prox_module._sort4(list(jnp.abs(g)))[0], lam)
  elif fn_name == "short":  # the short program on every group, whatever its regime
    fn = lambda g, lam: jnp.stack(prox_module._prox_components(tuple(g), lam, short=True))
  else:  # each group a (4, 1) kernel, a list of one: the gathered solve, or the short program for a group in its
    # regime (one uncertified group of one is more than short_from); the full solve is checked below
    fn = lambda g, lam: prox_module.prox_24_listed(g[:, None], lam, prox_module.empty_group_list((4, 1), 1),
                                                   chunk=1)[0][:, 0]
  return jax.jit(jax.vmap(fn), compiler_options=options)


def _run_batched(fn_name: str, y: np.ndarray, lam: np.ndarray, fast: bool) -> np.ndarray:
  f = _batched(fn_name, fast)
  return np.asarray(f(jnp.asarray(y, jnp.float32), jnp.asarray(lam, jnp.float32)))


@pytest.mark.parametrize("fast", [False, True], ids=["strict", "cpu_fast_math"])
def test_certificate_is_sound_on_the_fixture(fixture_data, fast):
  """Every group the certificate passes has its top two as a global minimizer (the brute force's bound, no miss);
  it passes groups on both sides of the 2-sparse boundary's necessary condition ``λ a1 a2 >= a3`` only on the
  right one, and a good share of the fixture's 2-sparse optima (the fixture sits at the boundary on purpose)."""
  y, lam, labels = fixture_data["y"], fixture_data["lam"], fixture_data["labels"]
  cert = _run_batched("certify", y, lam, fast).astype(bool)
  top2 = np.where(_top2_mask(y), y, 0.0).astype(np.float32)
  check_one_sided(y[cert], lam[cert], top2[cert], fixture_data["obj"][cert], labels[cert],
                  what=f"certified groups ({'fast math' if fast else 'strict'})")
  a = -np.sort(-np.abs(y), axis=1)
  necessary = lam * a[:, 0] * a[:, 1] >= a[:, 2]
  two_sparse = np.sum(fixture_data["w"] != 0, axis=1) <= 2
  assert not np.any(cert & ~necessary)
  assert cert.sum() > 1500 and np.sum(two_sparse & ~cert) > 1000 and np.sum(necessary & ~cert) > 500


@pytest.mark.parametrize("fast", [False, True], ids=["strict", "cpu_fast_math"])
def test_listed_prox_exact_on_the_fixture(fixture_data, fast):
  """``prox_24_listed`` (the certificate's closed form, else the gathered Newton solve) against the brute force."""
  y, lam, labels = fixture_data["y"], fixture_data["lam"], fixture_data["labels"]
  w = _run_batched("listed", y, lam, fast)
  check_one_sided(y, lam, w, fixture_data["obj"], labels, fixture_data["w"],
                  what=f"prox_24_listed ({'fast math' if fast else 'strict'})")


def test_convex_regime_bound_holds():
  """The short program's regime (``2λ(a1 + a2 + a3) <= ½``): at random points of the box ``0 <= w <= a`` the
  Hessian ``I + λN(w)`` of the prox objective has its smallest eigenvalue at least ½ (the Gershgorin bound; it is
  not tight: all-equal groups at the regime's edge have 5/6), and the test in float32 agrees with the bound on both
  sides of the edge."""
  rng = np.random.default_rng(5)
  a = -np.sort(-np.abs(rng.standard_cauchy((4000, 4))), axis=1) * np.exp(rng.uniform(-4, 4, (4000, 1)))
  a[:500] = a[:500, :1]  # all-equal groups: the worst case of the bound
  lam = rng.uniform(0.0, 1.0, 4000) * 0.25 / (a[:, 0] + a[:, 1] + a[:, 2])
  lam[:500] = 0.25 / (3 * a[:500, 0])
  w = a * rng.uniform(0.0, 1.0, a.shape)
  w[:500] = a[:500]
  n = np.zeros((4000, 4, 4))
  for i, j in itertools.combinations(range(4), 2):
    n[:, i, j] = n[:, j, i] = w.sum(axis=1) - w[:, i] - w[:, j]
  smallest = np.linalg.eigvalsh(np.eye(4) + lam[:, None, None] * n)[:, 0]
  assert np.all(smallest >= 0.5 - 1e-9)
  np.testing.assert_allclose(smallest[:500], 5 / 6)
  inside = _run_batched("convex", a, lam * (1 - 1e-6), False).astype(bool)
  assert inside.all()
  assert not _run_batched("convex", a[:500], lam[:500] * 1.01, False).astype(bool).any()


@pytest.mark.parametrize("fast", [False, True], ids=["strict", "cpu_fast_math"])
def test_short_program_exact_in_its_regime(fixture_data, fast):
  """The short program (no homotopy, fewer Newton steps) against the brute force on every fixture group in its
  regime (about 1900 of 6300), and on fresh groups there that stress it (near-ties, tiny tails, heavy tails, the
  regime's edge), where the full program in float64 is the reference."""
  y, lam, labels = fixture_data["y"], fixture_data["lam"], fixture_data["labels"]
  inside = _run_batched("convex", y, lam, fast).astype(bool)
  assert inside.sum() > 1500
  w = _run_batched("short", y[inside], lam[inside], fast)
  check_one_sided(y[inside], lam[inside], w, fixture_data["obj"][inside], labels[inside],
                  fixture_data["w"][inside], what=f"the short program ({'fast math' if fast else 'strict'})")
  rng = np.random.default_rng(11)
  n = 2048
  fresh = np.concatenate([np.abs(rng.normal(size=(n, 4))), 1.0 + 1e-3 * rng.normal(size=(n, 4)),
                          np.abs(rng.normal(size=(n, 4))) * [1.0, 1.0, 1e-3, 1e-4],
                          np.abs(rng.standard_cauchy((n, 4)))])
  fresh *= np.sign(rng.normal(size=fresh.shape)) * np.exp(rng.uniform(-3, 3, (fresh.shape[0], 1)))
  fresh = fresh.astype(np.float32)
  a = -np.sort(-np.abs(fresh.astype(np.float64)), axis=1)
  lam_fresh = (rng.uniform(0.0, 1.0, fresh.shape[0]) ** 0.25 * 0.25 / (a[:, 0] + a[:, 1] + a[:, 2])).astype(np.float32)
  keep = _run_batched("convex", fresh, lam_fresh, fast).astype(bool)
  assert keep.mean() > 0.99
  fresh, lam_fresh = fresh[keep], lam_fresh[keep]
  with jax.enable_x64():
    ref = np.asarray(jax.jit(jax.vmap(lambda g, l: proxjax.prox_24(g, l)))(jnp.asarray(fresh, jnp.float64),
                                                                             jnp.asarray(lam_fresh, jnp.float64)))
  ref_obj = prox_reference.objective(ref, fresh.astype(np.float64), lam_fresh.astype(np.float64))
  w = _run_batched("short", fresh, lam_fresh, fast)
  check_one_sided(fresh, lam_fresh, w, ref_obj, np.repeat(["normal", "ties", "tails", "cauchy"], n)[keep],
                  what="the short program on fresh groups")


@pytest.mark.parametrize("planar", [False, True], ids=["interleaved", "planar"])
def test_listed_prox_equals_prox_24_in_every_mode(planar):
  """On a kernel along a λ sweep, with the list carried from call to call: the full solve (too many uncertified
  groups), a rebuilt list, a reused one, several chunks; every result has ``prox_24``'s objective to rounding, and a
  certified group's values are the input's, bit for bit. (On N(0, 1) groups a third stay uncertified at any λ: the
  test is loose where ``a2 ≈ a3``; along the loop's trajectories it certifies nearly every group at the end.) With
  ``planar`` the kernel goes in and comes out in planar row order (``nm.to_planar``, the prox loop's layout)."""
  from proxjax.core import prox as prox_module  # pylint: disable=import-outside-toplevel
  from proxjax.core import nm  # pylint: disable=import-outside-toplevel
  x = jnp.asarray(_normal((64, 32), 21))
  listed_prox = jax.jit(functools.partial(prox_module.prox_24_listed, chunk=128, planar=planar),
                        compiler_options=proxjax.CPU_FAST_MATH)
  if planar:
    def step(xs, lam, listed):
      out, *rest = listed_prox(nm.to_planar(xs), lam, listed)
      return (nm.from_planar(out), *rest)
  else:
    step = listed_prox
  listed = prox_module.empty_group_list(x.shape, 384)  # capacity: three quarters of the 512 groups
  seen = set()
  certify = jax.jit(prox_module.certify_24)
  for lam in np.concatenate([[0.005, 0.01], np.geomspace(0.05, 5.0, 10)]).astype(np.float32):
    xs = x * (1.0 + 1e-3 * float(lam))  # a slightly moving input, as in the loop
    out, listed, chunks, rebuilt = step(xs, jnp.float32(lam), listed)
    ref = np.asarray(proxjax.prox_24(xs, lam))
    cert = np.asarray(certify(xs, lam))
    g_out, g_in = _groups(np.asarray(out)), _groups(np.asarray(xs))
    # Equal objectives (both directions; where a near-degenerate group has two minimizers to rounding, the two
    # compiled programs may return either), and equal values elsewhere.
    ours, theirs = (prox_reference.objective(g.astype(np.float64), g_in.astype(np.float64), float(lam))
                    for g in (g_out, _groups(ref)))
    tol = REL_TOL * np.abs(theirs) + ABS_TOL_FACTOR * np.max(np.abs(g_in), axis=1) ** 2
    np.testing.assert_array_less(np.abs(ours - theirs), tol + 1e-300)
    close = np.all(np.abs(g_out - _groups(ref)) <= 1e-6 * float(jnp.max(jnp.abs(xs))), axis=1)
    assert close.mean() > 0.99
    top2 = np.where(_top2_mask(g_in), g_in, 0.0)
    np.testing.assert_array_equal(g_out[cert.reshape(-1)], top2[cert.reshape(-1)])
    seen.add({-1: "full", -2: "short"}.get(int(chunks), "rebuilt" if bool(rebuilt) else "reused"))
    seen.add(f"{max(int(chunks), 0) > 1}-chunks")
  assert seen >= {"short", "full", "rebuilt", "reused", "True-chunks"}, seen


def test_planar_prox_is_prox_24_in_planar_rows():
  """``prox_24_planar`` (the plain prox loop's prox: the kernel in planar row order) against ``prox_24`` on the same
  groups, across the 2-sparse threshold: the same result up to rounding (two compiled programs)."""
  from proxjax.core import prox as prox_module  # pylint: disable=import-outside-toplevel
  from proxjax.core import nm  # pylint: disable=import-outside-toplevel
  x = jnp.asarray(_normal((96, 40), 22))
  planar = jax.jit(lambda v, lam: nm.from_planar(prox_module.prox_24_planar(nm.to_planar(v), lam)))
  for lam in (0.0, 0.1, 0.7, 3.0):
    out, ref = np.asarray(planar(x, jnp.float32(lam))), np.asarray(proxjax.prox_24(x, lam))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out == 0, ref == 0)


def test_listed_prox_errors():
  from proxjax.core import prox as prox_module  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="multiple of chunk"):
    prox_module.prox_24_listed(jnp.ones((8, 4)), 1.0, prox_module.empty_group_list((8, 4), 6), chunk=4)
