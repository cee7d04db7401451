"""Phi-3 (fused ``qkv_proj`` / ``gate_up_proj``), Qwen3-MoE and Mixtral (top-k routed experts, stacked kernels)
against transformers: padded-batch logits, router choices and expert outputs, checkpoint round trips, greedy decoding
with the KV cache, pruning end to end (every fused kernel and every expert 2:4 along its input axis, the router and
norms untouched, transformers' perplexity equal), experts with too few calibration tokens, and the other workflows on
a mixture of experts (the optax transforms through the sparsity spec, masked fine-tuning).

Models: one tiny random transformers model per family (tests/support/torch_llama.py ``make_torch_model``: hidden 32,
2 query heads of 16, 2 layers, vocab 64, a sliding window of 5 on every layer; Phi-3 with 1 key/value head (GQA);
Qwen3-MoE with 2 key/value heads and 4 experts, top 2, ``moe_intermediate_size`` 32 and ``norm_topk_prob``; Mixtral
with 2 key/value heads and 4 experts, top 2, ``intermediate_size`` 32, its checkpoint names
``block_sparse_moe.experts.{e}.w1/w2/w3``), shared by the tests of this module; every kernel is (32, 32) or (32, 64)
(Phi-3's qkv_proj and gate_up_proj), so pruning compiles its programs for two shapes only (shapes the models of
tests/models/test_families.py share). No download. Tolerance as in test_llama.py: ``|ours − torch| ≤ 2e-5 ·
max|torch|`` (float32, CPU).

Compiles, as in test_families.py: the forwards compared with transformers run eagerly (their ops compile once for
every family); greedy decoding compiles three programs per family (2 prompts, prompt and cache bucket 16); one
pruning method per family in the default suite (Phi-3 and Mixtral Wanda, Qwen3-MoE SparseGPT; the others under
``slow``); one fine-tuning step (one compile of the training step) and one ``prox_24_update`` (one prox compile for
the (32, 32) kernels, one for the stacked (4, 32, 32) experts) on Qwen3-MoE.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors import safe_open  # noqa: E402

import proxjax  # noqa: E402
import proxjax.models  # noqa: E402
from proxjax.models import LlamaConfig, UnsupportedModelError, check_sparsity, load_pretrained, save_pretrained  # noqa: E402
from proxjax.models import generate as gen  # noqa: E402
from proxjax.models.llama import EXPERT_NAMES, MIXTRAL_EXPERT_NAMES, expert_names, linear_names, projection_spec  # noqa: E402
from proxjax.pipeline import memory  # noqa: E402
from proxjax.pipeline import prune as pipeline  # noqa: E402
from proxjax.pipeline.evaluate import perplexity  # noqa: E402
from proxjax.pruning.methods import PruneConfig  # noqa: E402
from tests.support.torch_llama import (  # noqa: E402
    assert_close,
    assert_padded_batch_close,
    eager_logits,
    hf_logits,
    make_torch_model,
    model_pairs,
    param_arrays,
    to_np,
)

V, T, WINDOW, E = 64, 16, 5, 4
SHAPES = dict(vocab_size=V, hidden_size=32, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
              head_dim=16, sliding_window=WINDOW)
VARIANTS = {
    "phi3": dict(pad_token_id=0),
    "qwen3_moe": dict(num_key_value_heads=2, use_sliding_window=True, num_experts=E, num_experts_per_tok=2,
                      moe_intermediate_size=32, norm_topk_prob=True),
    "mixtral": dict(num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=2),
}
MOE = ("qwen3_moe", "mixtral")
EXPERTS = {"qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
           "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}
"""Each mixture of experts' block attribute (our and the checkpoint's name; transformers' module is ``mlp`` in both)
and its (gate, up, down) expert names."""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """(torch model, our model loaded from its save_pretrained output, that directory), one per family."""
  return model_pairs(tmp_path_factory, lambda kind: make_torch_model(kind, seed=3, **(SHAPES | VARIANTS[kind])))


_forward = eager_logits
_torch_logits = hf_logits
_flat = param_arrays


def _ids(seed: int, shape=(2, T)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


def _pure_flat(tree) -> dict:
  """A pure parameter pytree (``nnx.as_pure``) as NumPy arrays keyed like :func:`param_arrays`."""
  return {tuple(str(getattr(p, "key", p)) for p in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- the forward -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_padded_batch_logits(pair, kind):
  """A right-padded batch (row 1: 11 real tokens): every real position has transformers' logits; 16 positions run
  past the window of 5 on every layer."""
  tm, model, _ = pair(kind)
  c = model.config
  assert c.sliding_window == WINDOW and c.layer_types is None and [c.layer_window(i) for i in range(2)] == [WINDOW] * 2
  if kind == "phi3":
    assert c.fused_projections and c.num_experts is None
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.qkv_proj.kernel.get_value().shape == (32, 64) and mlp.gate_up_proj.kernel.get_value().shape == (32, 64)
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "gate_proj")
  else:
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.norm_topk_prob, c.qk_norm) == (
        E, 2, 32, True, kind == "qwen3_moe")
    attr, names = EXPERTS[kind]
    layer = model.model.layers[0]
    assert layer.feed_forward is getattr(layer, attr) and hasattr(layer, "mlp") == (attr == "mlp")
    assert [getattr(layer.feed_forward.experts, n).kernel.get_value().shape for n in names] == [(E, 32, 32)] * 3
  assert_padded_batch_close(tm, model, _ids(4), [T, 11])


@pytest.mark.parametrize("kind", MOE)
def test_moe_router_choices_and_expert_outputs(pair, kind):
  """Block 0's router on 32 hidden states: transformers' logits, the same top-2 experts in the same order, the same
  (renormalised) weights; every expert's own output ``down(silu(x G) ⊙ x U)`` and the block's weighted sum."""
  tm, model, _ = pair(kind)
  attr, names = EXPERTS[kind]
  x = np.random.default_rng(5).normal(size=(2, T, 32)).astype(np.float32)
  moe, ref = getattr(model.model.layers[0], attr), tm.model.layers[0].mlp
  logits, weights, experts = moe.route(jnp.asarray(x))
  assert weights.dtype == jnp.float32 and moe.weights_float32 == (kind == "mixtral")
  with torch.no_grad():
    xt = torch.as_tensor(x)
    r_logits, r_weights, r_experts = ref.gate(xt.reshape(-1, 32))
    r_out = ref(xt)
  np.testing.assert_array_equal(np.asarray(experts).reshape(-1, 2), r_experts.numpy())
  assert_close(np.asarray(logits).reshape(-1, E), r_logits)
  assert_close(np.asarray(weights).reshape(-1, 2), r_weights)
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)  # norm_topk_prob
  assert len(np.unique(np.asarray(experts))) == E  # every expert serves some token here
  for e in range(E):
    with torch.no_grad():
      gate, up = torch.nn.functional.linear(xt, ref.experts.gate_up_proj[e]).chunk(2, dim=-1)
      want = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, ref.experts.down_proj[e])
    k_gate, k_up, k_down = (getattr(moe.experts, n).kernel.get_value()[e] for n in names)
    got = (jax.nn.silu(x @ k_gate) * (x @ k_up)) @ k_down
    assert_close(got, want)
  assert_close(moe(jnp.asarray(x)), r_out)


# --- configs and checkpoints -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_checkpoint_round_trip(pair, kind, tmp_path):
  """load → save_pretrained → transformers loads it: the tensor names transformers writes (fused names; one tensor
  per expert), the same config.json, the same tensors and transformers' own logits, bit for bit."""
  tm, model, d = pair(kind)
  out = tmp_path / "out"
  save_pretrained(model, out, source_dir=d)
  assert json.loads((out / "config.json").read_text()) == json.loads((d / "config.json").read_text())
  names = {}
  for where in (d, out):
    with safe_open(os.path.join(where, "model.safetensors"), framework="numpy") as f:
      names[where] = set(f.keys())
  assert names[d] == names[out]
  if kind == "phi3":
    assert "model.layers.1.self_attn.qkv_proj.weight" in names[out] and "model.layers.1.mlp.gate_up_proj.weight" in names[out]
  else:
    attr, (_, _, down) = EXPERTS[kind]
    assert {f"model.layers.1.{attr}.experts.{e}.{down}.weight" for e in range(E)} <= names[out]
    assert f"model.layers.1.{attr}.gate.weight" in names[out]
    assert not any(".mlp." in n for n in names[out]) or kind == "qwen3_moe"
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
  assert type(back) is type(tm)
  got = back.state_dict()
  for k, v in tm.state_dict().items():
    np.testing.assert_array_equal(to_np(got[k]), to_np(v), err_msg=k)
  ids = _ids(7)
  np.testing.assert_array_equal(_torch_logits(back, ids), _torch_logits(tm, ids))


