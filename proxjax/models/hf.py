"""Hugging Face safetensors checkpoints in and out of :class:`~proxjax.models.LlamaForCausalLM` (Llama, Mistral, Qwen2,
Qwen3, Gemma 2, Gemma 3 text, Phi-3, Qwen3-MoE, Mixtral), and orbax state I/O.

**Names.** The NNX tree mirrors Hugging Face, so a tensor name maps to an NNX parameter path mechanically
(:func:`hf_to_path` / :func:`path_to_hf`)::

  model.embed_tokens.weight                  <-> ("model", "embed_tokens", "embedding")
  model.layers.3.input_layernorm.weight      <-> ("model", "layers", 3, "input_layernorm", "weight")
  model.layers.3.self_attn.q_norm.weight     <-> ("model", "layers", 3, "self_attn", "q_norm", "weight")   (Qwen3, Gemma 3)
  model.layers.3.self_attn.q_proj.weight     <-> ("model", "layers", 3, "self_attn", "q_proj", "kernel")   (transposed)
  model.layers.3.self_attn.q_proj.bias       <-> ("model", "layers", 3, "self_attn", "q_proj", "bias")
  model.layers.3.self_attn.qkv_proj.weight   <-> ("model", "layers", 3, "self_attn", "qkv_proj", "kernel") (Phi-3)
  model.layers.3.mlp.gate.weight             <-> ("model", "layers", 3, "mlp", "gate", "kernel")         (router)
  model.layers.3.mlp.experts.5.up_proj.weight <-> ("model", "layers", 3, "mlp", "experts", "up_proj", "kernel")[5]
  model.layers.3.block_sparse_moe.gate.weight <-> ("model", "layers", 3, "block_sparse_moe", "gate", "kernel")  (Mixtral)
  model.layers.3.block_sparse_moe.experts.5.w1.weight
                                <-> ("model", "layers", 3, "block_sparse_moe", "experts", "w1", "kernel")[5]  (Mixtral)
  model.norm.weight                          <-> ("model", "norm", "weight")
  lm_head.weight                             <-> ("lm_head", "kernel")                                     (transposed)

A Hugging Face / PyTorch linear ``weight`` is ``(d_out, d_in)``; the Flax ``kernel`` is its transpose ``(d_in, d_out)``.
A mixture of experts' stacked kernel ``(E, d_in, d_out)`` is ``E`` tensors, one per expert, as transformers'
``save_pretrained`` writes them (:func:`hf_to_slot`, :func:`hf_names`).

**Loading** (:func:`load_pretrained`) builds the model abstractly with ``nnx.eval_shape`` (no random init), checks
every file header and every tensor name and shape first (all problems are reported in one :class:`CheckpointError`),
then reads the weights tensor by tensor with ``safetensors.safe_open`` and places each one with ``jax.device_put``.
With a per-parameter sharding it reads only the blocks this process's devices hold (``get_slice``, each distinct block
once) and builds the global array from them (``jax.make_array_from_single_device_arrays``): on a mesh spanning several
processes each process reads its own rows of the sharded weights and the replicated ones whole (``_read_blocks``);
the values are bitwise those of a whole read (the same casts, element by element). bfloat16 tensors are read as
``ml_dtypes.bfloat16`` NumPy arrays: the NumPy framework of safetensors only understands ``bfloat16`` once
``ml_dtypes`` is imported (it is, here).

**Saving** (:func:`save_pretrained`) writes the Hugging Face layout into a temporary sibling directory and renames it
into place at the end, so an interrupted save never leaves a complete-looking checkpoint.

**Activations.** SiLU and ReLU (``hidden_act``) are exported as they are: transformers' Llama runs both, so a ReLU
model (ProSparse with threshold 0) is read faithfully by transformers. (Other tools may not: vLLM's Llama refuses any
activation but SiLU.) FATReLU (``activation_threshold`` ``θ > 0``, ``x if x > θ else 0``) has no transformers
equivalent: a ``config.json`` saying ``"relu"`` would make other tools silently run a different model, so
:func:`save_pretrained` refuses it unless ``allow_fatrelu=True``, which writes ``"hidden_act": "fatrelu",
"hidden_act_param": θ`` (the MiniCPM-S / ProSparse convention, implemented by vLLM's MiniCPM model):
:func:`load_pretrained` runs it exactly and transformers' ``LlamaForCausalLM`` refuses to build it (no silent
change of behaviour either way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, so safetensors' numpy framework can read it)
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from proxjax.core.distributed import allgather_int
from proxjax.core.pattern import check_nm
from proxjax.core.sharding import put

from proxjax.models.llama import (
    CheckpointError,
    LlamaConfig,
    LlamaForCausalLM,
    UnsupportedModelError,
    dtype_from_name,
    name_of_dtype,
    projection_spec,
)

__all__ = [
    "CheckpointError",
    "check_sparsity",
    "checkpoint_fingerprint",
    "hf_names",
    "hf_to_path",
    "hf_to_slot",
    "load_pretrained",
    "path_to_hf",
    "remove_unfinished_saves",
    "restore_state",
    "save_pretrained",
    "save_state",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
METADATA_FILE = "proxjax.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
"""Files copied verbatim from ``source_dir`` by :func:`save_pretrained` (plus ``*.model`` and ``*.tiktoken``)."""
TOKENIZER_GLOBS = ("*.model", "*.tiktoken")

_FIXED = {
    "model.embed_tokens.weight": ("model", "embed_tokens", "embedding"),
    "model.norm.weight": ("model", "norm", "weight"),
    "lm_head.weight": ("lm_head", "kernel"),
}
_INT = r"(0|[1-9][0-9]*)"
_NORM_RE = re.compile(rf"model\.layers\.{_INT}\.(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|"
                      r"post_feedforward_layernorm|self_attn\.q_norm|self_attn\.k_norm)\.weight")
_LINEAR_RE = re.compile(rf"model\.layers\.{_INT}\.(self_attn\.(?:[qkvo]|qkv)_proj|mlp\.(?:gate|up|down|gate_up)_proj)\."
                        r"(weight|bias)")
_ROUTER_RE = re.compile(rf"model\.layers\.{_INT}\.(mlp|block_sparse_moe)\.gate\.weight")
_EXPERT_RES = (  # Qwen3-MoE's experts, Mixtral's (gate w1, up w3, down w2)
    re.compile(rf"model\.layers\.{_INT}\.(mlp)\.experts\.{_INT}\.(gate_proj|up_proj|down_proj)\.weight"),
    re.compile(rf"model\.layers\.{_INT}\.(block_sparse_moe)\.experts\.{_INT}\.(w1|w2|w3)\.weight"))
# Non-persistent buffers that some older checkpoints contain; they are recomputed from the config.
_IGNORED_RE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

Path = tuple[str | int, ...]
ShardingFn = Callable[[Path, tuple[int, ...]], jax.sharding.Sharding]


def hf_to_path(name: str) -> Path:
  """The NNX parameter path of a Hugging Face tensor name (for one expert's tensor, the stacked kernel's path: see
  :func:`hf_to_slot` for its index).

  Raises:
    ValueError: ``name`` is not a Llama-family tensor name.

  Example:
    >>> from proxjax.models import hf_to_path
    >>> hf_to_path("model.layers.3.self_attn.q_proj.weight")
    ('model', 'layers', 3, 'self_attn', 'q_proj', 'kernel')
  """
  if name in _FIXED:
    return _FIXED[name]
  if m := _NORM_RE.fullmatch(name):
    return ("model", "layers", int(m[1]), *m[2].split("."), "weight")
  if m := _LINEAR_RE.fullmatch(name):
    return ("model", "layers", int(m[1]), *m[2].split("."), "kernel" if m[3] == "weight" else "bias")
  return hf_to_slot(name)[0]


def hf_to_slot(name: str) -> tuple[Path, int | None]:
  """The NNX parameter path of a Hugging Face tensor name and, for one expert of a mixture of experts, its index in
  the stacked kernel: ``model.layers.N.mlp.experts.E.gate_proj.weight`` is ``kernel[E]ᵀ`` of
  ``("model", "layers", N, "mlp", "experts", "gate_proj", "kernel")`` (``(num_experts, d_in, d_out)``), Mixtral's
  ``model.layers.N.block_sparse_moe.experts.E.w1.weight`` that of ``(…, N, "block_sparse_moe", "experts", "w1",
  "kernel")``; every other tensor is a whole parameter (index ``None``, as :func:`hf_to_path`).

  Raises:
    ValueError: ``name`` is not a Llama-family tensor name.

  Example:
    >>> from proxjax.models.hf import hf_to_slot
    >>> hf_to_slot("model.layers.1.mlp.experts.3.down_proj.weight")
    (('model', 'layers', 1, 'mlp', 'experts', 'down_proj', 'kernel'), 3)
    >>> hf_to_slot("model.layers.1.mlp.gate.weight")  # the router: one dense (hidden, num_experts) kernel
    (('model', 'layers', 1, 'mlp', 'gate', 'kernel'), None)
    >>> hf_to_slot("model.layers.0.block_sparse_moe.experts.7.w2.weight")  # Mixtral: w2 is the down projection
    (('model', 'layers', 0, 'block_sparse_moe', 'experts', 'w2', 'kernel'), 7)
  """
  for expert_re in _EXPERT_RES:
    if m := expert_re.fullmatch(name):
      return ("model", "layers", int(m[1]), m[2], "experts", m[4], "kernel"), int(m[3])
  if m := _ROUTER_RE.fullmatch(name):
    return ("model", "layers", int(m[1]), m[2], "gate", "kernel"), None
  if name in _FIXED or _NORM_RE.fullmatch(name) or _LINEAR_RE.fullmatch(name):
    return hf_to_path(name), None
  raise ValueError(f"{name!r} is not a Llama-family tensor name")


def _is_experts(path: Path) -> bool:
  return len(path) > 3 and path[-3] == "experts" and path[-1] == "kernel"


def hf_names(path: Path, shape: tuple[int, ...]) -> list[str]:
  """The Hugging Face tensor names of an NNX parameter of this shape: one (:func:`path_to_hf`), or one per expert
  for a stacked expert kernel ``(num_experts, d_in, d_out)`` (inverse of :func:`hf_to_slot`).

  Example:
    >>> from proxjax.models.hf import hf_names
    >>> hf_names(("model", "layers", 0, "mlp", "experts", "up_proj", "kernel"), (2, 8, 4))
    ['model.layers.0.mlp.experts.0.up_proj.weight', 'model.layers.0.mlp.experts.1.up_proj.weight']
  """
  path = tuple(path)
  if not _is_experts(path):
    return [path_to_hf(path)]
  prefix = ".".join(str(p) for p in path[:-2])
  names = [f"{prefix}.{e}.{path[-2]}.weight" for e in range(shape[0])]
  if any(hf_to_slot(n) != (path, e) for e, n in enumerate(names)):
    raise ValueError(f"{path!r} is not a Llama-family parameter path")
  return names


def path_to_hf(path: Path) -> str:
  """The Hugging Face tensor name of an NNX parameter path (inverse of :func:`hf_to_path`).

  Example:
    >>> from proxjax.models import path_to_hf
    >>> path_to_hf(("model", "layers", 3, "mlp", "down_proj", "kernel"))
    'model.layers.3.mlp.down_proj.weight'
  """
  path = tuple(path)
  leaf = {"kernel": "weight", "embedding": "weight"}.get(path[-1], path[-1]) if path else ""
  name = ".".join([str(p) for p in path[:-1]] + [str(leaf)])
  try:
    ok = hf_to_path(name) == path
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"{path!r} is not a Llama-family parameter path")
  return name


def _is_float(arr: np.ndarray) -> bool:
  """Whether a NumPy array holds floating-point numbers (also bfloat16, which ml_dtypes registers as kind 'V')."""
  return np.issubdtype(arr.dtype, np.floating) or arr.dtype == jnp.bfloat16


def _is_kernel(path: Path) -> bool:
  return path[-1] == "kernel"


def _weight_files(model_dir: str) -> tuple[list[str], dict[str, str] | None]:
  """The safetensors files of a checkpoint (relative names) and the index's weight map (``None`` if single file)."""
  single = os.path.join(model_dir, SINGLE_FILE)
  index_path = os.path.join(model_dir, INDEX_FILE)
  if os.path.isfile(single):
    return [SINGLE_FILE], None
  if os.path.isfile(index_path):
    try:
      with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{index_path}: cannot read JSON: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise CheckpointError(f"{index_path}: no 'weight_map' object of tensor name -> file name")
    bad = sorted({v for v in weight_map.values() if os.path.basename(v) != v or not v})
    if bad:
      raise CheckpointError(f"{index_path}: shard names must be plain file names, got {bad}")
    return sorted(set(weight_map.values())), weight_map
  others = sorted(os.path.basename(p) for p in glob.glob(os.path.join(model_dir, "*"))
                  if p.endswith((".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".safetensors")))
  hint = f" (found {', '.join(others)}: only safetensors checkpoints are supported)" if others else ""
  raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir!r}{hint}")


FULL_HASH_BYTES = 64 * 2 ** 20
"""Files up to this size are fingerprinted by a full SHA-256; larger weight files by their safetensors header."""


def _sha256(path: str, limit: int | None = None) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    if limit is None:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    else:
      digest.update(f.read(limit))
  return digest.hexdigest()


def _header_bytes(path: str) -> int:
  with open(path, "rb") as f:
    head = f.read(8)
  return 8 + (int.from_bytes(head, "little") if len(head) == 8 else 0)


def checkpoint_fingerprint(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
  """What identifies a checkpoint's content, for deciding whether an interrupted run may resume on it.

  For every weight file: its size, modification time and a SHA-256 of its whole content when it is at most
  :data:`FULL_HASH_BYTES`, else of its safetensors header (every tensor's name, dtype, shape and byte range). A full
  hash of a multi-GB checkpoint would cost minutes at every start; the header, the size and the modification time
  change with any rewrite of the weights (a same-size rewrite changes the time). ``config.json``, the index and the
  tokenizer files are hashed in full (they are small). Touching a file without changing it therefore also refuses a
  resume: the safe side.

  Example:
    >>> import os, tempfile, json
    >>> d = tempfile.mkdtemp(); open(os.path.join(d, "config.json"), "w").write("{}")
    2
    >>> sorted(checkpoint_fingerprint(d))
    ['config.json']
  """
  model_dir = os.fspath(model_dir)
  out: dict[str, Any] = {}
  try:
    files, _ = _weight_files(model_dir)
  except CheckpointError:
    files = []
  for name in files:
    path = os.path.join(model_dir, name)
    st = os.stat(path)
    full = st.st_size <= FULL_HASH_BYTES
    out[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                 ("sha256" if full else "header_sha256"): _sha256(path, None if full else _header_bytes(path))}
  small = ["config.json", INDEX_FILE, *TOKENIZER_FILES]
  small += sorted(os.path.basename(p) for g in TOKENIZER_GLOBS for p in glob.glob(os.path.join(model_dir, g)))
  for name in small:
    path = os.path.join(model_dir, name)
    if os.path.isfile(path):
      out[name] = {"sha256": _sha256(path)}
  return out


def _problem_error(model_dir: str, problems: list[str], what: str) -> CheckpointError:
  lines = "\n".join(f"  - {p}" for p in problems)
  return CheckpointError(f"checkpoint {model_dir!r}: {len(problems)} {what}:\n{lines}")


def load_pretrained(model_dir: str | os.PathLike[str], *, param_dtype: Any = None, dtype: Any = jnp.float32,
                    sharding: ShardingFn | None = None, check_finite: bool = True) -> LlamaForCausalLM:
  """Loads a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 (text) safetensors checkpoint into a
  :class:`LlamaForCausalLM` (:data:`~proxjax.models.llama.SUPPORTED_ARCHITECTURES`).

  Reads ``config.json``, builds the model with ``nnx.eval_shape`` (nothing is initialised), validates all weight
  files, names and shapes, then reads ``model.safetensors`` or the shards listed in
  ``model.safetensors.index.json`` tensor by tensor: each is transposed to Flax layout if it is a linear weight,
  cast to ``param_dtype`` and placed with ``jax.device_put``; with ``sharding``, only the blocks of each tensor that
  this process's devices hold under the parameter's sharding are read (``get_slice``) and assembled into a global
  array, so on a mesh over several processes each process reads its own rows of the sharded weights.

  Args:
    model_dir: the checkpoint directory.
    param_dtype: parameter dtype; ``None`` keeps the checkpoint's ``config.dtype`` (bfloat16 stays bfloat16;
      float32 if the config names none).
    dtype: compute dtype of the model (float32 by default).
    sharding: optional ``sharding(path, shape) -> jax.sharding.Sharding`` for each parameter, called with the NNX
      path (e.g. ``("model", "layers", 0, "self_attn", "q_proj", "kernel")``) and the Flax shape; ``None`` puts
      every parameter on the default device.
    check_finite: raise if a tensor holds NaN or ±inf (with ``sharding``: in the blocks this process read; across
      processes every process raises when one found a problem).

  Returns:
    The loaded model.

  Raises:
    CheckpointError: ``model_dir`` is not a directory or has no ``config.json`` / weights; a weight file is missing
      (listed in the index), truncated or corrupt; tensors are missing, unexpected or of the wrong shape (all listed
      together, with their files); non-finite weights (``check_finite``).
    UnsupportedModelError: the config describes a model this module cannot run.

  Example:
    >>> import tempfile
    >>> from proxjax.models import CheckpointError, load_pretrained
    >>> try:
    ...   load_pretrained(tempfile.mkdtemp())
    ... except CheckpointError as e:
    ...   print("no config.json" in str(e))
    True
  """
  model_dir = os.fspath(model_dir)
  config = LlamaConfig.from_dir(model_dir)
  files, weight_map = _weight_files(model_dir)
  if param_dtype is None:
    param_dtype = dtype_from_name(config.dtype) or jnp.float32
  np_dtype = jnp.dtype(param_dtype)

  abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  targets = {path: var for path, var in flat}
  expected: dict[str, tuple[Path, int | None]] = {}
  for path, var in targets.items():
    names = hf_names(path, tuple(var.get_value().shape))
    expected.update({n: (path, i if _is_experts(path) else None) for i, n in enumerate(names)})

  # Pass 1: every file header (cheap: no tensor data is read).
  problems: list[str] = []
  where: dict[str, str] = {}
  shapes: dict[str, tuple[int, ...]] = {}
  kinds: dict[str, str] = {}
  for fname in files:
    fpath = os.path.join(model_dir, fname)
    if not os.path.isfile(fpath):
      problems.append(f"{fname}: listed in {INDEX_FILE} but missing")
      continue
    try:
      with safe_open(fpath, framework="numpy") as st:
        for name in st.keys():
          if name in where:
            problems.append(f"{name}: in both {where[name]} and {fname}")
          where[name] = fname
          tensor = st.get_slice(name)
          shapes[name], kinds[name] = tuple(tensor.get_shape()), tensor.get_dtype()
    except (SafetensorError, OSError) as e:
      problems.append(f"{fname}: not a readable safetensors file (truncated or corrupt?): {e}")
  if problems:
    raise _problem_error(model_dir, problems, "unreadable weight file(s)")

  # Pass 2: names and shapes, all problems together.
  if weight_map is not None:
    for name, fname in sorted(weight_map.items()):
      if where.get(name) != fname:
        problems.append(f"{name}: {INDEX_FILE} maps it to {fname}, which does not contain it")
  tied_head = config.tie_word_embeddings and "lm_head.weight" in where
  for name in sorted(expected):
    if name not in where:
      problems.append(f"missing tensor {name}")
  for name in sorted(where):
    if name not in expected and not _IGNORED_RE.fullmatch(name) and not (tied_head and name == "lm_head.weight"):
      problems.append(f"unexpected tensor {name} (in {where[name]})")
  for name, (path, index) in sorted(expected.items()):
    if name not in where:
      continue
    want = tuple(targets[path].get_value().shape)[(0 if index is None else 1):]
    want = want[::-1] if _is_kernel(path) else want
    if shapes[name] != want:
      problems.append(f"{name} (in {where[name]}) has shape {list(shapes[name])}, expected {list(want)}")
    if kinds[name] not in ("F16", "BF16", "F32", "F64"):
      problems.append(f"{name} (in {where[name]}) has dtype {kinds[name]}, expected a floating-point dtype")
  if tied_head and shapes["lm_head.weight"] != shapes.get("model.embed_tokens.weight"):
    problems.append(f"lm_head.weight (in {where['lm_head.weight']}) has shape {list(shapes['lm_head.weight'])} but "
                    "the embeddings are tied (tie_word_embeddings)")
  if problems:
    raise _problem_error(model_dir, problems, f"problem(s) against its {config.architecture} config")

  # Pass 3: the data, one tensor at a time.
  if sharding is not None:  # each parameter's blocks that this process's devices hold, and nothing else
    _read_blocks(model_dir, where, targets, sharding, np_dtype, tied_head, check_finite, problems)
    if problems:
      raise _problem_error(model_dir, problems, "bad tensor(s)")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
  by_file: dict[str, list[str]] = {}
  for name in sorted(where):
    if name in expected or (tied_head and name == "lm_head.weight"):
      by_file.setdefault(where[name], []).append(name)
  raw_embedding = raw_head = None
  stacks: dict[Path, tuple[np.ndarray, set[int]]] = {}
  for fname, names in by_file.items():
    with safe_open(os.path.join(model_dir, fname), framework="numpy") as st:
      for name in names:
        arr = st.get_tensor(name)
        if check_finite:
          bad = arr.size - np.count_nonzero(np.isfinite(arr))
          if bad:
            problems.append(f"{name} (in {fname}) has {bad} non-finite value(s)")
            continue
        if tied_head and name == "lm_head.weight":
          raw_head = arr
          continue
        if tied_head and name == "model.embed_tokens.weight":
          raw_embedding = arr
        path, index = expected[name]
        arr = np.ascontiguousarray((arr.T if _is_kernel(path) else arr).astype(np_dtype, copy=False))
        if index is not None:  # one expert of a stacked kernel: placed once all its experts are read
          shape = tuple(targets[path].get_value().shape)
          stack = stacks.setdefault(path, (np.empty(shape, np_dtype), set()))
          stack[0][index], _ = arr, stack[1].add(index)
          if len(stack[1]) < shape[0]:
            continue
          arr = stacks.pop(path)[0]
        targets[path].set_value(put(arr, sharding(path, arr.shape) if sharding else None))
  if tied_head and raw_head is not None and raw_embedding is not None and not np.array_equal(raw_head, raw_embedding):
    problems.append(f"lm_head.weight (in {where['lm_head.weight']}) differs from model.embed_tokens.weight but "
                    "config.json has tie_word_embeddings=true")
  if problems:
    raise _problem_error(model_dir, problems, "bad tensor(s)")
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


Block = tuple[tuple[int, int], ...]
"""A block of a parameter: ``(start, stop)`` along each of its axes."""


def _block_of(index: tuple[slice, ...], shape: tuple[int, ...]) -> Block:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _read_blocks(model_dir: str, where: Mapping[str, str], targets: Mapping[Path, Any], sharding: ShardingFn,
                 np_dtype: np.dtype, tied_head: bool, check_finite: bool, problems: list[str]) -> None:
  """Pass 3 of :func:`load_pretrained` with a ``sharding``: sets every parameter of ``targets`` to a global array
  built from only the blocks this process's devices hold (appending non-finite or untied-head problems).

  For each parameter, ``sharding(path, shape).addressable_devices_indices_map(shape)`` gives each local device's
  block; each distinct block is read once with ``safe_open(...).get_slice(name)[rows, cols]`` (a kernel's block
  ``(d_in range, d_out range)`` is the Hugging Face weight's ``[d_out range, d_in range]``, transposed; a stacked
  expert kernel's block reads its experts' tensors one by one), cast to ``np_dtype`` as the whole-tensor path casts
  (element by element, so bitwise the same values), copied to the devices that hold it, and the parameter is
  ``jax.make_array_from_single_device_arrays``. Across processes the blocks of a sharded parameter are disjoint: a
  process reads its devices' rows of the weight files (plus every file's header, read by pass 1), and a replicated
  parameter whole. The checks (``check_finite``, a tied ``lm_head.weight`` equal to the embeddings) cover what this
  process read; on several processes :func:`load_pretrained` then makes every process fail if one found a problem.
  """
  bad: dict[str, int] = {}
  untied = False

  with contextlib.ExitStack() as stack:
    opened: dict[str, Any] = {}

    def read(name: str, index: tuple[slice, ...]) -> np.ndarray:
      fname = where[name]
      if fname not in opened:
        opened[fname] = stack.enter_context(safe_open(os.path.join(model_dir, fname), framework="numpy"))
      raw = opened[fname].get_slice(name)[index]
      if check_finite:
        count = raw.size - np.count_nonzero(np.isfinite(raw))
        if count:
          bad[name] = bad.get(name, 0) + int(count)
      return raw

    def cast(raw: np.ndarray, kernel: bool) -> np.ndarray:
      return np.ascontiguousarray((raw.T if kernel else raw).astype(np_dtype, copy=False))

    for path, var in targets.items():
      shape = tuple(var.get_value().shape)
      names = hf_names(path, shape)
      target = sharding(path, shape)
      if isinstance(target, jax.sharding.Sharding):
        indices = {d: _block_of(i, shape) for d, i in target.addressable_devices_indices_map(shape).items()}
      else:  # a device (or anything else jax.device_put takes): the whole tensor
        indices = {None: tuple((0, n) for n in shape)}
      blocks: dict[Block, np.ndarray] = {}
      for block in dict.fromkeys(indices.values()):
        if _is_experts(path):
          (e0, e1), rest = block[0], block[1:]
          rows = tuple(slice(a, b) for a, b in rest[::-1])
          data = np.empty((e1 - e0,) + tuple(b - a for a, b in rest), np_dtype)
          for e in range(e0, e1):
            data[e - e0] = cast(read(names[e], rows), True)
        else:
          rows = tuple(slice(a, b) for a, b in (block[::-1] if _is_kernel(path) else block))
          raw = read(names[0], rows)
          if tied_head and names[0] == "model.embed_tokens.weight":
            head = read("lm_head.weight", rows)
            untied |= not (check_finite and ("lm_head.weight" in bad or names[0] in bad)) and not np.array_equal(
                head, raw)
          data = cast(raw, _is_kernel(path))
        blocks[block] = data
      if any(n in bad for n in names):
        continue
      if None in indices:
        var.set_value(put(blocks[indices[None]], target))
        continue
      arrays = [jax.device_put(blocks[block], device) for device, block in indices.items()]
      var.set_value(jax.make_array_from_single_device_arrays(shape, target, arrays))
  part = "" if jax.process_count() == 1 else " in the part this process read"
  for name in sorted(bad, key=lambda n: (where[n], n)):
    problems.append(f"{name} (in {where[name]}) has {bad[name]} non-finite value(s){part}")
  if untied:
    problems.append(f"lm_head.weight (in {where['lm_head.weight']}) differs from model.embed_tokens.weight{part} but "
                    "config.json has tie_word_embeddings=true")
  if jax.process_count() > 1:  # every process calls this (same arguments): all fail if one found a problem
    others = [p for p, n in enumerate(allgather_int(len(problems))) if n and p != jax.process_index()]
    if others and not problems:
      problems.append(f"process(es) {others} found bad tensors in the parts of the weights they read (their output "
                      "lists them)")


def check_sparsity(model_dir: str | os.PathLike[str], *, n: int = 2, m: int = 4,
                   spec: Callable[[Any, Any], int | None] = projection_spec) -> list[dict[str, Any]]:
  """Checks that every weight the sparsity ``spec`` selects (default :func:`proxjax.models.llama.projection_spec`:
  the q/k/v/o/gate/up/down projections) is N:M sparse along its input axis.

  Reads the weight files tensor by tensor (no model is built); a tensor is selected when ``spec`` gives axis 0 for
  its NNX path (:func:`hf_to_path`) and kernel shape. A Hugging Face weight is ``(d_out, d_in)``, so the
  groups are ``m`` consecutive entries along its **last** axis (docs/method.md, "Notation and layout"); a projection is ``ok`` when every group has
  at most ``n`` non-zeros (an input size not divisible by ``m`` is never ok).

  Returns:
    One dict per projection, in layer order: ``name`` (Hugging Face name), ``shape`` (``[d_out, d_in]``), ``zeros``,
    ``size``, ``sparsity`` (``zeros / size``), ``ok`` and ``negative_zeros`` (zeros stored as -0.0, which some
    sparse-format tools read as kept weights; proxjax writes every zero as +0.0).

  Raises:
    CheckpointError: as :func:`load_pretrained` for a directory without (readable) weight files.

  Example:
    >>> import os, tempfile, jax, numpy as np
    >>> from flax import nnx
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM, check_sparsity, save_pretrained
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                 num_attention_heads=2)
    >>> model = nnx.eval_shape(lambda: LlamaForCausalLM(c, rngs=nnx.Rngs(0)))
    >>> nnx.update(model, jax.tree.map(lambda s: np.ones(s.shape, s.dtype), nnx.state(model)))  # dense
    >>> out = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> save_pretrained(model, out)
    >>> rows = check_sparsity(out)
    >>> len(rows), rows[0]["name"], rows[0]["sparsity"], rows[0]["ok"]
    (7, 'model.layers.0.mlp.down_proj.weight', 0.0, False)
  """
  check_nm(n, m)
  model_dir = os.fspath(model_dir)
  if not os.path.isdir(model_dir):
    raise CheckpointError(f"{model_dir!r} is not a directory")
  if _UNFINISHED.match(os.path.basename(os.path.abspath(model_dir))):
    raise CheckpointError(f"{model_dir!r} is the temporary directory of an unfinished save, not a checkpoint")
  files, _ = _weight_files(model_dir)
  rows = []
  for fname in files:
    fpath = os.path.join(model_dir, fname)
    try:
      with safe_open(fpath, framework="numpy") as st:
        for name in st.keys():
          try:
            path, index = hf_to_slot(name)
          except ValueError:
            continue
          shape, dtype = tuple(st.get_slice(name).get_shape()), st.get_slice(name).get_dtype()
          stacked = (1,) * (index is not None)  # one expert: the spec sees a stack of one (E, d_in, d_out)
          kernel = jax.ShapeDtypeStruct(stacked + shape[::-1],
                                        jnp.float32 if dtype.startswith(("F", "BF")) else jnp.int32)
          if spec(path, kernel) is None:
            continue
          w = st.get_tensor(name)
          zeros = int(w.size - np.count_nonzero(w))
          negative_zeros = int(np.count_nonzero((w == 0) & np.signbit(w))) if _is_float(w) else 0
          ok = w.ndim == 2 and w.shape[-1] % m == 0
          if ok:
            nnz = np.count_nonzero(w.reshape(w.shape[0], -1, m), axis=-1)
            ok = bool(np.all(nnz <= n))
          rows.append({"name": name, "shape": list(w.shape), "zeros": zeros, "size": int(w.size),
                       "sparsity": zeros / max(int(w.size), 1), "ok": ok, "negative_zeros": negative_zeros})
    except (SafetensorError, OSError) as e:
      raise CheckpointError(f"{fpath}: not a readable safetensors file (truncated or corrupt?): {e}") from e
  return sorted(rows, key=lambda r: _natural_key(r["name"]))


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def _natural_key(name: str) -> list[tuple[int, Any]]:
  return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


def _default_permissions(path: str) -> None:
  """Gives ``path`` the permissions a plain ``open(path, "w")`` would (safetensors writes its files as 0600)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def _write_weights(model: LlamaForCausalLM, out_dir: str, np_dtype: np.dtype, max_shard_bytes: int | None) -> None:
  entries = sorted(((name, path, var, i if _is_experts(path) else None)
                    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
                    for i, name in enumerate(hf_names(path, tuple(var.get_value().shape)))),
                   key=lambda e: _natural_key(e[0]))
  sizes = [math.prod(var.get_value().shape[(0 if i is None else 1):]) * np_dtype.itemsize for _, _, var, i in entries]
  shards: list[list[int]] = [[]]
  used = 0
  for i, size in enumerate(sizes):
    if max_shard_bytes is not None and shards[-1] and used + size > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(i)
    used += size
  n = len(shards)
  weight_map = {}
  for k, shard in enumerate(shards):
    fname = SINGLE_FILE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
    tensors = {}
    for i in shard:
      name, path, var, index = entries[i]
      arr = np.asarray(jax.device_get(var.get_value() if index is None else var.get_value()[index]))
      # safetensors writes the raw buffer: a transposed view must be made contiguous or it is silently scrambled.
      arr = np.ascontiguousarray((arr.T if _is_kernel(path) else arr).astype(np_dtype, copy=False))
      if _is_float(arr):
        arr = np.where(arr == 0, np.zeros((), arr.dtype), arr)  # every zero as +0.0 (-0.0 reads as kept to some tools)
      tensors[name] = arr
      weight_map[name] = fname
    save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
    _default_permissions(os.path.join(out_dir, fname))
    del tensors
  if n > 1:
    _write_json(os.path.join(out_dir, INDEX_FILE), {"metadata": {"total_size": int(sum(sizes))},
                                                     "weight_map": weight_map})


def save_pretrained(model: LlamaForCausalLM, out_dir: str | os.PathLike[str], *,
                    source_dir: str | os.PathLike[str] | None = None, dtype: Any = None,
                    metadata: Mapping[str, Any] | None = None, max_shard_bytes: int | None = None,
                    overwrite: bool = False, allow_fatrelu: bool = False) -> None:
  """Writes ``model`` as a Hugging Face checkpoint directory that transformers loads.

  Writes the weights (Hugging Face names, linear weights transposed back to ``(d_out, d_in)``, cast to ``dtype``) as
  ``model.safetensors``, or as ``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``
  when they exceed ``max_shard_bytes``; ``config.json`` from ``model.config.to_hf()`` with the saved dtype; the
  tokenizer and generation files of ``source_dir`` (:data:`TOKENIZER_FILES`, ``*.model``, ``*.tiktoken``);
  ``metadata`` as ``proxjax.json``. A tied model writes no ``lm_head.weight``.

  The save is atomic: everything is written into a temporary sibling directory that is renamed to ``out_dir`` only
  when complete (and removed on any error), so a failed or interrupted save never leaves a complete-looking
  checkpoint.

  Args:
    model: the model.
    out_dir: the output directory; it must not exist or be empty, unless ``overwrite``.
    source_dir: the original checkpoint directory, to copy its tokenizer and generation files; optional.
    dtype: storage dtype (name or dtype: float32, bfloat16, float16); default ``model.config.dtype`` (the source
      checkpoint's dtype: bfloat16 in, bfloat16 out), else the embedding's dtype.
    metadata: a JSON-serialisable dict written as ``proxjax.json`` (e.g. how the model was pruned).
    max_shard_bytes: largest shard size in bytes; ``None`` writes a single file. A tensor larger than this gets a
      shard of its own.
    overwrite: replace an existing non-empty ``out_dir``.
    allow_fatrelu: write a FATReLU model (``model.config.activation_threshold > 0``) with ``"hidden_act":
      "fatrelu", "hidden_act_param": θ`` in ``config.json`` (see the module docstring); without it such a model is
      refused. Ignored for SiLU and plain ReLU models.

  Raises:
    CheckpointError: ``out_dir`` exists and is not empty (without ``overwrite``) or is not a directory, or it is,
      lies inside or contains ``source_dir``.
    UnsupportedModelError: a FATReLU model without ``allow_fatrelu`` (nothing is written).

  Example:
    >>> import os, tempfile, jax, numpy as np
    >>> from flax import nnx
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM, load_pretrained, save_pretrained
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                 num_attention_heads=2)
    >>> model = nnx.eval_shape(lambda: LlamaForCausalLM(c, rngs=nnx.Rngs(0)))
    >>> nnx.update(model, jax.tree.map(lambda s: np.ones(s.shape, s.dtype), nnx.state(model)))  # dummy weights
    >>> out = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> save_pretrained(model, out, metadata={"note": "example"})
    >>> sorted(os.listdir(out))
    ['config.json', 'model.safetensors', 'proxjax.json']
    >>> load_pretrained(out).model.layers[0].mlp.up_proj.kernel.get_value().shape
    (16, 32)
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  if source_dir is not None:
    real_out, real_src = os.path.realpath(out_dir), os.path.realpath(os.fspath(source_dir))
    if any(a == b or a.startswith(b.rstrip(os.sep) + os.sep) for a, b in ((real_out, real_src), (real_src, real_out))):
      raise CheckpointError(f"refusing to write {out_dir!r}: it is, lies inside or contains the source checkpoint "
                            f"{os.fspath(source_dir)!r} (the source is never written)")
  theta = model.config.activation_threshold
  if theta > 0 and not allow_fatrelu:
    raise UnsupportedModelError(
        f"refusing to save a FATReLU model (activation_threshold={theta:g}: act(x) = x if x > {theta:g} else 0) as "
        "a Hugging Face checkpoint: transformers has ReLU but no FATReLU, so a config.json saying hidden_act='relu' "
        "would make transformers and other tools silently run a different model (gate activations in "
        f"(0, {theta:g}] kept instead of zeroed). Either save a plain ReLU model, which transformers runs faithfully "
        "(proxjax.training.prosparse.with_activation(model, 'relu', threshold=0.0), i.e. LlamaConfig activation_threshold=0), "
        "or pass allow_fatrelu=True to write hidden_act='fatrelu' with hidden_act_param="
        f"{theta:g} (the MiniCPM-S/ProSparse convention): proxjax's load_pretrained runs it exactly, while "
        "transformers' LlamaForCausalLM refuses to build it.")
  if os.path.exists(out_dir):
    if not os.path.isdir(out_dir):
      raise CheckpointError(f"{out_dir!r} exists and is not a directory")
    if os.listdir(out_dir) and not overwrite:
      raise CheckpointError(f"{out_dir!r} exists and is not empty; pass overwrite=True to replace it")
  if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes < 1):
    raise ValueError(f"max_shard_bytes must be a positive int or None, got {max_shard_bytes!r}")
  if dtype is None:
    dtype = model.config.dtype or model.model.embed_tokens.embedding.get_value().dtype
  dtype_name = name_of_dtype(dtype_from_name(dtype) if isinstance(dtype, str) else dtype)
  np_dtype = jnp.dtype(dtype_from_name(dtype_name))
  if metadata is not None:
    metadata = json.loads(json.dumps(dict(metadata)))  # fail early (before writing) if it is not JSON
  config = dataclasses.replace(model.config, dtype=dtype_name).to_hf()

  parent, base = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex[:12]}")
  os.mkdir(tmp)
  try:
    _write_weights(model, tmp, np_dtype, max_shard_bytes)
    _write_json(os.path.join(tmp, "config.json"), config)
    if source_dir is not None:
      source_dir = os.fspath(source_dir)
      if not os.path.isdir(source_dir):
        raise CheckpointError(f"source_dir {source_dir!r} is not a directory")
      names = {n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source_dir, n))}
      for pattern in TOKENIZER_GLOBS:
        names.update(os.path.basename(p) for p in glob.glob(os.path.join(source_dir, pattern)) if os.path.isfile(p))
      for name in sorted(names):
        shutil.copy2(os.path.join(source_dir, name), os.path.join(tmp, name))
    if metadata is not None:
      _write_json(os.path.join(tmp, METADATA_FILE), metadata)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
      old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:12]}")
      os.rename(out_dir, old)
      try:
        os.rename(tmp, out_dir)
      except BaseException:
        os.rename(old, out_dir)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)  # replaces an empty directory atomically
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


