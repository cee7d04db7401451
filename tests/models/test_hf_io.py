"""Hugging Face safetensors I/O (load_pretrained / save_pretrained), name mapping and orbax state save/restore.

Every checkpoint is a tiny random transformers model written here (no download). Round trips are checked bit for
bit on the stored tensors and on transformers' own logits (same weights, same code: equal logits).
"""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402,F401  (bfloat16 for numpy)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from proxjax.models import (  # noqa: E402
    CheckpointError,
    LlamaForCausalLM,
    check_sparsity,
    UnsupportedModelError,
    hf,
    hf_to_path,
    load_pretrained,
    path_to_hf,
    restore_state,
    save_pretrained,
    save_state,
)

VOCAB, T = 128, 12
TOKENIZER_FILES = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": "{}",
                   "special_tokens_map.json": "{}", "generation_config.json": '{"bos_token_id": 1}',
                   "tokenizer.model": "sentencepiece-bytes"}


def make_torch_model(seed: int = 0, **overrides):
  kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False, attention_bias=True, attn_implementation="eager")
  kw.update(overrides)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" not in name:
        p.normal_(0.0, 0.15)
  return model


def read_tensors(directory) -> dict[str, np.ndarray]:
  out = {}
  for fname in sorted(os.listdir(directory)):
    if fname.endswith(".safetensors"):
      with safe_open(os.path.join(directory, fname), framework="numpy") as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def torch_logits(model, ids) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def flat_params(model) -> dict:
  return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


