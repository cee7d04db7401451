r"""The 2:4 regularizer and its exact proximal operator.

For a group :math:`w \in \mathbb{R}^4` the 2:4 regularizer is the sum of the four triple products of magnitudes

.. math::  R(w) = |w_1 w_2 w_3| + |w_1 w_2 w_4| + |w_1 w_3 w_4| + |w_2 w_3 w_4|,

which is zero iff at most two entries are non-zero. It is non-convex and cubic. Its proximal operator
:math:`\mathrm{prox}_{\lambda R}(y) = \mathrm{argmin}_w \tfrac12\|w - y\|^2 + \lambda R(w)` is separable over groups and
is computed here exactly, with a fixed number of elementwise operations per group (one fusion under ``jit``).

How the solver works (proofs in ``docs``-style comments below):

1. Signs and order: a minimizer keeps the signs of ``y`` and the order of ``|y|``, so we solve for the sorted
   magnitudes ``a1 >= a2 >= a3 >= a4 >= 0`` and un-sort (a stable sorting network; ties: lower index first). Each
   group is divided by ``a1`` and ``lambda`` multiplied by it (``prox_{λR}(s·y) = s·prox_{sλR}(y)``), so magnitudes
   from 1e-20 to 1e20 neither underflow nor overflow.
2. Only three supports can be optimal: ``{1,2}`` (keep the top two, objective ``(a3² + a4²)/2``), ``{1,2,3}`` and
   ``{1,2,3,4}``. Each candidate is computed and the one with the lowest objective wins (a sparser one on ties).
3. 3-support: eliminating ``w1, w2`` leaves a 1-D function ``G(t)`` of ``t = w3`` on ``[0, min(a3, a2/(λ a1))]``.
   ``G'''`` is decreasing, so ``G''`` is unimodal with its peak at ``λt = (√S − √D)/(√S + √D)``
   (``S = a1 + a2``, ``D = a1 − a2``), ``G'`` rises only between the two roots of ``G''`` and ``G`` has at most one
   interior local minimum. ``G'`` is convex left of the peak and concave right of it, so Newton's method started at
   the peak converges to that minimum monotonically, without safeguards.
4. Dense support: on the dense face every local minimum lies in the convex set where ``∇²(½‖w − a‖² + λR)`` is
   positive semi-definite (a linear matrix inequality in ``w``), on which the objective is convex, so all dense local
   minima share one value. It is tracked by Newton's method on the 2-D reduced objective ``F(p, q)``
   (``p = w1 + w2``, ``q = w3 + w4``, the differences eliminated in closed form) along a homotopy in λ from 0, where
   the minimizer is ``a``, to the target λ, followed by a few corrector steps.
5. Where ``2λ(a1 + a2 + a3) <= ½`` the objective is strongly convex on the box ``0 <= w <= a`` that holds the
   minimizer (:func:`_convex_sorted`), and a *short program* (no homotopy, 3 dense and 4 three-support Newton steps)
   is exact; :func:`prox_24_listed` uses it in the prox-gradient loop's early iterations.

The result was checked against an independent multi-start brute-force minimizer on thousands of groups across
regimes (``tests/core/test_prox_exact.py``): no miss at relative tolerance 1e-6.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from proxjax.core import xla
from proxjax.core import nm

__all__ = ["prox_24", "regularizer_24"]

# Fixed iteration counts (exactness was verified with these; see tests/core/test_prox_exact.py).
_NEWTON_3 = 7  # Newton steps on G' for the 3-support
_HOMOTOPY = 6  # λ stages of the dense homotopy (one Newton step each)
_CORRECT = 3  # extra Newton steps at the target λ for the dense face
# The short program, for groups where the objective is strongly convex (:func:`_convex_sorted`): no homotopy, and
# fewer steps (two dense steps and two 3-support steps already missed no group of that regime on the brute-force
# fixture and stress groups; one dense step misses 10 %: docs/method.md).
_SHORT_NEWTON_3 = 4
_SHORT_DENSE = 3
_CONVEX_MODULUS = 0.5  # the short program's regime: the objective's Hessian is at least this times I on the box


def compute_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _components(x: jax.Array, axis: int) -> tuple[jax.Array, ...]:
  g = nm.split_groups(x, 4, axis)
  return tuple(jnp.take(g, i, axis=axis + 1) for i in range(4))


def _planar_components(x: jax.Array) -> tuple[jax.Array, ...]:
  """The four entries of every group of a kernel stored planar (:func:`proxjax.core.nm.to_planar`): contiguous row
  blocks."""
  return tuple(nm.planar_entries(x, 4))


def _kernel_components(x: jax.Array, planar: bool) -> tuple[jax.Array, ...]:
  return _planar_components(x) if planar else _components(x, 0)


def _merge_kernel(out: tuple[jax.Array, ...], planar: bool) -> jax.Array:
  return jnp.concatenate(out, axis=0) if planar else nm.merge_groups(jnp.stack(out, axis=1), 0)


def prox_24_planar(x: jax.Array, lam: jax.Array) -> jax.Array:
  r"""``prox_24(x, lam)`` for a 2-D kernel stored planar (:func:`proxjax.core.nm.to_planar`: row ``i·G + g`` is
  entry ``i`` of group ``g``), in the same layout: ``to_planar(prox_24(from_planar(x), lam))`` up to float rounding,
  without splitting interleaved rows. For ``jit`` (``λ`` a traced float32 scalar, the strength ``λ·η``).

  Example:
    >>> import jax, jax.numpy as jnp, proxjax, proxjax.core.prox as prox
    >>> from proxjax.core.nm import from_planar, to_planar
    >>> x = jax.random.normal(jax.random.key(0), (8, 16))
    >>> bool(jnp.allclose(from_planar(prox.prox_24_planar(to_planar(x), jnp.float32(2.0))), proxjax.prox_24(x, 2.0),
    ...                   atol=1e-6))
    True
  """
  return _merge_kernel(_prox_components(_planar_components(x), jnp.asarray(lam, x.dtype)), True)


def _sort4(v: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
  """Sorts four magnitude arrays descending with a 5-comparator network; ties: lower original index first."""
  v = list(v)
  idx = [jnp.full(v[0].shape, i, jnp.int8) for i in range(4)]
  for i, j in ((0, 1), (2, 3), (0, 2), (1, 3), (1, 2)):
    swap = (v[j] > v[i]) | ((v[j] == v[i]) & (idx[j] < idx[i]))
    v[i], v[j] = jnp.where(swap, v[j], v[i]), jnp.where(swap, v[i], v[j])
    idx[i], idx[j] = jnp.where(swap, idx[j], idx[i]), jnp.where(swap, idx[i], idx[j])
  return v, idx


def _objective(w, a, lam):
  w1, w2, w3, w4 = w
  a1, a2, a3, a4 = a
  quad = 0.5 * ((w1 - a1) ** 2 + (w2 - a2) ** 2 + (w3 - a3) ** 2 + (w4 - a4) ** 2)
  value = quad + lam * (w1 * w2 * (w3 + w4) + w3 * w4 * (w1 + w2))
  return jnp.where(jnp.isnan(value), jnp.inf, value)


def _solve_sorted(a1, a2, a3, a4, lam, short: bool = False):
  """Exact prox for sorted non-negative magnitudes ``a1 >= a2 >= a3 >= a4 >= 0`` (``a1`` normalized to 1 or 0).

  ``short``: the program for groups in the strongly convex regime of :func:`_convex_sorted` only (Newton on the
  dense face straight at ``λ``, no homotopy, and fewer steps on both faces)."""
  a = (a1, a2, a3, a4)
  zero = jnp.zeros_like(a1)
  tiny = jnp.finfo(a1.dtype).tiny
  eps = jnp.finfo(a1.dtype).eps
  s_, d_ = a1 + a2, a1 - a2
  t_, e_ = a3 + a4, a3 - a4

  # Support {1, 2}: no shrinkage, R = 0.
  f_two = 0.5 * (a3 * a3 + a4 * a4)

  # Support {1, 2, 3}: minimize G(t) = ½(t − a3)² + (λt/4)[S²/(1 + λt) − D²/(1 − λt)] over t = w3 ∈ [0, t_max].
  t_max = jnp.minimum(a3, a2 / jnp.maximum(lam * a1, tiny))
  rs, rd = jnp.sqrt(s_), jnp.sqrt(d_)
  t = jnp.clip((rs - rd) / jnp.maximum(lam * (rs + rd), tiny), 0.0, t_max)  # the peak of G''

  # The Newton steps are loops, not unrolled: XLA compiles one step's fusions once (the unrolled program compiled
  # ~30 % longer), and the loop runs as fast (benchmarks/README.md, "Cost per iteration").
  def newton_3(_, t):
    ru, rv = 1.0 / (1.0 + lam * t), 1.0 / jnp.maximum(1.0 - lam * t, tiny)
    su, dv = (s_ * ru) ** 2, (d_ * rv) ** 2  # written so that D = 0 gives 0, never 0/0
    g1 = t - a3 + 0.25 * lam * (su - dv)
    g2 = 1.0 - 0.5 * lam * lam * (su * ru + dv * rv)
    return jnp.where(g2 > 0, jnp.clip(t - g1 / jnp.where(g2 > 0, g2, 1.0), 0.0, t_max), t)

  t = lax.fori_loop(0, _SHORT_NEWTON_3 if short else _NEWTON_3, newton_3, t)
  p = s_ / (1.0 + lam * t)
  m = jnp.where(d_ > 0, d_ / jnp.maximum(1.0 - lam * t, tiny), 0.0)
  w_three = (0.5 * (p + m), jnp.maximum(0.5 * (p - m), 0.0), t, zero)
  f_three = _objective(w_three, a, lam)

  # Dense support: Newton on F(p, q) along λ_j = λ·j/J, j = 1..J, then corrector steps at λ.
  inv_lam = 1.0 / jnp.maximum(lam, tiny)
  stages, steps = (1, _SHORT_DENSE) if short else (_HOMOTOPY, _HOMOTOPY + _CORRECT)
  fracs = jnp.asarray([min(j + 1, stages) / stages for j in range(steps)], a1.dtype)

  def newton_dense(j, pq):
    p, q = pq
    frac = fracs[j]
    lj = lam * frac
    rp = 1.0 / jnp.maximum(1.0 - lj * p, tiny)
    rq = 1.0 / jnp.maximum(1.0 - lj * q, tiny)
    ep, dq2 = (e_ * rp) ** 2, (d_ * rq) ** 2
    fp = 0.5 * (p - s_) + 0.25 * lj * (2.0 * p * q + q * q - ep)
    fq = 0.5 * (q - t_) + 0.25 * lj * (2.0 * p * q + p * p - dq2)
    fpp = 0.5 + 0.5 * lj * (q - lj * ep * rp)
    fqq = 0.5 + 0.5 * lj * (p - lj * dq2 * rq)
    fpq = 0.5 * lj * (p + q)
    det = fpp * fqq - fpq * fpq
    ok = (det > 0) & (fpp > 0)
    rdet = 1.0 / jnp.where(ok, det, 1.0)
    # Newton step, kept inside λp < 1, λq < 1 (F → −∞ at that boundary): at most 90 % of the way to it.
    bound = 0.9 * inv_lam / frac
    p_new = jnp.clip(p + (fpq * fq - fqq * fp) * rdet, 0.0, 0.1 * p + bound)
    q_new = jnp.clip(q + (fpq * fp - fpp * fq) * rdet, 0.0, 0.1 * q + bound)
    return jnp.where(ok, p_new, p), jnp.where(ok, q_new, q)

  p, q = lax.fori_loop(0, steps, newton_dense, (s_, t_))
  vq, vp = 1.0 - lam * q, 1.0 - lam * p
  valid = (vq > eps) & (vp > eps)
  m = jnp.where(d_ > 0, d_ / jnp.maximum(vq, eps), 0.0)
  n = jnp.where(e_ > 0, e_ / jnp.maximum(vp, eps), 0.0)
  w_dense = (0.5 * (p + m), jnp.maximum(0.5 * (p - m), 0.0), 0.5 * (q + n), jnp.maximum(0.5 * (q - n), 0.0))
  f_dense = jnp.where(valid, _objective(w_dense, a, lam), jnp.inf)

  use_two = (f_two <= f_three) & (f_two <= f_dense)
  use_three = f_three <= f_dense
  return tuple(jnp.where(use_three, w3, wd) for w3, wd in zip(w_three, w_dense)), use_two


def _prox_components(y: tuple[jax.Array, ...], lam: jax.Array, short: bool = False) -> tuple[jax.Array, ...]:
  """Elementwise exact prox on the four components of each group (any shapes that broadcast); ``short``:
  :func:`_solve_sorted`'s short program."""
  mags, idx = _sort4([jnp.abs(c) for c in y])
  return _prox_sorted(y, mags, idx, lam, short)


