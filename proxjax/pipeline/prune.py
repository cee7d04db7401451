r"""Whole-model pruning: sequential block-by-block calibration (docs/method.md, "Pipeline"), and pruning of any Flax parameter pytree.

:func:`prune_model` prunes every selected linear of a decoder-only model, one block at a time, each to minimize its
local loss ``½ tr((K − K₀)ᵀ H (K − K₀))`` with ``H = X Xᵀ / n`` over the calibration tokens that reach it:

1. the calibration sequences are embedded once; their hidden states are the inputs of block 0;
2. for block ``b``, with ``true_sequential`` (default, docs/method.md, "Pipeline") the projections are pruned in stages
   ``(q, k, v) → (o) → (gate, up) → (down)``: before each stage the block is re-run on the inputs with the stages
   already pruned, so a projection's ``H`` sees the error of the pruned projections before it; without it, every
   ``H`` comes from one pass of the dense block;
3. the block is re-run with its pruned weights; its outputs are the inputs of block ``b + 1``.

Only the current block's inputs (``(sequences, seqlen, hidden)``, on host), its Hessians and its weights are worked
on at a time. With ``state_dir`` each finished block's pruned kernels and report are written atomically, and a later
call with the same ``state_dir`` and run (model, method, options, calibration) skips them: their weights are loaded,
and the calibration states are propagated through them again (a forward pass, cheap next to pruning), so a killed
run loses at most the block it was in.

The model interface this needs (:class:`proxjax.models.LlamaForCausalLM` has it): ``model.embed(ids)``,
``model.rope(positions)``, ``model.model.layers`` (a sequence of blocks) and ``block(h, rope, return_inputs=True)``
returning ``(h_out, {linear name: its input activations})`` where each linear is the submodule at that dotted name
with a ``kernel`` parameter ``(d_in, d_out)``.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proxjax.core import distributed as _distributed
from proxjax.core import nm as _nm
from proxjax.core import sharding as _sharding
from proxjax.core.files import atomic_write as _atomic_write
from proxjax.core.files import open_run_dir as _open_run_dir
from proxjax.core.files import write_json as _write_json
from proxjax.core.spec import flat_spec
from proxjax.models.llama import EXPERT_NAMES, LINEAR_NAMES, MIXTRAL_EXPERT_NAMES, RoutedInputs, projection_spec
from proxjax.models.llama import linear_names as _family_linears
from proxjax.pruning import calibration as _cal
from proxjax.pruning import pruner as _pruner
from proxjax.pruning.methods import MethodConfig, PruneConfig

TRUE_SEQUENTIAL_STAGES = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
"""The order in which ``true_sequential`` prunes a LLaMA block's projections (SparseGPT's grouping)."""

FAMILY_STAGES = (
    TRUE_SEQUENTIAL_STAGES[0] + ("self_attn.qkv_proj",),
    TRUE_SEQUENTIAL_STAGES[1],
    TRUE_SEQUENTIAL_STAGES[2] + ("mlp.gate_up_proj", EXPERT_NAMES[0], EXPERT_NAMES[1], MIXTRAL_EXPERT_NAMES[0],
                                 MIXTRAL_EXPERT_NAMES[1]),
    TRUE_SEQUENTIAL_STAGES[3] + (EXPERT_NAMES[2], MIXTRAL_EXPERT_NAMES[2]),
)
"""The stages of every family: :data:`TRUE_SEQUENTIAL_STAGES` with Phi-3's fused ``qkv_proj`` and ``gate_up_proj``
and a mixture of experts' stacked gate and up kernels (third stage: ``mlp.experts.gate_proj`` / ``up_proj``,
Mixtral's ``block_sparse_moe.experts.w1`` / ``w3``) and down kernel (fourth: ``down_proj``, Mixtral's ``w2``)."""

MIN_EXPERT_TOKENS = 64
"""The default fewest calibration tokens an expert must receive for its kernels to be pruned by the method with
its own Hessian (``min_expert_tokens`` of :func:`prune_model`). An expert's ``H_e`` has rank at most its token
count, so below a few dozen tokens the local loss is fitted to a handful of tokens; such an expert is pruned by
magnitude instead (which needs no calibration) and listed in :attr:`PipelineResult.underfed_experts`, never
skipped. Real calibration sets (e.g. 128 × 2048 tokens) give every expert of a working router thousands."""

_STATE_VERSION = 2


class LayerReport(NamedTuple):
  """What happened to one linear.

  Attributes:
    block: decoder block index.
    name: the linear's name in the block (e.g. ``"mlp.down_proj"``); ``model.layers.{block}.{name}`` in HF terms.
    shape: the kernel shape ``(d_in, d_out)``.
    method: the pruning method.
    loss_before_refine: relative local loss ``tr((V−W)H(V−W)ᵀ)/tr(WHWᵀ)`` of the method's output.
    loss_after_refine: the same after refinement (equal to the above without refinement).
    iterations: prox-gradient iterations (0 for the one-shot methods).
    cap_hit: whether the iteration cap was reached.
    groups_projected: groups finished by projection rather than by the prox.
    refine: ``None``, ``"gd"`` or ``"cg"``.
    refine_steps: refinement steps taken.
    tokens: calibration tokens in ``H``.
    seconds: wall time of pruning this linear (``H`` accumulation excluded).
  """
  # The fields of proxjax.PruneInfo (without the schedule), flattened into one JSON-ready row with where and how long:
  # a report row, not a second description of the pruner's result.
  block: int
  name: str
  shape: tuple[int, int]
  method: str
  loss_before_refine: float
  loss_after_refine: float
  iterations: int
  cap_hit: bool
  groups_projected: int
  refine: str | None
  refine_steps: int
  tokens: int
  seconds: float


class PipelineResult(NamedTuple):
  """Result of :func:`prune_model`.

  Attributes:
    layers: one :class:`LayerReport` per pruned linear, in pruning order; a stacked expert kernel gets one per expert,
      named ``mlp.experts.{e}.gate_proj`` etc. (the Hugging Face name; Mixtral's ``block_sparse_moe.experts.{e}.w1``
      etc.), with its own ``tokens``.
    resumed_blocks: blocks taken from ``state_dir`` instead of being pruned in this call.
    seconds: wall time of this call.
    underfed_experts: the experts' reports whose ``tokens`` were fewer than ``min_expert_tokens``: those kernels
      were pruned by magnitude (``method == "magnitude"``), not skipped.
  """
  layers: list[LayerReport]
  resumed_blocks: list[int]
  seconds: float
  underfed_experts: tuple[LayerReport, ...] = ()


def select_linears(names: Sequence[str], num_blocks: int, include: Sequence[str] | None = None,
                   ignore: Sequence[str] | None = None) -> list[tuple[str, ...]]:
  """The linears to prune in every block, as fnmatch patterns over ``"{block}.{name}"`` decide.

  A linear ``name`` of block ``b`` is pruned when ``"{b}.{name}"`` matches a pattern of ``include`` (default: all)
  and none of ``ignore``.

  Returns:
    For each block, the selected names in the order given.

  Example:
    >>> select_linears(["self_attn.q_proj", "mlp.down_proj"], 2, ignore=["1.mlp.*"])
    [('self_attn.q_proj', 'mlp.down_proj'), ('self_attn.q_proj',)]
  """
  include = ["*"] if include is None else list(include)
  ignore = [] if ignore is None else list(ignore)
  out = []
  for b in range(num_blocks):
    keys = [(nm, f"{b}.{nm}") for nm in names]
    out.append(tuple(nm for nm, key in keys if any(fnmatch.fnmatchcase(key, p) for p in include)
                     and not any(fnmatch.fnmatchcase(key, p) for p in ignore)))
  if include != ["*"] and not any(out):
    raise ValueError(f"include patterns {include} match no linear (names look like '0.mlp.down_proj')")
  return out


def true_sequential_stages(selected: Sequence[str], true_sequential: bool) -> list[tuple[str, ...]]:
  """The stages in which a block's ``selected`` linears are pruned: :data:`FAMILY_STAGES` order (linears
  outside it last), or one stage of all without ``true_sequential``.

  Example:
    >>> true_sequential_stages(["mlp.up_proj", "self_attn.q_proj", "mlp.down_proj"], True)
    [('self_attn.q_proj',), ('mlp.up_proj',), ('mlp.down_proj',)]
  """
  selected = tuple(selected)
  if not true_sequential:
    return [selected] if selected else []
  staged = [tuple(n for n in stage if n in selected) for stage in FAMILY_STAGES]
  rest = tuple(n for n in selected if not any(n in stage for stage in FAMILY_STAGES))
  return [s for s in staged if s] + ([rest] if rest else [])


def _check_ids(model: Any, ids: np.ndarray) -> None:
  """Token ids outside the vocabulary are refused before any forward pass (an embedding lookup would silently give
  NaN or clamp); a sequence longer than the trained context is warned about once."""
  config = getattr(model, "config", None)
  vocab = getattr(config, "vocab_size", None)
  if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
    bad = ids[(ids < 0) | (ids >= vocab)]
    raise ValueError(f"calibration_ids hold {bad.size} token ids outside the model's vocabulary [0, {vocab}) (e.g. "
                     f"{int(bad[0])}): the tokenizer does not match the model")
  context = getattr(config, "max_position_embeddings", None)
  if context is not None and ids.shape[1] > context:
    warnings.warn(f"calibration sequences of {ids.shape[1]} tokens are longer than the model's trained context "
                  f"({context} tokens, max_position_embeddings): positions beyond it are out of distribution",
                  stacklevel=3)


def _selected_by(spec: Callable[[Any, Any], int | None], block: int, name: str, kernel: Any) -> bool:
  """Whether ``spec`` selects the kernel of linear ``name`` in block ``block`` (it must say the input axis if it
  does: 0 of a kernel ``(d_in, d_out)``, 1 of stacked experts ``(E, d_in, d_out)``)."""
  path = ("model", "layers", block, *name.split("."), "kernel")
  axis = spec(path, kernel)
  if axis is not None and axis != len(kernel.shape) - 2:
    raise ValueError(f"the spec groups {'.'.join(map(str, path))} along axis {axis}; the pipeline prunes kernels "
                     "(d_in, d_out) along their input axis 0 (stacked experts (E, d_in, d_out) along axis 1)")
  return axis is not None


def _submodule(module: Any, name: str) -> Any:
  return functools.reduce(getattr, name.split("."), module)


@nnx.jit
def _embed(model, ids):
  return model.embed(ids).astype(jnp.float32)


def _forward_impl(graphdef, params, h, rope):
  return nnx.merge(graphdef, params)(h, rope).astype(jnp.float32)


def _expert_update(state: _cal.HessianState, inputs: RoutedInputs, valid: jax.Array) -> _cal.HessianState:
  """Adds ``Σ_t x_t x_tᵀ`` over the real tokens routed to each expert: ``xtx (E, d, d)``, ``count (E,)``."""
  routed = inputs.routed & valid[None]
  x = inputs.x.astype(jnp.float32)
  x = jnp.where(routed[..., None], x if x.ndim == 4 else x[None], 0.0)
  xtx = jnp.einsum("ebtd,ebtf->edf", x, x, precision=jax.lax.Precision.HIGHEST)
  return _cal.HessianState(state.xtx + xtx, state.count + jnp.sum(routed, axis=(1, 2), dtype=jnp.int32))


def _accumulate_impl(graphdef, params, h, valid, rope, states, *, names):
  _, inputs = nnx.merge(graphdef, params)(h, rope, return_inputs=True)
  return {n: _expert_update(states[n], inputs[n], valid) if isinstance(inputs[n], RoutedInputs)
          else _cal.hessian_update(states[n], inputs[n], valid) for n in names}


def _state_init(kernel: Any) -> _cal.HessianState:
  """An empty Hessian state for a kernel ``(d_in, d_out)``, or one per expert for ``(E, d_in, d_out)``."""
  if len(kernel.shape) == 2:
    return _cal.hessian_init(kernel.shape[0])
  e, d_in = kernel.shape[:2]
  return _cal.HessianState(jnp.zeros((e, d_in, d_in), jnp.float32), jnp.zeros((e,), jnp.int32))


def _hessian_of(state: _cal.HessianState) -> jax.Array:
  """``H = X Xᵀ / n``; per expert ``(E, d, d)`` for a stacked state (an expert without tokens gets zeros)."""
  if state.count.ndim == 0:
    return _cal.hessian_from_state(state)
  return state.xtx / jnp.maximum(state.count, 1).astype(jnp.float32)[:, None, None]


@functools.lru_cache(maxsize=64)
def input_owners(graphdef: Any, names: tuple[str, ...], act_shape: tuple[int, ...], rope_shape: Any,
                  params_struct: Any = None) -> dict[str, str]:
  """For every linear, the first linear of ``names`` fed the very same array (q/k/v share one, gate/up another):
  found by tracing the block once on abstract values, so shared inputs get one ``XᵀX`` and one Hessian state."""
  owners: dict[str, str] = {}

  def probe(params, h, rope):
    _, inputs = nnx.merge(graphdef, params)(h, rope, return_inputs=True)
    for i, n in enumerate(names):
      owners[n] = next((o for o in names[:i] if inputs[o] is inputs[n]), n)
    return jnp.zeros(())

  jax.eval_shape(probe, params_struct.value, jax.ShapeDtypeStruct(act_shape, jnp.float32), rope_shape.value)
  return owners


class ShapeKey:
  """A pytree of ShapeDtypeStructs hashed by its structure and shapes (a cache key for :func:`_input_owners`)."""

  def __init__(self, value: Any):
    self.value = value
    leaves, treedef = jax.tree.flatten(value)
    self._key = (treedef, tuple((x.shape, str(x.dtype)) for x in leaves))

  def __hash__(self) -> int:
    return hash(self._key)

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, ShapeKey) and self._key == other._key


@functools.lru_cache(maxsize=64)
def block_function(kind: str, graphdef: Any, names: tuple[str, ...], mesh: Any, act_shape: tuple[int, ...]):
  """The jitted block forward (``kind="forward"``) or Hessian accumulation; on a mesh with the declared shardings:
  parameters as placed (:func:`proxjax.core.sharding.place`), activations batch-split over every device, ``rope`` and the
  Hessian states replicated (the accumulation's output is the one all-reduce of the per-device ``XᵀX``)."""
  fun = (functools.partial(_forward_impl, graphdef) if kind == "forward"
         else functools.partial(_accumulate_impl, graphdef, names=names))
  if mesh is None:
    return jax.jit(fun)
  act, rep = _sharding.activation_sharding(mesh, act_shape), _sharding.replicated(mesh)
  valid = _sharding.activation_sharding(mesh, act_shape[:2])
  if kind == "forward":
    return jax.jit(fun, in_shardings=(None, act, rep), out_shardings=act)
  return jax.jit(fun, in_shardings=(None, act, valid, rep, rep), out_shardings=rep)


def _batches(num: int, batch_size: int) -> Iterable[tuple[int, int]]:
  for start in range(0, num, batch_size):
    yield start, min(start + batch_size, num)


def _padded(h: np.ndarray, start: int, stop: int, batch_size: int, mesh: Any) -> tuple[jax.Array, jax.Array]:
  """Rows ``start:stop`` padded with zeros to ``batch_size`` rows (one compile), and the bool mask of real rows;
  on a mesh, placed batch-split (each device receives only its rows)."""
  x = h[start:stop]
  valid = np.zeros((batch_size, h.shape[1]), bool)
  valid[: stop - start] = True
  if stop - start < batch_size:
    x = np.concatenate([x, np.zeros((batch_size - (stop - start),) + x.shape[1:], x.dtype)])
  if mesh is None:
    return jnp.asarray(x), jnp.asarray(valid)
  if mesh.is_multi_process:  # each process supplies its devices' rows (device_put would all-gather to compare them)
    return tuple(jax.make_array_from_callback(a.shape, _sharding.activation_sharding(mesh, a.shape),
                                              lambda index, a=a: a[index]) for a in (x, valid))
  return (jax.device_put(x, _sharding.activation_sharding(mesh, x.shape)),
          jax.device_put(valid, _sharding.activation_sharding(mesh, valid.shape)))


def _propagate(block: Any, h: np.ndarray, rope: Any, batch_size: int, mesh: Any) -> np.ndarray:
  out = np.empty_like(h)
  graphdef, params = nnx.split(block)
  fn = block_function("forward", graphdef, (), mesh, (batch_size,) + h.shape[1:])
  for start, stop in _batches(h.shape[0], batch_size):
    x, _ = _padded(h, start, stop, batch_size, mesh)
    out[start:stop] = _local_rows(fn(params, x, rope), stop - start)
  return out


def _local_rows(y: jax.Array, rows: int) -> np.ndarray:
  """The first ``rows`` rows of a batch's output on host. Across processes (:mod:`proxjax.core.distributed`) a
  process reads only the rows on its own devices and leaves the others zero: those are the only rows it feeds its
  devices later (every batch of one shape is split the same way, :func:`_padded`), so nothing crosses hosts."""
  if y.is_fully_addressable or y.is_fully_replicated:
    return np.asarray(y)[:rows]
  out = np.zeros(y.shape, y.dtype)
  for shard in y.addressable_shards:
    out[shard.index] = np.asarray(shard.data)
  return out[:rows]


def _hessians(block: Any, h: np.ndarray, rope: Any, names: tuple[str, ...], batch_size: int,
              mesh: Any) -> dict[str, Any]:
  """The Hessian state of every linear in ``names``; linears fed the same array share one state object."""
  graphdef, params = nnx.split(block)
  act_shape = (batch_size,) + h.shape[1:]
  struct = lambda tree: ShapeKey(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree))  # noqa: E731
  owners = input_owners(graphdef, names, act_shape, struct(rope), struct(params))
  distinct = tuple(dict.fromkeys(owners[n] for n in names))
  states = {n: _state_init(_submodule(block, n).kernel) for n in distinct}
  fn = block_function("accumulate", graphdef, distinct, mesh, act_shape)
  for start, stop in _batches(h.shape[0], batch_size):
    x, valid = _padded(h, start, stop, batch_size, mesh)
    states = fn(params, x, valid, rope, states)
  return {n: states[owners[n]] for n in names}


