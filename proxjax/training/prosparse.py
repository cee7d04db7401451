r"""ProSparse: high activation sparsity in the FFN of a SwiGLU LLM (Song et al., arXiv 2402.13516, COLING 2025).

The recipe, on :class:`proxjax.models.LlamaForCausalLM` (docs/method.md, "ProSparse"):

1. **ReLU substitution** (:func:`with_activation`): the gate activation SiLU becomes ReLU, weights unchanged.
2. **Continued training** (:func:`train_prosparse`, a :class:`~proxjax.training.loop.Recipe` of the one training
   loop :func:`proxjax.training.loop.run`) on the language-modelling loss plus an L1 penalty on the FFN
   intermediate activations ``a_l = act(gate_l(x))`` (``(B, T, I)`` per block ``l``, ``I`` = intermediate size):

   .. math::  \mathcal L(\theta; t) = \mathrm{NLL}(\theta) + \lambda(t)\, R(a),\qquad
              R(a) = \sum_{l=1}^{L} \frac{1}{B T} \sum_{b, t'} \sum_{u=1}^{I} |a_{l, b, t', u}|

   (:func:`activation_l1`): the L1 norm of all FFN intermediate activations of a token, summed over units **and
   layers**, averaged over every token of the batch (all ``B·T`` positions, whereas the NLL averages the ``B(T−1)``
   predicted ones). ``λ`` is therefore per token, not per unit: it scales with the number of layers and units, and
   ``λ · R`` is what adds to the NLL (in nats). After ReLU, ``a ≥ 0`` so ``|a| = a``; the penalty's gradient pushes
   positive gate pre-activations towards 0 (towards the ReLU's zero region).
3. **λ schedule** (:func:`l1_schedule`): a warm-up stage at a small constant ``λ₀``, then ``K`` stages, each rising
   along a quarter sine to a new peak, constant after the last one (the exact formula of the paper was not
   retrievable; this is our reading, see :func:`l1_schedule`).
4. **Threshold shift** (:func:`with_activation` with ``threshold=θ``): FATReLU ``a = x if x > θ else 0``
   (``θ = 0.01`` in the released ProSparse configs).
5. **Measurement** (:func:`activation_sparsity`): the fraction of **exact** zeros of ``a_l`` over evaluation tokens,
   per layer and overall, to report next to perplexity.

**Export.** A ReLU model (``θ = 0``) saves as ``"hidden_act": "relu"``, which transformers runs faithfully. FATReLU
(``θ > 0``) has no transformers equivalent: :func:`proxjax.models.save_pretrained` refuses it unless
``allow_fatrelu=True`` (``"hidden_act": "fatrelu", "hidden_act_param": θ``, the MiniCPM-S / ProSparse convention,
which :func:`proxjax.models.load_pretrained` honours and transformers' Llama refuses to build).

**Command line** (``proxjax prosparse``, :mod:`proxjax.workflows.prosparse`)::

  proxjax prosparse smollm2 out/prosparse --steps 120 --batch-size 4 --seqlen 256 --lr 2e-4 --lr-warmup-steps 10 \
      --l1-warmup 1e-5 --l1-warmup-steps 40 --l1-stages 80:5e-5 120:1e-4 --threshold 0.01 --export fatrelu \
      --eval lee --eval-seqlen 512 --max-windows 16 --eval-batch-size 4 --save-every 20

Step ``t = 0 … S−1`` uses ``λ(t)``: a stage ending at ``STEP = --steps`` is just short of its peak at the last step (the
report's ``l1.final_lambda`` is the last ``λ`` used). For SmolLM2-135M (30 layers × 1536 units) ``R ≈ 1.2·10⁴`` right
after the ReLU switch, so ``λ = 10⁻⁴`` adds about 1.2 nats to the loss at first.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from proxjax.core import distributed
from proxjax.pipeline import evaluate
from proxjax.pipeline.evaluate import padded_batch
from proxjax.models.llama import LlamaForCausalLM
from proxjax.training import loop

__all__ = [
    "ActivationSparsity",
    "LR_SCHEDULES",
    "LossParts",
    "ProSparseSettings",
    "TrainResult",
    "activation_l1",
    "activation_sparsity",
    "l1_schedule",
    "logits_and_zero_counts",
    "perplexity_and_sparsity",
    "prosparse_loss",
    "schedule_values",
    "train_prosparse",
    "with_activation",
]

_F32 = jnp.float32


# ------------------------------------------------------------------------------------------------------- model --


def with_activation(model: LlamaForCausalLM, hidden_act: str = "relu", threshold: float = 0.0) -> LlamaForCausalLM:
  """The same weights with another gate activation: ``hidden_act`` (``"relu"`` or ``"silu"``) and FATReLU threshold.

  ``threshold = θ > 0`` (only with ReLU) gives FATReLU ``a = x if x > θ else 0``; ``θ = 0`` is plain ReLU. The
  returned model has new NNX variables holding the same (immutable) arrays, so nothing is copied and training one
  model does not change the other.

  Raises:
    UnsupportedModelError: an unknown activation, or ``threshold > 0`` with SiLU.
    ValueError: a negative or non-finite threshold.

  Example:
    >>> from flax import nnx
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                 num_attention_heads=2)
    >>> relu = with_activation(nnx.eval_shape(lambda: LlamaForCausalLM(c, rngs=nnx.Rngs(0))), "relu", 0.01)
    >>> relu.config.hidden_act, relu.config.activation_threshold, relu.model.layers[0].mlp.activation_threshold
    ('relu', 0.01, 0.01)
  """
  config = dataclasses.replace(model.config, hidden_act=hidden_act, activation_threshold=threshold)
  abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0), dtype=model.dtype,
                                                     param_dtype=model.param_dtype))
  return nnx.merge(nnx.graphdef(abstract), nnx.state(model), copy=True)


def activation_l1(activations: Sequence[jax.Array]) -> jax.Array:
  r"""The ProSparse penalty ``R = Σ_l (1/(B·T)) Σ_{b,t} Σ_u |a_{l,b,t,u}|`` (float32 scalar).

  ``activations`` are the per-block FFN intermediate activations ``(B, T, I)`` of
  ``model(ids, return_activations=True)``: the L1 norm over units and layers, averaged over the ``B·T`` tokens.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.array([[[1., 0., 2.], [0., 0., 3.]]])  # one layer, B = 1, T = 2, I = 3
    >>> float(activation_l1([a, -a]))  # per layer: (3 + 3) / 2 tokens = 3; two layers
    6.0
  """
  if not activations:
    raise ValueError("no activations: the model has no FFN layers")
  return sum(jnp.mean(jnp.sum(jnp.abs(a.astype(_F32)), axis=-1)) for a in activations)


class LossParts(NamedTuple):
  """The parts of the ProSparse loss of one batch (float32 scalars).

  Attributes:
    total: ``lm + lam · l1`` (what is differentiated).
    lm: the mean next-token NLL (:func:`proxjax.training.loop.lm_loss`).
    l1: the penalty ``R`` of :func:`activation_l1`.
    lam: the factor ``λ`` used.
    zero_fraction: the fraction of exact zeros in the FFN intermediate activations of the batch (all layers and
      tokens; not differentiated).
  """

  total: jax.Array
  lm: jax.Array
  l1: jax.Array
  lam: jax.Array
  zero_fraction: jax.Array


def prosparse_loss(model: LlamaForCausalLM, ids: jax.Array, lam: jax.Array | float) -> tuple[jax.Array, LossParts]:
  r"""``(NLL + λ R, LossParts)`` of token windows ``ids`` ``(B, T)`` from one forward pass.

  For ``nnx.value_and_grad(prosparse_loss, has_aux=True)``; ``lam`` may be traced.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                 num_attention_heads=2, hidden_act="relu")
    >>> model = LlamaForCausalLM(c, rngs=nnx.Rngs(0))
    >>> loss, parts = nnx.jit(prosparse_loss)(model, jnp.zeros((2, 6), jnp.int32), 0.5)
    >>> bool(jnp.isclose(loss, parts.lm + 0.5 * parts.l1)), 0.0 < float(parts.zero_fraction) < 1.0
    (True, True)
  """
  logits, acts = model(ids, return_activations=True)
  lm = loop.lm_loss(lambda _: logits, ids)
  l1 = activation_l1(acts)
  lam = jnp.asarray(lam, _F32)
  zeros = sum(jnp.sum(a == 0, dtype=_F32) for a in acts) / float(sum(a.size for a in acts))
  total = lm + lam * l1
  return total, LossParts(total, lm, l1, lam, jax.lax.stop_gradient(zeros))


# ---------------------------------------------------------------------------------------------------- schedule --


def l1_schedule(warmup_value: float, warmup_steps: int = 0,
                stages: Sequence[tuple[int, float]] = ()) -> optax.Schedule:
  r"""ProSparse's multi-stage sine schedule of the L1 factor, as an optax-style schedule ``step → λ`` (float32).

  With ``T₀ = warmup_steps``, ``λ₀ = warmup_value`` and ``stages = [(T₁, λ₁), …, (T_K, λ_K)]``
  (``T₀ < T₁ < … < T_K``):

  * warm-up, ``t < T₀``: ``λ(t) = λ₀``;
  * stage ``i``, ``T_{i−1} ≤ t < T_i``:
    ``λ(t) = λ_{i−1} + (λ_i − λ_{i−1}) · sin(π/2 · (t − T_{i−1}) / (T_i − T_{i−1}))``;
  * ``t ≥ T_K``: ``λ(t) = λ_K`` (no stages: ``λ₀`` throughout).

  So ``λ`` is continuous, monotone within each stage (rising fast, then flattening: the sine's slope is largest at the
  stage start) and equals ``λ_i`` exactly from ``t = T_i``. This is our reading of the paper (the
  exact formula was not retrievable); the warm-up's small ``λ₀`` lets the model adapt to ReLU first.

  The schedule is built from ``jnp`` operations: ``step`` may be a traced int or float (e.g. an optax step count under
  ``jit``) or an array of steps.

  Args:
    warmup_value: ``λ₀ ≥ 0``.
    warmup_steps: ``T₀ ≥ 0``.
    stages: ``(end step T_i, peak λ_i ≥ 0)`` pairs, ends strictly increasing and above ``T₀``.

  Raises:
    ValueError: a negative or non-finite value, or stage ends out of order.

  Example:
    >>> s = l1_schedule(1e-5, 10, [(20, 1e-4), (40, 1e-3)])
    >>> [round(float(s(t)), 6) for t in (0, 9, 10, 15, 20, 30, 40, 99)]
    [1e-05, 1e-05, 1e-05, 7.4e-05, 0.0001, 0.000736, 0.001, 0.001]
  """
  values = [warmup_value] + [float(p) for _, p in stages]
  for v in values:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
      raise ValueError(f"λ values must be finite numbers >= 0, got {v!r}")
  if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int | np.integer) or warmup_steps < 0:
    raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
  bounds = [int(warmup_steps)]
  for end, _ in stages:
    if isinstance(end, bool) or not isinstance(end, int | np.integer) or end <= bounds[-1]:
      raise ValueError(f"λ stage ends must be ints increasing strictly from warmup_steps={warmup_steps}, got "
                       f"{[int(warmup_steps)] + [e for e, _ in stages]}")
    bounds.append(int(end))
  b = np.asarray(bounds, np.float32)
  v = np.asarray(values, np.float32)
  k = len(stages)

  def schedule(step: Any) -> jax.Array:
    t = jnp.asarray(step, _F32)
    if k == 0:
      return jnp.full(t.shape, v[0], _F32)
    bj, vj = jnp.asarray(b), jnp.asarray(v)
    i = jnp.clip(jnp.searchsorted(bj, t, side="right"), 1, k)  # T_{i-1} <= t < T_i (clipped at both ends)
    lo, hi, a, z = bj[i - 1], bj[i], vj[i - 1], vj[i]
    frac = jnp.clip((t - lo) / (hi - lo), 0.0, 1.0)
    s = jnp.sin(_F32(0.5 * math.pi) * frac)
    return jnp.where(frac >= 1.0, z, a + s * (z - a))  # exactly λ_i from T_i on

  return schedule


# ---------------------------------------------------------------------------------------------------- training --


class TrainResult(NamedTuple):
  """What :func:`train_prosparse` did, one entry per step in the histories (resumed steps included).

  Attributes:
    model: the trained model (the argument, trained in place; after a resume it holds the restored and continued
      state).
    losses: ``NLL + λ R`` per step.
    lm_losses: NLL per step.
    l1: ``R`` per step.
    lambdas: ``λ`` per step.
    zero_fractions: exact-zero fraction of the FFN activations of each step's batch.
    learning_rates: the learning rate of each step.
    seconds: wall time of each step (the first one of a run includes compilation).
    steps: steps done in total.
    resumed_from: the step the run resumed from (0 for a fresh run).
  """

  model: LlamaForCausalLM
  losses: list[float]
  lm_losses: list[float]
  l1: list[float]
  lambdas: list[float]
  zero_fractions: list[float]
  learning_rates: list[float]
  seconds: list[float]
  steps: int
  resumed_from: int


LR_SCHEDULES = ("cosine", "constant")
"""The learning-rate schedules of :func:`train_prosparse` (after the optional linear warm-up)."""


def _finite(x: Any, low: float, strict: bool) -> bool:
  return (not isinstance(x, bool) and isinstance(x, int | float | np.floating | np.integer) and math.isfinite(x)
          and (x > low if strict else x >= low))


@dataclasses.dataclass(frozen=True)
class ProSparseSettings:
  """The optimizer settings of a ProSparse run (see :func:`train_prosparse`), checked when built.

  Example:
    >>> ProSparseSettings(learning_rate=2e-4, lr_warmup_steps=10).lr_schedule
    'cosine'
    >>> ProSparseSettings(lr_schedule="linear")
    Traceback (most recent call last):
    ValueError: lr_schedule must be 'cosine' or 'constant', got 'linear'
  """

  learning_rate: float = 5e-5
  lr_schedule: str = "cosine"
  lr_warmup_steps: int = 0
  lr_min_ratio: float = 0.1
  weight_decay: float = 0.0
  clip_norm: float = 1.0

  def __post_init__(self):
    if not _finite(self.learning_rate, 0.0, strict=True):
      raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
    if self.lr_schedule not in LR_SCHEDULES:
      raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
    if isinstance(self.lr_warmup_steps, bool) or not isinstance(self.lr_warmup_steps, int | np.integer) \
        or self.lr_warmup_steps < 0:
      raise ValueError(f"lr_warmup_steps must be an int >= 0, got {self.lr_warmup_steps!r}")
    if not _finite(self.lr_min_ratio, 0.0, strict=False):
      raise ValueError(f"lr_min_ratio must be a number >= 0, got {self.lr_min_ratio!r}")
    if not _finite(self.clip_norm, 0.0, strict=True) or not _finite(self.weight_decay, 0.0, strict=False):
      raise ValueError(f"need clip_norm > 0 and weight_decay >= 0, got {self.clip_norm!r} and {self.weight_decay!r}")

  def schedule(self, steps: int) -> optax.Schedule:
    """The learning rate of step ``t`` of a run of ``steps`` steps: ``"constant"``, or ``"cosine"`` from
    ``learning_rate`` down to ``lr_min_ratio · learning_rate`` at the last step, after a linear warm-up from 0 over
    ``lr_warmup_steps`` steps (fewer than ``steps``)."""
    if not self.lr_warmup_steps < max(steps, 1):
      raise ValueError(f"lr_warmup_steps must be in [0, steps={steps}), got {self.lr_warmup_steps}")
    if self.lr_schedule == "constant":
      main = optax.constant_schedule(self.learning_rate)
    else:
      main = optax.cosine_decay_schedule(self.learning_rate, max(steps - self.lr_warmup_steps, 1),
                                         alpha=self.lr_min_ratio)
    if self.lr_warmup_steps == 0:
      return main
    return optax.join_schedules([optax.linear_schedule(0.0, self.learning_rate, self.lr_warmup_steps), main],
                                [self.lr_warmup_steps])


@functools.cache
def _optimizer_tx(clip_norm: float) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with its learning rate and weight decay injected as state (set every step):
  one transformation object per ``clip_norm``, so repeated runs reuse the compiled step."""
  return optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=0.9, b2=0.999, weight_decay=0.0))