def _prox_sorted(y: tuple[jax.Array, ...], mags: list[jax.Array], idx: list[jax.Array],
                 lam: jax.Array, short: bool = False) -> tuple[jax.Array, ...]:
  """:func:`_prox_components` given the sorted magnitudes and their original positions (:func:`_sort4`);
  ``short``: :func:`_solve_sorted`'s short program (exact only where :func:`_convex_sorted` holds)."""
  scale = mags[0]
  safe = jnp.where(scale > 0, scale, 1.0)
  w, use_two = _solve_sorted(*(v / safe for v in mags), lam * safe, short)
  # The 2-support keeps the input bitwise; shrinkage never increases a magnitude (the clamp removes rounding).
  zero = jnp.zeros_like(scale)
  w = [jnp.where(use_two, keep, jnp.minimum(wi * safe, mi)) for wi, mi, keep in zip(w, mags, (*mags[:2], zero, zero))]
  finite = jnp.isfinite(y[0] + y[1] + y[2] + y[3])
  out = []
  for k in range(4):
    wk = jnp.where(idx[0] == k, w[0], jnp.where(idx[1] == k, w[1], jnp.where(idx[2] == k, w[2], w[3])))
    wk = jnp.where(finite, jnp.sign(y[k]) * wk, jnp.nan)
    out.append(jnp.where(jnp.isnan(lam), jnp.nan, jnp.where(lam > 0, wk, y[k])))  # a NaN λ·η poisons, never skips
  return tuple(out)


