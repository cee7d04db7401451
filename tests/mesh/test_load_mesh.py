"""Loading a checkpoint onto 8 fake CPU devices reads each tensor block by block (issue 18): the parameters equal the
single-device load bitwise, each on its declared sharding, and every byte of tensor data is read exactly once.

Run through tests/test_mesh.py (a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``). Tiny
one-block models written by :func:`proxjax.models.save_pretrained` in bfloat16 over several shard files: a Mixtral
(stacked expert kernels, replicated) and a Llama with tied embeddings plus an explicit ``lm_head.weight``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from proxjax.core import sharding
from proxjax.models import CheckpointError, LlamaConfig, LlamaForCausalLM, load_pretrained, save_pretrained
from tests.support.reads import elements, recording

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2)


def _write(tmp_path, name, **overrides):
  model = nnx.eval_shape(lambda: LlamaForCausalLM(LlamaConfig(**SMALL | overrides), rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  nnx.update(model, jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), nnx.state(model)))
  out = tmp_path / name
  save_pretrained(model, out, dtype="bfloat16", max_shard_bytes=4000)
  return out


def _params(model):
  return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _tensor_bytes(directory):
  out = {}
  for fname in os.listdir(directory):
    if fname.endswith(".safetensors"):
      with safe_open(str(directory / fname), framework="numpy") as f:
        out.update({k: f.get_tensor(k).nbytes for k in f.keys()})
  return out


@pytest.mark.parametrize("kind", ["mixtral", "tied"])
def test_load_on_a_mesh_reads_each_block_once_and_equals_one_device(kind, tmp_path):
  overrides = (dict(architecture="MixtralForCausalLM", num_experts=4, num_experts_per_tok=2) if kind == "mixtral"
               else dict(tie_word_embeddings=True))
  ckpt = _write(tmp_path, kind, **overrides)
  assert len([f for f in os.listdir(ckpt) if f.endswith(".safetensors")]) > 1
  if kind == "tied":  # an explicit lm_head.weight equal to the embeddings: read block by block and compared
    path = ckpt / sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))[0]
    with safe_open(str(path), framework="numpy") as f:
      tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert "model.embed_tokens.weight" in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, str(path), metadata={"format": "pt"})
  sizes = _tensor_bytes(ckpt)
  for param_dtype in (None, jnp.float32):  # bfloat16 as on disk, and cast to float32
    one = _params(load_pretrained(ckpt, param_dtype=param_dtype))
    for mesh in (sharding.make_mesh(model=8), sharding.make_mesh(model=4, data=2)):
      with recording() as reads:
        many = _params(load_pretrained(ckpt, param_dtype=param_dtype, sharding=sharding.checkpoint_sharding(mesh)))
      assert one.keys() == many.keys()
      for p, x in one.items():
        y = many[p]
        assert y.dtype == x.dtype and y.sharding == sharding.checkpoint_sharding(mesh)(p, y.shape), p
        np.testing.assert_array_equal(np.asarray(y).view(np.uint8), np.asarray(x).view(np.uint8), err_msg=str(p))
      assert all(r[1] is not None for r in reads), "a whole-tensor read (get_tensor)"
      read = {}
      for name, ranges, nbytes in reads:
        read.setdefault(name, []).append((tuple(map(tuple, ranges)), nbytes))
      assert read.keys() == sizes.keys()
      for name, blocks in read.items():
        assert len(set(b for b, _ in blocks)) == len(blocks), f"{name}: a block read twice"
        assert sum(n for _, n in blocks) == sizes[name], name  # the blocks tile the tensor: every byte once
      sharded = [n for n, b in read.items() if len(b) > 1]
      assert "model.embed_tokens.weight" in sharded and "model.layers.0.self_attn.q_proj.weight" in sharded
      if kind == "mixtral":  # the stacked experts are replicated: each expert's tensor read whole, once
        assert all(len(read[n]) == 1 for n in read if ".experts." in n)
      else:
        assert [b for b, _ in read["lm_head.weight"]] == [b for b, _ in read["model.embed_tokens.weight"]]
      assert all(elements(list(map(list, b))) for bs in read.values() for b, _ in bs)


def test_bad_tensors_on_a_mesh(tmp_path):
  model = nnx.eval_shape(lambda: LlamaForCausalLM(LlamaConfig(**SMALL | dict(tie_word_embeddings=True)),
                                                  rngs=nnx.Rngs(0)))
  nnx.update(model, jax.tree.map(lambda s: np.ones(s.shape, s.dtype), nnx.state(model)))
  ckpt = tmp_path / "bad"
  save_pretrained(model, ckpt)
  with safe_open(str(ckpt / "model.safetensors"), framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  tensors["model.layers.0.mlp.up_proj.weight"][30, 5] = np.nan  # in the last of the 8 devices' row blocks
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  tensors["lm_head.weight"][63, 0] = 2.0
  save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
  mesh = sharding.make_mesh(model=8)
  with pytest.raises(CheckpointError) as e:
    load_pretrained(ckpt, sharding=sharding.checkpoint_sharding(mesh))
  assert "model.layers.0.mlp.up_proj.weight (in model.safetensors) has 1 non-finite value(s)\n" in str(e.value)
  assert "lm_head.weight (in model.safetensors) differs from model.embed_tokens.weight but" in str(e.value)
  tensors["lm_head.weight"][63, 0] = tensors["model.embed_tokens.weight"][63, 0]
  save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
  model = load_pretrained(ckpt, sharding=sharding.checkpoint_sharding(mesh), check_finite=False)
  assert np.isnan(np.asarray(model.model.layers[0].mlp.up_proj.kernel.get_value())[5, 30])