def _hyperparams(optimizer: nnx.Optimizer) -> dict[str, Any]:
  return optimizer.opt_state[1].hyperparams


def _loss(model, batch):
  ids, lam, _ = batch
  total, parts = prosparse_loss(model, ids, lam)
  return total, {"loss": parts.total, "lm": parts.lm, "l1": parts.l1, "lam": parts.lam,
                 "zero_fraction": parts.zero_fraction}


def _set_learning_rate(model, optimizer, grads, batch):
  """Writes the step's learning rate into AdamW's injected hyperparameters (no metrics)."""
  del model, grads
  _hyperparams(optimizer)["learning_rate"][...] = batch[2]
  return {}


_STEP = loop.train_step(_loss, before_update=_set_learning_rate)
_HISTORY = ("losses", "lm_losses", "l1", "lambdas", "zero_fractions", "learning_rates", "seconds")


def schedule_values(schedule: Callable[[Any], Any], steps: int) -> np.ndarray:
  """``schedule(t)`` for ``t = 0 … steps−1`` (float64), in one jitted call when the schedule broadcasts over an array.

  Example:
    >>> schedule_values(l1_schedule(0.5, 1, [(3, 1.0)]), 4).tolist()
    [0.5, 0.5, 0.8535534143447876, 1.0]
  """
  try:
    values = np.asarray(jax.jit(schedule)(jnp.arange(steps)), np.float64)
    if values.shape == (steps,):
      return values
  except Exception:  # noqa: BLE001  (a schedule that does not broadcast: evaluate it step by step)
    pass
  return np.asarray([float(schedule(t)) for t in range(steps)], np.float64)