@functools.partial(xla.jit_fast_on_cpu, static_argnames=("axis",))
def prox_leaf(x: jax.Array, lam: jax.Array, axis: int) -> jax.Array:
  ct = compute_dtype(x.dtype)
  y = tuple(c.astype(ct) for c in _components(x, axis))
  w = _prox_components(y, jnp.asarray(lam, ct))
  return nm.merge_groups(jnp.stack(w, axis=axis + 1), axis).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# The 2-sparse certificate and the compacted prox of the prox-gradient loop (docs/method.md, "The 2:4 regularizer and
# its prox"; benchmarks/README.md, "Cost per iteration").

_CERT_MARGIN = 16  # rounding margin of the certificate, in units of eps times its terms (in units of a1 = 1)


def _certified_sorted(mags: list[jax.Array], lam: jax.Array) -> jax.Array:
  r"""Whether ``(a1, a2, 0, 0)`` is provably the global minimizer, from the sorted magnitudes and the strength.

  With ``φ(μ) = min_{w1, w2 >= 0} ½(w1 − a1)² + ½(w2 − a2)² + μ w1 w2`` (concave in ``μ``, ``φ(0) = 0``), every
  ``w`` with ``s = w3 + w4 ∈ (0, a3 + a4]`` has objective at least ``½(a3² + a4²) + φ(λs) − a3 s + ¼s²`` (drop
  ``λ w3 w4 (w1 + w2) >= 0``; ``½(w3 − a3)² + ½(w4 − a4)² >= ½(a3² + a4²) − a3 s + ¼s²``), and by concavity
  ``φ(λs) >= (s / (a3 + a4)) φ(λ(a3 + a4))``. So ``φ(λ(a3 + a4)) >= a3 (a3 + a4)`` makes the 2-support at least as
  good as every other point (a minimizer never exceeds ``a``, so ``s <= a3 + a4``). ``φ`` in closed form: the
  interior stationary point when ``a2 > μ a1``, ``(μ/4)[(a1 + a2)²/(1 + μ) − (a1 − a2)²/(1 − μ)]``, else ``½a2²``.
  Groups with ``a3 = 0`` are 2-sparse already. A margin of a few ulps keeps rounding from certifying a boundary case.
  """
  a1, a2, a3, a4 = mags
  eps = jnp.finfo(a1.dtype).eps
  safe = jnp.where(a1 > 0, a1, 1.0)
  b2, b3, b4 = a2 / safe, a3 / safe, a4 / safe
  reach = b3 + b4
  mu = lam * safe * reach
  inner = b2 > mu  # then μ < b2 <= 1
  s_, d_ = 1.0 + b2, 1.0 - b2
  phi = jnp.where(inner, 0.25 * mu * (s_ * s_ / (1.0 + mu) - d_ * d_ / jnp.where(inner, 1.0 - mu, 1.0)),
                  0.5 * b2 * b2)
  need = b3 * reach
  margin = _CERT_MARGIN * eps * (need + jnp.where(inner, mu, 0.0))
  finite = jnp.isfinite(a1 + a2 + a3 + a4)
  return finite & (((lam > 0) & (phi >= need + margin)) | ((a3 == 0) & ~jnp.isnan(lam)))


