"""The evaluation workflow: perplexity of a checkpoint on held-out text, with the protocol and the checkpoint's
provenance (docs/method.md, "Evaluation protocol").

Example::

  from proxjax.workflows.config import EvalConfig, EvalJob
  from proxjax.workflows.evaluate import evaluate
  result, text = evaluate(EvalJob("out/prox", EvalConfig("lee", seqlen=512), json="ppl.json"))
"""

from __future__ import annotations

import os
from typing import Any

from proxjax.core import files
from proxjax.pipeline import evaluate as ev
from proxjax.workflows import common
from proxjax.workflows.config import EvalJob

__all__ = ["evaluate"]


def evaluate(job: EvalJob) -> tuple[dict[str, Any], str]:
  """Runs ``job``: returns the result (also written to ``job.json`` when given) and the printed report."""
  model_dir = common.model_dir(job.model)
  model = common.load_model(model_dir, common.mesh_of(job.mesh))
  eval_data = common.evaluation_data(model_dir, job.eval)
  result = common.perplexity(model, eval_data, job.eval.batch_size, job.progress)
  protocol = dict(eval_data.protocol)
  provenance = common.provenance(model_dir)
  extra: dict[str, Any] = {"model": os.path.abspath(model_dir)}
  if provenance:
    extra.update(method=provenance.get("method"), refine=provenance.get("refine"),
                 config=provenance.get("config", provenance.get("options")),
                 calibration=provenance.get("calibration"))
  else:
    extra.update(method="dense (no proxjax.json)")
  out = {"ppl": result.ppl, "nll": result.nll, "tokens": result.predicted_tokens,
         "predicted_tokens": result.predicted_tokens, "windows": result.windows, "seqlen": result.seqlen,
         "dataset": job.eval.dataset, "protocol": protocol, **extra}
  if job.json:
    files.write_json(job.json, out)
  return out, ev.format_report(result, protocol, **extra)
