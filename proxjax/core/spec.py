"""Sparsity specs: which leaves of a params pytree are made N:M sparse, and along which axis.

A *spec* assigns every array leaf of a params pytree either ``None`` (keep the leaf dense) or an ``int`` group axis
(groups of ``m`` consecutive entries run along that axis; every other axis is a batch axis). It is the single notion
of "what gets sparsified" shared by every proxjax function that walks a whole model. A spec may be given as

* ``None``: the default rule, :func:`default_spec` (2-D floating leaves named ``kernel``, grouped along axis 0);
* a callable ``spec(path, leaf) -> int | None``, where ``path`` is the key path of the leaf as produced by
  :func:`jax.tree_util.tree_flatten_with_path` (like the ``mask=`` callables of optax, but per leaf). It should
  decide from the path, shape and dtype only: inside ``jit`` (e.g. in an optax update) it receives tracers;
* a pytree with the structure of ``params`` (or a prefix of it, like optax masks) whose leaves are ``int`` or
  ``None``; an entry applies to every leaf of the matching params subtree. A bare ``int`` therefore means "every leaf
  along that axis".

Explicit axes work for any number of dimensions, which is how to express layouts the default rule refuses:

* stacked (scanned) layers, kernel ``(L, d_in, d_out)``: ``axis=1`` (each layer's input axis; ``L`` is a batch axis);
* multi-axis kernels such as ``nnx.LinearGeneral`` with kernel ``(in1, in2, out)``: pick the input axis whose
  consecutive entries should form the groups, e.g. ``axis=1`` (groups of 4 along ``in2``, for every ``in1`` and
  ``out``). Reshape such a kernel to 2-D ``(in1 * in2, out)`` to see which groups a sparse matmul would use: grouping
  along the last input axis, ``in2``, is the one that coincides with groups along axis 0 of the reshaped kernel.

Flax NNX states are supported: ``nnx.Variable`` wrappers (as in ``nnx.state(model, nnx.Param)``) are unwrapped first
(:func:`flax.nnx.as_pure`), so paths and structures are those of the pure state that ``nnx.Optimizer`` hands to optax
at update time. All path keys are of the standard JAX kinds; an NNX state uses ``DictKey`` throughout, including
integer keys for ``nnx.List`` entries, e.g. ``(DictKey('layers'), DictKey(0), DictKey('kernel'))``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["default_spec", "flat_spec", "path_names", "per_leaf", "resolve_spec", "Spec"]

KeyPath = Sequence[Any]
Spec = None | Callable[[KeyPath, Any], "int | None"] | Any
"""A sparsity spec: ``None`` (default rule), a callable ``(path, leaf) -> int | None`` or a pytree of ints/None."""

is_none = lambda v: v is None  # noqa: E731  (None is an empty pytree node in JAX; treat it as a spec leaf)


def _key_name(key: Any) -> Any:
  """The name carried by one path key (``DictKey.key``, ``GetAttrKey.name``, ``SequenceKey.idx``, ...)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def path_names(path: KeyPath) -> tuple[Any, ...]:
  """The names along a key path (``DictKey.key``, ``GetAttrKey.name``, ``SequenceKey.idx``), without the
  ``value`` keys of boxed ``nnx.Variable`` leaves.

  Example:
    >>> from jax.tree_util import DictKey, GetAttrKey
    >>> path_names((DictKey("layers"), DictKey(0), DictKey("kernel"), GetAttrKey("value")))
    ('layers', 0, 'kernel')
  """
  return tuple(n for n in (_key_name(k) for k in path) if n != "value")


def _leaf_name(path: KeyPath) -> Any:
  """Name of a leaf: its last path key, skipping trailing boxed-value keys (``GetAttrKey('value')`` of a wrapper)."""
  keys = list(path)
  while keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys.pop()
  return _key_name(keys[-1]) if keys else None


def _path_str(path: KeyPath) -> str:
  return jax.tree_util.keystr(tuple(path)) or "<root>"


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], Any]:
  shape = getattr(leaf, "shape", None)
  dtype = getattr(leaf, "dtype", None)
  if shape is None or dtype is None:
    arr = np.asarray(leaf)
    shape, dtype = arr.shape, arr.dtype
  return tuple(shape), dtype


def default_spec(path: KeyPath, leaf: Any) -> int | None:
  """The default sparsity rule: ``0`` for a floating 2-D leaf named ``kernel``, ``None`` for everything else.

  A Flax ``Linear``/``Dense`` kernel has shape ``(d_in, d_out)``; groups along axis 0 (the input axis) are the ones
  sparse tensor cores use. Embeddings (``embedding``), norm scales (``scale``) and biases are never selected. A
  ``kernel`` with more than two dimensions (stacked layers ``(L, d_in, d_out)``, ``nnx.LinearGeneral``) is
  ambiguous and raises a ``ValueError``: pass an explicit spec for it (see the module docs).

  Args:
    path: key path of the leaf, as from :func:`jax.tree_util.tree_flatten_with_path`. Trailing
      ``GetAttrKey('value')`` keys of boxed values (``nnx.Variable``) are skipped when reading the name.
    leaf: the array (anything with ``shape`` and ``dtype``).

  Returns:
    ``0`` or ``None``.

  Example:
    >>> import jax, jax.numpy as jnp, proxjax
    >>> params = {'dense': {'kernel': jnp.ones((8, 4)), 'bias': jnp.ones(4)}}
    >>> [proxjax.default_spec(p, x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    [None, 0]
  """
  if _leaf_name(path) != "kernel":
    return None
  shape, dtype = _shape_dtype(leaf)
  if not jnp.issubdtype(dtype, jnp.floating):
    return None
  if len(shape) > 2:
    raise ValueError(
        f"the kernel at {_path_str(path)} has shape {shape} (ndim {len(shape)} > 2), so its N:M group axis is "
        "ambiguous (stacked layers, multi-axis kernels). Pass an explicit spec, e.g. a callable returning 1 for this "
        "path for stacked layers (L, d_in, d_out), or None to keep it dense.")
  return 0 if len(shape) == 2 else None


