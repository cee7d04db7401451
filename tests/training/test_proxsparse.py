"""ProxSparse (proxjax.training.proxsparse): its recipe of the training loop, mask extraction, resumption and the CLI,
on the tiny checkpoint of tests/conftest.py.

Every run uses the same model, settings and (1, 32) batches, so the training step compiles once for the whole file.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

import proxjax
from proxjax import data
from proxjax import cli
from proxjax.workflows import common
from proxjax.training import loop
from proxjax.training import proxsparse as ps
from proxjax.models import LlamaConfig, LlamaForCausalLM, check_sparsity, load_pretrained, save_pretrained
from proxjax.models.llama import projection_spec

SEQLEN = 32
SETTINGS = dict(steps=8, lam1=0.1, lam_relative=True, learning_rate=1e-2, lam2=0.1, eps=0.5)


def _model(path):
  return load_pretrained(path, param_dtype=jnp.float32)


def _texts():
  return data.load_documents("lee", split="calibration")[:12]


@pytest.fixture(scope="module")
def docs(checkpoint):
  out = ps.tokenize_documents(data.load_tokenizer(checkpoint), _texts(), SEQLEN)
  assert len(out) == 12 and all(d.size == SEQLEN for d in out)
  return out


def _params(model):
  return dict(jax.tree_util.tree_flatten_with_path(nnx.as_pure(nnx.state(model, nnx.Param)))[0])


@jax.jit
def _penalties(kernels, w0, lam_eff, lam2, eps):
  """Σ λ₁c_i R(W_i) + λ₂ P(W) over the pruned kernels (dicts by name), in one compiled program."""
  return (sum(lam_eff[k] * proxjax.regularizer_24(x) for k, x in kernels.items())
          + lam2 * ps.lam2_term(kernels, w0, eps))


def _objective(model, docs, lam_eff, lam2, eps, w0):
  """The regularized objective: mean LM loss over the first 8 documents + Σ λ₁c_i R(W_i) + λ₂ P(W)."""
  ids = jnp.asarray(np.stack(docs[:8]))
  logits = common.logits_fn()(model, ids)  # the (8, 32) forward that the CLI's evaluation compiles too
  logp = jax.nn.log_softmax(logits[:, :-1], -1)
  lm = -float(jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1)))
  kernels = {ps.kernel_name(p): x for p, x in _params(model).items() if projection_spec(p, x) is not None}
  return lm + float(_penalties(kernels, w0, lam_eff, lam2, eps))


# ----------------------------------------------------------------------------------------------- pure functions --


def test_split_documents_uses_every_token_without_crossing_documents(checkpoint):
  tok = data.load_tokenizer(str(checkpoint))
  texts = _texts()
  whole = [np.asarray(e) for e in tok.encode_batch(texts)]
  pieces = ps.tokenize_documents(tok, texts, 8, split=True)
  truncated = ps.tokenize_documents(tok, texts, 8)
  assert len(truncated) == len(texts) and all(np.array_equal(t, w[:8]) for t, w in zip(truncated, whole))
  assert all(2 <= p.size <= 8 for p in pieces)
  it = iter(pieces)  # each document is exactly its pieces, in order (a last piece of 1 token is dropped)
  for w in whole:
    joined = []
    while len(joined) < w.size - 1:
      joined.extend(next(it).tolist())
    assert joined == w[:len(joined)].tolist() and len(joined) >= w.size - 1
  assert next(it, None) is None
  args = cli.build_parser().parse_args(["proxsparse", "m", "o", "--lam1", "0.1", "--split-documents"])
  assert args.split_documents and not cli.build_parser().parse_args(["proxsparse", "m", "o", "--lam1", "0.1"]).split_documents


def test_lam2_term_hand_computed():
  w0 = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5]])}
  assert float(ps.lam2_term(w0, w0)) == 0.0  # at the pretrained weights
  assert float(ps.lam2_term(jax.tree.map(jnp.zeros_like, w0), w0)) == 0.0  # and at zero
  w = {"a": jnp.array([2.0, 1.0]), "b": jnp.array([[-0.5]])}
  # (2·(2−1)/(1+ε))² + (1·(1+2)/(2+ε))² + (−0.5·(−0.5−0.5)/(0.5+ε))², ε = 0.1
  want = (2 * 1 / 1.1) ** 2 + (1 * 3 / 2.1) ** 2 + (0.5 / 0.6) ** 2
  assert float(ps.lam2_term(w, w0, eps=0.1)) == pytest.approx(want, rel=1e-6)


def test_mask_extraction_ties_and_masks_apply_to_the_original_weights():
  learned = {"k": jnp.array([[1.0, -3.0], [1.0, 3.0], [1.0, 2.0], [1.0, -2.0],
                             [0.0, 0.0], [0.0, 5.0], [0.0, 0.0], [-7.0, 5.0]])}
  masks = ps.extract_masks(learned, spec=0)
  np.testing.assert_array_equal(masks["k"][:, 0], [1, 1, 0, 0, 1, 0, 0, 1])  # ties: lower index wins
  np.testing.assert_array_equal(masks["k"][:, 1], [1, 1, 0, 0, 0, 1, 0, 1])
  original = {"k": jnp.arange(16.0).reshape(8, 2) + 1}
  out = ps.apply_masks(original, masks)
  np.testing.assert_array_equal(out["k"], np.where(masks["k"], original["k"], 0))
  assert bool(proxjax.is_nm(out["k"]))
  assert float(ps.fraction_24(learned, spec=0)) == 0.5  # the first group of each column has 4 non-zeros


def test_lm_loss_ignores_padding():
  cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  ids = np.random.default_rng(0).integers(0, 32, 12).astype(np.int32)
  padded, valid = ps.document_batch([ids, ids[:5]], 0, batch_size=2, max_length=16)
  assert padded.shape == (2, 16) and valid.sum(1).tolist() == [12, 5] and not padded[1, 5:].any()
  got = float(nnx.jit(loop.lm_loss)(model, jnp.asarray(padded), jnp.asarray(valid)))
  # Per-token NLLs of the unpadded first document; the second is its 5-token prefix, so (causal) its NLLs are the
  # first 4 of them. The batch loss is the token-weighted mean (11 ℓ₁ + 4 ℓ₂) / 15.
  logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids[None]))[0, :-1]
  nll = np.asarray(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(11), ids[1:]])
  np.testing.assert_allclose(got, (nll.sum() + nll[:4].sum()) / 15, rtol=1e-5)
  assert ps.document_batch([ids, ids[:5]], 3, batch_size=1)[0].shape == (1, 8)  # cycling; a power of two


@pytest.mark.slow  # a non-default option; the default scaling is checked by the end-to-end tests
def test_prox_scaling_lr_uses_the_learning_rate_as_eta():
  kernel = jax.random.normal(jax.random.key(0), (8, 4))
  params = {"model": {"layers": {0: {"mlp": {"up_proj": {"kernel": kernel}}}}}, "lm_head": {"kernel": jnp.ones((8, 4))}}
  grads = jax.tree.map(jnp.ones_like, params)
  lam = 40.0
  tx = ps.proxsparse_tx(10, 1e-2, lam, prox_scaling="lr")
  adam = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(ps.lr_schedule(1e-2, 10), weight_decay=0.0))

  @jax.jit
  def two_steps(params):
    state = tx.init(params)
    u0, state = tx.update(grads, state, params)
    u1, _ = tx.update(grads, state, params)
    plain, _ = adam.update(grads, state[:2], params)  # adam alone, from the same state
    return u0, u1, plain

  u0, u1, plain = two_steps(params)
  assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(u0))  # step 0: lr = 0, no move, no prox
  get = lambda t: t["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]  # noqa: E731
  new, z = optax.apply_updates(params, u1), optax.apply_updates(params, plain)
  np.testing.assert_allclose(get(new), proxjax.prox_24(get(z), lam, 1e-2), rtol=1e-5, atol=1e-6)  # η = lr(1) = 1e-2
  assert 0 < float(jnp.mean(get(new) == 0)) < 0.5
  np.testing.assert_allclose(new["lm_head"]["kernel"], z["lm_head"]["kernel"], rtol=1e-6)  # lm_head is not pruned
  with pytest.raises(ValueError, match="prox_scaling"):
    ps.proxsparse_tx(10, 1e-2, lam, prox_scaling="eta")


# ------------------------------------------------------------------------------------------------------- training --


@pytest.mark.slow  # a whole training run (35 s); the CLI end-to-end and resume tests cover ProxSparse in the default suite
def test_training_lowers_the_objective_and_the_result_is_mask_times_original(checkpoint, docs, tmp_path):
  model, start = _model(checkpoint), _model(checkpoint)
  original = _params(start)
  res = ps.proxsparse(model, docs, progress=False, return_learned=True, **SETTINGS)
  assert len(res.losses) == len(res.regularizer) == len(res.fraction_24) == SETTINGS["steps"] and res.resumed_from == 0
  assert res.learning_rates[0] == 0.0 and max(res.learning_rates) == pytest.approx(1e-2)
  assert res.tokens == [SEQLEN - 1] * SETTINGS["steps"] and res.lam2_terms[0] == 0.0
  assert res.regularizer[-1] < 0.5 * res.regularizer[0]
  assert res.fraction_24[0] < 0.1 < res.final_fraction_24 == pytest.approx(res.fraction_24[-1])
  # λ₁ relative: λ₁ / mean|W₀| per kernel.
  assert len(res.lam1_effective) == 14
  for path, x in original.items():
    if projection_spec(path, x) is not None:
      want = SETTINGS["lam1"] / float(jnp.mean(jnp.abs(x)))
      assert res.lam1_effective[ps.kernel_name(path)] == pytest.approx(want, rel=1e-5)

  # The regularized objective went down from the pretrained weights to the learned ones.
  w0 = {ps.kernel_name(p): x for p, x in original.items() if projection_spec(p, x) is not None}
  before = _objective(start, docs, res.lam1_effective, SETTINGS["lam2"], SETTINGS["eps"], w0)
  nnx.update(start, res.learned)
  after = _objective(start, docs, res.lam1_effective, SETTINGS["lam2"], SETTINGS["eps"], w0)
  assert after < before, (before, after)

  # The result: mask from the learned |W| (2 largest per group), applied to the ORIGINAL weights; the rest untouched.
  learned, final = dict(jax.tree_util.tree_flatten_with_path(res.learned)[0]), _params(model)
  masks = dict(jax.tree_util.tree_flatten_with_path(res.masks)[0])
  assert set(masks) == set(w0_path for w0_path, x in original.items() if projection_spec(w0_path, x) is not None)
  for path, x0 in original.items():
    if path in masks:
      mask = np.asarray(masks[path])
      np.testing.assert_array_equal(mask, np.asarray(proxjax.nm_mask(jnp.abs(learned[path]))), err_msg=str(path))
      np.testing.assert_array_equal(np.asarray(final[path]), np.where(mask, np.asarray(x0), 0.0), err_msg=str(path))
    else:
      np.testing.assert_array_equal(np.asarray(final[path]), np.asarray(x0), err_msg=str(path))
      assert not np.array_equal(np.asarray(learned[path]), np.asarray(x0))  # it was trained, and reset
  out = tmp_path / "masked"
  save_pretrained(model, out)
  assert all(r["ok"] for r in check_sparsity(out)) and len(check_sparsity(out)) == 14


class _Stop(Exception):
  pass


@pytest.mark.slow  # the shared loop's resume is checked bit for bit in tests/training/test_training_loop.py
def test_resume_gives_the_uninterrupted_result(checkpoint, docs, tmp_path):
  full = ps.proxsparse(_model(checkpoint), docs, progress=False, return_learned=True, **SETTINGS)
  state_dir = tmp_path / "state"
  seen = []

  def stop(t, metrics):
    seen.append(metrics)
    if t == 4:  # killed after step 4 ran, before step 5 was saved; steps 2 and 4 were saved
      raise _Stop()

  interrupted = _model(checkpoint)
  before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(interrupted, nnx.Param))]
  with pytest.raises(_Stop):
    ps.proxsparse(interrupted, docs, progress=False, state_dir=state_dir, save_every=2, callback=stop, **SETTINGS)
  assert [m["loss"] for m in seen] == full.losses[:5] and set(seen[0]) >= {"grad_norm", "fraction_24", "seconds"}
  for a, b in zip(jax.tree.leaves(nnx.state(interrupted, nnx.Param)), before):  # back to the original weights
    np.testing.assert_array_equal(np.asarray(a), b)
  saved = json.loads((state_dir / loop.STATE_FILE).read_text())
  assert saved["step"] == 4 and sorted(os.listdir(state_dir)) == sorted([loop.STATE_FILE, "step_0000004"])
  assert saved["fingerprint"]["method"] == "ProxSparse" and saved["history"]["losses"] == full.losses[:4]
  model = _model(checkpoint)
  resumed = ps.proxsparse(model, docs, progress=False, state_dir=state_dir, save_every=2, return_learned=True,
                          **SETTINGS)
  assert resumed.resumed_from == 4
  for a, b in zip(jax.tree.leaves(resumed.learned), jax.tree.leaves(full.learned)):  # the learned weights, bitwise
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(nnx.state(resumed.optimizer)), jax.tree.leaves(nnx.state(full.optimizer))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for field in ("losses", "regularizer", "lam2_terms", "fraction_24", "learning_rates", "grad_norms", "tokens",
                "final_fraction_24", "lam1_effective"):
    assert getattr(resumed, field) == getattr(full, field), field
  for a, b in zip(jax.tree.leaves(resumed.masks), jax.tree.leaves(full.masks)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(full.model, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert json.loads((state_dir / loop.STATE_FILE).read_text())["step"] == SETTINGS["steps"]  # final state saved
  with pytest.raises(ValueError, match="different ProxSparse run .*lam1"):
    ps.proxsparse(_model(checkpoint), docs, progress=False, state_dir=state_dir, **{**SETTINGS, "lam1": 0.2})


def test_bad_inputs_raise_clear_errors(checkpoint, docs):
  model = _model(checkpoint)
  for bad, match in [(dict(lam1=-1.0), "lam1"), (dict(lam2=-0.1), "lam2"), (dict(steps=0), "steps"),
                     (dict(eps=0.0), "eps"), (dict(prox_scaling="eta"), "prox_scaling"),
                     (dict(learning_rate=float("nan")), "learning_rate")]:
    with pytest.raises(ValueError, match=match):
      ps.proxsparse(model, docs, progress=False, **{**SETTINGS, **bad})
  with pytest.raises(ValueError, match="no LLaMA projections"):
    ps.proxsparse(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), docs, progress=False, **SETTINGS)
  with pytest.raises(ValueError, match="token-id arrays, not text"):
    ps.proxsparse(model, ["some text"], progress=False, **SETTINGS)
  with pytest.raises(ValueError, match="2 or more tokens"):
    ps.proxsparse(model, [np.array([1])], progress=False, **SETTINGS)
  with pytest.raises(ValueError, match="outside"):
    ps.proxsparse(model, [np.array([1, 400])], progress=False, **SETTINGS)
  emb = model.model.embed_tokens.embedding
  emb[...] = emb[...].at[int(docs[0][0])].set(jnp.nan)
  with pytest.raises(FloatingPointError, match="step 0"):
    ps.proxsparse(model, docs, progress=False, **SETTINGS)
  assert np.isnan(np.asarray(emb[...])).any() and np.asarray(model.model.norm.weight[...]).size  # usable, as given


# ------------------------------------------------------------------------------------------------------------ CLI --


def test_cli_end_to_end(checkpoint, corpus, tmp_path, capsys):
  train = tmp_path / "train.jsonl"
  train.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts()))
  out = tmp_path / "out"
  argv = ["proxsparse", str(checkpoint), str(out), "--train", str(train), "--seqlen", str(SEQLEN),
          "--steps", str(SETTINGS["steps"]), "--lr", str(SETTINGS["learning_rate"]), "--lam1", str(SETTINGS["lam1"]),
          "--lam-relative", "--lam2", str(SETTINGS["lam2"]), "--save-every", "4", "--eval", str(corpus / "eval.txt"),
          "--eval-seqlen", "32", "--quiet"]
  assert cli.main(argv) == 0
  assert "perplexity" in capsys.readouterr().out
  assert not os.path.exists(str(out) + ".proxjax-state")  # resume state removed after success
  files = set(os.listdir(out))
  assert {"config.json", "model.safetensors", "tokenizer.json", "proxjax.json", "proxjax-report.json"} <= files
  rep = json.loads((out / "proxjax-report.json").read_text())
  assert rep["method"] == "proxsparse" and len(rep["losses"]) == len(rep["fraction_24"]) == SETTINGS["steps"]
  assert rep["ppl_before"] > 0 and rep["ppl_after"] > 0 and rep["eval"]["seqlen"] == 32
  assert rep["calibration"]["documents"] == 12 and rep["sparsity"]["all_2_4"] and len(rep["lam1_effective"]) == 14
  assert json.loads((out / "proxjax.json").read_text())["options"]["lam_relative"] is True
  assert cli.main(["check", str(out)]) == 0
  # The saved weights are mask ⊙ original, and every other tensor is the original, bit for bit.
  before, after = load_file(str(checkpoint / "model.safetensors")), load_file(str(out / "model.safetensors"))
  assert before.keys() == after.keys()
  for name, w in before.items():
    if name.endswith("proj.weight"):
      kept = after[name] != 0
      np.testing.assert_array_equal(after[name], np.where(kept, w, 0), err_msg=name)
      assert np.all(np.count_nonzero(kept.reshape(w.shape[0], -1, 4), axis=-1) == 2), name
    else:
      np.testing.assert_array_equal(after[name], w, err_msg=name)
  # Bad inputs fail before any work; an existing output directory is refused.
  for bad, needle in ((["--lam1", "-1"], "lam1"), (["--steps", "0"], "steps")):
    capsys.readouterr()
    assert cli.main(argv[:2] + [str(tmp_path / "other")] + argv[3:] + bad) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
  assert cli.main(argv) == 2
  assert "not empty" in capsys.readouterr().err