_UNFINISHED = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{12}$")


def remove_unfinished_saves(out_dir: str | os.PathLike[str]) -> list[str]:
  """Removes the temporary siblings (``.NAME.tmp-…``, ``.NAME.old-…``) that a :func:`save_pretrained` of
  ``out_dir`` killed mid-way leaves behind; call it while no other save of ``out_dir`` runs (the workflows hold a
  lock). Returns the removed paths."""
  parent, base = os.path.split(os.path.abspath(os.fspath(out_dir)))
  removed = []
  for pattern in (f".{base}.tmp-*", f".{base}.old-*"):
    for p in glob.glob(os.path.join(glob.escape(parent), pattern)):
      if os.path.isdir(p) and _UNFINISHED.match(os.path.basename(p)):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
  return removed


def save_state(model: nnx.Module, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
  """Saves the NNX state of ``model`` (all variables) with orbax-checkpoint's ``StandardCheckpointer``.

  orbax writes into a temporary directory and renames it on completion, so the save is atomic; this call returns
  once the checkpoint is finalised. The structure (config, dtypes) is not saved: restore into a model or an abstract
  model (``nnx.eval_shape``) of the same architecture with :func:`restore_state`.

  Raises:
    CheckpointError: ``path`` exists (without ``overwrite``).

  Example:
    >>> import os, tempfile, jax, numpy as np
    >>> from flax import nnx
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM, restore_state, save_state
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                 num_attention_heads=2)
    >>> abstract = nnx.eval_shape(lambda: LlamaForCausalLM(c, rngs=nnx.Rngs(0)))
    >>> model = nnx.merge(*nnx.split(abstract))
    >>> nnx.update(model, jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), nnx.state(model)))
    >>> path = os.path.join(tempfile.mkdtemp(), "state")
    >>> save_state(model, path)
    >>> float(restore_state(abstract, path).model.norm.weight.get_value()[0])
    0.5
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415  (orbax is slow to import; only these two functions need it)

  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise CheckpointError(f"{path!r} exists; pass overwrite=True to replace it")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, nnx.state(model), force=overwrite)


def restore_state(model_or_abstract: nnx.Module, path: str | os.PathLike[str]) -> nnx.Module:
  """Restores a state saved by :func:`save_state` into a new model with the structure of ``model_or_abstract``.

  ``model_or_abstract`` is a concrete model or one built with ``nnx.eval_shape``; its shapes, dtypes and shardings
  (where it has them) are the restore target. The argument itself is not modified.

  Raises:
    CheckpointError: ``path`` does not exist or does not match the model's structure.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"no orbax checkpoint at {path!r}")
  graphdef, state = nnx.split(model_or_abstract)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        state)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(path, target)
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path}: cannot restore into {type(model_or_abstract).__name__}: {e}") from e
  return nnx.merge(graphdef, restored)