def _convex_sorted(mags: list[jax.Array], lam: jax.Array) -> jax.Array:
  r"""Whether the group's prox objective is strongly convex where its minimizer lies, with modulus at least
  :data:`_CONVEX_MODULUS`, so that :func:`_solve_sorted`'s short program is exact there.

  The minimizer keeps the signs of ``y`` and never exceeds its magnitudes, so it lies in the box ``0 <= w <= a``,
  where ``R`` is the polynomial ``Σ_{i<j<k} w_i w_j w_k`` and the Hessian of ``½‖w − a‖² + λR`` is ``I + λN``,
  ``N_ij = Σ_{k ∉ {i, j}} w_k`` off the diagonal and 0 on it. Row ``i`` of ``N`` sums to ``2 Σ_{k ≠ i} w_k``, at
  most ``2(a1 + a2 + a3)``, so by Gershgorin the Hessian is at least ``(1 − 2λ(a1 + a2 + a3)) I`` on the box: the
  objective has one minimizer there, and Newton's method converges to it from ``a`` without the homotopy.
  """
  a1, a2, a3, _ = mags
  return 2.0 * lam * (a1 + a2 + a3) <= 1.0 - _CONVEX_MODULUS


def _keep_top2(y: tuple[jax.Array, ...], idx: list[jax.Array]) -> tuple[jax.Array, ...]:
  """Each group with all but its two largest magnitudes (ties: lower index) set to zero."""
  return tuple(jnp.where((idx[0] == k) | (idx[1] == k), y[k], jnp.zeros_like(y[k])) for k in range(4))