def layer_statistics(model: Any, calibration_ids: Any, blocks: Sequence[int], *, names: Sequence[str] | None = None,
                     batch_size: int = 4) -> dict[tuple[int, str], tuple[jax.Array, jax.Array]]:
  r"""The dense model's kernels and Hessians ``H = X Xᵀ / n`` of the linears of ``blocks``: what every layer-wise
  method minimizes, ``½ tr((V − K)ᵀ H (V − K))``, without pruning anything (the activations of the **dense** model
  flow through every block, so every method can be compared on the same problems).

  Args:
    model: a :class:`~proxjax.models.LlamaForCausalLM`.
    calibration_ids: int token ids ``(N, T)``.
    blocks: the decoder block indices.
    names: the linears (default every projection of a block, :func:`proxjax.models.llama.linear_names`).
    batch_size: sequences per forward pass.

  Returns:
    ``{(block, name): (kernel (d_in, d_out), H (d_in, d_in) float32)}``; for stacked experts the kernel is
    ``(E, d_in, d_out)`` and ``H`` ``(E, d_in, d_in)``, each expert's over the tokens routed to it (zeros for an
    expert that received none).

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                 num_attention_heads=2)
    >>> stats = layer_statistics(LlamaForCausalLM(c, rngs=nnx.Rngs(0)), np.ones((2, 8), np.int32), [1])
    >>> kernel, h = stats[(1, "mlp.down_proj")]
    >>> kernel.shape, h.shape
    ((32, 16), (32, 32))
  """
  names = tuple(_family_linears(model.config) if names is None else names)
  ids = np.asarray(calibration_ids)
  _check_ids(model, ids)
  wanted = sorted(set(int(b) for b in blocks))
  if wanted and not 0 <= wanted[0] <= wanted[-1] < len(model.model.layers):
    raise ValueError(f"blocks must lie in [0, {len(model.model.layers)}), got {list(blocks)}")
  rope = model.rope(jnp.arange(ids.shape[1]))
  h = np.concatenate([np.asarray(_embed(model, jnp.asarray(ids[a:b]))) for a, b in _batches(len(ids), batch_size)])
  out = {}
  for b, block in enumerate(model.model.layers):
    if not wanted or b > wanted[-1]:
      break
    if b in wanted:
      states = _hessians(block, h, rope, names, batch_size, None)
      for name in names:
        out[(b, name)] = (_submodule(block, name).kernel[...], _hessian_of(states[name]))
    h = _propagate(block, h, rope, batch_size, None)
  return out


