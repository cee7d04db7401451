r"""Memory and time model of the block-by-block pruning pipeline (:func:`proxjax.pipeline.prune_model`).

:func:`estimate` says, from a model's :class:`~proxjax.models.LlamaConfig` alone (nothing is loaded or allocated),
how much host memory and how much accelerator memory **per device** a pruning run needs, and how many FLOPs and
bytes of memory traffic it costs; :func:`format_estimate` prints it as a table (``proxjax prune --dry-run``).
:func:`measure_pruner` and :func:`measure_block` compile the real jitted pieces on abstract arguments and return
XLA's own per-device numbers, to check the model on the machine at hand.

**What the pipeline holds** (notation: ``N`` calibration sequences of ``T`` tokens, hidden size ``D``, ``H`` query
and ``H_kv`` key/value heads of width ``d``, MLP width ``I``, ``b`` sequences per forward pass; ``p`` bytes per
parameter; ``P = model_devices · data_devices`` devices):

* Host: the calibration activations, float32 ``(N, T, D)``, twice (a block's inputs and its outputs while they are
  computed), i.e. ``2·4·N·T·D`` bytes; with ``offload`` also the whole model's weights.
* Accelerators, per device. The batch is rounded up to a multiple of ``P`` and split over every device
  (``b/P`` sequences each); a kernel ``(d_in, d_out)`` is split over ``model_devices`` along ``d_out`` when that
  divides it and replicated otherwise (:mod:`proxjax.core.sharding`); ``H`` is replicated. Writing
  ``K = 4·d_in·d_out_local`` (a float32 copy of the local kernel) and ``𝓗 = 4·d_in²``:

  - weights: the current block's parameters (``offload``), or the whole model (no ``offload``);
  - the Hessian states of the current true-sequential stage ``(q, k, v) → (o) → (gate, up) → (down)``: one float32
    ``d_in × d_in`` state (and its int32 count) **per distinct input**, since linears fed the same array share one
    (q/k/v one, gate/up one: the pipeline accumulates only the first linear of each group, as
    :func:`proxjax.pipeline.prune.input_owners` finds them, and hands the others the same state object); every
    true-sequential stage thus holds one state (a single stage, without ``true_sequential``: four);
  - during a Hessian pass: the states going in and the states coming out (``2·𝓗`` per distinct input), the batch
    (and the next one, dispatched asynchronously), and the pass's temporaries: the block's forward up to the stage's
    inputs (attention: the scores and probabilities ``2·4·(b/P)·H·T²`` plus ``q, k, v`` and the attention output;
    MLP: gate, up and their product ``3·4·(b/P)·T·I``), float32 copies of the kernels it uses when the parameters
    are not float32 or are split (fully-sharded forward), and per distinct input its masked copy and the partial
    ``XᵀX``;
  - while a linear is pruned (:func:`proxjax.prune_kernel`): the stage's states, ``H`` (``𝓗``), the previous
    linear's result (its kernel and mask; within a stage only: the first linear of a stage finds none), and the
    pruner's pieces (all float32): ``setup`` (in: the kernel and ``H``; out: ``H̃`` (``𝓗``) and ``K̃₀`` (``K``);
    temporaries ``2𝓗 + 1.5K``: the symmetrised ``H``, ``eigvalsh``'s work space, the sort for ``κ``; ``𝓗 + 1.5K``
    where no ``eigvalsh`` is needed), ``prox_loop`` (in ``K̃₀, H̃``; out ``Ṽ`` and ``V_prev``; temporaries
    ``7.3K``: the loop carry, ``Ṽ − K̃₀``, ``H̃(Ṽ − K̃₀)``, ``y`` and the prox's per-component intermediates;
    ``8.6K`` for the loop without the certificate, on a mesh or under ``CERTIFY.min_groups`` groups; the loops that
    go on with the open columns only are narrower and need less), ``prox_mask`` (in ``Ṽ``, ``K̃₀``; out ``Ṽ ⊙ M``
    and the mask, ``2K`` of temporaries; ``V_prev`` is dropped after it), ``finish`` (in
    ``Ṽ``, mask, ``K̃₀``, ``H̃``; out the kernel; temporaries: CG's ``r, p, H̃p`` ``3K``, GD's ``2K``, ``K`` without
    refinement, one ``K`` more when refined and the kernel is not float32), or for the baselines ``baseline``
    (SparseGPT: ``2𝓗 + 2.5K``; Wanda/magnitude ``K``) and ``start``; every array a piece returns stays alive until
    the linear is done;
  - during the propagation pass: the block's full forward on one batch.

  Nothing is left over between phases: the pipeline drops the previous stage's states, its last ``H`` and its last
  result (``states = hessian = res = None``) before the next stage's Hessian pass and before the propagation.

  The peak is the largest sum over these phases (:attr:`PipelineEstimate.phases` lists every phase of one block with
  its parts). Biases, norm scales, ``rope`` and scalars are counted; the constants of the temporaries were checked
  against XLA:CPU's buffer assignment (``tests/pipeline/test_memory.py``), which the model bounds from above within 2×.

* Time, per device and block (:attr:`PipelineEstimate.block_cost`): one Hessian pass per stage plus one propagation
  pass over all ``⌈N/b⌉·b`` (padded) sequences, each pass only up to the inputs it needs (the q/k/v pass is just
  the norm: XLA drops the rest); forward FLOPs ``2·tokens·Σ d_in d_out`` over the linears reached plus the attention
  ``4·tokens·T·H·d``; Hessians ``2·tokens·d_in²`` per distinct input; per linear: ``setup`` (``eigvalsh``,
  ``(4/3)·d_in³``, for prox and GD), the prox loop ``iterations × 2·d_in²·d_out`` (the ``H̃(Ṽ − K̃₀)`` matmul) plus
  :data:`PROX_PASSES` passes over the float32 kernel per iteration for the elementwise prox, CG/GD ``steps ×
  2·d_in²·d_out`` (CG's start adds two matmuls), the reported losses two or three more, SparseGPT
  ``(11/3)·d_in³`` (Cholesky, inverse, Cholesky) plus its sweep ``2·d_in²·d_out``. With rates,
  ``seconds = Σ_phase max(flops/flops_per_s, bytes/bytes_per_s)`` (a roofline: a lower bound, reached only by
  large, well-shaped matmuls, for everything but the prox loop's matmul, which is counted at the float32 rate although
  its default operands are bfloat16, ``ProxConfig.grad_dtype``: faster on devices that multiply bfloat16 faster, 2×
  on an AVX512-BF16 CPU, more on GPUs), plus host↔device transfers at ``host_bytes_per_s`` when given.

**Families.** Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` are one linear each (one input, one Hessian). A mixture
of experts (``num_experts = E``) counts ``E`` kernels per stacked expert linear (each pruned on its own, one at a
time, so a pruning phase holds one expert's ``H`` and pieces), the stage's ``E`` Hessian states ``E·4·d_in²`` and,
in a Hessian pass, every expert's masked input ``E·4·(b/P)·T·d_in``; the router ``(D, E)`` is dense. The forward runs
every expert on every token (the model's dispatch), so its FLOPs count all ``E``.

**Not counted**: allocator fragmentation and XLA's padding/alignment, the compiler's own workspace, the CUDA/ROCm
context and library handles (cuBLAS/cuSOLVER workspaces; several hundred MiB), JAX's preallocation (by default JAX
reserves 75 % of a GPU up front: set ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` to see real use), the token
embedding pass, checkpoint I/O, and Python objects. The time model assumes dense, well-used kernels: SparseGPT's
sweep is sequential (latency-bound on GPUs) and ``eigvalsh`` runs far below peak, so both take longer than their
FLOPs say, and small layers (SmolLM2's) are bound by per-iteration latency, not by the roofline. The number of
prox iterations depends on the data (:func:`proxjax.estimate_iterations`); the default
:data:`DEFAULT_PROX_ITERATIONS` is typical for ``β = 1.01, λ₀ = 0.01``.

**Checking it**: :func:`measure_pruner` / :func:`measure_block` return ``memory_analysis()`` of the compiled pieces
(per device), comparable with :func:`pruner_pieces` / :func:`block_passes`; XLA:GPU fuses more than XLA:CPU, so run
them on the target accelerator for its own numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from proxjax.pipeline import prune as _pipeline
from proxjax.pruning import pruner as _pruner
from proxjax.core import sharding as _sharding
from proxjax.models.llama import (EXPERT_NAMES, FUSED_LINEAR_NAMES, LINEAR_NAMES, MIXTRAL_EXPERT_NAMES, LlamaConfig,
                                  expert_names, linear_names)
from proxjax.pruning.methods import MethodConfig, ProxConfig, PruneConfig, SparseGPTConfig
from proxjax.pruning.refine import Preconditioned, as_precision

__all__ = [
    "DEFAULT_PROX_ITERATIONS",
    "CompiledMemory",
    "Cost",
    "Phase",
    "PieceMemory",
    "PipelineEstimate",
    "block_passes",
    "estimate",
    "format_estimate",
    "linear_cost",
    "measure_block",
    "measure_pruner",
    "pruner_pieces",
]

DEFAULT_PROX_ITERATIONS = 1500
"""Prox-gradient iterations per linear assumed for a schedule given by ``beta`` (not by a budget) when
``iterations`` is not given: the paper's schedule (``β = 1.01``, ``λ₀ = 0.01``) took 1072–1799 iterations per linear
on SmolLM2's layers (``benchmarks/README.md``). With a budget ``K`` (the default, 200) the loop takes about ``K``
plus a short tail (292–341 for ``K = 300``), and ``K`` is what the planner assumes. The actual count depends on the
layer (:func:`proxjax.estimate_iterations` estimates it from the kernel and ``H``)."""


PROX_PASSES = 8
"""Float32 kernel-sized memory passes per prox iteration (``Ṽ − K̃₀``, the matmul's output, ``y``, the prox's read
and write, the count of groups left, and slack): the elementwise prox is modelled as memory traffic."""

PROX_LOOP_TEMPS = 8.05
"""Float32 kernel-sized temporaries of the default prox loop on one device (FISTA with the 2-sparse certificate and
the column stop, kernels of at least :data:`proxjax.pruning.pruner.CERTIFY`'s ``min_groups`` groups: the FISTA
carry, the planar copies of ``K̃₀`` and the state (the loop runs on planar rows, ``proxjax.core.nm.to_planar``),
``Ṽ − K̃₀``, ``H̃(Ṽ − K̃₀)``, ``y``, the prox's intermediates, the group list and the test of the short program's
regime; the loop returns ``Ṽ`` and ``V_prev``, two ``K`` of outputs). The default bfloat16 gradient
(``ProxConfig.grad_dtype``) adds its copy of ``H̃`` (half of ``𝓗``) and the model half a ``K`` for ``Ṽ − K̃₀``
rounded; with those, XLA:CPU allocates 8.76 ``K`` at 256 × 512 and 8.69 ``K`` at 576 × 1536, 8.0 ``K`` besides them
(``tests/pipeline/test_memory.py``)."""

PROX_LOOP_TEMPS_PLAIN = 9.4
"""The same for the loop without the certificate (on a mesh, and for kernels under ``min_groups`` groups; the
prox's Newton loops carry three group-sized arrays more): XLA:CPU allocates 9.32 ``K`` at 256 × 512 and 576 × 1536
besides the bfloat16 copies (10.07 and 10.00 ``K`` in all)."""

PROX_MASK_TEMPS = 2
"""Float32 kernel-sized temporaries of the prox loop's end, ``prox_mask`` (the projection of the groups left and the
mask's scores): XLA:CPU allocates 2.0 ``K`` at 256 × 512 and 576 × 1536."""

CG_PASSES = 10
"""Float32 kernel-sized memory passes per CG step (``x, r, p`` read and written, ``H̃p``, the mask, the sums)."""

GD_PASSES = 6
"""Float32 kernel-sized memory passes per GD step."""

_F32 = 4
_I32 = 4
_EXPERTS = frozenset(EXPERT_NAMES + MIXTRAL_EXPERT_NAMES)  # stacked expert kernels (E, d_in, d_out), every family's
_SHORT = {n: n.split(".")[-1] for n in LINEAR_NAMES + FUSED_LINEAR_NAMES} | {n: n.split(".", 1)[1] for n in _EXPERTS}
# Which array feeds each linear (linears with the same key share one XᵀX and one Hessian state, as the pipeline's
# _input_owners finds them by tracing) and how deep into the block
# the forward must run to produce it: 0 the first norm, 1 the attention output, 2 the second norm, 3 the MLP hidden.
_INPUT = {"self_attn.q_proj": ("x", 0), "self_attn.k_proj": ("x", 0), "self_attn.v_proj": ("x", 0),
          "self_attn.o_proj": ("attn", 1), "mlp.gate_proj": ("y", 2), "mlp.up_proj": ("y", 2),
          "mlp.down_proj": ("hidden", 3), "self_attn.qkv_proj": ("x", 0), "mlp.gate_up_proj": ("y", 2),
          "mlp.experts.gate_proj": ("routed y", 2), "mlp.experts.up_proj": ("routed y", 2),
          "mlp.experts.down_proj": ("routed hidden", 3), "block_sparse_moe.experts.w1": ("routed y", 2),
          "block_sparse_moe.experts.w3": ("routed y", 2), "block_sparse_moe.experts.w2": ("routed hidden", 3)}
# A mixture of experts' inputs ("routed …") are held once per expert: each expert's masked copy of its input and its
# own Hessian state (E × d_in² per stacked kernel).
_FULL = 4  # the whole block (propagation)


# ----------------------------------------------------------------------------------------------------- results --


class PieceMemory(NamedTuple):
  """Predicted per-device bytes of one compiled piece, in XLA's terms (compare with :class:`CompiledMemory`).

  Attributes:
    arguments: every buffer passed in (also those the piece does not read: they are resident anyway).
    outputs: the buffers it returns.
    temps: its temporaries.
  """
  arguments: int
  outputs: int
  temps: int

  @property
  def total(self) -> int:
    """``arguments + outputs + temps``: the bytes live while the piece runs."""
    return self.arguments + self.outputs + self.temps


class CompiledMemory(NamedTuple):
  """XLA's ``memory_analysis()`` of one compiled piece, per device.

  Attributes:
    arguments: ``argument_size_in_bytes`` (only the arguments the compiled code keeps).
    outputs: ``output_size_in_bytes``.
    temps: ``temp_size_in_bytes``.
    aliases: ``alias_size_in_bytes`` (outputs that reuse an argument's buffer).
    inputs: the per-device bytes of every argument passed, including those XLA dropped as unused (they are still
      resident on the device).
  """
  arguments: int
  outputs: int
  temps: int
  aliases: int
  inputs: int

  @property
  def total(self) -> int:
    """``inputs + outputs + temps − aliases``: the bytes live while the piece runs (comparable with
    :attr:`PieceMemory.total`)."""
    return self.inputs + self.outputs + self.temps - self.aliases


class Cost(NamedTuple):
  """FLOPs and memory traffic of a part of the run, per device.

  Attributes:
    flops: floating-point operations.
    bytes: bytes read and written (device memory; for ``"host transfer"``: bytes over the host link).
    seconds: the roofline time ``max(flops/flops_per_s, bytes/bytes_per_s)``, or ``None`` without rates.
  """
  flops: float
  bytes: float
  seconds: float | None


class Phase(NamedTuple):
  """One phase of a block and the named per-device bytes live together during it.

  Attributes:
    name: e.g. ``"accumulate q_proj+k_proj+v_proj"``, ``"prune down_proj: prox_loop"``, ``"propagate"``.
    parts: name → bytes, every part live at the same time.
  """
  name: str
  parts: dict[str, int]

  @property
  def total(self) -> int:
    """The sum of the parts."""
    return sum(self.parts.values())


class PipelineEstimate(NamedTuple):
  """Result of :func:`estimate` (bytes are per device unless named host; costs per device).

  Attributes:
    config: the model's configuration.
    method: pruning method.
    refine: ``None``, ``"gd"`` or ``"cg"``.
    nsamples: calibration sequences ``N``.
    seqlen: tokens per sequence ``T``.
    batch_size: sequences per forward pass, as the pipeline uses it (at most ``N``, rounded up to a multiple of the
      device count).
    device_batch: sequences per device per pass.
    param_bytes: bytes per parameter.
    model_devices: devices along the ``model`` mesh axis.
    data_devices: devices along the ``data`` mesh axis.
    iterations: prox iterations assumed per linear (0 for the other methods).
    refine_steps: refinement steps assumed per linear (0 without refinement).
    true_sequential: stages ``(q,k,v) → (o) → (gate,up) → (down)``, or one stage.
    offload: only the current block's weights on the devices.
    host: name → host bytes (calibration activations; with ``offload`` the model's weights).
    host_bytes: their sum.
    phases: every phase of one block, in order, with its live parts.
    peak: the phase with the largest total.
    peak_bytes: ``peak.total``, the per-device accelerator peak.
    block_cost: per block, name → :class:`Cost` (``"forward"``, ``"hessians"``, ``"setup"``, ``"prox"``,
      ``"baseline"``, ``"refine"``, ``"losses"``, ``"host transfer"``; absent when zero).
    block: one block: the device FLOPs and bytes summed over ``block_cost`` (the host link's bytes left out), and
      the time, plus the host link's when ``host_bytes_per_s`` was given.
    total: the whole run: ``num_blocks × block`` (this counts a propagation pass for the last block too, which the
      pipeline skips: ``1/num_blocks`` of the forward FLOPs too many).
    num_blocks: decoder blocks.
    params: name → parameter counts: ``"total"``, ``"pruned"`` (the linears of every block, pruned to 2:4) and
      ``"dense"`` (embedding, ``lm_head``, norms and biases: not pruned).
  """
  config: LlamaConfig
  method: str
  refine: str | None
  nsamples: int
  seqlen: int
  batch_size: int
  device_batch: int
  param_bytes: int
  model_devices: int
  data_devices: int
  iterations: int
  refine_steps: int
  true_sequential: bool
  offload: bool
  host: dict[str, int]
  host_bytes: int
  phases: tuple[Phase, ...]
  peak: Phase
  peak_bytes: int
  block_cost: dict[str, Cost]
  block: Cost
  total: Cost
  num_blocks: int
  params: dict[str, int]


# ---------------------------------------------------------------------------------------------------- checking --


def _check_config(config: Any) -> LlamaConfig:
  if not isinstance(config, LlamaConfig):
    raise ValueError(f"config must be a proxjax.models.LlamaConfig (e.g. LlamaConfig.from_dir(model_dir)), "
                     f"got {type(config).__name__}")
  return config


def _positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return value


def _non_negative_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"{name} must be a non-negative int, got {value!r}")
  return value


