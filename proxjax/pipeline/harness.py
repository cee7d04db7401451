r"""An lm-evaluation-harness backend (``lm_eval``, the optional extra ``proxjax[eval]``) over the Flax NNX model:
zero-shot and few-shot accuracy of a proxjax checkpoint with no torch.

:class:`ProxjaxLM` is registered with lm-eval as ``proxjax``, so once ``proxjax`` is imported::

  import lm_eval, proxjax
  lm_eval.simple_evaluate(model="proxjax", model_args="pretrained=out/prox,batch_size=8", tasks=["arc_easy"])

It reproduces lm-eval's own ``hf`` backend (``HFLM``, causal models) request by request:

* **Tokens.** ``tok_encode`` applies the tokenizer's post-processor (what a Hugging Face fast tokenizer's ``encode``
  does by default) unless the string already starts with the BOS text or ``add_bos_token`` says otherwise; the
  context/continuation split, the empty-context rule (the continuation is conditioned on ``prefix_token_id``: BOS, or
  EOS when the tokenizer has no BOS) and the moving of trailing context spaces are lm-eval's own
  (``TemplateLM.loglikelihood``).
* **loglikelihood.** For context tokens :math:`c` and continuation tokens :math:`y_1..y_n`, the model input is the
  last ``max_length`` tokens of :math:`(c, y_{1..n-1})` (truncated from the left, as HFLM) and the result is

  .. math::  \Big(\sum_{i=1}^{n} \log p(y_i \mid c, y_{<i}),\;\; \forall i:\ y_i = \arg\max_v p(v \mid c, y_{<i})\Big)

  in float32 (log-probabilities as ``logits - logsumexp(logits)``), computed on the device by one jitted function per
  bucket shape: requests are grouped by their input length rounded up to a bucket (16, 24, 32, 48, 64, 96, 128, …:
  two sizes per octave, at most ``max_length``; :func:`input_bucket`) and by their continuation length (16, 64,
  256, …; :func:`continuation_bucket`), right-padded (the
  model is causal: tokens after the real ones change nothing before them), in batches of exactly ``batch_size`` rows
  (missing rows are padding). Only the continuation positions go through the output head; nothing of size
  ``vocab`` comes back to the host. Results come back in the order of the requests.
* **loglikelihood_rolling.** A document's tokens are cut into lm-eval's disjoint windows
  (``lm_eval.utils.get_rolling_token_windows`` with ``context_len=1``, then ``make_disjoint_window``): the first
  window predicts the first ``max_length`` tokens after ``prefix_token_id``, every later one predicts the next at most
  ``max_length`` tokens given the tokens just before them, so every token is predicted exactly once; the result is the
  sum of the windows' log-likelihoods.
* **generate_until.** Greedy decoding (:func:`proxjax.models.generate.greedy_generate`, with its KV cache) of at most
  ``max_gen_toks`` tokens (default 256) after the context (left-truncated to ``max_length - max_gen_toks`` tokens,
  said once in the log), stopped at EOS or once a stop string (``until``; the EOS text is always one) appears; the
  text is decoded without special tokens and cut at the first stop string, as HFLM does.

**On a device mesh** (``mesh=``: one process, or several joined by :func:`proxjax.core.distributed.initialize`) the
model's parameters are placed in their declared shardings (:func:`proxjax.core.sharding.checkpoint_sharding`), each
batch of ``loglikelihood`` rows is one global array split over the mesh's devices (``batch_size`` rounded up to a
multiple of the device count; each process supplies its devices' rows, :func:`proxjax.core.sharding.put`) and the
scores come back replicated. Across processes every process runs lm-eval with the same requests and reports
``rank`` 0 of ``world_size`` 1: lm-eval's own data-parallel path (``world_size > 1``) splits requests by rank and
gathers them through torch, which this backend does not use; here every process computes every batch together (the
forward sharded over all devices) and reads the same replicated log-likelihoods, so every process's results are
identical and lm-eval stays unaware of the processes. ``generate_until`` passes its prompts as host arrays, which
every process holds equal: JAX takes them as replicated inputs of the sharded model, and every process decodes the
same tokens.

Importing this module imports lm-eval's model API but never torch (lm-eval's ``hf`` backend is only needed for the
parity tests, ``tests/pipeline/test_harness.py``).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

try:
  import lm_eval.models  # noqa: F401  (registers lm-eval's own backends first: get_model imports them only if none is)
  from lm_eval import utils as lm_utils
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, \
    postprocess_generated_text
except ImportError as err:  # pragma: no cover  (the extra is installed in the test environment)
  raise ModuleNotFoundError(f"the lm-eval backend needs lm-eval ({err}); install it with: pip install "
                            "'proxjax[eval]'") from err

from proxjax.core import sharding
from proxjax.data import tasks as shipped_tasks
from proxjax.data import text
from proxjax.models import hf, llama

__all__ = ["DEFAULT_MAX_GEN_TOKS", "ProxjaxLM", "input_bucket", "check_tasks", "continuation_bucket", "run_tasks"]

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256
"""``max_gen_toks`` when a request does not say (HFLM's default)."""

DEFAULT_MAX_LENGTH = 2048
"""The context length when the model's config names none (HFLM's default)."""

_MIN_BUCKET = 16


def input_bucket(n: int, limit: int | None = None) -> int:
  """The compiled length for ``n`` tokens: the smallest of 16, 24, 32, 48, 64, 96, … (``2^k`` and ``3·2^(k-1)``)
  that is ``≥ n``, capped at ``limit`` (then ``limit`` itself, which must be ``≥ n``).

  Example:
    >>> [input_bucket(n) for n in (1, 16, 17, 25, 33, 100, 129, 200)]
    [16, 16, 24, 32, 48, 128, 192, 256]
    >>> input_bucket(257, limit=260), input_bucket(5, limit=8)
    (260, 8)
  """
  if n < 1:
    raise ValueError(f"a bucket holds at least one token, got {n}")
  if limit is not None and n > limit:
    raise ValueError(f"{n} tokens do not fit the limit of {limit}")
  b = _MIN_BUCKET
  while b < n:
    b += b // 2 if (b & (b - 1)) == 0 else b // 3  # 16 → 24 → 32 → 48 → 64 …
  return b if limit is None else min(b, limit)


def continuation_bucket(n: int, limit: int) -> int:
  """The number of scored positions compiled for a continuation of ``n`` tokens in a row of ``limit`` positions:
  16, 64, 256, 1024, … (powers of 4 from 16: the output head on a few spare positions costs little next to the
  forward pass, fewer shapes compile less), capped at ``limit``.

  Example:
    >>> [continuation_bucket(n, 512) for n in (1, 16, 17, 65, 300)], continuation_bucket(20, 24)
    ([16, 16, 64, 256, 512], 24)
  """
  if not 1 <= n <= limit:
    raise ValueError(f"a continuation of {n} tokens does not fit {limit} positions")
  b = _MIN_BUCKET
  while b < n:
    b *= 4
  return min(b, limit)


def _dtype(name: Any, model_dir: str) -> Any:
  """The parameter and compute dtype of ``dtype=``: ``auto``/``None`` is the checkpoint's (float32 if unnamed)."""
  if name is None or name == "auto":
    return llama.dtype_from_name(llama.LlamaConfig.from_dir(model_dir).dtype) or jnp.float32
  if not isinstance(name, str):
    return jnp.dtype(name).type
  d = llama.dtype_from_name(name.removeprefix("torch."))
  if d is None:
    raise ValueError(f"dtype {name!r}: expected auto, float32, bfloat16 or float16")
  return d


@register_model("proxjax")
class ProxjaxLM(TemplateLM):
  """lm-eval backend over a :class:`proxjax.models.LlamaForCausalLM` (see the module docstring for what each request
  type computes).

  Args:
    pretrained: a Hugging Face checkpoint directory (loaded with :func:`proxjax.models.load_pretrained`, tokenizer with
      :func:`proxjax.data.load_tokenizer`); or pass ``model`` and ``tokenizer`` instead.
    model: an already loaded model (with ``tokenizer``).
    tokenizer: a :class:`proxjax.data.TextTokenizer` (or a directory holding ``tokenizer.json``).
    dtype: parameter and compute dtype for ``pretrained`` (``float32``, ``bfloat16``, ``auto`` = the checkpoint's).
    batch_size: rows per forward pass (every call has exactly this many; ``auto`` is not supported).
    max_length: context length in tokens; default the config's ``max_position_embeddings`` (as HFLM), else 2048.
    add_bos_token: ``None`` lets the tokenizer's post-processor decide (HFLM's default); ``True`` prepends BOS to every
      encoded string, ``False`` adds no special token.
    prefix_token_id: the token an empty context (and the first rolling window) is conditioned on; default BOS, else
      EOS.
    max_gen_toks: default number of generated tokens.
    mesh: score on this device mesh (module docstring): ``pretrained`` is loaded into its shardings, a given ``model``
      must already be placed there (e.g. loaded with :func:`proxjax.core.sharding.checkpoint_sharding`). Needed when
      the processes of :mod:`proxjax.core.distributed` run together.
    **kwargs: lm-eval's generic arguments (``device``, ``max_batch_size``, …) are accepted and ignored (JAX places
      the model).

  Attributes:
    compiles: how many distinct shapes the scoring function has been compiled for.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from tokenizers import Tokenizer, models
    >>> from proxjax.data import load_tokenizer
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM
    >>> vocab = {c: i for i, c in enumerate("<abcdefgh ")}
    >>> tok = load_tokenizer(Tokenizer(models.WordLevel(vocab, unk_token="<")), eos_token="<")
    >>> c = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    ...                 num_attention_heads=2, max_position_embeddings=64)
    >>> lm = ProxjaxLM(model=LlamaForCausalLM(c, rngs=nnx.Rngs(0)), tokenizer=tok, batch_size=2)
    >>> [(round(ll, 3) < 0, type(g).__name__) for ll, g in lm._loglikelihood_tokens(
    ...     [(None, [1, 2], [3]), (None, [4], [5, 6])])]
    [(True, 'bool'), (True, 'bool')]
    >>> lm.compiles
    1
  """

  def __init__(self, pretrained: str | os.PathLike | None = None, *, model: llama.LlamaForCausalLM | None = None,
               tokenizer: text.TextTokenizer | str | os.PathLike | None = None, dtype: Any = "float32",
               batch_size: int | str = 8, max_length: int | None = None, add_bos_token: bool | None = None,
               prefix_token_id: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
               mesh: jax.sharding.Mesh | None = None, **kwargs: Any):
    super().__init__()
    ignored = sorted(k for k, v in kwargs.items() if v is not None and k not in ("device", "max_batch_size"))
    if ignored:
      raise ValueError(f"proxjax backend: unknown model argument(s) {', '.join(ignored)}")
    if (pretrained is None) == (model is None):
      raise ValueError("proxjax backend: give either pretrained=DIR or an already loaded model= (with tokenizer=)")
    if pretrained is not None:
      model_dir = os.fspath(pretrained)
      if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"pretrained={model_dir}: not a Hugging Face checkpoint directory (no config.json)")
      d = _dtype(dtype, model_dir)
      model = hf.load_pretrained(model_dir, param_dtype=d, dtype=d,
                                 sharding=None if mesh is None else sharding.checkpoint_sharding(mesh))
      tokenizer = text.load_tokenizer(model_dir) if tokenizer is None else tokenizer
      self.pretrained = model_dir
    else:
      self.pretrained = None
    if tokenizer is None:
      raise ValueError("proxjax backend: model= needs tokenizer= (a TextTokenizer or a directory with tokenizer.json)")
    if not isinstance(tokenizer, text.TextTokenizer):
      tokenizer = text.load_tokenizer(tokenizer)
    if tokenizer.eos_token_id is None:
      raise ValueError(f"{tokenizer.name}: the tokenizer names no EOS token (lm-eval needs it as end of text)")
    if batch_size == "auto" or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise ValueError(f"proxjax backend: batch_size must be a positive int, got {batch_size!r}")
    if max_length is None:
      max_length = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    if not isinstance(max_length, (int, np.integer)) or max_length < 2:
      raise ValueError(f"proxjax backend: max_length must be an int >= 2, got {max_length!r}")
    if not isinstance(max_gen_toks, (int, np.integer)) or max_gen_toks < 1:
      raise ValueError(f"proxjax backend: max_gen_toks must be a positive int, got {max_gen_toks!r}")
    self.model = model
    self.tokenizer = tokenizer
    self.mesh = mesh
    self.batch_size = int(batch_size) if mesh is None else -(-int(batch_size) // mesh.size) * mesh.size
    self.max_length = int(max_length)
    self.add_bos_token = add_bos_token
    self.custom_prefix_token_id = prefix_token_id
    self._max_gen_toks = int(max_gen_toks)
    self.compiles = 0
    self._warned_generation_truncation = False
    graphdef, state = nnx.split(model)
    self._state = state

    def score(state: Any, ids: jax.Array, conts: jax.Array, ends: jax.Array) -> tuple[jax.Array, jax.Array]:
      self.compiles += 1  # runs once per traced shape
      return _score(nnx.merge(graphdef, state), ids, conts, ends)

    if mesh is None:
      self._score = jax.jit(score)
    else:  # every process reads the scores of every row
      self._score = jax.jit(score, out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)))

  @classmethod
  def from_model(cls, model: llama.LlamaForCausalLM, tokenizer: text.TextTokenizer | str | os.PathLike,
                 **kwargs: Any) -> ProxjaxLM:
    """The backend over an already loaded ``model`` and ``tokenizer`` (same keyword arguments as the class)."""
    return cls(model=model, tokenizer=tokenizer, **kwargs)

  # ------------------------------------------------------------------------------------------------ tokens --
  @property
  def eot_token_id(self) -> int:
    """The EOS id (lm-eval's end of text)."""
    return int(self.tokenizer.eos_token_id)

  @property
  def prefix_token_id(self) -> int:
    """What an empty context is: ``prefix_token_id=`` if given, else BOS, else EOS (as HFLM)."""
    if self.custom_prefix_token_id is not None:
      return int(self.custom_prefix_token_id)
    if self.tokenizer.bos_token_id is not None:
      return int(self.tokenizer.bos_token_id)
    return self.eot_token_id

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.name.replace("/", "__")

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                 **kwargs: Any) -> list[int]:
    """Token ids of ``string`` as HFLM's ``tok_encode``: with ``add_special_tokens=None`` the tokenizer's
    post-processor adds its special tokens unless ``add_bos_token`` says otherwise or the string already starts with
    the prefix token's text; ``add_bos_token=True`` prepends BOS (once)."""
    del kwargs
    add = add_special_tokens if add_special_tokens is not None else self.add_bos_token
    if add_special_tokens is None and has_bos_prefix(string, self.tok_decode([self.prefix_token_id],
                                                                             skip_special_tokens=False)):
      add = False
    if add is True and self.add_bos_token and self.tokenizer.bos_token_id is not None:
      ids = self.tokenizer.encode(string, add_special_tokens=False).tolist()
      ids = ids if ids[:1] == [self.tokenizer.bos_token_id] else [self.tokenizer.bos_token_id] + ids
    else:
      ids = self.tokenizer.encode(string, add_special_tokens=True if add is None else bool(add)).tolist()
    if left_truncate_len:
      ids = ids[-left_truncate_len:]
    return ids

  def tok_decode(self, tokens: Sequence[int] | int, skip_special_tokens: bool = True) -> str:
    """The text of ``tokens`` (special tokens dropped by default, as HFLM)."""
    return self.tokenizer.decode(np.atleast_1d(np.asarray(tokens)), skip_special_tokens=skip_special_tokens)

  # ------------------------------------------------------------------------------------------------ scoring --
  def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]],
                            disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
    """``(sum of the continuation's log-probabilities, is greedy)`` of each ``(cache key, context tokens,
    continuation tokens)`` (see the module docstring), in the order of ``requests``; each result with a cache key
    is given to ``self.cache_hook.add_partial("loglikelihood", key, result)`` as HFLM does."""
    del kwargs
    n_max = self.max_length
    rows: list[tuple[list[int], list[int]]] = []
    truncated = 0
    for _, ctx, cont in requests:
      if not ctx or not cont:
        raise ValueError("a loglikelihood request needs at least one context and one continuation token")
      if len(cont) > n_max:
        raise ValueError(f"a continuation of {len(cont)} tokens is longer than max_length={n_max}")
      whole = list(ctx) + list(cont)
      if len(whole) > n_max + 1:
        truncated += 1
      rows.append((whole[-(n_max + 1):][:-1], list(cont)))
    if truncated:
      log.warning("%d of %d loglikelihood requests are longer than max_length=%d + 1 tokens: their context is "
                  "truncated from the left", truncated, len(rows), n_max)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (inp, cont) in enumerate(rows):
      t = input_bucket(len(inp), n_max)
      groups.setdefault((t, continuation_bucket(len(cont), t)), []).append(i)
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    bs = self.batch_size
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(rows), desc="proxjax loglikelihood", disable=disable_tqdm)
    for (t, c), idx in sorted(groups.items(), reverse=True):
      idx.sort(key=lambda i: -len(rows[i][0]))
      for start in range(0, len(idx), bs):
        chunk = idx[start:start + bs]
        ids = np.zeros((bs, t), np.int32)
        conts = np.full((bs, c), -1, np.int32)
        ends = np.ones((bs,), np.int32)
        for r, i in enumerate(chunk):
          inp, cont = rows[i]
          ids[r, :len(inp)] = inp
          conts[r, c - len(cont):] = cont
          ends[r] = len(inp)
        ll, greedy = self._score(self._state, *(sharding.batch_on(a, self.mesh) for a in (ids, conts, ends)))
        ll, greedy = np.asarray(ll), np.asarray(greedy)
        for r, i in enumerate(chunk):
          out[i] = (float(ll[r]), bool(greedy[r]))
        bar.update(len(chunk))
    bar.close()
    for (key, _, _), answer in zip(requests, out):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, answer)
    return out  # type: ignore[return-value]

  def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
    """The log-likelihood of each request's whole string (``args = (string,)``): the sum over lm-eval's disjoint
    rolling windows (module docstring), all windows of all requests scored together."""
    windows: list[tuple[None, list[int], list[int]]] = []
    counts: list[int] = []
    for (string,) in [req.args for req in requests]:
      pieces = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1)]
      windows += [(None, ctx, cont) for ctx, cont in pieces]
      counts.append(len(pieces))
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    out, pos = [], 0
    for req, k in zip(requests, counts):
      total = float(sum(s for s, _ in scores[pos:pos + k]))
      pos += k
      out.append(total)
      self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
    return out

  # ------------------------------------------------------------------------------------------------ generation --
  def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
    """Greedy continuation text of each ``(context, gen_kwargs)`` request (module docstring); requests with equal
    ``gen_kwargs`` are generated together, ``batch_size`` rows at a time."""
    from proxjax.models.generate import greedy_generate, truncate_prompts  # pylint: disable=import-outside-toplevel
    eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    groups: dict[str, list[int]] = {}
    args = [req.args for req in requests]
    for i, (_, gen_kwargs) in enumerate(args):
      if not isinstance(gen_kwargs, dict):
        raise ValueError(f"generate_until expects a dict of generation arguments, got {type(gen_kwargs).__name__}")
      groups.setdefault(repr(sorted(gen_kwargs.items(), key=lambda kv: kv[0])), []).append(i)
    out: list[str | None] = [None] * len(args)
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(args), desc="proxjax generate_until", disable=disable_tqdm)
    for idx in groups.values():
      kwargs = normalize_gen_kwargs(args[idx[0]][1], self.max_gen_toks)
      if kwargs.get("do_sample"):
        raise ValueError("the proxjax backend decodes greedily only (do_sample=True was requested)")
      until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
      max_gen = int(kwargs.pop("max_gen_toks"))
      prompts, long = truncate_prompts([self.tok_encode(args[i][0]) for i in idx], max_gen, self.max_length)
      if long and not self._warned_generation_truncation:
        log.warning("%d prompt(s) longer than max_length - max_gen_toks = %d tokens: truncated from the left (said "
                    "once)", long, self.max_length - max_gen)
        self._warned_generation_truncation = True
      stops = [s for s in until if s]

      def stop(_: int, tokens: list[int], stops: list[str] = stops) -> bool:
        return bool(stops) and any(s in self.tok_decode(tokens) for s in stops)

      tokens = greedy_generate(self.model, prompts, max_gen, eos_token_id=self.eot_token_id, stop=stop,
                               batch_size=self.batch_size, max_length=self.max_length)
      for i, toks in zip(idx, tokens):
        s = postprocess_generated_text(generation=self.tok_decode(toks), stop=until, think_end_token=None)
        out[i] = s
        self.cache_hook.add_partial("generate_until", args[i], s)
        bar.update(1)
    bar.close()
    return out  # type: ignore[return-value]

  def get_model_info(self) -> dict[str, Any]:
    """What lm-eval records about the model in its results ``config``."""
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self._state))
    return {"model_num_parameters": n, "model_dtype": str(getattr(self.model, "param_dtype", "")),
            "model_name": self.pretrained or "in-memory model", "max_length": self.max_length}