def certify_24(x: jax.Array, lam: ArrayLike, *, axis: int = 0) -> jax.Array:
  r"""Which groups of ``x`` have ``prox_{λR}`` equal to keeping their two largest magnitudes, by a sufficient test.

  ``True`` for a group with sorted magnitudes ``a1 >= a2 >= a3 >= a4`` where ``φ(λ(a3 + a4)) >= a3 (a3 + a4)``,
  ``φ(μ) = min_{w1, w2 >= 0} ½(w1 − a1)² + ½(w2 − a2)² + μ w1 w2`` (a proof in the code), or ``a3 = 0``. Sound,
  not complete: a ``False`` group may still be 2-sparse. A few elementwise operations per group, no Newton steps.

  Args:
    x: a floating array; the group axis must be divisible by 4.
    lam: the strength ``λ`` (a scalar).
    axis: the group axis.

  Returns:
    A bool array, ``x``'s shape with ``axis`` divided by 4.

  Example:
    >>> import jax.numpy as jnp, proxjax.core.prox as prox
    >>> x = jnp.array([[0.954, 1.0], [0.926, 0.9], [0.919, 0.1], [0.912, 0.05]])
    >>> prox.certify_24(x, 1.134).tolist()  # the first group's prox is 3-sparse (see prox_24)
    [[False, True]]
  """
  x = jnp.asarray(x)
  nm.check_floating(x, "certify_24 input")
  ax = nm.group_axis(x.shape, 4, axis)
  ct = compute_dtype(x.dtype)
  mags, _ = _sort4([jnp.abs(c).astype(ct) for c in _components(x, ax)])
  return _certified_sorted(mags, jnp.asarray(lam, ct))


