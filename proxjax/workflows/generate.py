"""The generation workflow: what a (pruned) checkpoint says, by greedy decoding with the KV cache
(:func:`proxjax.models.generate.greedy_generate`).

Example::

  from proxjax.workflows.generate import GenerateJob, generate
  result, text = generate(GenerateJob("out/prox", ("The capital of France is",), max_new_tokens=32, json="gen.json"))
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax.numpy as jnp

from proxjax import data
from proxjax.core import files
from proxjax.models import load_pretrained
from proxjax.models.generate import greedy_generate, truncate_prompts
from proxjax.models.llama import dtype_from_name
from proxjax.workflows import common

__all__ = ["GenerateJob", "generate"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
"""``--dtype`` choices: ``auto`` keeps the checkpoint's parameter dtype and computes in float32; any other name is
both the parameter and the compute dtype (the KV cache is kept in the compute dtype)."""


@dataclasses.dataclass(frozen=True)
class GenerateJob:
  """``proxjax generate``: greedy continuations of ``prompts`` by the checkpoint ``model``.

  Attributes:
    model: a Hugging Face checkpoint directory or ``smollm2``.
    prompts: the prompt texts, tokenized with the model's tokenizer exactly as its post-processor says (a BOS only
      if the tokenizer's post-processor adds one; SmolLM2's does not), no chat template.
    max_new_tokens: most tokens generated per prompt (``≥ 1``); a row also ends at the tokenizer's EOS.
    use_cache: decode with the KV cache (``False``: the full forward every step, the slow reference).
    dtype: one of :data:`DTYPES`.
    batch_size: prompts decoded together.
    json: write the prompts, continuations, token counts and tokens/s here.
  """

  model: str
  prompts: tuple[str, ...]
  max_new_tokens: int = 64
  use_cache: bool = True
  dtype: str = "auto"
  batch_size: int = 8
  json: str | None = None

  def __post_init__(self) -> None:
    if not self.prompts:
      raise ValueError("give at least one prompt (--prompt TEXT)")
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
    if not isinstance(self.batch_size, int) or self.batch_size < 1:
      raise ValueError(f"--batch-size must be at least 1, got {self.batch_size!r}")


def generate(job: GenerateJob) -> tuple[dict[str, Any], str]:
  """Runs ``job``: returns the result (also written to ``job.json`` when given) and the printed text (each prompt
  followed by its continuation, then the token counts and the speed).

  ``seconds`` is the wall time of :func:`~proxjax.models.generate.greedy_generate` (compilation included: one
  prefill and one decode program per bucketed shape), ``tokens_per_s`` the generated tokens over it.

  Raises:
    ValueError: ``model`` is not a checkpoint directory (no ``config.json``) or has no ``tokenizer.json``; a prompt
      that encodes to no tokens.
  """
  model_dir = common.model_dir(job.model)
  if not os.path.isfile(os.path.join(model_dir, "config.json")):
    raise ValueError(f"{model_dir}: not a Hugging Face checkpoint directory (no config.json)")
  tok = data.load_tokenizer(model_dir)
  ids = [tok.encode(p).tolist() for p in job.prompts]
  for i, prompt in enumerate(ids):
    if not prompt:
      raise ValueError(f"prompt {i + 1} ({job.prompts[i]!r}) encodes to no tokens")
  if job.dtype == "auto":
    model = load_pretrained(model_dir)
  else:
    dtype = dtype_from_name(job.dtype)
    model = load_pretrained(model_dir, param_dtype=dtype, dtype=dtype)
  ids, truncated = truncate_prompts(ids, job.max_new_tokens, model.config.max_position_embeddings)
  start = time.perf_counter()
  out = greedy_generate(model, ids, job.max_new_tokens, eos_token_id=tok.eos_token_id, use_cache=job.use_cache,
                        batch_size=job.batch_size)
  seconds = time.perf_counter() - start
  generated = sum(len(o) for o in out)
  rows = [{"prompt": text, "continuation": tok.decode(new), "prompt_tokens": len(prompt), "new_tokens": len(new),
           "tokens": new, "stopped_by": "length" if len(new) == job.max_new_tokens else "eos"}
          for text, prompt, new in zip(job.prompts, ids, out, strict=True)]
  result = {"model": os.path.abspath(model_dir), "dtype": job.dtype,
            "param_dtype": jnp.dtype(model.param_dtype).name, "compute_dtype": jnp.dtype(model.dtype).name,
            "use_cache": job.use_cache, "max_new_tokens": job.max_new_tokens, "eos_token_id": tok.eos_token_id,
            "prompts_truncated": truncated, "generated_tokens": generated, "seconds": seconds,
            "tokens_per_s": generated / seconds if seconds > 0 else None, "results": rows}
  if job.json:
    files.write_json(job.json, result)
  lines = []
  for i, row in enumerate(rows, 1):
    lines += [f"--- prompt {i} ({row['prompt_tokens']} tokens; {row['new_tokens']} generated, stopped by "
              f"{row['stopped_by']})", row["prompt"] + row["continuation"]]
  if truncated:
    lines.append(f"note: {truncated} prompt(s) longer than {model.config.max_position_embeddings} - "
                 f"{job.max_new_tokens} tokens kept only their last tokens")
  lines.append(f"{generated} tokens in {seconds:.2f} s ({result['tokens_per_s']:.1f} tokens/s, compilation included; "
               f"{'KV cache' if job.use_cache else 'no cache'}, greedy)")
  return result, "\n".join(lines)
