"""A tiny LLaMA GGUF written with gguf-py the way llama.cpp's ``convert_hf_to_gguf.py`` writes one (q and k
permuted), so the weights before permutation are known: for tests/models/test_convert.py and the full-disk test of
tests/workflows/test_reliability.py."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np

TINY = dict(n_layers=2, hidden=64, n_head=4, n_kv=2, head_dim=16, inter=128, ctx=128)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py's ``LlamaModel.permute`` (HF rotary halves -> interleaved pairs)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_chars() -> list[str]:
  """GPT-2's bytes_to_unicode table, written out independently of proxjax.models.convert."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  table = dict(zip(bs, map(chr, cs)))
  return [table[b] for b in range(256)]


SPECIALS = [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<think>", 4), ("</think>", 4)]
MERGES = [
  *("Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at", "Ġ s", "Ġs at", "Ġ o", "Ġo n", "Ġ m", "Ġm at", "i n", "e r", "l l"),
  *("Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "H e", "He ll", "Hell o", "Ċ Ċ", "Ġ Ġ"),
]


def tiny_vocab(extra_merges: tuple[str, ...] = ()) -> tuple[list[str], list[int], list[str]]:
  tokens = [t for t, _ in SPECIALS] + _byte_chars()
  types = [ty for _, ty in SPECIALS] + [1] * 256
  merges = [*MERGES, *extra_merges]
  for m in merges:
    tokens.append(m.replace(" ", ""))
    types.append(1)
  return tokens, types, merges


def _tiny_weights(vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
  """HF-named, HF-layout (out, in) float32 weights of the tiny model."""
  rng = np.random.default_rng(seed)
  h, f, q, kv = TINY["hidden"], TINY["inter"], TINY["n_head"] * TINY["head_dim"], TINY["n_kv"] * TINY["head_dim"]
  normal = lambda *shape: (rng.standard_normal(shape) * 0.15).astype(np.float32)  # noqa: E731
  w = {"model.embed_tokens.weight": normal(vocab, h), "model.norm.weight": 1 + normal(h)}
  if not tied:
    w["lm_head.weight"] = normal(vocab, h)
  for i in range(TINY["n_layers"]):
    p = f"model.layers.{i}."
    w.update({
      p + "input_layernorm.weight": 1 + normal(h),
      p + "self_attn.q_proj.weight": normal(q, h),
      p + "self_attn.k_proj.weight": normal(kv, h),
      p + "self_attn.v_proj.weight": normal(kv, h),
      p + "self_attn.o_proj.weight": normal(h, q),
      p + "post_attention_layernorm.weight": 1 + normal(h),
      p + "mlp.gate_proj.weight": normal(f, h),
      p + "mlp.up_proj.weight": normal(f, h),
      p + "mlp.down_proj.weight": normal(h, f),
    })
  return w


GGUF_NAMES = {
  "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
  "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
  "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
  base = hf[: -len(".weight")]
  m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base)
  return f"blk.{m.group(1)}.{GGUF_NAMES[m.group(2)]}.weight" if m else f"{GGUF_NAMES[base]}.weight"


def write_tiny_gguf(
  path: Path,
  *,
  arch: str = "llama",
  tied: bool = False,
  pre: str = "smollm",
  add_bos: bool = True,
  extra_merges: tuple[str, ...] = (),
  drop: tuple[str, ...] = (),
  extra_tensors: tuple[str, ...] = (),
  quantize: bool = True,
) -> dict[str, np.ndarray]:
  """Writes the tiny model like llama.cpp's converter would; returns the HF weights it started from.

  With ``quantize``, the MLP matrices are stored as Q8_0 and the embedding as F16 (the returned weights are then the
  dequantized values, i.e. exactly what a correct conversion yields); everything else is F32.
  """
  tokens, types, merges = tiny_vocab(extra_merges)
  weights = _tiny_weights(len(tokens), tied)
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name("tiny test llama")
  w.add_block_count(TINY["n_layers"])
  w.add_context_length(TINY["ctx"])
  w.add_embedding_length(TINY["hidden"])
  w.add_feed_forward_length(TINY["inter"])
  w.add_head_count(TINY["n_head"])
  w.add_head_count_kv(TINY["n_kv"])
  w.add_rope_dimension_count(TINY["head_dim"])
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(len(tokens))
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(0)
  w.add_add_bos_token(add_bos)
  w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
  for hf, value in weights.items():
    name = _gguf_name(hf)
    if name in drop:
      continue
    data = value
    if ".attn_q." in name:
      data = llama_cpp_permute(value, TINY["n_head"])
    elif ".attn_k." in name:
      data = llama_cpp_permute(value, TINY["n_kv"])
    if quantize and ".ffn_" in name and "norm" not in name:
      packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
      w.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
      weights[hf] = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0)
    elif quantize and name == "token_embd.weight":
      w.add_tensor(name, data.astype(np.float16))
      weights[hf] = data.astype(np.float16).astype(np.float32)
    else:
      w.add_tensor(name, data)
  for name in extra_tensors:
    w.add_tensor(name, np.zeros(TINY["hidden"], np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return weights
