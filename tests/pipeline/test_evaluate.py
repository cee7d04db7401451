"""Tests for proxjax.pipeline.evaluate: perplexity against independent NumPy references, batching, errors, the report."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxjax.pipeline.evaluate import PerplexityResult, format_report, perplexity

V = 7


@pytest.fixture(scope="module")
def bigram():
  """A fixed bigram model: p(next | current) = P[current, next]; logits = log P[ids]."""
  rng = np.random.default_rng(0)
  p = rng.dirichlet(np.full(V, 0.7), size=V)
  log_p = jnp.asarray(np.log(p), jnp.float32)
  windows = rng.integers(0, V, size=(5, 9)).astype(np.int32)
  return p, (lambda ids: log_p[ids]), windows


def reference_ppl(p: np.ndarray, windows: np.ndarray) -> float:
  nll = [-math.log(p[w[t], w[t + 1]]) for w in windows for t in range(len(w) - 1)]
  return math.exp(sum(nll) / len(nll))


def test_bigram_matches_numpy(bigram):
  p, fn, windows = bigram
  r = perplexity(fn, windows, progress=False)
  assert r.ppl == pytest.approx(reference_ppl(p, windows), rel=1e-6)
  assert r.nll == pytest.approx(math.log(r.ppl), rel=1e-12)
  assert (r.predicted_tokens, r.windows, r.seqlen) == (5 * 8, 5, 9)


def test_logits_need_not_be_normalized(bigram):
  p, fn, windows = bigram
  shifted = lambda ids: fn(ids) * 1.0 + 3.5 + jnp.arange(9.0)[None, :, None]  # per-position constant: same softmax
  assert perplexity(shifted, windows, progress=False).ppl == pytest.approx(reference_ppl(p, windows), rel=1e-6)


def test_uniform_model_gives_vocab_size():
  windows = np.arange(64, dtype=np.int32).reshape(4, 16) % 50
  r = perplexity(lambda ids: jnp.zeros(ids.shape + (50,), jnp.bfloat16), windows, batch_size=3, progress=False)
  assert r.ppl == pytest.approx(50.0, rel=1e-6) and r.nll == pytest.approx(math.log(50.0), rel=1e-6)
  assert r.predicted_tokens == 4 * 15


def test_batch_sizes_agree_and_padding_is_ignored(bigram):
  p, fn, windows = bigram
  shapes = []

  def recording(ids):
    shapes.append(ids.shape)
    return fn(ids)

  r1 = perplexity(recording, windows, batch_size=1, progress=False)
  assert set(shapes) == {(1, 9)} and len(shapes) == 5
  shapes.clear()
  r3 = perplexity(recording, windows, batch_size=3, progress=True)  # 3 + 2 (padded to 3)
  assert shapes == [(3, 9), (3, 9)]  # one shape only: a jitted model compiles once
  assert r3.ppl == pytest.approx(r1.ppl, rel=1e-7) and r3.predicted_tokens == r1.predicted_tokens == 40
  r9 = perplexity(jax.jit(fn), windows, batch_size=9, progress=False)  # batch larger than the data
  assert r9.ppl == pytest.approx(r1.ppl, rel=1e-7)


def test_non_finite_logits_raise(bigram):
  _, fn, windows = bigram

  def broken(value, row, call=0):
    calls = []

    def f(ids):
      calls.append(1)
      out = fn(ids)
      return out.at[row, 2, 0].set(value) if len(calls) == call + 1 else out
    return f

  with pytest.raises(ValueError, match="NaN or inf logits for window 0"):
    perplexity(broken(jnp.nan, 0), windows, progress=False)
  with pytest.raises(ValueError, match="NaN or inf logits for window 4"):
    perplexity(broken(jnp.inf, 1, call=1), windows, batch_size=3, progress=False)  # second batch, row 1 = window 4


def test_input_errors(bigram):
  _, fn, windows = bigram
  with pytest.raises(ValueError, match="2-D integer array"):
    perplexity(fn, windows[0], progress=False)
  with pytest.raises(ValueError, match="at least 2 tokens"):
    perplexity(fn, windows[:, :1], progress=False)
  with pytest.raises(ValueError, match="batch_size must be a positive int"):
    perplexity(fn, windows, batch_size=0, progress=False)
  with pytest.raises(ValueError, match=r"expected \(B, T, V\)"):
    perplexity(lambda ids: fn(ids)[:, :-1], windows, progress=False)
  with pytest.raises(ValueError, match="token id 7 .* outside the logits' vocabulary of size 7"):
    perplexity(fn, np.full((2, 4), 7, np.int32), progress=False)


def test_format_report():
  r = PerplexityResult(ppl=12.3456789, nll=math.log(12.3456789), predicted_tokens=3066, windows=6, seqlen=512)
  protocol = {"source": "wikitext2", "split": "evaluation", "joiner": "\n\n", "seqlen": 512, "windows": 6,
              "tokens": 3072}
  text = format_report(r, protocol, model="SmolLM2-135M", method="wanda", sparsity="2:4", seed=0)
  lines = text.splitlines()
  assert lines[0].split(":", 1) == ["perplexity       ", " 12.3457"]
  assert "predicted tokens : 3066 (6 windows x 511)" in lines
  for key in ("source", "split", "joiner", "seqlen", "windows", "tokens", "model", "method", "sparsity", "seed"):
    assert any(line.startswith(key + " ") for line in lines), key
  assert "joiner           : '\\n\\n'" in lines and "method           : wanda" in lines
  with pytest.raises(ValueError, match="protocol says seqlen=256"):
    format_report(r, {**protocol, "seqlen": 256})
  assert "seqlen" in format_report(r)  # added when the protocol lacks it