def train_prosparse(model: LlamaForCausalLM, batches: Any, *, l1: Callable[[Any], Any],
                    learning_rate: float = 5e-5, lr_schedule: str = "cosine", lr_warmup_steps: int = 0,
                    lr_min_ratio: float = 0.1, weight_decay: float = 0.0, clip_norm: float = 1.0,
                    state_dir: str | os.PathLike[str] | None = None, save_every: int = 0,
                    run_info: Mapping[str, Any] | None = None, progress: bool = True, mesh: Any = None,
                    callback: Callable[[int, LossParts], None] | None = None) -> TrainResult:
  r"""Continued training of a ReLU model on ``NLL + λ(t) R`` (see the module docstring), in its parameter dtype.

  Step ``t = 0 … S−1`` takes batch ``batches[t]`` and the factor ``λ = l1(t)``, and applies
  ``optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(lr(t), b1=0.9, b2=0.999,
  weight_decay=weight_decay))`` to every parameter (embeddings and norms included), where ``lr`` is ``"constant"``
  or ``"cosine"`` (decaying from ``learning_rate`` to ``lr_min_ratio · learning_rate`` at the last step), after a
  linear warm-up from 0 over ``lr_warmup_steps`` steps (:class:`ProSparseSettings`). The loop is
  :func:`proxjax.training.loop.run`.

  **Resuming.** With ``state_dir``, the model, the optimizer state and the histories are saved every ``save_every``
  steps (and after the last one) in the loop's format (an orbax checkpoint ``state_dir/step_NNNNNNN`` and
  :data:`proxjax.training.loop.STATE_FILE`). A later call with the same ``state_dir`` continues from the latest
  save, after checking that the run is the same one (the batches' hash, the λ values, the optimizer settings, the
  model config and ``run_info``); the data order is fixed by ``batches``, so a resumed run takes the same steps and
  ends with the same weights, bit for bit.

  Args:
    model: a ReLU :class:`~proxjax.models.LlamaForCausalLM` (convert with :func:`with_activation`) with float32
      parameters for training (bfloat16 parameters train, but AdamW updates below their resolution are lost). It is
      updated in place (also :attr:`TrainResult.model`).
    batches: ``(S, B, T)`` integer token windows, one batch per step.
    l1: the λ schedule (e.g. :func:`l1_schedule`).
    learning_rate: the peak learning rate.
    lr_schedule: ``"cosine"`` or ``"constant"``.
    lr_warmup_steps: linear learning-rate warm-up steps.
    lr_min_ratio: the cosine schedule's final learning rate, relative to ``learning_rate``.
    weight_decay: AdamW's decoupled weight decay.
    clip_norm: the global gradient-norm clip.
    state_dir: resume directory (``None``: nothing saved).
    save_every: save every this many steps (0: only after the last step).
    run_info: JSON-serialisable facts that identify the run (e.g. the source checkpoint), checked on resume.
    progress: a tqdm bar with loss, NLL, R, λ and the batch's zero fraction.
    mesh: a :mod:`proxjax.core.sharding` mesh: params and optimizer state on their declared shardings (kept there),
      each batch split over every device along its rows; it may span several processes (every process passes the
      same batches and builds its own devices' rows).
    callback: called as ``callback(step, parts)`` after every step (``parts`` as host floats).

  Returns:
    A :class:`TrainResult`.

  Raises:
    ValueError: a SiLU model, malformed batches, bad settings, or a ``state_dir`` of another run.
    FloatingPointError: the loss became NaN or infinite (the message names the step; the model then holds that
      step's weights, the last save in ``state_dir`` is intact).

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                 num_attention_heads=2, hidden_act="relu")
    >>> batches = np.random.default_rng(0).integers(0, 32, (3, 2, 8))
    >>> r = train_prosparse(LlamaForCausalLM(c, rngs=nnx.Rngs(0)), batches, l1=l1_schedule(0.01),
    ...                     learning_rate=1e-3, progress=False)
    >>> r.steps, len(r.losses), r.lambdas[0]
    (3, 3, 0.01)
  """
  settings = ProSparseSettings(learning_rate, lr_schedule, lr_warmup_steps, lr_min_ratio, weight_decay, clip_norm)
  if model.config.hidden_act != "relu":
    raise ValueError(f"ProSparse trains a ReLU model; this one has hidden_act={model.config.hidden_act!r}: convert "
                     "it first with with_activation(model, 'relu')")
  batches = np.asarray(batches)
  if batches.ndim != 3 or not np.issubdtype(batches.dtype, np.integer) or 0 in batches.shape or batches.shape[2] < 2:
    raise ValueError(f"batches must be integer token windows of shape (steps, batch, seqlen >= 2), got "
                     f"{batches.dtype} {batches.shape}")
  batches = batches.astype(np.int32)
  steps = int(batches.shape[0])
  lambdas = schedule_values(l1, steps)
  if not np.all(np.isfinite(lambdas)) or np.any(lambdas < 0):
    raise ValueError("the λ schedule gives negative or non-finite values")
  lrs = schedule_values(settings.schedule(steps), steps)

  def set_weight_decay(optimizer: nnx.Optimizer) -> None:
    _hyperparams(optimizer)["weight_decay"][...] = weight_decay

  optimizer = loop.optimizer_on(model, _optimizer_tx(float(clip_norm)), mesh, init=set_weight_decay)

  def batch(t: int) -> tuple[Any, ...]:
    ids = batches[t] if mesh is None else loop.batch_on(batches[t], mesh)
    return ids, *loop.scalars_on((lambdas[t], lrs[t]), mesh)

  def record(t: int, m: dict[str, Any]) -> dict[str, Any]:
    return {"losses": m["loss"], "lm_losses": m["lm"], "l1": m["l1"], "lambdas": m["lam"],
            "zero_fractions": m["zero_fraction"], "learning_rates": float(lrs[t]), "seconds": m["seconds"]}

  recipe = loop.Recipe("ProSparse", _STEP, _HISTORY, record, finite=("loss", "lm", "l1"),
                       postfix=(("loss", "loss", ".4f"), ("nll", "lm", ".4f"), ("l1", "l1", ".4g"),
                                ("lam", "lam", ".3g"), ("zeros", "zero_fraction", ".3f")),
                       hint="lower the learning rate or λ")
  fingerprint = {**dataclasses.asdict(settings), "batches_shape": list(batches.shape),
                 "batches_sha256": loop.digest([batches]), "lambdas_sha256": loop.digest([lambdas]),
                 "config": model.config.to_hf(), "param_dtype": jnp.dtype(model.param_dtype).name,
                 "run_info": dict(run_info or {})}
  report = None if callback is None else (
      lambda t, m: callback(t, LossParts(m["loss"], m["lm"], m["l1"], m["lam"], m["zero_fraction"])))
  trained = loop.run(recipe, model, optimizer, batch, steps=steps, state_dir=state_dir, save_every=save_every,
                     fingerprint=fingerprint, pin_shardings=mesh is not None, progress=progress, callback=report)
  return TrainResult(model, *(trained.history[k] for k in _HISTORY), steps, trained.resumed_from)