@pytest.mark.parametrize("kind,change,match", [
    ("phi3", {"rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}, "'su'"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                  "long_factor": [2.0] * 8}}, "longrope"),
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}},
     "partial_rotary_factor"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ("qwen3_moe", {"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ("mixtral", {"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ("mixtral", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "yarn"),
    ("mixtral", {"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
])
def test_config_unsupported(pair, kind, change, match):
  """Variants the model does not compute are refused, naming the field (Phi-3's LongRoPE, partial rotary; Qwen3-MoE
  with dense MLP layers; more experts per token than experts; Mixtral with YaRN or quantized)."""
  _, _, d = pair(kind)
  base = json.loads((d / "config.json").read_text())
  base.pop("rope_parameters", None) if "rope_scaling" in change else None
  with pytest.raises((UnsupportedModelError, ValueError), match=match):
    LlamaConfig.from_hf(base | change)


def test_mixtral_config(pair):
  """Mixtral's config.json: ``num_local_experts``, experts as wide as ``intermediate_size``, no ``norm_topk_prob``
  key (it always renormalises: a stray ``false`` is read as transformers reads it, and refused when set directly);
  a directly built config writes a config.json transformers reads as the same model."""
  _, model, d = pair("mixtral")
  c = model.config
  base = json.loads((d / "config.json").read_text())
  assert base["num_local_experts"] == E and "moe_intermediate_size" not in base and "norm_topk_prob" not in base
  assert LlamaConfig.from_hf(base | {"norm_topk_prob": False, "moe_intermediate_size": 8}) == c
  fresh = dataclasses.replace(c, extra={}).to_hf()
  assert LlamaConfig.from_hf(fresh) == c and "num_experts" not in fresh and "moe_intermediate_size" not in fresh
  hf = transformers.MixtralConfig.from_dict(fresh)
  assert (hf.num_local_experts, hf.num_experts_per_tok, hf.intermediate_size, hf.sliding_window,
          hf.head_dim or hf.hidden_size // hf.num_attention_heads, hf.rope_parameters["rope_theta"]) == (
      E, 2, 32, WINDOW, 16, c.rope_theta)
  with pytest.raises(UnsupportedModelError, match="norm_topk_prob=False"):
    dataclasses.replace(c, norm_topk_prob=False)
  with pytest.raises(UnsupportedModelError, match="moe_intermediate_size=16"):
    dataclasses.replace(c, moe_intermediate_size=16)


# --- greedy decoding with the KV cache -------------------------------------------------------------------------------

PROMPTS = [[5, 17, 33, 3, 50, 41, 7], [20, 13]]
N_NEW = 9
"""1 token from the prefill and 8 decode steps (one chunk); every prompt + its tokens (16 and 11) runs past the window
of 5 and fits the cache bucket of 16 (one batch of 2, prompt bucket 16)."""


@pytest.mark.parametrize("kind", [pytest.param(k, marks=() if k == "qwen3_moe" else pytest.mark.slow) for k in VARIANTS])
def test_greedy_cached_equals_uncached_and_transformers(pair, kind):
  """Cached == uncached == transformers' greedy generate; Qwen3-MoE in the default suite (the cache is the LLaMA
  family's, tests/models/test_families.py), Mixtral and Phi-3 under ``slow``."""
  tm, model, _ = pair(kind)
  cached = gen.greedy_generate(model, PROMPTS, N_NEW)
  assert cached == gen.greedy_generate(model, PROMPTS, N_NEW, use_cache=False)
  for p, row in zip(PROMPTS, cached):
    with torch.no_grad():
      out = tm.generate(torch.tensor([p]), do_sample=False, max_new_tokens=N_NEW, eos_token_id=None, pad_token_id=0,
                        attention_mask=torch.ones(1, len(p), dtype=torch.long))
    assert row == out[0, len(p):].tolist()


# --- pruning ---------------------------------------------------------------------------------------------------------

METHODS = {"wanda": "wanda", "sparsegpt": "sparsegpt", "prox": PruneConfig.from_options("prox", budget=15)}
PRUNED = {"phi3": 2 * 4, "qwen3_moe": 2 * (4 + 3 * E), "mixtral": 2 * (4 + 3 * E)}
"""Pruned weights per model, as Hugging Face tensors: Phi-3's qkv, o, gate_up, down; Qwen3-MoE's and Mixtral's q, k,
v, o and every expert's gate, up, down."""


DEFAULT_METHOD = {"phi3": "wanda", "qwen3_moe": "sparsegpt", "mixtral": "wanda"}
"""The one method per family in the default suite (Wanda also prunes Qwen3-MoE's experts in
test_underfed_experts_are_reported_and_pruned_by_magnitude); the other methods run under ``slow``."""


@pytest.mark.parametrize("kind,method", [
    pytest.param(kind, method, marks=() if DEFAULT_METHOD[kind] == method else pytest.mark.slow)
    for kind in DEFAULT_METHOD for method in METHODS])
def test_prune_end_to_end(pair, kind, method, tmp_path):
  """``prune_model`` makes every fused kernel and every expert exactly 2:4 along its input axis and changes nothing
  else (router, norms, embeddings); ``check_sparsity`` passes on the saved checkpoint, transformers runs it, and its
  perplexity equals proxjax's on the same windows."""
  _, _, d = pair(kind)
  model = load_pretrained(d)
  before = _flat(model)
  calib = _ids(0, (4, 32))
  # One Hessian pass for the block (true_sequential=False): the staging itself is checked in
  # test_spec_optax_and_planner, and one pass compiles one accumulation program instead of four.
  result = pipeline.prune_model(model, calib, METHODS[method], progress=False, min_expert_tokens=8,
                                true_sequential=False)
  assert len(result.layers) == PRUNED[kind] and not result.underfed_experts
  after = _flat(model)
  pruned = [k for k in after if projection_spec(k, after[k]) is not None]
  assert len(pruned) == {"phi3": 8, "qwen3_moe": 2 * 7, "mixtral": 2 * 7}[kind]
  for k in pruned:
    w = after[k]
    for e in range(w.shape[0]) if w.ndim == 3 else [None]:
      kernel = w if e is None else w[e]
      assert bool(proxjax.is_nm(kernel, 2, 4, axis=0)), (k, e)
      assert not np.array_equal(kernel, before[k] if e is None else before[k][e]), (k, e)
  for k in after.keys() - set(pruned):
    np.testing.assert_array_equal(after[k], before[k], err_msg=str(k))
  if kind in MOE:
    attr, (_, up, _) = EXPERTS[kind]
    assert {r.name for r in result.layers if r.block == 1} >= {f"{attr}.experts.{e}.{up}" for e in range(E)}
    assert any(k[3:5] == (attr, "gate") for k in after.keys() - set(pruned))  # the router: dense, unchanged
    assert all(r.tokens >= 8 and r.method == result.layers[0].method for r in result.layers)

  out = tmp_path / "pruned"
  save_pretrained(model, out, source_dir=d)
  rows = check_sparsity(out)
  assert len(rows) == PRUNED[kind] and all(r["ok"] and r["sparsity"] >= 0.5 for r in rows)

  windows = _ids(1, (2, T))
  ours = perplexity(lambda ids: _forward(model, ids), windows, batch_size=2, progress=False)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
  logits = torch.log_softmax(torch.as_tensor(_torch_logits(hf, windows), dtype=torch.float64), dim=-1)
  nll = -logits[:, :-1].gather(-1, torch.as_tensor(windows[:, 1:, None], dtype=torch.long)).mean().item()
  assert math.isclose(ours.ppl, math.exp(nll), rel_tol=1e-5), (ours.ppl, math.exp(nll))


def _routed_counts(tm, ids) -> np.ndarray:
  """Calibration tokens each expert of block 0 receives in transformers (its router's top-2 choices)."""
  seen = []
  hook = tm.model.layers[0].mlp.gate.register_forward_hook(lambda mod, inp, out: seen.append(out[2]))
  with torch.no_grad():
    tm(input_ids=torch.as_tensor(ids, dtype=torch.long))
  hook.remove()
  return np.bincount(seen[0].reshape(-1).numpy(), minlength=E)


def test_underfed_experts_are_reported_and_pruned_by_magnitude(pair):
  """Block 0's MLP only (its inputs are then the dense model's, so transformers' router says how many tokens each
  expert gets): with few calibration tokens one expert receives none and the others some; those below
  ``min_expert_tokens`` are reported (with transformers' counts) and pruned by magnitude, still 2:4, and the rest by
  the method with their own Hessians."""
  tm, _, d = pair("qwen3_moe")
  for seed in range(100):  # the first short calibration set that leaves an expert without a token
    calib = _ids(seed, (1, 3))
    counts = _routed_counts(tm, calib)
    if counts.min() == 0:
      break
  assert counts.min() == 0 and counts.max() >= 2, counts
  threshold = int(counts.max())  # every expert but the busiest is underfed
  model = load_pretrained(d)
  before = _flat(model)
  with pytest.warns(UserWarning, match="pruned by magnitude"):
    result = pipeline.prune_model(model, calib, "wanda", include=["0.mlp.*"], progress=False,
                                  min_expert_tokens=threshold, true_sequential=False)
  assert {r.name: r.tokens for r in result.layers if r.name.endswith("gate_proj")} == {
      f"mlp.experts.{e}.gate_proj": int(counts[e]) for e in range(E)}
  under = {(r.name.split(".")[2], r.name.split(".")[3]) for r in result.underfed_experts}
  assert under == {(str(e), n.split(".")[-1]) for e in range(E) if counts[e] < threshold for n in EXPERT_NAMES}
  after = _flat(model)
  for name in EXPERT_NAMES:
    key = ("model", "layers", "0", *name.split("."), "kernel")
    for e in range(E):
      w = after[key][e]
      assert bool(proxjax.is_nm(w, 2, 4, axis=0))
      magnitude = before[key][e] * np.asarray(proxjax.magnitude_mask(before[key][e]))
      assert np.array_equal(w, magnitude) == (counts[e] < threshold), (name, e, counts)
  np.testing.assert_array_equal(after[("model", "layers", "1", "mlp", "experts", "up_proj", "kernel")],
                                before[("model", "layers", "1", "mlp", "experts", "up_proj", "kernel")])


# --- the sparsity spec, the optax transforms and the planner ---------------------------------------------------------


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_spec_optax_and_planner(pair, kind):
  """``projection_spec`` selects the fused kernels (axis 0) and the stacked experts (axis 1, their input axis), not
  the router; ``project_nm_update`` with it gives every expert its own 2:4 projection along its input axis; the
  stages and the planner know the family's expert names; the planner's parameter counts (from the config alone) are
  the model's and it holds one Hessian state per expert."""
  import optax  # noqa: PLC0415

  _, model, _ = pair(kind)
  params = nnx.state(model, nnx.Param)
  axes = {tuple(map(str, k)): v for k, v in nnx.to_flat_state(proxjax.resolve_spec(params, projection_spec))}
  selected = {k[3:-1]: v for k, v in axes.items() if v is not None}
  if kind == "phi3":
    assert selected == {("self_attn", "qkv_proj"): 0, ("self_attn", "o_proj"): 0, ("mlp", "gate_up_proj"): 0,
                        ("mlp", "down_proj"): 0}
  else:
    attr, names = EXPERTS[kind]
    assert selected == {("self_attn", p): 0 for p in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
        (attr, "experts", p): 1 for p in names}
    assert axes[("model", "layers", "0", attr, "gate", "kernel")] is None
    pure = nnx.as_pure(params)
    tx = proxjax.project_nm_update(spec=projection_spec)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, pure), tx.init(pure), pure)
    new, old = _pure_flat(optax.apply_updates(pure, updates)), _pure_flat(pure)
    for n in names:  # every expert: its own 2:4 projection, groups of 4 along d_in (not along d_out)
      key = ("model", "layers", "1", attr, "experts", n, "kernel")
      for e in range(E):
        np.testing.assert_array_equal(new[key][e], np.asarray(proxjax.project_nm(old[key][e], 2, 4, axis=0)))
        assert not bool(proxjax.is_nm(new[key][e], 2, 4, axis=1)), (n, e)
  flat = _flat(model)
  c = model.config
  assert pipeline.true_sequential_stages(linear_names(c), True) == (
      [("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)] if kind == "phi3"
      else [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            expert_names(c)[:2], expert_names(c)[2:]])
  assert kind == "phi3" or expert_names(c) == {"qwen3_moe": EXPERT_NAMES, "mixtral": MIXTRAL_EXPERT_NAMES}[kind]
  est = memory.estimate(c, nsamples=4, seqlen=T)
  assert est.params["total"] == sum(v.size for v in flat.values())
  assert est.params["pruned"] == sum(v.size for k, v in flat.items() if projection_spec(k, v) is not None)
  assert set(linear_names(c)) == set(dict.fromkeys(".".join(k[3:-1]) for k in flat if k[:2] == ("model", "layers")
                                                     and projection_spec(k, flat[k]) is not None))
  if kind in MOE:
    passes = memory.block_passes(c, batch_size=2, seqlen=T)
    down = EXPERTS[kind][1][2]
    assert passes[f"accumulate experts.{down}"].outputs == E * (4 * 32 * 32 + 4)  # one state per expert


def _project_24(model) -> None:
  """Makes every kernel the sparsity spec selects 2:4 by magnitude along its spec axis, in place
  (``proxjax.project_nm_update``, eagerly)."""
  import optax  # noqa: PLC0415

  pure = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = proxjax.project_nm_update(spec=projection_spec)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, pure), tx.init(pure), pure)
  nnx.update(model, optax.apply_updates(pure, updates))


@pytest.mark.slow
def test_prox_24_update_prunes_every_expert_along_its_input_axis(pair):
  """``prox_24_update`` with the family's sparsity spec on a block's mixture of experts (router and stacked experts,
  their paths in the model): every expert ``e`` of a stacked kernel ``(E, d_in, d_out)`` comes out as the prox of
  its own ``(d_in, d_out)`` kernel with groups of 4 along ``d_in``, which at this strength is exactly its 2:4
  projection along ``d_in`` (not along ``d_out``); the router passes through. Qwen3-MoE and Mixtral (one prox
  compile, about 6 s of CPU: the same stacked shape; the default suite checks the spec with ``project_nm_update`` in
  test_spec_optax_and_planner, and tests/core/test_transforms.py the prox of stacked leaves along axis 1)."""
  import optax  # noqa: PLC0415

  lam = 1e3  # R(w) > 0 costs more than any group's kept entries: the prox keeps each group's 2 largest, unchanged
  for kind in MOE:
    _, model, _ = pair(kind)
    attr, names = EXPERTS[kind]
    moe = {"model": {"layers": {0: {attr: nnx.as_pure(nnx.state(model.model.layers[0].feed_forward, nnx.Param))}}}}
    tx = optax.chain(optax.sgd(0.0), proxjax.prox_24_update(lam, 1.0, spec=projection_spec))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, moe), tx.init(moe), moe)
    new, old = _pure_flat(optax.apply_updates(moe, updates)), _pure_flat(moe)
    router = ("model", "layers", "0", attr, "gate", "kernel")
    assert set(new) == {router} | {("model", "layers", "0", attr, "experts", n, "kernel") for n in names}
    np.testing.assert_array_equal(new[router], old[router])
    for key in new.keys() - {router}:
      assert projection_spec(key, old[key]) == 1
      for e in range(E):
        got = new[key][e]
        np.testing.assert_array_equal(got, np.asarray(proxjax.project_nm(old[key][e], 2, 4, axis=0)),
                                      err_msg=f"{kind} {key} expert {e}")
        assert not bool(proxjax.is_nm(got, 2, 4, axis=1)), (kind, key, e)