def _check_method(method: str | MethodConfig | PruneConfig, refine: Any) -> PruneConfig:
  return _pruner.as_config(method, refine=refine)


def _param_bytes(config: LlamaConfig, param_bytes: int | None) -> int:
  if param_bytes is None:
    return 4 if config.dtype in (None, "float32") else 2
  return _positive_int("param_bytes", param_bytes)


def _rate(name: str, value: float | None) -> float | None:
  if value is not None and not (isinstance(value, int | float) and value > 0):
    raise ValueError(f"{name} must be a positive number or None, got {value!r}")
  return None if value is None else float(value)


# ---------------------------------------------------------------------------------------------------- shapes --


def _copies(c: LlamaConfig, name: str) -> int:
  """How many kernels (or inputs and Hessian states) ``name`` stands for: ``num_experts`` for a stacked expert kernel
  or a routed input, else 1."""
  return c.num_experts if name in _EXPERTS or name.startswith("routed") else 1


def _router_size(c: LlamaConfig) -> int:
  """The router's parameters per block (``hidden × num_experts``, dense), 0 without experts."""
  return c.hidden_size * c.num_experts if c.num_experts else 0


def _linears(c: LlamaConfig) -> dict[str, tuple[int, int, bool]]:
  """name → (d_in, d_out, has bias) of every prunable linear of a block (one expert's for stacked experts)."""
  q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
  if c.fused_projections:
    return {"self_attn.qkv_proj": (c.hidden_size, q_out + 2 * kv_out, bool(c.qkv_bias)),
            "self_attn.o_proj": (q_out, c.hidden_size, bool(c.o_bias)),
            "mlp.gate_up_proj": (c.hidden_size, 2 * c.intermediate_size, bool(c.mlp_bias)),
            "mlp.down_proj": (c.intermediate_size, c.hidden_size, bool(c.mlp_bias))}
  if c.num_experts:
    i = c.moe_intermediate_size
    gate, up, down = expert_names(c)
    return {"self_attn.q_proj": (c.hidden_size, q_out, bool(c.qkv_bias)),
            "self_attn.k_proj": (c.hidden_size, kv_out, bool(c.qkv_bias)),
            "self_attn.v_proj": (c.hidden_size, kv_out, bool(c.qkv_bias)),
            "self_attn.o_proj": (q_out, c.hidden_size, bool(c.o_bias)),
            gate: (c.hidden_size, i, False), up: (c.hidden_size, i, False), down: (i, c.hidden_size, False)}
  return {"self_attn.q_proj": (c.hidden_size, q_out, bool(c.qkv_bias)),
          "self_attn.k_proj": (c.hidden_size, kv_out, bool(c.qkv_bias)),
          "self_attn.v_proj": (c.hidden_size, kv_out, bool(c.qkv_bias)),
          "self_attn.o_proj": (q_out, c.hidden_size, bool(c.o_bias)),
          "mlp.gate_proj": (c.hidden_size, c.intermediate_size, bool(c.mlp_bias)),
          "mlp.up_proj": (c.hidden_size, c.intermediate_size, bool(c.mlp_bias)),
          "mlp.down_proj": (c.intermediate_size, c.hidden_size, bool(c.mlp_bias))}


