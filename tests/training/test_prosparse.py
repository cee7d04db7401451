"""ProSparse: the λ schedule, the ReLU / FATReLU model (torch parity, activations under jit and grad), activation
sparsity on a constructed model, the L1 training loop (penalty, resume, NaN), the export rule and the CLI.

Every model is tiny (hidden ≤ 64, 2 layers); the CLI runs on the tiny checkpoint and text fixtures of tests/conftest.py.
"""

from __future__ import annotations

import re
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from proxjax import cli, data  # noqa: E402
from proxjax.workflows.config import parse_stage  # noqa: E402
from proxjax.training import loop, prosparse  # noqa: E402
from proxjax.models import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    LlamaMLP,
    UnsupportedModelError,
    load_pretrained,
    save_pretrained,
)
from tests.support.torch_llama import assert_close, input_ids, make_torch_model, rel_err, torch_logits  # noqa: E402


@nnx.jit
def _forward(model, ids):
  return model(ids)


@nnx.jit
def _forward_acts(model, ids):
  return model(ids, return_activations=True)


def _tiny_config(**kw) -> LlamaConfig:
  base = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              hidden_act="relu")
  return LlamaConfig(**(base | kw))


# --- schedule ---------------------------------------------------------------------------------------------------------


def test_l1_schedule_shape():
  warmup, t0 = 1e-5, 10
  stages = [(30, 1e-4), (60, 5e-4), (100, 2e-3)]
  s = prosparse.l1_schedule(warmup, t0, stages)
  t = np.arange(150)
  v = np.asarray(jax.jit(s)(jnp.asarray(t)))  # traced steps
  assert v.dtype == np.float32
  # the documented formula, in float64
  bounds, values = [t0] + [e for e, _ in stages], [warmup] + [p for _, p in stages]
  ref = np.full(t.shape, values[-1])
  ref[t < t0] = warmup
  for i in range(1, len(bounds)):
    m = (t >= bounds[i - 1]) & (t < bounds[i])
    ref[m] = values[i - 1] + (values[i] - values[i - 1]) * np.sin(np.pi / 2 * (t[m] - bounds[i - 1])
                                                                    / (bounds[i] - bounds[i - 1]))
  np.testing.assert_allclose(v, ref, rtol=1e-6)
  assert np.all(v[:t0 + 1] == np.float32(warmup))  # warm-up constant; stage 1 starts from λ₀
  for end, peak in stages:
    assert v[end] == np.float32(peak)  # each peak exactly at T_i
  assert np.all(v[100:] == np.float32(2e-3))  # constant after the last stage
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    assert np.all(np.diff(v[lo:hi + 1]) >= 0)  # monotone within each stage
    assert v[lo + 1] - v[lo] > v[hi] - v[hi - 1]  # the sine: steep start, flat end
  for b in bounds:  # continuous at every boundary (float steps just before it)
    left, right = float(s(b - 1e-3)), float(s(b))
    assert abs(left - right) <= 1e-4 * max(values), b
  # a traced optax-style step count, a Python int and a float all work
  assert float(jax.jit(s)(jnp.int32(45))) == pytest.approx(float(s(45.0)))
  assert float(prosparse.l1_schedule(0.3)(1000)) == pytest.approx(0.3)  # no stages: λ₀ throughout
  for bad in [dict(stages=[(30, 1e-4), (30, 1e-3)]), dict(stages=[(5, 1e-4)]), dict(stages=[(30, -1.0)]),
              dict(warmup_value=float("nan")), dict(warmup_steps=-1)]:
    kw = dict(warmup_value=1e-5, warmup_steps=10, stages=[]) | bad
    with pytest.raises(ValueError):
      prosparse.l1_schedule(**kw)
  assert parse_stage("40:2.5e-4") == (40, 2.5e-4)
  with pytest.raises(ValueError, match="STEP:PEAK"):
    parse_stage("40")


# --- model ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def relu_pair(tmp_path_factory):
  """A tiny transformers ReLU Llama and our model loaded from its checkpoint."""
  tm = make_torch_model("llama", seed=1, hidden_act="relu")
  d = tmp_path_factory.mktemp("relu")
  tm.save_pretrained(d)
  return tm, load_pretrained(d)


