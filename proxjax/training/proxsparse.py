r"""ProxSparse: 2:4 masks learned end to end on the language-modelling loss (Liu et al., ICML 2025).

docs/method.md, "ProxSparse". Every parameter of a pretrained LLaMA ``θ`` (embeddings and norms too) is trained on
documents ``x_t`` with

.. math::  \theta_{t+1} = \mathrm{prox}_{\eta_t \lambda_1 c\, R}\Big(\theta_t + \mathrm{AdamW}_t\big(\mathrm{clip}_1
           \nabla_\theta [\,\mathcal L(\theta_t; x_t) + \lambda_2 P(\theta_t)\,]\big)\Big),

where

* ``L`` is the mean next-token NLL of the document (:func:`proxjax.training.loop.lm_loss`, over the real tokens of
  padded batches);
* ``P(W) = Σ [W ⊙ (W − W₀) / (|W₀| + ε)]²`` over the pruned kernels (:func:`lam2_term`; ``W₀`` the frozen pretrained
  weights), zero both at ``W = W₀`` and at ``W = 0``;
* ``clip_1`` is ``optax.clip_by_global_norm(1.0)``, ``AdamW_t`` is ``optax.adamw`` (β 0.9/0.999, ε 1e-8, no weight
  decay) with the learning rate of :func:`lr_schedule` (linear warm-up over the first ``ceil(0.1 T)`` steps, then
  linear decay to 0 at ``T``; Hugging Face's ``get_linear_schedule_with_warmup``);
* the prox is the **exact** prox of the 2:4 regularizer ``R`` (docs/method.md, "The 2:4 regularizer and its prox";
  :func:`proxjax.prox_24_update`, last in the chain), applied per kernel to the q/k/v/o/gate/up/down projections of
  every block (groups of 4 along the input axis; embeddings, norms and ``lm_head`` are trained but never
  regularized), after every optimizer step, warm-up included;
* ``η_t`` is the prox scaling: ``prox_scaling="strength"`` (the reference's, the default) takes ``η_t = 1``, so
  ``λ₁`` itself is the per-step prox strength; ``prox_scaling="lr"`` takes ``η_t`` = the learning rate (proximal
  gradient on ``L + λ₁R``; ``λ₁`` then needs to be about ``1/lr`` times larger);
* ``c`` is the per-kernel multiplier: 1 (absolute λ, the reference), or with ``lam_relative=True``
  ``c_i = 1 / mean|W₀,i|`` (mean magnitude of kernel ``i`` of the pretrained model, :func:`inverse_mean_abs`,
  fixed at the start). ``R`` is homogeneous of degree 3, so ``prox_{λR}(s y) = s · prox_{sλR}(y)``: a model whose
  weights are ``s`` times larger needs ``λ/s`` for the same relative effect. With ``c_i = 1/mean|W₀,i|`` the step is
  scale-equivariant per kernel, so one relative ``λ₁`` means the same across layers and models (the reference's
  absolute λ₁ ranges from 0.2 to 25 across models for this reason).

**Mask extraction** (:func:`extract_masks`, :func:`apply_masks`): after the last step, in every group of 4 the 2
entries of largest learned ``|W|`` are kept (ties: lower index, :func:`proxjax.nm_mask`) and the mask is applied to
the **original** ``W₀``; every other parameter is reset to its original value, so no weight is updated at all: the
result differs from the pretrained model only by the zeros.

**Data** (the reference): one document per step, truncated to ``seqlen`` tokens (:func:`tokenize_documents`), no
packing, batch 1, documents in their given order, cycling when ``steps × batch_size`` exceeds their number (step ``t``
uses documents ``t·B … t·B + B − 1`` modulo the count). With ``batch_size > 1`` the documents of a step are
right-padded to the longest one and the loss is the mean over all real next-token targets of the batch (padding is
masked; causal attention keeps the real positions exact). Lengths are padded up to the next power of two (at most the
longest document), which bounds the number of compiled step shapes by about ``log2(seqlen)``. Long documents
(Wikipedia articles) can instead be cut into consecutive ``seqlen``-token pieces, one piece per step
(``tokenize_documents(..., split=True)``, ``proxjax proxsparse --split-documents``), so that none of their text is
thrown away.

**Training** is a :class:`~proxjax.training.loop.Recipe` of the one loop (:func:`proxjax.training.loop.run`): the
loss ``L + λ₂ P``, the chain :func:`proxsparse_tx`, the batch of step ``t`` (:func:`document_batch`), the metrics
(``Σ c_i R`` before and the fraction of 2:4 groups after the update, the gradient norm, the tokens), then mask
extraction. The step is compiled with :data:`proxjax.CPU_FAST_MATH` on CPU.

**Resume**: with ``state_dir``, every ``save_every`` steps and at the end the training state (params, optimizer
state incl. step counts and multipliers) is saved in the loop's format (an orbax checkpoint, then an atomically
replaced :data:`proxjax.training.loop.STATE_FILE` naming it, with the step, the per-step history and the run's
fingerprint); a later call with the same ``state_dir``, hyperparameters and documents continues from there and gives
the same result, bit for bit, as an uninterrupted run. The data position is a function of the step, so it needs no
state of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.typing import ArrayLike

from proxjax.core import nm
from proxjax.core import transforms
from proxjax.core.spec import flat_spec, path_names
from proxjax.models.llama import projection_spec
from proxjax.training import loop

__all__ = [
    "PROX_SCALINGS",
    "ProxSparseResult",
    "ProxSparseSettings",
    "apply_masks",
    "document_batch",
    "extract_masks",
    "fraction_24",
    "inverse_mean_abs",
    "lam2_term",
    "lr_schedule",
    "proxsparse",
    "proxsparse_tx",
    "kernel_name",
    "tokenize_documents",
]

PROX_SCALINGS = ("strength", "lr")
"""``"strength"``: ``η_t = 1`` (λ₁ is the per-step prox strength; the reference); ``"lr"``: ``η_t`` = learning rate."""

_HISTORY = ("losses", "regularizer", "lam2_terms", "fraction_24", "learning_rates", "grad_norms", "tokens")


class ProxSparseResult(NamedTuple):
  """The outcome of :func:`proxsparse`.

  Attributes:
    model: the model passed in, now holding ``mask ⊙ W₀`` on the pruned kernels and ``W₀`` everywhere else.
    masks: pytree like ``nnx.as_pure(nnx.state(model, nnx.Param))``: bool masks (``True`` = kept) on the pruned
      kernels, ``None`` elsewhere.
    losses: per step ``t``, the LM loss ``L(θ_t; x_t)`` of that step's batch (before its update).
    regularizer: per step, ``Σ_i c_i R(W_{t,i})`` over the pruned kernels at ``θ_t`` (``λ₁ ·`` this is the
      regularization term; ``c_i = 1`` without ``lam_relative``).
    lam2_terms: per step, ``P(θ_t)`` (:func:`lam2_term`; 0 when ``lam2 = 0``).
    fraction_24: per step, the fraction of groups of the pruned kernels that are 2:4 (at most 2 non-zeros) after the
      step's update.
    learning_rates: per step, the AdamW learning rate used.
    grad_norms: per step, the global norm of the gradient before clipping.
    tokens: per step, the number of predicted (non-padding) tokens.
    final_fraction_24: the fraction of 2:4 groups of the learned weights, before mask extraction.
    lam1_effective: kernel name (e.g. ``"model.layers.0.mlp.up_proj"``) → ``λ₁ c_i``, the per-step prox strength of
      that kernel (times ``η_t``).
    steps: the number of steps.
    resumed_from: the step the run continued from (0 for a fresh run).
    learned: the learned params before extraction (pure ``nnx.State``) with ``return_learned=True``, else ``None``.
    optimizer: the ``nnx.Optimizer`` after training (adam moments, step counts, λ multipliers) with
      ``return_learned=True``, else ``None``.
  """
  model: Any
  masks: Any
  losses: list[float]
  regularizer: list[float]
  lam2_terms: list[float]
  fraction_24: list[float]
  learning_rates: list[float]
  grad_norms: list[float]
  tokens: list[int]
  final_fraction_24: float
  lam1_effective: dict[str, float]
  steps: int
  resumed_from: int
  learned: Any = None
  optimizer: Any = None


# ------------------------------------------------------------------------------------------------- pure functions --


def _selected(params: Any) -> list[tuple[Any, jax.Array]]:
  """``(path, leaf)`` of the pruned kernels of a pure params tree, in leaf order."""
  return [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if projection_spec(p, x) is not None]


def kernel_name(path: Sequence[Any]) -> str:
  """The dotted name of a kernel's linear (``model.layers.0.mlp.up_proj``) from its key path.

  Example:
    >>> from jax.tree_util import DictKey as K
    >>> kernel_name((K("model"), K("layers"), K(0), K("mlp"), K("up_proj"), K("kernel")))
    'model.layers.0.mlp.up_proj'
  """
  return ".".join(str(n) for n in path_names(path)[:-1])


def inverse_mean_abs(path: Sequence[Any], w: ArrayLike) -> jax.Array:
  """The relative-λ multiplier ``c = 1 / mean|w|`` of a kernel (``0`` for an all-zero kernel: no prox there).

  Used as ``prox_24_update(..., multipliers=inverse_mean_abs)``, it is evaluated once, on the pretrained weights.

  Example:
    >>> import jax.numpy as jnp
    >>> float(inverse_mean_abs((), jnp.array([0.5, -1.5, 0.0, 2.0])))
    1.0
  """
  del path
  return _inverse_mean_abs(jnp.asarray(w))


@jax.jit
def _inverse_mean_abs(w: jax.Array) -> jax.Array:
  m = jnp.mean(jnp.abs(w.astype(jnp.float32)))
  return jnp.where(m > 0, 1.0 / jnp.where(m > 0, m, 1.0), 0.0)


def lam2_term(w: Any, w0: Any, eps: float = 0.5) -> jax.Array:
  r"""``P(W) = Σ [W ⊙ (W − W₀) / (|W₀| + ε)]²`` (float32 scalar), summed over all leaves of matching pytrees.

  ``P = 0`` where every weight is at its pretrained value **or** exactly 0, so ``λ₂ P`` pulls each weight back to
  ``W₀`` or on to zero.

  Example:
    >>> import jax.numpy as jnp
    >>> w0 = jnp.array([1., -2.])
    >>> float(lam2_term(w0, w0)), float(lam2_term(jnp.array([0., -2.]), w0))
    (0.0, 0.0)
    >>> round(float(lam2_term(jnp.array([2., 1.]), w0, eps=0.5)), 4)  # (2·1/1.5)² + (1·3/2.5)²
    3.2178
  """
  def leaf(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return jnp.sum(jnp.square(a * (a - b) / (jnp.abs(b) + eps)))

  return sum(jax.tree.leaves(jax.tree.map(leaf, w, w0)), jnp.zeros((), jnp.float32))


def _groups_24(x: jax.Array, axis: int = 0) -> jax.Array:
  return jnp.sum(jnp.sum(nm.split_groups(x != 0, 4, axis), axis=axis + 1) <= 2, dtype=jnp.int32)


def fraction_24(params: Any, spec: Any = projection_spec) -> jax.Array:
  """The fraction of groups of 4 (along each selected leaf's spec axis) holding at most 2 non-zeros (float32).

  Example:
    >>> import jax.numpy as jnp
    >>> float(fraction_24({"k": jnp.array([[1., 1.], [0., 1.], [0., 1.], [2., 1.]])}, spec=0))
    0.5
  """
  pure, axes = flat_spec(params, spec, m=4)
  leaves = jax.tree.leaves(pure)
  sel = [(x, ax) for x, ax in zip(leaves, axes) if ax is not None]
  if not sel:
    raise ValueError("fraction_24: the spec selects no leaf")
  good = sum(_groups_24(x, ax) for x, ax in sel)
  return good.astype(jnp.float32) / sum(x.size // 4 for x, _ in sel)


def extract_masks(params: Any, spec: Any = projection_spec) -> Any:
  """The 2:4 masks of learned weights: per group of 4 along the spec axis, the 2 largest ``|w|`` (ties: lower index).

  Returns a pytree like the pure params with bool masks on the selected leaves and ``None`` elsewhere.

  Example:
    >>> import jax.numpy as jnp
    >>> extract_masks({"k": jnp.array([[0.5], [-0.5], [0.5], [0.]])}, spec=0)["k"].ravel()
    Array([ True,  True, False, False], dtype=bool)
  """
  pure, axes = flat_spec(params, spec, m=4)
  leaves, treedef = jax.tree.flatten(pure)
  masks = [None if ax is None else nm.nm_mask(jnp.abs(x), 2, 4, axis=ax) for x, ax in zip(leaves, axes)]
  return jax.tree.unflatten(treedef, masks)


def apply_masks(original: Any, masks: Any) -> Any:
  """``where(mask, W₀, 0)`` on the leaves with a mask; the other leaves of ``original`` unchanged (same arrays).

  Example:
    >>> import jax.numpy as jnp
    >>> apply_masks({"k": jnp.array([1., 2., 3., 4.]), "b": jnp.ones(1)},
    ...             {"k": jnp.array([True, False, False, True]), "b": None})["k"]
    Array([1., 0., 0., 4.], dtype=float32)
  """
  pure = nnx.as_pure(original)
  leaves, treedef = jax.tree.flatten(pure)
  flat = treedef.flatten_up_to(jax.tree.broadcast(masks, pure, is_leaf=lambda v: v is None))
  out = [x if mk is None else jnp.where(mk, x, jnp.zeros((), x.dtype)) for x, mk in zip(leaves, flat)]
  return jax.tree.unflatten(treedef, out)

def lr_schedule(learning_rate: float, steps: int, warmup_fraction: float = 0.1) -> optax.Schedule:
  """Linear warm-up then linear decay to 0 (Hugging Face's ``get_linear_schedule_with_warmup``).

  With ``W = ceil(warmup_fraction · steps)``: ``lr(t) = lr · t / W`` for ``t < W``, else
  ``lr · max(0, (steps − t) / max(1, steps − W))``.

  Example:
    >>> s = lr_schedule(1.0, 20)
    >>> [round(float(s(t)), 3) for t in (0, 1, 2, 11, 20)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
  """
  warm = math.ceil(warmup_fraction * steps)

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    up = t / max(1, warm)
    down = jnp.maximum(0.0, (steps - t) / max(1, steps - warm))
    return learning_rate * jnp.where(t < warm, up, down)

  return schedule


def _lr_at(learning_rate: float, steps: int, t: int, warmup_fraction: float = 0.1) -> float:
  """:func:`lr_schedule` at step ``t`` in float32, computed on the host."""
  warm = math.ceil(warmup_fraction * steps)
  frac = np.float32(t) / np.float32(max(1, warm)) if t < warm else max(np.float32(0), np.float32(steps - t) /
                                                                        np.float32(max(1, steps - warm)))
  return float(np.float32(learning_rate) * np.float32(frac))


def proxsparse_tx(steps: int, learning_rate: float, lam1: Any, *, prox_scaling: str = "strength",
                  lam_relative: bool = False, fuse: bool | None = None) -> optax.GradientTransformationExtraArgs:
  """The ProxSparse optax chain: ``clip_by_global_norm(1.0)`` → ``adamw(lr_schedule, b1=0.9, b2=0.999,
  weight_decay=0)`` → ``prox_24_update(λ₁, η, spec=projection_spec, multipliers=c)`` (see the module docs).

  Args:
    steps: total steps (for the learning-rate schedule).
    learning_rate: peak learning rate.
    lam1: ``λ₁ ≥ 0``, a float or an optax schedule.
    prox_scaling: ``"strength"`` (``η = 1``) or ``"lr"`` (``η`` = the learning-rate schedule).
    lam_relative: multiply λ₁ per kernel by ``1/mean|W₀|`` (:func:`inverse_mean_abs`, evaluated at ``init``).
    fuse: passed to :func:`proxjax.prox_24_update` (``False`` for sharded params).

  Example:
    >>> import jax.numpy as jnp
    >>> tx = proxsparse_tx(10, 1e-3, 0.5)
    >>> len(tx.init({"w": jnp.ones(3)}))  # clip, adamw, prox states
    3
  """
  if prox_scaling not in PROX_SCALINGS:
    raise ValueError(f"prox_scaling must be one of {PROX_SCALINGS}, got {prox_scaling!r}")
  return _tx(steps, float(learning_rate), lam1, prox_scaling, bool(lam_relative), fuse)


@functools.lru_cache(maxsize=16)
def _tx(steps, learning_rate, lam1, prox_scaling, lam_relative, fuse):
  # Cached: runs with equal settings get the same transformation object, hence equal graph definitions and one
  # compilation of the training step.
  lr = lr_schedule(learning_rate, steps)
  return optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=0.0),
      transforms.prox_24_update(lam1, 1.0 if prox_scaling == "strength" else lr, spec=projection_spec, fuse=fuse,
                                multipliers=inverse_mean_abs if lam_relative else None))


# ----------------------------------------------------------------------------------------------------------- data --


def tokenize_documents(tokenizer: Any, documents: Sequence[str], seqlen: int, *,
                       split: bool = False) -> list[np.ndarray]:
  """Each non-empty document encoded (``tokenizer.encode``, special tokens included) and truncated to its first
  ``seqlen`` tokens (the reference), or with ``split=True`` cut into consecutive pieces of ``seqlen`` tokens (the
  last one shorter; never across documents), so that long documents are used whole; pieces with fewer than 2 tokens
  (nothing to predict) are dropped.

  Example:
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from proxjax import data
    >>> t = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1, "b": 2}, unk_token="<eos>"))
    >>> t.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> tok = data.load_tokenizer(t)
    >>> [d.tolist() for d in tokenize_documents(tok, ["a b a b", "b", "", "b a"], seqlen=3)]
    [[1, 2, 1], [2, 1]]
    >>> [d.tolist() for d in tokenize_documents(tok, ["a b a b a", "b a"], seqlen=2, split=True)]
    [[1, 2], [1, 2], [2, 1]]
  """
  if not isinstance(seqlen, (int, np.integer)) or seqlen < 2:
    raise ValueError(f"seqlen must be an int >= 2, got {seqlen!r}")
  if isinstance(documents, str):
    raise ValueError("documents must be a sequence of strings, got a single string (wrap it in a list)")
  texts = [d for d in documents if d.strip()]
  encoded = tokenizer.encode_batch(texts) if texts else []
  out = [np.asarray(ids[s:s + seqlen], np.int32) for ids in encoded
         for s in (range(0, len(ids), seqlen) if split else (0,)) if len(ids) - s >= 2]
  if not out:
    raise ValueError(f"none of the {len(documents)} documents has 2 or more tokens")
  return out


def _pad_length(n: int, cap: int) -> int:
  return min(1 << max(n - 1, 1).bit_length(), cap)


def document_batch(documents: Sequence[np.ndarray], step: int, batch_size: int = 1,
                   max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The batch of step ``step``: documents ``step·B … step·B + B − 1`` (modulo their number), right-padded with 0 to
  the next power of two of the longest (at most ``max_length``, default the longest document overall).

  Returns:
    ``(ids, valid)``: ``int32`` and ``bool`` arrays ``(B, T)``; ``valid`` marks the real tokens.

  Example:
    >>> import numpy as np
    >>> docs = [np.array([5, 6, 7, 8, 9]), np.array([8, 9, 10])]
    >>> ids, valid = document_batch(docs, 1, batch_size=1)  # 3 tokens, padded to 4
    >>> ids.tolist(), valid.tolist()
    ([[8, 9, 10, 0]], [[True, True, True, False]])
  """
  n = len(documents)
  cap = max(len(d) for d in documents) if max_length is None else max_length
  chosen = [np.asarray(documents[(step * batch_size + i) % n])[:cap] for i in range(batch_size)]
  length = _pad_length(max(len(d) for d in chosen), cap)
  ids = np.zeros((batch_size, length), np.int32)
  valid = np.zeros((batch_size, length), bool)
  for i, d in enumerate(chosen):
    ids[i, :len(d)] = d
    valid[i, :len(d)] = True
  return ids, valid

