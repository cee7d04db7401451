"""The tiny random transformers (PyTorch) LLaMA-family models the tests compare against, and the comparison helpers.

Used by tests/models/test_llama.py (parity), tests/pipeline/test_pipeline.py, tests/training/test_prosparse.py and the
session-wide ``checkpoint`` fixture of tests/conftest.py. Tolerance: ``|ours − torch| ≤ TOL · max|torch|``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

TOL = 2e-5
B, T = 2, 16
HF_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
}

WINDOW = 5
"""The sliding window of the family variants below: shorter than every test sequence (16 tokens, prompts + 9)."""
FAMILY_SHAPES = dict(hidden_size=32, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
"""The shapes of every ``FAMILIES`` variant: GQA (4 query heads, 2 key/value heads) with an explicit head_dim (16 ≠
hidden 32 / 4 heads), so every kernel is (32, 64) (q), (32, 32) (k, v, gate, up, down) or (64, 32) (o). Pruning
compiles its programs once per kernel shape: the four variants share them, and with the (32, 32) and (32, 64)
kernels of tests/models/test_families_moe.py."""
FAMILIES = {
    # Qwen3: q/k RMSNorm per head, an explicit head_dim, no biases, untied.
    "qwen3": ("qwen3", FAMILY_SHAPES),
    # Qwen3 with sliding-window layers from max_window_layers = 1, attention biases and tied embeddings.
    "qwen3_window": ("qwen3", FAMILY_SHAPES | dict(attention_bias=True, tie_word_embeddings=True,
                                                   use_sliding_window=True, sliding_window=WINDOW,
                                                   max_window_layers=1)),
    # Gemma 2: layers 0 (sliding) and 1 (full); soft caps small enough to bite on these logits and scores.
    "gemma2": ("gemma2", FAMILY_SHAPES | dict(tie_word_embeddings=True, sliding_window=WINDOW,
                                              query_pre_attn_scalar=32, attn_logit_softcapping=2.0,
                                              final_logit_softcapping=3.0)),
    # Gemma 3 text: sliding layer 0 with the local RoPE base, full layer 1 with a linearly scaled global base.
    "gemma3": ("gemma3", FAMILY_SHAPES | dict(tie_word_embeddings=True, sliding_window=WINDOW,
                                              query_pre_attn_scalar=32,
                                              layer_types=["sliding_attention", "full_attention"],
                                              rope_parameters={"full_attention": {"rope_type": "linear",
                                                                                  "factor": 2.0, "rope_theta": 1e6},
                                                               "sliding_attention": {"rope_type": "default",
                                                                                     "rope_theta": 1e4}})),
}
"""The Qwen3 / Gemma variants of tests/models/test_families.py: ``make_torch_model(kind, **overrides)`` for
``kind, overrides = FAMILIES[name]``."""


def make_torch_model(kind: str, seed: int = 0, **overrides):
  """A tiny random transformers model with well-spread weights (eager attention, float32, eval mode)."""
  cfg_cls, model_cls = HF_CLASSES[kind]
  kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False, attn_implementation="eager")
  kw.update(overrides)
  torch.manual_seed(seed)
  model = model_cls(cfg_cls(**kw)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # Gemma scales by 1 + w: its weights are centred on 0, the others' on 1
        p.copy_((0.0 if kind.startswith("gemma") else 1.0) + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.15)
  return model


def to_np(x) -> np.ndarray:
  return x.detach().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(jnp.asarray(x, jnp.float32))


def assert_close(ours, ref, tol: float = TOL):
  ours, ref = to_np(ours), to_np(ref)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  scale = float(np.max(np.abs(ref))) or 1.0
  err = float(np.max(np.abs(ours - ref)))
  assert err <= tol * scale, f"max error {err:.3g} > {tol:g} x scale {scale:.3g}"


def rel_err(a, b) -> float:
  a, b = to_np(a), to_np(b)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def input_ids(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, size=(B, T)).astype(np.int32)


def torch_logits(model, ids, positions=None):
  with torch.no_grad():
    pos = None if positions is None else torch.as_tensor(np.asarray(positions), dtype=torch.long)
    return model(input_ids=torch.as_tensor(ids, dtype=torch.long), position_ids=pos).logits


PIPELINE_SHAPES = dict(intermediate_size=64)
"""``make_torch_model`` overrides for the whole-model tests (the session ``checkpoint`` of tests/conftest.py and
tests/pipeline/test_pipeline.py): every kernel is (64, 64) (q, o, gate, up, down) or (64, 32) (k, v: still GQA and
still a non-square kernel). Pruning compiles its programs once per distinct kernel shape and a training step solves
the prox once per distinct shape, so two shapes instead of four halve most of those tests' compile time; the same
shapes in both places let them reuse each other's compiled programs. (tests/models/test_llama.py and
test_generate.py keep intermediate 128; the family variants above have their own shapes.)"""


def eager_logits(model, ids):
  """The model's logits, run eagerly: its ops compile once for every model of the family tests (a jitted forward
  compiles per config)."""
  return model(jnp.asarray(ids))


def hf_logits(model, ids, mask=None) -> np.ndarray:
  """transformers' logits of ``ids`` ``(B, T)`` as float32 NumPy; ``mask`` ``(B, T)`` (1 = real token) is passed as
  the ``attention_mask`` (padding)."""
  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.as_tensor(mask, dtype=torch.long)}
    return model(input_ids=torch.as_tensor(ids, dtype=torch.long), **kw).logits.float().numpy()


def assert_padded_batch_close(tm, model, ids, lengths) -> None:
  """Right-pads row ``i`` of ``ids`` ``(B, T)`` after ``lengths[i]`` tokens (id 0) and checks that every real
  position has transformers' logits (with the padding masked out there) within :data:`TOL`; ours run eagerly
  (:func:`eager_logits`, no mask: right padding never reaches an earlier position)."""
  lengths = np.asarray(lengths)
  mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
  ids = np.where(mask, ids, 0).astype(np.int32)
  ref = hf_logits(tm, ids, mask)
  ours = np.asarray(eager_logits(model, ids))
  for row, n in enumerate(lengths):
    assert_close(ours[row, :n], ref[row, :n])


def param_arrays(model) -> dict[tuple[str, ...], np.ndarray]:
  """Every ``nnx.Param`` of a proxjax model as a NumPy array, keyed by its path as strings."""
  return {tuple(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def model_pairs(tmp_path_factory, build: Callable[[str], Any]) -> Callable[[str], tuple[Any, Any, Any]]:
  """``make(name)`` → ``(torch model, our model loaded from its save_pretrained output, that directory)``, the torch
  model ``build(name)``, each built once (the body of the family tests' module-scoped ``pair`` fixtures)."""
  from proxjax.models import load_pretrained  # noqa: PLC0415

  cache: dict[str, tuple[Any, Any, Any]] = {}

  def make(name: str) -> tuple[Any, Any, Any]:
    if name not in cache:
      tm = build(name)
      d = tmp_path_factory.mktemp(name)
      tm.save_pretrained(d)
      cache[name] = (tm, load_pretrained(d), d)
    return cache[name]

  return make
