"""An optax/NNX training step with the proxjax transforms on 8 fake CPU devices: params and optimizer state keep
their declared shardings, and the values equal the single-device step (run through tests/test_mesh.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import proxjax
from proxjax.core import sharding
from proxjax.training.loop import lm_loss
from proxjax.models import LlamaConfig, LlamaForCausalLM


@nnx.jit
def _step(model, optimizer, ids):
  loss, grads = nnx.value_and_grad(lm_loss)(model, ids)
  optimizer.update(model, grads)
  return loss


def _train(mesh, fuse, steps=3):
  # Two kernel shapes, (64, 64) and (64, 32): the fused single-device prox compiles two solvers, not four.
  cfg = LlamaConfig.from_hf(dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=64,
                                 intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2))
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  if mesh is not None:
    sharding.place(model, mesh)
  tx = optax.chain(optax.adam(1e-2), proxjax.prox_24_update(optax.linear_schedule(1e2, 1e5, steps), 1.0, fuse=fuse))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  if mesh is not None:
    sharding.place(optimizer, mesh, nnx.optimizer.OptState)
  ids = np.random.default_rng(0).integers(0, 64, (8, 16))
  ids = jnp.asarray(ids) if mesh is None else jax.device_put(ids, sharding.activation_sharding(mesh, ids.shape))
  losses = [float(_step(model, optimizer, ids)) for _ in range(steps)]
  return model, optimizer, losses


def test_prox_training_step_sharded():
  mesh = sharding.make_mesh(model=4, data=2)
  ref_model, _, ref_losses = _train(None, None)
  model, optimizer, losses = _train(mesh, False)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  params = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  ref = dict(jax.tree_util.tree_flatten_with_path(nnx.state(ref_model, nnx.Param))[0])
  for path, value in params:
    declared = sharding.named(mesh, sharding.logical_axes(path, value.shape), value.shape)
    assert value.sharding.is_equivalent_to(declared, value.ndim), (path, value.sharding)
    np.testing.assert_allclose(np.asarray(value), np.asarray(ref[path]), rtol=1e-3, atol=1e-5, err_msg=str(path))
    if path[-2].key == "kernel" and value.ndim == 2:  # the prox zeros are the same zeros
      np.testing.assert_array_equal(np.asarray(value) == 0, np.asarray(ref[path]) == 0)
  for path, value in jax.tree_util.tree_flatten_with_path(nnx.state(optimizer, nnx.optimizer.OptState))[0]:
    if value.ndim == 2:  # adam's moments are split like their kernels
      declared = sharding.named(mesh, sharding.logical_axes(path, value.shape), value.shape)
      assert value.sharding.is_equivalent_to(declared, 2) and not value.sharding.is_fully_replicated, path
