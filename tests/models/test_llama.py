"""Parity of proxjax.models.LlamaForCausalLM with transformers' PyTorch Llama / Mistral / Qwen2 (float32, CPU).

Every model is a tiny random one (tests/support/torch_llama.py, no download): hidden 64, 4 query heads, 2 key/value
heads (GQA), intermediate 128, 2 layers, vocab 256. Weights are re-drawn with a larger scale than transformers' 0.02 so
that attention is far from uniform (otherwise a wrong mask or head grouping would barely show). Tolerance: every
comparison is ``|ours − torch| ≤ TOL · max|torch|`` with ``TOL = 2e-5`` (float32 with different summation orders).
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from proxjax.models import (  # noqa: E402
    LINEAR_NAMES,
    LlamaConfig,
    LlamaForCausalLM,
    UnsupportedModelError,
    load_pretrained,
    rope_inv_freq,
)
from tests.support.torch_llama import (  # noqa: E402
    B,
    HF_CLASSES,
    T,
    assert_close,
    input_ids,
    make_torch_model,
    rel_err,
    to_np,
    torch_logits,
)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.fixture(scope="module")
def pair_factory(tmp_path_factory):
  """(torch model, our model loaded from its save_pretrained output), cached per variant."""
  cache = {}

  def make(key: str, kind: str, **overrides):
    if key not in cache:
      tm = make_torch_model(kind, **overrides)
      d = tmp_path_factory.mktemp(key)
      tm.save_pretrained(d)
      cache[key] = (tm, load_pretrained(d))
    return cache[key]

  return make


@pytest.fixture(scope="module")
def llama(pair_factory):
  """Untied GQA Llama with attention and MLP biases."""
  return pair_factory("llama", "llama", attention_bias=True, mlp_bias=True)


@nnx.jit
def _forward(model, ids, positions):
  return model(ids, positions)


def _graphdef(config: LlamaConfig):
  """The module structure of ``config`` without initialising weights."""
  return nnx.graphdef(nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0))))


def test_config_fields(llama):
  tm, model = llama
  c = model.config
  assert (c.architecture, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
      "LlamaForCausalLM", 64, 4, 2, 16)
  assert (c.qkv_bias, c.o_bias, c.mlp_bias, c.tie_word_embeddings, c.dtype) == (True, True, True, False, "float32")
  assert model.lm_head is not None and isinstance(model.model.layers, nnx.List)
  assert model.model.layers[1].self_attn.q_proj.kernel.get_value().shape == (64, 64)
  assert model.model.layers[1].self_attn.k_proj.kernel.get_value().shape == (64, 32)
  assert model.model.layers[1].mlp.down_proj.kernel.get_value().shape == (128, 64)


def test_submodules_match_torch(llama):
  """Embedding, RMSNorm, rotary cos/sin, attention, MLP and a decoder layer, each on torch's own inputs."""
  tm, model = llama
  ids = input_ids()
  captured = {}

  def hook(name):
    def fn(module, args, kwargs, output):
      captured[name] = (args, kwargs, output)
    return fn

  layer_t = tm.model.layers[1]
  handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in [
      ("norm", layer_t.input_layernorm), ("attn", layer_t.self_attn), ("mlp", layer_t.mlp), ("layer", layer_t),
      ("rotary", tm.model.rotary_emb)]]
  try:
    torch_logits(tm, ids)
  finally:
    for h in handles:
      h.remove()
  norm_in = captured["norm"][0][0]
  attn_in = captured["attn"][1]["hidden_states"]
  mlp_in = captured["mlp"][0][0]
  layer_args, layer_kwargs, _ = captured["layer"]
  layer_in = layer_args[0] if layer_args else layer_kwargs["hidden_states"]

  @nnx.jit  # one compile for all the submodule calls (eager JAX compiles every op separately)
  def run(model, ids, norm_in, attn_in, mlp_in, layer_in):
    layer = model.model.layers[1]
    rope = model.rope(jnp.arange(ids.shape[1]))
    return dict(embed=model.embed(ids), norm=layer.input_layernorm(norm_in), cos=rope[0], sin=rope[1],
                attn=layer.self_attn(attn_in, rope), mlp=layer.mlp(mlp_in), layer=layer(layer_in, rope))

  ours = run(model, ids, *(jnp.asarray(to_np(x)) for x in (norm_in, attn_in, mlp_in, layer_in)))
  with torch.no_grad():
    assert_close(ours["embed"], tm.model.embed_tokens(torch.as_tensor(ids, dtype=torch.long)), tol=0)
  assert_close(ours["norm"], captured["norm"][2])
  cos_t, sin_t = captured["rotary"][2]
  assert ours["cos"].shape == (T, 16)
  assert_close(ours["cos"], cos_t[0], tol=1e-6)
  assert_close(ours["sin"], sin_t[0], tol=1e-6)
  assert_close(ours["attn"], captured["attn"][2][0])
  assert_close(ours["mlp"], captured["mlp"][2])
  out = captured["layer"][2]
  assert_close(ours["layer"], out[0] if isinstance(out, tuple) else out)