# ---------------------------------------------------------------------------------------------------------- state --


def _block_paths(state_dir: str, block: int) -> tuple[str, str]:
  return (os.path.join(state_dir, f"block_{block:04d}.safetensors"), os.path.join(state_dir, f"block_{block:04d}.json"))


def _save_block(state_dir: str, block_idx: int, block: Any, names: tuple[str, ...],
                reports: list[LayerReport]) -> None:
  """Writes block ``block_idx``'s pruned kernels, then its report (last: it marks the block done), each atomically.
  Across processes every process gathers the kernels (a collective) and process 0 alone writes, the others waiting
  for it (:func:`proxjax.core.distributed.on_coordinator`)."""
  from safetensors.numpy import save_file  # local import: safetensors is only needed with a state dir
  arrays_path, report_path = _block_paths(state_dir, block_idx)
  # bfloat16 has no NumPy dtype of its own in safetensors.numpy: store float32 (exact) and cast back on load.
  tensors = _distributed.gather({n: _submodule(block, n).kernel[...].astype(jnp.float32) for n in names})

  def write() -> None:
    try:
      _atomic_write(arrays_path, lambda tmp: save_file(tensors, tmp))
      _write_json(report_path, {"block": block_idx, "names": list(names), "layers": [r._asdict() for r in reports]})
    except Exception as err:  # OSError, or safetensors' SafetensorError for a full disk
      kept = f"blocks 0..{block_idx - 1} are kept there" if block_idx else "no block was finished"
      raise OSError(f"could not write the resume state of block {block_idx} to {state_dir} "
                    f"({' '.join(str(err).split())}); {kept}: free space or fix the permission and rerun the same "
                    "command to resume") from err

  _distributed.on_coordinator(write, f"writing the resume state of block {block_idx} to {state_dir}")


