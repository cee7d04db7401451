"""Tests for proxjax.core.spec: default rule, callable and pytree specs, NNX states, errors."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import proxjax


class Small(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 8, rngs=rngs)
    self.fc1 = nnx.Linear(8, 12, rngs=rngs)
    self.norm = nnx.LayerNorm(12, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(12, 4, rngs=rngs)])


@pytest.fixture(scope="module")
def model():
  return Small(nnx.Rngs(0))


def _by_path(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda v: v is None)[0]
  return {jax.tree_util.keystr(p): v for p, v in flat}


def test_default_selects_only_2d_kernels_of_nnx_model(model):
  expected = {
      "['blocks'][0]['bias']": None, "['blocks'][0]['kernel']": 0,
      "['embed']['embedding']": None,
      "['fc1']['bias']": None, "['fc1']['kernel']": 0,
      "['norm']['bias']": None, "['norm']['scale']": None,
  }
  wrapped = nnx.state(model, nnx.Param)  # as passed to tx.init by nnx.Optimizer (Variables)
  pure = nnx.as_pure(wrapped)  # as passed to tx.update
  for params in (wrapped, pure):
    spec = proxjax.resolve_spec(params)
    assert isinstance(spec, nnx.State)
    assert _by_path(spec) == expected
    assert jax.tree.structure(spec, is_leaf=lambda v: v is None) == jax.tree.structure(
        jax.tree.map(lambda _: 0, pure), is_leaf=lambda v: v is None)


def test_callable_sees_pure_paths_ending_in_kernel(model):
  seen = []

  def spec(path, leaf):
    seen.append((path, leaf.shape))
    return proxjax.default_spec(path, leaf)

  proxjax.resolve_spec(nnx.state(model, nnx.Param), spec)
  kernel_paths = [p for p, _ in seen if p[-1] == jax.tree_util.DictKey("kernel")]
  assert len(kernel_paths) == 2 and len(seen) == 7
  assert (jax.tree_util.DictKey("blocks"), jax.tree_util.DictKey(0), jax.tree_util.DictKey("kernel")) in kernel_paths


def test_default_spec_skips_variable_value_key(model):
  # Flattening a state that still has its Variables yields paths ending in GetAttrKey('value').
  path, leaf = next((p, x) for p, x in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
                    if "fc1" in jax.tree_util.keystr(p) and "kernel" in jax.tree_util.keystr(p))
  assert isinstance(path[-1], jax.tree_util.GetAttrKey)
  assert proxjax.default_spec(path, leaf) == 0


def test_default_on_linen_style_dict_and_keys():
  params = {"params": {"Dense_0": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)},
                       "Embed_0": {"embedding": jnp.ones((12, 8))},
                       "layers": [{"kernel": jnp.ones((4, 4))}],
                       "int_kernel": {"kernel": jnp.ones((4, 4), jnp.int32)}}}
  spec = proxjax.resolve_spec(params)
  assert spec["params"]["Dense_0"] == {"kernel": 0, "bias": None}
  assert spec["params"]["Embed_0"] == {"embedding": None}
  assert spec["params"]["layers"] == [{"kernel": 0}]  # SequenceKey on the way
  assert spec["params"]["int_kernel"] == {"kernel": None}


def test_3d_kernel_is_ambiguous_unless_explicit():
  params = {"stack": {"kernel": jnp.ones((3, 8, 4))}, "fc": {"kernel": jnp.ones((4, 8))}}
  with pytest.raises(ValueError, match=r"\['stack'\]\['kernel'\].*\(3, 8, 4\).*explicit spec"):
    proxjax.resolve_spec(params)

  def spec(path, leaf):
    return 1 if leaf.ndim == 3 else proxjax.default_spec(path, leaf)

  assert proxjax.resolve_spec(params, spec) == {"stack": {"kernel": 1}, "fc": {"kernel": 0}}


def test_linear_general_kernel_raises_by_default_and_takes_explicit_axis():
  layer = nnx.LinearGeneral((4, 8), 12, axis=(-2, -1), rngs=nnx.Rngs(0))
  state = nnx.state(layer, nnx.Param)
  assert nnx.as_pure(state)["kernel"].shape == (4, 8, 12)
  with pytest.raises(ValueError, match="kernel.*ambiguous"):
    proxjax.resolve_spec(state)
  spec = jax.tree.map(lambda x: 1 if x.ndim == 3 else None, nnx.as_pure(state))
  assert _by_path(proxjax.resolve_spec(state, spec)) == {"['bias']": None, "['kernel']": 1}


def test_pytree_spec_full_prefix_and_negative_axis():
  params = {"a": {"kernel": jnp.ones((8, 12)), "bias": jnp.ones(12)}, "b": {"w": jnp.ones((2, 4, 3))}}
  full = {"a": {"kernel": -1, "bias": None}, "b": {"w": 1}}
  assert proxjax.resolve_spec(params, full) == {"a": {"kernel": 1, "bias": None}, "b": {"w": 1}}
  prefix = {"a": None, "b": -2}
  assert proxjax.resolve_spec(params, prefix) == {"a": {"kernel": None, "bias": None}, "b": {"w": 1}}


def test_pytree_spec_with_variables(model):
  # A spec built by mapping over the wrapped state keeps Param boxes around the ints/None: accepted.
  state = nnx.state(model, nnx.Param)
  spec = jax.tree.map(lambda x: 1 if x.ndim == 2 else None, state)
  assert isinstance(jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))[0], nnx.Param)
  out = _by_path(proxjax.resolve_spec(state, spec))
  assert out == {k: (1 if k.endswith(("['kernel']", "['embedding']")) else None) for k in out}
  assert out["['embed']['embedding']"] == 1 and out["['norm']['scale']"] is None


def test_mismatched_pytree_spec_raises():
  params = {"a": {"kernel": jnp.ones((8, 4))}}
  with pytest.raises(ValueError, match="structure of params"):
    proxjax.resolve_spec(params, {"b": 0})
  with pytest.raises(ValueError, match="structure of params"):
    proxjax.resolve_spec(params, {"a": {"kernel": {"deeper": 0}}})


def test_non_divisible_axis_names_path():
  params = {"first": {"kernel": jnp.ones((6, 8))}}
  with pytest.raises(ValueError, match=r"\['first'\]\['kernel'\].*size 6.*m=4"):
    proxjax.resolve_spec(params)
  assert proxjax.resolve_spec(params, {"first": {"kernel": 1}}) == {"first": {"kernel": 1}}
  assert proxjax.resolve_spec(params, {"first": {"kernel": None}}) == {"first": {"kernel": None}}
  with pytest.raises(ValueError, match=r"\['first'\]\['kernel'\].*m=8"):
    proxjax.resolve_spec({"first": {"kernel": jnp.ones((12, 8))}}, m=8)


@pytest.mark.parametrize("entry, match", [(True, "bool"), (0.0, "int axis or None"), (2, "out of range"),
                                          ("kernel", "int axis or None")])
def test_bad_entries_raise(entry, match):
  with pytest.raises(ValueError, match=match):
    proxjax.resolve_spec({"w": jnp.ones((8, 4))}, lambda path, leaf: entry)


def test_non_floating_selected_leaf_raises():
  with pytest.raises(ValueError, match=r"\['w'\].*non-floating"):
    proxjax.resolve_spec({"w": jnp.ones((8, 4), jnp.int32)}, {"w": 0})


def test_works_on_shape_dtype_structs():
  params = jax.eval_shape(lambda: {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)})
  assert proxjax.resolve_spec(params) == {"kernel": 0, "bias": None}
