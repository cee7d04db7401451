"""Qwen3, Gemma 2 and Gemma 3 (text) against transformers: logits of a padded batch, the inputs of every linear,
config and checkpoint round trips, greedy decoding with the KV cache, and pruning end to end.

Models: tiny random transformers models (tests/support/torch_llama.py, ``FAMILIES``: hidden 32, 4 query heads of
16, 2 key/value heads, intermediate 32, 2 layers, vocab 256, norms drawn around their identity, other weights with
std 0.15), one per variant, shared by the tests of this module; where the family has sliding-window layers the window
is 5, so every 16-token sequence runs past it. No download. Tolerance as in test_llama.py:
``|ours − torch| ≤ 2e-5 · max|torch|`` (float32, CPU).

Compiles (nearly all of this module's time): the forwards compared with transformers run eagerly (op by op; the ops
are compiled once for all variants and configs, where a jitted forward would compile once per config: four variants
and seven changed configs); greedy decoding compiles its prefill, decode and full-forward programs once per variant
(2 prompts in one bucket of 16 positions, cache 16); pruning compiles its block programs once per distinct block
(``true_sequential=False``: one Hessian accumulation per block) and its kernels once per kernel shape, shared by the
variants (``FAMILY_SHAPES``). One pruning method per family runs in the default suite, the others under ``slow``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

import proxjax  # noqa: E402
from proxjax.models import (  # noqa: E402
    LINEAR_NAMES,
    LlamaConfig,
    LlamaForCausalLM,
    UnsupportedModelError,
    check_sparsity,
    load_pretrained,
    rope_inv_freq,
    save_pretrained,
)
from proxjax.models import generate as gen  # noqa: E402
from proxjax.pipeline import prune as pipeline  # noqa: E402
from proxjax.pipeline.evaluate import perplexity  # noqa: E402
from proxjax.pruning.methods import PruneConfig  # noqa: E402
from tests.support.torch_llama import (  # noqa: E402
    FAMILIES,
    HF_CLASSES,
    T,
    WINDOW,
    assert_close,
    assert_padded_batch_close,
    eager_logits,
    hf_logits,
    input_ids,
    make_torch_model,
    model_pairs,
    param_arrays,
    rel_err,
    to_np,
)

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """(torch model, our model loaded from its save_pretrained output, that directory), cached per variant."""
  return model_pairs(tmp_path_factory, lambda name: make_torch_model(FAMILIES[name][0], seed=11, **FAMILIES[name][1]))


_forward = eager_logits


def _with(model: LlamaForCausalLM, **changes) -> LlamaForCausalLM:
  """The same weights under a changed config (to show that a difference matters)."""
  config = dataclasses.replace(model.config, **changes)
  return nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))),
                   nnx.state(model))


_torch_logits = hf_logits


# --- the forward -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_padded_batch_logits(pair, name):
  """A right-padded batch (row 1 is 11 real tokens, then padding that transformers masks): every real position has
  transformers' logits; 16 positions run past the window of 5."""
  tm, model, _ = pair(name)
  c = model.config
  kind = FAMILIES[name][0]
  assert c.architecture == ARCHITECTURES[kind] and c.qk_norm == (kind != "gemma2")
  assert (c.norm_plus_one, c.post_norms, c.scale_embeddings) == (kind != "qwen3",) * 3
  assert_padded_batch_close(tm, model, input_ids(4), [T, 11])
  if c.sliding_window is not None:
    assert c.sliding_window == WINDOW < T and "sliding_attention" in c.layer_types
  if name == "qwen3":  # an explicit head_dim: 4 heads of 16 on a hidden size of 32
    assert (c.head_dim, c.tie_word_embeddings, c.layer_types) == (16, False, None)
    assert model.model.layers[0].self_attn.q_proj.kernel.get_value().shape == (32, 64)
    assert model.model.layers[0].self_attn.q_norm.weight.get_value().shape == (16,)
  elif name == "qwen3_window":
    assert c.layer_types == ("full_attention", "sliding_attention") and c.qkv_bias and c.o_bias
  elif name == "gemma2":
    assert (c.attn_softcap, c.final_softcap, c.query_pre_attn_scalar, c.hidden_act) == (
        2.0, 3.0, 32, "gelu_pytorch_tanh")
    assert model.lm_head is None and model.model.layers[0].self_attn.q_norm is None
  else:
    assert c.layer_types == ("sliding_attention", "full_attention") and (c.rope_local_theta, c.rope_theta) == (1e4, 1e6)
    np.testing.assert_allclose(rope_inv_freq(c), tm.model.rotary_emb.full_attention_inv_freq.numpy(), rtol=1e-6)
    np.testing.assert_allclose(rope_inv_freq(c, local=True), tm.model.rotary_emb.sliding_attention_inv_freq.numpy(),
                               rtol=1e-6)


