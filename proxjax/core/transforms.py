"""optax gradient transformations for N:M (2:4) sparse training.

* :func:`prox_24_update`: proximal step on the 2:4 regularizer, ``p ← prox_{η λ R}(p + u)``;
* :func:`project_nm_update`: hard projection onto N:M sparsity, ``p ← project_nm(p + u)``;
* :func:`masked_updates`: elementwise masking of updates, to fine-tune with a fixed sparsity pattern.

All three act on the *final* update of a chain, so they go **last**::

  tx = optax.chain(optax.adam(lr), proxjax.prox_24_update(lam, lr))

They work with any optax chain, under ``jax.jit``, and with ``nnx.Optimizer(model, tx, wrt=nnx.Param)``: at init it
passes the state with its ``nnx.Variable`` wrappers, at update time the pure arrays (``nnx.as_pure``); both are
accepted (Variables are unwrapped; see :mod:`proxjax.core.spec`).

Exactness of zeros: :func:`prox_24_update` and :func:`project_nm_update` return the update ``d = w − p`` where ``w``
is the target (prox or projection of ``z = p + u``), and ``optax.apply_updates`` computes ``p + d``. Where ``w = 0``
this is ``p + (−p) = 0`` **exactly** in IEEE arithmetic (negation is exact), so the sparsity pattern of ``w``
survives ``apply_updates`` in every float dtype, including bfloat16, also when XLA fuses it with the rest of the step.
Entries the target keeps as they are receive the incoming ``u`` itself (the projection's kept entries; every entry
when ``η_t λ_t ≤ 0``), so ``apply_updates`` gives bit for bit what the chain without this transform gives. Other
non-zero entries get ``w − p``. The update has dtype ``promote_types(p.dtype, u.dtype, float32)``: it holds ``−p``
exactly, and for bfloat16/float16 params ``apply_updates`` forms ``p + d`` in float32 and rounds once, which lands on
``w`` exactly whenever ``w − p`` is exact in float32 (always, unless the exponents of ``w`` and ``p`` differ by more
than about 16). For float32 params ``p + (w − p) = w`` exactly when ``w`` and ``p`` are within a factor of 2 of each
other (Sterbenz' lemma; the usual case for small steps), else up to one rounding.

A comparison such as ``w == p + u`` is deliberately not used to decide "unchanged": under ``jit`` XLA may recompute
``p + u`` in several fusions with different rounding (e.g. contracted into an FMA with the adam arithmetic).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.typing import ArrayLike

from proxjax.core import nm, xla
from proxjax.core import prox as _prox
from proxjax.core.prox import prox_24
from proxjax.core.spec import Spec, flat_spec, is_none, per_leaf

__all__ = [
    "MaskedUpdatesState",
    "Prox24UpdateState",
    "ProjectNMUpdateState",
    "masked_updates",
    "prox_24_update",
    "project_nm_update",
]

ScalarOrSchedule = float | ArrayLike | Callable[[jax.Array], ArrayLike]


class MaskedUpdatesState(NamedTuple):
  """State of :func:`masked_updates`.

  Attributes:
    masks: boolean masks (``True`` = trainable entry), structured like the pure params; ``None`` leaves pass
      through. Kept in the state so that under ``jit`` they are arguments, not constants baked into the program.
  """
  masks: Any


class Prox24UpdateState(NamedTuple):
  """State of :func:`prox_24_update`.

  Attributes:
    count: number of updates done so far (``int32``); ``λ_t`` and ``η_t`` are evaluated at it.
    multipliers: ``None`` (no per-leaf multipliers), or a pytree structured like the pure params holding a float32
      scalar ``c_i`` on every selected leaf (the leaf's prox strength is ``c_i η_t λ_t``) and ``None`` elsewhere. Kept
      in the state so that under ``jit`` they are arguments, and so that a restored state keeps the values computed at
      ``init`` (e.g. from the pretrained weights).
  """
  count: jax.Array
  multipliers: Any = None


class ProjectNMUpdateState(NamedTuple):
  """State of :func:`project_nm_update` (stateless)."""


def _need_params(name: str, params: Any) -> None:
  if params is None:
    raise ValueError(
        f"{name} needs the current params: call tx.update(updates, state, params) "
        "(nnx.Optimizer and optax training loops that pass params do this).")


def _check_same_tree(name: str, updates: Any, params: Any) -> None:
  su, sp = jax.tree.structure(nnx.as_pure(updates)), jax.tree.structure(nnx.as_pure(params))
  if su != sp:
    raise ValueError(f"{name}: updates and params have different tree structures:\n  updates: {su}\n  params:  {sp}")
  for (path, u), p in zip(jax.tree_util.tree_flatten_with_path(nnx.as_pure(updates))[0], jax.tree.leaves(params)):
    if jnp.shape(u) != jnp.shape(p):
      raise ValueError(f"{name}: the update at {jax.tree_util.keystr(path) or '<root>'} has shape {jnp.shape(u)}, but "
                       f"its param has shape {jnp.shape(p)}")


def _value(x: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  return jnp.asarray(x(count) if callable(x) else x, jnp.float32)


def _out_dtype(p: jax.Array, u: jax.Array) -> jnp.dtype:
  """Dtype of a replacing update: holds ``−p`` exactly, and at least float32 (see the module docs)."""
  return jnp.promote_types(jnp.promote_types(p.dtype, u.dtype), jnp.float32)


def _to_target(p: jax.Array, w: jax.Array, out: jnp.dtype) -> jax.Array:
  """The update ``w − p`` (in ``out``), so that ``apply_updates`` lands on ``w``; exactly ``−p`` where ``w = 0``."""
  return w.astype(out) - p.astype(out)


def _applied(p: jax.Array, u: jax.Array) -> jax.Array:
  """``p + u`` in ``p``'s dtype, as ``optax.apply_updates`` computes it."""
  return jnp.asarray(p + u).astype(p.dtype)


def _spans_devices(x: Any) -> bool:
  """Whether ``x`` is a concrete array spread over more than one device."""
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and len(x.sharding.device_set) > 1


@functools.partial(xla.jit_fast_on_cpu, static_argnames=("axis",))
def _prox_stacked(stack: jax.Array, strengths: jax.Array, axis: int) -> jax.Array:
  """``prox_leaf`` of every ``stack[k]`` with strength ``strengths[k]``, one after the other (``lax.map``): one
  module-level jitted function, so an eager call compiles once per (shape, dtype, axis), not once per call."""
  return jax.lax.map(lambda zs: _prox.prox_leaf(zs[0], zs[1], axis), (stack, strengths))


def _prox_many(zs: list[jax.Array], axes: list[int], lam: jax.Array, eta: jax.Array,
               fuse: bool = True, mults: list[jax.Array] | None = None) -> list[jax.Array]:
  """``prox_24(z, lam · c, eta, axis=ax)`` for every ``z`` (``c`` its multiplier, 1 without ``mults``); with
  ``fuse``, ONE solver per distinct (shape, dtype, axis).

  The prox is separable over groups, so the leaves of equal shape, dtype and axis (the 30 ``up_proj`` kernels of a
  30-layer LLaMA) are stacked and solved one after the other by one ``lax.map``: under ``jit`` the solver (a few
  hundred elementwise ops) is compiled once per distinct shape instead of once per leaf, each leaf keeps its natural
  layout (groups along ``ax``, the minor axis contiguous, which XLA:CPU vectorizes) and the solver's intermediates
  are one leaf in size, not the whole model (a fused solve over all groups of a model goes through memory 80-odd
  times). The results are bitwise those of the unfused solve. Without ``fuse`` each leaf is solved alone, which
  keeps its sharding.
  """
  if not fuse:
    if mults is None:
      return [prox_24(z, lam, eta, axis=ax) for z, ax in zip(zs, axes)]
    return [prox_24(z, lam * c, eta, axis=ax) for z, ax, c in zip(zs, axes, mults)]
  stacks: dict[tuple[Any, ...], list[int]] = {}
  for i, (z, ax) in enumerate(zip(zs, axes)):
    stacks.setdefault((z.shape, jnp.dtype(z.dtype), ax), []).append(i)
  out: list[jax.Array | None] = [None] * len(zs)
  for (_, dtype, ax), idx in stacks.items():
    nm.check_floating(zs[idx[0]], "prox_24 input")
    ct = _prox.compute_dtype(dtype)
    # Each leaf's strength exactly as prox_24(z, lam · c, eta) computes it.
    strengths = jnp.stack([(jnp.asarray(lam) if mults is None else jnp.asarray(lam * mults[i])) * eta
                           for i in idx]).astype(ct)

    if len(idx) == 1:
      out[idx[0]] = _prox.prox_leaf(zs[idx[0]], strengths[0], ax)
      continue
    solved = _prox_stacked(jnp.stack([zs[i] for i in idx]), strengths, ax)
    for k, i in enumerate(idx):
      out[i] = solved[k]
  return out


def _map_selected(name: str, updates: Any, params: Any, spec: Spec, m: int,
                  fn: Callable[[jax.Array, jax.Array, int], jax.Array]) -> Any:
  """Applies ``fn(u, p, axis)`` to the selected leaves, passing the others' updates through."""
  _need_params(name, params)
  _check_same_tree(name, updates, params)
  _, axes = flat_spec(params, spec, m=m)
  u_leaves, treedef = jax.tree.flatten(updates)
  p_leaves = jax.tree.leaves(params)
  new = [u if ax is None else fn(u, p, ax) for u, p, ax in zip(u_leaves, p_leaves, axes)]
  return jax.tree.unflatten(treedef, new)


def prox_24_update(hyperparams: ScalarOrSchedule, scaling: ScalarOrSchedule, *, spec: Spec = None,
                   fuse: bool | None = None, multipliers: Any = None) -> optax.GradientTransformationExtraArgs:
  """Proximal step on the 2:4 regularizer ``λ R``, applied to the final update of a chain (place it **last**).

  With ``u_t`` the incoming update (e.g. ``−η_t · adam_direction``) and ``p_t`` the params, every selected leaf
  becomes::

    p_{t+1} = prox_{η_t λ_t R}(p_t + u_t) = argmin_w ½‖w − (p_t + u_t)‖² + η_t λ_t R(w),

  i.e. the returned update is ``prox_24(p_t + u_t, λ_t, η_t) − p_t`` (groups along the leaf's spec axis), and the other
  leaves' updates pass through. ``R`` is the 2:4 regularizer (:func:`proxjax.regularizer_24`), ``λ_t =
  hyperparams(t)`` and ``η_t = scaling(t)`` (or constants), ``t`` the number of previous updates.

  Choose ``scaling`` explicitly:

  * **proximal gradient** on ``f + λ R``: ``scaling`` = the learning rate (the same schedule as the optimizer), so the
    per-step shrinkage is ``lr · λ`` and ``λ`` is the weight of ``R`` in the objective. With adam this is the usual
    (Euclidean-prox) proximal adam;
  * **ProxSparse-style**: ``scaling=1.0``, so ``λ_t`` alone is the prox strength of each step (independent of the
    learning rate), typically with an increasing ``λ`` schedule.

  A large enough ``η λ`` gives exactly 2:4 groups; ``η_t λ_t ≤ 0`` leaves the chain's update unchanged. A constant
  non-finite ``λ`` or ``η`` is refused here; a schedule that returns NaN makes the selected leaves' updates NaN (so
  the next loss is NaN and a training loop stops), it never silently switches the prox off. Zeros of the
  prox are exact zeros after ``optax.apply_updates`` (see the module docs; the replacing updates are at least
  float32). Selected leaves of equal shape, dtype and axis are stacked and solved one after the other by one
  ``lax.map``, so under ``jit`` the solver is compiled once per distinct shape rather than once per kernel (7 times
  for a LLaMA), at the cost of one temporary copy of those leaves.

  **Sharded params** (a device mesh, :mod:`proxjax.core.sharding`): batching copies the kernels into one stack, which
  XLA may gather or reshard; pass ``fuse=False`` to solve every leaf in its own shape and
  sharding (no communication: groups never straddle devices when kernels are split over outputs). The default
  ``None`` fuses unless a concrete param spans several devices; inside ``jit`` params are traced and carry no
  sharding under ``AxisType.Auto``, so say ``fuse=False`` explicitly there. Both give bitwise the same values.

  **Per-leaf strength** (``multipliers``): leaf ``i`` gets ``prox_{c_i η_t λ_t R}``, i.e. ``λ_t`` is multiplied by a
  fixed ``c_i ≥ 0`` (``c_i = 0`` switches the prox off for that leaf). ``multipliers`` is a callable ``(path, param)
  -> scalar`` evaluated **once, at init**, on every selected leaf (``path`` as in a callable spec; ``param`` is the
  leaf's value then, typically the pretrained weights), or a pytree (prefix) of scalars / ``None`` (= 1). The values
  live in the state (:class:`Prox24UpdateState`), so a restored state keeps them. Because ``R`` is homogeneous of
  degree 3, ``prox_{λR}(s y) = s · prox_{sλR}(y)``: with ``c_i = 1 / mean|W_i|`` (``W_i`` the leaf at init) the
  result scales with the weights (scaling a leaf by ``s`` scales its prox output by ``s``), so one ``λ`` is
  comparable across layers and models. Without multipliers the state's ``multipliers`` is ``None`` (as before).

  Args:
    hyperparams: ``λ``, a scalar or an optax schedule (a callable of the step count).
    scaling: ``η``, a scalar or an optax schedule; required (see above).
    spec: which leaves and along which axis (see :mod:`proxjax.core.spec`); default: 2-D ``kernel`` leaves, axis 0.
    fuse: solve the selected leaves of equal shape as one stack (``True``) or each alone (``False``, for sharded
      params); ``None``: batch unless a concrete param spans several devices.
    multipliers: optional per-leaf factors ``c_i`` of ``λ`` (see above): a callable ``(path, param) -> scalar``
      evaluated at init, or a pytree (prefix) of non-negative scalars or ``None``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`Prox24UpdateState`; ``update`` requires
    ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, proxjax
    >>> params = {'kernel': jnp.array([[1.], [2.], [3.], [4.]])}
    >>> tx = optax.chain(optax.sgd(0.1), proxjax.prox_24_update(1e3, 1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'kernel': jnp.zeros((4, 1))}, state, params)
    >>> optax.apply_updates(params, updates)['kernel'].ravel()
    Array([0., 0., 3., 4.], dtype=float32)
  """
  name = "prox_24_update"
  for what, value in (("hyperparams", hyperparams), ("scaling", scaling)):
    if (not callable(value) and not isinstance(value, jax.core.Tracer)
        and not bool(jnp.all(jnp.isfinite(jnp.asarray(value, jnp.float32))))):
      raise ValueError(f"{name}: {what} must be finite (or a schedule), got {value!r}")

  def init_fn(params):
    _need_params(name, params)
    pure, axes = flat_spec(params, spec, m=4)  # validate early
    mults = None if multipliers is None else _resolve_multipliers(multipliers, pure, axes)
    return Prox24UpdateState(count=jnp.zeros([], jnp.int32), multipliers=mults)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _need_params(name, params)
    _check_same_tree(name, updates, params)
    _, axes = flat_spec(params, spec, m=4)
    lam, eta = _value(hyperparams, state.count), _value(scaling, state.count)
    u_leaves, treedef = jax.tree.flatten(updates)
    p_leaves = jax.tree.leaves(params)
    sel = [i for i, ax in enumerate(axes) if ax is not None]
    mults = None
    if state.multipliers is not None:
      flat = jax.tree.leaves(state.multipliers, is_leaf=is_none)
      if len(flat) != len(p_leaves):
        raise ValueError(f"{name}: the state's multipliers have {len(flat)} leaves, the params {len(p_leaves)}")
      mults = [jnp.asarray(1.0 if flat[i] is None else flat[i], jnp.float32) for i in sel]
    batch = fuse if fuse is not None else not any(_spans_devices(p_leaves[i]) for i in sel)
    ws = _prox_many([_applied(p_leaves[i], u_leaves[i]) for i in sel], [axes[i] for i in sel], lam, eta, batch,
                    mults)
    new = list(u_leaves)
    for k, (i, w) in enumerate(zip(sel, ws)):
      u, p = u_leaves[i], p_leaves[i]
      out = _out_dtype(p, u)
      strength = lam * eta if mults is None else lam * eta * mults[k]
      # A NaN strength (e.g. a schedule gone wrong under jit) poisons the update instead of switching the prox off.
      new[i] = jnp.where(strength > 0, _to_target(p, w, out), jnp.where(jnp.isnan(strength), jnp.nan, u.astype(out)))
    return jax.tree.unflatten(treedef, new), state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _resolve_multipliers(multipliers: Any, pure: Any, axes: list[int | None]) -> Any:
  """The state's multiplier tree: a float32 scalar on every selected leaf (``None`` entries become 1), ``None`` on the
  others. Concrete values must be finite and non-negative."""
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
  if callable(multipliers):  # called on the selected leaves only
    values = [None if ax is None else multipliers(path, leaf) for (path, leaf), ax in zip(path_leaves, axes)]
  else:
    values = per_leaf(multipliers, pure, "prox_24_update multipliers (scalar or None entries)")
  out = []
  for (path, _), value, ax in zip(path_leaves, values, axes):
    if ax is None:
      out.append(None)
      continue
    c = jnp.asarray(1.0 if value is None else value, jnp.float32)
    where = jax.tree_util.keystr(path) or "<root>"
    if c.ndim:
      raise ValueError(f"prox_24_update: the multiplier for {where} must be a scalar, got shape {c.shape}")
    if not isinstance(c, jax.core.Tracer) and not (bool(jnp.isfinite(c)) and float(c) >= 0):
      raise ValueError(f"prox_24_update: the multiplier for {where} must be finite and >= 0, got {float(c)}")
    out.append(c)
  return jax.tree.unflatten(treedef, out)


def project_nm_update(n: int = 2, m: int = 4, *, spec: Spec = None) -> optax.GradientTransformationExtraArgs:
  """Hard N:M projection of the params after the chain's update (place it **last**).

  Every selected leaf becomes ``p_{t+1} = project_nm(p_t + u_t)``: the ``n`` largest magnitudes of each group of ``m``
  consecutive entries along the leaf's spec axis are kept, the rest set to exactly 0 (projected gradient descent;
  entries that are kept receive exactly the chain's update). Other leaves' updates pass through.

  Args:
    n: non-zeros kept per group.
    m: group size.
    spec: which leaves and along which axis (see :mod:`proxjax.core.spec`); default: 2-D ``kernel`` leaves, axis 0.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state :class:`ProjectNMUpdateState`); ``update`` requires
    ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, proxjax
    >>> params = {'kernel': jnp.array([[4.], [1.], [3.], [2.]])}
    >>> tx = optax.chain(optax.sgd(1.0), proxjax.project_nm_update())
    >>> updates, _ = tx.update({'kernel': jnp.zeros((4, 1))}, tx.init(params), params)
    >>> optax.apply_updates(params, updates)['kernel'].ravel()
    Array([4., 0., 3., 0.], dtype=float32)
  """
  nm.check_nm(n, m)
  name = "project_nm_update"

  def init_fn(params):
    _need_params(name, params)
    flat_spec(params, spec, m=m)
    return ProjectNMUpdateState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args

    def leaf(u, p, ax):
      out = _out_dtype(p, u)
      keep = nm.nm_mask(jnp.abs(_applied(p, u)), n, m, axis=ax)
      return jnp.where(keep, u.astype(out), -p.astype(out))

    return _map_selected(name, updates, params, spec, m, leaf), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _aligned_masks(masks: Any, tree: Any, what: str) -> list[Any]:
  """One mask (array or None) per leaf of ``tree``; ``masks`` may be a prefix of it with None subtrees."""
  pure = nnx.as_pure(tree)
  treedef = jax.tree.structure(pure)
  try:
    flat = treedef.flatten_up_to(jax.tree.broadcast(masks, pure, is_leaf=is_none))
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"masked_updates: the masks do not match the structure of the {what}; build them by mapping over the params "
        f"(e.g. jax.tree.map(lambda p: p != 0, params)). Details: {e}") from None
  for (path, leaf), mask in zip(jax.tree_util.tree_flatten_with_path(pure)[0], flat):
    if mask is not None and jnp.shape(mask) != jnp.shape(leaf):
      raise ValueError(
          f"masked_updates: the mask for {jax.tree_util.keystr(path) or '<root>'} has shape {jnp.shape(mask)}, but "
          f"the {what} leaf has shape {jnp.shape(leaf)}")
  return flat