# ------------------------------------------------------------------------------------------------- measurement --


class ActivationSparsity(NamedTuple):
  """The fraction of exact zeros in the FFN intermediate activations ``a_l = act(gate_l(x))`` over evaluation tokens.

  Attributes:
    overall: ``Σ_l zeros_l / (L · N · I)``.
    per_layer: ``zeros_l / (N · I)`` for every block ``l``.
    tokens: ``N``, the evaluation tokens (every position of every window, ``windows · seqlen``).
    intermediate_size: ``I``, the units per layer.
    hidden_act: the model's gate activation.
    threshold: the model's FATReLU threshold (0 for plain ReLU / SiLU).
  """

  overall: float
  per_layer: tuple[float, ...]
  tokens: int
  intermediate_size: int
  hidden_act: str
  threshold: float


def _count_zeros(acts: Sequence[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.sum(a == 0, axis=(1, 2), dtype=jnp.int32) for a in acts])  # (L, B)


@nnx.jit
def _zero_counts(model, ids):
  return _count_zeros(model(ids, return_activations=True)[1])


@nnx.jit
def logits_and_zero_counts(model, ids):
  """The logits of ``ids`` and, per layer, the number of exact zeros of the FFN activations (one forward pass)."""
  logits, acts = model(ids, return_activations=True)
  return logits, _count_zeros(acts)