@pytest.mark.parametrize("name,changes", [
    ("qwen3_window", dict(sliding_window=None)),
    ("gemma2", dict(sliding_window=None)),
    ("gemma2", dict(attn_softcap=None)),
    ("gemma2", dict(final_softcap=None)),
    ("gemma2", dict(query_pre_attn_scalar=16)),
    ("gemma3", dict(rope_local_theta=1e6)),
    ("gemma3", dict(layer_types=("full_attention", "full_attention"))),
])
def test_each_difference_matters(pair, name, changes):
  """Without the family's difference (the same weights), the logits are clearly not transformers'."""
  tm, model, _ = pair(name)
  ids = input_ids(5)
  assert rel_err(_forward(_with(model, **changes), ids), _torch_logits(tm, ids)) > 1e-3


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_linear_inputs_match_torch_hooks(pair, name):
  """The activation entering every linear of every block (what the pruner's Hessians are built from), with q/k
  norms and Gemma's four norms per block in between."""
  tm, model, _ = pair(name)
  ids = input_ids(6)
  captured = {}
  handles = [layer.get_submodule(n).register_forward_hook(
      lambda m, a, o, key=(b, n): captured.__setitem__(key, a[0]))
      for b, layer in enumerate(tm.model.layers) for n in LINEAR_NAMES]
  try:
    _torch_logits(tm, ids)
  finally:
    for h in handles:
      h.remove()

  def run(model, ids):  # eagerly, as _forward
    ids = jnp.asarray(ids)
    h, rope, out = model.embed(ids), model.rope(jnp.arange(ids.shape[1])), []
    for layer in model.model.layers:
      h, inputs = layer(h, rope, return_inputs=True)
      out.append(inputs)
    return out

  for b, inputs in enumerate(run(model, ids)):
    for n in LINEAR_NAMES:
      assert_close(inputs[n], captured[(b, n)])


# --- configs and checkpoints -----------------------------------------------------------------------------------------


def _hf_dict(kind: str, **overrides) -> dict:
  cfg_cls, model_cls = HF_CLASSES[kind]
  kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
  kw.update(overrides)
  return cfg_cls(**kw).to_diff_dict() | {"architectures": [model_cls.__name__]}


@pytest.mark.parametrize("kind,overrides", [
    ("qwen3", dict()),
    ("qwen3", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2, attention_bias=True)),
    ("gemma2", dict()),
    ("gemma2", dict(attn_logit_softcapping=None, final_logit_softcapping=None, tie_word_embeddings=False)),
    ("gemma3", dict()),
    ("gemma3", dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
])
def test_config_round_trip(kind, overrides):
  """config.json → LlamaConfig → config.json is the identity; a directly built config (no original dict) writes a
  config.json that transformers reads as the same model."""
  d = _hf_dict(kind, **overrides)
  c = LlamaConfig.from_hf(d)
  assert c.to_hf() == d
  fresh = dataclasses.replace(c, extra={}).to_hf()
  assert LlamaConfig.from_hf(fresh) == c
  hf = HF_CLASSES[kind][0].from_dict(fresh)
  assert [c.layer_type(i) for i in range(3)] == hf.layer_types
  assert [c.layer_window(i) for i in range(3)] == [
      hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types]
  if kind == "gemma3":
    assert hf.rope_parameters["sliding_attention"]["rope_theta"] == c.rope_local_theta
    assert hf.rope_parameters["full_attention"]["rope_theta"] == c.rope_theta
  if kind.startswith("gemma"):
    assert (hf.attn_logit_softcapping, hf.final_logit_softcapping, hf.query_pre_attn_scalar) == (
        c.attn_softcap, c.final_softcap, c.query_pre_attn_scalar)
    assert hf.hidden_activation == c.hidden_act
  hash(c)


