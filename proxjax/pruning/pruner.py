r"""Layer-wise 2:4 pruning of a linear layer with the exact prox ("Algorithm 2: Matrix Prox Pruner 2:4", docs/method.md, "The prox method").

Flax layout throughout: the kernel ``K`` is ``(d_in, d_out)``, 2:4 groups are 4 consecutive entries along **axis 0**
(the input axis), ``H = X Xᵀ / n`` is ``(d_in, d_in)`` (mean over calibration tokens) and the local loss is
``f(K) = ½ tr((K − K₀)ᵀ H (K − K₀))``, ``∇f(K) = H (K − K₀)``.

The prox method, in the preconditioned coordinates of :func:`proxjax.pruning.refine.precondition` (``d_j = sqrt(H_jj)``,
``K̃ = diag(d) K``, ``H̃ = diag(d)⁻¹ H diag(d)⁻¹``, so ``|K̃|`` is the Wanda score):

1. Dead inputs (``H_jj = 0``) are zeroed in ``K̃₀`` (this cannot change the loss) and so count as pruned.
2. Proximal gradient over the increasing schedule ``λ_k = λ₀ β^k``, ``k = 0, 1, …``:

   .. math::  \tilde V_{k+1} = \mathrm{prox}_{\eta \lambda_k R}\big(\tilde V_k - \eta (\tilde H + \delta I)
              (\tilde V_k - \tilde K_0)\big), \qquad \tilde V_0 = \tilde K_0, \quad \eta = 1/(L + \delta),\
              L = \lambda_{\max}(\tilde H),

   (``λ_k`` grows by ``β^f`` per iteration instead with ``pace``, the default with a budget: :func:`_loop_core`),
   i.e. ``prox_24(·, hyperparams=λ_k, scaling=η)`` solves ``argmin_w ½‖w − y‖² + η λ_k R(w)`` (the prox strength is
   ``η·λ_k``). It stops as soon as every group is 2:4 (``R(Ṽ) = 0``), or when at most ``tail_fraction`` of the groups
   are left, or at the cap; the leftover groups are finished with :func:`proxjax.project_nm` (reported). With
   ``column_stop`` (default) each output column, an independent problem, stops on its own: once it is 2:4 it keeps
   its iterate, and the loop goes on with the open columns only (:data:`COMPACT`; docs/method.md, "The prox method").
3. Mask ``M = (Ṽ ≠ 0)``; a group left with fewer than 2 non-zeros is refilled to exactly 2 by the largest ``|K̃₀|``
   (ties: lower index). Every mask has exactly 2 ``True`` per group.
4. Refinement on the support ``M`` (:mod:`proxjax.pruning.refine`): masked conjugate gradients (default) or the paper's
   masked gradient descent (1000 steps), started from the prox output; CG reaches GD's loss in far fewer steps.
5. ``K = diag(d)⁻¹ Ṽ``, cast to the input dtype.

**Iteration estimate** (docs/method.md, "Schedule and iteration estimate"). The prox at strength ``η λ`` leaves a group with sorted magnitudes
``a1 ≥ a2 ≥ a3 ≥ a4`` 2-sparse only if ``η λ a1 a2 ≥ a3`` (necessary, not sufficient), i.e. ``λ ≥ κ_g / η = L κ_g``
with ``κ_g = a3/(a1 a2)``. With ``κ`` a high quantile of ``κ_g`` over the groups with ``a3 > 0`` at ``K̃₀``
(a quantile, not the max: a few unimportant groups would set it), the schedule reaches ``L κ`` after

.. math::  k_{\mathrm{stop}} \approx \log(L\kappa/\lambda_0) / \log\beta

iterations; here ``L`` is ``1/η`` (``λ_max(H̃) + δ``), consistent with the prox strength ``η λ_k``. The same
constants give ``β = (Lκ/λ₀)^{1/K}`` for an iteration budget ``K`` (option ``budget``) and a scale-free ``λ₀``
(option ``lam0_relative``: ``λ₀ = lam0_relative · L κ``, which makes the schedule independent of the layer's weight
scale, since ``R`` is cubic and ``λ₀ = 0.01`` means something different in every layer).

**Compiles.** Every jitted piece is compiled once per layer shape, dtype and static option (``loop``,
``precision``, ``grad_dtype``, ``refine``, and ``cap`` for ``loop="scan"`` only); ``λ₀``, ``β``, ``δ``,
``tail_fraction``, ``cap`` (while loop), the number of refinement steps, the tolerance and the progress interval
(0 = off) are traced, so sweeping them or switching the progress bar on does not recompile.

**Loop.** ``loop="while"`` (default) is a ``lax.while_loop`` that exits when done; ``loop="scan"`` is a fixed-length
``lax.scan`` of ``cap`` iterations whose body is a ``lax.cond`` no-op once done. Both compute the same iterates, bit
for bit. Measured on a 2-core CPU (``benchmarks/bench_pruner.py`` [4], cap 3000): a no-op iteration costs about
0.5–2 % of an active one (a loop trip, the predicate and the conditional's dispatch are not free), so the scan is
1.3–1.95× slower on small layers (64→32, 128→512, 37–159 active iterations) and on par (1.01×) on 576→1536, where
each active iteration is expensive. Under ``vmap`` the ``cond`` becomes a ``select`` and the no-op is not free at all,
which is another reason the while loop is the default.

**Certificate.** The loop's prox is :func:`proxjax.core.prox.prox_24_listed` (settings :data:`CERTIFY`): groups that
a sufficient test proves 2-sparse take the closed form (their top two), only the others run the Newton program,
gathered by an index list carried in the loop; the iterates are ``prox_24``'s to float rounding (docs/method.md,
"The 2:4 regularizer and its prox"). Off on a mesh, where the list would be a global computation, and for kernels
under ``CERTIFY.min_groups`` groups (:func:`prox_loop_statics`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from proxjax.core import progress as progress_meter
from proxjax.core import xla
from proxjax.pruning import baselines
from proxjax.core import nm
from proxjax.core import sharding as _sharding
from proxjax.pruning import refine as _refine
from proxjax.core.prox import empty_group_list, prox_24, prox_24_listed, prox_24_planar
from proxjax.pruning.methods import MethodConfig, ProxConfig, PruneConfig, SparseGPTConfig

__all__ = [
    "PruneInfo",
    "PruneResult",
    "Schedule",
    "beta_for_budget",
    "estimate_iterations",
    "prune_kernel",
]

_F32 = jnp.float32


# λ₀ when it is relative and κ = 0 (every group is already 2-sparse: the loop stops before its first step).
_FALLBACK_LAM0 = 0.01

# Largest prox strength η·λ_k·max|K̃₀| the schedule may reach (keeps the prox's λ² terms finite in float32; at this
# strength every group whose second magnitude is not ~1e-12 times its first is 2-sparse).
_STRENGTH_LIMIT = 1e12



class Certify(NamedTuple):
  """How the prox loop skips the Newton work of certified groups (:func:`proxjax.core.prox.prox_24_listed`;
  benchmarks/README.md, "Cost per iteration").

  Attributes:
    capacity: the list's capacity as a fraction of the groups (more uncertified groups: the full solve); 0 turns the
      certificate off (every iteration solves every group, :func:`proxjax.prox_24`).
    chunk: groups per gathered Newton solve (smaller for kernels with fewer groups).
    shrink: the list is rebuilt once the uncertified groups are fewer than this fraction of it.
    min_groups: kernels with fewer groups take the plain loop: their Newton solve is cheap, and the certified loop
      (three compiled solves and the list) takes about twice as long to compile.
    short_from: while more than this fraction of the groups is uncertified and all of those lie in the strongly
      convex regime (the early iterations), every group takes the prox's short program instead of the list or the
      full solve (``prox_24_listed``'s ``short_from``; above 1: never).
  """
  capacity: float = 0.5
  chunk: int = 2048
  shrink: float = 0.5
  min_groups: int = 16384
  short_from: float = 0.2


CERTIFY = Certify()
"""The prox loop's certificate settings (a constant; ``Certify(capacity=0)`` is the plain loop, used on a mesh)."""


def prox_loop_statics(config: ProxConfig, shape: tuple[int, ...], mesh: Any = None, *,
                      precision: Any = lax.Precision.HIGHEST, certify: Certify | None = None) -> dict[str, Any]:
  """The static options of the ``prox_loop`` piece that :func:`prune_kernel` compiles for a kernel of this ``shape``
  (also what :func:`proxjax.pipeline.memory.measure_pruner` compiles): the loop kind, FISTA, and the certificate's
  ``capacity``/``chunk`` in groups (none on a mesh, where the list would be a global computation over the sharded
  outputs, nor below ``certify.min_groups``); ``certify`` defaults to :data:`CERTIFY`.

  Example:
    >>> from proxjax.pruning.methods import ProxConfig
    >>> from proxjax.pruning.pruner import prox_loop_statics
    >>> sorted(prox_loop_statics(ProxConfig(), (576, 1536)))  # doctest: +NORMALIZE_WHITESPACE
    ['accelerate', 'capacity', 'chunk', 'column_stop', 'grad_dtype', 'loop', 'paced', 'precision', 'scan_length',
     'short_from', 'shrink']
    >>> 'capacity' in prox_loop_statics(ProxConfig(), (64, 32))  # 512 groups: the plain loop
    False
  """
  certify = CERTIFY if certify is None else certify
  statics = dict(loop=config.loop, scan_length=config.cap if config.loop == "scan" else None, precision=precision,
                 accelerate=config.accelerate, column_stop=config.column_stop, paced=config.pacing > 0,
                 grad_dtype=config.grad_dtype)
  groups = shape[0] // 4 * shape[1]
  wanted = math.ceil(certify.capacity * groups)
  if mesh is None and wanted >= 1 and groups >= certify.min_groups:
    chunk = min(certify.chunk, wanted)
    statics.update(capacity=-(-wanted // chunk) * chunk, chunk=chunk, shrink=certify.shrink,
                   short_from=certify.short_from)
  return statics


class Compact(NamedTuple):
  """How the prox loop drops the output columns that are done (``ProxConfig.column_stop``; benchmarks/README.md,
  "Prox quality per cost").

  Each output column is its own problem (the local loss and ``R`` are sums over columns), and a column stops once
  it is 2:4. The loop runs on all ``d_out`` columns until at most the next width's worth are still open, then goes
  on with only those (gathered, padded with stopped columns to that width). The narrower widths are one ladder for
  every kernel, ``min_width / factor^j`` (``j = 0, 1, …``, rounded up to a multiple of 8; 32, 64, 128, …), those
  up to ``factor · d_out``: each width is one more compile of the loop per ``(d_in, width)``, and with one ladder
  the kernels that share ``d_in`` share those compiles (SmolLM2's 576-input kernels: 5 narrower loops instead of
  9). Only for kernels of at least ``min_groups`` groups, on one device.

  Attributes:
    factor: each width is this fraction of the next wider one, and the widest at most this fraction of ``d_out``
      (0 turns it off: the loop keeps every column).
    min_width: the narrowest width.
    min_groups: smaller kernels keep every column in the loop.
  """
  factor: float = 0.5
  min_width: int = 32
  min_groups: int = 16384


COMPACT = Compact()
"""The prox loop's column compaction settings (a constant; ``Compact(factor=0)`` keeps every column)."""


def compaction_widths(config: ProxConfig, shape: tuple[int, ...], mesh: Any = None, *,
                      compact: Compact | None = None) -> list[int]:
  """The narrower widths (columns) the prox loop of a kernel of this ``shape`` may go on with, widest first; none
  on a mesh, with ``loop="scan"``, without ``column_stop`` or under ``compact.min_groups`` groups (:data:`COMPACT`).

  Example:
    >>> from proxjax.pruning.methods import ProxConfig
    >>> from proxjax.pruning.pruner import compaction_widths
    >>> compaction_widths(ProxConfig(), (576, 1536)), compaction_widths(ProxConfig(), (576, 576))
    ([512, 256, 128, 64, 32], [256, 128, 64, 32])
    >>> compaction_widths(ProxConfig(), (64, 32))  # 512 groups
    []
  """
  compact = COMPACT if compact is None else compact
  d_in, d_out = shape
  if (mesh is not None or config.loop != "while" or not config.column_stop or not 0 < compact.factor < 1
      or d_in // 4 * d_out < compact.min_groups):
    return []
  widths, j = [], 0
  while True:
    width = -(-math.ceil(compact.min_width / compact.factor ** j) // 8) * 8
    if width > compact.factor * d_out:
      return widths[::-1]
    if not widths or width > widths[-1]:
      widths.append(width)
    j += 1


class Schedule(NamedTuple):
  """The prox schedule actually used.

  Attributes:
    lam0: ``λ₀`` (after ``lam0_relative`` was resolved).
    beta: ``β`` (after ``budget`` was resolved).
    cap: the iteration cap.
    lipschitz: ``1/η = λ_max(H̃) + δ``.
    kappa: the ``quantile`` of ``a3/(a1 a2)`` over groups of ``K̃₀`` with ``a3 > 0`` (0 if there are none).
    estimated_iterations: ``ceil(log(L κ / λ₀) / log β)`` (at least 0).
  """
  lam0: float
  beta: float
  cap: int
  lipschitz: float
  kappa: float
  estimated_iterations: int


class PruneInfo(NamedTuple):
  """What :func:`prune_kernel` did.

  Attributes:
    method: the pruning method.
    loss_before_refine: relative local loss ``tr(ΔᵀHΔ)/tr(K₀ᵀHK₀)`` of the pruned kernel before refinement (for
      ``"prox"`` the masked prox output, for the baselines their kernel).
    loss_after_refine: the same after refinement (equal to ``loss_before_refine`` when ``refine`` is ``None``).
    iterations: prox-gradient iterations run (0 for the baselines).
    cap_hit: whether the prox loop reached ``cap`` before every group was 2:4.
    groups_projected: groups that were not 2:4 when the loop stopped and were finished by ``project_nm``.
    schedule: the :class:`Schedule` for ``"prox"``, else ``None``.
    refine: ``None``, ``"gd"`` or ``"cg"``.
    refine_steps: gradient steps run, or CG iterations used.
  """
  method: str
  loss_before_refine: float
  loss_after_refine: float
  iterations: int
  cap_hit: bool
  groups_projected: int
  schedule: Schedule | None
  refine: str | None
  refine_steps: int


class PruneResult(NamedTuple):
  """Result of :func:`prune_kernel`.

  Attributes:
    kernel: the pruned kernel ``(d_in, d_out)`` in the input dtype; at most ``n`` non-zeros per group of ``m``
      along axis 0, exactly 0 outside ``mask``.
    mask: bool ``(d_in, d_out)``, exactly ``n`` ``True`` per group of ``m`` along axis 0.
    info: a :class:`PruneInfo`.
  """
  kernel: jax.Array
  mask: jax.Array
  info: PruneInfo


# ---------------------------------------------------------------------------------------------------------------------
# Jitted pieces (one compile per shape / dtype / static option each).


@jax.jit
def _input_checks(kernel: jax.Array, hessian: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Whether both are finite, and whether ``H``'s diagonal has an entry below ``−1e-6·max|diag H|`` (a second
  moment ``X Xᵀ/n`` has none)."""
  diag = jnp.diagonal(hessian).astype(jnp.float32)
  negative = jnp.any(diag < -1e-6 * jnp.max(jnp.abs(diag)))
  return jnp.all(jnp.isfinite(kernel)) & jnp.all(jnp.isfinite(hessian)), negative


def _kappa(k0t: jax.Array, quantile: jax.Array) -> jax.Array:
  """The ``quantile`` of ``a3/(a1 a2)`` over groups (axis 0) with ``a3 > 0``; 0 if there are none."""
  a = jnp.sort(nm.split_groups(jnp.abs(k0t), 4, 0), axis=1)  # ascending: a4, a3, a2, a1 along axis 1
  a3, a2, a1 = a[:, 1], a[:, 2], a[:, 3]
  ratio = jnp.where(a3 > 0, a3 / jnp.where(a3 > 0, a1 * a2, 1.0), jnp.nan)
  kappa = jnp.nanquantile(ratio, quantile)
  return jnp.where(jnp.isfinite(kappa), kappa, 0.0)


def _setup(kernel: jax.Array, hessian: jax.Array, quantile: jax.Array, *,
           lipschitz: bool = True) -> tuple[_refine.Preconditioned, jax.Array, jax.Array, jax.Array]:
  pre, curvature_ok = _refine.precondition_checked(hessian, lipschitz)
  k0t = _refine.to_preconditioned(kernel, pre)
  return pre, k0t, _kappa(k0t, quantile), curvature_ok


def _over_two(v: jax.Array, planar: bool = False) -> jax.Array:
  """``(d_in // 4, d_out)`` bool: the groups (along axis 0) with more than 2 non-zeros; ``planar``: ``v`` is stored
  planar (:func:`proxjax.core.nm.to_planar`)."""
  if planar:
    return jnp.sum(nm.planar_entries(v, 4) != 0, axis=0) > 2
  return jnp.sum(nm.split_groups(v, 4, 0) != 0, axis=1) > 2


def _columns_open(v: jax.Array) -> jax.Array:
  """``(d_out,)`` bool: the output columns that are not 2:4 yet."""
  return jnp.any(_over_two(v), axis=0)


def _loop_core(k0t: jax.Array, ht: jax.Array, eta: jax.Array, ridge: jax.Array, lam0: jax.Array, beta: jax.Array,
               allowed: jax.Array, cap: jax.Array, progress_every: jax.Array, stop_below: jax.Array,
               target: jax.Array, start: tuple[jax.Array, ...], *, loop: str, scan_length: int | None,
               precision: lax.Precision, accelerate: bool = False, capacity: int = 0, chunk: int = 0,
               shrink: float = 0.5, reuse: bool = True, column_stop: bool = False, paced: bool = False,
               grad_dtype: str = "float32", planar: bool = True, short_from: float = 0.2) -> tuple[jax.Array, ...]:
  """The prox-gradient loop from ``start = (Ṽ, Ṽ_prev, t, k, e, n)``; returns ``(Ṽ, Ṽ_prev, t, k, e, n, groups
  left, open columns)``.

  ``λ_k = λ₀ β^e``: the exponent ``e`` grows by 1 per iteration (``e = k``), or with ``paced`` by
  ``clip(target / max(n − n_k, 1), ½, 2)``, ``n_k`` the groups of ``Ṽ_k`` not yet 2:4 and ``n`` those of
  ``Ṽ_{k−1}`` (the first iteration of a fresh loop, ``k = 0``, takes ``λ₀``): about ``target`` groups settle per
  iteration (docs/method.md, "Schedule and iteration estimate").

  ``cap`` is traced for ``loop="while"``; ``loop="scan"`` needs the static ``scan_length`` (= cap). With
  ``capacity`` the prox is :func:`proxjax.core.prox.prox_24_listed` (the 2-sparse certificate, the Newton solve on
  the uncertified groups only, ``chunk`` at a time, their list carried in the loop; the same iterates up to float
  rounding), else :func:`proxjax.prox_24` on every group. With ``column_stop`` an output column that is 2:4 at the
  start of an iteration keeps its iterate from then on (its own problem has stopped), and the loop also exits once
  at most ``stop_below`` columns are open (the caller then goes on with those columns only). The gradient's matmul
  takes its operands in ``grad_dtype`` (``H̃`` is cast once, before the loop) and accumulates in float32.

  With ``planar`` (the default) the loop runs on the rows in planar order (:func:`proxjax.core.nm.to_planar`:
  ``P K̃₀``, ``P Ṽ`` and ``P H̃ Pᵀ``, so ``P H̃ Pᵀ P Δ = P H̃ Δ``): each group entry is a contiguous block of rows, which
  the prox splits and merges every iteration more cheaply than interleaved rows. The state comes in and goes out in
  the kernel's own order; the iterates are the same up to the matmul's summation order.
  """
  log_lam0, log_beta = jnp.log(lam0), jnp.log(beta)
  if planar:
    k0t, ht = nm.to_planar(k0t), nm.to_planar(nm.to_planar(ht).T).T
    start = (nm.to_planar(start[0]), nm.to_planar(start[1]), *start[2:])
  over_two = functools.partial(_over_two, planar=planar)
  ht = ht.astype(grad_dtype)
  lam_max = _STRENGTH_LIMIT / (eta * jnp.maximum(jnp.max(jnp.abs(k0t)), jnp.finfo(_F32).tiny))

  def step(carry, k, e, n):
    v = carry[0]
    if paced or column_stop:
      over = over_two(v)
    if paced:  # the groups that settled in the last iteration set this one's growth of λ
      n_now = jnp.sum(over, dtype=jnp.int32)
      settled = jnp.maximum(n - n_now, 1).astype(_F32)
      e = jnp.where(k == 0, e, e + jnp.clip(target / settled, 0.5, 2.0))
      n = n_now
    else:
      e = k.astype(_F32)
    lam = jnp.minimum(jnp.exp(log_lam0 + e * log_beta), lam_max)
    if accelerate:  # FISTA's extrapolation (docs/method.md, "Acceleration"); the prox stays exact
      prev, t = carry[1:3]
      t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
      z = v + ((t - 1.0) / t_next) * (v - prev)
    else:
      z = v
    y = z - eta * _refine.local_grad(z, k0t, ht, ridge, precision)
    if column_stop:  # a 2:4 column's prox input is itself (so the certificate takes it, no Newton work) and it stays
      stopped = ~jnp.any(over, axis=0)[None, :]
      y = jnp.where(stopped, v, y)
    if capacity:
      new, listed, _, _ = prox_24_listed(y, lam * eta, carry[-1], chunk=chunk, shrink=shrink,
                                         reuse=reuse, planar=planar, short_from=short_from)
    elif planar:
      new = prox_24_planar(y, lam * eta)
    else:
      new = prox_24(y, lam, eta, axis=0)
    if column_stop:
      new = jnp.where(stopped, v, new)
    lax.cond(progress_every > 0,
             lambda x: progress_meter.PROX.tick(k + 1, progress_every, jnp.sum(over_two(x), dtype=jnp.int32)),
             lambda x: None, new)
    out = (new, v, t_next) if accelerate else (new,)
    return ((*out, listed) if capacity else out), e, n

  def going(v, k):
    over = over_two(v)
    go = (k < cap) & (jnp.sum(over, dtype=jnp.int32) > allowed)
    return go & (jnp.sum(jnp.any(over, axis=0), dtype=jnp.int32) > stop_below) if column_stop else go

  # Cost per iteration (benchmarks/README.md, "Cost per iteration"): the count of groups not yet 2:4 is taken from the
  # carried iterate at the top of the next trip (the while loop's condition, the scan's predicate) and, for the bar,
  # inside a conditional that runs only while the bar is on. Counting the prox's output inside the body, where the
  # loop and the bar's callback consumed it, changed XLA:CPU's fusion of the prox and cost 17-25 % of each iteration.
  v0, prev0, t0, k0, e0, n0 = start
  first = (v0, prev0, t0) if accelerate else (v0,)
  if capacity:
    first = (*first, empty_group_list(k0t.shape, capacity))
  init = (first, k0, e0, n0)

  def advance(state):
    carry, k, e, n = state
    carry, e, n = step(carry, k, e, n)
    return carry, k + 1, e, n

  if loop == "while":
    (carry, k, e, n) = lax.while_loop(lambda state: going(state[0][0], state[1]), advance, init)
  elif loop == "scan":

    def scan_body(state, _):
      return lax.cond(going(state[0][0], state[1]), advance, lambda s: s, state), None

    (carry, k, e, n), _ = lax.scan(scan_body, init, jnp.arange(scan_length, dtype=jnp.int32))
  else:
    raise ValueError(f"loop must be 'while' or 'scan', got {loop!r}")

  v = carry[0]
  prev, t = carry[1:3] if accelerate else (v, t0)
  over = over_two(v)
  if planar:
    v, prev = nm.from_planar(v), nm.from_planar(prev)
  return (v, prev, t, k, e, n, jnp.sum(over, dtype=jnp.int32), jnp.sum(jnp.any(over, axis=0), dtype=jnp.int32))


def _prox_loop(k0t: jax.Array, ht: jax.Array, eta: jax.Array, ridge: jax.Array, lam0: jax.Array, beta: jax.Array,
               allowed: jax.Array, cap: jax.Array, progress_every: jax.Array, stop_below: jax.Array,
               target: jax.Array, **statics: Any) -> tuple[jax.Array, ...]:
  """:func:`_loop_core` from ``Ṽ = K̃₀`` at iteration 0."""
  zero = jnp.zeros((), jnp.int32)
  start = (k0t, k0t, jnp.ones((), _F32), zero, jnp.zeros((), _F32), zero)
  return _loop_core(k0t, ht, eta, ridge, lam0, beta, allowed, cap, progress_every, stop_below, target, start,
                    **statics)


def _prox_resume(k0t: jax.Array, ht: jax.Array, eta: jax.Array, ridge: jax.Array, lam0: jax.Array, beta: jax.Array,
                 allowed: jax.Array, cap: jax.Array, progress_every: jax.Array, stop_below: jax.Array,
                 target: jax.Array, *state: jax.Array, **statics: Any) -> tuple[jax.Array, ...]:
  """:func:`_loop_core` from a state ``(Ṽ, Ṽ_prev, t, k, e, n)`` (the open columns of an earlier loop, gathered)."""
  return _loop_core(k0t, ht, eta, ridge, lam0, beta, allowed, cap, progress_every, stop_below, target, state,
                    **statics)


def _prox_mask(v: jax.Array, k0t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The loop's end: the groups left are projected (:func:`proxjax.project_nm`); mask ``M = (Ṽ ≠ 0)``, refilled to
  2 per group by the largest ``|K̃₀|``; returns ``(Ṽ ⊙ M, M)``."""
  v = nm.project_nm(v, 2, 4, axis=0)
  mask = nm.nm_mask(jnp.where(v != 0, jnp.inf, jnp.abs(k0t)), 2, 4, axis=0)
  return jnp.where(mask, v, 0.0), mask


@jax.jit
def _gather_columns(full_v: jax.Array, full_prev: jax.Array, v: jax.Array, prev: jax.Array, slots: jax.Array,
                    new_slots: jax.Array, k0t: jax.Array) -> tuple[jax.Array, ...]:
  """Writes a loop's columns back (``full[:, slots] = v``) and gathers the next loop's (``new_slots``)."""
  full_v, full_prev = full_v.at[:, slots].set(v), full_prev.at[:, slots].set(prev)
  return full_v, full_prev, full_v[:, new_slots], full_prev[:, new_slots], k0t[:, new_slots]


@jax.jit
def start_preconditioned(kernel: jax.Array, mask: jax.Array, scale: jax.Array) -> jax.Array:
  """``Ṽ = diag(scale) (M ⊙ K)`` in float32: a baseline's kernel in the preconditioned coordinates."""
  return jnp.where(mask, scale[:, None] * kernel.astype(_F32), 0.0)


def _finish(vt: jax.Array, mask: jax.Array, k0t: jax.Array, pre: _refine.Preconditioned, ridge: jax.Array,
            steps: jax.Array, tol: jax.Array, progress_every: jax.Array, *, refine: str | None,
            precision: lax.Precision, out_dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Loss before, refinement, loss after, back to the original coordinates and dtype."""
  ht = pre.hessian
  before = _refine.relative_loss_preconditioned(vt, k0t, ht)
  if refine == "gd":
    eta = 1.0 / (pre.lipschitz + ridge)
    vt = _refine.gd_core(vt, mask, k0t, ht, eta, ridge, steps,
                          precision=precision, progress_every=progress_every)
    used = steps
  elif refine == "cg":
    vt, used = _refine.cg_core(vt, mask, k0t, ht, ridge, steps, tol,
                                precision=precision, progress_every=progress_every)
  else:
    used = jnp.zeros((), jnp.int32)
  after = _refine.relative_loss_preconditioned(vt, k0t, ht)
  kernel = jnp.where(mask, pre.inv_scale[:, None] * vt, 0.0).astype(out_dtype)
  return kernel, before, after, used


def _baseline_core(kernel: jax.Array, hessian: jax.Array, damp: jax.Array, *, method: str, n: int, m: int,
                   blocksize: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A baseline's ``(kernel, mask, ok)``; ``ok`` is false only for SparseGPT on a non positive definite ``H``."""
  if method == "sparsegpt":
    return baselines.sparsegpt_unchecked(kernel, hessian, n=n, m=m, blocksize=blocksize, damp=damp)
  if method == "magnitude":
    mask = nm.nm_mask(jnp.abs(kernel), n, m, axis=0)
  else:
    mask = baselines.wanda_unchecked(kernel, hessian, n, m)
  return kernel, mask, jnp.ones((), bool)


# Each jitted piece: (function, in_shardings, out_shardings, CPU fast math), shardings as one letter per positional
# argument / output: "K" a kernel-shaped array (outputs over the mesh's model axis), "R" replicated (H, scalars).
PIECES = {
    "setup": (_setup, "KRR", "RKRR", False),
    "prox_loop": (_prox_loop, "KRRRRRRRRRR", "KKRRRRRR", True),
    "prox_resume": (_prox_resume, "KRRRRRRRRRRKKRRRR", "KKRRRRRR", True),
    "prox_mask": (_prox_mask, "KK", "KK", False),
    "columns_open": (_columns_open, "K", "R", False),
    "finish": (_finish, "KKKRRRRR", "KRRR", False),
    "baseline": (_baseline_core, "KRR", "KKR", False),
}


@functools.lru_cache(maxsize=256)
def compiled_piece(name: str, mesh: Any, shape: tuple[int, ...], statics: tuple[tuple[str, Any], ...]):
  """The jitted piece ``name`` with its static options bound; on ``mesh``, with its declared shardings for a kernel
  of this shape (:mod:`proxjax.core.sharding`). Cached: one compile per piece, shape, option set and mesh."""
  fun, ins, outs, fast = PIECES[name]
  fun = functools.partial(fun, **dict(statics))
  jit = xla.jit_fast_on_cpu if fast else jax.jit
  if mesh is None:
    return jit(fun)
  pick = {"K": _sharding.kernel_sharding(mesh, shape), "R": _sharding.replicated(mesh)}
  return jit(fun, in_shardings=tuple(pick[c] for c in ins), out_shardings=tuple(pick[c] for c in outs))


def _run(name: str, mesh: Any, shape: tuple[int, ...], *args: Any, **statics: Any) -> Any:
  return compiled_piece(name, mesh, tuple(shape), tuple(sorted(statics.items())))(*args)


# ---------------------------------------------------------------------------------------------------------------------
# Host-side checks and schedule.


def _as_arrays(kernel: ArrayLike, hessian: ArrayLike, m: int) -> tuple[jax.Array, jax.Array]:
  kernel = jnp.asarray(kernel)
  hessian = jnp.asarray(hessian)
  baselines.check_kernel(kernel, m)
  baselines.check_hessian(hessian, kernel)
  finite, negative = _input_checks(kernel, hessian)
  if not bool(finite):
    raise ValueError("kernel and hessian must be finite (found NaN or inf)")
  if bool(negative):
    raise ValueError("the hessian has negative diagonal entries: it is not a second-moment matrix X Xᵀ/n (positive "
                     "semi-definite), so no method can give a meaningful answer")
  return kernel, hessian


def _constants(kernel: jax.Array, hessian: jax.Array, quantile: float, ridge: float, lipschitz: bool = True,
               mesh: Any = None):
  if not 0.0 < quantile <= 1.0:
    raise ValueError(f"quantile must be in (0, 1], got {quantile}")
  if ridge < 0:
    raise ValueError(f"ridge must be >= 0, got {ridge}")
  pre, k0t, kappa, curvature_ok = _run("setup", mesh, kernel.shape, kernel, hessian, jnp.asarray(quantile, _F32),
                                  lipschitz=lipschitz)
  if not bool(curvature_ok):
    raise ValueError(f"the hessian is not positive semi-definite: the preconditioned H has an eigenvalue below "
                     f"{-_refine.CURVATURE_TOL * float(pre.lipschitz):.3g} (−{_refine.CURVATURE_TOL:g} times its largest, "
                     f"{float(pre.lipschitz):.3g}); a second-moment matrix X Xᵀ/n has none below rounding")
  return pre, k0t, float(pre.lipschitz) + ridge, float(kappa)


def _estimate(lipschitz: float, kappa: float, lam0: float, beta: float) -> int:
  if kappa <= 0 or lipschitz * kappa <= lam0:
    return 0
  if beta <= 1.0:
    raise ValueError(f"beta must be > 1 for an iteration estimate, got {beta}")
  return max(0, math.ceil(math.log(lipschitz * kappa / lam0) / math.log(beta)))


def _budget_beta(lipschitz: float, kappa: float, lam0: float, budget: int) -> float:
  if not (isinstance(budget, int) and budget >= 1):
    raise ValueError(f"the iteration budget must be a positive int, got {budget!r}")
  ratio = lipschitz * kappa / lam0
  return ratio ** (1.0 / budget) if ratio > 1.0 + 1e-3 else 1.0 + 1e-3


def estimate_iterations(kernel: ArrayLike, hessian: ArrayLike, lam0: float = 0.01, beta: float = 1.01, *,
                        quantile: float = 0.99, ridge: float = 0.0) -> int:
  r"""Estimated number of prox-gradient iterations until (almost) every group is 2:4 (docs/method.md, "Schedule and iteration estimate").

  .. math::  k_{\mathrm{stop}} = \Big\lceil \log(L\kappa/\lambda_0) / \log\beta \Big\rceil,

  ``L = λ_max(H̃) + δ = 1/η`` and ``κ`` the ``quantile`` of ``a3/(a1 a2)`` over the groups of ``K̃₀ = diag(d) K``
  with ``a3 > 0`` (``a`` the sorted magnitudes of a group). A group can only be 2-sparse after a prox of strength
  ``η λ_k`` if ``η λ_k a1 a2 >= a3``, i.e. ``λ_k >= L κ_g``. It is an estimate: the prox-gradient iterates move, and the
  threshold test is necessary, not sufficient; the last few groups (above the quantile) take longer.

  Args:
    kernel: ``(d_in, d_out)``, Flax layout.
    hessian: ``H`` ``(d_in, d_in)``.
    lam0: ``λ₀``.
    beta: ``β > 1``.
    quantile: the quantile of ``a3/(a1 a2)`` used for ``κ``.
    ridge: the ridgeing ``δ`` used by the pruner.

  Returns:
    The estimate (a Python int, 0 if ``λ₀ >= L κ``).

  Example:
    >>> import jax.numpy as jnp, proxjax.pruning.pruner as pruner
    >>> k = jnp.array([[1.], [1.], [1.], [1.]])
    >>> pruner.estimate_iterations(k, jnp.eye(4), lam0=0.01, beta=10.0)  # L = 1, κ = 1: ⌈log(100)/log(10)⌉
    2
  """
  kernel, hessian = _as_arrays(kernel, hessian, 4)
  _, _, lipschitz, kappa = _constants(kernel, hessian, quantile, ridge)
  return _estimate(lipschitz, kappa, lam0, beta)


def beta_for_budget(kernel: ArrayLike, hessian: ArrayLike, budget: int, lam0: float = 0.01, *,
                    quantile: float = 0.99, ridge: float = 0.0) -> float:
  r"""The growth factor ``β = (L κ / λ₀)^{1/K}`` that reaches ``L κ`` in ``K = budget`` iterations.

  The constants are those of :func:`estimate_iterations`; when ``λ₀ >= L κ`` already, ``β = 1.001``.

  Example:
    >>> import jax.numpy as jnp, proxjax.pruning.pruner as pruner
    >>> k = jnp.array([[1.], [1.], [1.], [1.]])
    >>> round(pruner.beta_for_budget(k, jnp.eye(4), 2, lam0=0.01), 6)  # 100 ** (1/2)
    10.0
  """
  kernel, hessian = _as_arrays(kernel, hessian, 4)
  _, _, lipschitz, kappa = _constants(kernel, hessian, quantile, ridge)
  return _budget_beta(lipschitz, kappa, lam0, budget)


def _baseline(config: PruneConfig, kernel: jax.Array, hessian: jax.Array, mesh: Any) -> tuple[jax.Array, jax.Array]:
  method = config.method
  blocksize, damp = (method.blocksize, method.damp) if isinstance(method, SparseGPTConfig) else (128, 0.01)
  new_kernel, mask, ok = _run("baseline", mesh, kernel.shape, kernel, hessian, jnp.asarray(damp, _F32),
                              method=method.name, n=config.n, m=config.m, blocksize=blocksize)
  if not bool(ok):
    raise baselines.not_positive_definite_error(damp)
  return jnp.where(mask, new_kernel, jnp.zeros((), kernel.dtype)), mask


def _prox_solve(config: ProxConfig, k0t: jax.Array, ht: jax.Array, scalars: tuple[jax.Array, ...], mesh: Any,
                precision: Any) -> tuple[jax.Array, jax.Array, int, int]:
  """The prox loop, narrowed to the open columns at the :func:`compaction_widths`, then the mask: returns
  ``(Ṽ ⊙ M, M, iterations, groups projected)``."""
  shape = k0t.shape
  widths = compaction_widths(config, shape, mesh)
  allowed, cap = int(scalars[4]), int(scalars[5])
  statics = prox_loop_statics(config, shape, mesh, precision=precision)
  target = jnp.asarray(config.pacing * (shape[0] // 4) * shape[1], _F32)  # groups to settle per iteration
  stop_below = lambda: jnp.asarray(widths[0] if widths else 0, jnp.int32)
  *state, left, open_ = _run("prox_loop", mesh, shape, k0t, ht, *scalars, stop_below(), target, **statics)
  v, prev, k = state[0], state[1], state[3]
  full = slots = None
  while widths and int(open_) > 0 and int(left) > allowed and int(k) < cap:
    columns = np.flatnonzero(np.asarray(_run("columns_open", None, v.shape, v)))
    keep = [w for w in widths if w >= columns.size]
    if not keep:  # cannot happen: the loop ran until at most widths[0] columns were open
      break
    width = keep[-1]
    widths = [w for w in widths if w < width]
    if full is None:
      full, slots = (v, prev), np.arange(shape[1])
    old = slots
    chosen = old[columns]
    stopped = np.setdiff1d(np.arange(shape[1]), chosen, assume_unique=True)[:width - chosen.size]
    slots = np.concatenate([chosen, stopped]).astype(np.int32)
    full_v, full_prev, v, prev, k0_slice = _gather_columns(*full, v, prev, jnp.asarray(old, jnp.int32),
                                                          jnp.asarray(slots), k0t)
    full = (full_v, full_prev)
    narrow = (shape[0], width)
    *state, left, open_ = _run("prox_resume", None, narrow, k0_slice, ht, *scalars, stop_below(), target, v, prev,
                               *state[2:], **prox_loop_statics(config, narrow, None, precision=precision))
    v, prev, k = state[0], state[1], state[3]
  if full is not None:
    v = full[0].at[:, jnp.asarray(slots)].set(v)
  vt, mask = _run("prox_mask", mesh, shape, v, k0t)
  return vt, mask, int(k), int(left)


def as_config(method: str | MethodConfig | PruneConfig = "prox", *, refine: Any = "auto", n: int = 2, m: int = 4,
              **options: Any) -> PruneConfig:
  """The :class:`~proxjax.pruning.methods.PruneConfig` of :func:`prune_kernel`'s arguments: ``method`` itself when
  it is one (then nothing else may be given), else built from the name or method configuration and the flat
  options (:meth:`PruneConfig.from_options`).

  Example:
    >>> as_config("wanda", refine="gd").refine.steps
    1000
  """
  if isinstance(method, PruneConfig):
    if refine != "auto" or (n, m) != (2, 4) or options:
      raise ValueError("pass either a PruneConfig or the separate refine/n/m/options, not both")
    return method
  return PruneConfig.from_options(method, refine=refine, n=n, m=m, **options)


def prune_kernel(kernel: ArrayLike, hessian: ArrayLike, method: str | MethodConfig | PruneConfig = "prox", *,
                 n: int = 2, m: int = 4, refine: Any = "auto", mesh: jax.sharding.Mesh | None = None,
                 progress: bool | int = False, **options: Any) -> PruneResult:
  r"""Prunes one linear layer to N:M sparsity along its input axis, minimizing the local loss.

  The local loss is ``f(K) = ½ tr((K − K₀)ᵀ H (K − K₀))`` with ``K₀ = kernel`` and ``H = hessian = X Xᵀ / n``.
  ``method="prox"`` runs the prox-gradient schedule of this module's docstring on

  .. math::  \min_K f(K) + \lambda R(K) \text{ for } \lambda = \lambda_0, \lambda_0\beta, \lambda_0\beta^2, \dots

  (2:4 only) until ``K`` is 2:4, then refines on the found support. ``"magnitude"``, ``"wanda"`` and ``"sparsegpt"``
  call :mod:`proxjax.pruning.baselines`; with ``refine`` they become the paper's "+GD" baselines. ``refine``
  minimizes ``f`` over the support (:mod:`proxjax.pruning.refine`). See docs/method.md, "The prox method".

  Not jittable itself (it checks values and returns Python numbers in ``info``); its pieces are jitted, once per
  shape and static option.

  On a ``mesh`` (:func:`proxjax.core.sharding.make_mesh`) the kernel's outputs are split over the ``model`` axis and
  ``H`` is replicated (:mod:`proxjax.core.sharding`); every piece is compiled with those
  ``in_shardings``/``out_shardings``, so the loop's only communication is the scalar count of groups not yet 2:4
  (the stop is global). Results equal the single-device ones bit for bit for the one-shot masks; the iterative
  methods may round differently in their global reductions (the schedule's ``κ`` quantile, CG's inner products).

  Args:
    kernel: the dense kernel ``(d_in, d_out)`` (Flax layout; a PyTorch weight must be transposed), any float dtype.
    hessian: ``H`` ``(d_in, d_in)``, float32 recommended (accumulated as a mean over tokens).
    method: ``"prox"``, ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``, a method configuration
      (:class:`~proxjax.pruning.methods.ProxConfig`, ...), or a whole
      :class:`~proxjax.pruning.methods.PruneConfig`.
    n: kept entries per group.
    m: group size; groups are ``m`` consecutive entries along axis 0.
    refine: ``"auto"`` (``"cg"`` for ``"prox"``, none for the baselines; the paper uses ``"gd"``, 1000 steps, and
      CG reaches the same loss in a few dozen steps, see benchmarks/README.md), ``"gd"``, ``"cg"``, ``None`` or a
      :class:`~proxjax.pruning.methods.RefineConfig`.
    mesh: an optional :class:`jax.sharding.Mesh` with axes ``("data", "model")``; the result stays sharded on it.
    progress: False; True or N shows tqdm bars updated every 10 or N iterations from inside the compiled loops.
    **options: the method configuration's fields (for ``"prox"``: ``lam0`` or ``lam0_relative`` (1e-4), ``beta``
      or ``budget`` (150), ``cap`` 3000, ``ridge`` 0, ``quantile`` 0.99, ``tail_fraction`` 0, ``loop`` ``"while"``,
      ``accelerate``, ``column_stop``, ``pace`` (0.01 with a budget, 0 with ``beta``), ``grad_dtype``
      ``"bfloat16"`` (:class:`ProxConfig`); for
      ``"sparsegpt"``: ``blocksize`` 128, ``damp`` 0.01), ``refine_steps`` (1000 for GD, a cap of 200 for CG),
      ``refine_tol`` (1e-6), ``refine_ridge`` (0) and ``precision`` (``"highest"``); they are validated here, before
      any work.

  Returns:
    A :class:`PruneResult` ``(kernel, mask, info)``.

  Raises:
    ValueError: bad shapes (non-2-D kernel, non-square hessian, mismatched ``d_in``, ``d_in`` not divisible by
      ``m``), non-finite inputs, an unknown method or refinement, ``"prox"`` with ``(n, m) != (2, 4)``, an option
      the method does not take or a bad value.

  Example:
    >>> import jax, jax.numpy as jnp, proxjax
    >>> x = jax.random.normal(jax.random.key(0), (8, 256))
    >>> k = jax.random.normal(jax.random.key(1), (8, 4))
    >>> res = proxjax.prune_kernel(k, x @ x.T / 256, lam0=0.01, beta=1.2)
    >>> bool(proxjax.is_nm(res.kernel)), res.mask.sum(axis=0).tolist()
    (True, [4, 4, 4, 4])
    >>> res.info.loss_after_refine <= res.info.loss_before_refine
    True
  """
  config = as_config(method, refine=refine, n=n, m=m, **options)
  every = progress_meter.every_n(progress)
  kernel, hessian = _as_arrays(kernel, hessian, config.m)
  if mesh is not None:
    kernel = jax.device_put(kernel, _sharding.kernel_sharding(mesh, kernel.shape))
    hessian = jax.device_put(hessian, _sharding.replicated(mesh))
  precision = _refine.as_precision(config.precision)
  refine_cfg = config.refine
  refine, refine_steps = config.refine_kind, (0 if refine_cfg is None else refine_cfg.steps)
  refine_ridge, refine_tol = (0.0, 1e-6) if refine_cfg is None else (refine_cfg.ridge, refine_cfg.tol)

  schedule, iterations, cap_hit, projected = None, 0, False, 0
  own = config.method
  if isinstance(own, ProxConfig):
    cap = own.cap
    pre, k0t, lipschitz, kappa = _constants(kernel, hessian, own.quantile, own.ridge, mesh=mesh)
    how, lam0 = own.start
    if how == "lam0_relative":  # scale-free λ₀; with κ = 0 (nothing to prune) any λ₀ stops at once
      lam0 = lam0 * lipschitz * kappa if kappa > 0 else _FALLBACK_LAM0
    how, beta = own.growth
    if how == "budget":
      beta = _budget_beta(lipschitz, kappa, lam0, int(beta))
    if not lam0 > 0:
      raise ValueError(f"lam0 must be > 0, got {lam0}")
    estimate = _estimate(lipschitz, kappa, lam0, beta) if beta > 1.0 else cap
    allowed = int(own.tail_fraction * (kernel.shape[0] // 4 * kernel.shape[1]))
    scalars = (jnp.asarray(1.0 / lipschitz, _F32), jnp.asarray(own.ridge, _F32), jnp.asarray(lam0, _F32),
               jnp.asarray(beta, _F32), jnp.asarray(allowed, jnp.int32), jnp.asarray(cap, jnp.int32),
               jnp.asarray(every, jnp.int32))
    with progress_meter.PROX.show(cap, "prox 2:4", every > 0):
      vt, mask, iterations, projected = _prox_solve(own, k0t, pre.hessian, scalars, mesh, precision)
    cap_hit = projected > allowed
    schedule = Schedule(float(lam0), float(beta), cap, lipschitz, kappa, estimate)
    base_kernel = None
  else:
    pre, k0t, _, _ = _constants(kernel, hessian, 0.5, 0.0, lipschitz=refine == "gd", mesh=mesh)  # eigh: GD's η
    base_kernel, mask = _baseline(config, kernel, hessian, mesh)
    vt = start_preconditioned(base_kernel, mask, pre.scale)

  with progress_meter.REFINE.show(refine_steps, f"refine ({refine})", every > 0 and refine is not None):
    out, before, after, used = _run("finish", mesh, kernel.shape, vt, mask, k0t, pre,
                                    jnp.asarray(refine_ridge, _F32), jnp.asarray(refine_steps, jnp.int32),
                                    jnp.asarray(refine_tol, _F32), jnp.asarray(every, jnp.int32),
                                    refine=refine, precision=precision, out_dtype=jnp.dtype(kernel.dtype))
    before, after, used = float(before), float(after), int(used)
  if base_kernel is not None and refine is None:
    out = base_kernel  # the baseline's own values, bit for bit
  info = PruneInfo(own.name, before, after, iterations, cap_hit, projected, schedule, refine, used)
  return PruneResult(out, mask, info)