def activation_sparsity(model: LlamaForCausalLM, windows: Any, batch_size: int = 8, *,
                        progress: bool = False) -> ActivationSparsity:
  """Per-layer and overall fraction of **exact** zeros of ``act(gate(x))`` on token windows ``(W, T)``.

  Every position of every window counts (``N = W · T`` tokens). Windows go ``batch_size`` at a time through one
  jitted forward (the logits are not computed); a partial last batch is padded with copies of its first window (one
  compiled shape) and the padded rows are not counted. For a SiLU model exact zeros are rare (only ``x = 0`` or an
  underflow): its sparsity is ~0 by this measure, which is the point of the ReLU substitution.

  Raises:
    ValueError: bad windows or batch size.

  Example:
    >>> import numpy as np, jax.numpy as jnp
    >>> from flax import nnx
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                 num_attention_heads=2, hidden_act="relu")
    >>> model = LlamaForCausalLM(c, rngs=nnx.Rngs(0))
    >>> s = activation_sparsity(model, np.arange(30).reshape(3, 10), batch_size=2)
    >>> s.tokens, len(s.per_layer), 0.3 < s.overall < 0.7  # random weights: about half the ReLUs are off
    (30, 2, True)
  """
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  w = np.asarray(windows)
  if w.ndim != 2 or not np.issubdtype(w.dtype, np.integer) or w.shape[0] < 1 or w.shape[1] < 1:
    raise ValueError(f"windows must be a non-empty 2-D integer array (windows, seqlen), got {w.dtype} {w.shape}")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  n_windows, seqlen = w.shape
  bs = int(min(batch_size, n_windows))
  w = w.astype(np.int32)
  config = model.config
  zeros = np.zeros(config.num_hidden_layers, np.int64)
  bar = tqdm(total=n_windows, desc="activation sparsity", unit="window", disable=not progress)
  try:
    for start in range(0, n_windows, bs):
      batch, valid = padded_batch(w, start, bs)
      counts = np.asarray(_zero_counts(model, jnp.asarray(batch)))
      zeros += counts[:, :valid].astype(np.int64).sum(axis=1)
      bar.update(valid)
  finally:
    bar.close()
  units = n_windows * seqlen * config.intermediate_size
  return ActivationSparsity(float(zeros.sum() / (units * len(zeros))), tuple(float(z / units) for z in zeros),
                            int(n_windows * seqlen), int(config.intermediate_size), config.hidden_act,
                            float(config.activation_threshold))


