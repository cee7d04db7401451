"""The ProSparse workflow: ReLU substitution, training with an L1 penalty on FFN activations, optional FATReLU
threshold, activation sparsity and perplexity before and after; the checkpoint, ``proxjax-prosparse.json`` and the
provenance (docs/method.md, "ProSparse").

Example::

  from proxjax.workflows.config import EvalConfig, ProSparseJob
  from proxjax.workflows.prosparse import prosparse
  report = prosparse(ProSparseJob("smollm2", "out/prosparse", steps=120, l1_stages=[(120, 1e-4)],
                                  eval=EvalConfig("lee", max_windows=16)))
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax.numpy as jnp

from proxjax import data
from proxjax.core import distributed, files
from proxjax.models.hf import checkpoint_fingerprint
from proxjax.training import prosparse as ps
from proxjax.workflows import common
from proxjax.workflows.config import ProSparseJob

__all__ = ["prosparse"]


def prosparse(job: ProSparseJob) -> dict[str, Any]:
  """Runs ``job`` and returns its report (also written to ``proxjax-prosparse.json``); resumable."""
  return common.resumable(job, _prosparse)


def _cached_before(path: str, protocol: Any, model: str) -> dict[str, Any] | None:
  """The before-training evaluation cached at ``path`` (the state directory's ``eval-before.json``, written atomically
  by process 0 alone) when it was made with ``protocol`` on ``model``; else None (also for a missing, unreadable or
  corrupt file), and the caller computes it.

  Across processes every process reads the file itself and the cache is used only when every process read a valid
  one with the same value (the first 28 bits of each value's :func:`proxjax.core.distributed.fingerprint`,
  all-gathered): where one does not see it (no shared file system) or it differs, every process computes the
  evaluation, so all report the same numbers.
  """
  before = None
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError):  # missing, unreadable or not JSON: a cache, so recompute
    saved = None
  if isinstance(saved, dict) and saved.get("protocol") == files.json_roundtrip(protocol) \
      and saved.get("model") == model and isinstance(saved.get("before"), dict):
    before = saved["before"]
  if distributed.process_count() > 1:  # a collective: every process takes this branch
    seen = distributed.allgather_int(-1 if before is None else int(distributed.fingerprint(before)[:7], 16))
    if min(seen) < 0 or len(set(seen)) > 1:
      return None
  return before


def _prosparse(job: ProSparseJob, model_dir: str, out_dir: str, state_dir: str) -> dict[str, Any]:
  l1 = ps.l1_schedule(job.l1_warmup, job.l1_warmup_steps, job.l1_stages)  # validates before any long work
  t0 = time.perf_counter()

  mesh = common.mesh_of(job.mesh)
  model = common.load_model(model_dir, mesh, param_dtype=jnp.float32)  # trained in float32; saved in the source's
  source_act, source_threshold = model.config.hidden_act, model.config.activation_threshold
  tokenizer = data.load_tokenizer(model_dir)
  documents = data.load_documents(job.train, split="calibration")
  ids = data.calibration_windows(tokenizer, documents, nsamples=job.steps * job.batch_size, seqlen=job.seqlen,
                                 seed=job.seed)
  batches = ids.reshape(job.steps, job.batch_size, job.seqlen)
  lambdas = ps.schedule_values(l1, job.steps)
  result: dict[str, Any] = {
      "proxjax_version": common.VERSION, "source_model": os.path.abspath(model_dir),
      "source_hidden_act": source_act, "source_threshold": source_threshold,
      "converted_to_relu": source_act != "relu",
      "train": {"source": job.train, "split": "calibration", "documents": len(documents), "steps": job.steps,
                "batch_size": job.batch_size, "seqlen": job.seqlen, "tokens": int(ids.size), "seed": job.seed,
                "mode": "packed"},
      "optimizer": {"name": "adamw", "learning_rate": job.learning_rate, "lr_schedule": job.lr_schedule,
                    "lr_warmup_steps": job.lr_warmup_steps, "lr_min_ratio": 0.1, "weight_decay": job.weight_decay,
                    "betas": [0.9, 0.999], "clip_norm": 1.0, "param_dtype": "float32"},
      "l1": {"penalty": "R = sum over layers of mean over tokens of sum over units |a| (a = act(gate(x)))",
             "warmup": job.l1_warmup, "warmup_steps": job.l1_warmup_steps,
             "stages": [{"end_step": e, "peak": v} for e, v in job.l1_stages],
             "schedule": "lambda(t) = l_{i-1} + (l_i - l_{i-1}) sin(pi/2 (t - T_{i-1}) / (T_i - T_{i-1})) "
                         "(our reading of ProSparse)", "final_lambda": float(lambdas[-1])},
      "threshold": job.threshold, "mesh": None if mesh is None else dict(mesh.shape), **common.processes(),
  }
  print(f"proxjax {common.VERSION}: prosparse {model_dir} ({source_act}"
        f"{f', threshold {source_threshold:g}' if source_threshold else ''}) -> {out_dir}; {job.steps} steps of "
        f"{job.batch_size} x {job.seqlen} tokens from {job.train}", file=sys.stderr)

  eval_data = None
  if job.eval is not None:
    eval_data = common.evaluation_data(model_dir, job.eval)
    result["eval"] = {"dataset": job.eval.dataset, "protocol": dict(eval_data.protocol)}
    cached = os.path.join(state_dir, "eval-before.json")
    before = _cached_before(cached, eval_data.protocol, result["source_model"])
    if before is None:
      before = ps.perplexity_and_sparsity(model, eval_data, job.eval.batch_size, job.progress, mesh=mesh)
      entry = {"protocol": eval_data.protocol, "model": result["source_model"], "before": before}
      common.write_once(lambda: files.write_json(cached, entry), f"writing {cached}")
    result["before"] = before

  relu = ps.with_activation(model, "relu", 0.0)  # SiLU → ReLU (a ReLU/FATReLU source trains as plain ReLU)
  del model
  resume_dir = common.training_state(state_dir)
  trained = ps.train_prosparse(
      relu, batches, l1=l1, learning_rate=job.learning_rate, lr_schedule=job.lr_schedule,
      lr_warmup_steps=job.lr_warmup_steps, weight_decay=job.weight_decay, state_dir=resume_dir,
      save_every=job.save_every, progress=job.progress, mesh=mesh,
      run_info={"source_model": result["source_model"], "train": result["train"],
                "checkpoint": checkpoint_fingerprint(model_dir)})
  relu = trained.model
  result["training"] = {"resumed_from": trained.resumed_from, "first_loss": trained.losses[0],
                        "last_loss": trained.losses[-1], "losses": trained.losses, "lm_losses": trained.lm_losses,
                        "l1": trained.l1, "lambdas": trained.lambdas, "zero_fractions": trained.zero_fractions,
                        "learning_rates": trained.learning_rates, "seconds": trained.seconds}
  final = ps.with_activation(relu, "relu", job.threshold) if job.threshold > 0 else relu
  if eval_data is not None:
    result["after_relu"] = ps.perplexity_and_sparsity(relu, eval_data, job.eval.batch_size, job.progress, mesh=mesh)
    if job.threshold > 0:
      result["after_threshold"] = ps.perplexity_and_sparsity(final, eval_data, job.eval.batch_size, job.progress,
                                                             mesh=mesh)
    result["after"] = result["after_threshold" if job.threshold > 0 else "after_relu"]

  saved_model = final if job.export != "relu" else relu
  theta = saved_model.config.activation_threshold
  result["export"] = {
      "mode": job.export or "relu", "hidden_act": "fatrelu" if theta > 0 else "relu", "hidden_act_param": theta,
      "threshold_applied": theta, "dtype": saved_model.config.dtype or "float32",
      "note": ("FATReLU: config.json hidden_act 'fatrelu' with hidden_act_param (proxjax load_pretrained runs it "
               "exactly; transformers' LlamaForCausalLM refuses it)" if theta > 0 else
               "plain ReLU: transformers' LlamaForCausalLM runs it faithfully" +
               (f" (trained for threshold {job.threshold:g}; saved without it, see after_relu)"
                if job.threshold > 0 else ""))}
  result["seconds"] = time.perf_counter() - t0
  summary = {k: v for k, v in result.items() if k != "training"}
  summary["training"] = {k: result["training"][k] for k in ("resumed_from", "first_loss", "last_loss")}
  common.save(saved_model, out_dir, source_dir=model_dir,
              kept=f"the training state is kept in {state_dir}: free space and rerun the same command to finish",
              metadata={**common.provenance(model_dir), "prosparse": summary},
              overwrite=job.out_dir.overwrite, allow_fatrelu=theta > 0)
  report_path = job.out_dir.report or os.path.join(out_dir, "proxjax-prosparse.json")
  common.write_once(lambda: files.write_json(report_path, result), f"writing the report {report_path}")
  common.finish_training_state(job.out_dir, resume_dir)
  result["report_path"] = report_path
  return result
