"""Greedy generation with the KV cache (proxjax.models.generate) against uncached greedy decoding and transformers.

Models: tiny random transformers models (tests/support/torch_llama.py: hidden 64, 4 query heads, 2 layers, vocab 256,
weights re-drawn with std 0.15 so logits are well spread and greedy choices are far from ties) loaded with
``load_pretrained``. The reference for the cache is ``use_cache=False`` (a full forward of the growing sequences
every step, same bookkeeping), and for both transformers' ``generate(do_sample=False)``. Compiles: every run on
these models is a batch of 4 prompts with prompt bucket 16 and cache bucket 32, i.e. one prefill, one decode-chunk and
one full-forward program per model variant (4 variants), plus 3 for the logits check and 4 for the bucketing test.
The SmolLM2 tests (``slow``) do the same on the real model in float32 and bfloat16.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from proxjax.models import LlamaConfig, LlamaForCausalLM, load_pretrained  # noqa: E402
from proxjax.models import generate as gen  # noqa: E402
from tests.support.torch_llama import make_torch_model  # noqa: E402

PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [200, 13], [8, 8, 60, 71, 120, 33, 2, 9, 14, 15, 16, 1], [77, 78, 79, 80]]
"""Four prompts of different lengths (right-padded into one batch of 4, prompt bucket 16)."""
N_NEW = 20
"""Crosses a chunk boundary (1 token from the prefill, then 16 + 3 decode steps); cache bucket 32."""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """(torch model, our float32 model, its directory) per variant, built once."""
  cache = {}

  def make(key: str, kind: str = "llama", **overrides):
    if key not in cache:
      tm = make_torch_model(kind, seed=7, **overrides)
      d = tmp_path_factory.mktemp(key)
      tm.save_pretrained(d)
      cache[key] = (tm, load_pretrained(d), d)
    return cache[key]

  return make


VARIANTS = {
    "llama": dict(num_key_value_heads=4),  # plain multi-head attention
    "gqa": dict(num_key_value_heads=2, attention_bias=True),
    "mistral_window": dict(kind="mistral", num_key_value_heads=2, sliding_window=6),  # prompts + 20 tokens > 6
    "gqa_bf16": dict(num_key_value_heads=2, attention_bias=True, bf16=True),  # bf16 parameters, compute and cache
}


def _model(models, variant):
  overrides = dict(VARIANTS[variant])
  kind, bf16 = overrides.pop("kind", "llama"), overrides.pop("bf16", False)
  tm, model, d = models(variant.removesuffix("_bf16"), kind, **overrides)
  return tm, (load_pretrained(d, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16) if bf16 else model)


def _hf_greedy(tm, prompt, n, eos=None):
  with torch.no_grad():
    out = tm.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, eos_token_id=eos,
                      pad_token_id=0 if eos is None else eos, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
  new = out[0, len(prompt):].tolist()
  return new[:new.index(eos)] if eos is not None and eos in new else new


@pytest.mark.parametrize("variant", ["gqa", "gqa_bf16"])
def test_cached_equals_uncached(models, variant):
  """Token for token over a padded batch of 4 prompts, float32 and bfloat16 (3 compiles per variant: prefill, decode
  chunk, full forward)."""
  _, model = _model(models, variant)
  cached = gen.greedy_generate(model, PROMPTS, N_NEW)
  assert [len(r) for r in cached] == [N_NEW] * len(PROMPTS)
  assert cached == gen.greedy_generate(model, PROMPTS, N_NEW, use_cache=False)
  assert len({tuple(r) for r in cached}) == len(PROMPTS)  # the prompts matter: not one constant continuation


@pytest.mark.parametrize("variant", ["llama", "gqa", "mistral_window"])
def test_equals_transformers_generate(models, variant):
  """float32: plain multi-head Llama, GQA with biases, Mistral with a window of 6 (exceeded by every prompt + its 20
  tokens), each a padded batch of 4 against transformers' ``generate`` one prompt at a time."""
  tm, model = _model(models, variant)
  ours = gen.greedy_generate(model, PROMPTS, N_NEW)
  assert ours == [_hf_greedy(tm, p, N_NEW) for p in PROMPTS]
  assert len({tuple(r) for r in ours}) == len(PROMPTS)


