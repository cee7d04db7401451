r"""Incremental decoding for :class:`~proxjax.models.llama.LlamaForCausalLM` (every supported family: Llama, Mistral,
Qwen2, Qwen3, Gemma 2, Gemma 3 text): a KV cache and greedy generation.

The cache holds, for every decoder block ``l``, the rotated keys and the values of every position written so far:

* ``k[l, b, j]``, ``v[l, b, j]`` (``H_kv`` heads of ``head_dim``, the compute dtype) for ``j < lengths[b]``;
  entries at ``j ≥ lengths[b]`` are padding (masked, then overwritten as row ``b`` generates).

Two forwards use it; both call the model's own modules (embedding, norms, q/k/v/o projections through
:meth:`LlamaAttention.project <proxjax.models.llama.LlamaAttention.project>` and
:meth:`~proxjax.models.llama.LlamaAttention.attend`, the MLP, ``model.rope``, ``model.head``), so a pruned or
sharded model decodes with exactly its weights:

* :func:`prefill` of a right-padded prompt batch ``ids`` ``(B, T)`` with per-row lengths ``n_b``: the full causal
  forward of the ``T`` positions (the same computation as ``model(ids)``; the causal mask means padding after
  position ``n_b − 1`` cannot change it), storing ``k, v`` of positions ``0 … T−1``, ``lengths = n``, and returning
  the logits at each row's last real token ``n_b − 1``.
* :func:`decode_step` of one token ``x_b`` per row at position ``p_b = lengths[b]``: RoPE at ``p_b``, ``k, v``
  written at index ``p_b``, then the layer's own attention (:meth:`~proxjax.models.llama.LlamaAttention.attend`:
  ``softmax(cap(q kᵀ · r) + mask) v``, with the q/k norms, score scale and soft-capping of its family) over the
  cache with key ``j`` visible iff ``j ≤ p_b`` and, on a layer with a sliding window ``w`` (each layer its own:
  ``config.layer_window``), ``j > p_b − w`` (the full forward's mask, row ``p_b``); ``lengths ← lengths + 1``.

:func:`greedy_generate` runs them under ``jax.jit`` with bucketed shapes: the prompt length ``T`` and the cache length
``S`` are powers of two (at least 16) and the batch is ``min(batch_size, 2^⌈log₂ n⌉)`` rows, so the prefill compiles
once per ``(B, T, S)`` and the decode loop (``lax.scan`` over :data:`CHUNK` steps, one host round trip per chunk) once
per ``(B, S)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.typing import ArrayLike

from proxjax.models.llama import LlamaAttention, LlamaForCausalLM

CHUNK = 16
"""Decode steps per device call of :func:`greedy_generate`; ``stop`` is checked after each chunk."""

MIN_BUCKET = 16
"""The smallest bucketed prompt / cache length."""


class KVCache(NamedTuple):
  """The keys and values of every block, stacked over layers.

  Attributes:
    k: rotated keys ``(L, B, S, H_kv, head_dim)`` in the model's compute dtype.
    v: values, same shape and dtype.
    lengths: ``(B,)`` int32, the number of valid positions of each row (the next token is written there).
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
  """The smallest power of two ``≥ max(n, minimum)`` (the bucketed prompt / cache lengths of :func:`greedy_generate`).

  Example:
    >>> from proxjax.models.generate import bucket_length
    >>> bucket_length(5), bucket_length(16), bucket_length(17), bucket_length(3, minimum=1)
    (16, 16, 32, 4)
  """
  n = max(int(n), int(minimum), 1)
  return 1 << (n - 1).bit_length()


def init_cache(model: LlamaForCausalLM, batch: int, length: int) -> KVCache:
  """An empty cache (zeros, ``lengths = 0``) for ``batch`` rows of ``length`` positions.

  Example:
    >>> from flax import nnx
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM
    >>> from proxjax.models.generate import init_cache
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                 num_attention_heads=4, num_key_value_heads=2)
    >>> model = nnx.eval_shape(lambda: LlamaForCausalLM(c, rngs=nnx.Rngs(0)))
    >>> cache = init_cache(model, 3, 16)
    >>> cache.k.shape, cache.lengths.tolist()
    ((2, 3, 16, 2, 4), [0, 0, 0])
  """
  c = model.config
  zeros = jnp.zeros((c.num_hidden_layers, batch, length, c.num_key_value_heads, c.head_dim), model.dtype)
  return KVCache(zeros, zeros, jnp.zeros((batch,), jnp.int32))