# --------------------------------------------------------------------------------------------------- training step --


def _loss(model, batch):
  """``L + λ₂ P`` of one batch, with ``L`` and ``P`` as metrics (``P = 0`` without ``W₀``)."""
  ids, valid, w0, lam2, eps = batch
  lm = loop.lm_loss(model, ids, valid)
  if w0 is None:
    return lm, {"loss": lm, "lam2_term": jnp.zeros((), jnp.float32)}
  kernels = [x for _, x in _selected(nnx.as_pure(nnx.state(model, nnx.Param)))]
  pen = lam2_term(kernels, w0, eps)
  return lm + lam2 * pen, {"loss": lm, "lam2_term": pen}


def _before_update(model, optimizer, grads, batch):
  """``Σ_i c_i R(W_i)`` at ``θ_t`` and the gradient norm before clipping."""
  del batch
  before = [x for _, x in _selected(nnx.as_pure(nnx.state(model, nnx.Param)))]
  mults = nnx.as_pure(optimizer.opt_state[-1].multipliers)
  weights = None if mults is None else [c for _, c in _selected_mults(mults)]
  return {"regularizer": _weighted_regularizer(before, weights), "grad_norm": optax.tree.norm(grads)}


def _after_update(model, optimizer, batch):
  """The fraction of 2:4 groups after the update and the number of predicted tokens."""
  del optimizer
  after = _selected(nnx.as_pure(nnx.state(model, nnx.Param)))
  return {"fraction_24": fraction_24([x for _, x in after], spec=0), "tokens": jnp.sum(batch[1][:, 1:])}


