r"""One-shot N:M pruning baselines: magnitude, Wanda and SparseGPT.

Layout: a kernel is a Flax ``(d_in, d_out)`` array ``K``; N:M groups are ``m`` consecutive entries along axis 0 (the
input axis). The maths is written for ``W = Kᵀ`` (``(d_out, d_in)``, one row per output, groups along a row) as in the
spec. ``hessian`` is ``H = X Xᵀ / n`` (``(d_in, d_in)``, float32; see :mod:`proxjax.pruning.calibration`). Every top-n
selection uses :func:`proxjax.nm_mask` (ties: the lower index within the group wins). Masks are ``True`` where a
weight is **kept**.

* Magnitude: keep the ``n`` largest ``|W_ij|`` per group.
* Wanda (Sun et al., 2024): keep the ``n`` largest ``|W_ij|·‖X_j‖₂`` per group; ``‖X_j‖₂ ∝ sqrt(H_jj)``.
* SparseGPT (Frantar & Alistarh, 2023): the column sweep of ``fasterprune`` with N:M masks chosen on the fly and the
  pruning error of each column propagated to the later columns through the upper Cholesky factor of ``H⁻¹``
  (details in :func:`sparsegpt`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from proxjax.core import nm
from proxjax.core.pattern import check_blocksize

__all__ = ["magnitude_mask", "wanda_mask", "sparsegpt", "sparsegpt_unchecked", "sparsegpt_inverse_factor"]

_HIGHEST = jax.lax.Precision.HIGHEST


def check_kernel(kernel: jax.Array, m: int) -> None:
  if kernel.ndim != 2:
    raise ValueError(f"kernel must be a 2-D (d_in, d_out) array in Flax layout, got shape {kernel.shape}")
  nm.check_floating(kernel, "kernel")
  if kernel.shape[0] % m:
    raise ValueError(f"the input axis of the kernel (d_in = {kernel.shape[0]}, axis 0) is not divisible by m = {m}")


def check_hessian(hessian: jax.Array, kernel: jax.Array) -> None:
  if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
    raise ValueError(f"hessian must be a square (d_in, d_in) matrix, got shape {hessian.shape}")
  if hessian.shape[0] != kernel.shape[0]:
    raise ValueError(f"hessian {hessian.shape} does not match the kernel's input axis: kernel {kernel.shape} is "
                     f"(d_in, d_out) in Flax layout, so the hessian must be ({kernel.shape[0]}, {kernel.shape[0]}) "
                     "(a PyTorch weight (d_out, d_in) must be transposed first)")
  nm.check_floating(hessian, "hessian")


def magnitude_mask(kernel: ArrayLike, n: int = 2, m: int = 4) -> jax.Array:
  """Magnitude N:M mask: keeps the ``n`` largest ``|K_ji|`` in every group of ``m`` consecutive inputs (axis 0).

  Args:
    kernel: ``(d_in, d_out)`` weights, ``d_in`` divisible by ``m``.
    n, m: keep ``n`` of every ``m``.

  Returns:
    A bool ``(d_in, d_out)`` mask, ``True`` = kept (ties: lower input index wins).

  Example:
    >>> import jax.numpy as jnp, proxjax.pruning.baselines as bl
    >>> bl.magnitude_mask(jnp.array([[1.], [-3.], [2.], [0.5]]))[:, 0]
    Array([False,  True,  True, False], dtype=bool)
  """
  kernel = jnp.asarray(kernel)
  check_kernel(kernel, m)
  return nm.nm_mask(jnp.abs(kernel), n, m, axis=0)


@functools.partial(jax.jit, static_argnames=("n", "m"))
def wanda_unchecked(kernel: jax.Array, hessian: jax.Array, n: int, m: int) -> jax.Array:
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(hessian).astype(jnp.float32), 0.0))
  return nm.nm_mask(jnp.abs(kernel.astype(jnp.float32)) * norms[:, None], n, m, axis=0)


def wanda_mask(kernel: ArrayLike, hessian: ArrayLike, n: int = 2, m: int = 4) -> jax.Array:
  r"""Wanda N:M mask: keeps the ``n`` largest scores ``|W_ij|·‖X_j‖₂`` in every group of ``m`` inputs.

  In kernel layout the score of ``K[j, i]`` (input ``j``, output ``i``) is ``|K_ji|·sqrt(H_jj)``, which is
  proportional to ``|W_ij|·‖X_j‖₂`` (``‖X_j‖₂ = sqrt(n H_jj)``); groups run along axis 0. Dead inputs
  (``H_jj = 0``) score 0, so they are pruned first.

  Args:
    kernel: ``(d_in, d_out)`` weights, ``d_in`` divisible by ``m``.
    hessian: ``(d_in, d_in)`` ``H = X Xᵀ / n`` (only its diagonal is used).
    n, m: keep ``n`` of every ``m``.

  Returns:
    A bool ``(d_in, d_out)`` mask, ``True`` = kept (ties: lower input index wins).

  Example:
    >>> import jax.numpy as jnp, proxjax.pruning.baselines as bl
    >>> k = jnp.array([[1.], [-3.], [2.], [0.5]])
    >>> bl.wanda_mask(k, jnp.diag(jnp.array([9., 1., 1., 100.])))[:, 0]  # scores 3, 3, 2, 5
    Array([ True, False, False,  True], dtype=bool)
  """
  kernel, hessian = jnp.asarray(kernel), jnp.asarray(hessian)
  check_kernel(kernel, m)
  check_hessian(hessian, kernel)
  nm.check_nm(n, m)
  return wanda_unchecked(kernel, hessian, n, m)


# ----------------------------------------------------------------------------------------------------------------
# SparseGPT


def _sgpt_hessian(hessian: jax.Array, damp: jax.Array) -> tuple[jax.Array, jax.Array]:
  """SparseGPT's Hessian ``2H`` with dead inputs set to 1 on the diagonal and relative damping; also the dead mask."""
  h = 2.0 * hessian.astype(jnp.float32)
  diag = jnp.diagonal(h)
  dead = diag == 0
  diag = jnp.where(dead, 1.0, diag)
  diag = diag + damp * jnp.mean(diag)
  idx = jnp.arange(h.shape[0])
  return h.at[idx, idx].set(diag), dead


