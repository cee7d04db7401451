"""Slow, independent float64 brute-force reference for the 2:4 proximal operator.

For one group ``y`` in R^4 and ``lam >= 0`` this computes

    prox(y) = argmin_w  0.5 * ||w - y||^2 + lam * R(w),
    R(w) = |w1 w2 w3| + |w1 w2 w4| + |w1 w3 w4| + |w2 w3 w4|,

without any of the structural shortcuts a fast solver relies on (no "the support is a prefix of the sorted
magnitudes", no closed-form one-dimensional reductions, no threshold tests). It only uses facts that are
immediate from the objective:

* Signs: ``R`` depends on magnitudes only, so the minimizer has ``sign(w_i) = sign(y_i)`` (or ``w_i = 0``) and it is
  enough to solve for ``a = |y|`` over ``w >= 0`` and re-sign.
* Box: clipping ``w_i`` into ``[0, a_i]`` never increases either term, so the search is over ``[0, a]``.
* Scale: ``R`` is cubic, so with ``w = s v`` the objective is ``s^2 (0.5 ||v - y/s||^2 + s lam R(v))``, i.e.
  ``prox_{lam R}(y) = s * prox_{s lam R}(y / s)``. Every group is solved normalized to ``max |y| = 1`` with
  ``lam' = lam * max|y|`` and mapped back; the returned objective is then re-evaluated in the original units.

Every support of size >= 2 is enumerated. The six supports of size 2 have the closed form "keep those two entries"
(``R = 0`` there), objective ``0.5 * (sum of the squares of the two dropped entries)``. The four supports of size 3 and
the full support are searched numerically: ``w_i`` is confined to ``[0, a_i]`` for ``i`` in the support and to
``{0}`` outside it, and a multi-start bounded minimization is run with SciPy's L-BFGS-B and the analytic gradient.
Starts per support: ``0``, ``a``, ``a / 2``, the one-step shrinkage ``clip(a - lam' grad R(a))``, a few random points
in the box, and the best points of a coarse grid over the box (the "starting point refinement"). All starts of all
supports of one group are minimized in one stacked L-BFGS-B call (the objective is a sum of independent blocks, so
every block ends at a stationary point of its own problem), then the best few distinct end points of every support
are polished one by one with a tight tolerance and finally with guarded projected Newton steps (a step is only
accepted if it lowers the objective). The answer is the candidate with the lowest float64 objective.

The result is a feasible point, so its objective is an upper bound of the true minimum; a correct fast solver must
reach it up to rounding. Typical cost: a few tens of milliseconds per group on one CPU core.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
from scipy import optimize

__all__ = ["regularizer", "objective", "brute_force_prox", "brute_force_prox_batch"]

_SUPPORTS_2 = tuple(itertools.combinations(range(4), 2))
_SUPPORTS_SEARCHED = tuple(itertools.combinations(range(4), 3)) + ((0, 1, 2, 3),)
_TRIPLES = tuple(itertools.combinations(range(4), 3))
# For entry i: the three pairs of the other entries (gradient of e3) ...
_OTHER_PAIRS = tuple(tuple(p for p in itertools.combinations(range(4), 2) if i not in p) for i in range(4))
# ... and for the pair (i, j): the two remaining entries (Hessian of e3).
_REST = {(i, j): tuple(k for k in range(4) if k not in (i, j)) for i in range(4) for j in range(4) if i != j}

_N_RANDOM = 4
_GRID_POINTS = 7  # per coordinate: 0, 1/6, ..., 1 (includes 0, 1/2 and 1)
_N_GRID_STARTS = 4
_N_POLISH = 3


def regularizer(w: np.ndarray) -> np.ndarray:
  """R(w) over the last axis (size 4), in float64: the sum of the four triple products of magnitudes."""
  a = np.abs(np.asarray(w, np.float64))
  if a.shape[-1] != 4:
    raise ValueError(f"groups must have size 4 along the last axis, got shape {a.shape}")
  return sum(a[..., i] * a[..., j] * a[..., k] for i, j, k in _TRIPLES)


def objective(w: np.ndarray, y: np.ndarray, lam: np.ndarray | float) -> np.ndarray:
  """``0.5 * ||w - y||^2 + lam * R(w)`` per group (last axis of size 4), in float64.

  Args:
    w: candidate weights, shape ``(..., 4)`` (any float dtype; promoted to float64).
    y: the point being proximated, same shape (signed).
    lam: regularization strength, broadcastable to ``w.shape[:-1]``.

  Returns:
    The objective per group, float64 of shape ``w.shape[:-1]``.
  """
  w = np.asarray(w, np.float64)
  y = np.asarray(y, np.float64)
  lam = np.asarray(lam, np.float64)
  return 0.5 * np.sum((w - y) ** 2, axis=-1) + lam * regularizer(w)


# ----------------------------------------------------------------------------------------------------------------------
# Magnitude problem: f(v) = 0.5 ||v - a||^2 + lam * e3(v) on v >= 0 (e3 = R on the non-negative orthant).


def _f(v: np.ndarray, a: np.ndarray, lam: float) -> np.ndarray:
  """Objective per row of ``v`` (shape ``(K, 4)``), all entries assumed >= 0."""
  e3 = sum(v[:, i] * v[:, j] * v[:, k] for i, j, k in _TRIPLES)
  return 0.5 * np.sum((v - a) ** 2, axis=1) + lam * e3


def _grad(v: np.ndarray, a: np.ndarray, lam: float) -> np.ndarray:
  """Gradient of :func:`_f` per row: ``v - a + lam * e2(other three entries)``."""
  de3 = np.stack([sum(v[:, p] * v[:, q] for p, q in _OTHER_PAIRS[i]) for i in range(4)], axis=1)
  return v - a + lam * de3


def _hess(v: np.ndarray, lam: float) -> np.ndarray:
  """Hessian of :func:`_f` at one point ``v`` (shape ``(4,)``): 1 on the diagonal, ``lam * (v_k + v_l)`` at
  ``(i, j)``, ``{k, l}`` the two other entries."""
  h = np.eye(4)
  for (i, j), rest in _REST.items():
    h[i, j] = lam * sum(v[k] for k in rest)
  return h


def _de3(v: np.ndarray) -> np.ndarray:
  """Gradient of e3 at one point ``v`` (shape ``(4,)``)."""
  return np.array([sum(v[p] * v[q] for p, q in _OTHER_PAIRS[i]) for i in range(4)])


def _unit_grid(k: int) -> np.ndarray:
  t = np.linspace(0.0, 1.0, _GRID_POINTS)
  return np.stack(np.meshgrid(*([t] * k), indexing="ij"), axis=-1).reshape(-1, k)


_UNIT_GRIDS = {3: _unit_grid(3), 4: _unit_grid(4)}


def _starts(a: np.ndarray, lam: float, support: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
  """Starting points for one support: shape ``(K, 4)``, zero outside the support, inside the box."""
  u = np.zeros(4)
  u[list(support)] = a[list(support)]
  shrink = np.clip(u - lam * _de3(u), 0.0, u)
  grid = np.zeros((_UNIT_GRIDS[len(support)].shape[0], 4))
  grid[:, list(support)] = _UNIT_GRIDS[len(support)] * u[list(support)]
  fg = _f(grid, a, lam)
  best_grid = grid[np.argsort(fg, kind="stable")[:_N_GRID_STARTS]]
  rand = rng.uniform(0.0, 1.0, (_N_RANDOM, 4)) * u
  return np.concatenate([np.zeros((1, 4)), u[None], 0.5 * u[None], shrink[None], rand, best_grid], axis=0)


def _lbfgsb(x0: np.ndarray, fun: Callable, upper: np.ndarray, *, ftol: float, gtol: float, maxiter: int) -> np.ndarray:
  bounds = optimize.Bounds(np.zeros_like(upper), upper)
  res = optimize.minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"ftol": ftol, "gtol": gtol, "maxiter": maxiter, "maxcor": 20})
  return np.clip(res.x, 0.0, upper)


def _newton_polish(v: np.ndarray, a: np.ndarray, lam: float, u: np.ndarray, steps: int = 8) -> np.ndarray:
  """Guarded projected Newton on the coordinates that are not held at a bound by the gradient sign."""
  fv = _f(v[None], a, lam)[0]
  for _ in range(steps):
    g = _grad(v[None], a, lam)[0]
    free = (u > 0) & ~((v <= 0) & (g > 0)) & ~((v >= u) & (g < 0))
    if not free.any():
      break
    idx = np.flatnonzero(free)
    h = _hess(v, lam)[np.ix_(idx, idx)]
    try:
      step = np.linalg.solve(h, -g[idx])
    except np.linalg.LinAlgError:
      break
    cand = v.copy()
    cand[idx] += step
    cand = np.clip(cand, 0.0, u)
    fc = _f(cand[None], a, lam)[0]
    if not fc < fv:
      break
    v, fv = cand, fc
  return v


def _solve_magnitudes(a: np.ndarray, lam: float, rng: np.random.Generator) -> np.ndarray:
  """Minimizer of ``0.5 ||v - a||^2 + lam e3(v)`` over ``0 <= v <= a`` (``a`` normalized, ``lam > 0``)."""
  candidates = []
  for s in _SUPPORTS_2:
    v = np.zeros(4)
    v[list(s)] = a[list(s)]
    candidates.append(v)

  uppers, starts, owner = [], [], []
  for si, s in enumerate(_SUPPORTS_SEARCHED):
    u = np.zeros(4)
    u[list(s)] = a[list(s)]
    x0 = _starts(a, lam, s, rng)
    uppers.append(np.broadcast_to(u, x0.shape))
    starts.append(x0)
    owner.extend([si] * x0.shape[0])
  upper = np.concatenate(uppers, axis=0)
  x0 = np.concatenate(starts, axis=0)
  owner = np.asarray(owner)
  k = x0.shape[0]

  def stacked(x):
    v = x.reshape(k, 4)
    return float(np.sum(_f(v, a, lam))), _grad(v, a, lam).ravel()

  ends = _lbfgsb(x0.ravel(), stacked, upper.ravel(), ftol=1e-15, gtol=1e-11, maxiter=2000).reshape(k, 4)
  f_ends = _f(ends, a, lam)
  candidates.extend(ends)  # the stacked end points themselves are feasible candidates too

  def single(x):
    return float(_f(x[None], a, lam)[0]), _grad(x[None], a, lam)[0]

  for si in range(len(_SUPPORTS_SEARCHED)):
    u = upper[owner == si][0]
    rows = np.flatnonzero(owner == si)
    rows = rows[np.argsort(f_ends[rows], kind="stable")]
    chosen: list[np.ndarray] = []
    for r in rows:
      if len(chosen) == _N_POLISH:
        break
      if all(np.max(np.abs(ends[r] - c)) > 1e-7 for c in chosen):
        chosen.append(ends[r])
    for c in chosen:
      v = _lbfgsb(c, single, u, ftol=1e-16, gtol=1e-14, maxiter=2000)
      candidates.append(v)
      candidates.append(_newton_polish(v, a, lam, u))

  cand = np.stack(candidates)
  fc = _f(cand, a, lam)
  return cand[int(np.argmin(fc))]


def brute_force_prox(y: np.ndarray, lam: float, *, seed: int = 0) -> tuple[np.ndarray, float]:
  """Brute-force float64 prox of one group.

  Args:
    y: the group, shape ``(4,)`` (signed; finite).
    lam: regularization strength ``>= 0`` (``0`` returns ``y`` exactly).
    seed: seed of the random starting points (the result is deterministic for a given seed).

  Returns:
    ``(w, obj)``: the best minimizer found (float64, shape ``(4,)``, signs of ``y``) and
    ``objective(w, y, lam)`` evaluated in float64 in the original units.
  """
  y = np.asarray(y, np.float64)
  if y.shape != (4,):
    raise ValueError(f"a group has shape (4,), got {y.shape}")
  if not np.all(np.isfinite(y)):
    raise ValueError("brute_force_prox needs finite input")
  lam = float(lam)
  if not lam >= 0:
    raise ValueError(f"lam must be >= 0, got {lam}")
  a = np.abs(y)
  scale = float(np.max(a))
  if lam == 0 or scale == 0:
    w = y.copy()
  else:
    # Scale invariance: prox_{lam R}(y) = s * prox_{s lam R}(y / s), solved with s = max|y|.
    v = _solve_magnitudes(a / scale, lam * scale, np.random.default_rng(seed))
    w = np.copysign(v * scale, y)
    w = np.where(v == 0, 0.0, w)
  return w, float(objective(w, y, lam))


def brute_force_prox_batch(y: np.ndarray, lam: np.ndarray | float, *, seed: int = 0,
                           progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """:func:`brute_force_prox` over groups.

  Args:
    y: groups, shape ``(N, 4)``.
    lam: per-group strengths, shape ``(N,)`` or a scalar.
    seed: seed of the random starting points (the same for every group).
    progress: optional ``callback(done, total)`` called after every group.

  Returns:
    ``(w, obj)`` of shapes ``(N, 4)`` and ``(N,)``, float64.
  """
  y = np.asarray(y, np.float64)
  if y.ndim != 2 or y.shape[1] != 4:
    raise ValueError(f"groups must have shape (N, 4), got {y.shape}")
  lam = np.broadcast_to(np.asarray(lam, np.float64), (y.shape[0],))
  w = np.empty_like(y)
  obj = np.empty(y.shape[0])
  for i in range(y.shape[0]):
    w[i], obj[i] = brute_force_prox(y[i], lam[i], seed=seed)
    if progress is not None:
      progress(i + 1, y.shape[0])
  return w, obj