def _load_block(state_dir: str, block_idx: int, block: Any) -> list[LayerReport] | None:
  from safetensors.numpy import load_file
  arrays_path, report_path = _block_paths(state_dir, block_idx)
  if not os.path.exists(report_path):  # the report is written last: without it the block is not done
    return None
  with open(report_path) as f:
    saved = json.load(f)
  tensors = load_file(arrays_path)
  for name in saved["names"]:
    kernel = _submodule(block, name).kernel
    if tensors[name].shape != kernel.shape:
      raise ValueError(f"{arrays_path}: {name} has shape {tensors[name].shape}, the model's is {kernel.shape}")
    value = jnp.asarray(tensors[name]).astype(kernel.dtype)
    target = kernel[...].sharding
    if not target.is_fully_addressable:  # a mesh over several processes: each builds only its own devices' shards
      value = _sharding.put(np.asarray(value), target)
    kernel[...] = value
  return [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in saved["layers"]]


def _finished_blocks(state_dir: str, num_blocks: int) -> int:
  """How many blocks, from block 0 on, have their report in ``state_dir`` (each is written after its kernels)."""
  done = 0
  while done < num_blocks and os.path.exists(_block_paths(state_dir, done)[1]):
    done += 1
  return done


def _shared_state(state_dir: str, run: dict[str, Any], num_blocks: int) -> tuple[str | None, int]:
  """The resume state across processes (a collective): process 0 alone opens ``state_dir`` (creating it, or checking
  that its ``run.json`` is this run's) and counts the blocks finished from block 0 on; that count is broadcast, and
  every process must see the same ``run.json`` and reports of those blocks (one shared file system,
  :func:`proxjax.core.distributed.resume_directory`) before any of them is loaded.

  Returns:
    ``(state_dir, finished)``: every process resumes from block ``finished``; ``(None, 0)`` when process 0 has nothing
    to resume and the others do not see its directory (no state is kept).

  Raises:
    ValueError: ``state_dir`` belongs to another run (on process 0; the others fail with it), or process 0 has
      finished blocks that another process does not see the same.
  """
  def open_and_count() -> int:
    _open_run_dir(state_dir, run)
    return _finished_blocks(state_dir, num_blocks)

  finished = _distributed.broadcast_int(_distributed.on_coordinator(open_and_count,
                                                                    f"opening the resume state {state_dir}") or 0)
  names = ["run.json", *(os.path.basename(_block_paths(state_dir, b)[1]) for b in range(finished))]
  shared = _distributed.resume_directory(state_dir, names, finished > 0, f"{finished} finished block(s)")
  return shared, finished if shared is not None else 0


