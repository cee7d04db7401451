r"""Recovery fine-tuning of a pruned model on the language-modelling loss with its sparsity mask fixed.

The loss of a batch of token windows ``x`` (``(B, T)``) is the mean next-token negative log-likelihood

.. math::  \mathcal L(\theta) = -\frac{1}{B(T-1)} \sum_{b,t<T} \log p_\theta(x_{b,t+1} \mid x_{b,\le t}),

minimized by an optax chain ending in :func:`proxjax.masked_updates`, so every weight that pruning set to zero stays
exactly zero (the N:M pattern survives training) while kept weights, norms and embeddings are trained.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from proxjax.core import transforms


class FinetuneResult(NamedTuple):
  """Losses per step (``losses``) and the number of steps taken."""
  losses: list[float]
  steps: int


def lm_loss(model: Any, ids: jax.Array) -> jax.Array:
  """Mean next-token NLL of ``ids`` ``(B, T)`` under ``model`` (logits ``(B, T, V)``), float32.

  Example:
    >>> import jax.numpy as jnp
    >>> class Uniform:
    ...   def __call__(self, ids):
    ...     return jnp.zeros(ids.shape + (10,))
    >>> round(float(lm_loss(Uniform(), jnp.zeros((2, 5), jnp.int32))), 4) == round(float(jnp.log(10.0)), 4)
    True
  """
  logits = model(ids)[:, :-1].astype(jnp.float32)
  targets = ids[:, 1:]
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.mean(logz - picked)


def sparsity_masks(model: nnx.Module, names: Iterable[str] | None = None) -> Any:
  """Masks ``kernel != 0`` for the kernels of the given linears (default: the pruned projections of a LLaMA).

  Returns a pytree matching ``nnx.state(model, nnx.Param)`` with bool arrays on those kernels and ``None`` elsewhere,
  ready for :func:`proxjax.masked_updates`.
  """
  if names is None:
    from proxjax.models.llama import LINEAR_NAMES as names  # pylint: disable=import-outside-toplevel
  suffixes = tuple(tuple(n.split(".")) + ("kernel",) for n in names)
  params = nnx.state(model, nnx.Param)

  def mask(path, leaf):
    keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path if not _is_value_key(k))
    if any(keys[-len(s):] == s for s in suffixes):
      return jnp.asarray(leaf) != 0
    return None

  return jax.tree.map_with_path(mask, nnx.as_pure(params))


def _is_value_key(k: Any) -> bool:
  return getattr(k, "name", None) == "value"


@functools.partial(nnx.jit, donate_argnames=("optimizer",))
def _step(model, optimizer, ids):
  loss, grads = nnx.value_and_grad(lm_loss)(model, ids)
  optimizer.update(model, grads)
  return loss


def finetune_masked(model: nnx.Module, batches: Iterable[Any], *, learning_rate: float = 2e-5,
                    weight_decay: float = 0.0, masks: Any = None, progress: bool = True) -> FinetuneResult:
  """Trains ``model`` in place with AdamW on :func:`lm_loss`, pruned weights held at exactly zero.

  The chain is ``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=wd),
  proxjax.masked_updates(masks))``.

  Args:
    model: a causal LM (``model(ids) -> logits``), trained in its parameter dtype (use float32 parameters).
    batches: iterable of int token arrays ``(B, T)``; one optimizer step each.
    learning_rate: AdamW learning rate (constant).
    weight_decay: AdamW weight decay.
    masks: :func:`sparsity_masks` of the model (default: computed from the current zeros).
    progress: tqdm bar with the running loss.

  Returns:
    A :class:`FinetuneResult`.
  """
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  masks = sparsity_masks(model) if masks is None else masks
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, weight_decay=weight_decay),
                   transforms.masked_updates(masks))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  losses = []
  bar = tqdm(batches, desc="fine-tune", unit="step", disable=not progress)
  for ids in bar:
    loss = float(_step(model, optimizer, jnp.asarray(np.asarray(ids), jnp.int32)))
    if not np.isfinite(loss):
      raise FloatingPointError(f"fine-tuning loss became {loss} at step {len(losses)}; lower the learning rate")
    losses.append(loss)
    bar.set_postfix(loss=f"{loss:.4f}")
  bar.close()
  return FinetuneResult(losses, len(losses))