def _group_r(a1, a2, a3, a4):
  return a1 * a2 * (a3 + a4) + a3 * a4 * (a1 + a2)


def _weighted_regularizer(kernels: list[jax.Array], weights: list[jax.Array] | None) -> jax.Array:
  """``Σ_i c_i R(W_i)`` (``c_i = 1`` without weights), float32, kernel by kernel (each in its own layout and
  sharding: no concatenation, no gathering)."""
  ws = [1.0] * len(kernels) if weights is None else weights
  parts = [_group_r(*jnp.abs(nm.split_groups(x.astype(jnp.float32), 4, 0)).swapaxes(0, 1)) for x in kernels]
  return sum((jnp.sum(r) * c for r, c in zip(parts, ws)), jnp.zeros((), jnp.float32))


# XLA:CPU fast-math (proxjax.CPU_FAST_MATH) when running on CPU: the prox's Newton iterations are ~3x faster.
_STEP = loop.train_step(_loss, before_update=_before_update, after_update=_after_update, fast_math_on_cpu=True)

_METRICS = (("losses", "loss"), ("regularizer", "regularizer"), ("lam2_terms", "lam2_term"),
            ("fraction_24", "fraction_24"), ("grad_norms", "grad_norm"), ("tokens", "tokens"))


# -------------------------------------------------------------------------------------------------------- settings --


