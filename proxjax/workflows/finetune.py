"""The recovery fine-tuning workflow: train a pruned checkpoint's kept weights on the LM loss with its sparsity mask
fixed, check that every pruned weight is still exactly zero, save it with ``proxjax-finetune.json``. The training
state is saved every ``save_every`` steps in the state directory (default ``OUT_DIR.proxjax-state``), and the same
job run again continues from it (:mod:`proxjax.training.loop`; the fingerprint covers the source checkpoint, the
training windows, the masks and every setting).

Example::

  from proxjax.workflows.config import EvalConfig, FinetuneJob
  from proxjax.workflows.finetune import finetune
  report = finetune(FinetuneJob("out/prox", "out/prox-ft", steps=100, eval=EvalConfig("lee")))
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from proxjax import data
from proxjax.core import files
from proxjax.models.hf import checkpoint_fingerprint
from proxjax.training import finetune as ft
from proxjax.workflows import common
from proxjax.workflows.config import FinetuneJob

__all__ = ["finetune"]


def finetune(job: FinetuneJob) -> dict[str, Any]:
  """Runs ``job`` and returns its report (also written to ``proxjax-finetune.json``)."""
  return common.resumable(job, _finetune)


def _finetune(job: FinetuneJob, model_dir: str, out_dir: str, state_dir: str) -> dict[str, Any]:
  mesh = common.mesh_of(job.mesh)
  model = common.load_model(model_dir, mesh, param_dtype=jnp.float32)  # train in float32; saved in the source's
  tokenizer = data.load_tokenizer(model_dir)
  documents = data.load_documents(job.train, split="calibration")
  ids = data.calibration_windows(tokenizer, documents, nsamples=job.steps * job.batch_size, seqlen=job.seqlen,
                                 seed=job.seed)
  batches = ids.reshape(job.steps, job.batch_size, job.seqlen)
  result: dict[str, Any] = {"source_model": os.path.abspath(model_dir), "train": job.train, "steps": job.steps,
                            "batch_size": job.batch_size, "seqlen": job.seqlen, "learning_rate": job.learning_rate,
                            "weight_decay": job.weight_decay, "seed": job.seed,
                            "train_tokens": int(ids.size), "proxjax_version": common.VERSION,
                            "mesh": None if mesh is None else dict(mesh.shape), **common.processes()}
  eval_data = None
  if job.eval is not None:
    eval_data = common.evaluation_data(model_dir, job.eval)  # the same windows before and after
    result["eval_protocol"] = dict(eval_data.protocol)
    result["ppl_before"] = common.perplexity(model, eval_data, job.eval.batch_size, job.progress, mesh=mesh).ppl
  masks = ft.sparsity_masks(model)  # for the check below; finetune_masked's default masks are the same zeros, and
  # its default chain is cached, so the training step compiles once per model shape, not once per run
  resume_dir = common.training_state(state_dir)
  trained = ft.finetune_masked(model, batches, learning_rate=job.learning_rate, weight_decay=job.weight_decay,
                               progress=job.progress, state_dir=resume_dir, save_every=job.save_every, mesh=mesh,
                               run_info={"source": job.train, "checkpoint": checkpoint_fingerprint(model_dir)})
  result["losses"] = trained.losses
  if job.check:  # every weight that was zero must still be exactly zero
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    flat_m = jax.tree.leaves(masks, is_leaf=lambda x: x is None)
    flat_p = jax.tree.leaves(params)
    lost = [i for i, (mk, p) in enumerate(zip(flat_m, flat_p)) if mk is not None and bool(jnp.any((~mk) & (p != 0)))]
    if lost:
      raise RuntimeError(f"{len(lost)} pruned kernels gained non-zeros during fine-tuning (please report this bug)")
  if eval_data is not None:
    result["ppl_after"] = common.perplexity(model, eval_data, job.eval.batch_size, job.progress, mesh=mesh).ppl
  common.save(model, out_dir,
              kept=f"the training state is kept in {state_dir}: free space and rerun the same command to finish",
              source_dir=model_dir, metadata={**common.provenance(model_dir), "finetune": result},
              overwrite=job.out_dir.overwrite)
  report_path = job.out_dir.report or os.path.join(out_dir, "proxjax-finetune.json")
  common.write_once(lambda: files.write_json(report_path, result), f"writing the report {report_path}")
  common.finish_training_state(job.out_dir, resume_dir)
  return {**result, "report_path": report_path}