def _score(model: llama.LlamaForCausalLM, ids: jax.Array, conts: jax.Array,
           ends: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed float32 log-probability and is-greedy of right-aligned continuations.

  ``ids`` ``(B, T)`` model inputs (right-padded), ``ends`` ``(B,)`` the number of real tokens of each row, ``conts``
  ``(B, C)`` the tokens that positions ``ends - C .. ends - 1`` predict, ``-1`` where nothing is scored. Only those
  ``C`` positions go through the output head, ``chunk`` positions at a time (at most 256).
  """
  h = model.embed(ids)
  rope = model.rope(jnp.arange(ids.shape[1]))
  for layer in model.model.layers:
    h = layer(h, rope)
  c = conts.shape[1]
  pos = jnp.clip(ends[:, None] - c + jnp.arange(c)[None, :], 0, ids.shape[1] - 1)
  hs = jnp.take_along_axis(h, pos[..., None], axis=1)  # (B, C, D)
  chunk = math.gcd(c, 256)

  def part(args: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    x, y = args  # (B, k, D), (B, k)
    logits = model.head(x)  # float32
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = y >= 0
    tgt = jnp.take_along_axis(logits, jnp.maximum(y, 0)[..., None], axis=-1)[..., 0]
    lp = jnp.where(valid, tgt - lse, 0.0).sum(axis=-1)
    greedy = jnp.all(jnp.where(valid, jnp.argmax(logits, axis=-1) == y, True), axis=-1)
    return lp, greedy

  if chunk == c:
    return part((hs, conts))
  b, d = hs.shape[0], hs.shape[2]
  xs = hs.reshape(b, c // chunk, chunk, d).swapaxes(0, 1)
  ys = conts.reshape(b, c // chunk, chunk).swapaxes(0, 1)
  lps, greedies = jax.lax.map(part, (xs, ys))
  return lps.sum(axis=0), jnp.all(greedies, axis=0)


# ------------------------------------------------------------------------------------------------ tasks --
_OFFLINE_HELP = ("point lm-eval at local copies: --include-path DIR holding task YAMLs with `dataset_path: json` and "
                 "`dataset_kwargs: {data_files: {test: FILE.jsonl}}`, or a Hugging Face datasets cache that already "
                 "holds the dataset (HF_DATASETS_CACHE=DIR) with HF_DATASETS_OFFLINE=1")
_FETCH_HINTS = ("connection", "offline", "couldn't reach", "could not reach", "max retries", "localentrynotfound",
                "datasetnotfound", "network", "internet", "timed out", "name or service", "not cached")


def _fetch_error(err: BaseException) -> bool:
  """Whether ``err`` (or an exception it was raised from) looks like a failed download."""
  seen: set[int] = set()
  e: BaseException | None = err
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    words = f"{type(e).__name__} {e}".lower()
    if isinstance(e, ConnectionError) or any(h in words for h in _FETCH_HINTS):
      return True
    e = e.__cause__ or e.__context__
  return False


def _dataset_paths(task_manager: Any, names: Sequence[str]) -> list[str]:
  out = []
  for name in names:
    entry = task_manager.task_index.get(name)
    cfg = getattr(entry, "cfg", None) or {}
    if isinstance(cfg.get("dataset_path"), str):
      out.append(cfg["dataset_path"] + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else ""))
  return out


def check_tasks(tasks: Sequence[str], include_path: str | os.PathLike | None = None) -> Any:
  """lm-eval's ``TaskManager`` for ``tasks`` (task, group or tag names), after checking them.

  The tasks shipped with proxjax (:func:`proxjax.data.tasks.task_dir`, e.g. ``lee_last_word``) and ``include_path``
  are indexed first (fast); lm-eval's own task index (about 15,000 names, seconds to build) is read only when a name
  is not found there.

  Raises:
    ValueError: ``include_path`` is not a directory; no task given; a name lm-eval does not know (with the closest
      known names).
  """
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  names = [t for t in tasks if t]
  if not names:
    raise ValueError("no task given (e.g. --tasks arc_easy,hellaswag)")
  paths = [shipped_tasks.task_dir()]
  if include_path is not None:
    if not os.path.isdir(include_path):
      raise ValueError(f"--include-path {include_path}: no such directory (it should hold lm-eval task YAML files)")
    paths.append(os.fspath(include_path))
  manager = TaskManager(include_path=paths, include_defaults=False)
  if all(n in manager.all_tasks for n in names):
    return manager
  manager = TaskManager(include_path=paths)
  known = set(manager.all_tasks)
  unknown = [n for n in names if n not in known]
  if unknown:
    parts = []
    for n in unknown:
      close = difflib.get_close_matches(n, manager.all_tasks, n=5, cutoff=0.6)
      parts.append(f"{n!r}" + (f" (close: {', '.join(close)})" if close else ""))
    where = "" if include_path is None else f" (nor in --include-path {include_path})"
    raise ValueError(f"lm-eval knows no task {'; '.join(parts)}{where}")
  return manager


def run_tasks(lm: ProxjaxLM, tasks: Sequence[str], task_manager: Any, *, num_fewshot: int | None = None,
              limit: int | None = None) -> dict[str, Any]:
  """``lm_eval.simple_evaluate`` of ``tasks`` with the backend ``lm``: lm-eval's results dictionary (``results``,
  ``configs``, ``versions``, ``n-shot``, …, no per-sample logs).

  Across processes lm-eval's bootstrap standard errors run in this process (``DISABLE_MULTIPROC``, set while it runs):
  its pool of forked workers hangs in a forked child of a process joined to JAX's runtime (measured: one of two
  processes hung). Both paths seed resample chunk ``i`` with ``i``, so the numbers are those of one process.

  Raises:
    ValueError: ``limit < 1`` or ``num_fewshot < 0``; a task's dataset could not be downloaded (naming it and how to
      use local copies instead).
  """
  from lm_eval import simple_evaluate  # pylint: disable=import-outside-toplevel
  if limit is not None and limit < 1:
    raise ValueError(f"--limit must be at least 1, got {limit}")
  if num_fewshot is not None and num_fewshot < 0:
    raise ValueError(f"--num-fewshot must be at least 0, got {num_fewshot}")
  serial = jax.process_count() > 1 and "DISABLE_MULTIPROC" not in os.environ
  if serial:  # lm-eval's bootstrap forks a pool: a forked child of a joined JAX process can hang (seen: 1 run in 1)
    os.environ["DISABLE_MULTIPROC"] = "1"
  try:
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager, num_fewshot=num_fewshot,
                          limit=limit, log_samples=False, torch_random_seed=None)
  except Exception as err:  # pylint: disable=broad-exception-caught
    if not _fetch_error(err):
      raise
    paths = _dataset_paths(task_manager, tasks)
    what = f"the dataset {', '.join(paths)}" if paths else f"the dataset of {', '.join(tasks)}"
    first = " ".join(str(err).split())[:300]
    raise ValueError(f"could not fetch {what} for lm-eval ({type(err).__name__}: {first}); without internet, "
                     f"{_OFFLINE_HELP}") from err
  finally:
    if serial:
      del os.environ["DISABLE_MULTIPROC"]
  if out is None:
    raise ValueError("lm-eval returned no results")
  out.pop("samples", None)
  return out