def _is_int(x: Any) -> bool:
  return isinstance(x, int | np.integer) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class ProxSparseSettings:
  """The hyperparameters of a ProxSparse run (see :func:`proxsparse`), checked when built.

  Example:
    >>> ProxSparseSettings(steps=400, lam1=0.1, lam_relative=True).learning_rate
    0.0001
    >>> ProxSparseSettings(steps=400, lam1=-1.0)
    Traceback (most recent call last):
    ValueError: lam1 must be finite and >= 0 (or a schedule), got -1.0
  """

  steps: int
  lam1: Any
  learning_rate: float = 1e-4
  lam_relative: bool = False
  lam2: float = 0.0
  eps: float = 0.5
  prox_scaling: str = "strength"
  batch_size: int = 1

  def __post_init__(self):
    if not _is_int(self.steps) or self.steps < 1:
      raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
    if not _is_int(self.batch_size) or self.batch_size < 1:
      raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
    if not (np.isfinite(self.learning_rate) and self.learning_rate >= 0):
      raise ValueError(f"learning_rate must be finite and >= 0, got {self.learning_rate!r}")
    if not callable(self.lam1) and not (np.isfinite(self.lam1) and self.lam1 >= 0):
      raise ValueError(f"lam1 must be finite and >= 0 (or a schedule), got {self.lam1!r}")
    if not (np.isfinite(self.lam2) and self.lam2 >= 0):
      raise ValueError(f"lam2 must be finite and >= 0, got {self.lam2!r}")
    if not (np.isfinite(self.eps) and self.eps > 0):
      raise ValueError(f"eps must be finite and > 0, got {self.eps!r}")
    if self.prox_scaling not in PROX_SCALINGS:
      raise ValueError(f"prox_scaling must be one of {PROX_SCALINGS}, got {self.prox_scaling!r}")

  def to_json(self) -> dict[str, Any]:
    """The settings as JSON data (a schedule ``lam1`` by its ``repr``), for the run's fingerprint."""
    return {"steps": int(self.steps), "learning_rate": float(self.learning_rate),
            "lam1": float(self.lam1) if not callable(self.lam1) else repr(self.lam1),
            "lam_relative": bool(self.lam_relative), "lam2": float(self.lam2), "eps": float(self.eps),
            "prox_scaling": self.prox_scaling, "batch_size": int(self.batch_size)}