@pytest.mark.slow  # the stacked experts' 2:4 update is checked in test_spec_optax_and_planner
def test_finetune_keeps_every_expert_zero():
  """One masked fine-tuning step (``proxjax.training.finetune.finetune_masked``: AdamW, one compile of the step, about
  7 s of CPU) on a 2:4 one-block Qwen3-MoE model (random weights, the shapes above): every zero of every expert kernel and attention
  kernel stays exactly zero (still 2:4 along the input axis), the kept weights of the experts that were routed tokens
  move, and the dense router trains too."""
  from proxjax.training.finetune import finetune_masked  # noqa: PLC0415

  c = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, architecture="Qwen3MoeForCausalLM", num_experts=E,
                  num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
  model = nnx.eval_shape(lambda: proxjax.models.LlamaForCausalLM(c, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(9)  # weights drawn in NumPy: no random-init programs to compile
  nnx.update(model, jax.tree.map(lambda v: jnp.asarray(rng.normal(0.0, 0.15, v.shape), jnp.float32),
                                 nnx.as_pure(nnx.state(model, nnx.Param))))
  _project_24(model)
  before = _flat(model)
  result = finetune_masked(model, _ids(8, (1, 2, T)), learning_rate=1e-2, progress=False)
  assert result.steps == 1 and np.isfinite(result.losses).all()
  after = _flat(model)
  axes = {k: projection_spec(k, v) for k, v in after.items()}
  assert sorted(k[3:-1] for k, ax in axes.items() if ax == 1) == sorted(("mlp", "experts", n) for n in (
      "gate_proj", "up_proj", "down_proj"))
  for k, ax in axes.items():
    if ax is not None:
      zeros = before[k] == 0
      assert zeros.mean() == 0.5 and np.all(after[k][zeros] == 0), k
      assert bool(proxjax.is_nm(after[k], 2, 4, axis=ax)) and not np.array_equal(after[k], before[k]), k
    if ax == 1:
      moved = [not np.array_equal(after[k][e], before[k][e]) for e in range(E)]
      assert sum(moved) >= 2, (k, moved)  # top-2 routing: at least two experts were trained
  router = ("model", "layers", "0", "mlp", "gate", "kernel")
  assert axes[router] is None and not np.array_equal(after[router], before[router])