def _prefill_attention(attn: LlamaAttention, rope: tuple[jax.Array, jax.Array],
                       store: list[tuple[jax.Array, jax.Array]]) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  def attention(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    q, k, v = attn.project(x, rope)
    store.append((k, v))
    o_in = attn.attend(q, k, v)
    return attn.o_proj(o_in), o_in
  return attention


def prefill(model: LlamaForCausalLM, cache: KVCache, input_ids: ArrayLike,
            lengths: ArrayLike) -> tuple[jax.Array, KVCache]:
  """Runs right-padded prompts ``input_ids`` ``(B, T)`` (row ``b`` real for positions ``< lengths[b]``) through the
  model, writing their keys/values at cache positions ``0 … T−1``.

  Returns ``(logits, cache)``: float32 logits ``(B, V)`` of position ``lengths[b] − 1`` of each row (equal to
  ``model(input_ids)[b, lengths[b] − 1]``: the same computation) and the cache with ``lengths`` set. ``T`` must not
  exceed the cache length; ``1 ≤ lengths[b] ≤ T`` is not checked (the function is traced under ``jit``).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM
    >>> from proxjax.models.generate import init_cache, prefill
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                 num_attention_heads=2)
    >>> model = LlamaForCausalLM(c, rngs=nnx.Rngs(0))
    >>> ids = jnp.array([[5, 6, 7], [8, 9, 0]])  # the second prompt is [8, 9] (right-padded)
    >>> logits, cache = nnx.jit(prefill)(model, init_cache(model, 2, 16), ids, jnp.array([3, 2]))
    >>> full = nnx.jit(lambda m, ids: m(ids))(model, ids[1:, :2])
    >>> bool(jnp.allclose(logits[1], full[0, 1], atol=1e-6)), cache.lengths.tolist()
    (True, [3, 2])
  """
  ids = jnp.asarray(input_ids)
  b, t = ids.shape
  if t > cache.k.shape[2]:
    raise ValueError(f"the prompts ({t} positions) do not fit into the cache ({cache.k.shape[2]} positions)")
  h = model.embed(ids)
  rope = model.rope(jnp.arange(t))
  store: list[tuple[jax.Array, jax.Array]] = []
  for layer in model.model.layers:
    h = layer(h, rope, attention=_prefill_attention(layer.self_attn, rope, store))
  k = jnp.stack([kv[0] for kv in store]).astype(cache.k.dtype)
  v = jnp.stack([kv[1] for kv in store]).astype(cache.v.dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  last = h[jnp.arange(b), lengths - 1][:, None]
  logits = model.head(last)[:, 0]
  return logits, KVCache(lax.dynamic_update_slice(cache.k, k, (0,) * 5),
                         lax.dynamic_update_slice(cache.v, v, (0,) * 5), lengths)


def decode_mask(lengths: jax.Array, cache_length: int, sliding_window: int | None) -> jax.Array:
  """``(B, 1, 1, S)`` bool: the keys ``j`` a token at position ``p_b = lengths[b]`` sees, ``j ≤ p_b`` and (with a
  sliding window ``w``) ``j > p_b − w``: row ``p_b`` of the full forward's causal mask.

  Example:
    >>> import jax.numpy as jnp
    >>> from proxjax.models.generate import decode_mask
    >>> decode_mask(jnp.array([2, 4]), 6, 3)[:, 0, 0].astype(int).tolist()
    [[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]]
  """
  p = lengths[:, None]
  j = jnp.arange(cache_length)[None, :]
  mask = j <= p
  if sliding_window is not None:
    mask = mask & (j > p - sliding_window)
  return mask[:, None, None, :]


def decode_step(model: LlamaForCausalLM, cache: KVCache, tokens: ArrayLike) -> tuple[jax.Array, KVCache]:
  """One token per row: ``tokens`` ``(B,)`` at positions ``p = cache.lengths``, its keys/values written at index
  ``p_b`` of each row, attention over the cache with :func:`decode_mask` of each layer's window.

  Returns ``(logits, cache)``: float32 logits ``(B, V)`` of the next token and the cache with ``lengths + 1``. Rows
  must have room (``p_b < S``; not checked under ``jit``: an index past the end is dropped).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM
    >>> from proxjax.models.generate import decode_step, init_cache, prefill
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                 num_attention_heads=2)
    >>> model = LlamaForCausalLM(c, rngs=nnx.Rngs(0))
    >>> _, cache = nnx.jit(prefill)(model, init_cache(model, 1, 16), jnp.array([[5, 6]]), jnp.array([2]))
    >>> logits, cache = nnx.jit(decode_step)(model, cache, jnp.array([7]))
    >>> full = nnx.jit(lambda m, ids: m(ids))(model, jnp.array([[5, 6, 7]]))
    >>> bool(jnp.allclose(logits[0], full[0, 2], atol=1e-6)), cache.lengths.tolist()
    (True, [3])
  """
  tokens = jnp.asarray(tokens)
  pos = cache.lengths
  b, s = tokens.shape[0], cache.k.shape[2]
  h = model.embed(tokens[:, None])
  rope = model.rope(pos[:, None])
  masks = {w: decode_mask(pos, s, w) for w in {layer.self_attn.sliding_window for layer in model.model.layers}}
  rows = jnp.arange(b)
  k_all, v_all = cache.k, cache.v
  for i, layer in enumerate(model.model.layers):
    attn = layer.self_attn

    def attention(x: jax.Array, i: int = i, attn: LlamaAttention = attn) -> tuple[jax.Array, jax.Array]:
      nonlocal k_all, v_all
      q, k, v = attn.project(x, rope)
      k_all = k_all.at[i, rows, pos].set(k[:, 0].astype(k_all.dtype), mode="drop")
      v_all = v_all.at[i, rows, pos].set(v[:, 0].astype(v_all.dtype), mode="drop")
      o_in = attn.attend(q, k_all[i], v_all[i], masks[attn.sliding_window])
      return attn.o_proj(o_in), o_in

    h = layer(h, rope, attention=attention)
  return model.head(h)[:, 0], KVCache(k_all, v_all, pos + 1)


def truncate_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     max_length: int) -> tuple[list[list[int]], int]:
  """Each prompt as a list of ints, cut from the left to its last ``max_length − max_new_tokens`` tokens (as
  lm-eval's backends do), and the number of prompts that were cut.

  :func:`greedy_generate` applies it itself; call it first to learn (and report once) how many prompts are cut:
  its output passes through :func:`greedy_generate` unchanged.

  Raises:
    ValueError: an empty prompt or one that is not a sequence of ints, ``max_new_tokens < 0``, or no room for a
      prompt token (``max_new_tokens ≥ max_length``).

  Example:
    >>> from proxjax.models.generate import truncate_prompts
    >>> truncate_prompts([[1, 2, 3, 4, 5], [6, 7]], max_new_tokens=2, max_length=5)
    ([[3, 4, 5], [6, 7]], 1)
  """
  if not isinstance(max_new_tokens, int | np.integer) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
  if not isinstance(max_length, int | np.integer) or isinstance(max_length, bool) or max_length < 1:
    raise ValueError(f"max_length must be a positive int, got {max_length!r}")
  room = int(max_length) - int(max_new_tokens)
  if room < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt within max_length={max_length}")
  if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence):
    raise ValueError(f"prompts must be a sequence of token-id sequences, got {type(prompts).__name__}")
  out, cut = [], 0
  for i, prompt in enumerate(prompts):
    if isinstance(prompt, str | bytes) or not isinstance(prompt, Sequence | np.ndarray):
      raise ValueError(f"prompt {i} must be a sequence of token ids, got {type(prompt).__name__}")
    ids = list(prompt)
    if not ids:
      raise ValueError(f"prompt {i} is empty (generation needs at least one token)")
    if not all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in ids):
      raise ValueError(f"prompt {i} must hold int token ids, got {ids[:8]!r}")
    if len(ids) > room:
      ids, cut = ids[-room:], cut + 1
    out.append([int(t) for t in ids])
  return out, cut


