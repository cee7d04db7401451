"""N:M group layout, masks, projections and checks.

Groups are ``m`` consecutive entries along ``axis`` (for a Flax kernel ``(d_in, d_out)``: ``axis=0``, the input axis,
which is what sparse tensor cores need). The group axis is split in place into ``(size // m, m)``; no transpose is
made, so every function here is one elementwise XLA fusion over the array.

Ties are broken the same way everywhere in proxjax: among equal magnitudes the **lower index within the group wins**.
NaN scores rank above every number, so a NaN is always kept and stays visible in the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from proxjax.core.pattern import check_nm

__all__ = ["check_nm", "nm_mask", "project_nm", "is_nm", "nm_rank", "group_axis", "split_groups", "merge_groups",
           "to_planar", "from_planar", "planar_entries"]


def group_axis(shape: tuple[int, ...], m: int, axis: int) -> int:
  """Validates that ``shape[axis]`` splits into groups of ``m`` and returns the normalized axis."""
  ndim = len(shape)
  if ndim == 0:
    raise ValueError("N:M groups need an array with at least one dimension, got a scalar")
  if not -ndim <= axis < ndim:
    raise ValueError(f"group axis {axis} is out of range for an array of shape {tuple(shape)}")
  axis = axis % ndim
  if shape[axis] % m:
    raise ValueError(
        f"the group axis {axis} of shape {tuple(shape)} has size {shape[axis]}, which is not divisible by m={m}")
  return axis


def split_groups(x: jax.Array, m: int, axis: int) -> jax.Array:
  """Reshapes ``axis`` of size ``L`` into ``(L // m, m)``: the within-group index sits at ``axis + 1``."""
  axis = group_axis(x.shape, m, axis)
  return x.reshape(x.shape[:axis] + (x.shape[axis] // m, m) + x.shape[axis + 1:])


def merge_groups(g: jax.Array, axis: int) -> jax.Array:
  """Inverse of :func:`split_groups` (``axis`` is the normalized group axis of the original array)."""
  return g.reshape(g.shape[:axis] + (g.shape[axis] * g.shape[axis + 1],) + g.shape[axis + 2:])


def to_planar(x: jax.Array, m: int = 4) -> jax.Array:
  """The rows of ``x`` (groups of ``m`` along axis 0) reordered entry-major: row ``i·(L/m) + g`` of the result is row
  ``m·g + i`` of ``x`` (entry ``i`` of group ``g``), so each entry of the groups is one contiguous block of rows.

  Example:
    >>> import jax.numpy as jnp
    >>> to_planar(jnp.arange(8), 4).tolist()
    [0, 4, 1, 5, 2, 6, 3, 7]
  """
  g = split_groups(x, m, 0)
  return jnp.swapaxes(g, 0, 1).reshape(x.shape)


def planar_entries(x: jax.Array, m: int = 4) -> jax.Array:
  """An array stored planar (:func:`to_planar`) as ``(m, L // m, ...)``: index ``i`` holds entry ``i`` of every group
  (a reshape, no copy).

  Example:
    >>> import jax.numpy as jnp
    >>> planar_entries(to_planar(jnp.arange(8), 4), 4)[1].tolist()  # the second entry of groups 0 and 1
    [1, 5]
  """
  group_axis(x.shape, m, 0)
  return x.reshape((m, x.shape[0] // m) + x.shape[1:])


def from_planar(x: jax.Array, m: int = 4) -> jax.Array:
  """Inverse of :func:`to_planar`.

  Example:
    >>> import jax.numpy as jnp
    >>> from_planar(to_planar(jnp.arange(8), 4), 4).tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
  """
  return jnp.swapaxes(planar_entries(x, m), 0, 1).reshape(x.shape)


def check_floating(x: jax.Array, what: str) -> None:
  """Raises ``ValueError`` unless ``x`` has a floating-point dtype (integer and boolean arrays are refused)."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{what} must be a floating-point array, got dtype {x.dtype}")


def nm_rank(scores: ArrayLike, m: int = 4, *, axis: int = 0) -> jax.Array:
  """Rank of each entry inside its group of ``m`` (0 = largest score; ties: lower index ranks first).

  ``rank_i = #{j : s_j > s_i} + #{j < i : s_j = s_i}``, a permutation of ``0..m-1`` in every group.
  """
  s = jnp.asarray(scores)
  check_floating(s, "scores")
  ax = group_axis(s.shape, m, axis)
  s = jnp.where(jnp.isnan(s), jnp.inf, s)
  g = split_groups(s, m, ax)
  si = jnp.expand_dims(g, ax + 2)  # entry i along ax + 1
  sj = jnp.expand_dims(g, ax + 1)  # entry j along ax + 2
  idx_shape = [1] * (g.ndim + 1)
  idx_shape[ax + 1] = m
  i = jnp.arange(m).reshape(idx_shape)
  j = jnp.moveaxis(i, ax + 1, ax + 2)
  beats = (sj > si) | ((sj == si) & (j < i))
  rank = jnp.sum(beats, axis=ax + 2, dtype=jnp.int32)
  return merge_groups(rank, ax)


def nm_mask(scores: ArrayLike, n: int = 2, m: int = 4, *, axis: int = 0) -> jax.Array:
  """Boolean mask keeping the ``n`` largest ``scores`` in every group of ``m`` consecutive entries along ``axis``.

  Ties are broken by position (lower index wins), so exactly ``n`` entries per group are kept, deterministically.

  Example:
    >>> import jax.numpy as jnp, proxjax
    >>> proxjax.nm_mask(jnp.array([3., 1., 3., 2.]))
    Array([ True, False,  True, False], dtype=bool)
  """
  check_nm(n, m)
  return nm_rank(scores, m, axis=axis) < n


def project_nm(x: ArrayLike, n: int = 2, m: int = 4, *, axis: int = 0) -> jax.Array:
  """Euclidean projection onto N:M sparsity: ``argmin_w ‖w − x‖²`` s.t. each group has at most ``n`` non-zeros.

  Keeps the ``n`` largest ``|x|`` in every group of ``m`` consecutive entries along ``axis`` (ties: lower index wins)
  and zeroes the rest. Works on any floating dtype and returns it.

  Example:
    >>> import jax.numpy as jnp, proxjax
    >>> proxjax.project_nm(jnp.array([0.5, -2., 1., 1.]))
    Array([ 0., -2.,  1.,  0.], dtype=float32)
  """
  x = jnp.asarray(x)
  check_floating(x, "project_nm input")
  return jnp.where(nm_mask(jnp.abs(x), n, m, axis=axis), x, jnp.zeros((), x.dtype))


def is_nm(x: ArrayLike, n: int = 2, m: int = 4, *, axis: int = 0) -> jax.Array:
  """Whether every group of ``m`` consecutive entries along ``axis`` has at most ``n`` non-zeros (a bool scalar).

  Example:
    >>> import jax.numpy as jnp, proxjax
    >>> bool(proxjax.is_nm(jnp.array([[1., 0.], [0., 2.], [0., 0.], [3., 4.]])))
    True
  """
  check_nm(n, m)
  x = jnp.asarray(x)
  check_floating(x, "is_nm input")
  ax = group_axis(x.shape, m, axis)
  nnz = jnp.sum(split_groups(x, m, ax) != 0, axis=ax + 1)
  return jnp.all(nnz <= n)