def _split(size: int, devices: int) -> int:
  """The per-device length of a dimension split over ``devices`` (replicated when they do not divide it)."""
  return size // devices if size % devices == 0 else size


def _block_param_bytes(c: LlamaConfig, pb: int, model_devices: int) -> int:
  total = c.block_norm_size * pb  # the norm scales (replicated): 2 or 4 of hidden_size, + q/k norms
  if c.num_experts:  # the router kernel (hidden, E), split along E like any kernel's outputs
    total += c.hidden_size * _split(c.num_experts, model_devices) * pb
  for name, (d_in, d_out, bias) in _linears(c).items():
    local = d_out if name in _EXPERTS else _split(d_out, model_devices)  # stacked experts: replicated
    total += (d_in * local + (local if bias else 0)) * pb * _copies(c, name)
  return total


def _outer_param_bytes(c: LlamaConfig, pb: int, model_devices: int) -> int:
  """Embedding, final norm and ``lm_head`` per device."""
  vocab = _split(c.vocab_size, model_devices)
  return (vocab * c.hidden_size + c.hidden_size + (0 if c.tie_word_embeddings else c.hidden_size * vocab)) * pb


def _param_counts(c: LlamaConfig) -> dict[str, int]:
  lin = _linears(c)
  pruned = sum(d_in * d_out * _copies(c, n) for n, (d_in, d_out, _) in lin.items()) * c.num_hidden_layers
  block = c.block_norm_size + _router_size(c) + sum((d_in * d_out + (d_out if bias else 0)) * _copies(c, n)
                                                    for n, (d_in, d_out, bias) in lin.items())
  outer = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2) + c.hidden_size
  total = block * c.num_hidden_layers + outer
  return {"total": total, "pruned": pruned, "dense": total - pruned}


# --------------------------------------------------------------------------------------------- pruner pieces --


def _pruner_steps(d_in: int, d_out: int, method: str, refine: str | None, pb: int,
                  model_devices: int, on_mesh: bool) -> list[tuple[str, dict[str, int], dict[str, int], int]]:
  """The pieces :func:`proxjax.prune_kernel` runs for one linear, in order: ``(piece, arguments, outputs, temps)``
  with arguments and outputs as named per-device buffers (names shared across pieces: the same buffer)."""
  certified = not on_mesh and d_in // 4 * d_out >= _pruner.CERTIFY.min_groups  # the loop prune_kernel compiles
  local = _split(d_out, model_devices)
  k32, kp, kb, hh = _F32 * d_in * local, pb * d_in * local, d_in * local, _F32 * d_in * d_in
  small = 16 * _F32 * (d_in + local)  # per-row / per-column vectors and scalars
  pre = hh + 2 * _F32 * d_in + d_in + _F32  # H̃, scale, inv_scale, live, L
  eig = method == "prox" or refine == "gd"  # setup computes L = λ_max(H̃) (eigvalsh) only for these
  setup_temps = (2 if eig else 1) * hh + (3 * k32) // 2 + small
  steps = [("setup", {"kernel": kp, "H": hh}, {"pre": pre, "k0t": k32, "scalars": 2 * _F32}, setup_temps)]
  if method == "prox":
    low = hh // 2 + k32 // 2  # the default bfloat16 gradient: H̃ and Ṽ − K̃₀ rounded (ProxConfig.grad_dtype)
    steps.append(("prox_loop", {"k0t": k32, "pre.hessian": hh}, {"vt": k32, "vt prev": k32},
                  int((PROX_LOOP_TEMPS if certified else PROX_LOOP_TEMPS_PLAIN) * k32) + low + small))
    # The mask's piece; the loop's V_prev is dropped when it returns (and the loops that go on with the open columns
    # only, narrower, need less than the first).
    steps.append(("prox_mask", {"vt": k32, "k0t": k32}, {"vt": k32, "mask": kb, "vt prev": 0},
                  PROX_MASK_TEMPS * k32 + small))
  else:
    base_temps = 2 * hh + (5 * k32) // 2 if method == "sparsegpt" else k32
    steps.append(("baseline", {"kernel": kp, "H": hh}, {"base_kernel": kp, "mask": kb}, base_temps + small))
    steps.append(("start", {"base_kernel": kp, "mask": kb, "pre.scale": _F32 * d_in}, {"vt": k32}, 0))
  # Refined, a kernel stored in another dtype costs one more float32 kernel-sized temporary (XLA keeps the
  # refinement's float32 result apart from the cast; measured on XLA:CPU, bfloat16, 256x512 to 11008x4096).
  cast = k32 if refine is not None and pb != _F32 else 0
  finish_temps = {None: k32, "gd": 2 * k32, "cg": 3 * k32}[refine] + cast + small
  steps.append(("finish", {"vt": k32, "mask": kb, "k0t": k32, "pre": pre}, {"out": kp}, finish_temps))
  return steps


