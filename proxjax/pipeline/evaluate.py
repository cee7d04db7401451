r"""Perplexity of a causal language model on fixed token windows (docs/method.md, "Evaluation protocol").

For windows :math:`x^{(w)} \in \{0..V-1\}^T`, ``w = 1..W``, and a model giving logits :math:`z_t` at every position,
the token NLL is :math:`\ell_{w,t} = \mathrm{logsumexp}(z^{(w)}_t) - z^{(w)}_{t, x^{(w)}_{t+1}}` (the NLL of token
``t+1`` given tokens ``≤ t`` of the same window), for ``t = 0..T-2``: the first token of each window is never
predicted, so ``N = W (T - 1)`` tokens are scored, and

.. math::  \mathrm{PPL} = \exp\Big(\frac{1}{N} \sum_{w} \sum_{t=0}^{T-2} \ell_{w,t}\Big).

All windows have the same length, so this equals Wanda/SparseGPT's ``exp(mean over windows of the window's mean
loss)``. Each ``ℓ`` is computed in float32 in a jitted helper (the log-softmax is never materialized: one logsumexp and
one gather per position); the sums are accumulated in float64 on the host.

On a device mesh (``mesh=``), each batch of windows is a global array split over every device, each process
supplying only its own devices' rows (``jax.make_array_from_callback``), and the compiled helper returns the token
NLL replicated (one all-gather of ``(B, T-1)`` floats): every process, on one host or several
(:mod:`proxjax.core.distributed`), then sums the same numbers in the same order and gets the same perplexity.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from proxjax.core import sharding

__all__ = ["PerplexityResult", "format_report", "padded_batch", "perplexity"]


class PerplexityResult(NamedTuple):
  """Perplexity and what it was computed on.

  Attributes:
    ppl: ``exp(nll)``.
    nll: the mean token NLL in nats, over all predicted tokens.
    predicted_tokens: ``windows · (seqlen − 1)``, the number of NLL terms.
    windows: the number of windows.
    seqlen: the window length.
  """

  ppl: float
  nll: float
  predicted_tokens: int
  windows: int
  seqlen: int


def _token_nll_impl(logits: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(B, T-1)`` float32 NLL of ``ids[:, 1:]`` under ``logits[:, :-1]``, and ``(B,)`` "all logits finite"."""
  z = logits.astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(z), axis=(1, 2))
  z = z[:, :-1, :]
  lse = jax.nn.logsumexp(z, axis=-1)
  target = jnp.take_along_axis(z, ids[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
  return lse - target, finite


_token_nll = jax.jit(_token_nll_impl)


@functools.lru_cache(maxsize=8)
def _token_nll_on(mesh: jax.sharding.Mesh) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """:func:`_token_nll` with both outputs replicated over ``mesh`` (readable by every process)."""
  rep = sharding.replicated(mesh)
  return jax.jit(_token_nll_impl, out_shardings=(rep, rep))


def padded_batch(windows: np.ndarray, start: int, batch_size: int) -> tuple[np.ndarray, int]:
  """Rows ``start:start + batch_size`` of ``windows``, the last batch padded with copies of its first row to
  ``batch_size`` rows (one compiled shape), and the number of real rows.

  Example:
    >>> import numpy as np
    >>> batch, valid = padded_batch(np.arange(6).reshape(3, 2), 2, 2)
    >>> batch.tolist(), valid
    ([[4, 5], [4, 5]], 1)
  """
  batch = windows[start:start + batch_size]
  valid = batch.shape[0]
  if valid < batch_size:
    batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - valid, axis=0)])
  return batch, valid


