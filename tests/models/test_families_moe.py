"""Phi-3 (fused ``qkv_proj`` / ``gate_up_proj``) and Qwen3-MoE (top-k routed experts, stacked kernels) against
transformers: padded-batch logits, router choices and expert outputs, checkpoint round trips, greedy decoding with
the KV cache, pruning end to end (every fused kernel and every expert 2:4 along its input axis, the router and norms
untouched, transformers' perplexity equal) and experts with too few calibration tokens.

Models: one tiny random transformers model per family (tests/support/torch_llama.py ``make_torch_model``: hidden 32,
2 query heads of 16, 2 layers, vocab 64, a sliding window of 5 on every layer; Phi-3 with 1 key/value head (GQA),
Qwen3-MoE with 2 and 4 experts, top 2, ``moe_intermediate_size`` 32 and ``norm_topk_prob``), shared by the tests of
this module; every kernel is (32, 32) or (32, 64) (Phi-3's qkv_proj and gate_up_proj), so pruning compiles its
programs for two shapes only (shapes the models of tests/models/test_families.py share). No download. Tolerance as in
test_llama.py: ``|ours − torch| ≤ 2e-5 · max|torch|`` (float32, CPU).

Compiles, as in test_families.py: the forwards compared with transformers run eagerly (their ops compile once for
both families); greedy decoding compiles three programs per family (2 prompts, prompt and cache bucket 16); one
pruning method per family in the default suite (Phi-3 Wanda, Qwen3-MoE SparseGPT; the others under ``slow``).
"""

from __future__ import annotations

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
from proxjax.models import LlamaConfig, UnsupportedModelError, check_sparsity, load_pretrained, save_pretrained  # noqa: E402
from proxjax.models import generate as gen  # noqa: E402
from proxjax.models.llama import EXPERT_NAMES, linear_names, projection_spec  # noqa: E402
from proxjax.pipeline import memory  # noqa: E402
from proxjax.pipeline import prune as pipeline  # noqa: E402
from proxjax.pipeline.evaluate import perplexity  # noqa: E402
from proxjax.pruning.methods import PruneConfig  # noqa: E402
from tests.support.torch_llama import assert_close, eager_logits, make_torch_model, to_np  # noqa: E402

V, T, WINDOW, E = 64, 16, 5, 4
SHAPES = dict(vocab_size=V, hidden_size=32, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
              head_dim=16, sliding_window=WINDOW)
