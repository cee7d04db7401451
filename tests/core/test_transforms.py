"""Tests for proxjax.core.transforms: prox_24_update, project_nm_update, masked_updates (optax chains, jit, Flax NNX)."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import proxjax

LR = 1e-2
ROOT = pathlib.Path(__file__).resolve().parents[2]


# Compile time: the prox is compiled once per shape, dtype and axis, and every test-level jit that contains it compiles
# it again, inlined (each prox in a program costs about as much as a program of its own). So the prox tests share a
# few shapes (mainly (8, 12) float32 along axis 0, also the reference's layout) and call the transforms eagerly,
# where they reuse prox_leaf's compile cache, unless the jit is what they test (bitwise comparisons within one
# program, apply_updates fused with the prox, the jit of each transform). Test data comes from NumPy: jax.random
# would compile a sampler per shape and dtype.


def _normal(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32).astype(dtype))


def _params(dtype=jnp.float32, shape=(8, 12)):
  return {"dense": {"kernel": _normal(0, shape, dtype), "bias": _normal(1, shape[-1:], dtype)}}


def _grads(i, params):
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [_normal(100 * (i + 1) + k, x.shape, x.dtype) for k, x in enumerate(leaves)])


# Bit-exact comparisons are made within ONE jitted program, on materialized updates: across two programs XLA may fuse
# the adam arithmetic differently (e.g. contract into an FMA), so even plain adam is not bit-reproducible across them.
@jax.jit
def _adam_prox_update(params, state, grads, lam, eta):
  # λ and η are traced arguments, so every test with these shapes shares one compilation.
  updates, new_state = optax.chain(optax.adam(LR), proxjax.prox_24_update(lam, eta)).update(grads, state, params)
  plain, _ = optax.adam(LR).update(grads, state[0], params)  # adam alone, from the same state
  return updates, new_state, plain


def _run_prox(params, lam, eta, steps):
  """Returns the final params and state, and the list of (updates, plain adam updates) of every step."""
  state = optax.chain(optax.adam(LR), proxjax.prox_24_update(0.0, 1.0)).init(params)
  history = []
  for i in range(steps):
    updates, state, plain = _adam_prox_update(params, state, _grads(i, params), lam, eta)
    params = optax.apply_updates(params, updates)
    history.append((updates, plain))
  return params, state, history


def _tree_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


# ----------------------------------------------------------------------------------------------- prox_24_update


def test_prox_huge_lambda_gives_exact_24_along_default_axis_only():
  params, state, history = _run_prox(_params(), 1e6, 1.0, steps=3)
  kernel = params["dense"]["kernel"]
  assert bool(proxjax.is_nm(kernel, axis=0))  # groups along d_in (axis 0) ...
  assert not bool(proxjax.is_nm(kernel, axis=1))  # ... not along d_out
  assert float(jnp.mean(kernel == 0)) >= 0.5
  # The bias is not selected: it receives exactly the adam update.
  assert all(jnp.array_equal(u["dense"]["bias"], plain["dense"]["bias"]) for u, plain in history)
  assert int(state[1].count) == 3 and state[1].count.dtype == jnp.int32


def test_prox_zero_strength_is_exactly_the_chain_update():
  for lam, eta in [(0.0, 1.0), (1e6, 0.0), (-1.0, 1.0)]:
    params, _, history = _run_prox(_params(), lam, eta, steps=3)
    assert all(_tree_equal(u, plain) for u, plain in history)
    assert not bool(proxjax.is_nm(params["dense"]["kernel"]))


def test_prox_explicit_callable_spec_groups_along_axis_1():
  spec = lambda path, leaf: 1 if leaf.ndim == 2 else None  # noqa: E731
  tx = optax.chain(optax.adam(LR), proxjax.prox_24_update(1e6, 1.0, spec=spec))
  params = _params()
  state = tx.init(params)
  for i in range(2):  # eagerly: the prox of (8, 12) along axis 1 is compiled once, outside any test-level jit
    updates, state = tx.update(_grads(i, params), state, params)
    params = optax.apply_updates(params, updates)
  assert bool(proxjax.is_nm(params["dense"]["kernel"], axis=1))
  assert not bool(proxjax.is_nm(params["dense"]["kernel"], axis=0))


def test_prox_schedules_and_step_count():
  lam = optax.linear_schedule(0.0, 1e6, transition_steps=2)  # λ_0 = 0, λ_1 = 5e5, λ_2 = 1e6
  eta = lambda count: jnp.where(count == 2, 0.0, 1.0)  # noqa: E731  η_2 = 0
  tx = optax.chain(optax.adam(LR), proxjax.prox_24_update(lam, eta))

  def step(params, state, grads):  # eager: the same ops in the same order, so plain adam is bitwise the chain's
    updates, new_state = tx.update(grads, state, params)
    plain, _ = optax.adam(LR).update(grads, state[0], params)  # what adam alone would do from the same state
    return updates, new_state, plain

  params = _params()
  state = tx.init(params)
  assert int(state[1].count) == 0
  for t, sparse in enumerate([False, True, False]):
    updates, state, plain = step(params, state, _grads(t, params))
    params = optax.apply_updates(params, updates)
    assert int(state[1].count) == t + 1
    assert bool(proxjax.is_nm(params["dense"]["kernel"])) == sparse
    assert _tree_equal(updates, plain) == (not sparse)  # λ_t η_t = 0: exactly the adam update


def test_prox_bf16_params_stay_exactly_24():
  params = _params(jnp.bfloat16, (4, 8))
  tx = optax.chain(optax.sgd(0.1), proxjax.prox_24_update(1e6, 1.0))
  state = tx.init(params)

  @jax.jit  # under jit, where XLA may fuse apply_updates with the prox
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  params, state, updates = step(params, state, _grads(0, params))
  # Replacing updates are float32, so that apply_updates lands exactly on the bf16 prox output.
  assert updates["dense"]["kernel"].dtype == jnp.float32 and updates["dense"]["bias"].dtype == jnp.bfloat16
  assert params["dense"]["kernel"].dtype == jnp.bfloat16
  assert bool(proxjax.is_nm(params["dense"]["kernel"]))


def _groups(x, axis):
  """All groups of 4 along ``axis`` as rows of a (G, 4) numpy array, gathered by explicit indexing."""
  x = np.moveaxis(np.asarray(x, np.float32), axis, -1)
  return x.reshape(-1, x.shape[-1] // 4, 4).reshape(-1, 4)


_REF_SHAPE = (8, 12)  # the reference solves are laid out as one float32 array of _params' shape, groups along axis 0


def _groupwise_prox(z, axis, lam, eta):
  """The reference: ``prox_24`` of every group of 4 of ``z`` along ``axis`` (in :func:`_groups` order), solved as the
  groups along axis 0 of one float32 :data:`_REF_SHAPE` array (zero padded; column ``j`` of block ``i`` holds group
  ``i * 12 + j``: a layout no transform uses for these leaves, with the compile of the eager tests) and rounded to
  ``z``'s dtype (what ``prox_24`` does for bfloat16 input: it computes in float32); float32 numpy ``(G, 4)``."""
  groups = _groups(z, axis)
  rows, cols = _REF_SHAPE
  assert len(groups) <= rows // 4 * cols
  padded = np.zeros((rows // 4 * cols, 4), np.float32)
  padded[:len(groups)] = groups
  x = padded.reshape(rows // 4, cols, 4).transpose(0, 2, 1).reshape(_REF_SHAPE)
  w = np.asarray(proxjax.prox_24(jnp.asarray(x), lam, eta, axis=0).astype(z.dtype), np.float32)
  return w.reshape(rows // 4, 4, cols).transpose(0, 2, 1).reshape(-1, 4)[:len(groups)]


def test_prox_matches_the_groupwise_prox_for_mixed_shapes_axes_and_dtypes():
  # The transform solves the groups of all leaves of one dtype in one batch; every group must get its own prox.
  params = {"a": {"kernel": _normal(30, (8, 12))},
            "stack": {"kernel": _normal(31, (2, 4, 3))},
            "half": {"kernel": _normal(32, (4, 8), jnp.bfloat16)},
            "dense": {"w": _normal(33, (4, 4))}}
  axes = {"a": {"kernel": 0}, "stack": {"kernel": 1}, "half": {"kernel": 1}, "dense": {"w": None}}
  updates = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  tx = proxjax.prox_24_update(0.3, 0.5, spec=axes)
  # Solving leaf by leaf (for sharded params) must give the same update as the batched solve. Eagerly (the jit of
  # prox_24_update is tested above and, fused against leaf by leaf, bitwise below): every leaf's prox is compiled
  # once, for both.
  alone = proxjax.prox_24_update(0.3, 0.5, spec=axes, fuse=False)
  out, out_alone = tx.update(updates, tx.init(params), params)[0], alone.update(updates, alone.init(params), params)[0]
  new = optax.apply_updates(params, out)
  z = optax.apply_updates(params, updates)
  for names, tol in [(["a", "stack"], 1e-5), (["half"], 1e-2)]:  # bf16: one ulp
    for n in names:
      got = _groups(new[n]["kernel"], axes[n]["kernel"])
      want = _groupwise_prox(z[n]["kernel"], axes[n]["kernel"], 0.3, 0.5)
      np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=n)
      assert new[n]["kernel"].dtype == params[n]["kernel"].dtype
  assert jnp.array_equal(out["dense"]["w"], updates["dense"]["w"])
  assert float(jnp.mean(new["a"]["kernel"] == 0)) > 0.1  # the prox did act
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(out)[0], jax.tree.leaves(out_alone)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-6,
                               err_msg=str(path))


def test_eager_fused_update_compiles_once_and_equals_the_leafwise_solve_bitwise():
  """Called eagerly (no jit around it), the fused update stacks the two equal-shape leaves and solves them with one
  module-level jitted ``lax.map``: its second call reuses the compiled program (before 2026-12-03 every call traced and
  compiled a new one, seconds per optimizer step), and, both being fast-math CPU compilations of the same solver, it
  equals the leaf-by-leaf eager solve bitwise."""
  from proxjax.core import transforms  # pylint: disable=import-outside-toplevel

  params = {"l0": {"kernel": _normal(40, (12, 4))}, "l1": {"kernel": _normal(41, (12, 4))}}
  updates = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  fused, alone = proxjax.prox_24_update(0.3, 0.5), proxjax.prox_24_update(0.3, 0.5, fuse=False)
  stacked = transforms._prox_stacked  # pylint: disable=protected-access
  state = fused.init(params)
  out, state = fused.update(updates, state, params)
  compiled = stacked.fast._cache_size() + stacked.strict._cache_size()
  out2, _ = fused.update(updates, state, params)
  assert stacked.fast._cache_size() + stacked.strict._cache_size() == compiled >= 1
  ref, _ = alone.update(updates, alone.init(params), params)
  for n in params:
    assert jnp.array_equal(out[n]["kernel"], ref[n]["kernel"]), n
    assert jnp.array_equal(out2[n]["kernel"], ref[n]["kernel"]), n
  assert float(jnp.mean(optax.apply_updates(params, out)["l0"]["kernel"] == 0)) > 0.1  # the prox did act


LAM, ETA = 0.4, 0.5
MULTIPLIERS = {"l0": None, "l1": 3.0, "l2": 0.0, "half": 0.5}


@pytest.fixture(scope="module")
def multiplier_step():
  """One prox step with per-leaf multipliers (:data:`MULTIPLIERS`), fused and leaf by leaf, computed in ONE jitted
  program (so that the two can be compared bitwise; shared by the two tests below): a stack of three equal float32
  shapes and a lone bfloat16 shape (few prox instances in the program: it is the costliest compile of the file)."""
  params = {f"l{i}": {"kernel": _normal(90 + i, (8, 12))} for i in range(3)}
  params["half"] = {"kernel": _normal(93, (8, 4), jnp.bfloat16)}
  updates = jax.tree.map(lambda p: (0.05 * jnp.ones_like(p)).astype(p.dtype), params)
  fused = proxjax.prox_24_update(LAM, ETA, multipliers=MULTIPLIERS, fuse=True)
  alone = proxjax.prox_24_update(LAM, ETA, multipliers=MULTIPLIERS, fuse=False)

  @jax.jit
  def both(u, p, state_f, state_a):
    return fused.update(u, state_f, p), alone.update(u, state_a, p)

  (out_f, state_f), (out_a, state_a) = both(updates, params, fused.init(params), alone.init(params))
  return params, updates, {"fused": (out_f, state_f), "alone": (out_a, state_a)}


def test_prox_multipliers_scale_lambda_per_leaf_fused_and_alone(multiplier_step):
  params, updates, runs = multiplier_step
  z = optax.apply_updates(params, updates)
  for fuse, (out, state) in runs.items():
    new = optax.apply_updates(params, out)
    for name, c in MULTIPLIERS.items():
      c = 1.0 if c is None else c  # None: the plain λ
      assert float(state.multipliers[name]["kernel"]) == c, (fuse, name)
      if c == 0:  # the prox is off for that leaf: exactly the incoming update
        assert jnp.array_equal(out[name]["kernel"], updates[name]["kernel"]), (fuse, name)
        continue
      tol = 1e-2 if params[name]["kernel"].dtype == jnp.bfloat16 else 1e-6  # bf16: one ulp
      np.testing.assert_allclose(_groups(new[name]["kernel"], 0), _groupwise_prox(z[name]["kernel"], 0, LAM * c, ETA),
                                 rtol=tol, atol=tol, err_msg=f"{fuse} {name}")
    assert int(state.count) == 1
  assert proxjax.prox_24_update(LAM, ETA).init(params).multipliers is None  # unchanged state without multipliers
  with pytest.raises(ValueError, match=r"multiplier for \['half'\]\['kernel'\] must be finite and >= 0"):
    proxjax.prox_24_update(LAM, ETA, multipliers={**MULTIPLIERS, "half": -1.0}).init(params)


def test_prox_fused_stacks_equal_shapes_and_matches_the_unfused_solve_bitwise(multiplier_step):
  # Leaves of equal shape/dtype/axis are stacked and solved by one lax.map; the result is bitwise the leaf-by-leaf
  # solve (compared within one jitted program), with per-leaf multipliers and a lone bfloat16 shape.
  params, updates, runs = multiplier_step
  (out_f, _), (out_a, _) = runs["fused"], runs["alone"]
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(out_f)[0], jax.tree.leaves(out_a)):
    assert a.dtype == b.dtype and jnp.array_equal(a, b), jax.tree_util.keystr(path)
  new = optax.apply_updates(params, out_f)
  assert float(jnp.mean(new["l1"]["kernel"] == 0)) > float(jnp.mean(new["l0"]["kernel"] == 0))  # c = 3 prunes more
  assert jnp.array_equal(out_f["l2"]["kernel"], updates["l2"]["kernel"])  # c = 0: off for that leaf of the stack


def test_prox_multipliers_from_init_params_make_the_step_scale_equivariant():
  # c = 1 / mean|W| computed at init: scaling the weights (and their updates) by s scales the result by s (R is cubic).
  inv_mean = lambda path, p: 1.0 / jnp.mean(jnp.abs(p))  # noqa: E731
  params = _params()
  updates = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  outs = []
  for s in (1.0, 8.0):
    tx = proxjax.prox_24_update(0.5, 1.0, multipliers=inv_mean)
    p_s, u_s = jax.tree.map(lambda x: s * x, params), jax.tree.map(lambda x: s * x, updates)
    out, state = tx.update(u_s, tx.init(p_s), p_s)
    outs.append(optax.apply_updates(p_s, out)["dense"]["kernel"] / s)
    want = 1.0 / float(jnp.mean(jnp.abs(p_s["dense"]["kernel"])))
    assert float(state.multipliers["dense"]["kernel"]) == pytest.approx(want)
    assert state.multipliers["dense"]["bias"] is None
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
  assert 0.1 < float(jnp.mean(outs[0] == 0)) < 0.5  # a real, partial prox step


def test_prox_requires_scaling_and_params():
  with pytest.raises(TypeError):
    proxjax.prox_24_update(1.0)  # pylint: disable=no-value-for-parameter
  tx = proxjax.prox_24_update(1.0, 1.0)
  with pytest.raises(ValueError, match="needs the current params"):
    tx.init(None)
  params = _params()
  with pytest.raises(ValueError, match="needs the current params"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="different tree structures"):
    tx.update({"dense": {"kernel": params["dense"]["kernel"]}}, tx.init(params), params)
  with pytest.raises(ValueError, match=r"\['k'\]\['kernel'\].*ambiguous"):
    tx.init({"k": {"kernel": jnp.ones((2, 4, 4))}})


# -------------------------------------------------------------------------------------------- project_nm_update


@pytest.mark.parametrize("n, axis", [(2, 0), (1, 1)])
def test_project_gives_exact_nm_and_keeps_the_chain_update_on_kept_entries(n, axis):
  tx = optax.chain(optax.adam(LR), proxjax.project_nm_update(n, 4, spec={"dense": {"kernel": axis, "bias": None}}))
  params = _params()
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, new_state = tx.update(grads, state, params)
    plain, _ = optax.adam(LR).update(grads, state[0], params)
    return updates, new_state, plain

  for i in range(4):
    updates, state, plain = step(params, state, _grads(i, params))
    params, plain = optax.apply_updates(params, updates), optax.apply_updates(params, plain)
    kernel = params["dense"]["kernel"]
    assert bool(proxjax.is_nm(kernel, n, 4, axis=axis))
    assert float(jnp.mean(kernel == 0)) == 1 - n / 4
    assert bool(jnp.all((kernel == 0) | (kernel == plain["dense"]["kernel"])))  # kept entries: exact adam step
    assert jnp.array_equal(params["dense"]["bias"], plain["dense"]["bias"])
  assert not bool(proxjax.is_nm(params["dense"]["kernel"], n, 4, axis=1 - axis))


def test_project_mixed_precision_zeros_are_exact():
  # f32 params with bf16 updates: −p is not representable in bf16, so the update is returned in f32.
  params = _params(jnp.float32, (8, 4))
  tx = proxjax.project_nm_update()
  updates, _ = jax.jit(tx.update)(jax.tree.map(lambda g: (1e-3 * g).astype(jnp.bfloat16), _grads(0, params)),
                                  tx.init(params), params)
  assert updates["dense"]["kernel"].dtype == jnp.float32 and updates["dense"]["bias"].dtype == jnp.bfloat16
  new = optax.apply_updates(params, updates)
  assert new["dense"]["kernel"].dtype == jnp.float32
  assert bool(proxjax.is_nm(new["dense"]["kernel"])) and float(jnp.mean(new["dense"]["kernel"] == 0)) == 0.5


def test_project_requires_params():
  tx = proxjax.project_nm_update()
  with pytest.raises(ValueError, match="needs the current params"):
    tx.init(None)
  params = _params()
  with pytest.raises(ValueError, match="needs the current params"):
    tx.update(params, tx.init(params), None)
  with pytest.raises(ValueError, match="n < m"):
    proxjax.project_nm_update(4, 4)


# ----------------------------------------------------------------------------------------------- masked_updates


def test_masked_updates_keep_zeros_exact_over_many_adam_steps():
  params = _params()
  params["dense"]["kernel"] = proxjax.project_nm(params["dense"]["kernel"])
  masks = {"dense": {"kernel": params["dense"]["kernel"] != 0, "bias": None}}
  # Every gradient entry is non-zero, so adamw alone would move every masked weight.
  tx = optax.chain(optax.adamw(LR, weight_decay=0.1), proxjax.masked_updates(masks))
  state = tx.init(params)
  plain_tx = optax.adamw(LR, weight_decay=0.1)
  plain_params, plain_state = params, plain_tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def plain_step(params, state, grads):
    updates, state = plain_tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  start = params
  for i in range(20):
    grads = _grads(i, params)
    assert bool(jnp.all(grads["dense"]["kernel"] != 0))
    params, state = step(params, state, grads)
    plain_params, plain_state = plain_step(plain_params, plain_state, grads)
  kernel, mask = params["dense"]["kernel"], masks["dense"]["kernel"]
  assert bool(jnp.all(kernel[~mask] == 0)) and bool(proxjax.is_nm(kernel))
  assert bool(jnp.all(kernel[mask] != start["dense"]["kernel"][mask]))  # the kept entries did train
  assert jnp.array_equal(params["dense"]["bias"], plain_params["dense"]["bias"])  # None: passes through
  assert state[1].masks["dense"]["kernel"].dtype == jnp.bool_


def test_masked_updates_accepts_01_masks_and_prefix_none():
  params = {"a": {"w": jnp.ones((4,)), "b": jnp.ones((2,))}, "c": jnp.ones((3,))}
  tx = proxjax.masked_updates({"a": {"w": jnp.array([1.0, 0.0, 1.0, 0.0]), "b": None}, "c": None})
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params))
  assert jnp.array_equal(updates["a"]["w"], jnp.array([1.0, 0.0, 1.0, 0.0]))
  assert jnp.array_equal(updates["a"]["b"], jnp.ones(2)) and jnp.array_equal(updates["c"], jnp.ones(3))
  tx = proxjax.masked_updates({"a": None, "c": jnp.array([0, 1, 1])})
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params))
  assert jnp.array_equal(updates["c"], jnp.array([0.0, 1.0, 1.0]))