# ------------------------------------------------------------------------------------------------------- pipeline --


def _fingerprint(calibration_ids: np.ndarray, config: PruneConfig, true_sequential: bool,
                 selected: list[tuple[str, ...]], run_info: Mapping[str, Any] | None):
  digest = hashlib.sha256(np.ascontiguousarray(calibration_ids, dtype=np.int64).tobytes()).hexdigest()
  return {"version": _STATE_VERSION, "config": config.to_dict(), "true_sequential": true_sequential,
          "selected": [list(s) for s in selected], "calibration_shape": list(calibration_ids.shape),
          "calibration_sha256": digest, "run_info": dict(run_info or {})}


def prune_model(model: Any, calibration_ids: Any, method: str | MethodConfig | PruneConfig = "prox", *,
                refine: Any = "auto", n: int = 2, m: int = 4, true_sequential: bool = True,
                include: Sequence[str] | None = None, ignore: Sequence[str] | None = None,
                linear_names: Sequence[str] | None = None, spec: Callable[[Any, Any], int | None] | None = None,
                batch_size: int = 8, state_dir: str | None = None,
                progress: bool = True, run_info: Mapping[str, Any] | None = None,
                mesh: jax.sharding.Mesh | None = None, offload: bool = False,
                min_expert_tokens: int = MIN_EXPERT_TOKENS) -> PipelineResult:
  r"""Prunes a decoder-only model block by block, in place, each linear to N:M along its input axis (docs/method.md, "Pipeline").

  Each selected linear ``K₀`` of block ``b`` becomes :func:`proxjax.prune_kernel` ``(K₀, H, method, ...)``, the
  (approximate) minimizer of

  .. math::  \min_{K \text{ N:M along the input axis}} \tfrac12 \operatorname{tr}\big((K - K_0)^\top H (K - K_0)\big),
             \qquad H = \tfrac1n \textstyle\sum_t x_t x_t^\top,

  where ``x_t`` are the linear's inputs for the calibration tokens, computed with blocks ``< b`` (and, with
  ``true_sequential``, the earlier stages of block ``b``) already pruned.

  **Fused and stacked kernels.** Phi-3's ``qkv_proj`` and ``gate_up_proj`` are one linear each (one kernel, one
  ``H``: q, k and v share their input, and 2:4 groups run along it). A mixture of experts' stacked kernels
  ``(E, d_in, d_out)`` are pruned expert by expert, expert ``e`` with ``H_e = Σ_{t→e} x_t x_tᵀ / n_e`` over the
  ``n_e`` calibration tokens routed to it (one of their top ``k``), **unweighted** by the routing weight: the local
  loss is then the error of the expert's own output on the tokens it serves, the same problem as for a dense MLP,
  and not one that shifts with the router's (pruned-model) confidence. An expert with ``n_e <
  min_expert_tokens`` is pruned by magnitude (reported, never skipped); the router (``mlp.gate``,
  Mixtral's ``block_sparse_moe.gate``) stays dense.

  Args:
    model: the model, modified in place (see the module docstring for the interface it must have).
    calibration_ids: int token ids ``(sequences, seqlen)``.
    method: a :class:`~proxjax.pruning.methods.PruneConfig` (method, options, refinement, N:M), or a method name /
      method configuration with ``refine``, ``n`` and ``m`` (see :func:`proxjax.prune_kernel`).
    refine: ``"auto"`` (the method's default), ``"gd"``, ``"cg"``, ``None`` or a ``RefineConfig``.
    n: kept weights per group.
    m: group size.
    true_sequential: prune in stages q,k,v → o → gate,up → down, re-capturing inputs before each stage.
    include: fnmatch patterns over ``"{block}.{name}"`` (e.g. ``"*.mlp.*"``); default all.
    ignore: patterns to leave dense.
    linear_names: the candidate linears of a block; default :func:`proxjax.models.llama.linear_names` of
      ``model.config`` (``proxjax.models.llama.LINEAR_NAMES`` for a model without one).
    spec: the sparsity spec that decides which kernels are pruned (:mod:`proxjax.core.spec`), called with the
      kernel's path ``("model", "layers", b, *name.split("."), "kernel")`` and the kernel; default
      :func:`proxjax.models.llama.projection_spec`. A kernel it selects must be grouped along axis 0 (its input
      axis); ``include``/``ignore`` narrow the selection further.
    batch_size: calibration sequences per forward pass.
    state_dir: directory for per-block state (resume); ``None`` keeps nothing.
    progress: tqdm bars per block and per projection.
    run_info: extra items that identify the run for resuming (e.g. the model directory).
    mesh: a ``("data", "model")`` :class:`jax.sharding.Mesh` (:func:`proxjax.core.sharding.make_mesh`): each block's
      parameters are placed by :mod:`proxjax.core.sharding` (kernels' outputs over ``model``), calibration batches are
      split over every device (``batch_size`` is rounded up to a multiple of the device count; the padding rows
      are masked out of ``H``), ``H`` is replicated and every kernel is pruned sharded (see
      :func:`proxjax.prune_kernel`; on a one-device mesh each kernel is pruned as on one device). ``None``: the
      default device. The mesh may span several processes (:mod:`proxjax.core.distributed`; every process calls this
      with the same arguments, each supplying its devices' rows of every batch and keeping on host only the
      activation rows of its own devices). ``state_dir`` then needs a file system every process shares: process 0
      writes each finished block (its kernels gathered from every process first), and a later call resumes every
      process from the same block, the first one process 0 has not finished, each loading the finished kernels
      itself; where another process does not see process 0's state the call is refused (finished blocks to resume)
      or keeps no state (none).
    min_expert_tokens: an expert of a mixture of experts whose calibration tokens (those routed to it) are fewer
      is pruned by magnitude instead of by the method (default :data:`MIN_EXPERT_TOKENS`); its reports are listed
      in :attr:`PipelineResult.underfed_experts` and a warning names them.
    offload: move each block to the devices only while it is worked on and back to host memory (this process's
      first CPU device, :func:`proxjax.core.sharding.host_device`) after, so the accelerators hold one block's
      weights, its Hessians and one calibration batch; the calibration activations always stay on host. Load the
      model on host for this (``load_pretrained(..., sharding=lambda path, shape: host_device())``). Across
      processes every process holds the whole model in its host memory, and each block comes back whole to every
      process (an all-gather).

  Returns:
    A :class:`PipelineResult`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, flax.nnx as nnx, proxjax
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig.from_hf(dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32,
    ...     intermediate_size=32, num_hidden_layers=2, num_attention_heads=4))
    >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    >>> ids = np.random.default_rng(0).integers(0, 64, (4, 16))
    >>> result = prune_model(model, ids, method="wanda", progress=False)
    >>> len(result.layers), bool(proxjax.is_nm(model.model.layers[1].mlp.down_proj.kernel[...]))
    (14, True)
  """
  config = _pruner.as_config(method, refine=refine, n=n, m=m)
  if linear_names is None:
    model_config = getattr(model, "config", None)
    linear_names = _family_linears(model_config) if model_config is not None else LINEAR_NAMES
  if isinstance(min_expert_tokens, bool) or not isinstance(min_expert_tokens, int) or min_expert_tokens < 1:
    raise ValueError(f"min_expert_tokens must be a positive int, got {min_expert_tokens!r}")
  spec = projection_spec if spec is None else spec
  ids = np.asarray(calibration_ids)
  if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"calibration_ids must be a non-empty int array (sequences, seqlen), got {ids.dtype} {ids.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
  _check_ids(model, ids)
  blocks = model.model.layers
  selected = [tuple(name for name in names if _selected_by(spec, b, name, _submodule(blocks[b], name).kernel[...]))
              for b, names in enumerate(select_linears(linear_names, len(blocks), include, ignore))]
  if not any(selected):
    raise ValueError("no linear is selected for pruning (check include/ignore and the spec); nothing to do")
  batch_size = min(batch_size, ids.shape[0])
  if offload and mesh is None:
    mesh = _sharding.make_mesh(devices=jax.devices()[:1])
  if mesh is not None:
    batch_size = -(-batch_size // mesh.size) * mesh.size
  several = mesh is not None and mesh.is_multi_process
  # a one-device mesh (offload's, or --mesh 1) prunes as one device does: the prox loop's certificate and its
  # narrowing to the open columns are off on a mesh (proxjax.pruning.pruner.prox_loop_statics, compaction_widths)
  kernel_mesh = mesh if mesh is not None and mesh.size > 1 else None
  finished = len(blocks)  # blocks that may be taken from state_dir (a single process: any with a saved report)
  if state_dir is not None:
    run = _fingerprint(ids, config, true_sequential, selected, run_info)
    if several:
      state_dir, finished = _shared_state(state_dir, run, len(blocks))
    else:
      _open_run_dir(state_dir, run)

  from tqdm.auto import tqdm
  t_start = time.perf_counter()
  rope = model.rope(jnp.arange(ids.shape[1]))
  h = np.concatenate([_distributed.gather(_embed(model, jnp.asarray(ids[a:b], jnp.int32)))
                      for a, b in _batches(ids.shape[0], batch_size)])
  layers: list[LayerReport] = []
  resumed: list[int] = []
  bar = tqdm(total=sum(len(s) for s in selected), desc="pruning", unit="linear", disable=not progress)
  for b, block in enumerate(blocks):
    done = _load_block(state_dir, b, block) if state_dir is not None and b < finished else None
    if mesh is not None:
      _sharding.place(block, mesh)
    if done is not None:
      layers.extend(done)
      resumed.append(b)
      bar.update(len(selected[b]))
    else:
      reports = []
      for stage in true_sequential_stages(selected[b], true_sequential):
        states = hessian = res = None  # free the previous stage's before accumulating the next
        states = _hessians(block, h, rope, stage, batch_size, mesh)
        for name in stage:
          bar.set_postfix_str(f"block {b} {name}")
          kernel = _submodule(block, name).kernel
          if len(kernel.shape) == 3:
            reports.extend(_prune_experts(b, name, kernel, states[name], config, min_expert_tokens, kernel_mesh))
            bar.update(1)
            continue
          t0 = time.perf_counter()
          hessian = _cal.hessian_from_state(states[name])
          try:
            res = _pruner.prune_kernel(kernel[...], hessian, config, mesh=kernel_mesh)
          except ValueError as err:
            raise ValueError(f"block {b} {name} (model.layers.{b}.{name}): {err}") from err
          kernel[...] = res.kernel.astype(kernel.dtype)
          if not bool(_nm.is_nm(kernel[...], config.n, config.m, axis=0)):
            raise RuntimeError(f"block {b} {name}: the pruned kernel is not {config.n}:{config.m} "
                               "(please report this bug)")
          i = res.info
          reports.append(LayerReport(b, name, tuple(kernel.shape), config.method_name, i.loss_before_refine,
                                     i.loss_after_refine, i.iterations, i.cap_hit, i.groups_projected, i.refine,
                                     i.refine_steps, int(states[name].count), time.perf_counter() - t0))
          bar.update(1)
          bar.set_postfix_str(f"block {b} {name} loss {i.loss_after_refine:.4f}")
      if state_dir is not None:
        _save_block(state_dir, b, block, selected[b], reports)
      layers.extend(reports)
    states = hessian = res = None
    if b + 1 < len(blocks):
      h = _propagate(block, h, rope, batch_size, mesh)
    if offload:
      _sharding.place(block, None)
  bar.close()
  underfed = tuple(r for r in layers if ".experts." in r.name and r.tokens < min_expert_tokens)
  if underfed:
    warnings.warn(f"{len(underfed)} expert kernel(s) received fewer than {min_expert_tokens} calibration tokens and "
                  "were pruned by magnitude: " + ", ".join(f"model.layers.{r.block}.{r.name} ({r.tokens})"
                                                          for r in underfed[:8]) + (" ..." if len(underfed) > 8 else ""),
                  stacklevel=2)
  return PipelineResult(layers, resumed, time.perf_counter() - t_start, underfed)


def _prune_experts(b: int, name: str, kernel: Any, state: _cal.HessianState, config: PruneConfig,
                   min_expert_tokens: int, mesh: Any) -> list[LayerReport]:
  """Prunes a stacked expert kernel ``(E, d_in, d_out)`` expert by expert: expert ``e`` with ``H_e`` of the tokens
  routed to it, or by magnitude when it received fewer than ``min_expert_tokens``; one report each."""
  magnitude = _pruner.as_config("magnitude", refine=None, n=config.n, m=config.m)
  counts = np.asarray(state.count)
  head, tail = name.rsplit(".", 1)
  reports = []
  for e in range(kernel.shape[0]):
    t0 = time.perf_counter()
    tokens = int(counts[e])
    enough = tokens >= min_expert_tokens
    d_in = kernel.shape[1]
    hessian = state.xtx[e] / np.float32(tokens) if enough else jnp.eye(d_in, dtype=jnp.float32)
    try:
      res = _pruner.prune_kernel(kernel[e], hessian, config if enough else magnitude, mesh=mesh)
    except ValueError as err:
      raise ValueError(f"block {b} {head}.{e}.{tail} (model.layers.{b}.{head}.{e}.{tail}): {err}") from err
    kernel[e] = res.kernel.astype(kernel.dtype)
    if not bool(_nm.is_nm(kernel[e], config.n, config.m, axis=0)):
      raise RuntimeError(f"block {b} {head}.{e}.{tail}: the pruned kernel is not {config.n}:{config.m} "
                         "(please report this bug)")
    i = res.info
    reports.append(LayerReport(b, f"{head}.{e}.{tail}", tuple(kernel.shape[1:]),
                               (config if enough else magnitude).method_name, i.loss_before_refine,
                               i.loss_after_refine, i.iterations, i.cap_hit, i.groups_projected, i.refine,
                               i.refine_steps, tokens, time.perf_counter() - t0))
  return reports


# ------------------------------------------------------------------------------------------------- any Flax model --


def prune_params(params: Any, hessians: Any, method: str | MethodConfig | PruneConfig = "prox", *, n: int = 2,
                 m: int = 4, refine: Any = "auto", spec: Any = None) -> tuple[Any, Any, Any]:
  r"""Prunes the kernels of any Flax parameter pytree, given their calibration statistics.

  For every leaf of ``params`` whose counterpart in ``hessians`` is not ``None`` (an ``H`` array ``(d_in, d_in)`` or a
  :class:`proxjax.HessianState`), the kernel ``(d_in, d_out)`` is replaced by :func:`proxjax.prune_kernel`'s
  approximate minimizer of ``½ tr((K − K₀)ᵀ H (K − K₀))`` subject to N:M along axis 0; other leaves are returned
  unchanged. ``hessians`` is a pytree with ``params``' structure (``None`` marks a leaf to keep dense), so
  ``jax.tree.map`` over both works; an ``nnx.State`` works too.

  With a sparsity ``spec`` (:mod:`proxjax.core.spec`, e.g. :func:`proxjax.default_spec` or
  :func:`proxjax.models.llama.projection_spec`) the spec decides instead: exactly the leaves it selects are pruned
  (each needs a Hessian, and its group axis must be 0), whatever else ``hessians`` holds.

  Returns:
    ``(new_params, masks, infos)``: masks are bool arrays (``None`` where not pruned), infos are
    :class:`proxjax.PruneInfo` (``None`` where not pruned).

  Example:
    >>> import jax, jax.numpy as jnp, proxjax
    >>> from proxjax.pipeline.prune import prune_params
    >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 3)), "bias": jnp.zeros(3)}}
    >>> hessians = {"dense": {"kernel": jnp.eye(8), "bias": None}}
    >>> new, masks, infos = prune_params(params, hessians, "magnitude")
    >>> bool(proxjax.is_nm(new["dense"]["kernel"])), masks["dense"]["bias"] is None
    (True, True)
  """
  is_leaf = lambda x: x is None or isinstance(x, _cal.HessianState)  # noqa: E731
  flat_h, treedef = jax.tree.flatten(hessians, is_leaf=is_leaf)
  flat_p = treedef.flatten_up_to(params)
  config = _pruner.as_config(method, refine=refine, n=n, m=m)
  if spec is not None:
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    _, axes = flat_spec(params, spec, m=config.m)
    if len(axes) != len(flat_h):
      raise ValueError("with a spec, hessians must have the structure of params (None where there is no Hessian)")
    for path, axis, h in zip(paths, axes, flat_h):
      where = jax.tree_util.keystr(tuple(path))
      if axis not in (None, 0):
        raise ValueError(f"the spec groups {where} along axis {axis}; prune_params prunes kernels (d_in, d_out) "
                         "along axis 0")
      if axis == 0 and h is None:
        raise ValueError(f"the spec selects {where}, but hessians has no Hessian for it")
    flat_h = [h if axis == 0 else None for axis, h in zip(axes, flat_h)]
  out_p, out_m, out_i = [], [], []
  for p, h in zip(flat_p, flat_h):
    if h is None:
      out_p.append(p), out_m.append(None), out_i.append(None)
      continue
    if isinstance(h, _cal.HessianState):
      h = _cal.hessian_from_state(h)
    res = _pruner.prune_kernel(p, h, config)
    out_p.append(res.kernel), out_m.append(res.mask), out_i.append(res.info)
  unflat = functools.partial(jax.tree.unflatten, treedef)
  return unflat(out_p), unflat(out_m), unflat(out_i)
