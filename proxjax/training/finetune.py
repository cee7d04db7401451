r"""Recovery fine-tuning of a pruned model on the language-modelling loss with its sparsity mask fixed.

A :class:`~proxjax.training.loop.Recipe` of the one training loop: the loss of a batch of token windows ``x``
``(B, T)`` is the mean next-token NLL (:func:`proxjax.training.loop.lm_loss`)

.. math::  \mathcal L(\theta) = -\frac{1}{B(T-1)} \sum_{b,t<T} \log p_\theta(x_{b,t+1} \mid x_{b,\le t}),

minimized by an optax chain ending in :func:`proxjax.masked_updates`, so every weight that pruning set to zero stays
exactly zero (the N:M pattern survives training) while kept weights, norms and embeddings are trained.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from proxjax.core import transforms
from proxjax.core.spec import flat_spec
from proxjax.models.llama import projection_spec
from proxjax.training import loop

__all__ = ["FinetuneResult", "finetune_masked", "sparsity_masks"]


class FinetuneResult(NamedTuple):
  """Losses per step (``losses``, resumed steps included) and the number of steps taken."""
  losses: list[float]
  steps: int


def sparsity_masks(model: nnx.Module, spec: Any = projection_spec) -> Any:
  """Masks ``kernel != 0`` of the weights the sparsity ``spec`` selects (default
  :func:`proxjax.models.llama.projection_spec`: the pruned projections of a LLaMA-family model).

  Returns a pytree matching ``nnx.state(model, nnx.Param)`` with bool arrays on the selected leaves and ``None``
  elsewhere, ready for :func:`proxjax.masked_updates`.

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                 num_attention_heads=2)
    >>> masks = sparsity_masks(LlamaForCausalLM(c, rngs=nnx.Rngs(0)))
    >>> len(jax.tree.leaves(masks))  # the 7 projections of the block
    7
  """
  return _nonzero_masks(nnx.state(model, nnx.Param), spec)


def _nonzero_masks(params: Any, spec: Any = projection_spec) -> Any:
  pure, axes = flat_spec(params, spec)
  leaves, treedef = jax.tree.flatten(pure)
  return jax.tree.unflatten(treedef, [None if ax is None else jnp.asarray(x) != 0 for x, ax in zip(leaves, axes)])


def _chain(learning_rate: float, weight_decay: float, masks: Any) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, weight_decay=weight_decay),
                     transforms.masked_updates(masks))


@functools.lru_cache(maxsize=8)
def _default_chain(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
  """The chain with the default masks (the projections' non-zeros, read at init): one object per
  ``(learning_rate, weight_decay)``, so the training step compiles once for every model of a shape."""
  return _chain(learning_rate, weight_decay, _nonzero_masks)


def _loss(model, ids):
  loss = loop.lm_loss(model, ids)
  return loss, {"loss": loss}


_RECIPE = loop.Recipe("fine-tune", loop.train_step(_loss), ("losses",), lambda t, m: {"losses": m["loss"]})


def finetune_masked(model: nnx.Module, batches: Iterable[Any], *, learning_rate: float = 2e-5,
                    weight_decay: float = 0.0, masks: Any = None, progress: bool = True,
                    state_dir: str | os.PathLike[str] | None = None, save_every: int = 0,
                    run_info: dict[str, Any] | None = None, mesh: Any = None,
                    callback: Callable[[int, dict[str, Any]], None] | None = None) -> FinetuneResult:
  """Trains ``model`` in place with AdamW on :func:`~proxjax.training.loop.lm_loss`, pruned weights held at zero.

  The chain is ``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=wd),
  proxjax.masked_updates(masks))``; the loop is :func:`proxjax.training.loop.run`.

  Args:
    model: a causal LM (``model(ids) -> logits``), trained in its parameter dtype (use float32 parameters).
    batches: iterable of int token arrays ``(B, T)``; one optimizer step each.
    learning_rate: AdamW learning rate (constant).
    weight_decay: AdamW weight decay.
    masks: :func:`sparsity_masks` of the model (default: computed from the current zeros).
    progress: tqdm bar with the running loss.
    state_dir: resume directory (``None``: nothing saved; see :mod:`proxjax.training.loop`); the batches are then
      read into one array and are part of the run's fingerprint.
    save_every: save every this many steps (0: only after the last one), with ``state_dir``.
    run_info: JSON data identifying the run, checked on resume.
    mesh: a :mod:`proxjax.core.sharding` mesh: params and optimizer state are placed on their declared shardings
      (and kept there) and each batch is split over every device along its rows; the mesh may span several processes
      (:mod:`proxjax.core.distributed`: every process passes the same batches and supplies its own devices' rows).
    callback: called as ``callback(step, metrics)`` after every step (host scalars ``loss`` and ``seconds``).

  Returns:
    A :class:`FinetuneResult`.

  Raises:
    FloatingPointError: the loss became NaN or infinite (the message names the step; the model holds the last
      step's weights).

  Example:
    >>> import numpy as np, jax.numpy as jnp
    >>> from flax import nnx
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                 num_attention_heads=2)
    >>> model = LlamaForCausalLM(c, rngs=nnx.Rngs(0))
    >>> up = model.model.layers[0].mlp.up_proj.kernel
    >>> up[...] = up[...].at[0].set(0.0)  # a pruned row
    >>> r = finetune_masked(model, np.ones((2, 1, 8), np.int32), learning_rate=1e-2, progress=False)
    >>> r.steps, bool(jnp.all(up[...][0] == 0)), bool(jnp.all(up[...][1] != 0))
    (2, True, True)
  """
  tx = (_default_chain(float(learning_rate), float(weight_decay)) if masks is None
        else _chain(learning_rate, weight_decay, masks))
  fingerprint = None
  if state_dir is not None:
    masks = sparsity_masks(model) if masks is None else masks  # read before the optimizer's init, as its masks are
    batches = np.asarray(list(batches)).astype(np.int32)
    fingerprint = {"learning_rate": float(learning_rate), "weight_decay": float(weight_decay),
                   "batches": loop.digest([batches]), "masks": loop.digest(jax.tree.leaves(masks)),
                   "run_info": run_info or {}}
  optimizer = loop.optimizer_on(model, tx, mesh)
  steps = len(batches) if hasattr(batches, "__len__") else None
  data = (loop.batch_on(np.asarray(ids).astype(np.int32), mesh) for ids in batches)
  result = loop.run(_RECIPE, model, optimizer, data, steps=steps, state_dir=state_dir, save_every=save_every,
                    fingerprint=fingerprint, pin_shardings=mesh is not None, progress=progress, callback=callback)
  return FinetuneResult(result.history["losses"], result.steps)