@functools.partial(jax.jit, static_argnums=(0, 1))
def _prefill_greedy(graphdef: Any, cache_length: int, state: Any, ids: jax.Array,
                    lengths: jax.Array) -> tuple[jax.Array, KVCache]:
  model = nnx.merge(graphdef, state)
  logits, cache = prefill(model, init_cache(model, ids.shape[0], cache_length), ids, lengths)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _decode_chunk(graphdef: Any, state: Any, cache: KVCache, token: jax.Array, done: jax.Array, count: jax.Array,
                  eos: jax.Array, max_new: jax.Array) -> tuple[Any, ...]:
  """:data:`CHUNK` greedy steps; a row that is ``done`` neither advances nor emits (``-1``)."""
  model = nnx.merge(graphdef, state)

  def body(carry: tuple[Any, ...], _: Any) -> tuple[tuple[Any, ...], jax.Array]:
    cache, token, done, count = carry
    logits, stepped = decode_step(model, cache, token)
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    cache = stepped._replace(lengths=jnp.where(done, cache.lengths, stepped.lengths))
    out = jnp.where(done, -1, nxt)
    count = count + (~done).astype(count.dtype)
    return (cache, jnp.where(done, token, nxt), done | (nxt == eos) | (count >= max_new), count), out

  (cache, token, done, count), outs = lax.scan(body, (cache, token, done, count), None, length=CHUNK)
  return cache, token, done, count, outs.T