IDS = np.random.default_rng(0).integers(0, VOCAB, size=(2, T))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A float32 checkpoint with tokenizer files, its torch model and its logits on IDS."""
  tm = make_torch_model()
  d = tmp_path_factory.mktemp("src")
  tm.save_pretrained(d)
  for name, text in TOKENIZER_FILES.items():
    (d / name).write_text(text)
  return d, tm, torch_logits(tm, IDS)


@pytest.fixture(scope="module")
def loaded(source):
  return load_pretrained(source[0])


def break_checkpoint(src, dst, edit):
  """Copies checkpoint ``src`` to ``dst`` with ``edit(tensors)`` applied to its single model.safetensors."""
  shutil.copytree(src, dst)
  tensors = read_tensors(dst)
  edit(tensors)
  save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
  return dst


# --- names --------------------------------------------------------------------------------------------------------


def test_name_mapping(source, loaded):
  names = set(read_tensors(source[0]))
  paths = set(flat_params(loaded))
  assert {hf_to_path(n) for n in names} == paths
  assert {path_to_hf(p) for p in paths} == names
  assert hf_to_path("model.layers.1.self_attn.k_proj.bias") == ("model", "layers", 1, "self_attn", "k_proj", "bias")
  assert path_to_hf(("model", "embed_tokens", "embedding")) == "model.embed_tokens.weight"
  for bad in ("model.layers.01.mlp.up_proj.weight", "model.layers.0.mlp.foo.weight", "lm_head.bias"):
    with pytest.raises(ValueError, match="not a Llama-family tensor name"):
      hf_to_path(bad)
  with pytest.raises(ValueError, match="parameter path"):
    path_to_hf(("model", "layers", 0, "mlp", "up_proj", "embedding"))


# --- loading ------------------------------------------------------------------------------------------------------


def test_load_layout_and_values(source, loaded):
  src, tm, _ = source
  sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
  params = flat_params(loaded)
  np.testing.assert_array_equal(params[("model", "layers", 1, "self_attn", "q_proj", "kernel")],
                                sd["model.layers.1.self_attn.q_proj.weight"].T)
  np.testing.assert_array_equal(params[("model", "layers", 0, "self_attn", "v_proj", "bias")],
                                sd["model.layers.0.self_attn.v_proj.bias"])
  np.testing.assert_array_equal(params[("model", "embed_tokens", "embedding")], sd["model.embed_tokens.weight"])
  np.testing.assert_array_equal(params[("lm_head", "kernel")], sd["lm_head.weight"].T)
  assert all(v.dtype == np.float32 for v in params.values())


def test_sharding_callable(source):
  calls = []
  device = jax.devices()[0]

  def sharding(path, shape):
    calls.append((path, shape))
    return jax.sharding.SingleDeviceSharding(device)

  model = load_pretrained(source[0], sharding=sharding)
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  assert {p for p, _ in calls} == {p for p, _ in params}
  shapes = dict(calls)
  assert shapes[("model", "layers", 0, "mlp", "down_proj", "kernel")] == (64, 32)
  assert all(v.get_value().sharding == jax.sharding.SingleDeviceSharding(device) for _, v in params)


def test_hf_sharded_checkpoint_loads(source, loaded, tmp_path):
  source[1].save_pretrained(tmp_path, max_shard_size="20KB")
  shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
  assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
  a, b = flat_params(load_pretrained(tmp_path)), flat_params(loaded)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_tied_embeddings(tmp_path):
  tm = make_torch_model(tie_word_embeddings=True, num_hidden_layers=1)
  src = tmp_path / "tied"
  tm.save_pretrained(src)
  assert "lm_head.weight" not in read_tensors(src)
  model = load_pretrained(src)
  assert model.lm_head is None
  # an explicit lm_head.weight equal to the embedding is accepted; a different one is an error
  same = break_checkpoint(src, tmp_path / "same",
                          lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].copy()))
  assert load_pretrained(same).lm_head is None
  other = break_checkpoint(src, tmp_path / "other",
                           lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"] + 1))
  with pytest.raises(CheckpointError, match="lm_head.weight .*differs"):
    load_pretrained(other)
  # saved without lm_head; transformers reloads it and gives the same logits
  out = tmp_path / "out"
  save_pretrained(model, out)
  assert "lm_head.weight" not in read_tensors(out)
  back = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  np.testing.assert_array_equal(torch_logits(back, IDS), torch_logits(tm, IDS))


# --- saving -------------------------------------------------------------------------------------------------------


def test_round_trip_float32(source, loaded, tmp_path):
  src, tm, ref = source
  out = tmp_path / "out"
  save_pretrained(loaded, out, source_dir=src, metadata={"method": "prox", "sparsity": "2:4"})
  files = set(os.listdir(out))
  assert files == {"config.json", "model.safetensors", "proxjax.json", *TOKENIZER_FILES}
  for name, text in TOKENIZER_FILES.items():
    assert (out / name).read_text() == text
  assert json.loads((out / "proxjax.json").read_text()) == {"method": "prox", "sparsity": "2:4"}
  assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
  a, b = read_tensors(out), read_tensors(src)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  back, info = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                             output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  np.testing.assert_array_equal(torch_logits(back.eval(), IDS), ref)
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary directories left


def test_bf16_in_bf16_out(tmp_path):
  tm = make_torch_model(seed=1, num_hidden_layers=1).to(torch.bfloat16)
  src, out = tmp_path / "src", tmp_path / "out"
  tm.save_pretrained(src)
  model = load_pretrained(src)
  assert model.config.dtype == "bfloat16"
  params = flat_params(model)
  assert all(v.dtype == jnp.bfloat16 for v in params.values())
  q = tm.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(params[("model", "layers", 0, "self_attn", "q_proj", "kernel")].astype(np.float32),
                                q.T)
  save_pretrained(model, out)
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  a, b = read_tensors(out), read_tensors(src)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  back = transformers.LlamaForCausalLM.from_pretrained(out, dtype="auto", attn_implementation="eager").eval()
  assert back.dtype == torch.bfloat16
  # the reference is the source reloaded the same way (`tm` itself has bf16-rounded RoPE frequencies: `.to(bf16)`
  # casts that non-persistent buffer too)
  ref = transformers.LlamaForCausalLM.from_pretrained(src, dtype="auto", attn_implementation="eager").eval()
  np.testing.assert_array_equal(torch_logits(back, IDS), torch_logits(ref, IDS))
  # explicit dtypes: float32 parameters in, float32 checkpoint out
  f32 = load_pretrained(src, param_dtype=jnp.float32)
  assert f32.model.norm.weight.get_value().dtype == jnp.float32
  save_pretrained(f32, tmp_path / "f32", dtype="float32")
  assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
  assert read_tensors(tmp_path / "f32")["model.norm.weight"].dtype == np.float32


def test_sharded_save_loads_in_transformers(source, loaded, tmp_path):
  src, _, ref = source
  out = tmp_path / "sharded"
  save_pretrained(loaded, out, max_shard_bytes=20_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert len(shards) > 2 and "model.safetensors" not in shards
  assert sorted(set(index["weight_map"].values())) == shards
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in read_tensors(src).values())
  for s in shards:  # a shard exceeds the limit only if it holds a single larger tensor
    with safe_open(str(out / s), framework="numpy") as f:
      assert os.path.getsize(out / s) <= 20_000 + 1024 or len(list(f.keys())) == 1
  back, info = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                             output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  np.testing.assert_array_equal(torch_logits(back.eval(), IDS), ref)
  a, b = flat_params(load_pretrained(out)), flat_params(loaded)
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_refuses_to_overwrite(loaded, tmp_path):
  out = tmp_path / "out"
  save_pretrained(loaded, out, metadata={"run": 1})
  with pytest.raises(CheckpointError, match="not empty.*overwrite=True"):
    save_pretrained(loaded, out, metadata={"run": 2})
  assert json.loads((out / "proxjax.json").read_text()) == {"run": 1}
  save_pretrained(loaded, out, metadata={"run": 3}, overwrite=True)
  assert json.loads((out / "proxjax.json").read_text()) == {"run": 3}
  empty = tmp_path / "empty"
  empty.mkdir()
  save_pretrained(loaded, empty)  # an existing empty directory is fine
  assert (empty / "model.safetensors").is_file()
  (tmp_path / "file").write_text("x")
  with pytest.raises(CheckpointError, match="not a directory"):
    save_pretrained(loaded, tmp_path / "file")
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_no_partial_output_after_failure(loaded, tmp_path, monkeypatch):
  real_save_file = hf.save_file
  calls = []

  def failing_save_file(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) == 2:
      raise OSError("disk full (simulated)")
    real_save_file(tensors, path, metadata=metadata)

  monkeypatch.setattr(hf, "save_file", failing_save_file)
  out = tmp_path / "out"
  with pytest.raises(OSError, match="simulated"):
    save_pretrained(loaded, out, max_shard_bytes=20_000)
  assert not out.exists() and os.listdir(tmp_path) == []
  # a failing overwrite leaves the previous checkpoint untouched
  monkeypatch.setattr(hf, "save_file", real_save_file)
  save_pretrained(loaded, out, metadata={"run": 1})
  before = sorted(os.listdir(out))
  calls.clear()
  monkeypatch.setattr(hf, "save_file", failing_save_file)
  with pytest.raises(OSError, match="simulated"):
    save_pretrained(loaded, out, metadata={"run": 2}, max_shard_bytes=20_000, overwrite=True)
  assert sorted(os.listdir(out)) == before and json.loads((out / "proxjax.json").read_text()) == {"run": 1}
  assert os.listdir(tmp_path) == ["out"]


# --- errors -------------------------------------------------------------------------------------------------------


def test_not_a_checkpoint(source, tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    load_pretrained(tmp_path / "nope")
  (tmp_path / "file").write_text("x")
  with pytest.raises(CheckpointError, match="is not a directory"):
    load_pretrained(tmp_path / "file")
  with pytest.raises(CheckpointError, match="no config.json"):
    load_pretrained(tmp_path)
  only_config = tmp_path / "only_config"
  only_config.mkdir()
  shutil.copy(source[0] / "config.json", only_config)
  with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
    load_pretrained(only_config)
  (only_config / "pytorch_model.bin").write_bytes(b"\0")
  with pytest.raises(CheckpointError, match="pytorch_model.bin: only safetensors"):
    load_pretrained(only_config)
  (only_config / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="config.json: cannot read JSON"):
    load_pretrained(only_config)


def test_unknown_architecture(source, tmp_path):
  d = tmp_path / "gpt2"
  shutil.copytree(source[0], d)
  cfg = json.loads((d / "config.json").read_text()) | {"architectures": ["GPT2LMHeadModel"]}
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(UnsupportedModelError, match=r"config.json: architecture 'GPT2LMHeadModel' is not supported "
                                                  r"\(supported: LlamaForCausalLM, MistralForCausalLM"):
    load_pretrained(d)


def test_all_problems_reported_together(source, tmp_path):
  def edit(t):
    del t["model.norm.weight"]
    t["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    t["model.layers.1.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)

  d = break_checkpoint(source[0], tmp_path / "broken", edit)
  with pytest.raises(CheckpointError) as e:
    load_pretrained(d)
  msg = str(e.value)
  assert "3 problem(s)" in msg
  assert "missing tensor model.norm.weight" in msg
  assert "unexpected tensor model.layers.0.mlp.extra.weight (in model.safetensors)" in msg
  assert "model.layers.1.self_attn.k_proj.weight (in model.safetensors) has shape [32, 32], expected [16, 32]" in msg


def test_truncated_file(source, tmp_path):
  d = tmp_path / "trunc"
  shutil.copytree(source[0], d)
  path = d / "model.safetensors"
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file \(truncated"):
    load_pretrained(d)


def test_missing_and_corrupt_shards(source, tmp_path):
  d = tmp_path / "sharded"
  source[1].save_pretrained(d, max_shard_size="20KB")
  shards = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
  os.remove(d / shards[1])
  (d / shards[0]).write_bytes(b"garbage")
  with pytest.raises(CheckpointError) as e:
    load_pretrained(d)
  msg = str(e.value)
  assert f"{shards[1]}: listed in model.safetensors.index.json but missing" in msg
  assert f"{shards[0]}: not a readable safetensors file" in msg


def test_non_finite_weights(source, tmp_path):
  def edit(t):
    t["model.layers.0.mlp.up_proj.weight"][3, 5] = np.nan
    t["model.layers.1.input_layernorm.weight"][0] = np.inf

  d = break_checkpoint(source[0], tmp_path / "nan", edit)
  with pytest.raises(CheckpointError) as e:
    load_pretrained(d)
  assert "model.layers.0.mlp.up_proj.weight (in model.safetensors) has 1 non-finite value(s)" in str(e.value)
  assert "model.layers.1.input_layernorm.weight" in str(e.value)
  model = load_pretrained(d, check_finite=False)
  assert np.isnan(flat_params(model)[("model", "layers", 0, "mlp", "up_proj", "kernel")][5, 3])


# --- orbax --------------------------------------------------------------------------------------------------------


def test_orbax_round_trip(loaded, tmp_path):
  path = tmp_path / "state"
  save_state(loaded, path)
  with pytest.raises(CheckpointError, match="exists"):
    save_state(loaded, path)
  abstract = nnx.eval_shape(lambda: LlamaForCausalLM(loaded.config, rngs=nnx.Rngs(0)))
  restored = restore_state(abstract, path)
  a, b = flat_params(restored), flat_params(loaded)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert restored.config == loaded.config and restored.lm_head is not None
  with pytest.raises(CheckpointError, match="no orbax checkpoint"):
    restore_state(abstract, tmp_path / "missing")


# --- checking a saved checkpoint ------------------------------------------------------------------------------------


def test_check_sparsity(source, tmp_path):
  """2:4 along the input axis (last axis of the HF weight, axis 0 of the Flax kernel) passes; along d_out fails."""
  model = load_pretrained(source[0])
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] == "kernel" and path[0] == "model":
      k = np.asarray(var.get_value())
      keep = np.zeros(k.shape, bool)
      keep[0::4] = keep[1::4] = True  # in every group of 4 consecutive inputs, keep the first two
      if path[-2] == "v_proj":  # this one is "2:4" along the output axis instead: wrong for sparse tensor cores
        keep = np.zeros(k.shape, bool)
        keep[:, 0::4] = keep[:, 1::4] = True
      var.set_value(jnp.asarray(np.where(keep, k, 0)))
  save_pretrained(model, tmp_path / "out")
  rows = check_sparsity(tmp_path / "out")
  assert len(rows) == 14 and rows[0]["name"] == "model.layers.0.mlp.down_proj.weight"
  assert {r["name"] for r in rows if not r["ok"]} == {f"model.layers.{i}.self_attn.v_proj.weight" for i in (0, 1)}
  assert all(r["sparsity"] == 0.5 and r["zeros"] * 2 == r["size"] for r in rows)
  assert rows[0]["shape"] == [32, 64]
  assert not any(r["ok"] for r in check_sparsity(tmp_path / "out", n=1, m=4))


def test_saved_weights_get_the_usual_file_permissions(tmp_path):
  from flax import nnx as _nnx
  from proxjax.models import LlamaConfig as _Config, LlamaForCausalLM as _Model, save_pretrained as _save
  cfg = _Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
  _save(_Model(cfg, rngs=_nnx.Rngs(0)), tmp_path / "ckpt")
  modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ckpt").iterdir()}
  assert modes["model.safetensors"] == modes["config.json"], modes