def test_relu_parity_and_activations(relu_pair):
  tm, model = relu_pair
  assert (model.config.hidden_act, model.config.activation_threshold) == ("relu", 0.0)
  ids = input_ids(5)
  captured = []
  hooks = [layer.mlp.act_fn.register_forward_hook(lambda m, a, o: captured.append(o)) for layer in tm.model.layers]
  try:
    ref = torch_logits(tm, ids)
  finally:
    for h in hooks:
      h.remove()
  logits, acts = _forward_acts(model, ids)
  assert_close(logits, ref)
  assert len(acts) == 2 and all(a.shape == (2, 16, 128) for a in acts)
  for ours, theirs in zip(acts, captured):  # the ReLU'd gate outputs, as transformers computes them
    assert_close(ours, theirs)
    assert 0.3 < float(jnp.mean(ours == 0)) < 0.7
  assert_close(_forward(model, ids), logits, tol=1e-6)  # the default call is the same computation


def test_activations_under_grad():
  model = LlamaForCausalLM(_tiny_config(), rngs=nnx.Rngs(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8)))

  def penalty(m):
    return prosparse.activation_l1(m(ids, return_activations=True)[1])

  grads = nnx.jit(nnx.grad(penalty))(model)
  layers = grads["model"]["layers"]
  assert float(jnp.abs(layers[0]["mlp"]["gate_proj"]["kernel"][...]).sum()) > 0
  # nothing after the last activation influences R: the last down_proj and the head get exactly zero gradient
  assert float(jnp.abs(layers[1]["mlp"]["down_proj"]["kernel"][...]).sum()) == 0
  assert float(jnp.abs(grads["lm_head"]["kernel"][...]).sum()) == 0