@functools.partial(jax.jit, static_argnums=(0,))
def _full_greedy(graphdef: Any, state: Any, ids: jax.Array, lengths: jax.Array) -> jax.Array:
  """The greedy next token after position ``lengths[b] − 1`` of each row, by the full (uncached) forward."""
  logits = nnx.merge(graphdef, state)(ids)
  return jnp.argmax(logits[jnp.arange(ids.shape[0]), lengths - 1], axis=-1).astype(jnp.int32)


def _generate_batch(graphdef: Any, state: Any, prompts: list[list[int]], index: list[int], max_new: int,
                    eos: int, stop: Callable[[int, list[int]], bool] | None, use_cache: bool,
                    batch_size: int) -> list[list[int]]:
  n = len(prompts)
  b = min(batch_size, bucket_length(n, minimum=1))
  lens = np.array([len(p) for p in prompts] + [1] * (b - n), np.int32)
  t, s = bucket_length(int(lens.max())), bucket_length(int(lens.max()) + max_new)
  ids = np.zeros((b, s if not use_cache else t), np.int32)
  for row, prompt in enumerate(prompts):
    ids[row, :len(prompt)] = prompt
  if use_cache:
    first, cache = _prefill_greedy(graphdef, s, state, ids, lens)
  else:
    first = _full_greedy(graphdef, state, ids, lens)
  token = np.array(first)
  count = np.ones(b, np.int32)
  done = (token == eos) | (count >= max_new) | (np.arange(b) >= n)
  tokens = [[int(token[row])] if token[row] != eos else [] for row in range(n)]
  eos_a, max_a = np.int32(eos), np.int32(max_new)
  _check_stop(stop, index, tokens, done)
  while not done.all():
    if use_cache:
      cache, token, done, count, outs = _decode_chunk(graphdef, state, cache, token, done, count, eos_a, max_a)
      token, done, count, outs = np.array(token), np.array(done), np.array(count), np.asarray(outs)
    else:  # the reference: the same bookkeeping, each step a full forward of the sequences so far
      outs = np.full((b, CHUNK), -1, np.int32)
      for step in range(CHUNK):
        live = ~done
        ids[np.flatnonzero(live), lens[live]] = token[live]
        lens = lens + live
        nxt = np.asarray(_full_greedy(graphdef, state, ids, lens))
        outs[live, step] = nxt[live]
        count = count + live
        token = np.where(live, nxt, token)
        done = done | (live & ((nxt == eos) | (count >= max_new)))
    for row in range(n):
      for tok in outs[row]:
        if tok < 0 or tok == eos:
          break
        tokens[row].append(int(tok))
    _check_stop(stop, index, tokens, done)
  return tokens


def _check_stop(stop: Callable[[int, list[int]], bool] | None, index: list[int], tokens: list[list[int]],
                done: np.ndarray) -> None:
  """Marks ``done`` (in place) every unfinished row whose ``stop(prompt index, tokens so far)`` is True."""
  if stop is not None:
    for row, row_tokens in enumerate(tokens):
      if not done[row] and stop(index[row], list(row_tokens)):
        done[row] = True


