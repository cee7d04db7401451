"""The one training loop (proxjax.training.loop): a resumed run equals an uninterrupted one bit for bit, a non-finite
loss stops the run naming the step, a state directory of another run is refused; the loss, and fine-tuning through
the loop. ProxSparse and ProSparse resumption are tested in tests/training/test_proxsparse.py and
tests/training/test_prosparse.py."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from proxjax.models import LlamaConfig, LlamaForCausalLM
from proxjax.training import finetune, loop

CONFIG = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
STEPS = 5


def _loss(model, batch):
  ids, scale = batch
  value = loop.lm_loss(model, ids) * scale
  return value, {"loss": value, "scale": scale}


RECIPE = loop.Recipe("demo", loop.train_step(_loss), ("losses", "scales"),
                     lambda t, m: {"losses": m["loss"], "scales": m["scale"]})


def _batch(t):
  ids = np.random.default_rng(t).integers(0, 32, (2, 8)).astype(np.int32)
  return ids, np.float32(1.0 + 0.1 * t)


# One transformation object for every run of this file: the optimizer is part of the graph definition, which is a
# static argument of the compiled step, so equal objects let every run of a model shape reuse one compilation.
TX = optax.adamw(1e-2, weight_decay=0.01)


def _fresh(config=CONFIG):
  model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
  return model, nnx.Optimizer(model, TX, wrt=nnx.Param)


def _leaves(*trees):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(trees))]


class _Stop(Exception):
  pass


def _stop_at(step):
  def callback(t, metrics):
    assert isinstance(metrics["loss"], float) and metrics["seconds"] >= 0
    if t == step:
      raise _Stop()
  return callback


def test_resume_equals_uninterrupted_bit_for_bit(tmp_path):
  model, optimizer = _fresh()
  full = loop.run(RECIPE, model, optimizer, _batch, steps=STEPS, progress=False)
  assert full.steps == STEPS and full.resumed_from == 0 and len(full.history["losses"]) == STEPS
  assert full.history["scales"] == [float(np.float32(1.0 + 0.1 * t)) for t in range(STEPS)]
  want = _leaves(model, optimizer)

  state_dir = tmp_path / "state"
  model, optimizer = _fresh()
  with pytest.raises(_Stop):  # steps 0, 1, 2 ran; the save after step 1 (2 done) is the last one
    loop.run(RECIPE, model, optimizer, _batch, steps=STEPS, state_dir=state_dir, save_every=2,
             fingerprint={"run_info": "a"}, progress=False, callback=_stop_at(2))
  assert sorted(os.listdir(state_dir)) == sorted([loop.STATE_FILE, "step_0000002"])
  saved = json.loads((state_dir / loop.STATE_FILE).read_text())
  assert (saved["version"], saved["step"], saved["checkpoint"]) == (loop.STATE_VERSION, 2, "step_0000002")
  assert saved["history"]["losses"] == full.history["losses"][:2]
  fp = saved["fingerprint"]
  assert (fp["method"], fp["run_info"], fp["version"]) == ("demo", "a", loop.STATE_VERSION) and len(fp["state"]) == 64

  interrupted = tmp_path / "interrupted"
  shutil.copytree(state_dir, interrupted)
  for batches in (_batch, (_batch(t) for t in range(STEPS))):  # a function of the step, or an iterable (skipped)
    shutil.rmtree(state_dir)
    shutil.copytree(interrupted, state_dir)
    model, optimizer = _fresh()
    resumed = loop.run(RECIPE, model, optimizer, batches, steps=STEPS, state_dir=state_dir, save_every=2,
                       fingerprint={"run_info": "a"}, progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == STEPS and resumed.history == full.history
    for a, b in zip(_leaves(model, optimizer), want, strict=True):
      np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(state_dir)) == sorted([loop.STATE_FILE, f"step_{STEPS:07d}"])
    # the finished run is continued from its last step: nothing left to do, the same weights
    model, optimizer = _fresh()
    again = loop.run(RECIPE, model, optimizer, _batch, steps=STEPS, state_dir=state_dir,
                     fingerprint={"run_info": "a"}, progress=False)
    assert again.resumed_from == again.steps == STEPS and again.history == full.history
    for a, b in zip(_leaves(model, optimizer), want, strict=True):
      np.testing.assert_array_equal(a, b)


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
  def batch(t):
    ids, scale = _batch(t)
    return ids, np.float32(np.nan) if t == 3 else scale

  model, optimizer = _fresh()
  with pytest.raises(FloatingPointError, match=r"demo: loss not finite at step 3 \(loss nan\); lower the learning "
                                               r"rate; the last save in .* is intact"):
    loop.run(RECIPE, model, optimizer, batch, steps=STEPS, state_dir=tmp_path, save_every=1, progress=False)
  assert json.loads((tmp_path / loop.STATE_FILE).read_text())["step"] == 3  # steps 0-2 saved, step 3 not
  assert any(np.isnan(x).any() for x in _leaves(model))  # the model holds the failing step's state
  checked = loop.Recipe("demo", RECIPE.step, RECIPE.history, RECIPE.record, finite=("loss", "scale"))
  with pytest.raises(FloatingPointError, match=r"loss and scale not finite at step 3 \(loss nan, scale nan\)"):
    loop.run(checked, *_fresh(), batch, steps=STEPS, progress=False)


def test_the_state_directory_of_another_run_is_refused(tmp_path):
  loop.run(RECIPE, *_fresh(), _batch, steps=2, state_dir=tmp_path, fingerprint={"lr": 0.1}, progress=False)
  with pytest.raises(ValueError, match=r"belongs to a different demo run \(differs in: lr\)"):
    loop.run(RECIPE, *_fresh(), _batch, steps=2, state_dir=tmp_path, fingerprint={"lr": 0.2}, progress=False)
  bigger = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
  with pytest.raises(ValueError, match=r"differs in: state\)"):  # another model: another training state
    loop.run(RECIPE, *_fresh(bigger), _batch, steps=2, state_dir=tmp_path, fingerprint={"lr": 0.1}, progress=False)
  other = loop.Recipe("other", RECIPE.step, RECIPE.history, RECIPE.record)
  with pytest.raises(ValueError, match=r"differs in: method\)"):
    loop.run(other, *_fresh(), _batch, steps=2, state_dir=tmp_path, fingerprint={"lr": 0.1}, progress=False)
  with pytest.raises(ValueError, match=r"differs in: steps\)"):
    loop.run(RECIPE, *_fresh(), _batch, steps=3, state_dir=tmp_path, fingerprint={"lr": 0.1, "steps": 3},
             progress=False)
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  (legacy / "proxsparse-state.json").write_text("{}")
  with pytest.raises(ValueError, match="older proxjax"):
    loop.run(RECIPE, *_fresh(), _batch, steps=2, state_dir=legacy, progress=False)


def test_bad_arguments_are_refused():
  for kw, match in ((dict(steps=-1), "steps"), (dict(steps=2, save_every=-1), "save_every"),
                    (dict(steps=True), "steps"), (dict(steps=None, state_dir="x"), "number of steps")):
    with pytest.raises(ValueError, match=match):
      loop.run(RECIPE, *_fresh(), _batch, progress=False, **kw)
  with pytest.raises(ValueError, match="ended after 1 of 2"):
    loop.run(RECIPE, *_fresh(), [_batch(0)], steps=2, progress=False)
  with pytest.raises(ValueError, match="loss"):
    loop.Recipe("x", RECIPE.step, ("a",), RECIPE.record, finite=("scale",))


def test_lm_loss_masks_padding_and_equals_the_plain_mean():
  model = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))
  ids = jnp.asarray(_batch(0)[0])
  plain = float(loop.lm_loss(model, ids))
  assert float(loop.lm_loss(model, ids, jnp.ones(ids.shape, bool))) == pytest.approx(plain, rel=1e-6)
  logits = model(ids)[:, :-1]
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0]
  assert plain == pytest.approx(float(jnp.mean(nll)), rel=1e-6)
  valid = jnp.arange(8)[None, :] < jnp.array([[8], [3]])  # the second row has 3 real tokens: 2 targets
  want = (float(jnp.sum(nll[0])) + float(jnp.sum(nll[1, :2]))) / 9
  assert float(loop.lm_loss(model, ids, valid)) == pytest.approx(want, rel=1e-6)


def test_finetune_resumes_bit_for_bit_and_keeps_the_zeros(tmp_path):
  batches = np.stack([_batch(t)[0] for t in range(4)])

  def pruned():
    model = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    up = model.model.layers[0].mlp.up_proj.kernel
    up[...] = up[...].at[::2].set(0.0)
    return model

  full_model = pruned()
  compiled = finetune._RECIPE.step._cache_size()  # pylint: disable=protected-access
  full = finetune.finetune_masked(full_model, batches, learning_rate=1e-2, progress=False)
  assert full.steps == 4 and bool(jnp.all(full_model.model.layers[0].mlp.up_proj.kernel[...][::2] == 0))
  with pytest.raises(_Stop):
    finetune.finetune_masked(pruned(), batches, learning_rate=1e-2, progress=False, state_dir=tmp_path,
                             save_every=1, callback=_stop_at(2))
  model = pruned()
  resumed = finetune.finetune_masked(model, list(batches), learning_rate=1e-2, progress=False, state_dir=tmp_path)
  assert resumed == full
  for a, b in zip(_leaves(model), _leaves(full_model), strict=True):
    np.testing.assert_array_equal(a, b)
  # three models, one chain: the step compiled once (a chain built per call would compile it three times)
  assert finetune._RECIPE.step._cache_size() - compiled <= 1  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="different fine-tune run .*learning_rate"):
    finetune.finetune_masked(pruned(), batches, learning_rate=2e-2, progress=False, state_dir=tmp_path)


def test_a_state_with_committed_and_uncommitted_leaves_compiles_the_step_once():
  def loss(model, batch):
    x, y = batch
    value = jnp.mean((model(x) - y) ** 2)
    return value, {"loss": value}

  step = loop.train_step(loss)  # a fresh function: its own compile cache
  recipe = loop.Recipe("mixed", step, ("losses",), lambda t, m: {"losses": m["loss"]})
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  model.kernel[...] = jax.device_put(model.kernel[...], jax.devices()[0])  # committed; the bias is not
  assert model.kernel[...].committed and not model.bias[...].committed
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  batch = (jnp.ones((4, 3)), jnp.zeros((4, 2)))
  result = loop.run(recipe, model, optimizer, lambda t: batch, steps=3, progress=False)
  assert result.steps == 3 and result.history["losses"][2] < result.history["losses"][0]
  assert step._cache_size() == 1  # pylint: disable=protected-access
