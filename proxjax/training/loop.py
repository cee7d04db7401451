r"""One training loop: a compiled step, the language-modelling loss, resumption, a progress bar, NaN detection.

Fine-tuning (:mod:`proxjax.training.finetune`), ProxSparse (:mod:`proxjax.training.proxsparse`, docs/method.md,
"ProxSparse") and ProSparse (:mod:`proxjax.training.prosparse`, docs/method.md, "ProSparse") are each a
:class:`Recipe` for :func:`run`: a loss, an optax chain (in the ``nnx.Optimizer``), the batch of each step and what to
record; everything else is here.

**The step** (:func:`train_step`): on the training state ``(model, optimizer)``, with ``loss(model, batch) → (ℓ,
metrics)``,

.. math::  (\ell_t, g_t) = (\mathcal L, \nabla_\theta \mathcal L)(\theta_t; b_t),\qquad
           (\theta_{t+1}, s_{t+1}) = \mathrm{optimizer.update}(\theta_t, s_t, g_t),

compiled once per recipe (``jax.jit`` over ``nnx.split`` state, the state donated), optionally with
:data:`proxjax.CPU_FAST_MATH` on CPU and with the new state pinned to the shardings of the old one on a mesh.

**The loss** (:func:`lm_loss`): the mean next-token negative log-likelihood over the real targets of token windows
``x`` ``(B, T)`` with a validity mask ``v`` (all ones without padding),

.. math::  \mathcal L(\theta) = \frac{\sum_{b, t<T} v_{b,t+1}\, \ell_{b,t}}{\sum_{b,t<T} v_{b,t+1}},\qquad
           \ell_{b,t} = -\log p_\theta(x_{b,t+1} \mid x_{b,\le t}).

**Placement on a mesh** (the same for every recipe): :func:`optimizer_on` places the params and then the optimizer
state on their declared shardings, :func:`batch_on` splits each batch's rows over every device and :func:`scalars_on`
replicates a step's scalar inputs; the mesh may span several processes (each builds only its own devices' shards).

**Resumption** (``state_dir``): every ``save_every`` steps and after the last one, the training state
``nnx.state((model, optimizer))`` (params, optimizer moments, step counts, multipliers, hyperparameters) is saved
with orbax into ``state_dir/step_NNNNNNN`` (atomic: orbax finalizes by renaming a temporary directory), then
``state_dir/train-state.json`` (:data:`STATE_FILE`, written atomically) names it with the step, the per-step history
and the run's fingerprint; older checkpoints are then removed. A later call with the same ``state_dir`` and the same
fingerprint continues from there; one with another fingerprint is refused, naming the keys that differ. The data of
step ``t`` is a function of ``t`` (or the ``t``-th item of the batches), so a resumed run takes the same steps and
gives the same result, bit for bit, as an uninterrupted one.

Across processes (:mod:`proxjax.core.distributed`) ``state_dir`` needs a file system every process shares: each
writes its own shards of the checkpoint, process 0 the rest, with barriers around it, and every process resumes from
the step of the state file process 0 reads, which each must see the same
(:func:`proxjax.core.distributed.resume_directory`: refused otherwise, or no state kept when there is none yet).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from proxjax.core import distributed, sharding, xla
from proxjax.core.sharding import batch_on  # re-exported: a step's batch on the mesh
from proxjax.core.files import json_roundtrip, write_json

__all__ = ["STATE_FILE", "STATE_VERSION", "LoopResult", "Recipe", "batch_on", "digest", "lm_loss", "optimizer_on",
           "run", "scalars_on", "train_step"]

STATE_FILE = "train-state.json"
"""The resume file in a state directory: ``{"version", "fingerprint", "step", "checkpoint", "history"}``."""

STATE_VERSION = 1
"""The version of the resume format, part of every fingerprint."""

_LEGACY = ("proxsparse-state.json",)  # resume files of proxjax before the one loop (ProSparse's were step-*/ dirs)


# --------------------------------------------------------------------------------------------------------- loss --


def lm_loss(model: Any, ids: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  r"""Mean next-token NLL of token windows ``ids`` ``(B, T)`` over the real targets (float32 scalar).

  ``Σ_{b,t} v_{b,t+1} ℓ_{b,t} / max(1, Σ v_{b,t+1})`` with ``ℓ_{b,t} = logsumexp(z_{b,t}) − z_{b,t,x_{b,t+1}}`` and
  ``z = model(ids)`` (logits ``(B, T, V)``, in float32); ``valid`` (bool ``(B, T)``) marks real tokens, ``None``
  means all of them, i.e. the plain mean over the ``B(T−1)`` targets. With right-padding the real positions' logits
  are those of the unpadded windows (causal attention), so padding changes nothing.

  Example:
    >>> import jax.numpy as jnp
    >>> class Uniform:
    ...   def __call__(self, ids):
    ...     return jnp.zeros(ids.shape + (10,))
    >>> ids, valid = jnp.zeros((1, 6), jnp.int32), jnp.array([[True] * 4 + [False] * 2])
    >>> [round(float(x), 4) for x in (lm_loss(Uniform(), ids), lm_loss(Uniform(), ids, valid), jnp.log(10.0))]
    [2.3026, 2.3026, 2.3026]
  """
  logits = model(ids)[:, :-1].astype(jnp.float32)
  targets = ids[:, 1:]
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  if valid is None:
    return jnp.mean(nll)
  w = valid[:, 1:].astype(jnp.float32)
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


# --------------------------------------------------------------------------------------------------------- step --


@functools.cache
def train_step(loss: Callable[[Any, Any], tuple[jax.Array, Mapping[str, jax.Array]]], *,
               before_update: Callable[..., Mapping[str, jax.Array]] | None = None,
               after_update: Callable[..., Mapping[str, jax.Array]] | None = None,
               fast_math_on_cpu: bool = False) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
  """The compiled training step ``step(graphdef, state, batch, out_shardings=None) -> (new_state, metrics)``.

  On ``model, optimizer = nnx.merge(graphdef, state)`` it computes ``(ℓ, metrics), g = value_and_grad(loss,
  has_aux=True)(model, batch)``, then ``metrics |= before_update(model, optimizer, g, batch)`` (e.g. the gradient
  norm, or a learning rate written into the optimizer's injected hyperparameters), ``optimizer.update(model, g)``,
  ``metrics |= after_update(model, optimizer, batch)``, and returns ``nnx.state((model, optimizer))`` and the
  metrics, in that order of operations. ``state`` is donated. ``out_shardings`` (a tuple of shardings, one per leaf
  of ``state``, hashable) pins the new state to them (on a mesh: the old state's placement, which ``AxisType.Auto``
  would otherwise leave to XLA). With ``fast_math_on_cpu`` it is compiled with :data:`proxjax.CPU_FAST_MATH` when
  called on CPU arrays (:func:`proxjax.core.xla.jit_fast_on_cpu`).

  Cached: equal arguments give the same compiled function, so every run of a recipe reuses one compilation per
  shape.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> def loss(model, x):
    ...   value = jnp.mean(model(x) ** 2)
    ...   return value, {"loss": value}
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> graphdef, state = nnx.split((model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)))
    >>> state, metrics = train_step(loss)(graphdef, state, jnp.ones((4, 2)))
    >>> sorted(metrics), train_step(loss) is train_step(loss)
    (['loss'], True)
  """

  def step(graphdef, state, batch, out_shardings=None):
    model, optimizer = nnx.merge(graphdef, state)
    (_, metrics), grads = nnx.value_and_grad(loss, has_aux=True)(model, batch)
    metrics = dict(metrics)
    if before_update is not None:
      metrics.update(before_update(model, optimizer, grads, batch))
    optimizer.update(model, grads)
    if after_update is not None:
      metrics.update(after_update(model, optimizer, batch))
    new_state = nnx.state((model, optimizer))
    if out_shardings is not None:
      leaves, treedef = jax.tree.flatten(new_state)
      new_state = jax.tree.unflatten(treedef, [jax.lax.with_sharding_constraint(x, sh)
                                               for x, sh in zip(leaves, out_shardings)])
    return new_state, metrics

  jit = xla.jit_fast_on_cpu if fast_math_on_cpu else jax.jit
  return jit(step, static_argnames=("graphdef", "out_shardings"), donate_argnames=("state",))


def optimizer_on(model: nnx.Module, tx: Any, mesh: Any = None,
                 init: Callable[[nnx.Optimizer], Any] | None = None) -> nnx.Optimizer:
  """The training state of every recipe, placed once: on ``mesh``, ``model``'s params move (in place) to their
  declared shardings (:func:`proxjax.core.sharding.place`); then ``nnx.Optimizer(model, tx, wrt=nnx.Param)``,
  ``init(optimizer)`` (e.g. setting an injected hyperparameter) and, on ``mesh``, the optimizer's state (moments,
  counts, hyperparameters) placed like the params its paths name (``nnx.optimizer.OptState``). The mesh may span
  several processes (each then builds only its devices' shards). Without a mesh: the optimizer, nothing moved.

  Example:
    >>> import optax
    >>> from proxjax.core.sharding import make_mesh
    >>> layer = nnx.Linear(8, 12, rngs=nnx.Rngs(0))
    >>> opt = optimizer_on(layer, optax.adam(1e-3), make_mesh())
    >>> opt.opt_state[0].mu["kernel"][...].sharding == layer.kernel[...].sharding
    True
  """
  if mesh is not None:
    sharding.place(model, mesh)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  if init is not None:
    init(optimizer)
  if mesh is not None:
    sharding.place(optimizer, mesh, nnx.optimizer.OptState)
  return optimizer


def scalars_on(values: Iterable[float], mesh: Any = None) -> tuple[Any, ...]:
  """``values`` as float32 scalar inputs of a step: host ``np.float32`` without a mesh; on ``mesh``, replicated over
  every device, each process building its own copy (:func:`proxjax.core.sharding.put`: every process passes the same
  values).

  Example:
    >>> from proxjax.core.sharding import make_mesh
    >>> lam, eps = scalars_on((0.5, 1e-8), make_mesh())
    >>> lam.dtype, lam.sharding.is_fully_replicated
    (dtype('float32'), True)
  """
  if mesh is None:
    return tuple(np.float32(v) for v in values)
  return tuple(sharding.put(np.float32(v), sharding.replicated(mesh)) for v in values)


# ------------------------------------------------------------------------------------------------------- recipe --


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What a training method tells :func:`run`: its compiled step and how to record, check and show each step.

  Attributes:
    name: the method (``"ProxSparse"``), for the progress bar and the messages.
    step: a :func:`train_step`.
    history: the per-step history, by name, in order (``record`` returns these keys).
    record: ``record(t, metrics) -> {name: value}``: the history entries of step ``t`` from its metrics (host
      Python scalars, plus ``"seconds"``: the wall time of the step).
    finite: metrics that must be finite (``FloatingPointError`` otherwise, naming the step).
    postfix: ``(label, metric, format)`` triples shown on the progress bar.
    hint: what to do about a non-finite loss, appended to the error.
  """

  name: str
  step: Callable[..., tuple[Any, dict[str, jax.Array]]]
  history: tuple[str, ...]
  record: Callable[[int, dict[str, Any]], Mapping[str, Any]]
  finite: tuple[str, ...] = ("loss",)
  postfix: tuple[tuple[str, str, str], ...] = (("loss", "loss", ".4f"),)
  hint: str = "lower the learning rate"

  def __post_init__(self):
    if not self.history or len(set(self.history)) != len(self.history):
      raise ValueError(f"history must name distinct entries, got {self.history!r}")
    if "loss" not in self.finite:
      raise ValueError(f"the loss must be among the metrics checked for finiteness, got {self.finite!r}")


class LoopResult(NamedTuple):
  """What :func:`run` did: ``history`` (name → one entry per step, resumed steps included), the number of steps
  done in all, and the step the run continued from (0 for a fresh run)."""
  history: dict[str, list[Any]]
  steps: int
  resumed_from: int


def digest(arrays: Iterable[ArrayLike]) -> str:
  """SHA-256 over the dtype, shape and bytes of each array, in order: the data part of a fingerprint. An array
  sharded over several processes' devices is gathered first (:func:`proxjax.core.distributed.gather`, a collective).

  Example:
    >>> import numpy as np
    >>> digest([np.arange(3)]) == digest([np.arange(3)]) != digest([np.arange(3)[::-1]])
    True
  """
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(distributed.gather(a))
    h.update(repr((a.dtype.str, a.shape)).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _structure(state: Any) -> str:
  """SHA-256 of the paths, shapes and dtypes of the training state: a checkpoint restores only into the same one."""
  return hashlib.sha256(repr([(jax.tree_util.keystr(p), tuple(x.shape), str(x.dtype))
                              for p, x in jax.tree_util.tree_flatten_with_path(state)[0]]).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------------- resume --


def _load_progress(state_dir: str, fingerprint: dict[str, Any], name: str) -> dict[str, Any] | None:
  path = os.path.join(state_dir, STATE_FILE)
  if not os.path.exists(path):
    legacy = [f for f in sorted(os.listdir(state_dir)) if f in _LEGACY
              or (f.startswith("step-") and os.path.isfile(os.path.join(state_dir, f, "progress.json")))]
    if legacy:
      raise ValueError(f"state directory {state_dir} holds the resume state of an older proxjax ({', '.join(legacy)}), "
                       "which this version cannot continue; delete it to start over")
    return None
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  want = json_roundtrip(fingerprint)
  old = saved.get("fingerprint") or {}
  if old != want:
    diff = sorted(k for k in set(old) | set(want) if old.get(k) != want.get(k))
    raise ValueError(f"state directory {state_dir} belongs to a different {name} run (differs in: "
                     f"{', '.join(diff)}); use another state directory or delete this one to start over")
  return saved


def _save_progress(state_dir: str, step: int, state: Any, history: dict[str, list[Any]],
                   fingerprint: dict[str, Any]) -> None:
  """Saves ``state`` as ``state_dir/step_NNNNNNN`` (orbax), then :data:`STATE_FILE` naming it, then removes older
  checkpoints. Across processes the orbax save is collective (each process writes its own shards of the state into
  the shared directory; process 0 finalizes it, orbax's barriers around it) and process 0 alone removes and writes
  the rest, the others waiting for it (:func:`proxjax.core.distributed.on_coordinator`): when this returns on any
  process, the state file names a complete checkpoint."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel  (slow to import)

  name = f"step_{step:07d}"
  path = os.path.join(os.path.abspath(state_dir), name)
  distributed.on_coordinator(lambda: shutil.rmtree(path) if os.path.exists(path) else None,
                             f"removing an unfinished save {path}")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, state)  # atomic: orbax finalizes by renaming a temporary directory

  def finish() -> None:
    write_json(os.path.join(state_dir, STATE_FILE), {"version": STATE_VERSION, "fingerprint": fingerprint,
                                                     "step": step, "checkpoint": name, "history": history})
    for old in os.listdir(state_dir):  # earlier checkpoints (and unfinished orbax temporaries) are no longer needed
      if old.startswith("step_") and old != name:
        shutil.rmtree(os.path.join(state_dir, old), ignore_errors=True)

  distributed.on_coordinator(finish, f"writing {os.path.join(state_dir, STATE_FILE)}")


def _restore(state_dir: str, saved: dict[str, Any], like: Any) -> Any:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  path = os.path.join(os.path.abspath(state_dir), saved["checkpoint"])
  if not os.path.isdir(path):
    raise ValueError(f"{os.path.join(state_dir, STATE_FILE)} names checkpoint {saved['checkpoint']}, which is "
                     "missing; delete the state directory to start over")
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, target)


def _usable(state: Any) -> bool:
  return not any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state))


# --------------------------------------------------------------------------------------------------------- loop --


def run(recipe: Recipe, model: nnx.Module, optimizer: nnx.Optimizer,
        batches: Callable[[int], Any] | Iterable[Any], *, steps: int | None = None,
        state_dir: str | os.PathLike[str] | None = None, save_every: int = 0,
        fingerprint: Mapping[str, Any] | None = None, pin_shardings: bool = False, progress: bool = True,
        callback: Callable[[int, dict[str, Any]], None] | None = None) -> LoopResult:
  """Trains ``(model, optimizer)`` in place: step ``t = 0 … steps−1`` runs ``recipe.step`` on the batch of step ``t``.

  Each step's metrics come to the host, are checked (``recipe.finite``), recorded (``recipe.record``), shown on the
  progress bar and passed to ``callback(t, metrics)``; with ``state_dir`` the state is saved every ``save_every``
  steps and after the last one, and an earlier save of the same run is continued from (see the module docs). When
  the loop ends, normally or not, ``model`` and ``optimizer`` hold the state after the last step that ran (after a
  ``FloatingPointError``: that step's, non-finite; the state before it was donated to it).

  Args:
    recipe: the method (:class:`Recipe`).
    model: the NNX model; ``optimizer``: its ``nnx.Optimizer`` (the optax chain of the method).
    batches: ``batches(t)``, the batch of step ``t`` (a pytree of arrays, the ``batch`` of the recipe's loss), or an
      iterable of batches, one per step (on resume its first items are skipped).
    steps: the number of steps (``None``: until the iterable ends; not with ``state_dir``).
    state_dir: resume directory (``None``: nothing saved).
    save_every: save every this many steps (0: only after the last one), with ``state_dir``.
    fingerprint: JSON data identifying the run (settings, data :func:`digest`, ``run_info``); with the method's
      name, the format version and the structure of the training state it must match a saved run to continue it.
    pin_shardings: keep every leaf of the state on its current sharding (on a mesh).
    progress: a tqdm bar with ``recipe.postfix``.
    callback: called after every step with the host metrics.

  Returns:
    A :class:`LoopResult`.

  Raises:
    ValueError: bad ``steps`` or ``save_every``, or a ``state_dir`` of another run.
    FloatingPointError: a metric of ``recipe.finite`` became NaN or infinite (the message names the step; with
      ``state_dir`` the last save is intact).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> def loss(model, batch):
    ...   x, y = batch
    ...   value = jnp.mean((model(x) - y) ** 2)
    ...   return value, {"loss": value}
    >>> recipe = Recipe("demo", train_step(loss), ("losses",), lambda t, m: {"losses": m["loss"]})
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    >>> r = run(recipe, model, optimizer, lambda t: (jnp.ones((4, 2)), jnp.zeros((4, 1))), steps=3, progress=False)
    >>> r.steps, len(r.history["losses"]), r.history["losses"][-1] < r.history["losses"][0]
    (3, 3, True)
  """
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 0):
    raise ValueError(f"steps must be an int >= 0, got {steps!r}")
  if isinstance(save_every, bool) or not isinstance(save_every, int | np.integer) or save_every < 0:
    raise ValueError(f"save_every must be an int >= 0 (0: only after the last step), got {save_every!r}")
  if state_dir is not None and steps is None:
    raise ValueError("resuming (state_dir) needs a known number of steps")
  graphdef, state = nnx.split((model, optimizer))
  # Every leaf committed to where it is: a state that mixes committed and uncommitted arrays (e.g. one hyperparameter
  # placed with device_put) would come back from step 0 all committed, and step 1 would compile a second time.
  state = jax.tree.map(lambda x: x if getattr(x, "committed", True) else jax.device_put(x, x.sharding), state)
  out_shardings = tuple(x.sharding for x in jax.tree.leaves(state)) if pin_shardings else None
  history: dict[str, list[Any]] = {k: [] for k in recipe.history}
  start = 0
  saved = None
  if state_dir is not None:
    state_dir = os.fspath(state_dir)
    fingerprint = {**(fingerprint or {}), "version": STATE_VERSION, "method": recipe.name,
                   "state": _structure(state)}
    if distributed.process_count() > 1:  # every process must read what process 0 wrote there (or none keeps state)
      has = distributed.broadcast_int(os.path.exists(os.path.join(state_dir, STATE_FILE)))
      state_dir = distributed.resume_directory(state_dir, [STATE_FILE] if has else [], bool(has),
                                               f"a {recipe.name} training state")
    else:
      os.makedirs(state_dir, exist_ok=True)
  if state_dir is not None:
    saved = _load_progress(state_dir, fingerprint, recipe.name)
    if saved is not None:
      state = _restore(state_dir, saved, state)
      history = {k: list(saved["history"][k]) for k in recipe.history}
      start = int(saved["step"])
  if callable(batches):
    batch_of = batches
  else:
    rest = itertools.islice(iter(batches), start, None)
    batch_of = lambda _: next(rest)  # noqa: E731
  done = start
  bar = tqdm(total=steps, initial=start, desc=recipe.name, unit="step", disable=not progress)
  try:
    for t in range(start, steps) if steps is not None else itertools.count(start):
      try:
        batch = batch_of(t)
      except StopIteration:
        if steps is not None:
          raise ValueError(f"the batches ended after {t} of {steps} steps") from None
        break
      tic = time.perf_counter()
      state, metrics = recipe.step(graphdef, state, batch, out_shardings=out_shardings)
      host = {k: v.item() for k, v in jax.device_get(metrics).items()}
      host["seconds"] = time.perf_counter() - tic
      bad = [k for k in recipe.finite if not math.isfinite(host[k])]
      if bad:
        values = ", ".join(f"{k} {host[k]}" for k in recipe.finite)
        note = f"; the last save in {state_dir} is intact" if state_dir is not None else ""
        raise FloatingPointError(f"{recipe.name}: {' and '.join(bad)} not finite at step {t} ({values}); "
                                 f"{recipe.hint}{note}")
      for k, v in recipe.record(t, host).items():
        history[k].append(v)
      done = t + 1
      bar.update(1)
      if progress:
        bar.set_postfix({label: format(host[key], fmt) for label, key, fmt in recipe.postfix})
      if callback is not None:
        callback(t, host)
      if state_dir is not None and (done == steps or (save_every and done % save_every == 0)):
        _save_progress(state_dir, done, state, history, fingerprint)
  finally:
    bar.close()
    if _usable(state):
      nnx.update((model, optimizer), state)
  return LoopResult(history, done, start)