def test_masked_updates_mismatches_raise():
  params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
  with pytest.raises(ValueError, match="structure of the params"):
    proxjax.masked_updates({"w": jnp.ones((4, 4), bool)}).init(params)
  with pytest.raises(ValueError, match=r"mask for \['w'\] has shape \(4,\).*\(4, 4\)"):
    proxjax.masked_updates({"w": jnp.ones(4, bool), "b": None}).init(params)
  tx = proxjax.masked_updates({"w": jnp.ones((4, 4), bool), "b": None})
  state = tx.init(params)
  with pytest.raises(ValueError, match="structure of the updates"):
    tx.update({"w": jnp.ones((4, 4))}, state)
  with pytest.raises(ValueError, match=r"mask for \['w'\] has shape \(4, 4\).*\(4, 2\)"):
    tx.update({"w": jnp.ones((4, 2)), "b": jnp.ones(4)}, state)
  with pytest.raises(ValueError, match="different tree structures"):
    tx.update({"w": jnp.ones((4, 4)), "b": jnp.ones(4)}, state, {"w": jnp.ones((4, 4))})


# -------------------------------------------------------------------------------------------------- Flax NNX


class Net(nnx.Module):
  # Both kernels (8, 8): the prox solves them as one stack (one solver to compile); the embedding is 2-D too, and is
  # not selected.

  def __init__(self, rngs):
    self.embed = nnx.Embed(16, 8, rngs=rngs)
    self.fc1 = nnx.Linear(8, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.fc2 = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, ids):
    return self.fc2(nnx.gelu(self.norm(self.fc1(self.embed(ids)))))


