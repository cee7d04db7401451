"""ProxSparse on 8 fake CPU devices: the training state keeps its declared shardings, the learned masks equal the
single-device run's, and a run resumed from a sharded save continues where the uninterrupted one goes (run through
tests/test_mesh.py)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

from proxjax.training import loop
from proxjax.training import proxsparse as ps
from proxjax.core import sharding
from proxjax.models import LlamaConfig, LlamaForCausalLM

SETTINGS = dict(steps=6, lam1=0.1, lam_relative=True, learning_rate=1e-2, lam2=0.1)


def _run(mesh, **kw):
  cfg = LlamaConfig.from_hf(dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=64,
                                 intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2))
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  docs = list(np.random.default_rng(0).integers(0, 64, (6, 16)))
  return ps.proxsparse(model, docs, mesh=mesh, progress=False, return_learned=True, **SETTINGS, **kw)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(model=4, data=2)


@pytest.fixture(scope="module")
def on_mesh(mesh):
  return _run(mesh)


def _declared(mesh, path, value):
  return sharding.named(mesh, sharding.logical_axes(path, value.shape), value.shape)


@pytest.mark.slow  # a whole ProxSparse run twice (mesh and one device)
def test_proxsparse_on_a_mesh_keeps_shardings_and_matches_one_device(mesh, on_mesh):
  ref, res = _run(None), on_mesh
  np.testing.assert_allclose(res.losses, ref.losses, rtol=1e-4)
  np.testing.assert_allclose(res.fraction_24, ref.fraction_24, atol=2e-3)
  # The learned params, the adam moments and the final (masked) params sit on their declared shardings.
  for tree in (res.learned, nnx.as_pure(nnx.state(res.model, nnx.Param))):
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
      assert value.sharding.is_equivalent_to(_declared(mesh, path, value), value.ndim), (path, value.sharding)
  moments = 0
  for path, value in jax.tree_util.tree_flatten_with_path(nnx.as_pure(nnx.state(res.optimizer)))[0]:
    assert value.sharding.is_equivalent_to(_declared(mesh, path, value), value.ndim), (path, value.sharding)
    if value.ndim == 2 and path[-1].key == "kernel":
      moments += 1
      assert not value.sharding.is_fully_replicated, path  # kernels' moments are split like the kernels
  assert moments == 2 * 8  # mu and nu of the 7 projections and lm_head
  # The same masks (up to the odd group decided by float rounding), and the masked weights are the originals.
  same = total = 0
  for a, b in zip(jax.tree.leaves(res.masks), jax.tree.leaves(ref.masks)):
    same, total = same + int(np.sum(np.asarray(a) == np.asarray(b))), total + a.size
  assert same >= 0.999 * total, (same, total)
  for a, b in zip(jax.tree.leaves(nnx.state(res.model, nnx.Param)), jax.tree.leaves(nnx.state(ref.model, nnx.Param))):
    a, b = np.asarray(a), np.asarray(b)
    both = (a != 0) & (b != 0)
    np.testing.assert_array_equal(a[both], b[both])  # kept entries are the original weights in both runs


class _Stop(Exception):
  pass


@pytest.mark.slow  # a full run on the mesh, then an interrupted and a resumed one
def test_proxsparse_resumes_on_a_mesh(mesh, on_mesh, tmp_path):
  """A run resumed from a sharded save continues on the declared shardings and ends where the uninterrupted one does.

  To rounding, not bit for bit: on 8 fake CPU devices the cross-device reductions are not reproducible run to run
  (two runs of the same code can differ in the last bit of a gradient norm). The bitwise resume checks are the
  single-device ones (tests/training/test_proxsparse.py, tests/training/test_training_loop.py)."""
  def stop(t, metrics):
    if t == 3:
      raise _Stop()

  with pytest.raises(_Stop):
    _run(mesh, state_dir=tmp_path, save_every=2, callback=stop)
  assert sorted(os.listdir(tmp_path)) == sorted([loop.STATE_FILE, "step_0000002"])
  resumed = _run(mesh, state_dir=tmp_path, save_every=2)
  assert resumed.resumed_from == 2 and len(resumed.losses) == SETTINGS["steps"]
  np.testing.assert_allclose(resumed.losses, on_mesh.losses, rtol=1e-6)
  for tree, want in ((resumed.learned, on_mesh.learned), (nnx.as_pure(nnx.state(resumed.optimizer)), None)):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, value in flat:  # restored onto the declared shardings, and trained on from there
      assert value.sharding.is_equivalent_to(_declared(mesh, path, value), value.ndim), (path, value.sharding)
    if want is not None:
      for (path, a), b in zip(flat, jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=str(path))
  same = total = 0
  for a, b in zip(jax.tree.leaves(resumed.masks), jax.tree.leaves(on_mesh.masks)):
    same, total = same + int(np.sum(np.asarray(a) == np.asarray(b))), total + a.size
  assert same >= 0.999 * total, (same, total)
