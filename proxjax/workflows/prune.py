"""The prune workflow: load a checkpoint, prune it block by block, save it with its report, provenance and plot.

Example (a tiny random checkpoint; the bundled model is ``"smollm2"``)::

  from proxjax.pruning.methods import PruneConfig
  from proxjax.workflows.config import CalibrationConfig, EvalConfig, PruneJob
  from proxjax.workflows.prune import prune

  report = prune(PruneJob("smollm2", "out/prox", PruneConfig.from_options("prox", budget=300),
                          calibration=CalibrationConfig(nsamples=32, seqlen=512), eval=EvalConfig("lee")))
  report["summary"], report["eval"]["ppl"]
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

from proxjax import data, pipeline
from proxjax.core import distributed, files
from proxjax.models import LlamaConfig
from proxjax.models.hf import checkpoint_fingerprint
from proxjax.pipeline import memory, report as plots
from proxjax.workflows import common
from proxjax.workflows.config import PruneJob

__all__ = ["dry_run", "prune"]


def prune(job: PruneJob) -> dict[str, Any]:
  """Runs ``job``: writes the pruned checkpoint (with ``proxjax.json`` provenance), ``proxjax-report.json`` and
  ``proxjax-layer-losses.png``; resumes from the state directory of an interrupted run. Returns the report.

  Across processes (:mod:`proxjax.core.distributed`) every process runs this with the same job: each reads the
  checkpoint and the calibration text and keeps its devices' shards; calibration batches are split over every device
  and Hessians summed by the compiled programs; process 0 writes the checkpoint, then the report and the plot, the
  others waiting for it. The resume state (default ``OUT_DIR.proxjax-state``) then needs a file system every process
  shares: process 0 writes each finished block and every process resumes from the same one
  (:func:`proxjax.pipeline.prune_model`); without one, no state is kept (said on stderr), or the rerun of a run whose
  state only process 0 sees is refused."""
  return common.resumable(job, _prune)


def _prune(job: PruneJob, model_dir: str, out_dir: str, state_dir: str) -> dict[str, Any]:
  cfg, cal = job.prune, job.calibration
  mesh = common.mesh_of(job.mesh)
  processes = distributed.process_count()
  t0 = time.perf_counter()
  model = common.load_model(model_dir, mesh, job.offload)
  tokenizer = data.load_tokenizer(model_dir)
  documents = data.load_documents(cal.source, split="calibration", max_documents=cal.max_documents)
  ids = data.calibration_windows(tokenizer, documents, nsamples=cal.nsamples, seqlen=cal.seqlen, seed=cal.seed,
                                 mode=cal.mode)
  calibration = {"source": cal.source, "split": "calibration", "mode": cal.mode, "documents": len(documents),
                 "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "tokens": int(ids.size),
                 "seed": cal.seed}
  rule = getattr(cfg.method, "schedule_rule", None)  # the prox's schedule with its defaults resolved
  print(f"proxjax {common.VERSION}: pruning {model_dir} with {cfg.method_name} (refine {cfg.refine_kind}, "
        f"{cfg.method}{'' if rule is None else f'; schedule {rule}'}); calibration {calibration}", file=sys.stderr)
  common.say_if_resuming(state_dir)
  result = pipeline.prune_model(
      model, ids, cfg, true_sequential=job.true_sequential, include=job.include, ignore=job.ignore,
      batch_size=job.batch_size, state_dir=state_dir, progress=job.progress,
      run_info={"model_dir": os.path.abspath(model_dir), "checkpoint": checkpoint_fingerprint(model_dir)},
      mesh=mesh, offload=job.offload)
  provenance = {
      "proxjax_version": common.VERSION, "source_model": os.path.abspath(model_dir), "method": cfg.method_name,
      "refine": cfg.refine_kind, "n": cfg.n, "m": cfg.m, "config": cfg.to_dict(),
      **({} if rule is None else {"schedule": rule}),
      "true_sequential": job.true_sequential, "include": job.include, "ignore": job.ignore,
      "calibration": calibration, "resumed_blocks": result.resumed_blocks, "seconds": time.perf_counter() - t0,
      "mesh": None if mesh is None else dict(mesh.shape), "offload": job.offload,
      **({"processes": processes} if processes > 1 else {}),
  }
  losses = np.array([r.loss_after_refine for r in result.layers], float)
  summary = {"linears": len(result.layers),
             "mean_relative_local_loss": float(losses.mean()) if losses.size else None,
             "max_relative_local_loss": float(losses.max()) if losses.size else None}
  common.save(model, out_dir, source_dir=model_dir, metadata=provenance, overwrite=job.out_dir.overwrite,
              kept=f"every pruned block is kept in {state_dir}: free space and rerun the same command to resume "
                   "(no block is pruned again)")
  full = {**provenance, "summary": summary, "layers": [r._asdict() for r in result.layers]}
  if job.eval is not None:
    eval_data = common.evaluation_data(model_dir, job.eval)
    ppl = common.perplexity(model, eval_data, job.eval.batch_size, job.progress, mesh=None if job.offload else mesh)
    full["eval"] = {"dataset": job.eval.dataset, "ppl": ppl.ppl, "nll": ppl.nll,
                    "predicted_tokens": ppl.predicted_tokens, "windows": ppl.windows, "seqlen": ppl.seqlen,
                    "protocol": dict(eval_data.protocol)}
  report_path = job.out_dir.report or os.path.join(out_dir, "proxjax-report.json")

  def write_report() -> None:
    files.write_json(report_path, full)
    if result.layers:
      label = f"{cfg.method_name}+{cfg.refine_kind}" if cfg.refine_kind else cfg.method_name
      plots.plot_layer_losses({label: full["layers"]}, job.plot or os.path.join(out_dir, "proxjax-layer-losses.png"),
                              title=f"{os.path.basename(model_dir.rstrip(os.sep))}: relative local loss")
    common.finish_state(job.out_dir, state_dir)  # process 0 alone, the others waiting (write_once)

  common.write_once(write_report, f"writing the report {report_path}")
  full["report_path"] = report_path
  return full


def dry_run(job: PruneJob, *, flops_per_s: float | None = None, bytes_per_s: float | None = None) -> str:
  """The memory and time model of ``job`` as a table (:func:`proxjax.pipeline.memory.estimate`); nothing is loaded
  but ``config.json``."""
  model_dir = common.model_dir(job.model)
  mesh = common.mesh_of(job.mesh)
  cal = job.calibration
  est = memory.estimate(
      LlamaConfig.from_dir(model_dir), nsamples=cal.nsamples, seqlen=cal.seqlen, method=job.prune,
      batch_size=job.batch_size, true_sequential=job.true_sequential, offload=job.offload,
      model_devices=mesh.shape["model"] if mesh is not None else 1,
      data_devices=mesh.shape["data"] if mesh is not None else 1, flops_per_s=flops_per_s, bytes_per_s=bytes_per_s)
  head = (f"dry run: {model_dir}, {job.prune.method_name}, calibration {cal.nsamples} x {cal.seqlen}, batch "
          f"{job.batch_size}, mesh {dict(mesh.shape) if mesh is not None else 'none (one device)'}, offload "
          f"{job.offload}")
  return head + "\n" + memory.format_estimate(est)
