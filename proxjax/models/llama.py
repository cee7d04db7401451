r"""A Flax NNX LLaMA-family causal language model (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3,
Qwen3-MoE, Mixtral) that mirrors Hugging Face names.

The module tree is the Hugging Face one, so mapping a checkpoint is mechanical (:mod:`proxjax.models.hf`)::

  LlamaForCausalLM
    .model.embed_tokens          nnx.Embed, param ``embedding`` (vocab, hidden)
    .model.layers[i]             LlamaDecoderLayer (an ``nnx.List``)
      .input_layernorm           LlamaRMSNorm, param ``weight``
      .self_attn.{q,k,v,o}_proj  nnx.Linear, ``kernel`` (d_in, d_out) = HF ``weight``ᵀ, optional ``bias``
      .self_attn.{q,k}_norm      LlamaRMSNorm over ``head_dim`` (``qk_norm``: Qwen3, Gemma 3), else ``None``
      .post_attention_layernorm  LlamaRMSNorm
      .pre_feedforward_layernorm, .post_feedforward_layernorm   LlamaRMSNorm (``post_norms``: Gemma 2 / 3), else absent
      .mlp.{gate,up,down}_proj   nnx.Linear
      .self_attn.qkv_proj, .mlp.gate_up_proj   Phi-3 (``fused_projections``) instead of q/k/v and gate/up
      .mlp.gate                  Qwen3-MoE (``num_experts``): the router, nnx.Linear (hidden, E) without bias
      .mlp.experts.{gate,up,down}_proj   StackedLinear, ``kernel`` (E, d_in, d_out); HF ``experts.{e}.*.weight``
      .block_sparse_moe.gate, .block_sparse_moe.experts.{w1,w3,w2}   Mixtral: the same, under its checkpoints' names
                                 (``w1`` gate, ``w3`` up, ``w2`` down; HF ``block_sparse_moe.experts.{e}.w1.weight``)
    .model.norm                  LlamaRMSNorm
    .lm_head                     nnx.Linear without bias, or ``None`` when the embeddings are tied

The families differ in a few named ways, each a field of :class:`LlamaConfig` (the architecture fixes the first four):

============  =======  ==============  ==========  ================  ===============================================
family        qk_norm  norm_plus_one   post_norms  scale_embeddings  other
============  =======  ==============  ==========  ================  ===============================================
Llama         no       no              no          no                biases (``attention_bias``, ``mlp_bias``)
Mistral       no       no              no          no                ``sliding_window`` on every layer
Qwen2         no       no              no          no                q/k/v biases
Qwen3         yes      no              no          no                explicit ``head_dim``; optional sliding layers
Gemma 2       no       yes             yes         yes               GeGLU, ``attn_softcap``, ``final_softcap``,
                                                                     ``query_pre_attn_scalar``, ``layer_types``
Gemma 3 text  yes      yes             yes         yes               as Gemma 2 without ``attn_softcap``, and
                                                                     ``rope_local_theta`` for sliding layers
Phi-3         no       no              no          no                ``fused_projections``; ``sliding_window`` on
                                                                     every layer
Qwen3-MoE     yes      no              no          no                experts (``num_experts`` …), window on every
                                                                     layer
Mixtral       no       no              no          no                experts named ``block_sparse_moe.experts.w*``,
                                                                     weights always renormalised and kept in float32;
                                                                     ``sliding_window`` on every layer
============  =======  ==============  ==========  ================  ===============================================

The maths, for hidden states ``h`` of shape ``(B, T, D)``:

* RMSNorm, computed in float32 like Hugging Face: ``y = w · cast_in(x / sqrt(mean(x²) + ε))``; with
  ``norm_plus_one`` (Gemma) ``y = cast_in((x / sqrt(mean(x²) + ε)) · (1 + w))``, all in float32 before the cast.
* Embeddings: ``h = E[ids]``; with ``scale_embeddings`` (Gemma) ``h = E[ids] · cast(float32(sqrt(D)))``, the scale
  cast to the compute dtype as transformers casts it to the model's dtype.
* Rotary embedding: ``θ_i = rope_theta^{-2i/d}`` (``d = head_dim``, ``i < d/2``), rescaled by the ``"linear"``
  (``θ_i / factor``) or ``"llama3"`` (wavelength-dependent) rules; ``cos, sin = cos(p θ), sin(p θ)`` duplicated to
  ``d`` entries, and ``rope(x) = x cos + rotate_half(x) sin`` with ``rotate_half([x₁, x₂]) = [−x₂, x₁]``. With
  ``rope_local_theta`` (Gemma 3) the sliding-window layers use ``θ_i = rope_local_theta^{-2i/d}`` (unscaled).
* Attention: ``q = x W_q`` (with ``qk_norm``: ``q ← RMSNorm_d(q)`` per head, before RoPE; the same for ``k``),
  ``s = q kᵀ · r`` with ``r = query_pre_attn_scalar^{-1/2}`` (``head_dim^{-1/2}`` by default), with
  ``attn_softcap = c``: ``s ← c · tanh(s / c)``; then ``softmax(s + mask) v`` per head, the softmax in float32, the
  ``num_key_value_heads`` key/value heads each shared by ``num_attention_heads / num_key_value_heads`` query heads;
  the mask is causal and, on a layer with a window ``w`` (``sliding_window`` on the layers whose ``layer_types``
  entry is ``"sliding_attention"``, every layer when ``layer_types`` is ``None``), also hides keys more than
  ``w − 1`` positions back (Hugging Face's sliding-window mask).
* MLP: ``down(act(gate(x)) ⊙ up(x))`` with ``act`` = SiLU (``x σ(x)``), ReLU, or the tanh GELU
  ``½x(1 + tanh(sqrt(2/π)(x + 0.044715x³)))`` (``"gelu_pytorch_tanh"``, Gemma's GeGLU) (``hidden_act``); with ReLU and
  an ``activation_threshold`` ``θ > 0``, FATReLU: ``act(x) = x if x > θ else 0`` (the comparison in float32).
  ``model(ids, return_activations=True)`` also returns every block's ``act(gate(x))`` (the FFN intermediate
  activations, ``(B, T, intermediate_size)`` each).
* Mixture of experts (:class:`SparseMoeBlock`): ``p = softmax(x W_g)`` in float32, the top ``k`` experts and
  weights (renormalised with ``norm_topk_prob``; always for Mixtral), ``Σ_j w_j · down_{e_j}(act(x G_{e_j}) ⊙ x
  U_{e_j})``.
* Block: ``h ← h + attn(norm₁(h))``, ``h ← h + mlp(norm₂(h))``; with ``post_norms`` (Gemma)
  ``h ← h + norm_post_attn(attn(norm₁(h)))``, ``h ← h + norm_post_ff(mlp(norm_pre_ff(h)))``. Logits
  ``z = norm(h) Wₗₘᵀ`` in float32; with ``final_softcap = c``: ``z ← c · tanh(z / c)`` (in float32).

Parameters may be stored in one dtype (``param_dtype``, e.g. bfloat16) while the forward computes in another
(``dtype``, float32 by default); ``nnx.Linear`` / ``nnx.Embed`` cast the parameters to the compute dtype.

Notes:
  * Matmuls use JAX's default precision. On GPUs that is TF32 for float32 inputs, whereas PyTorch computes float32
    matmuls in full float32 by default: for float32 parity there, run under
    ``jax.default_matmul_precision("highest")``. On CPU the default is full float32.
  * Token ids outside ``[0, vocab_size)`` are not checked (``jnp.take`` fills them with NaN embeddings).
  * The forward loops over ``model.layers`` in Python, so ``jit`` of the whole model unrolls every block (compile
    time grows with depth); layer-wise code calls the blocks one at a time instead.
  * No padding mask: every sequence of a batch is a full causal sequence, so right padding never changes the logits
    of the real positions before it. The KV cache and greedy decoding of right-padded batches are in
    :mod:`proxjax.models.generate` (through :meth:`LlamaAttention.project`, :meth:`LlamaAttention.attend` and the
    ``attention`` argument of :meth:`LlamaDecoderLayer.__call__`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.typing import ArrayLike

from proxjax.core.spec import path_names

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")
"""The prunable linears of a decoder block, as attribute paths relative to the block (= Hugging Face names)."""

FUSED_LINEAR_NAMES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
"""The prunable linears of a Phi-3 block (``fused_projections``): q/k/v in one kernel, gate/up in one kernel."""

EXPERT_NAMES = ("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj")
"""The stacked expert kernels of a Qwen3-MoE block (``(E, d_in, d_out)`` each; gate, up, down); Hugging Face stores
expert ``e`` of ``mlp.experts.gate_proj`` as ``mlp.experts.{e}.gate_proj.weight``."""

MIXTRAL_EXPERT_NAMES = ("block_sparse_moe.experts.w1", "block_sparse_moe.experts.w3", "block_sparse_moe.experts.w2")
"""The stacked expert kernels of a Mixtral block, in the order of :data:`EXPERT_NAMES` (gate ``w1``, up ``w3``, down
``w2``): Mixtral checkpoints, and transformers' ``save_pretrained``, store expert ``e`` as
``block_sparse_moe.experts.{e}.w1.weight`` and the router as ``block_sparse_moe.gate.weight``."""

_LINEAR_PARTS = frozenset(tuple(n.split(".")[-2:]) for n in LINEAR_NAMES + FUSED_LINEAR_NAMES)
_EXPERT_SUFFIXES = frozenset(EXPERT_NAMES + MIXTRAL_EXPERT_NAMES)


def expert_names(config: LlamaConfig) -> tuple[str, str, str]:
  """The ``(gate, up, down)`` stacked expert kernels of a mixture-of-experts block, relative to the block:
  :data:`MIXTRAL_EXPERT_NAMES` for Mixtral, :data:`EXPERT_NAMES` otherwise; the first part (``mlp`` or
  ``block_sparse_moe``) is the block's attribute that holds the router (``gate``) and the experts.

  Example:
    >>> from proxjax.models.llama import LlamaConfig, expert_names
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                 num_attention_heads=2, architecture="MixtralForCausalLM", num_experts=4, num_experts_per_tok=2)
    >>> expert_names(c)
    ('block_sparse_moe.experts.w1', 'block_sparse_moe.experts.w3', 'block_sparse_moe.experts.w2')
  """
  if not config.num_experts:
    raise ValueError(f"{config.architecture} has no mixture of experts (num_experts is None)")
  return MIXTRAL_EXPERT_NAMES if config.architecture == "MixtralForCausalLM" else EXPERT_NAMES


def linear_names(config: LlamaConfig) -> tuple[str, ...]:
  """The prunable linears of every decoder block of a model with this config, relative to the block:
  :data:`LINEAR_NAMES`, with Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` (:data:`FUSED_LINEAR_NAMES`), or with the
  MLP replaced by the stacked experts (:func:`expert_names`: :data:`EXPERT_NAMES`, Mixtral's
  :data:`MIXTRAL_EXPERT_NAMES`) for a mixture of experts.

  Example:
    >>> from proxjax.models.llama import LlamaConfig, linear_names
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                 num_attention_heads=2, architecture="Phi3ForCausalLM")
    >>> linear_names(c)
    ('self_attn.qkv_proj', 'self_attn.o_proj', 'mlp.gate_up_proj', 'mlp.down_proj')
  """
  if config.fused_projections:
    return FUSED_LINEAR_NAMES
  if config.num_experts:
    return LINEAR_NAMES[:4] + expert_names(config)
  return LINEAR_NAMES


def projection_spec(path: Sequence[Any], leaf: Any) -> int | None:
  """The sparsity spec of the LLaMA family: ``0`` (groups along the input axis) for the 2-D floating kernel of a
  q/k/v/o/gate/up/down projection of a decoder block (``…layers.N.self_attn.q_proj.kernel`` etc., Phi-3's fused
  ``qkv_proj`` and ``gate_up_proj`` too), ``1`` for a stacked expert kernel ``(E, d_in, d_out)``
  (``…layers.N.mlp.experts.gate_proj.kernel`` etc., Mixtral's ``…layers.N.block_sparse_moe.experts.w1.kernel``
  etc.: every expert's input axis), ``None`` for everything else (embeddings, norms, biases, the router ``mlp.gate``
  / ``block_sparse_moe.gate``, ``lm_head``).

  It is the one notion of "which weights are pruned" for these models: the block-by-block pipeline, ``proxjax
  check``, the fine-tuning masks and ProxSparse all select with it (as a spec, see :mod:`proxjax.core.spec`).

  Example:
    >>> import jax.numpy as jnp
    >>> from jax.tree_util import DictKey as K
    >>> projection_spec((K("model"), K("layers"), K(0), K("mlp"), K("up_proj"), K("kernel")), jnp.ones((8, 4)))
    0
    >>> projection_spec((K("lm_head"), K("kernel")), jnp.ones((8, 4))) is None
    True
    >>> projection_spec((K("model"), K("layers"), K(0), K("mlp"), K("experts"), K("down_proj"), K("kernel")),
    ...                 jnp.ones((4, 8, 4)))
    1
  """
  names = [str(n) for n in path_names(path)] if path and not isinstance(path[0], str | int) else [str(p) for p in path]
  if len(names) < 4 or names[-1] != "kernel" or "layers" not in names:
    return None
  shape, dtype = getattr(leaf, "shape", ()), getattr(leaf, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    return None
  part = tuple(names[-3:-1])
  if part in _LINEAR_PARTS and len(shape) == 2:
    return 0
  if ".".join(names[-4:-1]) in _EXPERT_SUFFIXES and len(shape) == 3:
    return 1
  return None

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "Qwen3MoeForCausalLM",
                           "MixtralForCausalLM")
"""The Hugging Face ``architectures`` this model runs (Gemma 3: the text-only ``Gemma3ForCausalLM`` checkpoints)."""
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text",
                "Phi3ForCausalLM": "phi3", "Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral"}
_GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
_MOE = ("Qwen3MoeForCausalLM", "MixtralForCausalLM")
_EVERY_LAYER_WINDOW = ("MistralForCausalLM", "Phi3ForCausalLM", "Qwen3MoeForCausalLM",
                       "MixtralForCausalLM")  # one window for all layers
_FAMILY_TRAITS = ("qk_norm", "norm_plus_one", "post_norms", "scale_embeddings", "fused_projections")
_TRAITS = {  # what each architecture's Hugging Face class computes, in the order of _FAMILY_TRAITS
    "LlamaForCausalLM": (False, False, False, False, False),
    "MistralForCausalLM": (False, False, False, False, False),
    "Qwen2ForCausalLM": (False, False, False, False, False),
    "Qwen3ForCausalLM": (True, False, False, False, False),
    "Gemma2ForCausalLM": (False, True, True, True, False),
    "Gemma3ForCausalLM": (True, True, True, True, False),
    "Phi3ForCausalLM": (False, False, False, False, True),
    "Qwen3MoeForCausalLM": (True, False, False, False, False),
    "MixtralForCausalLM": (False, False, False, False, False),
}
# transformers' defaults for config.json keys that may be absent (the others default as for Llama).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "Qwen3ForCausalLM": {"head_dim": 128, "max_position_embeddings": 32768, "sliding_window": 4096},
    "Gemma2ForCausalLM": {"head_dim": 256, "max_position_embeddings": 8192, "tie_word_embeddings": True,
                          "sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
                          "final_logit_softcapping": 30.0, "rope_theta": 10000.0},
    "Gemma3ForCausalLM": {"head_dim": 256, "max_position_embeddings": 131072, "tie_word_embeddings": True,
                          "sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": None,
                          "final_logit_softcapping": None, "rope_theta": 1_000_000.0,
                          "rope_local_base_freq": 10000.0},
    "Phi3ForCausalLM": {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "sliding_window": None},
    "Qwen3MoeForCausalLM": {"max_position_embeddings": 32768, "sliding_window": 4096, "num_experts": 128,
                            "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": False,
                            "decoder_sparse_step": 1},
    "MixtralForCausalLM": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 1_000_000.0,
                           "sliding_window": None, "num_experts": 8, "num_experts_per_tok": 2,
                           "num_key_value_heads": 8},
}
_ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "relu": jax.nn.relu,
                "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}
LAYER_TYPES = ("full_attention", "sliding_attention")
"""The values of :attr:`LlamaConfig.layer_types` (Hugging Face's names)."""
_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_INIT_STD = 0.02  # Hugging Face's default initializer_range, used for freshly initialised (random) models.
_F32 = jnp.float32


class UnsupportedModelError(ValueError):
  """The checkpoint describes a model (architecture, activation, RoPE variant, ...) that this module cannot run."""


class CheckpointError(ValueError):
  """A checkpoint directory, its ``config.json`` or its weight files are missing, malformed or inconsistent."""


def dtype_from_name(name: str | None) -> Any:
  """The JAX dtype of a Hugging Face ``dtype`` / ``torch_dtype`` string (``None`` stays ``None``).

  Example:
    >>> from proxjax.models.llama import dtype_from_name
    >>> dtype_from_name("torch.bfloat16")
    <class 'jax.numpy.bfloat16'>
  """
  if name is None:
    return None
  key = str(name).removeprefix("torch.")
  if key not in _DTYPES:
    raise UnsupportedModelError(f"dtype {name!r} is not supported (supported: {', '.join(_DTYPES)})")
  return _DTYPES[key]


def name_of_dtype(dtype: Any) -> str:
  name = jnp.dtype(dtype).name
  if name not in _DTYPES:
    raise UnsupportedModelError(f"dtype {name!r} is not supported (supported: {', '.join(_DTYPES)})")
  return name


def _freeze(value: Any) -> Any:
  if isinstance(value, list | tuple):
    return tuple(_freeze(v) for v in value)
  return value


def _thaw(value: Any) -> Any:
  if isinstance(value, tuple):
    return [_thaw(v) for v in value]
  return value


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The architecture of a Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 / Phi-3 / Qwen3-MoE / Mixtral causal LM
  (the fields of a Hugging Face ``config.json``).

  Build it from a ``config.json`` dict with :meth:`from_hf` / :meth:`from_dir`, or directly (fields left ``None``
  are derived). It is frozen and hashable (``extra`` is excluded from equality and hashing), so it can be a static
  attribute of an NNX module under ``jit``.

  Attributes:
    vocab_size: number of tokens ``V``.
    hidden_size: model width ``D``.
    intermediate_size: MLP width.
    num_hidden_layers: number of decoder blocks.
    num_attention_heads: query heads ``H``.
    num_key_value_heads: key/value heads (GQA); ``None`` means ``H``. Must divide ``H``.
    head_dim: per-head width ``d``; ``None`` means ``D // H``. Must be even (RoPE rotates pairs).
    rms_norm_eps: ``ε`` of every RMSNorm.
    rope_theta: RoPE base.
    rope_scaling: ``None`` (plain RoPE) or the scaling parameters as a sorted tuple of ``(key, value)`` items that
      include ``"rope_type"`` (``"linear"`` or ``"llama3"``); a dict is accepted and converted.
    max_position_embeddings: trained context length (informational; also the llama3 default for
      ``original_max_position_embeddings``).
    tie_word_embeddings: logits use the embedding matrix (no ``lm_head``).
    qkv_bias: q/k/v projections have a bias; ``None`` means the architecture's default (Qwen2: ``True``).
    o_bias: the output projection has a bias; ``None`` means ``qkv_bias`` for Llama, Qwen3 and Gemma (one
      ``attention_bias`` for all four), ``False`` for Mistral and Qwen2.
    mlp_bias: the MLP projections have biases (Llama's ``mlp_bias``).
    hidden_act: ``"silu"``, ``"relu"`` or ``"gelu_pytorch_tanh"`` (``"swish"`` is SiLU); Gemma's ``config.json``
      key is ``hidden_activation``. A ``config.json`` with ``"hidden_act": "fatrelu"`` (the MiniCPM / ProSparse
      convention, read by vLLM's MiniCPM) parses to ``"relu"`` with ``activation_threshold = hidden_act_param`` (0
      when absent).
    sliding_window: ``None`` or the attention window ``w`` (keys at most ``w − 1`` positions back) of the
      sliding-window layers (see ``layer_types``): Mistral (every layer), Qwen3 (``use_sliding_window``), Gemma.
    architecture: one of :data:`SUPPORTED_ARCHITECTURES`.
    dtype: the checkpoint's dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``) or ``None`` if unknown.
    bos_token_id: beginning-of-sequence token, or ``None``.
    eos_token_id: end-of-sequence token(s): an int, a tuple of ints, or ``None``.
    extra: the full original ``config.json`` dict (``{}`` when built directly); :meth:`to_hf` starts from it.
    activation_threshold: the FATReLU threshold ``θ ≥ 0``: the gate activation is ``x if x > θ else 0``. Only valid
      with ``hidden_act="relu"`` (``θ = 0`` is plain ReLU, the default). Hugging Face transformers has no FATReLU:
      :meth:`to_hf` writes ``θ > 0`` as ``"hidden_act": "fatrelu", "hidden_act_param": θ``, which transformers'
      Llama refuses to build, and :func:`proxjax.models.save_pretrained` only writes it on request
      (``allow_fatrelu=True``).
    qk_norm: per-head RMSNorm of the queries and keys (``self_attn.q_norm`` / ``k_norm``, over ``head_dim``) before
      RoPE: Qwen3, Gemma 3. ``None`` means the architecture's (the only value its Hugging Face class computes).
    norm_plus_one: every RMSNorm scales by ``1 + w`` (computed in float32) instead of ``w``: Gemma. ``None``: the
      architecture's.
    post_norms: Gemma's four norms per block (``post_attention_layernorm`` after attention, ``pre_feedforward_layernorm``
      and ``post_feedforward_layernorm`` around the MLP). ``None``: the architecture's.
    scale_embeddings: embeddings multiplied by ``sqrt(hidden_size)``: Gemma. ``None``: the architecture's.
    attn_softcap: ``None`` or ``c > 0``: attention scores ``s ← c · tanh(s / c)`` before the mask (Gemma 2's
      ``attn_logit_softcapping``; transformers' Gemma 3 does not apply one, so it is refused there).
    final_softcap: ``None`` or ``c > 0``: logits ``z ← c · tanh(z / c)`` (Gemma's ``final_logit_softcapping``).
    query_pre_attn_scalar: ``None`` or ``s > 0``: attention scores are scaled by ``s^{-1/2}`` instead of
      ``head_dim^{-1/2}`` (Gemma only; ``None`` becomes ``head_dim`` there).
    layer_types: ``None`` or one of :data:`LAYER_TYPES` per layer: ``"sliding_attention"`` layers use
      ``sliding_window`` (and ``rope_local_theta``), ``"full_attention"`` layers attend to every earlier position.
      ``None`` means every layer is ``"sliding_attention"`` when ``sliding_window`` is set, else ``"full_attention"``
      (Mistral). Qwen3 and Gemma only; stored resolved (a tuple) for Gemma and for Qwen3 with a window, ``None`` for
      Qwen3 without one, so that equal models have equal configs.
    rope_local_theta: ``None`` or the RoPE base of the sliding-window layers (Gemma 3's ``rope_local_base_freq`` /
      ``rope_parameters["sliding_attention"]``, never rescaled); Gemma 3 only (it defaults to 10000 there).
    fused_projections: Phi-3's fused kernels: ``self_attn.qkv_proj`` ``(D, (H + 2 H_kv) d)`` (its outputs are q, k, v
      in that order) and ``mlp.gate_up_proj`` ``(D, 2 I)`` (gate first, then up). Each is one linear: pruned as one
      kernel with one Hessian (2:4 groups run along the input axis, which q, k and v share). ``None``: the
      architecture's.
    num_experts: ``None`` (a dense MLP) or the number of experts ``E`` of every block's mixture of experts
      (Qwen3-MoE's ``num_experts``, Mixtral's ``num_local_experts``).
    num_experts_per_tok: experts per token ``k`` (``1 ≤ k ≤ E``); only with ``num_experts``.
    moe_intermediate_size: every expert's MLP width; only with ``num_experts`` (Mixtral: ``intermediate_size``, its
      ``config.json`` has no key of its own; ``None`` becomes that).
    norm_topk_prob: Qwen3-MoE's ``norm_topk_prob``: the ``k`` routing weights are renormalised to sum to 1; only with
      ``num_experts`` (``None`` there means ``False``, transformers' default; Mixtral always renormalises, so
      ``None`` means ``True`` and ``False`` is refused).

  Example:
    >>> from proxjax.models import LlamaConfig
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                 num_attention_heads=4, num_key_value_heads=2)
    >>> c.head_dim, c.architecture, c.qkv_bias, c.qk_norm
    (4, 'LlamaForCausalLM', False, False)
    >>> LlamaConfig.from_hf(c.to_hf()) == c
    True
    >>> g = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                 num_attention_heads=2, head_dim=8, architecture="Gemma3ForCausalLM", sliding_window=4,
    ...                 layer_types=("sliding_attention", "full_attention"), hidden_act="gelu_pytorch_tanh")
    >>> g.qk_norm, g.post_norms, g.rope_local_theta, [g.layer_window(i) for i in range(2)]
    (True, True, 10000.0, [4, None])
    >>> LlamaConfig.from_hf(g.to_hf()) == g
    True
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Any = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool | None = None
  o_bias: bool | None = None
  mlp_bias: bool = False
  hidden_act: str = "silu"
  sliding_window: int | None = None
  architecture: str = "LlamaForCausalLM"
  dtype: str | None = "float32"
  bos_token_id: int | None = None
  eos_token_id: Any = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)
  activation_threshold: float = 0.0
  qk_norm: bool | None = None
  norm_plus_one: bool | None = None
  post_norms: bool | None = None
  scale_embeddings: bool | None = None
  attn_softcap: float | None = None
  final_softcap: float | None = None
  query_pre_attn_scalar: float | None = None
  layer_types: tuple[str, ...] | None = None
  rope_local_theta: float | None = None
  fused_projections: bool | None = None
  num_experts: int | None = None
  num_experts_per_tok: int | None = None
  moe_intermediate_size: int | None = None
  norm_topk_prob: bool | None = None

  def __post_init__(self) -> None:
    put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen dataclass)
    arch = self.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
      raise UnsupportedModelError(
          f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
      value = getattr(self, name)
      if not _is_int(value) or value < 1:
        raise ValueError(f"config field {name!r} must be a positive int, got {value!r}")
    if self.num_key_value_heads is None:
      put("num_key_value_heads", self.num_attention_heads)
    if not _is_int(self.num_key_value_heads) or self.num_key_value_heads < 1:
      raise ValueError(f"config field 'num_key_value_heads' must be a positive int, got {self.num_key_value_heads!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise UnsupportedModelError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                                  f"num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise UnsupportedModelError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                                    f"{self.num_attention_heads} and no head_dim is given")
      put("head_dim", self.hidden_size // self.num_attention_heads)
    if not _is_int(self.head_dim) or self.head_dim < 2 or self.head_dim % 2:
      raise UnsupportedModelError(f"head_dim={self.head_dim!r} must be a positive even int (RoPE rotates pairs)")
    if not isinstance(self.rms_norm_eps, int | float) or not self.rms_norm_eps > 0:
      raise ValueError(f"config field 'rms_norm_eps' must be a positive number, got {self.rms_norm_eps!r}")
    if not isinstance(self.rope_theta, int | float) or not self.rope_theta > 0:
      raise ValueError(f"config field 'rope_theta' must be a positive number, got {self.rope_theta!r}")
    if not _is_int(self.max_position_embeddings) or self.max_position_embeddings < 1:
      raise ValueError(f"config field 'max_position_embeddings' must be a positive int, "
                       f"got {self.max_position_embeddings!r}")
    put("rope_scaling", self._normalize_rope_scaling(self.rope_scaling))
    if self.hidden_act not in _ACTIVATIONS:
      raise UnsupportedModelError(
          f"hidden_act {self.hidden_act!r} is not supported (supported: {', '.join(_ACTIVATIONS)}, and 'fatrelu' "
          "in a config.json)")
    theta = self.activation_threshold
    if (not isinstance(theta, int | float) or isinstance(theta, bool) or not math.isfinite(theta)
        or theta < 0):
      raise ValueError(f"config field 'activation_threshold' must be a finite number >= 0, got {theta!r}")
    put("activation_threshold", float(theta))
    if theta > 0 and self.hidden_act != "relu":
      raise UnsupportedModelError(f"activation_threshold={theta} (FATReLU) needs hidden_act='relu', got "
                                  f"{self.hidden_act!r}: a threshold is only defined for the ReLU gate")
    # Biases: what each architecture's Hugging Face class can express.
    if self.qkv_bias is None:
      put("qkv_bias", arch == "Qwen2ForCausalLM")
    if self.o_bias is None:
      put("o_bias", False if arch in ("MistralForCausalLM", "Qwen2ForCausalLM") else self.qkv_bias)
    biases = (bool(self.qkv_bias), bool(self.o_bias), bool(self.mlp_bias))
    one_bias = {(b, b, False) for b in (False, True)}  # attention_bias: q, k, v and o together
    allowed = {"LlamaForCausalLM": {(b, b, m) for b in (False, True) for m in (False, True)},
               "MistralForCausalLM": {(False, False, False)},
               "MixtralForCausalLM": {(False, False, False)},
               "Qwen2ForCausalLM": {(True, False, False)}}.get(arch, one_bias)
    if biases not in allowed:
      raise UnsupportedModelError(f"{arch} cannot have (qkv_bias, o_bias, mlp_bias) = {biases}")
    # The family's fixed differences: what its Hugging Face class computes.
    for name, value in zip(_FAMILY_TRAITS, _TRAITS[arch], strict=True):
      if getattr(self, name) is None:
        put(name, value)
      elif bool(getattr(self, name)) != value:
        raise UnsupportedModelError(f"{arch} has {name}={value} (its Hugging Face class computes only that), got "
                                    f"{name}={getattr(self, name)!r}")
    self._check_attention(arch)
    self._check_experts(arch)
    if self.dtype is not None:
      put("dtype", name_of_dtype(dtype_from_name(self.dtype)))
    put("eos_token_id", _freeze(self.eos_token_id))

  def _check_attention(self, arch: str) -> None:
    """Validates the attention fields (windows, layer types, soft-capping, query scale, local RoPE base)."""
    put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen dataclass)
    gemma = arch in _GEMMA
    if self.sliding_window is not None:
      if arch not in (*_EVERY_LAYER_WINDOW, "Qwen3ForCausalLM", *_GEMMA):
        raise UnsupportedModelError(f"sliding_window is only supported for {', '.join(_EVERY_LAYER_WINDOW)}, "
                                    f"Qwen3ForCausalLM and Gemma, not {arch}")
      if not _is_int(self.sliding_window) or self.sliding_window < 1:
        raise ValueError(f"config field 'sliding_window' must be a positive int or None, got {self.sliding_window!r}")
    if self.layer_types is not None:
      if arch not in ("Qwen3ForCausalLM", *_GEMMA):
        raise UnsupportedModelError(f"layer_types is only supported for Qwen3ForCausalLM and Gemma, not {arch}")
      types = _freeze(self.layer_types)
      if (not isinstance(types, tuple) or len(types) != self.num_hidden_layers
          or any(t not in LAYER_TYPES for t in types)):
        raise UnsupportedModelError(f"config field 'layer_types' must list one of {', '.join(LAYER_TYPES)} for each of "
                                    f"the {self.num_hidden_layers} layers, got {self.layer_types!r}")
      put("layer_types", types)
    # One representation per model: Qwen3 lists layer types only with a window; Gemma always lists them.
    if arch == "Qwen3ForCausalLM" and self.sliding_window is None:
      put("layer_types", None)
    elif (gemma or arch == "Qwen3ForCausalLM") and self.layer_types is None:
      put("layer_types", tuple(self.layer_type(i) for i in range(self.num_hidden_layers)))
    if gemma and self.query_pre_attn_scalar is None:
      put("query_pre_attn_scalar", self.head_dim)
    for name in ("attn_softcap", "final_softcap", "query_pre_attn_scalar"):
      value = getattr(self, name)
      if value is None:
        continue
      if not gemma:
        raise UnsupportedModelError(f"{name} is only supported for Gemma, not {arch}")
      if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"config field {name!r} must be a positive number or None, got {value!r}")
    if self.attn_softcap is not None and arch == "Gemma3ForCausalLM":
      raise UnsupportedModelError(f"attn_logit_softcapping={self.attn_softcap} is not supported for Gemma3ForCausalLM "
                                  "(transformers' Gemma 3 attention does not apply it)")
    if arch == "Gemma3ForCausalLM" and self.rope_local_theta is None:
      put("rope_local_theta", _HF_DEFAULTS[arch]["rope_local_base_freq"])
    if self.rope_local_theta is not None:
      if arch != "Gemma3ForCausalLM":
        raise UnsupportedModelError(f"rope_local_theta (a RoPE base of its own for sliding-window layers) is only "
                                    f"supported for Gemma3ForCausalLM, not {arch}")
      if not isinstance(self.rope_local_theta, int | float) or not self.rope_local_theta > 0:
        raise ValueError(f"config field 'rope_local_theta' must be a positive number, got {self.rope_local_theta!r}")

  def _check_experts(self, arch: str) -> None:
    """Validates the mixture-of-experts fields (all ``None`` for a dense MLP)."""
    put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen dataclass)
    fields = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob")
    if arch not in _MOE:
      given = [f for f in fields if getattr(self, f) is not None]
      if given:
        raise UnsupportedModelError(f"{', '.join(given)} (a mixture of experts) is only supported for "
                                    f"{', '.join(_MOE)}, not {arch}")
      return
    if arch == "MixtralForCausalLM" and self.moe_intermediate_size is None:
      put("moe_intermediate_size", self.intermediate_size)
    for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
      value = getattr(self, name)
      if not _is_int(value) or value < 1:
        raise ValueError(f"config field {name!r} must be a positive int for {arch}, got {value!r}")
    if self.num_experts_per_tok > self.num_experts:
      raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} is more than num_experts={self.num_experts}")
    if arch == "MixtralForCausalLM":  # experts as wide as intermediate_size; top-k weights always renormalised
      if self.moe_intermediate_size != self.intermediate_size:
        raise UnsupportedModelError(f"{arch}'s experts are intermediate_size={self.intermediate_size} wide, got "
                                    f"moe_intermediate_size={self.moe_intermediate_size}")
      if self.norm_topk_prob is not None and not self.norm_topk_prob:
        raise UnsupportedModelError(f"{arch} always renormalises its top-k routing weights, got norm_topk_prob=False")
      put("norm_topk_prob", True)
    put("norm_topk_prob", bool(self.norm_topk_prob))
    if self.activation_threshold > 0:
      raise UnsupportedModelError(f"activation_threshold (FATReLU) is not supported for the experts of {arch}")

  def layer_type(self, index: int) -> str:
    """``layer_types[index]``, or (``layer_types=None``) ``"sliding_attention"`` when ``sliding_window`` is set,
    else ``"full_attention"``."""
    if self.layer_types is not None:
      return self.layer_types[index]
    return "full_attention" if self.sliding_window is None else "sliding_attention"

  def layer_window(self, index: int) -> int | None:
    """The attention window of layer ``index``: ``sliding_window`` on a ``"sliding_attention"`` layer, else ``None``
    (full causal attention)."""
    return self.sliding_window if self.layer_type(index) == "sliding_attention" else None

  def layer_local_rope(self, index: int) -> bool:
    """Whether layer ``index`` rotates with the local base ``rope_local_theta`` (a Gemma 3 sliding layer)."""
    return self.rope_local_theta is not None and self.layer_type(index) == "sliding_attention"

  @property
  def router_weights_float32(self) -> bool:
    """Whether the top-``k`` routing weights multiply the experts' outputs in float32 (Mixtral: transformers keeps
    them float32, so in a lower compute dtype each term is rounded once, after the product) rather than cast to the
    compute dtype first (Qwen3-MoE). Identical in float32."""
    return self.architecture == "MixtralForCausalLM"

  @property
  def block_norm_size(self) -> int:
    """Norm scale entries per decoder block: ``2 · hidden_size`` (``4 ·`` with ``post_norms``), ``+ 2 · head_dim``
    with ``qk_norm``."""
    return (4 if self.post_norms else 2) * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)

  def _normalize_rope_scaling(self, scaling: Any) -> tuple[tuple[str, Any], ...] | None:
    if scaling is None:
      return None
    items = dict(scaling)
    rope_type = items.pop("rope_type", items.pop("type", "default"))
    items.pop("type", None)
    items.pop("rope_theta", None)
    factor = items.pop("partial_rotary_factor", 1.0)
    if factor not in (None, 1, 1.0):
      raise UnsupportedModelError(f"partial_rotary_factor={factor} is not supported (only 1.0)")
    if rope_type not in _ROPE_TYPES:
      raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    if rope_type == "default":
      return None
    if rope_type == "llama3":
      items.setdefault("original_max_position_embeddings", self.max_position_embeddings)
    required = ("factor",) if rope_type == "linear" else _LLAMA3_KEYS
    for key in required:
      if not isinstance(items.get(key), int | float) or isinstance(items.get(key), bool):
        raise ValueError(f"rope scaling {rope_type!r} needs a number {key!r}, got {items.get(key)!r}")
    if rope_type == "llama3" and items["high_freq_factor"] <= items["low_freq_factor"]:
      raise ValueError(f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got {items}")
    items["rope_type"] = rope_type
    return tuple(sorted((k, _freeze(v)) for k, v in items.items()))

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    """``rope_scaling`` as a dict (``None`` for plain RoPE)."""
    return None if self.rope_scaling is None else {k: _thaw(v) for k, v in self.rope_scaling}

  @property
  def rope_type(self) -> str:
    """``"default"``, ``"linear"`` or ``"llama3"``."""
    return "default" if self.rope_scaling is None else dict(self.rope_scaling)["rope_type"]

  @property
  def attention_bias(self) -> bool:
    """Whether any attention projection has a bias (``qkv_bias or o_bias``)."""
    return bool(self.qkv_bias or self.o_bias)

  @property
  def num_key_value_groups(self) -> int:
    """Query heads per key/value head."""
    return self.num_attention_heads // self.num_key_value_heads

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> LlamaConfig:
    """Parses a Hugging Face ``config.json`` dict (transformers 4 or 5 layout).

    Reads ``dtype`` (transformers 5) or ``torch_dtype`` (older), ``rope_parameters`` (transformers 5; for Gemma 3
    one entry per layer type, ``"full_attention"`` and ``"sliding_attention"``) or ``rope_theta`` + ``rope_scaling``
    (+ Gemma 3's ``rope_local_base_freq``; older), and the architecture from ``architectures`` (or ``model_type``).
    Keys a family's transformers class defaults when absent take that default (e.g. Gemma 2's soft caps 50 and 30,
    Qwen3's ``head_dim`` 128, Gemma's sliding-window pattern and tied embeddings); Gemma's activation is read from
    ``hidden_activation``.

    Raises:
      UnsupportedModelError: an architecture, activation, RoPE variant, quantization or attention layout this model
        cannot run (the message names the field).
      ValueError: a required field is missing or malformed.

    Example:
      >>> from proxjax.models import LlamaConfig
      >>> d = {"architectures": ["MistralForCausalLM"], "vocab_size": 32, "hidden_size": 16,
      ...      "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "sliding_window": 8,
      ...      "torch_dtype": "bfloat16"}
      >>> c = LlamaConfig.from_hf(d)
      >>> c.sliding_window, c.dtype, c.to_hf() == d
      (8, 'bfloat16', True)
    """
    if not isinstance(d, Mapping):
      raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
    d = copy.deepcopy(dict(d))
    archs = d.get("architectures")
    if archs is None:
      by_type = {v: k for k, v in _MODEL_TYPES.items()}
      if d.get("model_type") not in by_type:
        raise UnsupportedModelError(f"config has no 'architectures' and model_type {d.get('model_type')!r} is not "
                                    f"supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
      arch = by_type[d["model_type"]]
    else:
      if isinstance(archs, str):
        archs = [archs]
      if not isinstance(archs, list) or len(archs) != 1:
        raise UnsupportedModelError(f"'architectures' must name exactly one of {', '.join(SUPPORTED_ARCHITECTURES)}, "
                                    f"got {archs!r}")
      arch = archs[0]
      if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if d.get("quantization_config") is not None:
      raise UnsupportedModelError("quantized checkpoints ('quantization_config') are not supported")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in d]
    if missing:
      raise ValueError(f"config is missing required field(s) {', '.join(missing)}")
    defaults = _HF_DEFAULTS.get(arch, {})

    def get(key: str, fallback: Any = None) -> Any:
      """``d[key]``, or transformers' default for this architecture when the key is absent."""
      return d[key] if key in d else defaults.get(key, fallback)

    gemma, moe = arch in _GEMMA, arch in _MOE
    if gemma and d.get("use_bidirectional_attention"):
      raise UnsupportedModelError(f"use_bidirectional_attention={d['use_bidirectional_attention']!r} (an encoder) is "
                                  "not supported: only causal language models")
    # RoPE: transformers 5 `rope_parameters` (with rope_theta inside) or the older `rope_theta` + `rope_scaling`.
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
      raise ValueError(f"config field 'rope_parameters'/'rope_scaling' must be an object, got {rope!r}")
    rope_local_theta = None
    if arch == "Gemma3ForCausalLM":
      local: Any = {}
      if any(isinstance(v, Mapping) for v in rope.values()):  # transformers 5: one entry per layer type
        unknown = sorted(set(rope) - set(LAYER_TYPES))
        if unknown:
          raise UnsupportedModelError(f"rope_parameters for layer types {unknown} are not supported")
        local, rope = dict(rope.get("sliding_attention") or {}), dict(rope.get("full_attention") or {})
      local_type = local.get("rope_type", local.get("type", "default"))
      if local_type != "default" or any(k not in ("rope_type", "type", "rope_theta") for k in local):
        raise UnsupportedModelError(f"rope_parameters['sliding_attention'] = {local!r} is not supported (only the "
                                    "default RoPE with its own rope_theta)")
      rope_local_theta = local.get("rope_theta", get("rope_local_base_freq"))
    if any(isinstance(v, Mapping) for v in rope.values()):
      raise UnsupportedModelError(f"per-layer-type RoPE parameters are not supported: {sorted(rope)}")
    rope = dict(rope)
    rope_theta = rope.get("rope_theta", get("rope_theta", 10000.0))
    if d.get("partial_rotary_factor") is not None:
      rope.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
    sliding_window, layer_types = None, None
    if arch == "LlamaForCausalLM":
      qkv_bias = o_bias = bool(d.get("attention_bias", False))
      mlp_bias = bool(d.get("mlp_bias", False))
    elif arch == "MistralForCausalLM":
      qkv_bias = o_bias = mlp_bias = False
      sliding_window = d.get("sliding_window", 4096)  # MistralConfig's default when the key is absent
    elif arch == "Phi3ForCausalLM":  # no biases; Phi3Config's sliding_window (default None) on every layer
      qkv_bias = o_bias = mlp_bias = False
      sliding_window = get("sliding_window")
      rope_type = rope.get("rope_type", rope.get("type", "default"))
      if rope_type != "default":
        raise UnsupportedModelError(
            f"Phi-3 rope_type {rope_type!r} is not supported (only the plain RoPE of the 4k-context Phi-3 "
            "checkpoints): 'longrope' (also written 'su' or 'yarn' in older Phi-3 configs) switches between "
            "short_factor and long_factor frequencies by sequence length, which proxjax does not implement")
    elif arch == "Qwen3MoeForCausalLM":  # Qwen3MoeConfig: one attention_bias; the window on every layer
      qkv_bias = o_bias = bool(d.get("attention_bias", False))
      mlp_bias = False
      if d.get("use_sliding_window", False):
        sliding_window = get("sliding_window")
      if get("decoder_sparse_step") != 1 or d.get("mlp_only_layers"):
        raise UnsupportedModelError(
            f"Qwen3-MoE with dense MLP layers (decoder_sparse_step={get('decoder_sparse_step')!r}, mlp_only_layers="
            f"{d.get('mlp_only_layers')!r}) is not supported: only a mixture of experts in every layer "
            "(decoder_sparse_step=1, mlp_only_layers=[])")
    elif arch == "MixtralForCausalLM":  # MixtralConfig: no biases; sliding_window (default None) on every layer
      qkv_bias = o_bias = mlp_bias = False
      sliding_window = get("sliding_window")
    elif arch == "Qwen2ForCausalLM":
      qkv_bias, o_bias, mlp_bias = True, False, False
      if d.get("use_sliding_window", False) and d.get("sliding_window", 4096) is not None:  # Qwen2Config default
        n = d["num_hidden_layers"]
        types = d.get("layer_types") or ["sliding_attention" if i >= d.get("max_window_layers", 28) else
                                         "full_attention" for i in range(n if _is_int(n) else 0)]
        if "sliding_attention" in types:
          raise UnsupportedModelError("Qwen2 use_sliding_window=true (sliding-window layers from max_window_layers="
                                      f"{d.get('max_window_layers', 28)}) is not supported")
    else:  # Qwen3, Gemma 2, Gemma 3: one attention_bias for q, k, v and o; no MLP bias
      qkv_bias = o_bias = bool(d.get("attention_bias", False))
      mlp_bias = False
      n = d["num_hidden_layers"] if _is_int(d["num_hidden_layers"]) else 0
      if arch == "Qwen3ForCausalLM":  # Qwen3Config: the window only with use_sliding_window, from max_window_layers
        if d.get("use_sliding_window", False):
          sliding_window = get("sliding_window")
        if sliding_window is not None:
          layer_types = d.get("layer_types") or ["sliding_attention" if i >= d.get("max_window_layers", 28) else
                                                 "full_attention" for i in range(n)]
      else:  # Gemma: sliding layers every other layer (Gemma 2) or 5 of every 6 (Gemma 3) unless listed
        sliding_window = get("sliding_window")
        pattern = 2 if arch == "Gemma2ForCausalLM" else d.get("sliding_window_pattern", 6)
        layer_types = d.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                               for i in range(n)]
    act_key = "hidden_activation" if gemma else "hidden_act"
    hidden_act = (d.get(act_key) or "gelu_pytorch_tanh") if gemma else d.get(act_key, "silu")
    threshold = 0.0
    if hidden_act == "fatrelu":  # MiniCPM / ProSparse: FATReLU with threshold hidden_act_param (MiniCPM default 0)
      hidden_act, threshold = "relu", d.get("hidden_act_param", 0.0)
      if threshold is None:
        threshold = 0.0
    return cls(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=get("num_key_value_heads"),
        head_dim=get("head_dim"),
        rms_norm_eps=get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope or None,
        max_position_embeddings=get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        hidden_act=hidden_act,
        activation_threshold=threshold,
        sliding_window=sliding_window,
        architecture=arch,
        dtype=d.get("dtype") or d.get("torch_dtype"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        extra=d,
        attn_softcap=get("attn_logit_softcapping") if gemma else None,
        final_softcap=get("final_logit_softcapping") if gemma else None,
        query_pre_attn_scalar=get("query_pre_attn_scalar") if gemma else None,
        layer_types=layer_types,
        rope_local_theta=rope_local_theta,
        num_experts=d.get("num_experts", d.get("num_local_experts", get("num_experts"))) if moe else None,
        num_experts_per_tok=get("num_experts_per_tok") if moe else None,
        # Mixtral: transformers ignores these keys (experts intermediate_size wide, weights always renormalised).
        moe_intermediate_size=(d["intermediate_size"] if arch == "MixtralForCausalLM" else
                               get("moe_intermediate_size")) if moe else None,
        norm_topk_prob=get("norm_topk_prob") if moe and arch != "MixtralForCausalLM" else None,
    )

  @classmethod
  def from_dir(cls, path: str | os.PathLike[str]) -> LlamaConfig:
    """Reads ``config.json`` from a checkpoint directory.

    Raises:
      CheckpointError: ``path`` does not exist, is not a directory, has no ``config.json`` or it is not valid JSON,
        or a field is missing or malformed (the message names the file).
      UnsupportedModelError: see :meth:`from_hf` (the message names the file).

    Example:
      >>> import tempfile
      >>> from proxjax.models import CheckpointError, LlamaConfig
      >>> try:
      ...   LlamaConfig.from_dir(tempfile.mkdtemp())
      ... except CheckpointError as e:
      ...   print("config.json" in str(e))
      True
    """
    path = os.fspath(path)
    if not os.path.exists(path):
      raise CheckpointError(f"model directory {path!r} does not exist")
    if not os.path.isdir(path):
      raise CheckpointError(f"{path!r} is not a directory (expected a Hugging Face model directory)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
      raise CheckpointError(f"no config.json in {path!r}: not a Hugging Face model directory")
    try:
      with open(cfg_path, encoding="utf-8") as f:
        d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{cfg_path}: cannot read JSON: {e}") from e
    try:
      return cls.from_hf(d)
    except UnsupportedModelError as e:
      raise UnsupportedModelError(f"{cfg_path}: {e}") from e
    except ValueError as e:
      raise CheckpointError(f"{cfg_path}: {e}") from e

  def to_hf(self) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict.

    Starts from :attr:`extra` (the original dict, so unknown keys round-trip exactly) and writes every field that
    differs from what :attr:`extra` parses to, in the layout the original used (``rope_parameters`` or
    ``rope_theta`` + ``rope_scaling``; ``dtype``, and ``torch_dtype`` too if the original had it). A config built
    directly (empty :attr:`extra`) writes every field, in the transformers 5 layout. An ``activation_threshold``
    ``θ > 0`` is written as ``"hidden_act": "fatrelu", "hidden_act_param": θ`` (not loadable by transformers'
    Llama); ``θ = 0`` with ReLU always as ``"hidden_act": "relu"``.

    Example:
      >>> import dataclasses
      >>> from proxjax.models import LlamaConfig
      >>> c = LlamaConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
      ...                          "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
      ...                          "hidden_act": "silu", "torch_dtype": "float32"})
      >>> d = dataclasses.replace(c, hidden_act="relu", dtype="bfloat16").to_hf()
      >>> d["hidden_act"], d["dtype"], d["torch_dtype"]
      ('relu', 'bfloat16', 'bfloat16')
    """
    d = copy.deepcopy(self.extra)
    base = LlamaConfig.from_hf(d) if d else None

    def changed(*names: str) -> bool:
      return base is None or any(getattr(self, n) != getattr(base, n) for n in names)

    arch = self.architecture
    gemma = arch in _GEMMA
    if changed("architecture"):
      d["architectures"] = [arch]
      d["model_type"] = _MODEL_TYPES[arch]
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
      if changed(name):
        d[name] = getattr(self, name)
    act_key = "hidden_activation" if gemma else "hidden_act"
    if self.activation_threshold > 0:
      if changed("hidden_act", "activation_threshold"):
        d[act_key], d["hidden_act_param"] = "fatrelu", self.activation_threshold
    elif changed("hidden_act", "activation_threshold") or d.get(act_key) == "fatrelu":
      d[act_key] = self.hidden_act  # θ = 0: plain ReLU, which transformers reads faithfully
      d.pop("hidden_act_param", None)
    if changed("head_dim") and (arch not in ("Qwen2ForCausalLM", "Phi3ForCausalLM", *_MOE) or "head_dim" in d
                                or self.head_dim != self.hidden_size // self.num_attention_heads):
      d["head_dim"] = self.head_dim
    if changed("rope_theta", "rope_scaling", "rope_local_theta"):
      scaling = self.rope_scaling_dict
      if "rope_parameters" not in d and ("rope_scaling" in d or "rope_theta" in d):
        d["rope_theta"] = self.rope_theta
        d["rope_scaling"] = scaling
        if self.rope_local_theta is not None:
          d["rope_local_base_freq"] = self.rope_local_theta
      else:
        full = {"rope_theta": self.rope_theta, **(scaling or {"rope_type": "default"})}
        d["rope_parameters"] = full if self.rope_local_theta is None else {
            "full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_theta}}
    if changed("qkv_bias", "o_bias", "mlp_bias"):
      if arch == "LlamaForCausalLM":
        d["attention_bias"] = bool(self.qkv_bias)
        d["mlp_bias"] = bool(self.mlp_bias)
      elif arch not in ("MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM"):
        d["attention_bias"] = bool(self.qkv_bias)
    if changed("sliding_window", "layer_types"):
      types = [self.layer_type(i) for i in range(self.num_hidden_layers)]
      if arch in ("MistralForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM"):
        d["sliding_window"] = self.sliding_window
      elif arch in _MOE:
        d["use_sliding_window"] = self.sliding_window is not None
        d["sliding_window"] = self.sliding_window
      elif arch == "Qwen2ForCausalLM":
        d["use_sliding_window"] = False
      elif arch == "Qwen3ForCausalLM":
        d["use_sliding_window"] = self.sliding_window is not None
        d["sliding_window"] = self.sliding_window
        d["layer_types"] = types
      else:
        d["sliding_window"] = self.sliding_window
        d["layer_types"] = types
    if gemma:
      for name, key in (("attn_softcap", "attn_logit_softcapping"), ("final_softcap", "final_logit_softcapping")):
        if changed(name):
          d[key] = getattr(self, name)
      if changed("query_pre_attn_scalar", "head_dim"):
        d["query_pre_attn_scalar"] = self.query_pre_attn_scalar or self.head_dim
    if arch == "MixtralForCausalLM" and changed("num_experts", "num_experts_per_tok"):
      d["num_local_experts"] = self.num_experts  # the expert width is intermediate_size; renormalisation is fixed
      d["num_experts_per_tok"] = self.num_experts_per_tok
    elif arch in _MOE and changed("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"):
      d["num_local_experts" if "num_local_experts" in d and "num_experts" not in d else "num_experts"] = self.num_experts
      d["num_experts_per_tok"] = self.num_experts_per_tok
      d["moe_intermediate_size"] = self.moe_intermediate_size
      d["norm_topk_prob"] = self.norm_topk_prob
      d.setdefault("decoder_sparse_step", 1)
      d.setdefault("mlp_only_layers", [])
    if changed("dtype"):
      d["dtype"] = self.dtype
      if "torch_dtype" in d:
        d["torch_dtype"] = self.dtype
    if changed("bos_token_id"):
      d["bos_token_id"] = self.bos_token_id
    if changed("eos_token_id"):
      d["eos_token_id"] = _thaw(self.eos_token_id)
    return d


def rope_inv_freq(config: LlamaConfig, local: bool = False) -> np.ndarray:
  r"""The RoPE inverse frequencies ``θ`` (float32, shape ``(head_dim // 2,)``), as transformers computes them.

  ``θ_i = 1 / rope_theta^{2i/d}`` (with ``local``: ``1 / rope_local_theta^{2i/d}``, unscaled: Gemma 3's sliding
  layers); ``"linear"`` scaling divides by ``factor``; ``"llama3"`` keeps
  high frequencies (wavelength ``2π/θ < L/high_freq_factor``, ``L`` = ``original_max_position_embeddings``),
  divides low ones (wavelength ``> L/low_freq_factor``) by ``factor`` and interpolates in between with
  ``s = (L/λ − low_freq_factor)/(high_freq_factor − low_freq_factor)``: ``θ ← (1 − s) θ/factor + s θ``.
  Computed in float32 in the same order as transformers' ``modeling_rope_utils``.

  Example:
    >>> from proxjax.models import LlamaConfig, rope_inv_freq
    >>> c = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
    ...                 num_attention_heads=1, rope_theta=10000.0)
    >>> rope_inv_freq(c)
    array([1.   , 0.1  , 0.01 , 0.001], dtype=float32)
  """
  if local and config.rope_local_theta is None:
    raise ValueError(f"{config.architecture} has no local RoPE base (rope_local_theta)")
  dim = config.head_dim
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  theta = config.rope_local_theta if local else config.rope_theta
  inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
  scaling = config.rope_scaling_dict
  if scaling is None or local:
    return inv_freq
  factor = np.float32(scaling["factor"])
  if scaling["rope_type"] == "linear":
    return (inv_freq / factor).astype(np.float32)
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_len = scaling["original_max_position_embeddings"]
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = np.float32(2 * math.pi) / inv_freq
  inv_llama = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (np.float32(old_len) / wavelen - np.float32(low)) / np.float32(high - low)
  smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, inv_llama).astype(np.float32)


def _rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x`` of shape ``(B, T, heads, d)``: ``x cos + rotate_half(x) sin``.

  ``cos`` / ``sin`` are ``(T, d)`` (shared by the batch) or ``(B, T, d)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from proxjax.models import apply_rope
    >>> x = jnp.array([[[[1., 2.]]]])  # (1, 1, 1, 2)
    >>> apply_rope(x, jnp.zeros((1, 2)), jnp.ones((1, 2)))  # a quarter turn: (x1, x2) -> (-x2, x1)
    Array([[[[-2.,  1.]]]], dtype=float32)
  """
  cos, sin = cos[..., None, :], sin[..., None, :]
  return x * cos + _rotate_half(x) * sin


def _attention_mask(t: int, sliding_window: int | None) -> jax.Array:
  """``(T, T)`` bool, True where query ``i`` may attend key ``j``: ``j ≤ i`` (and ``i − j < w``)."""
  i = jnp.arange(t)[:, None]
  j = jnp.arange(t)[None, :]
  mask = j <= i
  if sliding_window is not None:
    mask = mask & (j > i - sliding_window)
  return mask


class LlamaRMSNorm(nnx.Module):
  r"""RMSNorm with a learned scale, computed in float32 in Hugging Face's order of casts.

  .. math::  y = w \cdot \mathrm{cast}_{\mathrm{in}}\big(x / \sqrt{\mathrm{mean}(x^2) + \varepsilon}\big)

  (``x`` upcast to float32 for the statistics and the division, cast back to its input dtype, then multiplied by
  ``w`` cast to the compute dtype). With ``plus_one`` (Gemma) the scale is ``1 + w`` and everything stays in float32
  until the end: :math:`y = \mathrm{cast}_{\mathrm{in}}\big(x / \sqrt{\mathrm{mean}(x^2) + \varepsilon} \cdot
  (1 + w)\big)`; ``w`` then starts at zeros (the identity), as Gemma's.

  Example:
    >>> import jax.numpy as jnp
    >>> from proxjax.models import LlamaRMSNorm
    >>> LlamaRMSNorm(2, 0.0)(jnp.array([3., 4.]))  # rms = sqrt(12.5)
    Array([0.84852815, 1.1313709 ], dtype=float32)
    >>> LlamaRMSNorm(2, 0.0, plus_one=True)(jnp.array([3., 4.]))  # w = 0: the same
    Array([0.84852815, 1.1313709 ], dtype=float32)
  """

  def __init__(self, dim: int, eps: float, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               plus_one: bool = False):
    self.weight = nnx.Param((jnp.zeros if plus_one else jnp.ones)((dim,), param_dtype))
    self.eps = float(eps)
    self.dtype = dtype
    self.plus_one = bool(plus_one)

  def __call__(self, x: jax.Array) -> jax.Array:
    input_dtype = x.dtype
    h = x.astype(_F32)
    variance = jnp.mean(jnp.square(h), axis=-1, keepdims=True)
    h = h * lax.rsqrt(variance + self.eps)
    if self.plus_one:
      return (h * (1.0 + self.weight[...].astype(_F32))).astype(input_dtype)
    return jnp.asarray(self.weight[...], self.dtype) * h.astype(input_dtype)


def _norm(config: LlamaConfig, dim: int, dtype: Any, param_dtype: Any) -> LlamaRMSNorm:
  return LlamaRMSNorm(dim, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype,
                      plus_one=bool(config.norm_plus_one))


def _linear(d_in: int, d_out: int, use_bias: bool, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.initializers.normal(_INIT_STD), rngs=rngs)


class LlamaAttention(nnx.Module):
  r"""Causal multi-head attention with rotary embeddings and grouped key/value heads.

  For ``x`` of shape ``(B, T, D)``: ``q = x W_q`` (``H`` heads of ``d``), ``k = x W_k``, ``v = x W_v``
  (``H_kv`` heads, each repeated for ``H / H_kv`` query heads); with ``qk_norm`` ``q`` and ``k`` are RMS-normed per
  head (``q_norm``, ``k_norm``); ``q, k`` rotated by RoPE (the local tables on a Gemma 3 sliding layer);
  ``s = q kᵀ · r`` (``r = query_pre_attn_scalar^{-1/2}``, default ``d^{-1/2}``), soft-capped ``s ← c tanh(s / c)``
  with ``attn_softcap = c``, ``a = softmax(s + mask) v`` (softmax in float32), output ``a W_o``. The mask is causal,
  and on a sliding-window layer (``config.layer_window(layer_idx) = w``) also hides keys ``w`` or more positions
  back.

  Args:
    config: the model's :class:`LlamaConfig`.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    rngs: random state for the initialisation.
    layer_idx: the block's index (selects its window and RoPE tables).
  """

  def __init__(self, config: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs, layer_idx: int = 0):
    c = config
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    self.fused = bool(c.fused_projections)
    if self.fused:  # Phi-3: one kernel whose outputs are q, k, v in that order
      self.qkv_proj = _linear(c.hidden_size, q_out + 2 * kv_out, c.qkv_bias, dtype, param_dtype, rngs)
    else:
      self.q_proj = _linear(c.hidden_size, q_out, c.qkv_bias, dtype, param_dtype, rngs)
      self.k_proj = _linear(c.hidden_size, kv_out, c.qkv_bias, dtype, param_dtype, rngs)
      self.v_proj = _linear(c.hidden_size, kv_out, c.qkv_bias, dtype, param_dtype, rngs)
    self.o_proj = _linear(q_out, c.hidden_size, c.o_bias, dtype, param_dtype, rngs)
    self.q_norm = _norm(c, c.head_dim, dtype, param_dtype) if c.qk_norm else None
    self.k_norm = _norm(c, c.head_dim, dtype, param_dtype) if c.qk_norm else None
    self.num_heads = c.num_attention_heads
    self.num_kv_heads = c.num_key_value_heads
    self.head_dim = c.head_dim
    self.sliding_window = c.layer_window(layer_idx)
    self.local_rope = c.layer_local_rope(layer_idx)
    self.scale = (c.head_dim if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar) ** -0.5
    self.softcap = c.attn_softcap

  def project(self, x: jax.Array, rope: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(q, k, v)`` of ``x`` ``(B, T, D)``: ``q`` ``(B, T, H, d)`` and ``k`` ``(B, T, H_kv, d)`` (RMS-normed per
    head with ``qk_norm``) rotated by ``rope`` (``(cos, sin)`` or ``(cos, sin, cos_local, sin_local)`` from
    :meth:`LlamaForCausalLM.rope`; a layer with ``local_rope`` uses the last two), ``v`` ``(B, T, H_kv, d)`` (the
    first half of :meth:`__call__`; used by the KV cache of :mod:`proxjax.models.generate`)."""
    b, t, _ = x.shape
    if self.fused:
      q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
      qkv = self.qkv_proj(x)
      q, k, v = qkv[..., :q_out], qkv[..., q_out:q_out + kv_out], qkv[..., q_out + kv_out:]
    else:
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = rope[2:4] if self.local_rope else rope[:2]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``softmax(cap(q kᵀ · r) + mask) v`` ``(B, Tq, H·d)`` (the input of ``o_proj``) for ``q`` ``(B, Tq, H, d)``
    and ``k, v`` ``(B, Tk, H_kv, d)``; ``mask`` is a bool array broadcastable to ``(B, H, Tq, Tk)`` (True = attend),
    ``None`` for this layer's causal (sliding-window) mask of ``Tq = Tk`` positions (the second half of
    :meth:`__call__`)."""
    b, t = q.shape[:2]
    n_rep = self.num_heads // self.num_kv_heads
    if n_rep > 1:  # kv head j serves query heads j·n_rep … (j+1)·n_rep − 1 (transformers' repeat_kv)
      k, v = jnp.repeat(k, n_rep, axis=2), jnp.repeat(v, n_rep, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
    if self.softcap is not None:
      scores = jnp.tanh(scores / self.softcap) * self.softcap
    if mask is None:
      mask = _attention_mask(t, self.sliding_window)
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(_F32), axis=-1).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, self.num_heads * self.head_dim)

  def __call__(self, x: jax.Array, rope: tuple[jax.Array, ...], *,
               return_inputs: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Returns the attention output ``(B, T, D)``, and the input of ``o_proj`` when ``return_inputs``."""
    attn = self.attend(*self.project(x, rope))
    out = self.o_proj(attn)
    return (out, attn) if return_inputs else out


class LlamaMLP(nnx.Module):
  r"""Gated MLP ``down(a ⊙ up(x))`` with the intermediate activation ``a = act(gate(x))`` (Phi-3, with
  ``fused_projections``: ``[gate(x), up(x)] = gate_up(x)``, the first ``intermediate_size`` outputs being ``gate``).

  ``act`` is ``config.hidden_act``: SiLU ``x σ(x)``, ReLU ``max(x, 0)``, the tanh GELU
  ``½x(1 + tanh(sqrt(2/π)(x + 0.044715x³)))`` (``"gelu_pytorch_tanh"``: Gemma's GeGLU), or, with ReLU and
  ``config.activation_threshold = θ > 0``, FATReLU ``x if x > θ else 0`` (``x`` compared in float32, so a bfloat16
  compute dtype does not round ``θ``; at ``x = θ`` the output is 0, as ``torch.nn.functional.threshold``).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from proxjax.models import LlamaConfig, LlamaMLP
    >>> c = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=4, num_hidden_layers=1,
    ...                 num_attention_heads=1, hidden_act="relu", activation_threshold=0.5)
    >>> mlp = LlamaMLP(c, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    >>> mlp.act(jnp.array([-1.0, 0.3, 0.5, 0.7]))  # FATReLU, θ = 0.5
    Array([0. , 0. , 0. , 0.7], dtype=float32)
  """

  def __init__(self, config: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    c = config
    self.fused = bool(c.fused_projections)
    if self.fused:  # Phi-3: one kernel whose outputs are gate, then up
      self.gate_up_proj = _linear(c.hidden_size, 2 * c.intermediate_size, c.mlp_bias, dtype, param_dtype, rngs)
    else:
      self.gate_proj = _linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtype, param_dtype, rngs)
      self.up_proj = _linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtype, param_dtype, rngs)
    self.down_proj = _linear(c.intermediate_size, c.hidden_size, c.mlp_bias, dtype, param_dtype, rngs)
    self.hidden_act = c.hidden_act
    self.activation_threshold = c.activation_threshold

  def act(self, g: jax.Array) -> jax.Array:
    """The gate activation of pre-activations ``g`` (SiLU, ReLU, tanh GELU or FATReLU, see the class docstring)."""
    if self.activation_threshold > 0:
      return jnp.where(g.astype(_F32) > self.activation_threshold, g, jnp.zeros_like(g))
    return _ACTIVATIONS[self.hidden_act](g)

  def __call__(self, x: jax.Array, *, return_inputs: bool = False,
               return_activation: bool = False) -> jax.Array | tuple[jax.Array, ...]:
    """The MLP output; with ``return_inputs`` also the input of ``down_proj`` (``a ⊙ up(x)``), with
    ``return_activation`` also ``a = act(gate(x))``, in that order: ``out``, ``(out, down_in)``, ``(out, a)`` or
    ``(out, down_in, a)``."""
    if self.fused:
      gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
    else:
      gate, up = self.gate_proj(x), self.up_proj(x)
    a = self.act(gate)
    hidden = a * up
    out = self.down_proj(hidden)
    extra = (hidden,) * return_inputs + (a,) * return_activation
    return (out, *extra) if extra else out


class RoutedInputs(NamedTuple):
  """The inputs of a stacked expert kernel and the tokens each expert receives (``return_inputs`` of a
  mixture-of-experts block).

  Attributes:
    x: ``(B, T, d_in)``, the same input for every expert (``experts.gate_proj`` / ``up_proj``), or
      ``(E, B, T, d_in)``, each expert's own (``experts.down_proj``: ``act(x K_gate[e]) ⊙ x K_up[e]``).
    routed: ``(E, B, T)`` bool: token ``(b, t)`` is routed to expert ``e`` (one of its top ``k``).
  """
  x: jax.Array
  routed: jax.Array


class StackedLinear(nnx.Module):
  """``E`` bias-free linears in one ``kernel`` ``(E, d_in, d_out)``: expert ``e`` maps ``x`` to ``x K[e]`` (Hugging
  Face stores ``K[e]ᵀ`` as ``…experts.{e}.<name>.weight``)."""

  def __init__(self, num: int, d_in: int, d_out: int, *, param_dtype: Any, rngs: nnx.Rngs):
    self.kernel = nnx.Param(nnx.initializers.normal(_INIT_STD)(rngs.params(), (num, d_in, d_out), param_dtype))


class MoeExperts(nnx.Module):
  """The stacked experts of a block: gate and up ``(E, D, I)``, down ``(E, I, D)`` (:class:`StackedLinear`, ``I =
  moe_intermediate_size``), named ``gate_proj``, ``up_proj``, ``down_proj`` (Qwen3-MoE) or ``w1``, ``w3``, ``w2``
  (Mixtral): the last parts of :func:`expert_names`, in :attr:`names`."""

  def __init__(self, config: LlamaConfig, *, param_dtype: Any, rngs: nnx.Rngs):
    c = config
    e, d, i = c.num_experts, c.hidden_size, c.moe_intermediate_size
    self.names = tuple(n.rsplit(".", 1)[1] for n in expert_names(c))  # (gate, up, down)
    for name, (d_in, d_out) in zip(self.names, ((d, i), (d, i), (i, d)), strict=True):
      setattr(self, name, StackedLinear(e, d_in, d_out, param_dtype=param_dtype, rngs=rngs))

  def stacked(self) -> tuple[StackedLinear, StackedLinear, StackedLinear]:
    """The ``(gate, up, down)`` stacked linears."""
    return tuple(getattr(self, n) for n in self.names)


class SparseMoeBlock(nnx.Module):
  r"""A top-``k`` mixture of experts in place of the MLP (Qwen3-MoE's ``mlp``, Mixtral's ``block_sparse_moe``), as
  transformers 5 computes it.

  For a token ``x`` ``(D,)``: router logits ``z = x W_g`` (``gate``, ``(D, E)``, no bias, the compute dtype),
  ``p = softmax(z)`` in float32, ``(w, e) = top_k(p)`` (the ``k`` largest, ties to the lower index), with
  ``norm_topk_prob`` (always for Mixtral) ``w ← w / Σ w``, then ``w`` cast to the compute dtype (Qwen3-MoE; Mixtral
  keeps it in float32 and rounds each product ``w_j · down(…)`` to the compute dtype instead,
  :attr:`LlamaConfig.router_weights_float32`); the output is ``Σ_j w_j · down_{e_j}(act(x G_{e_j}) ⊙ x U_{e_j})``,
  the experts' terms added in increasing expert index (transformers' ``index_add_`` order).

  Every expert runs on every token (a ``lax.scan`` over the experts, the terms of the experts a token is not routed
  to dropped with ``where``): exact, and ``E / k`` times the FLOPs of a routed dispatch, which is what the layer-wise
  pipeline needs anyway (each expert's inputs), not what a fast inference path would do.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from proxjax.models.llama import LlamaConfig, SparseMoeBlock
    >>> c = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
    ...                 num_attention_heads=1, architecture="Qwen3MoeForCausalLM", num_experts=4,
    ...                 num_experts_per_tok=2, moe_intermediate_size=4)
    >>> moe = SparseMoeBlock(c, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    >>> logits, weights, experts = moe.route(jnp.ones((1, 3, 8)))
    >>> logits.shape, weights.shape, experts.shape
    ((1, 3, 4), (1, 3, 2), (1, 3, 2))
  """

  def __init__(self, config: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    c = config
    self.gate = _linear(c.hidden_size, c.num_experts, False, dtype, param_dtype, rngs)
    self.experts = MoeExperts(c, param_dtype=param_dtype, rngs=rngs)
    self.input_names = expert_names(c)  # the keys of return_inputs: (gate, up, down) relative to the block
    self.num_experts = c.num_experts
    self.top_k = c.num_experts_per_tok
    self.norm_topk_prob = bool(c.norm_topk_prob)
    self.weights_float32 = c.router_weights_float32
    self.hidden_act = c.hidden_act
    self.dtype = dtype

  def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(logits (B, T, E), weights (B, T, k), experts (B, T, k) int32)`` of ``x`` ``(B, T, D)``: the router logits
    in the compute dtype, the top-``k`` routing weights (renormalised with ``norm_topk_prob``; in the compute dtype,
    or float32 with ``router_weights_float32``) and their experts, in decreasing order of probability."""
    logits = self.gate(x)
    probs = jax.nn.softmax(logits.astype(_F32), axis=-1)
    weights, experts = lax.top_k(probs, self.top_k)
    if self.norm_topk_prob:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return logits, weights if self.weights_float32 else weights.astype(logits.dtype), experts

  def __call__(self, x: jax.Array, *, return_inputs: bool = False,
               return_activation: bool = False) -> jax.Array | tuple[Any, ...]:
    """The block's output ``(B, T, D)``; with ``return_inputs`` also ``{name: RoutedInputs}`` for the gate and up
    kernels (``mlp.experts.gate_proj`` / ``up_proj``, Mixtral's ``block_sparse_moe.experts.w1`` / ``w3``: one
    object, ``x``) and the down kernel (``…down_proj`` / ``…w2``: each expert's ``act(x G_e) ⊙ x U_e``,
    ``(E, B, T, I)``); with ``return_activation`` also every expert's ``act(x G_e)`` ``(E, B, T, I)``; in that
    order."""
    _, weights, experts = self.route(x)
    onehot = experts[..., None] == jnp.arange(self.num_experts)  # (B, T, k, E)
    routed = jnp.any(onehot, axis=-2)  # (B, T, E)
    w = jnp.sum(jnp.where(onehot, weights[..., None], jnp.zeros((), weights.dtype)), axis=-2)  # one term per expert
    act = _ACTIVATIONS[self.hidden_act]
    kernels = [jnp.asarray(m.kernel[...], self.dtype) for m in self.experts.stacked()]

    def expert(acc: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, Any]:
      gate, up, down, w_e, r_e = xs
      a = act(x @ gate)
      hidden = a * (x @ up)
      out = hidden @ down
      term = (out * w_e[..., None]).astype(out.dtype)  # float32 weights (Mixtral): rounded after the product
      acc = acc + jnp.where(r_e[..., None], term, jnp.zeros((), out.dtype))
      return acc, (hidden if return_inputs else None, a if return_activation else None)

    xs = (*kernels, jnp.moveaxis(w, -1, 0), jnp.moveaxis(routed, -1, 0))
    out, (hidden, a) = lax.scan(expert, jnp.zeros_like(x), xs)
    extra: tuple[Any, ...] = ()
    if return_inputs:
      shared = RoutedInputs(x, jnp.moveaxis(routed, -1, 0))
      gate_name, up_name, down_name = self.input_names
      extra += ({gate_name: shared, up_name: shared, down_name: RoutedInputs(hidden, shared.routed)},)
    if return_activation:
      extra += (a,)
    return (out, *extra) if extra else out


class LlamaDecoderLayer(nnx.Module):
  """One pre-norm decoder block: ``h ← h + attn(norm₁(h))``, ``h ← h + mlp(norm₂(h))`` with ``norm₁`` =
  ``input_layernorm`` and ``norm₂`` = ``post_attention_layernorm``; with ``config.post_norms`` (Gemma) the Hugging
  Face Gemma block ``h ← h + post_attention_layernorm(attn(input_layernorm(h)))``,
  ``h ← h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`` (so there ``post_attention_layernorm``
  norms the attention output, not the MLP input).

  ``layer_idx`` (the block's index) selects the attention's window and RoPE tables (``config.layer_types``).
  """

  def __init__(self, config: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs, layer_idx: int = 0):
    c = config
    self.input_layernorm = _norm(c, c.hidden_size, dtype, param_dtype)
    self.self_attn = LlamaAttention(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs, layer_idx=layer_idx)
    self.post_attention_layernorm = _norm(c, c.hidden_size, dtype, param_dtype)
    if c.post_norms:
      self.pre_feedforward_layernorm = _norm(c, c.hidden_size, dtype, param_dtype)
      self.post_feedforward_layernorm = _norm(c, c.hidden_size, dtype, param_dtype)
    self.post_norms = bool(c.post_norms)
    # The feed-forward under its Hugging Face name: ``mlp``, or Mixtral's ``block_sparse_moe``.
    self.feed_forward_name = expert_names(c)[0].split(".")[0] if c.num_experts else "mlp"
    setattr(self, self.feed_forward_name,
            SparseMoeBlock(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if c.num_experts else
            LlamaMLP(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs))

  @property
  def feed_forward(self) -> LlamaMLP | SparseMoeBlock:
    """The block's MLP or mixture of experts (``self.mlp``, Mixtral's ``self.block_sparse_moe``)."""
    return getattr(self, self.feed_forward_name)

  def __call__(self, h: jax.Array, rope: tuple[jax.Array, ...], *, return_inputs: bool = False,
               return_activation: bool = False,
               attention: Callable[..., tuple[jax.Array, jax.Array]] | None = None) -> jax.Array | tuple[Any, ...]:
    """Runs the block on ``h`` ``(B, T, D)`` with ``rope = (cos, sin)`` from :meth:`LlamaForCausalLM.rope`.

    Args:
      h: hidden states ``(B, T, D)`` in the compute dtype.
      rope: ``(cos, sin)`` (or ``(cos, sin, cos_local, sin_local)`` for Gemma 3) from :meth:`LlamaForCausalLM.rope`,
        each ``(T, head_dim)`` or ``(B, T, head_dim)``.
      return_inputs: also return the activation entering every linear.
      return_activation: also return the MLP's intermediate activation ``act(gate(x))`` ``(B, T, intermediate)``.
      attention: replaces ``self.self_attn(x, rope, return_inputs=True)``: called with the normed input ``x``, it
        returns ``(attention output, o_proj input)`` (the KV cache of :mod:`proxjax.models.generate` passes one
        built from :meth:`LlamaAttention.project` / :meth:`LlamaAttention.attend`); ``None`` (the default) is the
        full causal attention.

    Returns:
      ``h_out`` ``(B, T, D)``; with ``return_inputs`` ``(h_out, inputs)`` where ``inputs`` maps every name in
      :data:`LINEAR_NAMES` to the ``(B, T, d_in)`` input of that linear (q/k/v share one array, gate/up another);
      with ``return_activation`` ``(h_out, a)``; with both ``(h_out, inputs, a)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from proxjax.models import LlamaConfig, LlamaForCausalLM
      >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      ...                 num_attention_heads=2)
      >>> model = nnx.eval_shape(lambda: LlamaForCausalLM(c, rngs=nnx.Rngs(0)))
      >>> def block0(m, ids):
      ...   return m.model.layers[0](m.embed(ids), m.rope(jnp.arange(ids.shape[1])), return_inputs=True)
      >>> h, inputs = nnx.eval_shape(block0, model, jnp.zeros((2, 5), jnp.int32))
      >>> h.shape, inputs["self_attn.o_proj"].shape, inputs["mlp.down_proj"].shape
      ((2, 5, 16), (2, 5, 16), (2, 5, 32))
    """
    x = self.input_layernorm(h)
    attn_out, o_in = self.self_attn(x, rope, return_inputs=True) if attention is None else attention(x)
    if self.post_norms:
      attn_out = self.post_attention_layernorm(attn_out)
    h = h + attn_out
    y = self.pre_feedforward_layernorm(h) if self.post_norms else self.post_attention_layernorm(h)
    ffn = self.feed_forward
    if isinstance(ffn, SparseMoeBlock):
      res = ffn(y, return_inputs=return_inputs, return_activation=return_activation)
      mlp_out, rest = (res[0], list(res[1:])) if return_inputs or return_activation else (res, [])
      mlp_inputs = rest.pop(0) if return_inputs else {}
      a = rest.pop(0) if return_activation else None
    else:
      mlp_out, down_in, a = ffn(y, return_inputs=True, return_activation=True)
      mlp_inputs = ({"mlp.gate_up_proj": y, "mlp.down_proj": down_in} if ffn.fused else
                    {"mlp.gate_proj": y, "mlp.up_proj": y, "mlp.down_proj": down_in})
    if self.post_norms:
      mlp_out = self.post_feedforward_layernorm(mlp_out)
    h = h + mlp_out
    out: tuple[Any, ...] = (h,)
    if return_inputs:
      attn_inputs = ({"self_attn.qkv_proj": x} if self.self_attn.fused else
                     {"self_attn.q_proj": x, "self_attn.k_proj": x, "self_attn.v_proj": x})
      out += ({**attn_inputs, "self_attn.o_proj": o_in, **mlp_inputs},)
    if return_activation:
      out += (a,)
    return out if len(out) > 1 else h


class LlamaModel(nnx.Module):
  """The decoder stack: ``embed_tokens``, ``layers`` (an ``nnx.List``) and the final ``norm``."""

  def __init__(self, config: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    c = config
    self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                  embedding_init=nnx.initializers.normal(_INIT_STD), rngs=rngs)
    self.layers = nnx.List([LlamaDecoderLayer(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs, layer_idx=i)
                            for i in range(c.num_hidden_layers)])
    self.norm = _norm(c, c.hidden_size, dtype, param_dtype)


class LlamaForCausalLM(nnx.Module):
  """A Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 causal LM whose module tree mirrors Hugging Face's.

  Args:
    config: the :class:`LlamaConfig`.
    rngs: random state for the (random) initialisation; build with ``nnx.eval_shape`` to skip it.
    dtype: compute dtype (activations); float32 by default.
    param_dtype: parameter storage dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from proxjax.models import LlamaConfig, LlamaForCausalLM
    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    >>> model = nnx.eval_shape(lambda: LlamaForCausalLM(c, rngs=nnx.Rngs(0)))  # abstract: nothing allocated
    >>> model.model.layers[0].self_attn.k_proj.kernel.get_value().shape, model.lm_head
    ((16, 8), None)
    >>> nnx.eval_shape(lambda m, ids: m(ids), model, jnp.zeros((2, 5), jnp.int32)).shape  # logits (B, T, V)
    (2, 5, 32)

    ``LlamaForCausalLM(c, rngs=nnx.Rngs(0))`` builds it with random weights; :func:`proxjax.models.load_pretrained`
    loads a Hugging Face checkpoint. Under ``nnx.jit`` the forward compiles once per input shape.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    self.config = config
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.lm_head = (None if config.tie_word_embeddings else
                    _linear(config.hidden_size, config.vocab_size, False, dtype, param_dtype, rngs))

  def embed(self, input_ids: ArrayLike) -> jax.Array:
    """Token embeddings ``(B, T, D)`` in the compute dtype for integer ``input_ids`` ``(B, T)``; with
    ``config.scale_embeddings`` (Gemma) multiplied by ``sqrt(hidden_size)``, rounded to float32 and then to the
    compute dtype (transformers' ``embed_scale`` buffer cast to the model's dtype)."""
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids must be an integer array of shape (batch, seq), got {input_ids.dtype} "
                       f"{input_ids.shape}")
    h = self.model.embed_tokens(input_ids)
    if self.config.scale_embeddings:
      h = h * jnp.asarray(np.float32(self.config.hidden_size ** 0.5), h.dtype)
    return h

  def rope(self, positions: ArrayLike) -> tuple[jax.Array, ...]:
    """``(cos, sin)`` of shape ``positions.shape + (head_dim,)`` in the compute dtype; with
    ``config.rope_local_theta`` (Gemma 3) ``(cos, sin, cos_local, sin_local)``, the last two for the sliding-window
    layers.

    ``positions`` is ``(T,)`` (shared by the batch) or ``(B, T)``; ``freqs = p θ`` (float32,
    :func:`rope_inv_freq`), duplicated to ``head_dim`` entries.
    """
    positions = jnp.asarray(positions)
    if positions.ndim not in (1, 2):
      raise ValueError(f"positions must have shape (T,) or (B, T), got {positions.shape}")
    tables: tuple[jax.Array, ...] = ()
    for local in (False, True) if self.config.rope_local_theta is not None else (False,):
      freqs = positions.astype(_F32)[..., None] * jnp.asarray(rope_inv_freq(self.config, local))
      emb = jnp.concatenate([freqs, freqs], axis=-1)
      tables += (jnp.cos(emb).astype(self.dtype), jnp.sin(emb).astype(self.dtype))
    return tables

  def head(self, h: jax.Array) -> jax.Array:
    """Logits ``(B, T, V)`` in float32: final norm, then ``lm_head`` (or the tied embedding matrix); with
    ``config.final_softcap = c`` then ``c · tanh(z / c)`` (in float32)."""
    x = self.model.norm(h)
    logits = self.model.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
    logits = logits.astype(_F32)
    cap = self.config.final_softcap
    return logits if cap is None else jnp.tanh(logits / cap) * cap

  def __call__(self, input_ids: ArrayLike, positions: ArrayLike | None = None, *,
               return_activations: bool = False) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
    """Logits ``(B, T, V)`` float32 of integer ``input_ids`` ``(B, T)``; ``positions`` defaults to ``arange(T)``.

    With ``return_activations`` (a Python bool, static under ``jit``) it returns ``(logits, activations)``:
    ``activations[l]`` is block ``l``'s FFN intermediate activation ``act(gate(x))``, ``(B, T, intermediate_size)``
    in the compute dtype (for ProSparse's L1 penalty and activation-sparsity measurement). It is an ordinary
    return value, so it differentiates under ``jax.grad`` / ``nnx.grad`` and, reduced inside a jitted function, is
    never materialized; the default call is unchanged (the same computation as without the option).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from proxjax.models import LlamaConfig, LlamaForCausalLM
      >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
      ...                 num_attention_heads=2, hidden_act="relu")
      >>> model = nnx.eval_shape(lambda: LlamaForCausalLM(c, rngs=nnx.Rngs(0)))
      >>> f = lambda m, ids: m(ids, return_activations=True)
      >>> logits, acts = nnx.eval_shape(f, model, jnp.zeros((2, 5), jnp.int32))
      >>> logits.shape, [a.shape for a in acts]
      ((2, 5, 32), [(2, 5, 24), (2, 5, 24)])
    """
    h = self.embed(input_ids)
    rope = self.rope(jnp.arange(h.shape[1]) if positions is None else positions)
    if not return_activations:
      for layer in self.model.layers:
        h = layer(h, rope)
      return self.head(h)
    acts = []
    for layer in self.model.layers:
      h, a = layer(h, rope, return_activation=True)
      acts.append(a)
    return self.head(h), tuple(acts)
