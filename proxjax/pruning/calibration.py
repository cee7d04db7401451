r"""Streaming calibration statistics for layer-wise pruning.

For a linear layer with inputs :math:`x_t \in \mathbb{R}^{d_\mathrm{in}}` (one per calibration token, ``t = 1..n``)
and :math:`X = [x_1, \dots, x_n] \in \mathbb{R}^{d_\mathrm{in} \times n}`, the pruning objectives need

.. math::  H = X X^\top / n \quad (d_\mathrm{in} \times d_\mathrm{in},\ \text{the mean over tokens}),
           \qquad \|X_j\|_2 = \sqrt{\textstyle\sum_t x_{tj}^2} = \sqrt{n H_{jj}} \quad (\text{the Wanda norm}).

They are accumulated batch by batch with pure ``init / update / finalize`` functions on a :class:`HessianState`
(a pytree, so it can be carried through ``lax.scan``, stored per layer, or summed across devices with ``psum``).

Precision: the state holds the **sum** :math:`\sum_t x_t x_t^\top` in float32 (each batch's ``xᵀx`` is one float32
matmul with ``Precision.HIGHEST``, whatever the activation dtype) and the token count as an exact **int32**. Dividing
once at the end avoids the rescaling error of a running mean and keeps ``n`` exact (a float32 count stops being exact
at ``2**24 ≈ 16.8 M`` tokens; int32 is exact up to ``2**31 − 1`` tokens). Summing ``B`` batches adds a relative error
of order ``B·2**-24`` in the worst case (``√B·2**-24`` typically) on top of each batch's matmul rounding: about
``6e-5`` worst case for 1000 batches, far below what the pruning objectives resolve. float32 overflows only past
``3e38``, i.e. never for real activations.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["HessianState", "hessian_init", "hessian_update", "hessian_merge", "hessian_from_state", "input_norms"]


class HessianState(NamedTuple):
  """Running calibration statistics of one linear layer.

  Attributes:
    xtx: ``(d_in, d_in)`` float32, the sum over all tokens seen so far of ``x xᵀ`` (``= X Xᵀ``).
    count: int32 scalar, the number of tokens seen so far (``n``).
  """

  xtx: jax.Array
  count: jax.Array


def hessian_init(d_in: int) -> HessianState:
  """An empty :class:`HessianState` for a layer with ``d_in`` inputs (zero sum, zero tokens).

  Example:
    >>> import proxjax.pruning.calibration as cal
    >>> s = cal.hessian_init(3)
    >>> s.xtx.shape, s.xtx.dtype, int(s.count)
    ((3, 3), dtype('float32'), 0)
  """
  if not isinstance(d_in, int) or d_in < 1:
    raise ValueError(f"d_in must be a positive int, got {d_in!r}")
  return HessianState(jnp.zeros((d_in, d_in), jnp.float32), jnp.zeros((), jnp.int32))


@jax.jit
def _update(state: HessianState, x: jax.Array, mask: jax.Array | None) -> HessianState:
  d_in = state.xtx.shape[0]
  x = x.reshape(-1, d_in).astype(jnp.float32)
  if mask is None:
    count = jnp.asarray(x.shape[0], jnp.int32)
  else:
    keep = mask.reshape(-1)
    x = jnp.where(keep[:, None], x, 0.0)
    count = jnp.sum(keep, dtype=jnp.int32)
  xtx = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
  return HessianState(state.xtx + xtx, state.count + count)


def hessian_update(state: HessianState, x: ArrayLike, mask: ArrayLike | None = None) -> HessianState:
  """Adds a batch of layer inputs: ``xtx += Σ_t x_t x_tᵀ``, ``count += #tokens``.

  Args:
    state: the running :class:`HessianState`.
    x: activations of shape ``(..., d_in)`` (any leading shape, e.g. ``(batch, seq, d_in)``; a 1-D ``x`` is one token)
      and any floating dtype; cast to float32 before the ``Precision.HIGHEST`` matmul.
    mask: optional bool array of shape ``x.shape[:-1]``: only tokens where it is true are counted (e.g. to skip
      padding). ``None`` counts every token.

  Returns:
    The new state. Pure and jit-compiled: one compile per distinct shape/dtype of ``x`` (and of ``mask``).

  Example:
    >>> import jax.numpy as jnp, proxjax.pruning.calibration as cal
    >>> s = cal.hessian_update(cal.hessian_init(2), jnp.array([[1., 2.], [3., 4.]]))
    >>> s.xtx
    Array([[10., 14.],
           [14., 20.]], dtype=float32)
    >>> int(s.count)
    2
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"activations must be floating point, got dtype {x.dtype}")
  d_in = state.xtx.shape[0]
  if x.ndim == 0 or x.shape[-1] != d_in:
    raise ValueError(f"activations of shape {x.shape} do not end in d_in={d_in}")
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_ or mask.shape != x.shape[:-1]:
      raise ValueError(f"mask must be bool of shape {x.shape[:-1]}, got {mask.dtype} {mask.shape}")
  return _update(state, x, mask)


def hessian_merge(a: HessianState, b: HessianState) -> HessianState:
  """Combines the statistics of two disjoint token sets (sum of sums and counts; e.g. across data shards).

  Example:
    >>> import jax.numpy as jnp, proxjax.pruning.calibration as cal
    >>> s = cal.hessian_init(2)
    >>> a = cal.hessian_update(s, jnp.array([1., 2.]))
    >>> b = cal.hessian_update(s, jnp.array([3., 4.]))
    >>> int(cal.hessian_merge(a, b).count)
    2
  """
  return jax.tree.map(jnp.add, a, b)


def _is_concrete(v: jax.Array) -> bool:
  return not isinstance(v, jax.core.Tracer)


def hessian_from_state(state: HessianState) -> jax.Array:
  """The mean second-moment matrix ``H = X Xᵀ / n`` (``(d_in, d_in)``, float32).

  Raises ``ValueError`` if no token has been seen (``n = 0``). Under ``jit`` (a traced count) that check is
  impossible and ``n = 0`` gives NaN.

  Example:
    >>> import jax.numpy as jnp, proxjax.pruning.calibration as cal
    >>> s = cal.hessian_update(cal.hessian_init(2), jnp.array([[1., 2.], [3., 4.]]))
    >>> cal.hessian_from_state(s)
    Array([[ 5.,  7.],
           [ 7., 10.]], dtype=float32)
  """
  if _is_concrete(state.count) and int(state.count) <= 0:
    raise ValueError("hessian_from_state: no calibration tokens were accumulated (count = 0)")
  return state.xtx / state.count.astype(jnp.float32)


def input_norms(state: HessianState) -> jax.Array:
  """The Wanda input norms ``‖X_j‖₂ = sqrt(Σ_t x_tj²) = sqrt(n·H_jj)`` over all tokens seen (``(d_in,)`` float32).

  Example:
    >>> import jax.numpy as jnp, proxjax.pruning.calibration as cal
    >>> s = cal.hessian_update(cal.hessian_init(2), jnp.array([[3., 0.], [4., 1.]]))
    >>> cal.input_norms(s)
    Array([5., 1.], dtype=float32)
  """
  return jnp.sqrt(jnp.maximum(jnp.diagonal(state.xtx), 0.0))
