"""The ProxSparse workflow: learn 2:4 masks end to end, apply them to the original weights, save the checkpoint,
verify it is 2:4, write the report (docs/method.md, "ProxSparse").

Example::

  from proxjax.workflows.config import EvalConfig, ProxSparseJob
  from proxjax.workflows.proxsparse import proxsparse
  report = proxsparse(ProxSparseJob("smollm2", "out/proxsparse", lam1=0.1, lam_relative=True, steps=400,
                                    eval=EvalConfig("lee")))
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import jax.numpy as jnp

from proxjax import data
from proxjax.core import files
from proxjax.models import check_sparsity
from proxjax.models.hf import checkpoint_fingerprint
from proxjax.training import proxsparse as ps
from proxjax.workflows import common
from proxjax.workflows.config import ProxSparseJob

__all__ = ["proxsparse"]


def proxsparse(job: ProxSparseJob) -> dict[str, Any]:
  """Runs ``job`` and returns its report (also written to ``proxjax-report.json``); resumable."""
  return common.resumable(job, _proxsparse)


def _proxsparse(job: ProxSparseJob, model_dir: str, out_dir: str, state_dir: str) -> dict[str, Any]:
  mesh = common.mesh_of(job.mesh)
  t0 = time.perf_counter()
  model = common.load_model(model_dir, mesh, param_dtype=jnp.float32)  # train in float32; saved in the source's
  tokenizer = data.load_tokenizer(model_dir)
  max_docs = job.max_documents
  if max_docs is None and job.train == "c4":
    max_docs = job.steps * job.batch_size  # streamed: the first documents of the shard (the reference: 400)
  documents = data.load_documents(job.train, split="calibration", max_documents=max_docs)
  docs = ps.tokenize_documents(tokenizer, documents, job.seqlen, split=job.split_documents)
  train = {"source": job.train, "split": "calibration", "documents": len(docs), "seqlen": job.seqlen,
           "documents_split": bool(job.split_documents),
           "batch_size": job.batch_size, "tokens_per_epoch": int(sum(d.size for d in docs)),
           "order": "given order, one document per step, cycling", "padding": "right, masked, power-of-two lengths"}
  options = {"steps": job.steps, "lr": job.learning_rate, "lam1": job.lam1, "lam_relative": job.lam_relative,
             "lam2": job.lam2, "eps": job.eps, "prox_scaling": job.prox_scaling}
  print(f"proxjax {common.VERSION}: ProxSparse on {model_dir} ({options}); training data {train}", file=sys.stderr)
  full: dict[str, Any] = {}
  eval_data = None
  if job.eval is not None:
    eval_data = common.evaluation_data(model_dir, job.eval)  # the same windows before and after
    full["ppl_before"] = common.perplexity(model, eval_data, job.eval.batch_size, job.progress, mesh=mesh).ppl
  resume_dir = common.training_state(state_dir)
  result = ps.proxsparse(model, docs, steps=job.steps, lam1=job.lam1, learning_rate=job.learning_rate,
                         lam_relative=job.lam_relative, lam2=job.lam2, eps=job.eps, prox_scaling=job.prox_scaling,
                         batch_size=job.batch_size, state_dir=resume_dir, save_every=job.save_every, mesh=mesh,
                         progress=job.progress, run_info={"model_dir": os.path.abspath(model_dir),
                                                          "checkpoint": checkpoint_fingerprint(model_dir)})
  provenance = {
      "proxjax_version": common.VERSION, "source_model": os.path.abspath(model_dir), "method": "proxsparse",
      "refine": None, "n": 2, "m": 4, "options": options, "calibration": train,
      "final_fraction_24": result.final_fraction_24, "resumed_from": result.resumed_from,
      "seconds": time.perf_counter() - t0, "mesh": None if mesh is None else dict(mesh.shape), **common.processes(),
      "note": "masks learned end to end (ProxSparse, exact 2:4 prox); kept weights are the original ones",
  }
  if eval_data is not None:
    full["ppl_after"] = common.perplexity(model, eval_data, job.eval.batch_size, job.progress, mesh=mesh).ppl
    full["eval"] = {"dataset": job.eval.dataset, "seqlen": job.eval.seqlen, "ppl_before": full["ppl_before"],
                    "ppl": full["ppl_after"], "protocol": dict(eval_data.protocol)}
  common.save(model, out_dir, source_dir=model_dir, metadata=provenance, overwrite=job.out_dir.overwrite,
              kept=f"the training state is kept in {state_dir}: free space and rerun the same command to finish")
  full.update(provenance)
  full.update({
      "lam1_effective": result.lam1_effective, "losses": result.losses, "regularizer": result.regularizer,
      "lam2_terms": result.lam2_terms, "fraction_24": result.fraction_24, "learning_rates": result.learning_rates,
      "grad_norms": result.grad_norms, "tokens": result.tokens,
      "lam1_schedule": {"lam1": job.lam1, "relative": job.lam_relative, "prox_scaling": job.prox_scaling,
                        "per_step_strength": ("λ₁·c_i (constant)" if job.prox_scaling == "strength"
                                              else "λ₁·c_i·learning_rate(t)")},
  })
  report_path = job.out_dir.report or os.path.join(out_dir, "proxjax-report.json")

  def check_and_report() -> None:  # process 0 alone: it wrote the checkpoint, and it may be the only one to see it
    rows = check_sparsity(out_dir)
    bad = [r["name"] for r in rows if not r["ok"]]
    if bad or not rows:
      raise RuntimeError(f"the saved checkpoint {out_dir} is not 2:4 in {bad or 'any projection'} (please report "
                         "this)")
    full["sparsity"] = {"projections": len(rows), "all_2_4": True, "zeros": sum(r["zeros"] for r in rows),
                        "size": sum(r["size"] for r in rows)}
    files.write_json(report_path, full)

  common.write_once(check_and_report, f"checking the checkpoint and writing the report {report_path}")
  common.finish_training_state(job.out_dir, resume_dir)
  full["report_path"] = report_path
  return full
