"""Sharded pruning on 8 fake CPU devices equals single-device pruning, with the declared shardings.

Run through tests/test_mesh.py (a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
Criteria (issue 6): bitwise for the one-shot masks; for the iterative methods, whose global reductions round
differently, the criterion of tests/support/agreement.py (≥ 99.9 % mask agreement; local losses within 1e-5 while
every mask is identical, within 1 % once a near-tie group went the other way).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import proxjax
from proxjax.pruning import calibration
from proxjax.pipeline import prune as pipeline
from proxjax.pruning.methods import PruneConfig, ProxConfig
from proxjax.pruning import pruner
from proxjax.core import sharding
from proxjax.models import LlamaConfig, LlamaForCausalLM
from tests.support.agreement import assert_iterative_agreement

MESHES = {"model8": dict(model=8), "data2_model4": dict(model=4, data=2)}


def _layer(d_in: int, d_out: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A kernel and a structured H (low rank + outlier inputs), so the prox needs a realistic number of iterations."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((1024, d_in // 4)) @ rng.standard_normal((d_in // 4, d_in))
  x += 0.1 * rng.standard_normal((1024, d_in))
  x[:, rng.choice(d_in, 3, replace=False)] *= 20
  return rng.standard_normal((d_in, d_out)).astype(np.float32), (x.T @ x / 1024).astype(np.float32)


def _collectives(text: str) -> dict[str, list[str]]:
  """The result shapes of the collective ops in compiled HLO text, by op."""
  out: dict[str, list[str]] = {}
  for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter"):
    results = re.findall(rf"= (\([^)]*\)|\S+) {op}(?:-start)?\(", text)
    out[op] = [shape for r in results for shape in re.findall(r"[a-z]+\d*\[[\d,]*\]", r)]
  return out


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("method,refine", [("magnitude", None), ("wanda", None), ("sparsegpt", None),
                                           ("wanda", "cg"), ("prox", "cg"), ("prox", "gd")])
def test_prune_kernel_sharded_equals_single_device(method, refine, mesh_name):
  mesh = sharding.make_mesh(**MESHES[mesh_name])
  kernel, hessian = _layer(64, 96)
  opts = ({"lam0": 0.01, "beta": 1.05, "accelerate": False, "refine_steps": 300 if refine == "gd" else None}
          if method == "prox" else {})  # the plain loop: FISTA on the mesh agrees on 99.87 % (see issue 15 notes)
  one = proxjax.prune_kernel(kernel, hessian, method, refine=refine, **opts)
  many = proxjax.prune_kernel(kernel, hessian, method, refine=refine, mesh=mesh, **opts)
  declared = sharding.kernel_sharding(mesh, kernel.shape)
  assert declared.spec == jax.sharding.PartitionSpec(None, "model")
  for arr in (many.kernel, many.mask):
    assert arr.sharding.is_equivalent_to(declared, 2), arr.sharding
  a, b = np.asarray(one.kernel), np.asarray(many.kernel)
  if method in ("magnitude", "wanda") and refine is None:
    np.testing.assert_array_equal(np.asarray(one.mask), np.asarray(many.mask))
    np.testing.assert_array_equal(a, b)
  else:
    assert_iterative_agreement({"k": np.asarray(many.kernel)}, {"k": a}, {"k": many.info.loss_after_refine},
                               {"k": one.info.loss_after_refine}, method)
    # The loop stops when the last group becomes 2:4; a sharded matmul's last-bit differences can move that group's
    # crossing by one iteration (seen on one x86-64 machine: 105 vs 106, masks and losses as above).
    assert abs(one.info.iterations - many.info.iterations) <= 1
  assert bool(proxjax.is_nm(many.kernel))


def test_paced_prox_sharded_equals_single_device():
  """The paced schedule (its count of settled groups is a global sum) on split outputs, by the criteria above."""
  mesh = sharding.make_mesh()
  kernel, hessian = _layer(64, 96)
  opts = {"lam0": 0.01, "beta": 1.05, "accelerate": False, "pace": 0.02}
  one = proxjax.prune_kernel(kernel, hessian, "prox", **opts)
  many = proxjax.prune_kernel(kernel, hessian, "prox", mesh=mesh, **opts)
  assert_iterative_agreement({"k": np.asarray(many.kernel)}, {"k": np.asarray(one.kernel)},
                             {"k": many.info.loss_after_refine}, {"k": one.info.loss_after_refine}, "prox")
  assert abs(one.info.iterations - many.info.iterations) <= 1 and bool(proxjax.is_nm(many.kernel))


@pytest.mark.parametrize("pace", [0.0, 0.01])
def test_prox_loop_communicates_only_scalars(pace):
  """The prox-gradient loop on split outputs: no gather of the kernel, only scalar all-reduces (the global stop; with
  ``pace``, the count of groups that settled)."""
  mesh = sharding.make_mesh()
  kernel, hessian = _layer(64, 96)
  k = jax.device_put(jnp.asarray(kernel), sharding.kernel_sharding(mesh, kernel.shape))
  h = jax.device_put(jnp.asarray(hessian), sharding.replicated(mesh))
  pre, k0t, lip, _ = pruner._constants(k, h, 0.99, 0.0, mesh=mesh)
  assert k0t.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  statics = pruner.prox_loop_statics(ProxConfig(pace=pace), kernel.shape, mesh, precision=jax.lax.Precision.HIGHEST)
  assert statics["column_stop"] and statics["accelerate"]  # the default loop: FISTA, each column stops on its own
  assert statics["paced"] == (pace > 0)
  fn = pruner.compiled_piece("prox_loop", mesh, kernel.shape, tuple(sorted(statics.items())))
  f32, i32 = jnp.float32, jnp.int32
  args = (k0t, pre.hessian, f32(1 / lip), f32(0), f32(0.01), f32(1.05), i32(0), i32(100), i32(0), i32(0),
          f32(pace * 16 * 96))
  ops = _collectives(fn.strict.lower(*args).compile().as_text())
  assert not ops["all-gather"] and not ops["all-to-all"] and not ops["reduce-scatter"], ops
  assert ops["all-reduce"] and all(shape.endswith("[]") for shape in ops["all-reduce"]), ops["all-reduce"]


def _tiny_llama(hidden: int = 64, inter: int = 128, layers: int = 2) -> LlamaForCausalLM:
  cfg = LlamaConfig.from_hf(dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=hidden,
                                 intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                                 num_key_value_heads=2))
  return LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))


def test_hessian_accumulation_from_batch_split_activations():
  """H from activations split over all 8 devices: one all-reduce per distinct input, replicated, equal to 1 device."""
  mesh = sharding.make_mesh(model=4, data=2)
  model = _tiny_llama()
  block = model.model.layers[0]
  rng = np.random.default_rng(0)
  h = rng.standard_normal((8, 16, 64)).astype(np.float32)
  rope = model.rope(jnp.arange(16))
  names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
  one = pipeline._hessians(block, h, rope, names, 8, None)
  sharding.place(block, mesh)
  many = pipeline._hessians(block, h, rope, names, 8, mesh)
  for n in names:
    assert many[n].xtx.sharding.is_fully_replicated
    assert int(many[n].count) == int(one[n].count) == 8 * 16
    np.testing.assert_allclose(np.asarray(many[n].xtx), np.asarray(one[n].xtx), rtol=2e-5, atol=1e-4)
  assert many["self_attn.k_proj"] is many["self_attn.q_proj"] is many["self_attn.v_proj"]  # one shared state
  graphdef, params = nnx.split(block)
  distinct = ("self_attn.q_proj", "mlp.down_proj")
  fn = pipeline.block_function("accumulate", graphdef, distinct, mesh, (8, 16, 64))
  x, valid = pipeline._padded(h, 0, 8, 8, mesh)
  assert tuple(x.sharding.spec)[0] == ("data", "model") and not any(tuple(x.sharding.spec)[1:])
  states = {n: calibration.hessian_init(pipeline._submodule(block, n).kernel.shape[0]) for n in distinct}
  ops = _collectives(fn.lower(params, x, valid, rope, states).compile().as_text())
  big = sorted(s for s in ops["all-reduce"] if s not in ("s32[]", "f32[]"))
  assert big == ["f32[128,128]", "f32[64,64]"], ops["all-reduce"]  # one reduction per distinct input


def _prune_model_sharded_equals_single_device(method):
  ids = np.random.default_rng(0).integers(0, 64, (6, 16))
  opts = {"lam0": 0.01, "beta": 1.1, "accelerate": False} if method == "prox" else {}
  results = {}
  runs = [("one", None, False), ("mesh", sharding.make_mesh(model=4, data=2), False)]
  if method in ("magnitude", "wanda"):  # offloading moves arrays, it does not change the maths: cheap methods only
    runs.append(("offload", sharding.make_mesh(), True))
  for name, mesh, offload in runs:
    model = _tiny_llama()
    rep = pipeline.prune_model(model, ids, method=PruneConfig.from_options(method, **opts), progress=False, mesh=mesh, offload=offload)
    kernels = {f"{b}.{n}": pipeline._submodule(blk, n).kernel[...]
               for b, blk in enumerate(model.model.layers) for n in pipeline.TRUE_SEQUENTIAL_STAGES[0]
               + pipeline.TRUE_SEQUENTIAL_STAGES[2] + ("self_attn.o_proj", "mlp.down_proj")}
    results[name] = ({k: np.asarray(v) for k, v in kernels.items()},
                     {f"{r.block}.{r.name}": r.loss_after_refine for r in rep.layers})
    if name == "mesh":  # the pruned kernels stay split over the model axis: nothing large replicated by accident
      for key, v in kernels.items():
        assert v.sharding.spec == jax.sharding.PartitionSpec(None, "model"), (key, v.sharding)
    if name == "offload":  # after the run every block is back on the host device
      for key, v in kernels.items():
        assert v.sharding.device_set == {jax.devices("cpu")[0]}, (key, v.sharding)
  one_k, one_l = results["one"]
  for name in sorted(set(results) - {"one"}):
    k, losses = results[name]
    if method in ("magnitude", "wanda"):
      for key in one_k:
        np.testing.assert_array_equal(k[key], one_k[key], err_msg=f"{name} {key}")
      assert losses.keys() == one_l.keys(), name  # the losses use the mesh's Hessians, which round differently
      np.testing.assert_allclose([losses[n] for n in one_l], list(one_l.values()), rtol=1e-5, err_msg=name)
    else:
      assert_iterative_agreement(k, one_k, losses, one_l, name)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_prune_model_sharded_equals_single_device(method):
  """The whole pipeline on a data x model mesh (and offloaded) equals one device bitwise for the one-shot methods."""
  _prune_model_sharded_equals_single_device(method)


@pytest.mark.slow  # the iterative methods' sharded solves are checked per kernel above in the default suite
@pytest.mark.parametrize("method", ["sparsegpt", "prox"])
def test_prune_model_sharded_iterative_equals_single_device(method):
  """The whole pipeline on a data x model mesh with SparseGPT and prox, by tests/support/agreement.py."""
  _prune_model_sharded_equals_single_device(method)


def test_sharded_checkpoint_round_trip(tmp_path):
  """A sharded safetensors checkpoint loads straight into the declared shardings and saves back identically."""
  from proxjax.models import load_pretrained, save_pretrained
  model = _tiny_llama()
  save_pretrained(model, tmp_path / "a", max_shard_bytes=60_000)
  assert len(list((tmp_path / "a").glob("model-*.safetensors"))) > 1
  mesh = sharding.make_mesh(model=4, data=2)
  loaded = load_pretrained(tmp_path / "a", sharding=sharding.checkpoint_sharding(mesh))
  want = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  got = dict(jax.tree_util.tree_flatten_with_path(nnx.state(loaded, nnx.Param))[0])
  for path, value in want:
    arr = got[path]
    np.testing.assert_array_equal(np.asarray(arr), np.asarray(value))
    declared = sharding.named(mesh, sharding.logical_axes(path, arr.shape), arr.shape)
    assert arr.sharding == declared, (path, arr.sharding)
    if len(arr.shape) == 2:  # every matrix is split (kernels over outputs, the embedding over the vocabulary)
      assert not arr.sharding.is_fully_replicated, path
  save_pretrained(loaded, tmp_path / "b", max_shard_bytes=60_000)
  again = load_pretrained(tmp_path / "b")
  for path, value in want:
    np.testing.assert_array_equal(np.asarray(dict(jax.tree_util.tree_flatten_with_path(
        nnx.state(again, nnx.Param))[0])[path]), np.asarray(value))
