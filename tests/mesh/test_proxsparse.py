"""ProxSparse on 8 fake CPU devices: the training state keeps its declared shardings and the learned masks equal the
single-device run's (run through tests/test_mesh.py)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from proxjax.training import proxsparse as ps
from proxjax.core import sharding
from proxjax.models import LlamaConfig, LlamaForCausalLM

SETTINGS = dict(steps=6, lam1=0.1, lam_relative=True, learning_rate=1e-2, lam2=0.1)


def _run(mesh):
  cfg = LlamaConfig.from_hf(dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=64,
                                 intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2))
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  docs = list(np.random.default_rng(0).integers(0, 64, (6, 16)))
  return ps.proxsparse(model, docs, mesh=mesh, progress=False, return_learned=True, **SETTINGS)


def _declared(mesh, path, value):
  return sharding.named(mesh, sharding.logical_axes(path, value.shape), value.shape)


def test_proxsparse_on_a_mesh_keeps_shardings_and_matches_one_device():
  mesh = sharding.make_mesh(model=4, data=2)
  ref, res = _run(None), _run(mesh)
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
