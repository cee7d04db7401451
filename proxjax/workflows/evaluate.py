"""The evaluation workflow: perplexity of a checkpoint on held-out text, with the protocol and the checkpoint's
provenance (docs/method.md, "Evaluation protocol").

Example::

  from proxjax.workflows.config import EvalConfig, EvalJob
  from proxjax.workflows.evaluate import evaluate
  result, text = evaluate(EvalJob("out/prox", EvalConfig("lee", seqlen=512), json="ppl.json"))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from proxjax.core import files
from proxjax.pipeline import evaluate as ev
from proxjax.workflows import common
from proxjax.workflows.config import EvalJob

__all__ = ["evaluate", "evaluate_tasks"]


def evaluate(job: EvalJob) -> tuple[dict[str, Any], str]:
  """Runs ``job``: returns the result (also written to ``job.json`` when given) and the printed report.

  Across processes (:mod:`proxjax.core.distributed`) every process reads the checkpoint and the text, keeps its
  devices' shards and feeds its devices' rows of each batch of windows; every process returns the same perplexity and
  process 0 alone writes ``job.json``."""
  model_dir = common.model_dir(job.model)
  mesh = common.mesh_of(job.mesh)
  model = common.load_model(model_dir, mesh)
  eval_data = common.evaluation_data(model_dir, job.eval)
  result = common.perplexity(model, eval_data, job.eval.batch_size, job.progress, mesh=mesh)
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
    common.write_once(lambda: files.write_json(job.json, out), f"writing {job.json}")
  return out, ev.format_report(result, protocol, **extra)


def evaluate_tasks(model: str, tasks: Sequence[str], *, num_fewshot: int | None = None, limit: int | None = None,
                   batch_size: int = 8, include_path: str | None = None, json: str | None = None,
                   mesh: str | None = None) -> tuple[dict[str, Any], str]:
  """``proxjax eval --tasks``: lm-eval's results for ``tasks`` on the checkpoint ``model`` through the ``proxjax``
  backend (:mod:`proxjax.pipeline.harness`, no torch), also written to ``json`` (atomically), and lm-eval's table.

  With ``mesh`` (a ``--mesh`` value; ``auto`` when several processes run together) the model is placed on that mesh
  and every batch is split over its devices. Across processes (:mod:`proxjax.core.distributed`) every process runs
  lm-eval with the same requests and scores every batch together with the others (the backend's module docstring
  says why), so every process returns the same results; process 0 alone writes ``json``.

  Raises:
    ValueError: lm-eval is not installed; ``model`` is not a checkpoint; a task lm-eval does not know (with close
      names); a missing ``include_path``; ``limit < 1``; a task's dataset cannot be fetched (with how to use local
      copies).
  """
  if limit is not None and limit < 1:
    raise ValueError(f"--limit must be at least 1, got {limit}")
  model_dir = common.model_dir(model)
  if not os.path.isfile(os.path.join(model_dir, "config.json")):
    raise ValueError(f"{model_dir}: not a Hugging Face checkpoint directory (no config.json)")
  try:
    from proxjax.pipeline import harness  # pylint: disable=import-outside-toplevel  (lm-eval is an optional extra)
  except ImportError as err:
    raise ValueError(str(err)) from None
  from lm_eval.utils import make_table  # pylint: disable=import-outside-toplevel
  manager = harness.check_tasks(tasks, include_path)
  lm = harness.ProxjaxLM(pretrained=model_dir, batch_size=batch_size, mesh=common.mesh_of(mesh))
  out = harness.run_tasks(lm, tasks, manager, num_fewshot=num_fewshot, limit=limit)
  out["model"] = os.path.abspath(model_dir)
  out["compiles"] = lm.compiles
  out.update(common.processes())
  if json:
    common.write_once(lambda: files.write_json(json, out), f"writing {json}")
  text = make_table(out) + (make_table(out, "groups") if out.get("groups") else "")
  return out, text