def perplexity_and_sparsity(model: Any, eval_data: Any, batch_size: int = 8, progress: bool = False,
                            mesh: Any = None) -> dict[str, Any]:
  """Perplexity (:func:`proxjax.pipeline.evaluate.perplexity`, as ``proxjax eval``) and activation sparsity (as
  :func:`activation_sparsity`) from the same forward passes: the zero counts of each batch are taken next to its
  logits, and the padded rows of the last batch (``perplexity`` pads with copies of the batch's first window, in
  window order) are dropped. With the ``mesh`` the model is placed on, each batch is split over its devices and the
  counts are gathered to every process (:func:`proxjax.core.distributed.gather`)."""
  windows = np.asarray(eval_data.windows)
  n_windows, seqlen = windows.shape
  bs = min(batch_size, n_windows)
  if mesh is not None:  # evaluate.perplexity rounds the batch up to a multiple of the device count
    bs = -(-bs // mesh.size) * mesh.size
  counts: list[np.ndarray] = []

  def logits_fn(ids: jax.Array) -> jax.Array:
    logits, zeros = logits_and_zero_counts(model, ids)
    valid = min(bs, n_windows - bs * len(counts))
    counts.append(distributed.gather(zeros)[:, :valid].astype(np.int64).sum(axis=1))
    return logits

  ppl = evaluate.perplexity(logits_fn, windows, batch_size=batch_size, progress=progress, mesh=mesh)
  if len(counts) != -(-n_windows // bs):  # perplexity's batching changed: the zero counts would be misattributed
    raise RuntimeError(f"expected {-(-n_windows // bs)} batches from evaluate.perplexity, got {len(counts)}")
  c = model.config
  units = n_windows * seqlen * c.intermediate_size
  zeros = np.sum(counts, axis=0)
  return {"hidden_act": c.hidden_act, "threshold": c.activation_threshold, "ppl": ppl.ppl, "nll": ppl.nll,
          "predicted_tokens": ppl.predicted_tokens, "sparsity": float(zeros.sum() / (units * len(zeros))),
          "sparsity_per_layer": [float(z / units) for z in zeros], "sparsity_tokens": int(n_windows * seqlen)}