def pruner_pieces(d_in: int, d_out: int, *, method: str | MethodConfig | PruneConfig = "prox", refine: Any = "auto",
                  param_bytes: int = 4, model_devices: int = 1, on_mesh: bool | None = None
                  ) -> dict[str, PieceMemory]:
  r"""Predicted per-device memory of each compiled piece of :func:`proxjax.prune_kernel` for one kernel.

  With ``K = 4·d_in·d_out/model_devices`` (``d_out`` replicated when not divisible) and ``𝓗 = 4·d_in²``: ``setup``
  takes the kernel and ``H``, returns ``H̃`` and ``K̃₀`` and needs ``2𝓗 + 1.5K`` of temporaries (``𝓗 + 1.5K``
  without ``eigvalsh``: the baselines unless refined by GD); ``prox_loop`` takes ``K̃₀, H̃``, returns ``Ṽ`` and
  ``V_prev``, temporaries ``7.3K`` (``8.6K`` on a mesh, ``on_mesh`` (default: ``model_devices > 1``), or under
  ``CERTIFY.min_groups`` groups: the loop without the certificate); ``prox_mask`` takes ``Ṽ, K̃₀``, returns
  ``Ṽ ⊙ M`` and the mask, temporaries ``2K``; ``finish`` takes ``Ṽ``, the mask, ``K̃₀``, ``H̃``, returns the kernel,
  temporaries ``3K`` (CG), ``2K`` (GD) or ``K``, one ``K`` more when refined and the kernel is
  not float32 (the float32 result beside its cast); the baselines run ``baseline`` (SparseGPT
  ``2𝓗 + 2.5K``, else ``K``) and ``start`` instead of ``prox_loop``. Compare with :func:`measure_pruner`.

  Example:
    >>> from proxjax.pipeline.memory import pruner_pieces
    >>> p = pruner_pieces(256, 512)  # K = 512 KiB, 𝓗 = 256 KiB
    >>> sorted(p), p["prox_mask"].outputs  # Ṽ ⊙ M (float32) and the bool mask
    (['finish', 'prox_loop', 'prox_mask', 'setup'], 655360)
  """
  cfg = _check_method(method, refine)
  method, refine = cfg.method_name, cfg.refine_kind
  _positive_int("d_in", d_in), _positive_int("d_out", d_out)
  out = {}
  pb, md = _positive_int("param_bytes", param_bytes), _positive_int("model_devices", model_devices)
  mesh = md > 1 if on_mesh is None else bool(on_mesh)
  for name, args, outs, temps in _pruner_steps(d_in, d_out, method, refine, pb, md, mesh):
    out[name] = PieceMemory(sum(args.values()), sum(outs.values()), temps)
  return out


# --------------------------------------------------------------------------------------------- block passes --


class _Dims(NamedTuple):
  b: int  # sequences per device
  t: int
  c: LlamaConfig
  pb: int
  model_devices: int

  @property
  def act(self) -> int:  # one (b, T, D) float32 activation
    return _F32 * self.b * self.t * self.c.hidden_size


def _width(c: LlamaConfig, key: str) -> int:
  return {"x": c.hidden_size, "attn": c.num_attention_heads * c.head_dim, "y": c.hidden_size,
          "hidden": c.intermediate_size, "routed y": c.hidden_size, "routed hidden": c.moe_intermediate_size}[key]


def _used_linears(c: LlamaConfig, level: int) -> list[str]:
  """The linears the forward runs to produce the inputs at ``level`` (``_FULL``: all)."""
  return [n for n in linear_names(c) if _INPUT[n][1] < level]


def _forward_temps(dm: _Dims, level: int) -> tuple[int, int]:
  """Temporaries of the block's forward up to ``level``: ``(activations, kernels)``. Activations: the largest of its
  attention and MLP phases; kernels: float32 copies of the kernels it uses when they are stored in another dtype or
  sharded (gathered for the forward)."""
  c, b, t = dm.c, dm.b, dm.t
  x = dm.act
  a = _F32 * b * t * c.num_attention_heads * c.head_dim
  akv = _F32 * b * t * c.num_key_value_heads * c.head_dim
  scores = _F32 * b * c.num_attention_heads * t * t
  phases = [x]
  if level >= 1:
    phases.append(2 * scores + 4 * a + 2 * akv + x)  # scores + probabilities, q/k/v (repeated), attention output
  if level >= 2:
    phases.append(3 * x)
  if level >= 3:  # gate, up, their product (of one expert at a time, for a mixture of experts)
    phases.append(3 * _F32 * b * t * (c.moe_intermediate_size or c.intermediate_size) + 2 * x)
  kernels = 0
  if dm.pb != _F32 or dm.model_devices > 1:
    lin = _linears(c)
    kernels = sum(_F32 * lin[n][0] * lin[n][1] * _copies(c, n) for n in _used_linears(c, level))
  return max(phases), kernels


def _inputs(names: Sequence[str]) -> list[str]:
  """The distinct inputs of ``names`` (``_INPUT`` keys), in order: one Hessian state each, as the pipeline keeps
  (:func:`proxjax.pipeline.prune._hessians`: linears fed the same array share one state)."""
  return list(dict.fromkeys(_INPUT[n][0] for n in names))


def _states_bytes(c: LlamaConfig, names: Sequence[str]) -> int:
  """The Hessian states of a stage: one float32 ``d_in × d_in`` sum and an int32 count per distinct input."""
  return sum((_F32 * _width(c, key) ** 2 + _I32) * _copies(c, key) for key in _inputs(names))


def _pass_parts(dm: _Dims, names: tuple[str, ...] | None) -> dict[str, int]:
  """One call of the block forward (``names=None``) or of the Hessian accumulation for the stage ``names``: named
  per-device buffers other than the weights (``batch``, ``rope``, ``states in``, ``states out`` / ``output``,
  ``temps``); the states are one per distinct input."""
  c = dm.c
  rope = (2 if c.rope_local_theta is None else 4) * _F32 * dm.t * c.head_dim  # (cos, sin), + local for Gemma 3
  if names is None:
    acts, kernels = _forward_temps(dm, _FULL)
    return {"batch": dm.act, "rope": rope, "output": dm.act, "temps": acts + kernels}
  states = _states_bytes(c, names)
  acts, kernels = _forward_temps(dm, max(_INPUT[n][1] for n in names))
  hess = 0
  for key in _inputs(names):  # per distinct input: the input, its masked copy, the partial XᵀX
    d_in = _width(c, key)
    hess += (2 * _F32 * dm.b * dm.t * d_in + _F32 * d_in * d_in) * _copies(c, key)
  return {"batch": dm.act + dm.b * dm.t, "rope": rope, "states in": states, "states out": states,
          "temps": max(acts, hess) + kernels}


def _stage_key(names: Sequence[str]) -> str:
  return "accumulate " + "+".join(_SHORT.get(n, n) for n in names)