def _nnx_loss(model, ids, target):
  return jnp.mean((model(ids) - target) ** 2)


@nnx.jit
def _nnx_steps(model, optimizer, plain, plain_optimizer, ids, target):
  """One step of each model and its optimizer, in ONE compiled program (instead of one per optimizer)."""
  for m, opt in ((model, optimizer), (plain, plain_optimizer)):
    _, grads = nnx.value_and_grad(_nnx_loss)(m, ids, target)
    opt.update(m, grads)


def test_nnx_optimizer_prox_makes_kernels_24_and_leaves_the_rest_alone():
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 16, (32,)), jnp.int32)
  target = _normal(2, (32, 8))
  model, plain = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR), proxjax.prox_24_update(1e6, 1.0))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  plain_opt = nnx.Optimizer(plain, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR)), wrt=nnx.Param)
  _nnx_steps(model, opt, plain, plain_opt, ids, target)
  # After one step (same gradients) everything but the kernels equals the plain adam model. (Exact pass-through is
  # tested above with optax alone.)
  for path in [("embed", "embedding"), ("norm", "scale"), ("norm", "bias"), ("fc1", "bias"), ("fc2", "bias")]:
    a, b = (getattr(getattr(m, path[0]), path[1])[...] for m in (model, plain))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=str(path))
  assert not jnp.allclose(model.fc1.kernel[...], plain.fc1.kernel[...])
  for _ in range(3):  # the plain model steps along (same program), unused from here on
    _nnx_steps(model, opt, plain, plain_opt, ids, target)
  assert int(opt.opt_state[2].count[...]) == 4
  for layer in (model.fc1, model.fc2):
    kernel = layer.kernel[...]
    assert bool(proxjax.is_nm(kernel)) and float(jnp.mean(kernel == 0)) >= 0.5
  assert bool(jnp.all(model.embed.embedding[...] != 0)) and bool(jnp.all(model.norm.scale[...] != 0))