VARIANTS = {
    "phi3": dict(pad_token_id=0),
    "qwen3_moe": dict(num_key_value_heads=2, use_sliding_window=True, num_experts=E, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """(torch model, our model loaded from its save_pretrained output, that directory), one per family."""
  cache = {}

  def make(kind: str):
    if kind not in cache:
      tm = make_torch_model(kind, seed=3, **(SHAPES | VARIANTS[kind]))
      d = tmp_path_factory.mktemp(kind)
      tm.save_pretrained(d)
      cache[kind] = (tm, load_pretrained(d), d)
    return cache[kind]

  return make


_forward = eager_logits


def _ids(seed: int, shape=(2, T)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


def _torch_logits(tm, ids, mask=None) -> np.ndarray:
  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.as_tensor(mask, dtype=torch.long)}
    return tm(input_ids=torch.as_tensor(ids, dtype=torch.long), **kw).logits.float().numpy()


def _flat(model) -> dict:
  return {tuple(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


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
        E, 2, 32, True, True)
  ids = _ids(4)
  lengths = np.array([T, 11])
  mask = np.arange(T)[None, :] < lengths[:, None]
  ids = np.where(mask, ids, 0).astype(np.int32)
  ref = _torch_logits(tm, ids, mask)
  ours = np.asarray(_forward(model, ids))
  for row, n in enumerate(lengths):
    assert_close(ours[row, :n], ref[row, :n])


def test_moe_router_choices_and_expert_outputs(pair):
  """Block 0's router on 32 hidden states: transformers' logits, the same top-2 experts in the same order, the same
  (renormalised) weights; every expert's own output ``down(silu(x G) ⊙ x U)`` and the block's weighted sum."""
  tm, model, _ = pair("qwen3_moe")
  x = np.random.default_rng(5).normal(size=(2, T, 32)).astype(np.float32)
  moe, ref = model.model.layers[0].mlp, tm.model.layers[0].mlp
  logits, weights, experts = moe.route(jnp.asarray(x))
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
    k = {n: getattr(moe.experts, n).kernel.get_value()[e] for n in ("gate_proj", "up_proj", "down_proj")}
    got = (jax.nn.silu(x @ k["gate_proj"]) * (x @ k["up_proj"])) @ k["down_proj"]
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
    assert {f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(E)} <= names[out]
    assert "model.layers.1.mlp.gate.weight" in names[out]
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
])
def test_config_unsupported(pair, kind, change, match):
  """Variants the model does not compute are refused, naming the field (Phi-3's LongRoPE, partial rotary; Qwen3-MoE
  with dense MLP layers)."""
  _, _, d = pair(kind)
  base = json.loads((d / "config.json").read_text())
  base.pop("rope_parameters", None) if "rope_scaling" in change else None
  with pytest.raises((UnsupportedModelError, ValueError), match=match):
    LlamaConfig.from_hf(base | change)


# --- greedy decoding with the KV cache -------------------------------------------------------------------------------

PROMPTS = [[5, 17, 33, 3, 50, 41, 7], [20, 13]]
N_NEW = 9
"""1 token from the prefill and 8 decode steps (one chunk); every prompt + its tokens (16 and 11) runs past the window
of 5 and fits the cache bucket of 16 (one batch of 2, prompt bucket 16)."""


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_greedy_cached_equals_uncached_and_transformers(pair, kind):
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
PRUNED = {"phi3": 2 * 4, "qwen3_moe": 2 * (4 + 3 * E)}
"""Pruned weights per model, as Hugging Face tensors: Phi-3's qkv, o, gate_up, down; Qwen3-MoE's q, k, v, o and
every expert's gate, up, down."""


DEFAULT_METHOD = {"phi3": "wanda", "qwen3_moe": "sparsegpt"}
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
  assert len(pruned) == {"phi3": 8, "qwen3_moe": 2 * 7}[kind]
  for k in pruned:
    w = after[k]
    for e in range(w.shape[0]) if w.ndim == 3 else [None]:
      kernel = w if e is None else w[e]
      assert bool(proxjax.is_nm(kernel, 2, 4, axis=0)), (k, e)
      assert not np.array_equal(kernel, before[k] if e is None else before[k][e]), (k, e)
  for k in after.keys() - set(pruned):
    np.testing.assert_array_equal(after[k], before[k], err_msg=str(k))
  if kind == "qwen3_moe":
    assert {r.name for r in result.layers if r.block == 1} >= {f"mlp.experts.{e}.up_proj" for e in range(E)}
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
  the router; ``project_nm_update`` with it makes every expert 2:4 along its input axis; the planner's parameter
  counts (from the config alone) are the model's and it holds one Hessian state per expert."""
  import optax  # noqa: PLC0415

  _, model, _ = pair(kind)
  params = nnx.state(model, nnx.Param)
  axes = {tuple(map(str, k)): v for k, v in nnx.to_flat_state(proxjax.resolve_spec(params, projection_spec))}
  selected = {k[3:-1]: v for k, v in axes.items() if v is not None}
  if kind == "phi3":
    assert selected == {("self_attn", "qkv_proj"): 0, ("self_attn", "o_proj"): 0, ("mlp", "gate_up_proj"): 0,
                        ("mlp", "down_proj"): 0}
  else:
    assert selected == {("self_attn", p): 0 for p in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
        ("mlp", "experts", p): 1 for p in ("gate_proj", "up_proj", "down_proj")}
    assert axes[("model", "layers", "0", "mlp", "gate", "kernel")] is None
    pure = nnx.as_pure(params)
    tx = proxjax.project_nm_update(spec=projection_spec)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, pure), tx.init(pure), pure)
    new = optax.apply_updates(pure, updates)
    w = np.asarray(new["model"]["layers"][1]["mlp"]["experts"]["down_proj"]["kernel"])
    assert all(bool(proxjax.is_nm(w[e], 2, 4, axis=0)) for e in range(E))
  flat = _flat(model)
  c = model.config
  assert pipeline.true_sequential_stages(linear_names(c), True) == (
      [("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)] if kind == "phi3"
      else [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.experts.gate_proj", "mlp.experts.up_proj"), ("mlp.experts.down_proj",)])
  est = memory.estimate(c, nsamples=4, seqlen=T)
  assert est.params["total"] == sum(v.size for v in flat.values())
  assert est.params["pruned"] == sum(v.size for k, v in flat.items() if projection_spec(k, v) is not None)
  assert set(linear_names(c)) == set(dict.fromkeys(".".join(k[3:-1]) for k in flat if k[:2] == ("model", "layers")
                                                     and projection_spec(k, flat[k]) is not None))
  if kind == "qwen3_moe":
    passes = memory.block_passes(c, batch_size=2, seqlen=T)
    assert passes["accumulate experts.down_proj"].outputs == E * (4 * 32 * 32 + 4)  # one state per expert
