"""The 2:4 regularizer and its exact proximal operator (placeholder core, being replaced)."""

from __future__ import annotations

from typing import Any

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from proxjax import nm

__all__ = ["prox_24", "regularizer_24"]


def _compute_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _components(x: jax.Array, axis: int) -> tuple[jax.Array, ...]:
  g = nm.split_groups(x, 4, axis)
  return tuple(jnp.take(g, i, axis=axis + 1) for i in range(4))


def _solve_sorted(a1, a2, a3, a4, lam):
  """PLACEHOLDER: approximate dense solve by coordinate descent; replaced by the exact solver."""
  w = [a1, a2, a3, a4]
  for _ in range(50):
    for i in range(4):
      o = [w[j] for j in range(4) if j != i]
      e2 = o[0] * o[1] + o[0] * o[2] + o[1] * o[2]
      w[i] = jnp.maximum(0.0, (a1, a2, a3, a4)[i] - lam * e2)
  return tuple(w)


@functools.partial(jax.jit, static_argnames=("axis",))
def _prox_leaf(x: jax.Array, lam: jax.Array, axis: int) -> jax.Array:
  ct = _compute_dtype(x.dtype)
  y = tuple(c.astype(ct) for c in _components(x, axis))
  lam = jnp.asarray(lam, ct)
  w = _solve_sorted(*(jnp.abs(c) for c in y), lam)
  w = tuple(jnp.where(lam > 0, jnp.sign(yi) * wi, yi) for yi, wi in zip(y, w))
  return nm.merge_groups(jnp.stack(w, axis=axis + 1), axis).astype(x.dtype)


def prox_24(x: Any, hyperparams: ArrayLike, scaling: ArrayLike = 1.0, *, axis: int = 0) -> Any:
  """Exact proximal operator of the 2:4 regularizer (see module docs). Placeholder implementation."""
  lam = jnp.asarray(hyperparams, jnp.float32) * jnp.asarray(scaling, jnp.float32)

  def leaf(v):
    v = jnp.asarray(v)
    if not jnp.issubdtype(v.dtype, jnp.floating):
      raise ValueError(f"prox_24 needs floating-point input, got dtype {v.dtype}")
    ax = nm.group_axis(v.shape, 4, axis)
    return _prox_leaf(v, lam, ax)

  return jax.tree.map(leaf, x)


def regularizer_24(x: ArrayLike, *, axis: int = 0) -> jax.Array:
  """R(x) = sum over groups of the four triple products of magnitudes (float32 scalar)."""
  x = jnp.asarray(x)
  ax = nm.group_axis(x.shape, 4, axis)
  a1, a2, a3, a4 = (jnp.abs(c).astype(_compute_dtype(x.dtype)) for c in _components(x, ax))
  return jnp.sum(a1 * a2 * (a3 + a4) + a3 * a4 * (a1 + a2))