def test_config_gemma3_legacy_layout():
  """A transformers-4 Gemma 3 config.json (rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern,
  no layer_types) parses as transformers parses it, and is written back in its own layout."""
  d = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 256, "hidden_size": 64,
       "intermediate_size": 128, "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 2,
       "head_dim": 16, "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window": 512,
       "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window_pattern": 6,
       "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 16, "torch_dtype": "bfloat16"}
  c = LlamaConfig.from_hf(d)
  hf = transformers.Gemma3TextConfig.from_dict(d)
  assert list(c.layer_types) == hf.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
  assert (c.rope_theta, c.rope_local_theta, c.rope_type) == (1e6, 1e4, "linear")
  assert hf.rope_parameters["full_attention"]["factor"] == 8.0 and hf.rope_parameters["sliding_attention"] == {
      "rope_type": "default", "rope_theta": 1e4}
  assert (c.tie_word_embeddings, c.attn_softcap, c.final_softcap, c.max_position_embeddings) == (
      True, None, None, 131072)  # transformers' defaults for the absent keys
  assert c.to_hf() == d
  out = dataclasses.replace(c, rope_local_theta=5e3, sliding_window=256).to_hf()
  assert (out["rope_local_base_freq"], out["sliding_window"], out["rope_theta"]) == (5e3, 256, 1e6)
  assert "rope_parameters" not in out


@pytest.mark.parametrize("kind,change,match", [
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3", {"hidden_activation": "gelu"}, "hidden_act 'gelu'"),
    ("gemma3", {"architectures": ["Gemma3ForConditionalGeneration"]}, "Gemma3ForConditionalGeneration"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "sliding_attention"),
    ("gemma2", {"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}},
     "per-layer-type RoPE"),
    ("gemma2", {"layer_types": ["sliding_attention", "bidirectional"]}, "layer_types"),
    ("qwen3", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
])
def test_config_unsupported(kind, change, match):
  with pytest.raises(UnsupportedModelError, match=match):
    LlamaConfig.from_hf(_hf_dict(kind) | change)


def test_config_family_traits_are_fixed():
  base = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
  with pytest.raises(UnsupportedModelError, match="Qwen3ForCausalLM has qk_norm=True"):
    LlamaConfig(**base, architecture="Qwen3ForCausalLM", qk_norm=False)
  with pytest.raises(UnsupportedModelError, match="final_softcap is only supported for Gemma"):
    LlamaConfig(**base, final_softcap=30.0)
  with pytest.raises(UnsupportedModelError, match="layer_types is only supported"):
    LlamaConfig(**base, architecture="MistralForCausalLM", layer_types=("full_attention",) * 2)
  with pytest.raises(UnsupportedModelError, match="rope_local_theta"):
    LlamaConfig(**base, architecture="Gemma2ForCausalLM", rope_local_theta=1e4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_checkpoint_round_trip(pair, name, tmp_path):
  """load → save_pretrained → transformers loads the saved directory: the same tensors (norms included), the same
  config.json and transformers' own logits, bit for bit."""
  tm, model, d = pair(name)
  out = tmp_path / "out"
  save_pretrained(model, out, source_dir=d)
  assert json.loads((out / "config.json").read_text()) == json.loads((d / "config.json").read_text())
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
  assert type(back) is type(tm)
  want = {k: v for k, v in tm.state_dict().items() if not k.endswith("lm_head.weight") or model.lm_head is not None}
  got = back.state_dict()
  for k, v in want.items():
    np.testing.assert_array_equal(to_np(got[k]), to_np(v), err_msg=k)
  ids = input_ids(7)
  np.testing.assert_array_equal(_torch_logits(back, ids), _torch_logits(tm, ids))
  norms = [k for k in want if "norm" in k]
  assert len(norms) == {"qwen3": 9, "qwen3_window": 9, "gemma2": 9, "gemma3": 13}[name]  # 2 layers + final norm


# --- greedy decoding with the KV cache -------------------------------------------------------------------------------

PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [200, 13]]
"""Two prompts of different lengths, one right-padded batch of 2 (prompt bucket 16)."""
N_NEW = 9
"""1 token from the prefill, then 8 decode steps (one chunk); every prompt + its tokens (16 and 11) runs past the
window of 5 and fits the cache bucket of 16."""


def _hf_greedy(tm, prompt, n):
  with torch.no_grad():
    out = tm.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0,
                      attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
  return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "gemma3" else pytest.mark.slow)
                                  for n in ("qwen3_window", "gemma2", "gemma3")])
def test_greedy_cached_equals_uncached_and_transformers(pair, name):
  """Cached == uncached (a full forward per step) == transformers' ``generate(do_sample=False)``, over a padded
  batch of 2 prompts, with sliding-window layers (and Gemma 3's local RoPE) past their window. Gemma 3 (sliding and
  global layers, local RoPE, q/k norms) in the default suite, the others under ``slow``."""
  tm, model, _ = pair(name)
  cached = gen.greedy_generate(model, PROMPTS, N_NEW)
  assert [len(r) for r in cached] == [N_NEW] * len(PROMPTS)
  assert cached == gen.greedy_generate(model, PROMPTS, N_NEW, use_cache=False)
  assert cached == [_hf_greedy(tm, p, N_NEW) for p in PROMPTS]
  assert len({tuple(r) for r in cached}) == len(PROMPTS)


