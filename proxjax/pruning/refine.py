r"""Masked refinement of a pruned linear layer on its local quadratic loss (docs/method.md, "Preconditioning" and "Refinement").

Layout and loss (Flax): a kernel ``K`` is ``(d_in, d_out)``, ``H = X Xᵀ / n`` is the ``(d_in, d_in)`` second moment
of the layer's calibration inputs, and the **local loss** of a candidate ``K`` against the dense ``K₀`` is

.. math::  f(K) = \tfrac12 \operatorname{tr}\big((K - K_0)^\top H (K - K_0)\big), \qquad \nabla f(K) = H (K - K_0).

Columns of ``K`` (rows of the PyTorch weight, one per output) are independent given ``H``. Given a support mask ``M``
(``True`` = the weight may be non-zero), the refinement solves, for every output column ``c`` with support
``S = {j : M_jc}``, the convex quadratic

.. math::  \min_{k:\ k_j = 0\ (j \notin S)} \tfrac12 (k - k_0)^\top H (k - k_0)
           \iff H_{SS}\, k_S = H_{S,:}\, k_{0}

(the paper's "equation 5"). Two solvers are offered, both batched over all columns (one ``(d_in, d_in) @ (d_in,
d_out)`` matmul per iteration) and both with the masked entries exactly 0:

* :func:`refine_gd`: the paper's masked gradient descent ``K̃ ← M ⊙ (K̃ − η ∇f(K̃))`` with ``η = 1/λ_max(H̃)``;
* :func:`refine_cg`: conjugate gradients on the masked operator ``P_c H̃ P_c`` of every column, each column with
  its own step scalars; it reaches the exact minimizer in at most ``|S|`` iterations in exact arithmetic and in far
  fewer than gradient descent in practice (``benchmarks/bench_pruner.py``).

Both work in the **preconditioned coordinates** of :func:`precondition` (docs/method.md, "Preconditioning"): ``d_j = sqrt(H_jj)``,
``K̃ = diag(d) K``, ``H̃ = diag(d)⁻¹ H diag(d)⁻¹`` (unit diagonal). The loss is the same in both coordinates
(``Δ̃ᵀ H̃ Δ̃ = Δᵀ H Δ``), so this changes the iterates, not the problem: gradient descent in ``K̃`` is gradient descent
with the diagonal (Jacobi) preconditioner ``diag(H)⁻¹``, and conjugate gradients in ``K̃`` is Jacobi-preconditioned CG.
Inputs with ``H_jj = 0`` ("dead": the feature is always zero) carry no signal; their weights do not change the loss and
are set to 0 by the refinement. An optional ridge ``δ`` (option ``ridge``) adds ``δ·I`` to ``H̃`` on the live inputs
(``δ·mean(diag H̃)``, the diagonal of ``H̃`` being 1), i.e. the term ``(δ/2)‖K̃ − K̃₀‖²``, which is ``H + δ·diag(H)`` in
the original coordinates **[convention]**; the scaling ``d`` always comes from the undamped diagonal. Losses are
always reported undamped.

Everything is computed in float32 whatever the weight dtype; the results are cast back to the kernel's dtype. ``H̃``
and the bound of ``λ_max(H̃)`` (Lanczos, :func:`largest_eigenvalue_bound`) are formed in full float32; the precision of the per-iteration gradient matmul is
the option ``precision`` (default ``"highest"``: full float32 also on GPUs, whose default float32 matmul is TF32).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from proxjax.core import progress

__all__ = ["Preconditioned", "largest_eigenvalue_bound", "precondition", "relative_local_loss", "refine_gd", "refine_cg"]

PrecisionLike = lax.Precision | str | None

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST


class Preconditioned(NamedTuple):
  """The Wanda-style diagonal preconditioning of a layer's Hessian (docs/method.md, "Preconditioning").

  Attributes:
    scale: ``d`` ``(d_in,)``, ``sqrt(H_jj)`` (0 on dead inputs); ``K̃ = diag(d) K``.
    inv_scale: ``1/d`` on live inputs, 0 on dead ones; ``K = diag(inv_scale) K̃``.
    hessian: ``H̃ = diag(d)⁻¹ H diag(d)⁻¹`` ``(d_in, d_in)``, symmetrized, undamped: unit diagonal on live inputs,
      zero rows and columns on dead ones.
    live: bool ``(d_in,)``, ``H_jj > 0``.
    lipschitz: ``L >= λ_max(H̃)`` (float32 scalar, a Lanczos bound; 1 if every input is dead). The gradient of the
      local loss in ``K̃`` is ``L``-Lipschitz, so ``η = 1/L`` (``1/(L + δ)`` with damping) is a safe step.
  """
  scale: jax.Array
  inv_scale: jax.Array
  hessian: jax.Array
  live: jax.Array
  lipschitz: jax.Array


def as_precision(precision: PrecisionLike) -> lax.Precision:
  if precision is None:
    return lax.Precision.DEFAULT
  if isinstance(precision, lax.Precision):
    return precision
  return lax.Precision(precision)


def precondition_checked(hessian: jax.Array, lipschitz: bool = True) -> tuple[Preconditioned, jax.Array]:
  """:func:`precondition_hessian` and whether ``H̃`` passes the curvature check (a bool scalar): false when ``H̃`` has
  an eigenvalue below ``−CURVATURE_TOL·L`` (a Cholesky of ``H̃ + CURVATURE_TOL·L·I`` fails), which means ``H`` is
  not a second-moment matrix. Always true with ``lipschitz=False``, where nothing is computed."""
  h = jnp.asarray(hessian, _F32)
  h = 0.5 * (h + h.T)
  diag = jnp.diagonal(h)
  live = diag > 0
  d = jnp.sqrt(jnp.where(live, diag, 0.0))
  inv = jnp.where(live, 1.0 / jnp.where(live, d, 1.0), 0.0)
  ht = inv[:, None] * h * inv[None, :]
  eye = jnp.arange(h.shape[0])[:, None] == jnp.arange(h.shape[0])[None, :]
  ht = jnp.where(eye, live.astype(_F32)[:, None], ht)  # exactly 1 on live inputs, 0 on dead ones
  if lipschitz:
    top = largest_eigenvalue_bound(ht)
    lip = jnp.where(jnp.any(live), jnp.maximum(top, 1.0), 1.0)  # λ_max >= max diagonal = 1
    # λ_min(H̃) >= −tol·L iff H̃ + tol·L·I is positive definite: one Cholesky (NaN when it is not) instead of a full
    # eigendecomposition.
    shifted = ht + (CURVATURE_TOL * lip) * jnp.eye(h.shape[0], dtype=_F32)
    with jax.default_matmul_precision("highest"):
      ok = jnp.all(jnp.isfinite(jnp.linalg.cholesky(shifted)))
  else:
    lip, ok = jnp.ones((), _F32), jnp.ones((), bool)
  return Preconditioned(d, inv, ht, live, lip), ok


CURVATURE_TOL = 1e-3
"""The most negative eigenvalue of ``H̃`` (relative to its largest) taken for float32 rounding."""

LANCZOS_STEPS = 48
"""Lanczos steps for ``λ_max(H̃)`` (:func:`largest_eigenvalue_bound`)."""


def largest_eigenvalue_bound(a: jax.Array, steps: int = LANCZOS_STEPS) -> jax.Array:
  r"""An upper bound of ``λ_max(A)`` for a symmetric ``A`` from ``min(steps, d)`` Lanczos steps (full
  reorthogonalization, a fixed start vector): the largest Ritz value ``θ`` plus its residual ``β_k |s_k|``, an
  interval that contains an eigenvalue of ``A`` (and ``θ`` converges to ``λ_max`` from below, fast for the top of
  the spectrum). ``O(steps · d²)`` instead of ``eigvalsh``'s ``O(d³)`` (on XLA:CPU 130–175 times a ``d × d`` by
  ``d × 576`` matmul at ``d = 576`` and ``1536``).

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.diag(jnp.array([3.0, 1.0, 0.5, 0.1]))
    >>> round(float(largest_eigenvalue_bound(a)), 4)
    3.0
  """
  a = jnp.asarray(a, _F32)
  d = a.shape[0]
  k = min(steps, d)
  q0 = jax.random.normal(jax.random.key(0), (d,), _F32) + 1.0 / jnp.sqrt(jnp.asarray(d, _F32))
  basis = jnp.zeros((k + 1, d), _F32).at[0].set(q0 / jnp.linalg.norm(q0))

  def body(j, carry):
    basis, alphas, betas = carry
    q = basis[j]
    w = jnp.matmul(a, q, precision=_HIGHEST)
    alpha = jnp.dot(q, w, precision=_HIGHEST)
    for _ in range(2):  # full reorthogonalization, twice (rows of basis beyond j are zero)
      w = w - jnp.matmul(basis.T, jnp.matmul(basis, w, precision=_HIGHEST), precision=_HIGHEST)
    beta = jnp.linalg.norm(w)
    nxt = jnp.where(beta > 1e-6 * jnp.maximum(jnp.abs(alpha), 1e-30), w / jnp.where(beta > 0, beta, 1.0), 0.0)
    return basis.at[j + 1].set(nxt), alphas.at[j].set(alpha), betas.at[j].set(beta)

  _, alphas, betas = lax.fori_loop(0, k, body, (basis, jnp.zeros((k,), _F32), jnp.zeros((k,), _F32)))
  t = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
  evals, evecs = jnp.linalg.eigh(t)
  return evals[-1] + betas[-1] * jnp.abs(evecs[-1, -1])


def precondition_hessian(hessian: jax.Array, lipschitz: bool = True) -> Preconditioned:
  """See :func:`precondition`; with ``lipschitz=False`` the Lanczos bound and the Cholesky check are skipped and ``L = 1``."""
  return precondition_checked(hessian, lipschitz)[0]


@jax.jit
def precondition(hessian: ArrayLike) -> Preconditioned:
  r"""Diagonal (Wanda-style) preconditioning of ``H``: ``H̃ = diag(d)⁻¹ H diag(d)⁻¹`` with ``d_j = sqrt(H_jj)``.

  In the coordinates ``K̃ = diag(d) K`` the local loss ``½ tr((K − K₀)ᵀ H (K − K₀))`` becomes
  ``½ tr((K̃ − K̃₀)ᵀ H̃ (K̃ − K̃₀))``, ``H̃`` has unit diagonal and ``|K̃_jc|`` is the Wanda score of ``K_jc`` (up to the
  factor ``sqrt(n)``). Dead inputs (``H_jj <= 0``) get ``d_j = 0`` and zero rows/columns in ``H̃``.

  Args:
    hessian: ``H`` ``(d_in, d_in)``, symmetric positive semi-definite (symmetrized here); any float dtype.

  Returns:
    A :class:`Preconditioned` (float32), including the bound ``L >= λ_max(H̃)``.

  Example:
    >>> import jax.numpy as jnp, proxjax.pruning.refine as refine
    >>> p = refine.precondition(jnp.array([[4., 2.], [2., 1.]]))
    >>> p.scale, p.hessian, float(p.lipschitz)
    (Array([2., 1.], dtype=float32), Array([[1., 1.],
           [1., 1.]], dtype=float32), 2.0)
  """
  return precondition_hessian(jnp.asarray(hessian))


def _quad(delta: jax.Array, hessian: jax.Array) -> jax.Array:
  """``tr(Δᵀ H Δ)`` in float32 with a full-precision matmul."""
  return jnp.sum(delta * jnp.matmul(hessian, delta, precision=_HIGHEST))


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.where(num > 0, jnp.inf, 0.0))


def relative_loss_preconditioned(vt: jax.Array, k0t: jax.Array, ht: jax.Array) -> jax.Array:
  """Relative local loss in preconditioned coordinates (undamped ``H̃``)."""
  return _ratio(_quad(vt - k0t, ht), _quad(k0t, ht))


@jax.jit
def relative_local_loss(kernel: ArrayLike, kernel0: ArrayLike, hessian: ArrayLike) -> jax.Array:
  r"""Relative local loss ``tr((K − K₀)ᵀ H (K − K₀)) / tr(K₀ᵀ H K₀)`` (float32 scalar, full-precision matmuls).

  ``0`` when ``tr(K₀ᵀ H K₀) = 0`` and ``K − K₀`` has zero loss too, ``inf`` if only the denominator is 0.

  Args:
    kernel: ``K`` ``(d_in, d_out)``.
    kernel0: ``K₀`` ``(d_in, d_out)``, the dense kernel.
    hessian: ``H`` ``(d_in, d_in)``.

  Example:
    >>> import jax.numpy as jnp, proxjax.pruning.refine as refine
    >>> k0 = jnp.array([[1.], [2.]])
    >>> float(refine.relative_local_loss(jnp.array([[1.], [0.]]), k0, jnp.eye(2)))
    0.8
  """
  k = jnp.asarray(kernel, _F32)
  k0 = jnp.asarray(kernel0, _F32)
  h = jnp.asarray(hessian, _F32)
  return _ratio(_quad(k - k0, h), _quad(k0, h))


# ---------------------------------------------------------------------------------------------------------------------
# Cores on preconditioned float32 arrays, shared with proxjax.pruning.pruner (called inside its jitted functions).


def local_grad(v: jax.Array, k0t: jax.Array, ht: jax.Array, ridge: jax.Array, precision: lax.Precision) -> jax.Array:
  """``(H̃ + δ I)(Ṽ − K̃₀)``; rows of dead inputs are zero in ``Ṽ − K̃₀`` (both are zero there). An ``H̃`` in a
  narrower dtype than float32 (the prox loop's ``grad_dtype``) rounds ``Ṽ − K̃₀`` to it too, and the products are
  accumulated in float32."""
  delta = v - k0t
  if ht.dtype == delta.dtype:
    product = jnp.matmul(ht, delta, precision=precision)
  else:
    product = jnp.matmul(ht, delta.astype(ht.dtype), preferred_element_type=delta.dtype)
  return product + ridge * delta


def gd_core(vt: jax.Array, mask: jax.Array, k0t: jax.Array, ht: jax.Array, eta: jax.Array, ridge: jax.Array,
             steps: jax.Array, *, precision: lax.Precision, progress_every: jax.Array | None = None) -> jax.Array:
  """``steps`` iterations of ``Ṽ ← M ⊙ (Ṽ − η (H̃ + δI)(Ṽ − K̃₀))`` from ``M ⊙ Ṽ``."""

  def body(i, v):
    v = jnp.where(mask, v - eta * local_grad(v, k0t, ht, ridge, precision), 0.0)
    progress.REFINE.tick(i + 1, progress_every)
    return v

  return lax.fori_loop(0, steps, body, jnp.where(mask, vt, 0.0))


def cg_core(vt: jax.Array, mask: jax.Array, k0t: jax.Array, ht: jax.Array, ridge: jax.Array, steps: jax.Array,
             tol: jax.Array, *, precision: lax.Precision,
             progress_every: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Batched masked CG on ``P_c (H̃ + δI) P_c k = P_c (H̃ + δI) k̃₀`` for every column ``c``, from ``M ⊙ Ṽ``.

  A column stops (its step scalars become 0) once ``‖r_c‖ <= tol·‖b_c‖``, ``b_c = P_c (H̃ + δI) k̃₀_c``, or when its
  curvature ``p_cᵀ A p_c`` is not positive (a singular direction: nothing left to gain). The loop ends when every
  column has stopped or after ``steps`` iterations. Returns ``(Ṽ, iterations)``.
  """
  x = jnp.where(mask, vt, 0.0)
  b = jnp.where(mask, jnp.matmul(ht, k0t, precision=precision) + ridge * k0t, 0.0)
  r = -jnp.where(mask, local_grad(x, k0t, ht, ridge, precision), 0.0)
  rr = jnp.sum(r * r, axis=0)
  thresh = jnp.square(tol) * jnp.sum(b * b, axis=0)
  active = rr > thresh

  def cond(state):
    _, _, _, _, active, k = state
    return (k < steps) & jnp.any(active)

  def body(state):
    x, r, p, rr, active, k = state
    ap = jnp.where(mask, jnp.matmul(ht, p, precision=precision) + ridge * p, 0.0)
    pap = jnp.sum(p * ap, axis=0)
    active = active & (pap > 0)
    alpha = jnp.where(active, rr / jnp.where(active, pap, 1.0), 0.0)
    x = x + alpha * p
    r = r - alpha * ap
    rr_new = jnp.sum(r * r, axis=0)
    beta = jnp.where(active, rr_new / jnp.where(active, rr, 1.0), 0.0)
    p = jnp.where(active, r + beta * p, p)
    rr = jnp.where(active, rr_new, rr)
    active = active & (rr > thresh)
    progress.REFINE.tick(k + 1, progress_every)
    return x, r, p, rr, active, k + 1

  x, _, _, _, _, k = lax.while_loop(cond, body, (x, r, r, rr, active, jnp.zeros((), jnp.int32)))
  return jnp.where(mask, x, 0.0), k


def to_preconditioned(kernel: jax.Array, pre: Preconditioned) -> jax.Array:
  return pre.scale[:, None] * jnp.asarray(kernel, _F32)


def from_preconditioned(vt: jax.Array, pre: Preconditioned) -> jax.Array:
  return pre.inv_scale[:, None] * vt


@functools.partial(jax.jit, static_argnames=("precision",))
def refine_gd(kernel: ArrayLike, mask: ArrayLike, kernel0: ArrayLike, hessian: ArrayLike, *,
              steps: ArrayLike = 1000, ridge: ArrayLike = 0.0, precision: PrecisionLike = "highest") -> jax.Array:
  r"""Masked gradient descent on the local loss (the paper's refinement, docs/method.md, "Refinement").

  Approximately solves, for the support ``M``,

  .. math::  \min_{K:\ K_{jc} = 0 \text{ where } \neg M_{jc}} \tfrac12 \operatorname{tr}\big((K - K_0)^\top
             (H + \delta\,\mathrm{diag}(H)) (K - K_0)\big)

  by ``steps`` iterations of ``K̃ ← M ⊙ (K̃ − η (H̃ + δI)(K̃ − K̃₀))`` from ``M ⊙ K̃`` in the preconditioned
  coordinates ``K̃ = diag(d) K``, ``d_j = sqrt(H_jj)`` (:func:`precondition`), with ``η = 1/(λ_max(H̃) + δ)``. This
  is gradient descent preconditioned by ``diag(H)⁻¹``; it decreases the loss monotonically. Weights of dead inputs
  (``H_jj = 0``) come out 0.

  Args:
    kernel: starting kernel ``(d_in, d_out)`` (e.g. the prox output or a masked dense kernel); its dtype is returned.
    mask: bool ``(d_in, d_out)``, ``True`` where a weight may be non-zero.
    kernel0: the dense kernel ``K₀`` ``(d_in, d_out)``.
    hessian: ``H = X Xᵀ / n`` ``(d_in, d_in)``.
    steps: number of iterations (traced: changing it does not recompile).
    ridge: ``δ >= 0``, ridge relative to the (unit) diagonal of ``H̃``.
    precision: matmul precision of the gradient (``"highest"``, ``"high"``, ``"default"`` or a ``lax.Precision``).

  Returns:
    The refined kernel, ``kernel``'s dtype, exactly 0 where ``mask`` is ``False``.

  Example:
    >>> import jax.numpy as jnp, proxjax.pruning.refine as refine
    >>> h = jnp.array([[1., .5], [.5, 1.]]); k0 = jnp.array([[1.], [1.]]); mask = jnp.array([[True], [False]])
    >>> refine.refine_gd(k0, mask, k0, h, steps=50)  # argmin over k1 of ½(k − k0)ᵀH(k − k0), k2 = 0: k1 = 1.5
    Array([[1.5],
           [0. ]], dtype=float32)
  """
  kernel = jnp.asarray(kernel)
  mask = jnp.asarray(mask, bool)
  pre = precondition_hessian(jnp.asarray(hessian))
  k0t = to_preconditioned(kernel0, pre)
  ridge = jnp.asarray(ridge, _F32)
  eta = 1.0 / (pre.lipschitz + ridge)
  vt = gd_core(to_preconditioned(kernel, pre), mask, k0t, pre.hessian, eta, ridge, jnp.asarray(steps, jnp.int32),
                precision=as_precision(precision))
  return jnp.where(mask, from_preconditioned(vt, pre), 0.0).astype(kernel.dtype)


@functools.partial(jax.jit, static_argnames=("precision",))
def refine_cg(kernel: ArrayLike, mask: ArrayLike, kernel0: ArrayLike, hessian: ArrayLike, *,
              steps: ArrayLike = 200, tol: ArrayLike = 1e-6, ridge: ArrayLike = 0.0,
              precision: PrecisionLike = "highest") -> jax.Array:
  r"""Masked conjugate gradients on the local loss: the exact per-column masked least-squares solution.

  Solves, for every output column ``c`` of ``K`` with support ``S = {j : M_jc}``,

  .. math::  \min_{k_S} \tfrac12 (k - k_{0})^\top (H + \delta\,\mathrm{diag}(H)) (k - k_{0}),\ k_{\bar S} = 0
             \iff (H + \delta\,\mathrm{diag}(H))_{SS}\, k_S = (H + \delta\,\mathrm{diag}(H))_{S,:}\, k_0 ,

  by conjugate gradients on the masked operator ``P_c (H̃ + δI) P_c`` in the preconditioned coordinates
  (Jacobi-preconditioned CG), started from ``M ⊙ K̃``. Every column has its own step scalars; all columns share one
  ``(d_in, d_in) @ (d_in, d_out)`` matmul per iteration. In exact arithmetic CG ends in at most ``|S|`` iterations.
  A column stops when its residual ``‖r_c‖ <= tol·‖b_c‖`` (``b_c`` the masked right-hand side); the loop stops when
  all have, or after ``steps`` iterations. For a singular ``H`` the system is consistent (``H = XXᵀ``) and CG
  converges to a minimizer; directions of zero curvature are never divided by.

  Args:
    kernel: starting kernel ``(d_in, d_out)``; its dtype is returned.
    mask: bool ``(d_in, d_out)``, ``True`` where a weight may be non-zero.
    kernel0: the dense kernel ``K₀`` ``(d_in, d_out)``.
    hessian: ``H = X Xᵀ / n`` ``(d_in, d_in)``.
    steps: the cap on CG iterations (traced).
    tol: relative residual tolerance per column (traced).
    ridge: ``δ >= 0``, ridge relative to the (unit) diagonal of ``H̃``.
    precision: matmul precision of the operator products.

  Returns:
    The refined kernel, ``kernel``'s dtype, exactly 0 where ``mask`` is ``False`` and on dead inputs.

  Example:
    >>> import jax.numpy as jnp, proxjax.pruning.refine as refine
    >>> h = jnp.array([[1., .5], [.5, 1.]]); k0 = jnp.array([[1.], [1.]]); mask = jnp.array([[True], [False]])
    >>> refine.refine_cg(k0, mask, k0, h)
    Array([[1.5],
           [0. ]], dtype=float32)
  """
  kernel = jnp.asarray(kernel)
  mask = jnp.asarray(mask, bool)
  pre = precondition_hessian(jnp.asarray(hessian), lipschitz=False)
  k0t = to_preconditioned(kernel0, pre)
  vt, _ = cg_core(to_preconditioned(kernel, pre), mask, k0t, pre.hessian, jnp.asarray(ridge, _F32),
                   jnp.asarray(steps, jnp.int32), jnp.asarray(tol, _F32), precision=as_precision(precision))
  return jnp.where(mask, from_preconditioned(vt, pre), 0.0).astype(kernel.dtype)