@pytest.mark.slow
def test_cache_logits_equal_full_forward_past_the_window(models):
  """Prefill + decode steps give the full forward's logits at every position, on the sliding-window model, past the
  window and over a padded row (3 compiles)."""
  _, model = _model(models, "mistral_window")
  prefill, step = nnx.jit(gen.prefill), nnx.jit(gen.decode_step)
  ids = np.zeros((2, 8), np.int32)
  ids[0, :7], ids[1, :2] = PROMPTS[0], PROMPTS[1]
  logits, cache = prefill(model, gen.init_cache(model, 2, 16), ids, np.array([7, 2]))
  seqs, got = [list(PROMPTS[0]), list(PROMPTS[1])], []
  for _ in range(8):
    got.append(np.asarray(logits))
    nxt = np.asarray(jnp.argmax(logits, axis=-1))
    seqs = [s + [int(t)] for s, t in zip(seqs, nxt, strict=True)]
    logits, cache = step(model, cache, nxt)
  assert cache.lengths.tolist() == [15, 10]
  full_ids = np.zeros((2, 16), np.int32)
  full_ids[0, :15], full_ids[1, :10] = seqs[0], seqs[1]
  full = np.asarray(nnx.jit(lambda m, x: m(x))(model, full_ids))  # causal: the padding of row 1 changes nothing
  for row, start in ((0, 6), (1, 1)):
    want = full[row, start:start + 8]
    np.testing.assert_allclose(np.stack(got)[:, row], want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_eos_ends_a_row(models):
  tm, model, _ = models("gqa", num_key_value_heads=2, attention_bias=True)
  ours = gen.greedy_generate(model, PROMPTS, N_NEW)
  # EOS: a token that appears mid-way in a row's continuation ends that row (not included), in both libraries.
  eos = ours[0][5]
  with_eos = gen.greedy_generate(model, PROMPTS, N_NEW, eos_token_id=eos)
  for row, full in zip(with_eos, ours, strict=True):
    assert row == (full[:full.index(eos)] if eos in full else full)
  assert len(with_eos[0]) <= 5
  assert with_eos == [_hf_greedy(tm, p, N_NEW, eos) for p in PROMPTS]


def test_stop_callback(models):
  _, model, _ = models("gqa", num_key_value_heads=2, attention_bias=True)
  full = gen.greedy_generate(model, PROMPTS, N_NEW)
  calls = []

  def stop(i, tokens):
    calls.append((i, len(tokens)))
    return i == 2 and len(tokens) >= 3

  out = gen.greedy_generate(model, PROMPTS, N_NEW, stop=stop)
  assert out[2] == full[2][:gen.CHUNK + 1]  # checked after the first chunk: 1 (prefill) + 16 tokens, caller trims
  assert [out[i] for i in (0, 1, 3)] == [full[i] for i in (0, 1, 3)]
  assert sorted(calls) == [(0, 17), (1, 17), (2, 17), (3, 17)]  # rows 0, 1, 3 end at N_NEW in the next chunk
  assert gen.greedy_generate(model, PROMPTS, N_NEW, stop=lambda i, t: True) == [r[:17] for r in full]


def test_left_truncation_keeps_last_tokens(models):
  _, model, _ = models("gqa", num_key_value_heads=2, attention_bias=True)
  long = list(range(3, 40))  # 37 tokens; max_length 32 - 20 new tokens leaves 12: the last 12 are kept
  prompts = [long] + PROMPTS[1:]
  cut, n = gen.truncate_prompts(prompts, max_new_tokens=N_NEW, max_length=32)
  assert n == 1 and cut == [long[-12:]] + PROMPTS[1:]
  assert gen.truncate_prompts(cut, N_NEW, 32) == (cut, 0)  # already cut: unchanged
  out = gen.greedy_generate(model, prompts, N_NEW, max_length=32)
  assert out == gen.greedy_generate(model, cut, N_NEW)
  assert out[0] != gen.greedy_generate(model, [long[-11:]] + PROMPTS[1:], N_NEW)[0]  # the kept tokens matter


def test_compiles_are_bucketed():
  """One prefill and one decode program for every prompt length and batch split within a bucket (a longer prompt
  would add one of each; :func:`~proxjax.models.generate.bucket_length`'s doctest shows the buckets)."""
  c = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=128)  # a config no other test uses: its programs are new
  model = LlamaForCausalLM(c, rngs=nnx.Rngs(1))
  sizes = lambda: np.array([gen._prefill_greedy._cache_size(), gen._decode_chunk._cache_size()])  # noqa: E731, SLF001
  before = sizes()
  for length in (1, 3, 5, 9, 12):  # prompt bucket 16, cache bucket 16 (length + 4 <= 16), batch 1
    assert len(gen.greedy_generate(model, [list(range(1, length + 1))], 4, batch_size=1)[0]) == 4
  gen.greedy_generate(model, [[1, 2], [3, 4, 5], [6] * 7], 4, batch_size=1)  # three batches of one: same shapes
  assert (sizes() - before).tolist() == [1, 1]


def test_bad_input(models):
  _, model, _ = models("gqa", num_key_value_heads=2, attention_bias=True)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    gen.greedy_generate(model, [[1], []], 3)
  with pytest.raises(ValueError, match="max_new_tokens"):
    gen.greedy_generate(model, [[1]], -1)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    gen.greedy_generate(model, [[1, 256]], 3)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    gen.greedy_generate(model, [[-1]], 3)
  with pytest.raises(ValueError, match="LlamaForCausalLM"):
    gen.greedy_generate(object(), [[1]], 3)
  with pytest.raises(ValueError, match="no room"):
    gen.greedy_generate(model, [[1]], 16, max_length=16)
  with pytest.raises(ValueError, match="eos_token_id"):
    gen.greedy_generate(model, [[1]], 3, eos_token_id=999)
  with pytest.raises(ValueError, match="token ids"):
    gen.greedy_generate(model, ["abc"], 3)
  with pytest.raises(ValueError, match="batch_size"):
    gen.greedy_generate(model, [[1]], 3, batch_size=0)
  assert gen.greedy_generate(model, [[1], [2, 3]], 0) == [[], []]