# --- pruning end to end ----------------------------------------------------------------------------------------------

METHODS = {"wanda": "wanda", "sparsegpt": "sparsegpt", "prox": PruneConfig.from_options("prox", budget=15)}
DEFAULT_METHOD = {"qwen3": "wanda", "gemma2": "sparsegpt", "gemma3": "wanda"}
"""The one method per family in the default suite (both baselines covered; the kernels compile once per shape for
every family); the other methods run under ``slow``."""


_flat = param_arrays


@pytest.mark.parametrize("name,method", [
    pytest.param(name, method, marks=() if DEFAULT_METHOD[name] == method else pytest.mark.slow)
    for name in DEFAULT_METHOD for method in METHODS])
def test_prune_end_to_end(pair, name, method, tmp_path):
  """``prune_model`` makes every q/k/v/o/gate/up/down kernel exactly 2:4 along its input axis and changes nothing
  else (norms, q/k norms, embeddings); ``check_sparsity`` passes on the saved checkpoint, transformers runs it, and
  its perplexity equals proxjax's on the same windows."""
  _, _, d = pair(name)
  model = load_pretrained(d)
  before = _flat(model)
  calib = np.random.default_rng(0).integers(0, 256, (4, 32)).astype(np.int32)
  # In the default suite one Hessian pass per block (true_sequential=False: one accumulation program per block
  # instead of four; the stage order is not what this test checks, tests/pipeline/test_pipeline.py does); the slow
  # runs prune stage by stage.
  result = pipeline.prune_model(model, calib, METHODS[method], progress=False,
                                true_sequential=DEFAULT_METHOD[name] != method)
  assert len(result.layers) == 2 * len(LINEAR_NAMES)
  after = _flat(model)
  assert after.keys() == before.keys()
  pruned = [k for k in after if k[-1] == "kernel" and k[0] != "lm_head"]
  assert len(pruned) == 2 * len(LINEAR_NAMES)
  for k in pruned:
    assert bool(proxjax.is_nm(after[k], 2, 4, axis=0)) and not np.array_equal(after[k], before[k]), k
  for k in after.keys() - set(pruned):
    np.testing.assert_array_equal(after[k], before[k], err_msg=str(k))
  assert sum("norm" in "/".join(k) for k in after) == {"qwen3": 9, "gemma2": 9, "gemma3": 13}[name]

  out = tmp_path / "pruned"
  save_pretrained(model, out, source_dir=d)
  rows = check_sparsity(out)
  assert len(rows) == 2 * len(LINEAR_NAMES) and all(r["ok"] for r in rows)
  assert all(r["sparsity"] >= 0.5 for r in rows)

  windows = np.random.default_rng(1).integers(0, 256, (2, T)).astype(np.int32)
  ours = perplexity(lambda ids: _forward(model, ids), windows, batch_size=2, progress=False)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
  logits = torch.log_softmax(torch.as_tensor(_torch_logits(hf, windows), dtype=torch.float64), dim=-1)
  nll = -logits[:, :-1].gather(-1, torch.as_tensor(windows[:, 1:, None], dtype=torch.long)).mean().item()
  assert ours.predicted_tokens == 2 * (T - 1)
  assert math.isclose(ours.ppl, math.exp(nll), rel_tol=1e-5), (ours.ppl, math.exp(nll))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_memory_planner_counts_the_family(pair, name):
  """The planner's parameter counts (from the config alone) are the model's: q/k norms and Gemma's four norms per
  block included; one Gemma 3 block (sliding, with four RoPE tables) compiles for the measurement."""
  from proxjax.pipeline import memory  # noqa: PLC0415

  _, model, _ = pair(name)
  c = model.config
  params = _flat(model)
  est = memory.estimate(c, nsamples=4, seqlen=T)
  assert est.params["total"] == sum(v.size for v in params.values())
  assert est.params["pruned"] == sum(v.size for k, v in params.items() if k[-1] == "kernel" and k[0] != "lm_head")
  if name == "gemma3":
    assert set(memory.measure_block(c, batch_size=2, seqlen=T, passes=["forward"])) == {"forward"}