def block_passes(config: LlamaConfig, *, batch_size: int, seqlen: int, param_bytes: int | None = None,
                 model_devices: int = 1, data_devices: int = 1,
                 true_sequential: bool = True) -> dict[str, PieceMemory]:
  r"""Predicted per-device memory of one call of each jitted block pass of the pipeline.

  Keys: ``"forward"`` (the propagation pass) and ``"accumulate q_proj+k_proj+v_proj"`` etc., one per stage. The
  arguments are the block's weights (all of them: they are on the device whether the pass reads them or not), the
  batch ``(b/P, T, D)`` float32 (and its validity mask), ``rope`` and the stage's states in (one per distinct input:
  q/k/v share one, gate/up one); the outputs the block output or the states; the temporaries as in the module
  docstring. ``batch_size`` is rounded up to a multiple of
  ``P = model_devices · data_devices`` as the pipeline does. Compare with :func:`measure_block`.

  Example:
    >>> from proxjax.models import LlamaConfig
    >>> from proxjax.pipeline.memory import block_passes
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4)
    >>> p = block_passes(cfg, batch_size=2, seqlen=16)
    >>> p["accumulate q_proj+k_proj+v_proj"].outputs  # q, k, v share one 32 x 32 float32 state (+ its count)
    4100
  """
  c = _check_config(config)
  pb = _param_bytes(c, param_bytes)
  devices = _positive_int("model_devices", model_devices) * _positive_int("data_devices", data_devices)
  b = -(-_positive_int("batch_size", batch_size) // devices) * devices
  dm = _Dims(b // devices, _positive_int("seqlen", seqlen), c, pb, model_devices)
  weights = _block_param_bytes(c, pb, model_devices)
  out = {}
  for key, names in [("forward", None)] + [(_stage_key(s), s) for s in _pipeline.true_sequential_stages(
      linear_names(c), true_sequential)]:
    p = _pass_parts(dm, names)
    outputs = p.get("output", 0) + p.get("states out", 0)
    out[key] = PieceMemory(weights + p["batch"] + p["rope"] + p.get("states in", 0), outputs, p["temps"])
  return out


# -------------------------------------------------------------------------------------------------- estimate --


def _cost(flops: float, nbytes: float, flops_per_s: float | None, bytes_per_s: float | None) -> Cost:
  if flops_per_s is None and bytes_per_s is None:
    return Cost(float(flops), float(nbytes), None)
  t = max(flops / flops_per_s if flops_per_s else 0.0, nbytes / bytes_per_s if bytes_per_s else 0.0)
  return Cost(float(flops), float(nbytes), t)


def _add(costs: Sequence[Cost]) -> Cost:
  secs = [c.seconds for c in costs]
  return Cost(sum(c.flops for c in costs), sum(c.bytes for c in costs),
              None if any(s is None for s in secs) else sum(secs))


def _linear_work(d_in: int, d_out: int, method: str, refine: str | None, iterations: int, refine_steps: int,
                 pb: int, md: int, blocksize: int) -> dict[str, tuple[float, float]]:
  """Per-device ``(flops, bytes)`` of :func:`proxjax.prune_kernel` on one ``(d_in, d_out)`` kernel, by part:
  ``setup``, ``prox`` or ``baseline``, ``refine`` (with a refinement), ``losses``."""
  local = _split(d_out, md)
  mm = 2.0 * d_in * d_in * local
  k32, hh = _F32 * d_in * local, _F32 * d_in * d_in
  eig = method == "prox" or refine == "gd"
  out = {"setup": ((4.0 / 3.0) * d_in ** 3 if eig else 0.0, 4 * hh + 4 * k32 + pb * d_in * local)}
  if method == "prox":
    out["prox"] = (iterations * mm, iterations * (hh + PROX_PASSES * k32))
  elif method == "sparsegpt":
    bs = min(blocksize, d_in)
    out["baseline"] = ((11.0 / 3.0) * d_in ** 3 + mm + 2.0 * bs * d_in * local,
                       8 * hh + (d_in / bs) * (2 * k32 + _F32 * d_in * bs) + 2 * k32)
  else:
    out["baseline"] = (0.0, 3 * k32)
  if refine == "cg":
    out["refine"] = ((refine_steps + 2) * mm, (refine_steps + 2) * hh + refine_steps * CG_PASSES * k32)
  elif refine == "gd":
    out["refine"] = (refine_steps * mm, refine_steps * (hh + GD_PASSES * k32))
  n_loss = 3 if refine is not None else 2
  out["losses"] = (n_loss * mm, n_loss * (hh + 2 * k32))
  return out


def linear_cost(d_in: int, d_out: int, *, method: str | MethodConfig | PruneConfig = "prox", refine: Any = "auto",
                iterations: int | None = None, refine_steps: int | None = None, param_bytes: int = 4,
                model_devices: int = 1, blocksize: int = 128, flops_per_s: float | None = None,
                bytes_per_s: float | None = None) -> dict[str, Cost]:
  r"""FLOPs, memory traffic and roofline time of :func:`proxjax.prune_kernel` on one ``(d_in, d_out)`` kernel.

  The per-linear terms of :func:`estimate`'s time model (per device, ``d_out`` split over ``model_devices`` when
  that divides it), by part. With ``M = 2·d_in²·d_out`` (one ``H̃ V`` product), ``K = 4·d_in·d_out`` and
  ``𝓗 = 4·d_in²``:

  .. math::
     \text{setup} = \tfrac43 d_{in}^3 \;(\texttt{eigvalsh}; \text{prox and GD}), \quad
     \text{prox} = \text{iterations}\cdot\big(M \text{ FLOPs};\; 𝓗 + 8K \text{ bytes}\big), \quad
     \text{refine}_{CG} = (\text{steps} + 2)\, M, \quad \text{losses} = (2 \text{ or } 3)\, M,

  SparseGPT's ``baseline`` ``(11/3)·d_in³ + M`` plus its sweep, and each part's time
  ``max(flops/flops_per_s, bytes/bytes_per_s)`` (a roofline: a lower bound, but for the prox loop's matmul, counted
  at the float32 rate though its default operands are bfloat16).

  Args:
    d_in: the kernel's input size.
    d_out: its output size.
    method: ``"prox"``, ``"wanda"``, ``"sparsegpt"`` or ``"magnitude"``.
    refine: ``None``, ``"gd"`` or ``"cg"``; default the method's.
    iterations: prox iterations (a report's ``iterations``); default :data:`DEFAULT_PROX_ITERATIONS`; ignored for
      the other methods.
    refine_steps: refinement steps (a report's ``refine_steps``); default the refinement configuration's ``steps``
      (GD's 1000; CG's cap of 200, an upper bound: CG usually stops after a few dozen).
    param_bytes: bytes per stored parameter (the kernel read by ``setup``).
    model_devices: devices along the mesh's ``model`` axis.
    blocksize: SparseGPT's block size.
    flops_per_s: the device's sustained float32 (``Precision.HIGHEST``) matmul rate; ``None``: no times.
    bytes_per_s: its memory bandwidth; ``None``: no times.

  Returns:
    Part name → :class:`Cost`: ``"setup"``, ``"prox"`` (or ``"baseline"``), ``"refine"`` (with a refinement),
    ``"losses"``.

  Raises:
    ValueError: an unknown method or refinement, a size or count that is not a positive (non-negative) int.

  Example:
    >>> from proxjax.pipeline.memory import linear_cost
    >>> c = linear_cost(256, 512, iterations=100, refine_steps=10, flops_per_s=1e11, bytes_per_s=1e10)
    >>> sorted(c), c["prox"].flops == 100 * 2 * 256 ** 2 * 512, c["refine"].flops == 12 * 2 * 256 ** 2 * 512
    (['losses', 'prox', 'refine', 'setup'], True, True)
    >>> round(sum(part.seconds for part in c.values()), 4)  # 115 products of 67 MFLOP at 100 GFLOP/s, and setup
    0.0775
  """
  cfg = _check_method(method, refine)
  method, refine = cfg.method_name, cfg.refine_kind
  _positive_int("d_in", d_in), _positive_int("d_out", d_out)
  if method != "prox":
    iterations = 0
  iterations = _non_negative_int("iterations", DEFAULT_PROX_ITERATIONS if iterations is None else iterations)
  if refine_steps is None:
    refine_steps = 0 if cfg.refine is None else cfg.refine.steps
  refine_steps = 0 if refine is None else _non_negative_int("refine_steps", refine_steps)
  pb, md = _positive_int("param_bytes", param_bytes), _positive_int("model_devices", model_devices)
  rate = dict(flops_per_s=_rate("flops_per_s", flops_per_s), bytes_per_s=_rate("bytes_per_s", bytes_per_s))
  work = _linear_work(d_in, d_out, method, refine, iterations, refine_steps, pb, md,
                      _positive_int("blocksize", blocksize))
  return {key: _cost(f, nbytes, **rate) for key, (f, nbytes) in work.items()}


def _forward_flops_per_token(c: LlamaConfig, level: int) -> tuple[float, float, int]:
  """(FLOPs, activation floats written, whether attention runs) per token of the block's forward up to ``level``
  (the attention's own ``T``-dependent terms are added by the caller)."""
  lin = _linears(c)
  hd, h, t_attn = c.head_dim, c.num_attention_heads, 0
  flops = 4.0 * c.hidden_size  # the first norm
  floats = float(c.hidden_size)
  for n in _used_linears(c, level):  # every expert on every token: the model's dense dispatch
    flops += 2.0 * lin[n][0] * lin[n][1] * _copies(c, n)
    floats += lin[n][1]
  if level >= 1:
    t_attn = 1
    floats += 2 * h * hd  # rope'd q and the repeated k, v (approximately)
  if level >= 2:
    flops += 8.0 * c.hidden_size  # residual, second norm
    floats += 2 * c.hidden_size
  if level >= 3:
    flops += 6.0 * c.intermediate_size  # activation and product
    floats += c.intermediate_size
  if level >= _FULL:
    flops += c.hidden_size
    floats += c.hidden_size
  return flops, floats, t_attn


def estimate(config: LlamaConfig, *, nsamples: int, seqlen: int, method: str | MethodConfig | PruneConfig = "prox", refine: Any = "auto",
             batch_size: int = 8, param_bytes: int | None = None, model_devices: int = 1, data_devices: int = 1,
             iterations: int | None = None, refine_steps: int | None = None, true_sequential: bool = True,
             offload: bool = True, flops_per_s: float | None = None, bytes_per_s: float | None = None,
             host_bytes_per_s: float | None = None) -> PipelineEstimate:
  r"""Memory and time of :func:`proxjax.pipeline.prune_model` for a model, before running it.

  Host: ``2·4·N·T·D`` bytes of float32 calibration activations (a block's inputs and outputs), plus the model's
  weights with ``offload``. Accelerators, per device: the maximum over the phases of one block (every stage's
  Hessian pass, the pruning of every linear piece by piece, the propagation pass) of the bytes live together in that
  phase; see the module docstring for what each phase holds. Time: FLOPs and bytes per device (see the module
  docstring), and with ``flops_per_s`` / ``bytes_per_s`` the roofline ``Σ max(flops/F, bytes/B)``.

  Args:
    config: the model's :class:`~proxjax.models.LlamaConfig`.
    nsamples: calibration sequences ``N``.
    seqlen: tokens per sequence ``T``.
    method: the run's :class:`~proxjax.pruning.methods.PruneConfig` (its ``budget``, ``cap``, refinement steps and
      SparseGPT ``blocksize`` are read), or a method name / method configuration with ``refine``.
    refine: ``"auto"`` (the method's: ``"cg"`` for prox, none otherwise), ``"gd"``, ``"cg"``, ``None``.
    batch_size: sequences per forward pass (the pipeline's ``batch_size``).
    param_bytes: bytes per stored parameter; default from ``config.dtype`` (4 for float32, 2 for bfloat16/float16).
      Activations and the pruner always work in float32.
    model_devices: devices along the mesh's ``model`` axis (kernels' outputs split over them).
    data_devices: devices along ``data`` (more batch parallelism; kernels replicated).
    iterations: prox iterations per linear; default the configuration's ``budget`` if set, else
      :data:`DEFAULT_PROX_ITERATIONS`, at most its ``cap``.
    refine_steps: refinement steps per linear; default the refinement configuration's ``steps`` (CG's cap: an
      upper bound).
    true_sequential: the pipeline's ``true_sequential``.
    offload: the pipeline's ``offload`` (only the current block on the devices); without it the whole model is.
    flops_per_s: one device's sustained FLOP rate (float32; the pruner's matmuls use ``Precision.HIGHEST``).
    bytes_per_s: one device's memory bandwidth.
    host_bytes_per_s: host↔device bandwidth (activations and, with ``offload``, weights cross it every block).

  Returns:
    A :class:`PipelineEstimate`.

  Raises:
    ValueError: ``config`` is not a ``LlamaConfig``, a count is not a positive int, an unknown method or refinement.

  Example:
    >>> from proxjax.models import LlamaConfig
    >>> from proxjax.pipeline.memory import estimate
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4)
    >>> est = estimate(cfg, nsamples=4, seqlen=16, batch_size=2)
    >>> est.host["calibration activations"]  # 2 copies x 4 x 16 x 32 float32
    16384
    >>> est.peak.name, est.peak_bytes
    ('prune down_proj: prox_loop', 211996)
    >>> est.total.flops == est.num_blocks * est.block.flops
    True
  """
  c = _check_config(config)
  cfg = _check_method(method, refine)
  method, refine = cfg.method_name, cfg.refine_kind
  n = _positive_int("nsamples", nsamples)
  t = _positive_int("seqlen", seqlen)
  _positive_int("batch_size", batch_size)
  pb = _param_bytes(c, param_bytes)
  md = _positive_int("model_devices", model_devices)
  dd = _positive_int("data_devices", data_devices)
  flops_per_s, bytes_per_s = _rate("flops_per_s", flops_per_s), _rate("bytes_per_s", bytes_per_s)
  host_bytes_per_s = _rate("host_bytes_per_s", host_bytes_per_s)
  if isinstance(cfg.method, ProxConfig):
    if iterations is None:
      how, value = cfg.method.growth
      iterations = min(int(value) if how == "budget" else DEFAULT_PROX_ITERATIONS, cfg.method.cap)
    iterations = _non_negative_int("iterations", iterations)
  else:
    iterations = 0
  if refine_steps is None:
    refine_steps = 0 if cfg.refine is None else cfg.refine.steps
  refine_steps = 0 if refine is None else _non_negative_int("refine_steps", refine_steps)
  blocksize = cfg.method.blocksize if isinstance(cfg.method, SparseGPTConfig) else SparseGPTConfig().blocksize

  devices = md * dd
  b = -(-min(batch_size, n) // devices) * devices
  dm = _Dims(b // devices, t, c, pb, md)
  lin = _linears(c)
  stages = _pipeline.true_sequential_stages(linear_names(c), true_sequential)
  block_w = _block_param_bytes(c, pb, md)
  weights = block_w if offload else block_w * c.num_hidden_layers + _outer_param_bytes(c, pb, md)
  counts = _param_counts(c)
  acts = _F32 * n * t * c.hidden_size
  host = {"calibration activations": 2 * acts}
  if offload:
    host["model weights"] = counts["total"] * pb

  # ---- memory: the phases of one block, in order.
  def result_bytes(name: str) -> int:
    local = _split(lin[name][1], md)
    return lin[name][0] * local * (pb + 1)  # the pruned kernel and its bool mask

  # The pipeline drops the previous stage's states, H and result before each Hessian pass and the propagation:
  # nothing of one stage is live in the next stage's pass.
  phases: list[Phase] = []
  for stage in stages:
    p = _pass_parts(dm, stage)
    prev_name = None  # the first linear of a stage finds no previous result
    phases.append(Phase(_stage_key(stage), {
        "weights": weights, "rope": p["rope"], "batch": p["batch"], "next batch (async)": p["batch"],
        "hessian states in": p["states in"], "hessian states out": p["states out"], "pass temporaries": p["temps"]}))
    for name in stage:
      d_in, d_out, _ = lin[name]
      held: dict[str, int] = {}
      best: Phase | None = None
      for piece, args, outs, temps in _pruner_steps(d_in, d_out, method, refine, pb, md, md * dd > 1):
        arrays = {k: v for k, v in {**held, **args}.items() if k not in ("kernel", "H", "pre.hessian", "pre.scale")}
        phase = Phase(f"prune {_SHORT[name]}: {piece}", {
            "weights": weights, "rope": p["rope"], "hessian states": p["states in"],
            "hessian H": _F32 * d_in * d_in, "previous result": result_bytes(prev_name) if prev_name else 0,
            "pruner arrays": sum(arrays.values()), "pruner outputs": sum(outs.values()), "pruner temporaries": temps})
        best = phase if best is None or phase.total > best.total else best
        held.update(outs)
      phases.append(best)
      prev_name = name
  if c.num_hidden_layers > 1:
    p = _pass_parts(dm, None)
    phases.append(Phase("propagate", {"weights": weights, "rope": p["rope"], "batch": p["batch"],
                                      "output": p["output"], "pass temporaries": p["temps"]}))
  peak = max(phases, key=lambda ph: ph.total)

  # ---- time, per device and block.
  rate = dict(flops_per_s=flops_per_s, bytes_per_s=bytes_per_s)
  passes = -(-n // b)
  tokens = passes * b * t / devices  # per device, padding included
  fwd_flops = fwd_bytes = hess_flops = hess_bytes = 0.0
  levels = [max(_INPUT[nm][1] for nm in s) for s in stages] + ([_FULL] if c.num_hidden_layers > 1 else [])
  for level in levels:
    f, floats, attn = _forward_flops_per_token(c, level)
    f += attn * (4.0 * t * c.num_attention_heads * c.head_dim + 5.0 * c.num_attention_heads * t)
    floats += attn * 2.0 * c.num_attention_heads * t  # scores and probabilities
    fwd_flops += tokens * f
    used_w = sum(lin[nm][0] * lin[nm][1] * _copies(c, nm) for nm in _used_linears(c, level))
    fwd_bytes += tokens * 2 * _F32 * floats + passes * used_w * (pb + (2 * _F32 if pb != _F32 or md > 1 else 0))
  for stage in stages:
    for key in _inputs(stage):
      d_in = _width(c, key)
      hess_flops += 2.0 * tokens * d_in * d_in
      hess_bytes += tokens * _F32 * d_in
    hess_bytes += passes * 2 * _states_bytes(c, stage)  # every state read and written per batch
  costs = {"forward": _cost(fwd_flops, fwd_bytes, **rate), "hessians": _cost(hess_flops, hess_bytes, **rate)}
  work: dict[str, list[float]] = {}  # per-linear parts summed over the block, then timed as one roofline each
  for name in linear_names(c):
    d_in, d_out, _ = lin[name]
    for key, (f, nbytes) in _linear_work(d_in, d_out, method, refine, iterations, refine_steps, pb, md,
                                          blocksize).items():
      acc = work.setdefault(key, [0.0, 0.0])
      acc[0] += f * _copies(c, name)  # each expert's kernel is pruned on its own
      acc[1] += nbytes * _copies(c, name)
  costs.update({key: _cost(f, nbytes, **rate) for key, (f, nbytes) in work.items()})
  padded = passes * b * t * c.hidden_size * _F32 / devices  # one pass's batches, per device
  transfer = len(levels) * padded + (padded if c.num_hidden_layers > 1 else 0)  # batches in, propagated outputs out
  if offload:
    transfer += 2 * block_w
  link = Cost(0.0, float(transfer), None if host_bytes_per_s is None else transfer / host_bytes_per_s)
  device = _add(list(costs.values()))
  costs["host transfer"] = link
  seconds = device.seconds
  if seconds is not None and link.seconds is not None:
    seconds += link.seconds
  block = Cost(device.flops, device.bytes, seconds)  # device memory traffic; the link's time added when known
  total = Cost(block.flops * c.num_hidden_layers, block.bytes * c.num_hidden_layers,
               None if block.seconds is None else block.seconds * c.num_hidden_layers)
  return PipelineEstimate(c, method, refine, n, t, b, b // devices, pb, md, dd, iterations, refine_steps,
                          true_sequential, offload, host, sum(host.values()), tuple(phases), peak, peak.total,
                          costs, block, total, c.num_hidden_layers, counts)


# ---------------------------------------------------------------------------------------------------- format --


def _gib(x: float) -> str:
  return f"{x / 2 ** 30:10.3f}"


def _seconds(s: float | None) -> str:
  if s is None:
    return "         -"
  if s < 120:
    return f"{s:9.2f}s"
  if s < 7200:
    return f"{s / 60:8.1f}min"
  return f"{s / 3600:9.2f}h"


def format_estimate(est: PipelineEstimate) -> str:
  """A human-readable table of a :class:`PipelineEstimate` (GiB, TFLOP, and estimated times when rates were given).

  Example:
    >>> from proxjax.models import LlamaConfig
    >>> from proxjax.pipeline.memory import estimate, format_estimate
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4)
    >>> print(format_estimate(estimate(cfg, nsamples=4, seqlen=16)).splitlines()[0])
    proxjax pruning estimate: LlamaForCausalLM, 2 blocks (hidden 32, intermediate 64, 4/4 heads), 24,736 parameters
  """
  c = est.config
  dtype = {4: "float32", 2: "bfloat16/float16"}.get(est.param_bytes, f"{est.param_bytes} bytes each")
  refine = "no refinement" if est.refine is None else f"{est.refine} {est.refine_steps} steps"
  its = f", {est.iterations} prox iterations" if est.method == "prox" else ""
  lines = [
      f"proxjax pruning estimate: {c.architecture}, {est.num_blocks} blocks (hidden {c.hidden_size}, intermediate "
      f"{c.intermediate_size}, {c.num_attention_heads}/{c.num_key_value_heads} heads), {est.params['total']:,} "
      "parameters",
      f"calibration {est.nsamples} x {est.seqlen} tokens, batch {est.batch_size} ({est.device_batch} per device); "
      f"method {est.method}{its}, {refine}; parameters {dtype}; devices {est.model_devices * est.data_devices} "
      f"(model {est.model_devices} x data {est.data_devices}); offload {'on' if est.offload else 'off'}",
      "",
      f"{'host memory':<44}{'GiB':>10}",
  ]
  lines += [f"  {k:<42}{_gib(v)}" for k, v in est.host.items()]
  lines += [f"  {'total':<42}{_gib(est.host_bytes)}", "",
            f"{'accelerator memory per device, peak phase':<44}{'GiB':>10}", f"  [{est.peak.name}]"]
  lines += [f"  {k:<42}{_gib(v)}" for k, v in est.peak.parts.items() if v]
  lines += [f"  {'peak':<42}{_gib(est.peak_bytes)}", "", f"{'per phase (one block)':<44}{'GiB':>10}"]
  lines += [f"  {ph.name:<42}{_gib(ph.total)}" for ph in est.phases]
  lines += ["", f"{'compute per device':<30}{'TFLOP':>10}{'GB moved':>11}{'time':>11}"]
  for k, v in est.block_cost.items():
    lines.append(f"  {k:<28}{v.flops / 1e12:10.3f}{v.bytes / 1e9:11.2f}{_seconds(v.seconds):>11}")
  lines.append(f"  {'one block':<28}{est.block.flops / 1e12:10.3f}{est.block.bytes / 1e9:11.2f}"
               f"{_seconds(est.block.seconds):>11}")
  lines.append(f"  {f'whole model ({est.num_blocks} blocks)':<28}{est.total.flops / 1e12:10.3f}"
               f"{est.total.bytes / 1e9:11.2f}{_seconds(est.total.seconds):>11}")
  lines.append("(not counted: allocator fragmentation, compiler workspace, the CUDA context, JAX's preallocation)")
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- measure --


def _analysis(jitted: Any, args: Sequence[Any], inputs: int) -> CompiledMemory:
  compiled = jitted.lower(*args).compile()
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError(f"this backend ({jax.default_backend()}) gives no memory analysis")
  return CompiledMemory(int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.temp_size_in_bytes),
                        int(m.alias_size_in_bytes), int(inputs))


def _local_bytes(x: jax.ShapeDtypeStruct, sharding: Any) -> int:
  shape = x.shape if sharding is None else sharding.shard_shape(x.shape)
  return math.prod(shape) * jnp.dtype(x.dtype).itemsize


def _lowerable(fn: Any) -> Any:
  """The ``jax.jit`` object behind a piece (:func:`proxjax.core.xla.jit_fast_on_cpu` wraps two)."""
  if hasattr(fn, "lower"):
    return fn
  return fn.fast if jax.default_backend() == "cpu" else fn.strict


def measure_pruner(d_in: int, d_out: int, *, method: str | MethodConfig | PruneConfig = "prox", refine: Any = "auto",
                   param_dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None) -> dict[str, CompiledMemory]:
  """XLA's per-device memory of the compiled pieces of :func:`proxjax.prune_kernel` for a ``(d_in, d_out)`` kernel.

  Compiles (nothing is allocated: the arguments are ``jax.ShapeDtypeStruct``) exactly the pieces the pruner runs,
  ``proxjax.pruning.pruner.compiled_piece(name, mesh, shape, statics)`` with the statics :func:`proxjax.prune_kernel` passes
  (``loop="while"``, ``precision="highest"``, the refinement, SparseGPT's default ``blocksize=128``), and returns
  their ``memory_analysis()``; keys as in :func:`pruner_pieces`. On a ``mesh`` the kernel-shaped arrays are split
  as :mod:`proxjax.core.sharding` declares.

  Example:
    >>> from proxjax.pipeline.memory import measure_pruner
    >>> m = measure_pruner(16, 8, method="wanda")
    >>> sorted(m), m["baseline"].inputs  # kernel (512 B) + H (1024 B) + damp
    (['baseline', 'finish', 'setup', 'start'], 1540)
  """
  cfg = _check_method(method, refine)
  method, refine = cfg.method_name, cfg.refine_kind
  shape = (_positive_int("d_in", d_in), _positive_int("d_out", d_out))
  f32, i32, sds = jnp.float32, jnp.int32, jax.ShapeDtypeStruct
  param_dtype = jnp.dtype(param_dtype)
  kernel, hess = sds(shape, param_dtype), sds((d_in, d_in), f32)
  k32, mask = sds(shape, f32), sds(shape, jnp.bool_)
  pre = Preconditioned(sds((d_in,), f32), sds((d_in,), f32), hess, sds((d_in,), jnp.bool_), sds((), f32))
  s32, si = sds((), f32), sds((), i32)
  highest = as_precision(cfg.precision)
  pieces: list[tuple[str, dict[str, Any], tuple[Any, ...]]] = [
      ("setup", {"lipschitz": method == "prox" or refine == "gd"}, (kernel, hess, s32))]
  if method == "prox":
    pieces.append(("prox_loop", _pruner.prox_loop_statics(cfg.method, shape, mesh, precision=highest),
                   (k32, hess, s32, s32, s32, s32, si, si, si, si, s32)))
    pieces.append(("prox_mask", {}, (k32, k32)))
  else:
    blocksize = cfg.method.blocksize if isinstance(cfg.method, SparseGPTConfig) else SparseGPTConfig().blocksize
    pieces.append(("baseline", {"method": method, "n": cfg.n, "m": cfg.m, "blocksize": blocksize},
                   (kernel, hess, s32)))
  pieces.append(("finish", {"refine": refine, "precision": highest, "out_dtype": param_dtype},
                 (k32, mask, k32, pre, s32, si, s32, si)))
  out = {}
  for name, statics, args in pieces:
    key = tuple(sorted(statics.items()))
    fn = _lowerable(_pruner.compiled_piece(name, mesh, shape, key))
    letters = _pruner.PIECES[name][1]
    if name == "finish" and method != "prox":  # the baselines' start: Ṽ = diag(d)·(kernel ⊙ mask), its own jit
      start_args = (kernel, mask, sds((d_in,), f32))
      out["start"] = _analysis(_pruner.start_preconditioned, start_args, sum(
          _local_bytes(a, _sharding.kernel_sharding(mesh, shape) if mesh is not None and a.ndim == 2 else None)
          for a in start_args))
    inputs = 0
    for letter, arg in zip(letters, args):
      sharding = None
      if mesh is not None and letter == "K":
        sharding = _sharding.kernel_sharding(mesh, shape)
      inputs += sum(_local_bytes(leaf, sharding) for leaf in jax.tree.leaves(arg))
    out[name] = _analysis(fn, args, inputs)
  return out


def measure_block(config: LlamaConfig, *, batch_size: int, seqlen: int, param_dtype: Any = None,
                  true_sequential: bool = True, mesh: jax.sharding.Mesh | None = None,
                  passes: Sequence[str] | None = None) -> dict[str, CompiledMemory]:
  """XLA's per-device memory of the pipeline's compiled block passes (the forward and each stage's accumulation).

  Builds an abstract model (``nnx.eval_shape``: nothing is allocated), takes block 0's ``graphdef, params`` and
  compiles ``proxjax.pipeline.prune.block_function(kind, graphdef, names, mesh, act_shape)`` on ``jax.ShapeDtypeStruct``
  arguments, as the pipeline calls it (``batch_size`` rounded up to a multiple of the mesh's devices; a stage's
  accumulation with ``names`` its distinct-input linears only, as :func:`proxjax.pipeline.prune.input_owners` finds them,
  and one state each). Keys as in :func:`block_passes` (a stage is named after all its linears);
  :attr:`CompiledMemory.inputs` counts every argument, also the parameters a stage's pass does not read.

  Args:
    config: the model's configuration (one block is enough: use a config with ``num_hidden_layers=1``).
    batch_size: sequences per pass.
    seqlen: tokens per sequence.
    param_dtype: parameter dtype; default from ``config.dtype``.
    true_sequential: stages as in the pipeline.
    mesh: a ``("data", "model")`` mesh (parameters and batches placed as the pipeline places them), or ``None``.
    passes: the keys to compile (e.g. ``["forward"]``); default all.

  Raises:
    ValueError: an unknown key in ``passes``.

  Example:
    >>> from proxjax.models import LlamaConfig
    >>> from proxjax.pipeline.memory import measure_block
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4)
    >>> m = measure_block(cfg, batch_size=2, seqlen=16, passes=["forward"])
    >>> m["forward"].outputs, m["forward"].inputs  # output (2, 16, 32) float32; weights + batch + rope
    (4096, 46336)
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from proxjax.pruning import calibration as _cal  # pylint: disable=import-outside-toplevel
  from proxjax.models.llama import LlamaForCausalLM, dtype_from_name  # pylint: disable=import-outside-toplevel

  c = _check_config(config)
  if param_dtype is None:
    param_dtype = dtype_from_name(c.dtype) or jnp.float32
  devices = 1 if mesh is None else mesh.size
  b = -(-_positive_int("batch_size", batch_size) // devices) * devices
  t = _positive_int("seqlen", seqlen)
  one = c if c.num_hidden_layers == 1 else dataclasses.replace(  # block 0 (its layer type, if the family has them)
      c, num_hidden_layers=1, layer_types=None if c.layer_types is None else c.layer_types[:1])
  model = nnx.eval_shape(lambda: LlamaForCausalLM(one, rngs=nnx.Rngs(0), param_dtype=param_dtype))
  graphdef, params = nnx.split(model.model.layers[0])
  sds, f32 = jax.ShapeDtypeStruct, jnp.float32
  act_shape = (b, t, c.hidden_size)
  if mesh is not None:
    shardings = _sharding.tree_shardings(params, mesh)
    params = jax.tree.map(lambda x, s: sds(x.shape, x.dtype, sharding=s), params, shardings)
    p_bytes = sum(_local_bytes(x, x.sharding) for x in jax.tree.leaves(params))
    act_s = _sharding.activation_sharding(mesh, act_shape)
    valid_s = _sharding.activation_sharding(mesh, act_shape[:2])
  else:
    p_bytes = sum(_local_bytes(x, None) for x in jax.tree.leaves(params))
    act_s = valid_s = None
  x, valid = sds(act_shape, f32), sds(act_shape[:2], jnp.bool_)
  rope = jax.eval_shape(model.rope, jnp.arange(t))  # (cos, sin), or four tables with a local RoPE base
  base = p_bytes + _local_bytes(x, act_s) + sum(_local_bytes(r, None) for r in rope)
  stages = _pipeline.true_sequential_stages(linear_names(c), true_sequential)
  keys = ["forward"] + [_stage_key(s) for s in stages]
  wanted = set(keys if passes is None else passes)
  if wanted - set(keys):
    raise ValueError(f"unknown passes {sorted(wanted - set(keys))}; expected some of {keys}")
  out = {}
  if "forward" in wanted:
    fn = _pipeline.block_function("forward", graphdef, (), mesh, act_shape)
    out["forward"] = _analysis(fn, (params, x, rope), base)
  lin = _linears(c)
  hashed = _pipeline.ShapeKey
  plain = lambda tree: hashed(jax.tree.map(lambda a: sds(a.shape, a.dtype), tree))  # noqa: E731
  for stage in stages:
    if _stage_key(stage) not in wanted:
      continue
    # As _hessians calls it: only the first linear of each group fed the same array, one state each.
    owners = _pipeline.input_owners(graphdef, tuple(stage), act_shape, plain(rope),
                                     plain(params))
    distinct = tuple(dict.fromkeys(owners[n] for n in stage))
    stack = lambda n: (c.num_experts,) if n in _EXPERTS else ()  # noqa: E731  (a state per expert)
    states = {n: _cal.HessianState(sds(stack(n) + (lin[n][0],) * 2, f32), sds(stack(n), jnp.int32))
              for n in distinct}
    inputs = base + _local_bytes(valid, valid_s) + sum(_local_bytes(v, None) for v in jax.tree.leaves(states))
    fn = _pipeline.block_function("accumulate", graphdef, distinct, mesh, act_shape)
    out[_stage_key(stage)] = _analysis(fn, (params, x, valid, rope, states), inputs)
  return out