def _inverse_factor(h: jax.Array) -> jax.Array:
  """``U``, upper triangular with ``UᵀU = h⁻¹``, computed as in the reference: Cholesky of ``h``, the inverse from
  that factor, then the upper Cholesky factor of the inverse. Non-positive-definite input gives NaN entries."""
  eye = jnp.eye(h.shape[0], dtype=h.dtype)
  lower = jnp.linalg.cholesky(h)
  linv = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
  hinv = jnp.matmul(linv.T, linv, precision=_HIGHEST)  # h⁻¹ = L⁻ᵀ L⁻¹ (torch.cholesky_inverse)
  return jnp.triu(jnp.linalg.cholesky(hinv, upper=True))


@jax.jit
def _sgpt_factor(hessian: jax.Array, damp: jax.Array) -> jax.Array:
  return _inverse_factor(_sgpt_hessian(hessian, damp)[0])


def sparsegpt_inverse_factor(hessian: ArrayLike, damp: float = 0.01) -> jax.Array:
  """The factor ``U`` that SparseGPT sweeps with: upper triangular, ``UᵀU = (H_s)⁻¹`` (float32, ``(d_in, d_in)``).

  ``H_s = 2H``, with every dead input (``H_jj = 0``) set to 1 on the diagonal, plus ``damp·mean(diag H_s)`` on the
  diagonal. NaN entries mean ``H_s`` is not positive definite in float32.

  Example:
    >>> import jax.numpy as jnp, proxjax.pruning.baselines as bl
    >>> bl.sparsegpt_inverse_factor(jnp.diag(jnp.array([2., 0.])), damp=0.0)  # 2H = diag(4, 0) → diag(4, 1)
    Array([[0.5, 0. ],
           [0. , 1. ]], dtype=float32)
  """
  hessian = jnp.asarray(hessian)
  if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
    raise ValueError(f"hessian must be square, got shape {hessian.shape}")
  return _sgpt_factor(hessian, jnp.asarray(damp, jnp.float32))