# ------------------------------------------------------------------------------------------------------------ run --


def _copy(x: jax.Array) -> jax.Array:
  """A fresh buffer with the same sharding (the training step donates the live params)."""
  return jax.device_put(x, x.sharding, may_alias=False)


def _documents(model: nnx.Module, documents: Sequence[ArrayLike]) -> list[np.ndarray]:
  """The documents as int32 token arrays of 2 or more tokens, checked against the model's vocabulary."""
  if isinstance(documents, str) or any(isinstance(d, str) for d in documents):
    raise ValueError("documents must be token-id arrays, not text: encode them with tokenize_documents(tokenizer, "
                     "texts, seqlen)")
  docs = [np.asarray(d).astype(np.int32).reshape(-1) for d in documents]
  docs = [d for d in docs if d.size >= 2]
  if not docs:
    raise ValueError("proxsparse needs at least one document of 2 or more tokens")
  vocab = getattr(getattr(model, "config", None), "vocab_size", None)
  if vocab is not None and any(int(d.min()) < 0 or int(d.max()) >= vocab for d in docs):
    raise ValueError(f"the documents hold token ids outside [0, {vocab}) of the model's vocabulary")
  return docs


def proxsparse(model: nnx.Module, documents: Sequence[ArrayLike], *, steps: int, lam1: Any,
               learning_rate: float = 1e-4, lam_relative: bool = False, lam2: float = 0.0, eps: float = 0.5,
               prox_scaling: str = "strength", batch_size: int = 1, state_dir: str | os.PathLike[str] | None = None,
               save_every: int = 50, mesh: Any = None, progress: bool = True, return_learned: bool = False,
               run_info: dict[str, Any] | None = None,
               callback: Callable[[int, dict[str, Any]], None] | None = None) -> ProxSparseResult:
  r"""Learns 2:4 masks of a LLaMA end to end (ProxSparse) and applies them to the original weights, in place.

  Minimizes ``L(θ) + λ₂ P(θ)`` by AdamW with, after every step, the exact prox of ``λ₁ c R`` on the pruned kernels
  (see the module docs for the full update rule, the schedule, the data order and ``c``); then keeps, per group of 4
  along the input axis, the 2 largest learned ``|W|`` and sets the model to ``mask ⊙ W₀`` (every other parameter back
  to ``W₀``). The loop is :func:`proxjax.training.loop.run`.

  Args:
    model: a :class:`~proxjax.models.LlamaForCausalLM` (any NNX model whose projections live at
      ``…layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}.kernel``), with float32 parameters for training.
    documents: token-id arrays, one document each, already truncated (:func:`tokenize_documents`).
    steps: optimizer steps ``T`` (the reference: 400).
    lam1: ``λ₁ ≥ 0`` (float or optax schedule): the prox strength per step (``prox_scaling="strength"``) or the weight
      of ``R`` (``"lr"``); relative to ``mean|W₀|`` per kernel with ``lam_relative``.
    learning_rate: peak AdamW learning rate (the reference: 1e-4).
    lam_relative: per-kernel ``c_i = 1/mean|W₀,i|`` (scale-free λ₁) instead of ``c_i = 1``.
    lam2: ``λ₂ ≥ 0``, the weight of :func:`lam2_term` in the loss (0: off, the default).
    eps: ``ε > 0`` of :func:`lam2_term`.
    prox_scaling: ``"strength"`` (``η = 1``, the reference; default) or ``"lr"`` (``η`` = learning rate).
    batch_size: documents per step (the reference: 1; see the module docs for padding).
    state_dir: resume directory (``None``: no saving); see the module docs.
    save_every: save every this many steps (0: only at the end), with ``state_dir``.
    mesh: a :mod:`proxjax.core.sharding` mesh: params, optimizer state, ``W₀`` and batches are placed on their declared
      shardings and the prox is solved per kernel (``fuse=False``). It may span several processes
      (:mod:`proxjax.core.distributed`): every process passes the same documents and builds its own devices' rows
      of each batch.
    progress: tqdm bar with the loss and the fraction of 2:4 groups.
    return_learned: keep the learned (pre-extraction) params and the optimizer in the result.
    run_info: JSON data identifying the run (e.g. the checkpoint path); a state directory of another run is refused.
    callback: called as ``callback(step, metrics)`` after every step (host scalars: ``loss``, ``regularizer``,
      ``lam2_term``, ``fraction_24``, ``grad_norm``, ``tokens``, ``seconds``).

  Returns:
    A :class:`ProxSparseResult`.

  Raises:
    ValueError: bad settings (``λ < 0``, ``steps < 1``, …), no documents, a model without the LLaMA projections, a
      ``state_dir`` of a different run.
    FloatingPointError: the loss or gradient became NaN/inf (the message names the step). On this or any other
      error (or an interrupt) during training the model is left with its original weights; with ``state_dir`` a
      rerun continues from the last save.

  Example:
    >>> import numpy as np, proxjax
    >>> from flax import nnx
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
    ...                 num_attention_heads=2)
    >>> model = LlamaForCausalLM(c, rngs=nnx.Rngs(0))
    >>> docs = [np.arange(1, 9), np.arange(3, 11)]  # two documents of 8 tokens
    >>> res = proxsparse(model, docs, steps=2, lam1=1e3, learning_rate=1e-3, progress=False)
    >>> res.fraction_24[-1], len(res.losses)
    (1.0, 2)
    >>> bool(proxjax.is_nm(model.model.layers[0].mlp.up_proj.kernel[...]))
    True
  """
  settings = ProxSparseSettings(steps, lam1, learning_rate, lam_relative, lam2, eps, prox_scaling, batch_size)
  docs = _documents(model, documents)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  kernels = _selected(params)
  if not kernels:
    raise ValueError(
        f"{type(model).__name__} has no LLaMA projections to prune: expected 2-D kernels at "
        "'…layers.N.self_attn.{q,k,v,o}_proj.kernel' / '…layers.N.mlp.{gate,up,down}_proj.kernel'")
  flat_spec(params, projection_spec, m=4)  # d_in % 4 checks, named

  tx = proxsparse_tx(steps, learning_rate, lam1, prox_scaling=prox_scaling, lam_relative=lam_relative,
                     fuse=False if mesh is not None else None)
  optimizer = loop.optimizer_on(model, tx, mesh)
  original = jax.tree.map(_copy, nnx.as_pure(nnx.state(model, nnx.Param)))  # on the mesh, as placed
  w0 = [x for _, x in _selected(original)] if lam2 > 0 else None

  max_length = max(d.size for d in docs)

  scalars = loop.scalars_on((lam2, eps), mesh)

  def batch(t: int) -> tuple[Any, ...]:
    ids, valid = document_batch(docs, t, batch_size, max_length)
    if mesh is not None:  # split over the mesh's devices (each process builds its own devices' rows)
      ids, valid = loop.batch_on(ids, mesh), loop.batch_on(valid, mesh)
    return ids, valid, w0, *scalars

  def record(t: int, m: dict[str, Any]) -> dict[str, Any]:
    return {**{name: m[key] for name, key in _METRICS}, "learning_rates": _lr_at(learning_rate, steps, t)}

  recipe = loop.Recipe("ProxSparse", _STEP, _HISTORY, record,
                       finite=("loss", "grad_norm", "regularizer", "lam2_term"),
                       postfix=(("loss", "loss", ".4f"), ("frac24", "fraction_24", ".4f")),
                       hint="lower the learning rate or λ, or check the model")
  fingerprint = {**settings.to_json(), "documents": {"count": len(docs), "tokens": int(sum(d.size for d in docs)),
                                                     "sha256": loop.digest(docs)}, "run_info": run_info or {}}
  try:
    trained = loop.run(recipe, model, optimizer, batch, steps=steps, state_dir=state_dir, save_every=save_every,
                       fingerprint=fingerprint, pin_shardings=mesh is not None, progress=progress, callback=callback)
  except BaseException:
    nnx.update(model, original)  # the live state was donated to the step: leave the model with its original weights
    raise

  history = trained.history
  learned = nnx.as_pure(nnx.state(model, nnx.Param))
  masks, masked, final = _finish(learned, original)
  final = float(final)
  mults = nnx.as_pure(optimizer.opt_state[-1].multipliers)
  lam_t = float(lam1(0)) if callable(lam1) else float(lam1)
  if mults is None:
    lam_eff = {kernel_name(p): lam_t for p, _ in kernels}
  else:
    lam_eff = {kernel_name(p): lam_t * float(c) for p, c in _selected_mults(mults)}
  nnx.update(model, jax.device_put(masked, jax.tree.map(lambda x: x.sharding, original)))  # keep the placement
  return ProxSparseResult(
      model=model, masks=masks, losses=history["losses"], regularizer=history["regularizer"],
      lam2_terms=history["lam2_terms"], fraction_24=history["fraction_24"],
      learning_rates=history["learning_rates"], grad_norms=history["grad_norms"],
      tokens=[int(n) for n in history["tokens"]], final_fraction_24=final, lam1_effective=lam_eff, steps=int(steps),
      resumed_from=trained.resumed_from, learned=learned if return_learned else None,
      optimizer=optimizer if return_learned else None)


@jax.jit
def _finish(learned: Any, original: Any) -> tuple[Any, Any, jax.Array]:
  """Masks of the learned weights, the masked original weights, and the learned fraction of 2:4 groups."""
  masks = extract_masks(learned)
  return masks, apply_masks(original, masks), fraction_24(learned)


def _selected_mults(mults: Any) -> list[tuple[Any, jax.Array]]:
  return [(p, c) for p, c in jax.tree_util.tree_flatten_with_path(mults, is_leaf=lambda v: v is None)[0]
          if c is not None]