def test_logits_match_torch_and_jit(llama):
  tm, model = llama
  ids = input_ids(1)
  ref = torch_logits(tm, ids)
  logits = _forward(model, ids, jnp.arange(T))
  assert logits.dtype == jnp.float32 and logits.shape == (B, T, 256)
  assert_close(logits, ref)


def test_batched_positions(llama):
  """(B, T) positions with a different offset per row."""
  tm, model = llama
  ids = input_ids(2)
  pos = np.arange(T)[None, :] + np.array([[0], [37]])
  cos, _ = model.rope(pos)
  assert cos.shape == (B, T, 16)
  assert_close(_forward(model, ids, jnp.asarray(pos)), torch_logits(tm, ids, pos))


def test_return_inputs_match_torch_hooks(llama):
  tm, model = llama
  ids = input_ids(3)
  captured = {}
  layer_t = tm.model.layers[1]
  handles = []
  for name in LINEAR_NAMES:
    mod = layer_t.get_submodule(name)
    handles.append(mod.register_forward_hook(lambda m, a, o, name=name: captured.__setitem__(name, a[0])))
  try:
    torch_logits(tm, ids)
  finally:
    for h in handles:
      h.remove()

  @nnx.jit
  def run(model, ids):
    h = model.embed(ids)
    rope = model.rope(jnp.arange(ids.shape[1]))
    h = model.model.layers[0](h, rope)
    h_out, inputs = model.model.layers[1](h, rope, return_inputs=True)
    return h_out, inputs, model.model.layers[1](h, rope)

  h_out, inputs, h_plain = run(model, ids)
  assert set(inputs) == set(LINEAR_NAMES)
  for name in LINEAR_NAMES:
    d_in = model.model.layers[1].self_attn.o_proj.kernel.get_value().shape[0] if name.endswith("o_proj") else None
    assert inputs[name].shape[:2] == (B, T), name
    if d_in is not None:
      assert inputs[name].shape[-1] == d_in
    assert_close(inputs[name], captured[name])
  assert_close(h_out, h_plain, tol=1e-6)

  def same_objects(model, ids):  # q/k/v share one activation, gate/up another (checked while tracing)
    _, inp = model.model.layers[0](model.embed(ids), model.rope(jnp.arange(ids.shape[1])), return_inputs=True)
    assert inp["self_attn.q_proj"] is inp["self_attn.k_proj"] is inp["self_attn.v_proj"]
    assert inp["mlp.gate_proj"] is inp["mlp.up_proj"]
    return inp["mlp.up_proj"]

  nnx.eval_shape(same_objects, model, jnp.asarray(ids))