class GroupList(NamedTuple):
  """The groups of a ``(d_in, d_out)`` kernel that :func:`prox_24_listed` solves in full (the rest are certified).

  Attributes:
    index: ``(capacity,)`` int32, flat indices into the ``(d_in // 4, d_out)`` groups (row-major), the listed groups
      first; the unused slots repeat index 0.
    member: ``(d_in // 4, d_out)`` bool, the listed groups.
    size: int32 scalar, how many groups are listed.
  """
  index: jax.Array
  member: jax.Array
  size: jax.Array


def empty_group_list(shape: tuple[int, int], capacity: int) -> GroupList:
  """An empty :class:`GroupList` for a ``shape = (d_in, d_out)`` kernel: the first :func:`prox_24_listed` call fills
  it (an empty list is stale as soon as one group is not certified)."""
  return GroupList(jnp.zeros((capacity,), jnp.int32), jnp.zeros((shape[0] // 4, shape[1]), bool),
                   jnp.zeros((), jnp.int32))


def prox_24_listed(x: jax.Array, lam: jax.Array, listed: GroupList, *, chunk: int, shrink: float = 0.5,
                   reuse: bool = True, planar: bool = False,
                   short_from: float = 0.2) -> tuple[jax.Array, GroupList, jax.Array, jax.Array]:
  r"""``prox_24(x, lam)`` along axis 0 of a 2-D kernel, with the Newton work only where the certificate fails.

  Every group gets :func:`certify_24`'s test; a certified group's prox is its top two (closed form). The others
  (``need``) are solved exactly, ``chunk`` groups at a time, gathered by the list's index and scattered back:

  * more than ``short_from`` of the groups need it and every one of them lies in the strongly convex regime of
    :func:`_convex_sorted` (``2λ(a1 + a2 + a3) <= ½``: the loop's early, small-``λ`` iterations): every group by
    the short program (Newton on the dense face straight at ``λ``, three steps instead of a homotopy of nine; four
    steps on the 3-support instead of seven: about 40 % less work). It is exact on those groups and on the
    certified ones (their 2-support, a global minimizer, is always a candidate and wins the comparison); the list
    is kept;
  * else, more groups need it than the list holds (its capacity): the full solve of every group (the list is kept);
  * else the list is rebuilt (``jnp.nonzero(need, size=capacity)``) if it misses one of them, if they are fewer than
    ``shrink`` times the listed groups, or without ``reuse``; then ``⌈size / chunk⌉`` chunks of the list are solved,
    and the listed groups that are certified take the closed form.

  So the result is the exact prox in every case (equal to :func:`prox_24` up to float rounding; a certified group's
  top two are ``x``'s own values, bit for bit, as in ``prox_24``). Meant for ``jit`` (the prox-gradient loop of
  :func:`proxjax.prune_kernel` carries the list): three compiled solves (every group in full; every group by the
  short program; one chunk in full); ``λ`` is a traced scalar.

  Args:
    x: ``(d_in, d_out)``, float32.
    lam: the strength ``λ`` (``prox_24``'s ``hyperparams · scaling``), a float32 scalar.
    listed: the :class:`GroupList`; its capacity must be a multiple of ``chunk``.
    chunk: groups per gathered solve.
    shrink: rebuild a list that still holds every uncertified group once they are fewer than this fraction of it.
    reuse: keep a list while it holds every uncertified group (``False``: a new list every call).
    short_from: the share of the groups above which the short program replaces the gathered solve when it may
      (measured on 576 × 1536, with the sort and test: the gathered solve 2.5 ms plus 0.17 ms per chunk of 2048
      groups, the short program 5.5 ms, the full solve 8.4 ms; benchmarks/README.md); above 1: never.
    planar: ``x`` (and the result) are stored planar (:func:`proxjax.core.nm.to_planar`), which makes each group
      entry a contiguous block of rows (cheaper to split and merge than the interleaved rows); the groups and the
      list's indices are the same in both layouts.

  Returns:
    ``(prox, new list, chunks, rebuilt)``: ``chunks`` is the number of gathered solves of the list, ``-1`` for the
    full solve, ``-2`` for the short program.

  Example:
    >>> import jax, jax.numpy as jnp, proxjax, proxjax.core.prox as prox
    >>> x = jax.random.normal(jax.random.key(0), (8, 16))
    >>> out, listed, chunks, rebuilt = prox.prox_24_listed(x, jnp.float32(2.0), prox.empty_group_list(x.shape, 32),
    ...                                                    chunk=8)  # room for all 32 groups, solved 8 at a time
    >>> bool(jnp.allclose(out, proxjax.prox_24(x, 2.0), atol=1e-6)), int(listed.size) <= 8 * int(chunks), bool(rebuilt)
    (True, True, True)
  """
  capacity = listed.index.shape[0]
  if chunk < 1 or capacity % chunk:
    raise ValueError(f"the list's capacity {capacity} must be a positive multiple of chunk {chunk}")
  lam = jnp.asarray(lam, x.dtype)
  split = functools.partial(_kernel_components, planar=planar)
  y = split(x)
  mags, idx = _sort4([jnp.abs(c) for c in y])
  cert = _certified_sorted(mags, lam)
  need = ~cert
  count = jnp.sum(need, dtype=jnp.int32)
  fits = count <= capacity
  # the short program when every uncertified group is in its regime and they are too many for the list to pay
  short = (count > short_from * need.size) & ~jnp.any(need & ~_convex_sorted(mags, lam))
  if reuse:
    rebuild = fits & ~short & ((count < shrink * listed.size) | jnp.any(need & ~listed.member))
  else:
    rebuild = fits & ~short

  def new_list(old):
    # jnp.nonzero(flat, size=capacity, fill_value=0), built from one prefix sum and one scatter: the listed groups
    # first, in order, the rest of the slots 0 (nonzero's two prefix sums and scatter-add took twice as long)
    flat = need.reshape(-1)
    rank = lax.associative_scan(jnp.add, flat.astype(jnp.int32)) - 1
    slots = jnp.where(flat, rank, capacity)  # out of range: dropped
    index = jnp.zeros((capacity,), jnp.int32).at[slots].set(jnp.arange(flat.shape[0], dtype=jnp.int32), mode="drop")
    return GroupList(index, need, count)

  listed = lax.cond(rebuild, new_list, lambda old: old, listed)
  chunks = jnp.where(short, -2, jnp.where(fits, (listed.size + chunk - 1) // chunk, -1))

  # The branches take only x and the list (they recompute the sort): passing the sorted magnitudes kept four more
  # kernel-sized arrays alive across the conditional.
  def full(x, index, chunks):
    return _prox_components(split(x), lam)

  def short_program(x, index, chunks):
    return _prox_components(split(x), lam, short=True)

  def gathered(x, index, chunks):
    y = split(x)
    mags, idx = _sort4([jnp.abs(c) for c in y])
    flat = [c.reshape(-1) for c in y]
    keep_all = _certified_sorted(mags, lam).reshape(-1)

    def body(i, out):
      at = lax.dynamic_slice(index, (i * chunk,), (chunk,))
      solved = _prox_components(tuple(f[at] for f in flat), lam)
      keep = keep_all[at]
      return tuple(o.at[at].set(jnp.where(keep, o[at], w)) for o, w in zip(out, solved))

    top2 = tuple(c.reshape(-1) for c in _keep_top2(y, idx))
    out = lax.fori_loop(0, chunks, body, top2)
    return tuple(o.reshape(c.shape) for o, c in zip(out, y))

  out = lax.switch(jnp.where(short, 1, jnp.where(fits, 0, 2)), (gathered, short_program, full), x, listed.index,
                   chunks)
  return _merge_kernel(out, planar), listed, chunks, rebuild


def prox_24(x: Any, hyperparams: Any, scaling: ArrayLike = 1.0, *, axis: int = 0) -> Any:
  r"""Exact proximal operator of the 2:4 regularizer.

  Solves, for every group of 4 consecutive entries along ``axis`` (axis 0 = the input axis of a Flax kernel)

  .. math::  \mathrm{argmin}_w \; \tfrac12 \|w - x\|^2 + \mathrm{scaling}\cdot\mathrm{hyperparams}\cdot R(w),
             \qquad R(w) = \textstyle\sum_{i<j<k} |w_i w_j w_k| ,

  to float tolerance (the global minimum of this non-convex problem, not a local one). jaxopt's prox convention:
  in proximal gradient descent with step size ``η`` on ``f + λR`` pass ``hyperparams=λ, scaling=η``.

  Args:
    x: an array, or a pytree of arrays (processed leaf-wise), of any floating dtype. The group axis must be
      divisible by 4; all other axes are batch axes.
    hyperparams: ``λ``, a scalar, or a pytree of scalars matching ``x``. ``λ·scaling <= 0`` returns ``x`` unchanged.
      A non-finite ``λ·η`` is a ``ValueError`` where it is concrete; where it is traced (a schedule under ``jit``),
      a NaN strength makes the result NaN, so it shows in the loss instead of silently switching the prox off.
    scaling: ``η``, a scalar.
    axis: the group axis.

  Returns:
    The minimizer, same structure, shapes and dtypes as ``x`` (computed in float32, or float64 for float64 input).
    A group containing NaN or ±inf comes back as NaN. Ties in magnitude are broken by position (lower index is
    treated as larger), as in :func:`proxjax.project_nm`.

  One compile per distinct shape, dtype and axis (``λ`` and ``η`` are traced); works under ``jit`` and ``vmap``.

  Example:
    >>> import jax.numpy as jnp, proxjax
    >>> x = jnp.array([0.954, 0.926, 0.919, 0.912])
    >>> [round(float(v), 3) for v in proxjax.prox_24(x, 1.134)]  # not 2-sparse although λ·a1·a2 >= a3
    [0.623, 0.553, 0.529, 0.0]
    >>> proxjax.prox_24(x, 100.0)
    Array([0.954, 0.926, 0.   , 0.   ], dtype=float32)
  """
  eta = jnp.asarray(scaling)

  def leaf(v, lam):
    v = jnp.asarray(v)
    nm.check_floating(v, "prox_24 input")
    ax = nm.group_axis(v.shape, 4, axis)
    lam = jnp.asarray(lam) * eta
    if lam.ndim:
      raise ValueError(f"prox_24 hyperparams and scaling must be scalars, got shape {lam.shape}")
    if not isinstance(lam, jax.core.Tracer) and not bool(jnp.isfinite(lam)):
      raise ValueError(f"prox_24: the strength λ·η must be finite, got λ·η = {float(lam)}")
    # A strongly typed λ of the compute dtype: Python floats and float32 scalars share one compile.
    return prox_leaf(v, jnp.asarray(lam, dtype=compute_dtype(v.dtype)), ax)

  if jax.tree.structure(hyperparams).num_leaves == 1 and jnp.ndim(jax.tree.leaves(hyperparams)[0]) == 0:
    lam0 = jax.tree.leaves(hyperparams)[0]
    return jax.tree.map(lambda v: leaf(v, lam0), x)
  if jax.tree.structure(hyperparams) != jax.tree.structure(x):
    raise ValueError(f"prox_24: hyperparams must be one scalar or a pytree of scalars with the structure of x; got "
                     f"{jax.tree.structure(hyperparams)} for x of structure {jax.tree.structure(x)}")
  return jax.tree.map(leaf, x, hyperparams)


def regularizer_24(x: Any, *, axis: int = 0) -> jax.Array:
  r"""The 2:4 regularizer :math:`R(x) = \sum_{\text{groups}} \sum_{i<j<k} |x_i x_j x_k|` (float32 scalar).

  Groups are 4 consecutive entries along ``axis``; on a pytree, the sum over all leaves. ``R(x) = 0`` iff ``x`` is
  2:4 sparse.

  Example:
    >>> import jax.numpy as jnp, proxjax
    >>> float(proxjax.regularizer_24(jnp.array([1., 2., 3., 0.])))
    6.0
  """

  def leaf(v):
    v = jnp.asarray(v)
    nm.check_floating(v, "regularizer_24 input")
    ax = nm.group_axis(v.shape, 4, axis)
    a1, a2, a3, a4 = (jnp.abs(c).astype(compute_dtype(v.dtype)) for c in _components(v, ax))
    return jnp.sum(a1 * a2 * (a3 + a4) + a3 * a4 * (a1 + a2))

  return sum(jax.tree.leaves(jax.tree.map(leaf, x)), jnp.zeros((), jnp.float32))
