"""A re-implementation of ProxSparse's approximate 2:4 proximal solver, used as a baseline by ``bench_prox.py``.

ProxSparse (Liu et al., ICML 2025) learns 2:4 masks with the regularizer, per group of four weights,

  R(w) = |w1 w2 w3| + |w1 w2 w4| + |w1 w3 w4| + |w2 w3 w4|,

and applies ``prox_{lam R}(y) = argmin_w 1/2 ||w - y||^2 + lam R(w)`` after every optimizer step. Its released solver
is a heuristic, and this module reproduces it step by step (written from the paper's description of the approach):

1. take magnitudes ``a = |y|`` and remember the signs; sort ``a`` descending and remember the permutation;
2. build three candidates on the sorted magnitudes ``a1 >= a2 >= a3 >= a4``:

   * 2-sparse: ``(a1, a2, 0, 0)``;
   * 3-support: ``(w1, w2, w3, 0)`` from up to ``sweeps`` cyclic coordinate sweeps that start at zero and update
     ``w_i <- max(0, a_i - lam * dR/dw_i(w))`` with ``dR/dw1 = w2 w3`` etc., in the order ``w3, w2, w1``;
   * 4-support (dense): the same with ``dR/dw1 = w2 w3 + w2 w4 + w3 w4`` etc., in the order ``w4, w3, w2, w1``;

3. evaluate ``1/2 ||w - a||^2 + lam R(w)`` for each candidate in float32 and keep the lowest (ties go to the sparser
   candidate), then undo the sort and restore the signs.

The coordinate updates are Gauss-Seidel (each update sees the ones before it in the same sweep), as in the released
solver. The released code also stops the sweeps early once the summed absolute change over *all* groups of a tensor
drops below ``1e-8`` (a host-synchronizing check each sweep); :func:`proxsparse_prox_torch` does the same by default
(``tol=1e-8``). :func:`proxsparse_prox_jax` runs exactly ``sweeps`` sweeps by default (``tol=None``,
``lax.fori_loop``); with ``tol`` set it uses a ``lax.while_loop`` with the same global test. The JAX port sorts with
a fused 4-element sorting network by default (``sort="lax"`` gives the literal ``lax.sort`` port, same output, slower
on CPU), so that the baseline is not handicapped by XLA's generic sort.

Both solvers take a batch of groups shaped ``(G, 4)`` (the layout of a PyTorch ``weight.view(-1, 4)``: the four entries
of a group are contiguous) and compute in float32. :func:`objective` is a float64 NumPy objective for comparing
solutions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

__all__ = ["objective", "proxsparse_prox_jax", "proxsparse_prox_torch", "regularizer"]


# --------------------------------------------------------------------------------------------------------------------
# float64 reference objective
# --------------------------------------------------------------------------------------------------------------------


def regularizer(w: np.ndarray) -> np.ndarray:
  """Per-group 2:4 regularizer ``R(w)`` in float64 for ``w`` shaped ``(..., 4)``; returns shape ``(...)``."""
  a = np.abs(np.asarray(w, np.float64))
  a1, a2, a3, a4 = a[..., 0], a[..., 1], a[..., 2], a[..., 3]
  return a1 * a2 * a3 + a1 * a2 * a4 + a1 * a3 * a4 + a2 * a3 * a4


def objective(w: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
  """Per-group prox objective ``1/2 ||w - y||^2 + lam R(w)`` in float64.

  Args:
    w: candidate solutions, shape ``(..., 4)`` (any float dtype; promoted to float64).
    y: the prox inputs, same shape as ``w``.
    lam: the regularization strength.

  Returns:
    float64 array of shape ``w.shape[:-1]``.
  """
  w64 = np.asarray(w, np.float64)
  y64 = np.asarray(y, np.float64)
  if w64.shape != y64.shape or w64.shape[-1] != 4:
    raise ValueError(f"w and y must share a shape (..., 4), got {w64.shape} and {y64.shape}")
  return 0.5 * np.sum((w64 - y64) ** 2, axis=-1) + float(lam) * regularizer(w64)


# --------------------------------------------------------------------------------------------------------------------
# eager PyTorch (how ProxSparse runs it)
# --------------------------------------------------------------------------------------------------------------------


def _relu_sub(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
  """Non-negative soft threshold ``max(0, a - t)``."""
  return torch.clamp_min(a - t, 0.0)


def _torch_sweeps(a: torch.Tensor, lam: float, sweeps: int, tol: float | None, k: int) -> tuple[torch.Tensor, int]:
  """Support ``{0..k-1}`` candidate (k = 3 or 4): cyclic non-negative soft-thresholding from zero, last column first.

  Each update is ``w_i = max(0, a_i − λ·∂R/∂w_i)`` with ``∂R/∂w_i`` the sum of the pairwise products of the other
  support entries. Returns the candidate and the number of sweeps run.
  """
  w = torch.zeros_like(a)
  prev = torch.zeros_like(a) if tol is not None else None
  done = 0
  for _ in range(sweeps):
    done += 1
    if prev is not None:
      prev.copy_(w)
    for i in reversed(range(k)):
      o = [j for j in range(k) if j != i]
      grad = sum(w[:, o[x]] * w[:, o[y]] for x in range(len(o)) for y in range(x + 1, len(o)))
      w[:, i] = _relu_sub(a[:, i], lam * grad)
    if prev is not None and torch.sum(torch.abs(w - prev)).item() < tol:
      break
  return w, done


def _torch_objective(w: torch.Tensor, a: torch.Tensor, lam: float) -> torch.Tensor:
  """float32 per-group objective on non-negative ``w`` (as ProxSparse evaluates it)."""
  w1, w2, w3, w4 = w[:, 0], w[:, 1], w[:, 2], w[:, 3]
  reg = torch.abs(w1 * w2 * w3) + torch.abs(w1 * w2 * w4) + torch.abs(w1 * w3 * w4) + torch.abs(w2 * w3 * w4)
  return 0.5 * torch.sum((w - a) ** 2, dim=1) + lam * reg


def proxsparse_prox_torch(y: torch.Tensor, lam: float, sweeps: int = 100, tol: float | None = 1e-8,
                          info: dict | None = None) -> torch.Tensor:
  """ProxSparse's approximate 2:4 prox in eager PyTorch, vectorized over groups.

  Args:
    y: float32 tensor shaped ``(G, 4)``; each row is one group.
    lam: the regularization strength (a Python float).
    sweeps: maximum number of coordinate sweeps for the 3-support and dense candidates.
    tol: early exit once ``sum |w - w_prev|`` over all groups falls below ``tol`` (the released solver uses
      ``1e-8``); ``None`` always runs ``sweeps`` sweeps.
    info: if a dict, receives ``sweeps_3`` and ``sweeps_4``: the sweeps actually run for each candidate.

  Returns:
    float32 tensor shaped ``(G, 4)``: the approximate prox of each row.
  """
  if y.ndim != 2 or y.shape[1] != 4:
    raise ValueError(f"expected a (G, 4) tensor, got shape {tuple(y.shape)}")
  y = y.to(torch.float32)
  lam = float(lam)
  sign = torch.sign(y)
  a, perm = torch.sort(torch.abs(y), dim=1, descending=True)

  w2 = a.clone()
  w2[:, 2:] = 0.0
  w3, n3 = _torch_sweeps(a, lam, sweeps, tol, 3)
  w4, n4 = _torch_sweeps(a, lam, sweeps, tol, 4)
  if info is not None:
    info.update(sweeps_3=n3, sweeps_4=n4)

  objs = torch.stack([_torch_objective(w2, a, lam), _torch_objective(w3, a, lam), _torch_objective(w4, a, lam)])
  best = torch.argmin(objs, dim=0).unsqueeze(1)  # first minimum on ties: the sparser candidate
  w = torch.where(best == 0, w2, torch.where(best == 1, w3, w4))

  out = torch.empty_like(w)
  out.scatter_(1, perm, w)  # undo the sort: out[g, perm[g, k]] = w[g, k]
  return out * sign


# --------------------------------------------------------------------------------------------------------------------
# JAX, jitted
# --------------------------------------------------------------------------------------------------------------------


def _jax_relu_sub(a: jax.Array, t: jax.Array) -> jax.Array:
  return jnp.maximum(a - t, 0.0)


def _jax_sweep_3(w: tuple[jax.Array, ...], a: tuple[jax.Array, ...], lam: jax.Array) -> tuple[jax.Array, ...]:
  w1, w2, w3 = w
  w3 = _jax_relu_sub(a[2], lam * (w1 * w2))
  w2 = _jax_relu_sub(a[1], lam * (w1 * w3))
  w1 = _jax_relu_sub(a[0], lam * (w2 * w3))
  return w1, w2, w3


def _jax_sweep_4(w: tuple[jax.Array, ...], a: tuple[jax.Array, ...], lam: jax.Array) -> tuple[jax.Array, ...]:
  w1, w2, w3, w4 = w
  w4 = _jax_relu_sub(a[3], lam * (w1 * w2 + w1 * w3 + w2 * w3))
  w3 = _jax_relu_sub(a[2], lam * (w1 * w2 + w1 * w4 + w2 * w4))
  w2 = _jax_relu_sub(a[1], lam * (w1 * w3 + w1 * w4 + w3 * w4))
  w1 = _jax_relu_sub(a[0], lam * (w2 * w3 + w2 * w4 + w3 * w4))
  return w1, w2, w3, w4


def _jax_iterate(sweep, a: tuple[jax.Array, ...], lam: jax.Array, n: int, sweeps: int,
                 tol: float | None) -> tuple[jax.Array, ...]:
  """Runs ``sweep`` from zero on ``n`` coordinates: fixed count (fori_loop) or with the global early exit."""
  w0 = tuple(jnp.zeros_like(a[0]) for _ in range(n))
  if tol is None:
    return lax.fori_loop(0, sweeps, lambda _, w: sweep(w, a, lam), w0)

  def cond(state):
    i, _, delta = state
    return (i < sweeps) & (delta >= tol)

  def body(state):
    i, w, _ = state
    w_new = sweep(w, a, lam)
    delta = sum(jnp.sum(jnp.abs(u - v)) for u, v in zip(w_new, w))
    return i + 1, w_new, delta

  _, w, _ = lax.while_loop(cond, body, (jnp.int32(0), w0, jnp.float32(jnp.inf)))
  return w


def _jax_objective(w: tuple[jax.Array, ...], a: tuple[jax.Array, ...], lam: jax.Array) -> jax.Array:
  w1, w2, w3, w4 = w
  reg = jnp.abs(w1 * w2 * w3) + jnp.abs(w1 * w2 * w4) + jnp.abs(w1 * w3 * w4) + jnp.abs(w2 * w3 * w4)
  return 0.5 * sum((wi - ai) ** 2 for wi, ai in zip(w, a)) + lam * reg


def _sort4_desc(m: tuple[jax.Array, ...]) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """Sorts four magnitude columns descending with a 5-comparator network; returns (sorted, source column index)."""
  v = list(m)
  p = [jnp.full(m[0].shape, k, jnp.int32) for k in range(4)]
  for i, j in ((0, 1), (2, 3), (0, 2), (1, 3), (1, 2)):
    swap = v[i] < v[j]
    v[i], v[j] = jnp.where(swap, v[j], v[i]), jnp.where(swap, v[i], v[j])
    p[i], p[j] = jnp.where(swap, p[j], p[i]), jnp.where(swap, p[i], p[j])
  return tuple(v), tuple(p)


@functools.partial(jax.jit, static_argnames=("sweeps", "tol", "sort"))
def proxsparse_prox_jax(y: jax.Array, lam: jax.Array | float, sweeps: int = 100, tol: float | None = None,
                        sort: str = "network") -> jax.Array:
  """ProxSparse's approximate 2:4 prox in JAX (jitted; one compilation per shape and static argument).

  Args:
    y: float32 array shaped ``(G, 4)``; each row is one group.
    lam: the regularization strength (traced: changing it does not recompile).
    sweeps: number of coordinate sweeps for the 3-support and dense candidates.
    tol: ``None`` runs exactly ``sweeps`` sweeps with ``lax.fori_loop``; a float stops early, like the released
      solver, once ``sum |w - w_prev|`` over all groups falls below it (``lax.while_loop``).
    sort: how the magnitudes are sorted: ``"network"`` (default) uses a 5-comparator sorting network on the four
      columns, which XLA fuses into one elementwise pass; ``"lax"`` uses ``lax.sort`` along the row (what a direct
      port of ``torch.sort`` gives; on CPU it is markedly slower). Both give the same result up to the order of
      equal magnitudes, which does not change the output.

  Returns:
    float32 array shaped ``(G, 4)``: the approximate prox of each row.
  """
  if y.ndim != 2 or y.shape[1] != 4:
    raise ValueError(f"expected a (G, 4) array, got shape {y.shape}")
  if sort not in ("network", "lax"):
    raise ValueError(f"sort must be 'network' or 'lax', got {sort!r}")
  y = y.astype(jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)
  if sort == "network":
    a, perm = _sort4_desc(tuple(jnp.abs(y[:, k]) for k in range(4)))
  else:
    idx = lax.broadcasted_iota(jnp.int32, y.shape, 1)
    neg_sorted, perm_2d = lax.sort((-jnp.abs(y), idx), dimension=1, num_keys=1, is_stable=True)
    a = tuple(-neg_sorted[:, k] for k in range(4))
    perm = tuple(perm_2d[:, k] for k in range(4))
  zero = jnp.zeros_like(a[0])

  c2 = (a[0], a[1], zero, zero)
  c3 = _jax_iterate(_jax_sweep_3, a, lam, 3, sweeps, tol) + (zero,)
  c4 = _jax_iterate(_jax_sweep_4, a, lam, 4, sweeps, tol)

  o2, o3, o4 = (_jax_objective(c, a, lam) for c in (c2, c3, c4))
  # argmin with the first minimum winning on ties (the sparser candidate), NaN-free inputs assumed.
  pick3 = (o3 < o2) & (o3 <= o4)
  pick4 = (o4 < o2) & (o4 < o3)
  w = tuple(jnp.where(pick4, u4, jnp.where(pick3, u3, u2)) for u2, u3, u4 in zip(c2, c3, c4))

  # Undo the sort: output column j takes the sorted entry k with perm[:, k] == j (four selects per column).
  cols = []
  for j in range(4):
    col = zero
    for k in range(4):
      col = jnp.where(perm[k] == j, w[k], col)
    cols.append(col)
  return jnp.stack(cols, axis=1) * jnp.sign(y)


# --------------------------------------------------------------------------------------------------------------------
# self-check: python benchmarks/proxsparse_solver.py
# --------------------------------------------------------------------------------------------------------------------


def _self_check(groups: int = 1 << 14, seed: int = 0) -> None:
  """Sanity checks: lam = 0 is the identity, huge lam is top-2, and torch and JAX agree on random groups."""
  rng = np.random.default_rng(seed)
  y = rng.standard_normal((groups, 4), dtype=np.float32)
  yt = torch.from_numpy(y)

  for name, fn in (("torch", lambda v, l: proxsparse_prox_torch(torch.from_numpy(v), l).numpy()),
                   ("jax", lambda v, l: np.asarray(proxsparse_prox_jax(jnp.asarray(v), l)))):
    w0 = fn(y, 0.0)
    assert np.array_equal(w0, y), f"{name}: lam=0 is not the identity"
    w_big = fn(y, 1e12)
    keep = np.argsort(-np.abs(y), axis=1, kind="stable")[:, :2]
    top2 = np.zeros_like(y)
    np.put_along_axis(top2, keep, np.take_along_axis(y, keep, axis=1), axis=1)
    assert np.array_equal(w_big, top2), f"{name}: huge lam is not the top-2 projection"
    print(f"{name}: lam=0 -> identity OK; lam=1e12 -> top-2 OK")

  for lam in (0.1, 0.3, 1.0, 3.0):
    wt = proxsparse_prox_torch(yt, lam).numpy()
    wt_fixed = proxsparse_prox_torch(yt, lam, tol=None).numpy()
    wj = np.asarray(proxsparse_prox_jax(jnp.asarray(y), lam))
    wj_tol = np.asarray(proxsparse_prox_jax(jnp.asarray(y), lam, tol=1e-8))
    wj_lax = np.asarray(proxsparse_prox_jax(jnp.asarray(y), lam, sort="lax"))
    assert np.array_equal(wj, wj_lax), "JAX sorting network and lax.sort disagree"
    diff = np.max(np.abs(wt - wj), axis=1)
    bad = diff > 1e-5 * (1.0 + np.max(np.abs(y), axis=1))
    ot, oj = objective(wt, y, lam), objective(wj, y, lam)
    obj_gap = np.max(np.abs(ot - oj) / (1.0 + np.abs(ot)))
    print(f"lam={lam:<4}: torch vs jax max|dw|={diff.max():.2e}, groups beyond 1e-5: {int(bad.sum())}/{groups}, "
          f"max rel objective gap={obj_gap:.2e}; torch early-exit vs fixed max|dw|="
          f"{np.max(np.abs(wt - wt_fixed)):.2e}; jax tol vs fixed max|dw|={np.max(np.abs(wj_tol - wj)):.2e}")
    assert obj_gap < 1e-5, "torch and JAX solvers disagree"


if __name__ == "__main__":
  _self_check()