def perplexity(logits_fn: Callable[[Any], Any], windows: Any, *, batch_size: int = 1,
               progress: bool = True, mesh: jax.sharding.Mesh | None = None) -> PerplexityResult:
  """Perplexity of ``logits_fn`` on ``windows`` (see the module docstring for the exact definition).

  Windows are fed ``batch_size`` at a time. The last partial batch is padded with copies of its first window up to
  ``batch_size`` (so ``logits_fn`` only ever sees one shape and a jitted model compiles once) and the padded rows are
  ignored.

  Args:
    logits_fn: maps ``ids`` ``(B, T)`` int32 to logits ``(B, T, V)`` (any float dtype; e.g. a jitted model).
    windows: ``(W, T)`` integer token ids, ``T ≥ 2`` (e.g. :attr:`proxjax.data.EvalData.windows`).
    batch_size: windows per call.
    progress: show a tqdm progress bar (with the running perplexity).
    mesh: feed each batch as a global array split over the mesh's devices (``batch_size`` rounded up to a multiple of
      the device count; the padding rows are ignored) and read the NLL replicated: the mesh may span several
      processes (module docstring). ``logits_fn`` then receives that global array. ``None``: a host array.

  Returns:
    A :class:`PerplexityResult`.

  Raises:
    ValueError: bad windows or batch size, logits of the wrong shape, a token id outside the logits' vocabulary, or
      NaN/inf logits (naming the window).

  Example:
    >>> import numpy as np, jax.numpy as jnp
    >>> uniform = lambda ids: jnp.zeros(ids.shape + (50,))
    >>> r = perplexity(uniform, np.arange(12, dtype=np.int32).reshape(3, 4), batch_size=2, progress=False)
    >>> round(r.ppl, 4), r.predicted_tokens, r.windows
    (50.0, 9, 3)
  """
  w = np.asarray(windows)
  if w.ndim != 2 or not np.issubdtype(w.dtype, np.integer):
    raise ValueError(f"windows must be a 2-D integer array (windows, seqlen), got {w.dtype} {w.shape}")
  n_windows, seqlen = w.shape
  if n_windows < 1 or seqlen < 2:
    raise ValueError(f"need at least one window of at least 2 tokens, got shape {w.shape}")
  if w.min() < 0:
    raise ValueError(f"windows hold a negative token id ({int(w.min())})")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  bs = int(min(batch_size, n_windows))
  token_nll = _token_nll
  if mesh is not None:
    bs = -(-bs // mesh.size) * mesh.size
    ids_sharding, token_nll = sharding.activation_sharding(mesh, (bs, seqlen)), _token_nll_on(mesh)
  w = w.astype(np.int32)
  total, count = 0.0, 0
  bar = tqdm(total=n_windows, desc="perplexity", unit="window", disable=not progress)
  try:
    for start in range(0, n_windows, bs):
      batch, valid = padded_batch(w, start, bs)
      if mesh is None:
        ids = jnp.asarray(batch)
      else:  # each process supplies its devices' rows
        ids = jax.make_array_from_callback(batch.shape, ids_sharding, lambda index, b=batch: b[index])
      logits = logits_fn(ids)
      shape = tuple(getattr(logits, "shape", ()))
      if len(shape) != 3 or shape[:2] != (bs, seqlen):
        raise ValueError(f"logits_fn returned shape {shape} for ids of shape {(bs, seqlen)}; expected (B, T, V) = "
                         f"({bs}, {seqlen}, V)")
      vocab = shape[2]
      top = int(batch[:valid].max())
      if top >= vocab:
        raise ValueError(f"token id {top} in windows {start}..{start + valid - 1} is outside the logits' vocabulary "
                         f"of size {vocab}")
      nll, finite = token_nll(logits, ids)
      finite = np.asarray(finite)[:valid]
      if not finite.all():
        bad = start + int(np.argmin(finite))
        raise ValueError(f"logits_fn returned NaN or inf logits for window {bad} (of {n_windows}); the perplexity "
                         f"would be meaningless")
      total += float(np.asarray(nll)[:valid].astype(np.float64).sum())
      count += valid * (seqlen - 1)
      bar.update(valid)
      if progress:
        bar.set_postfix(ppl=f"{math.exp(total / count):.4g}")
  finally:
    bar.close()
  nll_mean = total / count
  return PerplexityResult(float(math.exp(nll_mean)), float(nll_mean), int(count), int(n_windows), int(seqlen))


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.6g}"
  if isinstance(v, str):
    return repr(v) if (v != v.strip() or "\n" in v or v == "") else v
  return str(v)


def format_report(result: PerplexityResult, protocol: dict | None = None, **extra: Any) -> str:
  """A plain-text report of a perplexity with its full protocol, for a CLI to print.

  Lines: the perplexity, mean NLL and token counts from ``result``; then every ``protocol`` entry (e.g.
  :attr:`proxjax.data.EvalData.protocol`: source, split, documents, joiner, seqlen, windows, tokens, …); then every
  ``extra`` entry (model, method, hyperparameters, calibration source and size, seed, …), in the order given
  (``seqlen`` and ``windows`` are added after the protocol if it lacks them). Strings
  with surrounding or only whitespace (like the joiner) are shown with ``repr``.

  Raises ``ValueError`` if the protocol's ``seqlen`` or ``windows`` disagree with the result.

  Example:
    >>> r = PerplexityResult(ppl=29.1, nll=math.log(29.1), predicted_tokens=8176, windows=16, seqlen=512)
    >>> print(format_report(r, {"source": "lee", "joiner": "\\n\\n", "seqlen": 512, "windows": 16}, model="smollm2"))
    perplexity       : 29.1
    mean NLL (nats)  : 3.37074
    predicted tokens : 8176 (16 windows x 511)
    source           : lee
    joiner           : '\\n\\n'
    seqlen           : 512
    windows          : 16
    model            : smollm2
  """
  protocol = dict(protocol or {})
  for key in ("seqlen", "windows"):
    if key in protocol and protocol[key] is not None and int(protocol[key]) != int(getattr(result, key)):
      raise ValueError(f"protocol says {key}={protocol[key]} but the perplexity was computed with "
                       f"{key}={getattr(result, key)}")
  rows = [("perplexity", _fmt(float(result.ppl))), ("mean NLL (nats)", _fmt(float(result.nll))),
          ("predicted tokens", f"{result.predicted_tokens} ({result.windows} windows x {result.seqlen - 1})")]
  rows += [(str(k), _fmt(v)) for k, v in protocol.items()]
  rows += [(k, str(getattr(result, k))) for k in ("seqlen", "windows") if k not in protocol]
  rows += [(str(k), _fmt(v)) for k, v in extra.items()]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k.ljust(width)} : {v}" for k, v in rows)