@pytest.mark.parametrize("variant", ["llama3_tied", "linear_relu", "mistral_window", "qwen2_tied"])
def test_variant_logits(pair_factory, variant):
  kind, overrides = {
      "llama3_tied": ("llama", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True,
                                    max_position_embeddings=131072)),
      "linear_relu": ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
                                    hidden_act="relu", num_key_value_heads=1)),
      "mistral_window": ("mistral", dict(sliding_window=5)),
      "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
  }[variant]
  tm, model = pair_factory(variant, kind, **overrides)
  c = model.config
  ids = input_ids(4)
  ref = torch_logits(tm, ids)
  assert_close(_forward(model, ids, jnp.arange(T)), ref)
  np.testing.assert_allclose(rope_inv_freq(c), tm.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
  if variant == "llama3_tied":
    assert model.lm_head is None and c.rope_type == "llama3"
    # all three llama3 regions (kept, interpolated, divided) occur at head_dim 16, theta 5e5, context 8192
    plain = rope_inv_freq(dataclasses.replace(c, rope_scaling=None))
    ratio = plain / rope_inv_freq(c)
    assert np.isclose(ratio, 1).any() and np.isclose(ratio, 8).any() and ((ratio > 1.01) & (ratio < 7.99)).any()
  elif variant == "linear_relu":
    assert c.hidden_act == "relu" and c.rope_type == "linear" and c.num_key_value_groups == 4
    # the activation matters: the same weights with SiLU give different logits
    silu = nnx.merge(_graphdef(dataclasses.replace(c, hidden_act="silu")), nnx.state(model))
    assert rel_err(_forward(silu, ids, jnp.arange(T)), ref) > 1e-2
  elif variant == "mistral_window":
    assert c.sliding_window == 5 and c.architecture == "MistralForCausalLM"
    # the window matters: without it the logits differ clearly
    full = nnx.merge(_graphdef(dataclasses.replace(c, sliding_window=None)), nnx.state(model))
    assert rel_err(_forward(full, ids, jnp.arange(T)), ref) > 1e-2
  else:
    assert (c.qkv_bias, c.o_bias, c.mlp_bias) == (True, False, False) and model.lm_head is None
    assert model.model.layers[0].self_attn.o_proj.bias is None
    assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_bf16_params_float32_compute(tmp_path):
  """bf16 parameters with float32 compute match torch run in float32 on the same (bf16-rounded) weights."""
  tm = make_torch_model("llama", seed=5).to(torch.bfloat16)
  tm.save_pretrained(tmp_path)
  model = load_pretrained(tmp_path)
  assert model.model.layers[0].mlp.up_proj.kernel.get_value().dtype == jnp.bfloat16
  assert model.model.embed_tokens.embedding.get_value().dtype == jnp.bfloat16
  ids = input_ids(6)
  h = model.embed(ids)
  assert h.dtype == jnp.float32
  # A float32 torch model with the same (bf16-rounded) weights. Not `tm.float()`: that would keep the RoPE inverse
  # frequencies that `.to(torch.bfloat16)` rounded to bf16 (a non-persistent buffer).
  ref_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
  assert_close(_forward(model, ids, jnp.arange(T)), torch_logits(ref_model, ids))


def test_compute_dtype_and_abstract_build(llama):
  """float32 parameters with bfloat16 compute: activations bf16, logits float32 and close to torch's."""
  tm, model = llama
  c = model.config
  abstract = nnx.eval_shape(lambda: LlamaForCausalLM(c, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
  assert isinstance(abstract.model.layers[0].self_attn.q_proj.kernel.get_value(), jax.ShapeDtypeStruct)
  bf16 = nnx.merge(nnx.graphdef(abstract), nnx.state(model))
  ids = input_ids(7)
  assert bf16.embed(ids).dtype == jnp.bfloat16
  logits = _forward(bf16, ids, jnp.arange(T))
  assert logits.dtype == jnp.float32
  assert rel_err(logits, torch_logits(tm, ids)) < 0.1  # bf16 activations: about 3 significant digits
  with pytest.raises(ValueError, match="input_ids"):
    model.embed(np.zeros((4,), np.int32))


# --- config parsing ---------------------------------------------------------------------------------------------------


def _hf_dict(kind: str, **overrides) -> dict:
  cfg_cls, _ = HF_CLASSES[kind]
  kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
  kw.update(overrides)
  return cfg_cls(**kw).to_diff_dict() | {"architectures": [cfg_cls.model_type.capitalize() + "ForCausalLM"]}


@pytest.mark.parametrize("kind,overrides", [
    ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    ("llama", dict(attention_bias=True, tie_word_embeddings=True)),
    ("mistral", dict(sliding_window=None)),
    ("qwen2", dict()),
])
def test_config_round_trip(kind, overrides):
  d = _hf_dict(kind, **overrides)
  c = LlamaConfig.from_hf(d)
  assert c.to_hf() == d
  assert LlamaConfig.from_hf(c.to_hf()) == c
  fresh = dataclasses.replace(c, extra={})  # a directly built config writes every field
  assert LlamaConfig.from_hf(fresh.to_hf()) == c
  hash(c)


def test_config_legacy_layout_and_changes():
  d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32, "hidden_size": 16,
       "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": 1000.0,
       "rope_scaling": {"type": "linear", "factor": 2.0}, "torch_dtype": "bfloat16", "eos_token_id": [2, 3],
       "custom_key": {"kept": True}}
  c = LlamaConfig.from_hf(d)
  assert (c.rope_theta, c.rope_type, c.dtype, c.eos_token_id, c.head_dim) == (1000.0, "linear", "bfloat16", (2, 3), 4)
  assert c.to_hf() == d
  out = dataclasses.replace(c, hidden_act="relu", dtype="float32", rope_theta=5000.0).to_hf()
  assert (out["hidden_act"], out["dtype"], out["torch_dtype"], out["rope_theta"]) == ("relu", "float32", "float32",
                                                                                      5000.0)
  assert out["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and out["custom_key"] == {"kept": True}
  assert out["eos_token_id"] == [2, 3]
  hf = transformers.LlamaConfig(**out)
  assert hf.hidden_act == "relu" and hf.rope_parameters["rope_theta"] == 5000.0


@pytest.mark.parametrize("change,match", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel.*LlamaForCausalLM"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "rope_type 'yarn'"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"head_dim": 7}, "head_dim"),
    ({"hidden_size": 66, "head_dim": None}, "hidden_size"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"dtype": "int8"}, "dtype 'int8'"),
])
def test_config_unsupported(change, match):
  d = _hf_dict("llama") | change
  if d.get("head_dim", 0) is None:
    del d["head_dim"]
  with pytest.raises(UnsupportedModelError, match=match):
    LlamaConfig.from_hf(d)


def test_config_qwen2_sliding_window_unsupported():
  d = _hf_dict("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
  with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
    LlamaConfig.from_hf(d)
  # sliding window requested but no layer reaches max_window_layers: full attention everywhere, supported
  ok = _hf_dict("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=28)
  assert LlamaConfig.from_hf(ok).sliding_window is None


def test_config_malformed():
  d = _hf_dict("llama")
  del d["hidden_size"]
  with pytest.raises(ValueError, match="hidden_size"):
    LlamaConfig.from_hf(d)
  with pytest.raises(ValueError, match="needs a number 'factor'"):
    LlamaConfig.from_hf(_hf_dict("llama") | {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}})