def masked_updates(masks: Any) -> optax.GradientTransformationExtraArgs:
  """Elementwise mask on the final updates: ``u ← where(mask, u, 0)``, so masked entries never change.

  Place it **last** in the chain, after adam & co. Masking the *gradients* (first in the chain) is not enough:
  optimizer state built before the mask was fixed (adam moments, momentum) or transforms that add terms of their own
  (weight decay of a non-zero param, noise, lookahead, ...) still produce non-zero updates for masked entries. Masking
  the final update makes ``p_{t+1} = p_t`` exactly on masked entries for any chain, so pruned weights that are zero
  stay **exactly** zero. (``optax.masked`` selects whole leaves; this selects elements.) The masked weights must already
  be zero (e.g. after :func:`prox_24_update` or :func:`project_nm_update`, or ``params * mask``); this transform does
  not zero them.

  Args:
    masks: pytree matching the params (or a prefix of it) whose leaves are ``None`` (leaf passes through) or
      bool/0-1 arrays of the leaf's shape (non-zero = trainable). ``nnx.Variable`` wrappers are unwrapped. Or a
      function ``params -> masks`` called at init (e.g. the params' current non-zeros): a module-level function keeps
      a chain built once equal to itself across models, so a cached chain is compiled once.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`MaskedUpdatesState` (holding the masks as bool
    arrays). Mismatched trees or shapes raise a ``ValueError`` at init and at update time.

  Example:
    >>> import jax.numpy as jnp, optax, proxjax
    >>> params = {'w': jnp.array([1., 0., 2., 0.]), 'b': jnp.array([1.])}
    >>> tx = optax.chain(optax.sgd(1.0), proxjax.masked_updates({'w': params['w'] != 0, 'b': None}))
    >>> updates, _ = tx.update({'w': jnp.ones(4), 'b': jnp.ones(1)}, tx.init(params), params)
    >>> updates['w'], updates['b']
    (Array([-1.,  0., -1.,  0.], dtype=float32), Array([-1.], dtype=float32))
  """
  masks = masks if callable(masks) else nnx.as_pure(masks)

  def init_fn(params):
    flat = _aligned_masks(nnx.as_pure(masks(params)) if callable(masks) else masks, params, "params")
    # strong-typed copies: the training loop donates its state, and a weak type would recompile a resumed step
    bool_masks = [None if mk is None else jnp.array(mk, dtype=bool) for mk in flat]
    return MaskedUpdatesState(masks=jax.tree.unflatten(jax.tree.structure(nnx.as_pure(params)), bool_masks))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is not None:
      _check_same_tree("masked_updates", updates, params)
    flat = _aligned_masks(state.masks, updates, "updates")
    u_leaves, treedef = jax.tree.flatten(updates)
    new = [u if mk is None else jnp.where(mk, u, jnp.zeros((), u.dtype)) for u, mk in zip(u_leaves, flat)]
    return jax.tree.unflatten(treedef, new), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