def test_fatrelu_config_and_forward():
  with pytest.raises(UnsupportedModelError, match="needs hidden_act='relu'"):
    _tiny_config(hidden_act="silu", activation_threshold=0.01)
  with pytest.raises(ValueError, match="activation_threshold"):
    _tiny_config(activation_threshold=-0.1)
  # hand case: a = x if x > θ else 0 (x = θ gives 0); the comparison is in float32 even for bfloat16 activations
  c = _tiny_config(hidden_size=4, intermediate_size=4, num_hidden_layers=1, activation_threshold=0.5)
  mlp = LlamaMLP(c, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jnp.array([-1.0, 0.0, 0.3, 0.5, 0.5000001, 0.7])
  np.testing.assert_array_equal(np.asarray(mlp.act(x)), [0, 0, 0, 0, np.float32(0.5000001), np.float32(0.7)])
  mlp.activation_threshold = 0.01
  xb = jnp.asarray([0.01, 0.02], jnp.bfloat16)  # bf16(0.01) = 0.010009765625 > 0.01
  assert np.asarray(mlp.act(xb).astype(jnp.float32)).tolist() == [0.010009765625, 0.02001953125]
  # config.json: "fatrelu" + hidden_act_param (MiniCPM-S / ProSparse convention) round-trips; θ = 0 writes "relu"
  d = _tiny_config().to_hf() | {"hidden_act": "fatrelu", "hidden_act_param": 0.01}
  cf = LlamaConfig.from_hf(d)
  assert (cf.hidden_act, cf.activation_threshold) == ("relu", 0.01) and cf.to_hf() == d
  plain = LlamaConfig.from_hf(d | {"hidden_act_param": 0.0}).to_hf()
  assert plain["hidden_act"] == "relu" and "hidden_act_param" not in plain
  assert LlamaConfig.from_hf(cf.to_hf()) == cf and cf != _tiny_config()


def test_fatrelu_model_zeroes_small_activations(relu_pair):
  _, model = relu_pair
  fat = prosparse.with_activation(model, "relu", 0.1)
  assert fat.config.activation_threshold == 0.1 and model.config.activation_threshold == 0.0
  assert fat.model.layers[0].mlp.gate_proj.kernel is not model.model.layers[0].mlp.gate_proj.kernel  # new variables
  ids = input_ids(6)
  (_, a_relu), (logits_fat, a_fat) = _forward_acts(model, ids), _forward_acts(fat, ids)
  # layer 0 sees the same input, so its FATReLU output is exactly the ReLU output with (0, θ] zeroed
  np.testing.assert_array_equal(np.asarray(a_fat[0]), np.where(np.asarray(a_relu[0]) > 0.1, np.asarray(a_relu[0]), 0))
  assert float(jnp.mean(a_fat[0] == 0)) > float(jnp.mean(a_relu[0] == 0))
  assert rel_err(logits_fat, _forward(model, ids)) > 1e-4


# --- measurement ------------------------------------------------------------------------------------------------------


def _constructed_model():
  """Known zeros: token v's hidden state is ones on its first v+1 dims; layer 0's gate is the identity (units > v are
  0: I − (v+1) zeros), layer 1's gate is minus the identity (all I units zero). Attention and MLP outputs are 0."""
  c = _tiny_config(vocab_size=8, hidden_size=8, intermediate_size=12, num_hidden_layers=2)
  model = nnx.eval_shape(lambda: LlamaForCausalLM(c, rngs=nnx.Rngs(0)))
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nnx.state(model))
  nnx.update(model, state)
  for norm in [model.model.norm] + [n for layer in model.model.layers
                                    for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
    norm.weight.set_value(jnp.ones(8))
  model.model.embed_tokens.embedding.set_value(jnp.asarray(np.tril(np.ones((8, 8), np.float32))))
  model.model.layers[0].mlp.gate_proj.kernel.set_value(jnp.eye(8, 12))
  model.model.layers[1].mlp.gate_proj.kernel.set_value(-jnp.eye(8, 12))
  return model


def test_activation_sparsity_constructed_case():
  model = _constructed_model()
  windows = np.array([[0, 1, 2, 3, 4], [7, 7, 7, 7, 7], [0, 0, 0, 0, 1]], np.int32)
  layer0 = (12 - (windows + 1)).sum() / (windows.size * 12)
  for bs in (2, 8):  # bs=2: the last batch is padded with a copy of window 2, which must not count (8: one batch)
    s = prosparse.activation_sparsity(model, windows, batch_size=bs)
    assert s.per_layer == pytest.approx((layer0, 1.0), abs=1e-12), bs
    assert s.overall == pytest.approx((layer0 + 1.0) / 2, abs=1e-12)
    assert (s.tokens, s.intermediate_size, s.hidden_act, s.threshold) == (15, 12, "relu", 0.0)
  padded_wrong = (12 - (np.concatenate([windows, windows[2:]]) + 1)).sum() / (20 * 12)
  assert abs(padded_wrong - layer0) > 1e-3  # the case does detect counting the padded row
  with pytest.raises(ValueError, match="batch_size"):
    prosparse.activation_sparsity(model, windows, batch_size=0)


# --- training ---------------------------------------------------------------------------------------------------------


BATCHES = np.random.default_rng(0).integers(0, 32, (4, 2, 8))


def _fresh():
  return LlamaForCausalLM(_tiny_config(), rngs=nnx.Rngs(0))


def _params(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_l1_penalty_pushes_activations_down():
  batches = np.random.default_rng(1).integers(0, 32, (6, 2, 8))
  kw = dict(learning_rate=4e-3, lr_schedule="constant", progress=False)
  r = prosparse.train_prosparse(_fresh(), batches, l1=prosparse.l1_schedule(1.0), **kw)
  assert r.steps == 6 and r.resumed_from == 0 and r.lambdas == [1.0] * 6
  np.testing.assert_allclose(r.losses, np.array(r.lm_losses) + np.array(r.l1), rtol=1e-5)
  assert r.l1[-1] < 0.5 * r.l1[0] and r.zero_fractions[-1] > r.zero_fractions[0] + 0.15
  control = prosparse.train_prosparse(_fresh(), batches, l1=prosparse.l1_schedule(0.0), **kw)  # λ = 0: no push
  assert control.l1[-1] > r.l1[0] and control.zero_fractions[-1] < r.zero_fractions[0] + 0.05
  with pytest.raises(ValueError, match="ReLU model"):
    prosparse.train_prosparse(LlamaForCausalLM(_tiny_config(hidden_act="silu"), rngs=nnx.Rngs(0)), batches,
                              l1=prosparse.l1_schedule(0.0), progress=False)


def test_resume_and_nan(tmp_path):
  kw = dict(l1=prosparse.l1_schedule(0.01, 1, [(3, 0.1)]), learning_rate=1e-2, progress=False)
  ref = prosparse.train_prosparse(_fresh(), BATCHES, **kw)
  state = tmp_path / "state"

  def stop(step, parts):
    assert isinstance(parts.total, float)
    if step == 2:
      raise KeyboardInterrupt  # killed after the checkpoint of step 2 (steps 0 and 1 done)

  with pytest.raises(KeyboardInterrupt):
    prosparse.train_prosparse(_fresh(), BATCHES, state_dir=state, save_every=2, callback=stop, **kw)
  assert sorted(os.listdir(state)) == sorted([loop.STATE_FILE, "step_0000002"])
  model = _fresh()
  r = prosparse.train_prosparse(model, BATCHES, state_dir=state, save_every=2, **kw)
  assert r.resumed_from == 2 and r.steps == 4 and len(r.losses) == 4 and r.model is model
  for field in ("losses", "lm_losses", "l1", "lambdas", "zero_fractions", "learning_rates"):  # bit for bit
    assert getattr(r, field) == getattr(ref, field), field
  a, b = _params(r.model), _params(ref.model)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert sorted(os.listdir(state)) == sorted([loop.STATE_FILE, "step_0000004"])
  with pytest.raises(ValueError, match="different ProSparse run.*learning_rate"):
    prosparse.train_prosparse(_fresh(), BATCHES, state_dir=state, **(kw | {"learning_rate": 2e-2}))
  bad = BATCHES.copy()
  bad[1, 0, 3] = 32  # outside the vocabulary: NaN embedding at step 1
  with pytest.raises(FloatingPointError, match="at step 1"):
    prosparse.train_prosparse(_fresh(), bad, **kw)


# --- export -----------------------------------------------------------------------------------------------------------


def test_relu_export_is_faithful_in_transformers(tmp_path):
  """A SiLU checkpoint switched to ReLU by proxjax saves as hidden_act 'relu'; transformers' logits equal ours."""
  src, out = tmp_path / "src", tmp_path / "out"
  make_torch_model("llama", seed=2).save_pretrained(src)
  silu = load_pretrained(src)
  relu = prosparse.with_activation(silu, "relu")
  assert silu.config.hidden_act == "silu"
  save_pretrained(relu, out)
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["hidden_act"] == "relu" and "hidden_act_param" not in cfg
  back = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  assert back.config.hidden_act == "relu"
  ids = input_ids(7)
  assert_close(_forward(relu, ids), torch_logits(back, ids))
  assert rel_err(_forward(silu, ids), torch_logits(back, ids)) > 1e-2


def test_fatrelu_export_refused_unless_opted_in(relu_pair, tmp_path):
  _, model = relu_pair
  fat = prosparse.with_activation(model, "relu", 0.05)
  out = tmp_path / "fat"
  with pytest.raises(UnsupportedModelError) as e:
    save_pretrained(fat, out)
  msg = str(e.value)
  for needle in ("FATReLU", "no FATReLU", "silently", "with_activation", "allow_fatrelu=True", "hidden_act='fatrelu'"):
    assert needle in msg, (needle, msg)
  assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".")]
  save_pretrained(fat, out, allow_fatrelu=True)
  cfg = json.loads((out / "config.json").read_text())
  assert (cfg["hidden_act"], cfg["hidden_act_param"]) == ("fatrelu", 0.05)
  back = load_pretrained(out)
  assert (back.config.hidden_act, back.config.activation_threshold) == ("relu", 0.05)
  ids = input_ids(8)
  np.testing.assert_array_equal(np.asarray(_forward(back, ids)), np.asarray(_forward(fat, ids)))
  with pytest.raises(Exception, match="fatrelu"):  # transformers refuses it: no silent plain-ReLU model
    transformers.LlamaForCausalLM.from_pretrained(out)
  save_pretrained(model, tmp_path / "plain", allow_fatrelu=True)  # θ = 0: the flag changes nothing
  assert json.loads((tmp_path / "plain" / "config.json").read_text())["hidden_act"] == "relu"