def _sweep(k: jax.Array, u: jax.Array, n: int, m: int, bs: int, precision) -> tuple[jax.Array, jax.Array]:
  """The SparseGPT column sweep in kernel layout.

  ``k``: ``(D, d_out)`` float32 (row ``j`` of ``k`` is column ``j`` of ``W``), ``u``: ``(D, D)`` upper triangular,
  ``D`` a multiple of ``bs``, ``bs`` a multiple of ``m``. Three levels of lazy updates, all exact rearrangements of
  the reference's arithmetic: a column's error is applied at once to the rest of its group (``m`` rows), a group's
  errors to the rest of its block after the group (one ``(bs, m)·(m, d_out)`` product), a block's errors to all later
  rows after the block (one ``(D, bs)·(bs, d_out)`` product).
  """
  d, d_out = k.shape
  rows = jnp.arange(d)
  brows = jnp.arange(bs)

  def group_step(g, carry):
    k1, err1, keep1, u1 = carry
    j0 = g * m
    wg = jax.lax.dynamic_slice_in_dim(k1, j0, m, axis=0)  # (m, d_out): already updated by all earlier columns
    ug_rows = jax.lax.dynamic_slice_in_dim(u1, j0, m, axis=0)  # (m, bs): rows j0..j0+m of U's block
    ug = jax.lax.dynamic_slice_in_dim(ug_rows, j0, m, axis=1)  # (m, m), upper triangular
    dg = jnp.diagonal(ug)
    keep = nm.nm_mask(wg * wg / (dg * dg)[:, None], n, m, axis=0)  # chosen when the sweep reaches column j0
    errs = []
    for c in range(m):  # static unroll over the m columns of the group
      w = wg[c]
      q = jnp.where(keep[c], w, 0.0)
      e = (w - q) / dg[c]
      wg = wg - ug[c][:, None] * e[None, :]  # propagate to the rest of the group (rows < c see exact zeros)
      wg = wg.at[c].set(q)
      errs.append(e)
    eg = jnp.stack(errs)  # (m, d_out)
    k1 = jax.lax.dynamic_update_slice_in_dim(k1, wg, j0, axis=0)
    upd = jnp.matmul(ug_rows.T, eg, precision=precision)  # (bs, d_out): rows < j0 + m are discarded
    k1 = k1 - jnp.where((brows >= j0 + m)[:, None], upd, 0.0)
    err1 = jax.lax.dynamic_update_slice_in_dim(err1, eg, j0, axis=0)
    keep1 = jax.lax.dynamic_update_slice_in_dim(keep1, keep, j0, axis=0)
    return k1, err1, keep1, u1

  def block_step(b, carry):
    k, keep = carry
    i1 = b * bs
    k1 = jax.lax.dynamic_slice_in_dim(k, i1, bs, axis=0)
    u_rows = jax.lax.dynamic_slice_in_dim(u, i1, bs, axis=0)  # (bs, D)
    u1 = jax.lax.dynamic_slice_in_dim(u_rows, i1, bs, axis=1)  # (bs, bs)
    init = (k1, jnp.zeros_like(k1), jnp.zeros((bs, d_out), jnp.bool_), u1)
    k1, err1, keep1, _ = jax.lax.fori_loop(0, bs // m, group_step, init)
    k = jax.lax.dynamic_update_slice_in_dim(k, k1, i1, axis=0)
    upd = jnp.matmul(u_rows.T, err1, precision=precision)  # (D, d_out): only rows >= i1 + bs are applied
    k = k - jnp.where((rows >= i1 + bs)[:, None], upd, 0.0)
    keep = jax.lax.dynamic_update_slice_in_dim(keep, keep1, i1, axis=0)
    return k, keep

  return jax.lax.fori_loop(0, d // bs, block_step, (k, jnp.zeros((d, d_out), jnp.bool_)))


@functools.partial(jax.jit, static_argnames=("n", "m", "blocksize", "precision"))
def _sparsegpt(kernel, hessian, damp, n, m, blocksize, precision):
  d_in, d_out = kernel.shape
  h, dead = _sgpt_hessian(hessian, damp)
  u = _inverse_factor(h)
  ok = jnp.all(jnp.isfinite(u))
  k = jnp.where(dead[:, None], 0.0, kernel.astype(jnp.float32))
  bs = min(blocksize, d_in)
  pad = -d_in % bs
  if pad:  # zero weights and an identity factor: the padded columns carry no error and leave the others unchanged
    k = jnp.pad(k, ((0, pad), (0, 0)))
    u = jnp.pad(u, ((0, pad), (0, pad)))
    u = u.at[jnp.arange(d_in, d_in + pad), jnp.arange(d_in, d_in + pad)].set(1.0)
  k, keep = _sweep(k, u, n, m, bs, precision)
  k, keep = k[:d_in], keep[:d_in]
  k = jnp.where(ok, k, jnp.nan)
  return k.astype(kernel.dtype), keep, ok


def sparsegpt_unchecked(kernel: ArrayLike, hessian: ArrayLike, *, n: int = 2, m: int = 4, blocksize: int = 128,
                        damp: float | jax.Array = 0.01,
                        precision: jax.lax.Precision = _HIGHEST) -> tuple[jax.Array, jax.Array, jax.Array]:
  """:func:`sparsegpt` without the host-side check, usable under ``jit`` / ``vmap``: returns ``(kernel, mask, ok)``.

  ``ok`` (a bool scalar) is false when the damped Hessian was not positive definite in float32; the returned kernel
  is then all NaN, so a missed check cannot go unnoticed. Arguments as in :func:`sparsegpt`; ``damp`` may be traced.

  Example:
    >>> import jax.numpy as jnp, proxjax.pruning.baselines as bl
    >>> k, mask, ok = bl.sparsegpt_unchecked(jnp.ones((4, 1)), -jnp.eye(4))  # negative definite
    >>> bool(ok), bool(jnp.isnan(k).all())
    (False, True)
  """
  kernel, hessian = jnp.asarray(kernel), jnp.asarray(hessian)
  check_kernel(kernel, m)
  check_hessian(hessian, kernel)
  nm.check_nm(n, m)
  check_blocksize(blocksize, m)
  return _sparsegpt(kernel, hessian, jnp.asarray(damp, jnp.float32), n, m, blocksize, precision)


def sparsegpt(kernel: ArrayLike, hessian: ArrayLike, *, n: int = 2, m: int = 4, blocksize: int = 128,
              damp: float = 0.01, precision: jax.lax.Precision = _HIGHEST) -> tuple[jax.Array, jax.Array]:
  r"""SparseGPT N:M pruning of one linear layer (the reference ``fasterprune`` sweep, in JAX).

  With ``W = Kᵀ`` (``(d_out, d_in)``) and columns ``j = 0..d_in−1`` of ``W``:

  1. ``H_s = 2H`` (the factor only rescales: the damping is relative). Dead inputs (``H_jj = 0``) get
     ``(H_s)_jj = 1`` and their weights ``W_:j = 0``. Then ``(H_s)_jj += damp·mean(diag H_s)``.
  2. ``U`` = the upper Cholesky factor of ``H_s⁻¹`` (``UᵀU = H_s⁻¹``), computed as in the reference: Cholesky of
     ``H_s``, inverse from that factor, upper Cholesky factor of the inverse.
  3. Sweep ``j = 0, 1, ...``. When ``j`` is the first column of a group (``j ≡ 0 mod m``), keep in every row the ``n``
     largest of ``w_k² / U_kk²``, ``k = j..j+m−1``, on the **current** (already updated) weights; ``U_kk`` is the
     factor's diagonal, not ``[H_s⁻¹]_kk``. For each column: ``q_j = w_j`` if kept else 0, the error
     ``e_j = (w_j − q_j)/U_jj``, and ``w_k ← w_k − e_j U_jk`` for every later column ``k > j``; column ``j`` becomes
     ``q_j``. The updates are applied lazily in blocks of ``blocksize`` columns (inside a block column by column,
     after it in one matmul), which only reorders the arithmetic.

  ``blocksize`` must be a multiple of ``m``; ``d_in`` need not be a multiple of ``blocksize`` (the last block is
  shorter, as in the reference; internally it is padded with zero weights and an identity factor, which is exact).
  Computed in float32 in kernel layout; one compile per shape, ``n``, ``m``, ``blocksize`` and ``precision``.

  Differences from the reference code: ``n`` is the number **kept** per group (the reference's ``prunen`` is the
  number pruned; the same for 2:4), and ties in the mask score are broken by :func:`proxjax.nm_mask` (lower index
  kept) instead of ``torch.topk``'s unspecified order.

  Args:
    kernel: ``(d_in, d_out)`` weights (any floating dtype), ``d_in`` divisible by ``m``.
    hessian: ``(d_in, d_in)`` ``H = X Xᵀ / n``.
    n, m: keep ``n`` of every ``m`` consecutive inputs.
    blocksize: columns per lazy-update block (the reference uses 128).
    damp: relative diagonal damping (the reference's ``percdamp``).
    precision: precision of the error-propagation matmuls (the factor ``U`` is always computed with ``HIGHEST``).

  Returns:
    ``(new_kernel, mask)``: the pruned and updated ``(d_in, d_out)`` kernel in the input dtype (exactly zero where
    the mask is false, and at dead inputs), and the bool mask, ``True`` = kept, exactly ``n`` per group.

  Raises:
    ValueError: if the damped ``H_s`` is not positive definite in float32 (the Cholesky factorization produced NaN:
      ``H`` has NaN/inf entries, is not a second-moment matrix, or is too ill-conditioned for this ``damp``; a larger
      ``damp`` helps in the last case). Use :func:`sparsegpt_unchecked` under ``jit``.

  Example:
    >>> import jax, jax.numpy as jnp, proxjax, proxjax.pruning.baselines as bl
    >>> x = jax.random.normal(jax.random.key(0), (256, 8))
    >>> k = jax.random.normal(jax.random.key(1), (8, 3))
    >>> new, mask = bl.sparsegpt(k, x.T @ x / 256, blocksize=4)
    >>> bool(proxjax.is_nm(new, axis=0)), bool(jnp.all(new[~mask] == 0)), int(mask.sum())
    (True, True, 12)
  """
  new, mask, ok = sparsegpt_unchecked(kernel, hessian, n=n, m=m, blocksize=blocksize, damp=damp,
                                      precision=precision)
  if not bool(ok):
    raise not_positive_definite_error(damp)
  return new, mask


def not_positive_definite_error(damp: float) -> ValueError:
  return ValueError(
      "sparsegpt: the damped Hessian 2H + damp·mean(diag 2H)·I is not positive definite in float32 (its Cholesky "
      "factorization produced NaN). Check the Hessian for NaN/inf or negative eigenvalues; if it is merely "
      f"ill-conditioned, increase damp (now {damp}).")