def greedy_generate(model: LlamaForCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                    eos_token_id: int | None = None, stop: Callable[[int, list[int]], bool] | None = None,
                    use_cache: bool = True, batch_size: int = 8, max_length: int | None = None) -> list[list[int]]:
  r"""Greedy continuations of token-id prompts: ``x_{t+1} = argmax_v logits_t[v]`` (float32 logits; ties go to the
  lowest id, like ``torch.argmax``), the prompt excluded.

  Row ``i`` stops at ``eos_token_id`` (not included), when ``stop(i, tokens_so_far)`` returns True (checked after
  the first token and then every :data:`CHUNK` tokens, after each device call, so the returned tokens may run up to
  ``CHUNK − 1`` past the point ``stop`` would accept: the caller trims), or after ``max_new_tokens`` tokens.

  Prompts are taken ``batch_size`` at a time (longest first, results in the input order), right-padded; each batch is
  a :func:`prefill` then chunks of :data:`CHUNK` :func:`decode_step` s in a ``lax.scan`` (one host round trip per
  chunk), shapes bucketed as in the module docstring. A prompt longer than ``max_length − max_new_tokens`` keeps its
  last tokens (:func:`truncate_prompts`, which also tells how many prompts are cut).

  Args:
    model: a :class:`~proxjax.models.llama.LlamaForCausalLM` (any parameter / compute dtype, pruned or sharded).
    prompts: token ids per prompt (non-empty, each in ``[0, vocab_size)``).
    max_new_tokens: most tokens generated per prompt (``0``: empty lists).
    eos_token_id: the token that ends a row, or ``None`` (no end token).
    stop: ``stop(i, tokens)`` for prompt index ``i`` and its tokens so far; True ends row ``i``.
    use_cache: False runs the full forward over the growing sequences every step (the slow reference; the same
      bookkeeping, one compile per ``(B, S)``).
    batch_size: prompts per batch.
    max_length: the longest sequence, prompt + generated; ``None``: ``config.max_position_embeddings``.

  Returns:
    The generated ids of each prompt.

  Raises:
    ValueError: ``model`` is not a LLaMA-family model of proxjax, a prompt is empty or holds ids outside the
      vocabulary, ``max_new_tokens < 0`` or ``≥ max_length``, ``batch_size < 1`` or a bad ``eos_token_id``.

  Example:
    >>> from flax import nnx
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM
    >>> from proxjax.models.generate import greedy_generate
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                 num_attention_heads=2)
    >>> model = LlamaForCausalLM(c, rngs=nnx.Rngs(0))
    >>> out = greedy_generate(model, [[1, 2, 3], [4]], max_new_tokens=5)
    >>> [len(o) for o in out], out == greedy_generate(model, [[1, 2, 3], [4]], 5, use_cache=False)
    ([5, 5], True)
  """
  if not isinstance(model, LlamaForCausalLM):
    raise ValueError(f"greedy_generate needs a proxjax LlamaForCausalLM, got {type(model).__name__}")
  config = model.config
  if max_length is None:
    max_length = config.max_position_embeddings
  prompts, _ = truncate_prompts(prompts, max_new_tokens, max_length)
  vocab = config.vocab_size
  for i, prompt in enumerate(prompts):
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
      raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:8]}")
  if eos_token_id is not None and (not isinstance(eos_token_id, int | np.integer) or isinstance(eos_token_id, bool)
                                   or not 0 <= eos_token_id < vocab):
    raise ValueError(f"eos_token_id must be None or an int in [0, {vocab}), got {eos_token_id!r}")
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if max_new_tokens == 0 or not prompts:
    return [[] for _ in prompts]
  eos = -1 if eos_token_id is None else int(eos_token_id)
  graphdef, state = nnx.split(model)
  order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
  results: list[list[int]] = [[] for _ in prompts]
  for start in range(0, len(order), batch_size):
    index = order[start:start + batch_size]
    rows = _generate_batch(graphdef, state, [prompts[i] for i in index], index, int(max_new_tokens), eos, stop,
                           use_cache, batch_size)
    for i, row in zip(index, rows, strict=True):
      results[i] = row
  return results