# --- command line -----------------------------------------------------------------------------------------------------


def test_cli_end_to_end(checkpoint, corpus, tmp_path, capsys):
  out = tmp_path / "sparse"
  argv = ["prosparse", str(checkpoint), str(out), "--train", str(corpus / "calib.txt"), "--steps", "6",
          "--batch-size", "2", "--seqlen", "32", "--lr", "3e-3", "--l1-warmup", "1e-3", "--l1-warmup-steps", "2",
          "--l1-stages", "4:1e-2", "6:3e-2", "--threshold", "0.01", "--eval", str(corpus / "eval.txt"),
          "--eval-seqlen", "32", "--max-windows", "5", "--eval-batch-size", "2", "--quiet"]
  capsys.readouterr()
  assert cli.main(argv) == 2  # --threshold without --export: refused before any work
  assert re.search("export 'fatrelu'.*export 'relu'", capsys.readouterr().err)
  assert not out.exists()

  assert cli.main(argv + ["--export", "fatrelu"]) == 0
  printed = capsys.readouterr().out
  assert "perplexity" in printed and "activation sparsity" in printed
  rep = json.loads((out / "proxjax-prosparse.json").read_text())
  assert rep["source_hidden_act"] == "silu" and rep["converted_to_relu"] is True
  assert rep["eval"]["protocol"]["windows"] == 5 and rep["before"]["sparsity_tokens"] == 5 * 32
  assert rep["before"]["hidden_act"] == "silu" and rep["before"]["sparsity"] < 0.01  # SiLU: no exact zeros
  assert rep["after_relu"]["sparsity"] > 0.3
  assert rep["after"] == rep["after_threshold"] and rep["after"]["threshold"] == 0.01
  assert rep["after_threshold"]["sparsity"] >= rep["after_relu"]["sparsity"]
  assert len(rep["after"]["sparsity_per_layer"]) == 2
  assert all(np.isfinite([rep["before"]["ppl"], rep["after_relu"]["ppl"], rep["after"]["ppl"]]))
  tr = rep["training"]
  # step t uses λ(t), t = 0..5: the last stage (4 → 6) is at its midpoint at the last step
  assert len(tr["losses"]) == 6 and tr["lambdas"][0] == pytest.approx(1e-3)
  assert tr["lambdas"][4] == pytest.approx(1e-2) and tr["lambdas"][5] == pytest.approx(1e-2 + 2e-2 * np.sin(np.pi / 4))
  assert rep["l1"]["stages"] == [{"end_step": 4, "peak": 1e-2}, {"end_step": 6, "peak": 3e-2}]
  assert rep["export"]["hidden_act"] == "fatrelu"
  cfg = json.loads((out / "config.json").read_text())
  assert (cfg["hidden_act"], cfg["hidden_act_param"]) == ("fatrelu", 0.01)
  assert json.loads((out / "proxjax.json").read_text())["prosparse"]["converted_to_relu"] is True
  assert (out / "tokenizer.json").exists() and not os.path.exists(str(out) + ".proxjax-state")
  # the saved checkpoint has the reported sparsity on the same windows
  back = load_pretrained(out)
  assert back.config.activation_threshold == 0.01
  windows = data.load_evaluation(data.load_tokenizer(out), str(corpus / "eval.txt"), seqlen=32, max_windows=5).windows
  assert prosparse.activation_sparsity(back, windows, 2).overall == pytest.approx(rep["after"]["sparsity"], abs=1e-12)