def _check_axis(path: KeyPath, leaf: Any, axis: Any, m: int) -> int | None:
  """Validates one spec entry against its leaf and returns the normalized (non-negative) axis."""
  if axis is None:
    return None
  if isinstance(axis, (bool, np.bool_)):
    raise ValueError(f"the spec entry for {_path_str(path)} must be an int axis or None, got the bool {axis!r}")
  try:
    axis = operator.index(axis)
  except TypeError:
    raise ValueError(
        f"the spec entry for {_path_str(path)} must be an int axis or None, got {axis!r}") from None
  shape, dtype = _shape_dtype(leaf)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"the leaf at {_path_str(path)} is selected for N:M sparsity but has non-floating dtype {dtype}")
  ndim = len(shape)
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"the spec axis {axis} for {_path_str(path)} is out of range for its shape {shape}")
  axis %= ndim
  if shape[axis] % m:
    raise ValueError(
        f"the leaf at {_path_str(path)} has shape {shape}: its group axis {axis} has size {shape[axis]}, which is not "
        f"divisible by m={m}. Pass a spec with another axis, or None for this leaf to keep it dense.")
  return axis


def per_leaf(value: Any, pure: Any, what: str) -> list[Any]:
  """One entry per leaf of the pure pytree ``pure``, in leaf order, from a callable ``value(path, leaf)`` or a pytree
  ``value`` with the structure of ``pure`` (or a prefix of it: an entry applies to its whole subtree).

  Example:
    >>> per_leaf({"a": 1, "b": None}, {"a": [0.0, 0.0], "b": 0.0}, "spec")
    [1, 1, None]
  """
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
  if callable(value):
    return [value(path, leaf) for path, leaf in path_leaves]
  try:
    return treedef.flatten_up_to(jax.tree.broadcast(nnx.as_pure(value), pure, is_leaf=is_none))
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"the {what} must be a callable (path, leaf) -> entry or a pytree with the structure of params (or a prefix "
        f"of it); build it by mapping over params, e.g. jax.tree.map(..., params). Details: {e}") from None


def flat_spec(params: Any, spec: Spec = None, *, m: int = 4) -> tuple[Any, list[int | None]]:
  """Returns ``(pure_params, axes)``: Variables unwrapped, and one validated axis (or None) per leaf, in leaf order."""
  if params is None:
    raise ValueError("a sparsity spec needs the params pytree, got None")
  if not isinstance(m, int) or m < 1:
    raise ValueError(f"m must be a positive Python int, got {m!r}")
  params = nnx.as_pure(params)
  path_leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  entries = per_leaf(default_spec if spec is None else spec, params, "spec (int or None entries)")
  axes = [_check_axis(path, leaf, entry, m) for (path, leaf), entry in zip(path_leaves, entries)]
  return params, axes


def resolve_spec(params: Any, spec: Spec = None, *, m: int = 4) -> Any:
  """Resolves a sparsity spec into a pytree of validated, non-negative group axes (``int``) or ``None``.

  Every array leaf of ``params`` gets ``spec(path, leaf)`` (callable spec), the matching entry (pytree spec) or
  :func:`default_spec` (``spec=None``). An axis ``a`` means groups of ``m`` consecutive entries along ``a`` (all other
  axes are batch axes), so ``shape[a] % m == 0`` is required.

  Args:
    params: a params pytree; ``nnx.Variable`` wrappers (e.g. ``nnx.state(model, nnx.Param)``) are unwrapped.
    spec: ``None``, a callable ``(path, leaf) -> int | None`` or a pytree (prefix) of ``int | None``.
    m: the group size, for the divisibility check.

  Returns:
    A pytree with the structure of the pure params (``nnx.as_pure(params)``) whose leaves are ``int`` or ``None``.

  Raises:
    ValueError: on a non-matching spec tree, a non-int entry, a non-floating selected leaf, an out-of-range axis, an
      axis not divisible by ``m``, or (default rule) a ``kernel`` with more than two dimensions. Messages name the
      path.

  Example:
    >>> import jax.numpy as jnp, proxjax
    >>> params = {'dense': {'kernel': jnp.ones((8, 4)), 'bias': jnp.ones(4)}, 'embedding': jnp.ones((16, 8))}
    >>> proxjax.resolve_spec(params)
    {'dense': {'bias': None, 'kernel': 0}, 'embedding': None}
    >>> proxjax.resolve_spec({'stack': {'kernel': jnp.ones((3, 8, 4))}}, {'stack': {'kernel': -2}})
    {'stack': {'kernel': 1}}
  """
  params, axes = flat_spec(params, spec, m=m)
  return jax.tree.unflatten(jax.tree.structure(params), axes)
