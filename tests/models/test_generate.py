"""Greedy generation with the KV cache (proxjax.models.generate) against uncached greedy decoding and transformers.

Models: tiny random transformers models (tests/support/torch_llama.py: hidden 64, 4 query heads, 2 layers, vocab 256,
weights re-drawn with std 0.15 so logits are well spread and greedy choices are far from ties) loaded with
``load_pretrained``, and the session ``checkpoint`` (tests/conftest.py). The reference for the cache is
``use_cache=False`` (a full forward of the growing sequences every step, same bookkeeping), and for both
transformers' ``generate(do_sample=False)``. Compiles: every cached run here uses batch 4 (or 1), prompt bucket 16 and
cache bucket 32 (or 16), i.e. one prefill and one decode-chunk program per model.
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
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_equals_uncached_and_logits(models, variant):
  overrides = dict(VARIANTS[variant])
  _, model, _ = models(variant, overrides.pop("kind", "llama"), **overrides)
  cached = gen.greedy_generate(model, PROMPTS, N_NEW)
  uncached = gen.greedy_generate(model, PROMPTS, N_NEW, use_cache=False)
  assert [len(r) for r in cached] == [N_NEW] * len(PROMPTS)
  assert cached == uncached
  assert len({tuple(r) for r in cached}) == len(PROMPTS)  # the prompts matter: not one constant continuation
  # The cache maths directly: prefill + decode steps give the full forward's logits at every position.
  ids = np.zeros((2, 8), np.int32)
  ids[0, :7], ids[1, :2] = PROMPTS[0], PROMPTS[1]
  logits, cache = gen.prefill(model, gen.init_cache(model, 2, 16), ids, np.array([7, 2]))
  seqs = [list(PROMPTS[0]), list(PROMPTS[1])]
  for _ in range(8):  # past the window of 6 for the Mistral variant, and over the first row's padding
    for row in range(2):
      full = model(jnp.asarray([seqs[row]]))[0, -1]
      np.testing.assert_allclose(logits[row], full, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(full))))
    nxt = np.asarray(jnp.argmax(logits, axis=-1))
    seqs = [s + [int(t)] for s, t in zip(seqs, nxt, strict=True)]
    logits, cache = gen.decode_step(model, cache, nxt)
  assert cache.lengths.tolist() == [15, 10]


def test_bfloat16_cached_equals_uncached(models):
  """bfloat16 parameters, float32 and bfloat16 compute (the cache then holds bfloat16 keys/values)."""
  _, _, d = models("gqa", num_key_value_heads=2, attention_bias=True)
  for dtype in (jnp.float32, jnp.bfloat16):
    model = load_pretrained(d, param_dtype=jnp.bfloat16, dtype=dtype)
    cached = gen.greedy_generate(model, PROMPTS, N_NEW)
    assert cached == gen.greedy_generate(model, PROMPTS, N_NEW, use_cache=False), dtype
    assert [len(r) for r in cached] == [N_NEW] * len(PROMPTS)


def _hf_greedy(tm, prompt, n, eos=None):
  with torch.no_grad():
    out = tm.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, eos_token_id=eos,
                      pad_token_id=0 if eos is None else eos, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
  new = out[0, len(prompt):].tolist()
  return new[:new.index(eos)] if eos is not None and eos in new else new


def test_equals_transformers_generate_and_eos(models, checkpoint):
  import transformers  # pylint: disable=import-outside-toplevel

  tm, model, _ = models("gqa", num_key_value_heads=2, attention_bias=True)
  ours = gen.greedy_generate(model, PROMPTS, N_NEW)
  assert ours == [_hf_greedy(tm, p, N_NEW) for p in PROMPTS]
  # EOS: a token that appears mid-way in a row's continuation ends that row (not included), in both libraries.
  eos = ours[0][5]
  with_eos = gen.greedy_generate(model, PROMPTS, N_NEW, eos_token_id=eos)
  for row, full in zip(with_eos, ours, strict=True):
    assert row == (full[:full.index(eos)] if eos in full else full)
  assert len(with_eos[0]) <= 5
  assert with_eos == [_hf_greedy(tm, p, N_NEW, eos) for p in PROMPTS]
  # The session checkpoint saved by transformers (float32, vocab 320, eos 0), batch of 1.
  tiny = load_pretrained(checkpoint)
  hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
  prompt = [31, 200, 7, 150, 66]
  assert gen.greedy_generate(tiny, [prompt], 12, eos_token_id=0) == [_hf_greedy(hf, prompt, 12, 0)]


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
  long = list(range(3, 40))  # 37 tokens
  cut, n = gen.truncate_prompts([long, [5, 6]], max_new_tokens=4, max_length=16)
  assert n == 1 and cut == [long[-12:], [5, 6]]
  out = gen.greedy_generate(model, [long, [5, 6]], 4, max_length=16)
  assert out == gen.greedy_generate(model, cut, 4) and out[0] != gen.greedy_generate(model, [long], 4)[0]
  assert gen.truncate_prompts(cut, 4, 16) == (cut, 0)  # already cut: unchanged


def test_compiles_are_bucketed():
  """One prefill and one decode program for all prompt lengths in a bucket; a longer prompt adds one of each."""
  c = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=128)  # a config no other test uses: its programs are new
  model = LlamaForCausalLM(c, rngs=nnx.Rngs(1))
  sizes = lambda: (gen._prefill_greedy._cache_size(), gen._decode_chunk._cache_size())  # noqa: E731, SLF001
  before = sizes()
  for length in (1, 3, 5, 9, 12):  # T bucket 16, cache bucket 16 (length + 4 <= 16), batch 1
    gen.greedy_generate(model, [list(range(1, length + 1))], 4, batch_size=1)
  gen.greedy_generate(model, [[1, 2], [3, 4, 5]], 4, batch_size=1)  # two batches of one: same shapes
  after = sizes()
  assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
  gen.greedy_generate(model, [list(range(1, 15))], 4, batch_size=1)  # 14 + 4 > 16: cache bucket 32
  assert (sizes()[0] - after[0], sizes()[1] - after[1]) == (1, 1)


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