def test_masked_updates_accepts_masks_built_from_a_wrapped_nnx_state():
  model = Net(nnx.Rngs(0))
  wrapped = nnx.state(model, nnx.Param)  # Variables: what nnx.Optimizer passes to init
  masks = jax.tree.map(lambda p: p > 0 if p.ndim == 2 and p.shape != (16, 8) else None, wrapped)
  tx = proxjax.masked_updates(masks)
  state = tx.init(wrapped)
  pure = nnx.as_pure(wrapped)  # pure arrays: what nnx.Optimizer passes to update
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, pure), state, pure)
  assert isinstance(updates, nnx.State)
  assert jnp.array_equal(updates["fc1"]["kernel"], (pure["fc1"]["kernel"] > 0).astype(jnp.float32))
  assert jnp.array_equal(updates["embed"]["embedding"], jnp.ones((16, 8)))


# -------------------------------------------------------------------------------------------------- example


@pytest.mark.slow  # runs examples/train_prox_nnx.py (17 s)
def test_example_trains_to_24():
  spec = importlib.util.spec_from_file_location("train_prox_nnx", ROOT / "examples" / "train_prox_nnx.py")
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  out = example.main(dense_steps=10, prox_steps=400, finetune_steps=10, verbose=False)
  assert out["is_24"] and all(out["is_24"].values()), out
  assert all(z >= 0.5 for z in out["zero_fraction"].values()), out
  assert np.isfinite([out["dense_loss"], out["prox_loss"], out["final_loss"]]).all()
  assert out["prox_steps"] < 400
