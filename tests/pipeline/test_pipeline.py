"""The sequential block-by-block pipeline (``proxjax.pipeline.prune``) against a PyTorch reference, resume, selection.

The reference re-does the calibration in transformers' PyTorch Llama with forward hooks: for every stage of every
block it takes OUR pruned weights for everything pruned before that stage (so both sides see the same inputs up to
float32 rounding), captures the stage's linear inputs, and computes the Wanda mask ``top-2 of |W_ij|·‖X_j‖`` per group
of 4 along the input axis itself, in NumPy. Agreement is required on all but near-tied groups.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import proxjax
from proxjax.pipeline import prune as pipeline
from proxjax.pruning.methods import PruneConfig
from proxjax.models import load_pretrained, save_pretrained
from tests.support.torch_llama import PIPELINE_SHAPES, make_torch_model

STAGES = pipeline.TRUE_SEQUENTIAL_STAGES


def _checkpoint(tmp_path, seed=0, dtype=torch.float32, **overrides):
  model = make_torch_model("llama", seed=seed, **(PIPELINE_SHAPES | overrides)).to(dtype)
  path = tmp_path / f"ckpt-{seed}-{str(dtype).split('.')[-1]}"
  model.save_pretrained(path)
  return model, str(path)


def _ids(n=4, t=32, vocab=256, seed=0):
  # (4, 32): the calibration batches of the CLI tests too, so that the compiled block passes are shared.
  return np.random.default_rng(seed).integers(0, vocab, (n, t)).astype(np.int32)


def _wanda_reference(torch_model, ours, ids, true_sequential):
  """Masks (name → bool (d_out, d_in)) per block from torch hooks, with our pruned weights for earlier stages."""
  ref = {}
  layers = torch_model.model.layers
  dense = {k: v.clone() for k, v in torch_model.state_dict().items()}
  stages = STAGES if true_sequential else (sum(STAGES, ()),)
  for b in range(len(layers)):
    for s, stage in enumerate(stages):
      # Our pruned weights for blocks < b and the earlier stages of block b; dense for the rest.
      earlier = set(sum(stages[:s], ()))
      with torch.no_grad():
        for bb, layer in enumerate(layers):
          for name in sum(STAGES, ()):
            mod = layer.get_submodule(name)
            if bb < b or (bb == b and name in earlier):
              kernel = pipeline._submodule(ours.model.layers[bb], name).kernel[...]
              mod.weight.copy_(torch.from_numpy(np.asarray(kernel, np.float32).T.copy()))
            else:
              mod.weight.copy_(dense[f"model.layers.{bb}.{name}.weight"])
      captured = {}
      hooks = [layers[b].get_submodule(name).register_forward_hook(
          lambda mod, inp, out, name=name: captured.__setitem__(name, inp[0].detach().double().numpy()))
               for name in stage]
      with torch.no_grad():
        torch_model(torch.from_numpy(ids.astype(np.int64)))
      for h in hooks:
        h.remove()
      for name in stage:
        x = captured[name].reshape(-1, captured[name].shape[-1])
        w = dense[f"model.layers.{b}.{name}.weight"].double().numpy()  # (d_out, d_in)
        score = np.abs(w) * np.linalg.norm(x, axis=0)[None, :]
        groups = score.reshape(w.shape[0], -1, 4)
        order = np.argsort(-groups, axis=-1, kind="stable")  # ties: lower index first
        keep = np.zeros_like(groups, bool)
        np.put_along_axis(keep, order[..., :2], True, axis=-1)
        ref[(b, name)] = keep.reshape(w.shape), groups
  return ref


@pytest.mark.parametrize("true_sequential", [True, False])
def test_wanda_masks_match_torch_reference(tmp_path, true_sequential):
  torch_model, path = _checkpoint(tmp_path)
  ours = load_pretrained(path)
  ids = _ids(n=6)
  result = pipeline.prune_model(ours, ids, method="wanda", true_sequential=true_sequential, batch_size=4,
                                progress=False)  # 6 sequences in batches of 4: a padded last batch
  assert len(result.layers) == 2 * 7 and all(r.tokens == ids.size for r in result.layers)
  ref = _wanda_reference(torch_model, ours, ids, true_sequential)
  for (b, name), (keep, groups) in ref.items():
    ours_kernel = np.asarray(pipeline._submodule(ours.model.layers[b], name).kernel[...]).T
    ours_mask = ours_kernel != 0
    # Near ties (2nd and 3rd score within 1e-5 relative) may go either way in float32; everything else must agree.
    srt = -np.sort(-groups, axis=-1)
    clear = (srt[..., 1] - srt[..., 2]) > 1e-5 * srt[..., 0]
    agree = np.all(ours_mask.reshape(groups.shape) == keep.reshape(groups.shape), axis=-1)
    assert np.all(agree[clear]), f"block {b} {name}: {np.sum(~agree[clear])} clear groups differ"
    assert agree.mean() > 0.99
    dense = torch_model.state_dict()[f"model.layers.{b}.{name}.weight"].numpy()
    np.testing.assert_array_equal(ours_kernel[ours_mask], dense[ours_mask])  # Wanda keeps the weights as they are


def test_sequential_inputs_differ_from_dense_inputs(tmp_path):
  """With true_sequential the o/gate/up/down masks come from inputs through pruned q/k/v…, not the dense block."""
  _, path = _checkpoint(tmp_path)
  ids = _ids()
  seq, one = load_pretrained(path), load_pretrained(path)
  pipeline.prune_model(seq, ids, method="wanda", true_sequential=True, progress=False)
  pipeline.prune_model(one, ids, method="wanda", true_sequential=False, progress=False)
  k = lambda m, name: np.asarray(pipeline._submodule(m.model.layers[0], name).kernel[...])  # noqa: E731
  np.testing.assert_array_equal(k(seq, "self_attn.q_proj"), k(one, "self_attn.q_proj"))  # same inputs in stage 1
  assert not np.array_equal(k(seq, "mlp.down_proj"), k(one, "mlp.down_proj"))


def test_only_selected_linears_change_and_other_params_untouched(tmp_path):
  _, path = _checkpoint(tmp_path)
  model = load_pretrained(path)
  before = nnx.to_flat_state(nnx.state(model, nnx.Param))
  before = {k: np.asarray(v[...]) for k, v in before}
  res = pipeline.prune_model(model, _ids(), method="magnitude", include=["*.mlp.*"], ignore=["1.mlp.up_proj"],
                             progress=False)
  assert [(r.block, r.name) for r in res.layers] == [(0, "mlp.gate_proj"), (0, "mlp.up_proj"), (0, "mlp.down_proj"),
                                                     (1, "mlp.gate_proj"), (1, "mlp.down_proj")]
  after = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  changed = sorted(".".join(map(str, k)) for k in before if not np.array_equal(before[k], after[k]))
  assert changed == ["model.layers.0.mlp.down_proj.kernel", "model.layers.0.mlp.gate_proj.kernel",
                     "model.layers.0.mlp.up_proj.kernel", "model.layers.1.mlp.down_proj.kernel",
                     "model.layers.1.mlp.gate_proj.kernel"]
  with pytest.raises(ValueError, match="match no linear"):
    pipeline.prune_model(model, _ids(), method="magnitude", include=["*.nothing"], progress=False)


def test_resume_after_a_killed_run_gives_the_same_model(tmp_path, monkeypatch):
  _, path = _checkpoint(tmp_path)
  ids = _ids()
  state = str(tmp_path / "state")
  options = {"budget": 15}
  full = load_pretrained(path)
  pipeline.prune_model(full, ids, method=PruneConfig.from_options("prox", **options), progress=False)

  real = pipeline._pruner.prune_kernel
  calls = []

  def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) > 7:  # block 0 has 7 linears; die in block 1
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(pipeline._pruner, "prune_kernel", dying)
  with pytest.raises(KeyboardInterrupt):
    pipeline.prune_model(load_pretrained(path), ids, method=PruneConfig.from_options("prox", **options), state_dir=state, progress=False)
  monkeypatch.setattr(pipeline._pruner, "prune_kernel", real)
  assert sorted(os.listdir(state)) == ["block_0000.json", "block_0000.safetensors", "run.json"]

  resumed = load_pretrained(path)  # a fresh process would load the dense model again
  res = pipeline.prune_model(resumed, ids, method=PruneConfig.from_options("prox", **options), state_dir=state, progress=False)
  assert res.resumed_blocks == [0] and len(res.layers) == 14
  flat = lambda m: {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}  # noqa: E731
  a, b = flat(full), flat(resumed)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))

  with pytest.raises(ValueError, match="different run.*config"):
    pipeline.prune_model(load_pretrained(path), ids, method=PruneConfig.from_options("prox", budget=16), state_dir=state,
                         progress=False)
  with pytest.raises(ValueError, match="different run.*calibration"):
    pipeline.prune_model(load_pretrained(path), ids[:3], method=PruneConfig.from_options("prox", **options), state_dir=state,
                         progress=False)


def test_offload_on_one_device_prunes_as_one_device(tmp_path, monkeypatch):
  """``offload`` on one device moves blocks through a one-device mesh, but each kernel is pruned as on one device
  (``mesh=None``: the prox loop's certificate and column narrowing are off on a mesh): the same model, bit for bit."""
  _, path = _checkpoint(tmp_path)
  config = PruneConfig.from_options("prox", budget=15)
  plain = load_pretrained(path)
  pipeline.prune_model(plain, _ids(), method=config, progress=False)
  real, meshes = pipeline._pruner.prune_kernel, []
  monkeypatch.setattr(pipeline._pruner, "prune_kernel",
                      lambda *a, **kw: (meshes.append(kw.get("mesh")), real(*a, **kw))[1])
  host = jax.local_devices(backend="cpu")[0]
  offloaded = load_pretrained(path, sharding=lambda path, shape: host)
  pipeline.prune_model(offloaded, _ids(), method=config, progress=False, offload=True)
  assert len(meshes) == 14 and set(meshes) == {None}
  flat = lambda m: {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}  # noqa: E731
  a, b = flat(plain), flat(offloaded)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_bf16_checkpoint_stays_bf16_and_saves(tmp_path):
  # Without GQA every kernel is (64, 64): the bfloat16 programs are compiled for one shape (the dtype is what counts).
  _, path = _checkpoint(tmp_path, dtype=torch.bfloat16, num_key_value_heads=4)
  model = load_pretrained(path)
  assert model.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
  res = pipeline.prune_model(model, _ids(), method="sparsegpt", refine="cg", progress=False)
  assert all(r.loss_after_refine <= r.loss_before_refine + 1e-6 for r in res.layers)
  kernel = model.model.layers[1].self_attn.o_proj.kernel[...]
  assert kernel.dtype == jnp.bfloat16 and bool(proxjax.is_nm(kernel))
  out = tmp_path / "out"
  save_pretrained(model, out, source_dir=path)
  assert json.loads((out / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"


def test_nan_weights_name_the_layer(tmp_path):
  _, path = _checkpoint(tmp_path)
  model = load_pretrained(path)
  k = model.model.layers[1].mlp.gate_proj.kernel
  k[...] = k[...].at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r"block 1 mlp.gate_proj"):
    pipeline.prune_model(model, _ids(), method="wanda", progress=False)


def test_bad_calibration_ids(tmp_path):
  _, path = _checkpoint(tmp_path)
  model = load_pretrained(path)
  for bad in (np.zeros((0, 8), np.int32), np.zeros((4,), np.int32), np.zeros((2, 8), np.float32)):
    with pytest.raises(ValueError, match="calibration_ids"):
      pipeline.prune_model(model, bad, progress=False)


def test_prune_params_on_any_flax_pytree():
  class Mlp(nnx.Module):

    def __init__(self, rngs):
      self.up = nnx.Linear(16, 8, rngs=rngs)
      self.down = nnx.Linear(8, 4, rngs=rngs)

  model = Mlp(nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
  params = nnx.state(model, nnx.Param)
  stats = proxjax.hessian_update(proxjax.hessian_init(16), x)
  hessians = jax_tree_like(params, {("up", "kernel"): stats, ("down", "kernel"): np.eye(8, dtype=np.float32)})
  new, masks, infos = pipeline.prune_params(params, hessians, "wanda")
  direct = proxjax.prune_kernel(params["up"]["kernel"][...], proxjax.hessian_from_state(stats), "wanda")
  np.testing.assert_array_equal(np.asarray(new["up"]["kernel"][...]), np.asarray(direct.kernel))
  assert bool(proxjax.is_nm(new["down"]["kernel"][...]))
  assert jax.tree.leaves(masks["up"]["bias"]) == []  # None (inside an nnx Param here: results keep the structure)
  np.testing.assert_array_equal(np.asarray(new["up"]["bias"][...]), np.asarray(params["up"]["bias"][...]))
  assert infos["down"]["kernel"].method == "wanda"
  nnx.update(model, new)
  assert bool(proxjax.is_nm(model.up.kernel[...]))


def jax_tree_like(state, leaves):
  """``state`` with every leaf replaced by ``leaves.get(path)`` (``None`` elsewhere)."""
  return jax.tree.map_with_path(lambda p, _: leaves.get(tuple(k.key for k in p if hasattr(k, "key"))), state)


def test_prune_params_with_a_spec_prunes_exactly_what_it_selects():
  params = {"a": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)},
            "b": {"kernel": jnp.asarray(np.random.default_rng(1).normal(size=(8, 4)), jnp.float32)}}
  eye = jnp.eye(8)
  spec = lambda path, leaf: 0 if "a" in str(path) else None  # noqa: E731
  new, masks, _ = pipeline.prune_params(params, {"a": {"kernel": eye}, "b": {"kernel": eye}}, "magnitude",
                                        spec=spec)
  assert bool(proxjax.is_nm(new["a"]["kernel"])) and masks["b"]["kernel"] is None
  np.testing.assert_array_equal(new["b"]["kernel"], params["b"]["kernel"])  # has a Hessian, not selected: dense
  with pytest.raises(ValueError, match="no Hessian"):
    pipeline.prune_params(params, {"a": {"kernel": None}, "b": {"kernel": eye}}, "magnitude", spec=spec)


def test_the_spec_decides_which_linears_the_pipeline_prunes(tmp_path):
  _, path = _checkpoint(tmp_path)
  model = load_pretrained(path)
  only_mlp = lambda path, leaf: 0 if "mlp" in path else None  # noqa: E731
  res = pipeline.prune_model(model, _ids(), method="magnitude", spec=only_mlp, progress=False)
  assert {r.name for r in res.layers} == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
  assert not bool(proxjax.is_nm(model.model.layers[0].self_attn.q_proj.kernel[...]))
  with pytest.raises(ValueError, match="no linear is selected"):
    pipeline.prune_model(load_pretrained(path), _ids(), method="magnitude", ignore=["*"], progress=False)
