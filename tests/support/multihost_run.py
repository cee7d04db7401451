"""One process of the multi-process tests (tests/test_multihost.py): run with 2 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``, set by the caller before JAX is imported).

``python -m tests.support.multihost_run cli ARGS...``: the ``proxjax`` command line, exit code as its own.

``python -m tests.support.multihost_run stop SAVES ARGS...``: the ``proxjax`` command line, stopped right after its
``SAVES``-th resume-state save has returned (a finished block of ``prune``, a training save of ``finetune``,
``proxsparse`` or ``prosparse``): it prints ``stopped after save SAVES`` and exits with :data:`STOPPED` at once
(``os._exit``: no cleanup, as a killed job).

``python -m tests.support.multihost_run join ARGS...``: joins the other processes as ``proxjax ARGS...`` would (the
same arguments compared), prints ``joined`` and waits to be killed.

``python -m tests.support.multihost_run detect OUT.json ARGS...``: joins as ``proxjax ARGS...`` would (e.g. with
``--coordinator auto`` and SLURM's environment variables) and writes its process index, the process count and the
global device count to ``OUT.json``.

``python -m tests.support.multihost_run session PROCESS_ID PORT WORK CHECKPOINT CORPUS``: the session of checks one
pair of processes runs together (one JAX start-up for all of them), writing its results under ``WORK``:

1. ``proxjax prune CHECKPOINT WORK/wanda --method wanda ...`` across the two processes (process 0 writes);
2. ``proxjax eval WORK/wanda --json WORK/eval.json`` across them, then ``proxjax prune ... --offload`` (Wanda) into
   ``WORK/offloaded-wanda`` (the model in each process's host memory, one block on the global mesh at a time);
3. :func:`proxjax.pipeline.prune_model` with magnitude on the checkpoint loaded onto the 4-device global mesh (the
   tensor blocks the load read, :func:`tests.support.reads.recording`, written to ``WORK/reads-{PROCESS_ID}.json``):
   each process gathers the pruned kernels and writes ``WORK/magnitude-{PROCESS_ID}.npz``; with ``state_dir=WORK/state`` (process 0 writes each block), then again from that state (every block resumed);
4. :func:`proxjax.core.distributed.on_coordinator` with a writer that fails (on process 0), and ``prune_model``
   with a state only process 0 sees (``WORK/state`` moved to ``WORK/state-0``, each process given
   ``WORK/state-{PROCESS_ID}``: refused);
5. ``WORK/session-{PROCESS_ID}.json``: what it ran, the failure each process saw, its CPU seconds, wall time and
   compiles per step.

``python -m tests.support.multihost_run train PROCESS_ID PORT WORK CHECKPOINT CORPUS PRUNED``: the training commands
across the pair: ``proxjax finetune PRUNED WORK/finetune`` (:data:`FINETUNE`: one step), ``proxjax proxsparse
CHECKPOINT WORK/proxsparse`` (:func:`proxsparse_args`: two steps, the first at learning rate 0) and ``proxjax
prosparse CHECKPOINT WORK/prosparse`` (:data:`PROSPARSE`, its state kept in ``WORK/kept-prosparse-state``), the
same again into ``WORK/cached-prosparse`` with a state directory holding that run's ``eval-before.json`` with the
perplexity set to :data:`CACHED_PPL` (written by process 0), then :func:`proxsparse_run` (the Python API, the same two
steps) on the 4-device global mesh, writing the gathered learned parameters to ``WORK/api-proxsparse-{PROCESS_ID}.npz``
and the per-step histories to ``WORK/api-proxsparse-{PROCESS_ID}.json``.

``python -m tests.support.multihost_run tasks PROCESS_ID PORT WORK CHECKPOINT TASK_DIR``: ``proxjax eval CHECKPOINT
--tasks`` (:data:`TASKS`, with ``--include-path TASK_DIR``) across the pair, writing ``WORK/tasks.json``; then, in the
same processes, :func:`harness_requests` with the backend on the 4-device global mesh, each process writing what it
computed to ``WORK/harness-{PROCESS_ID}.json``.

``python -m tests.support.multihost_run methods PROCESS_ID PORT WORK CHECKPOINT CORPUS M1,M2``: joins (Python API),
then :func:`proxjax.pipeline.prune_model` with each method on the global mesh; writes ``WORK/{M}-{PROCESS_ID}.npz``
(the kernels) and ``WORK/{M}-{PROCESS_ID}.json`` (each layer's relative local loss).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import resource
import sys
import time
from typing import Any

ARGS = ("--calibration", "{corpus}/calib.txt", "--nsamples", "6", "--seqlen", "32", "--batch-size", "4", "--quiet")
"""The calibration of tests/support/cli.py's ``prune_cli`` (the single-process reference), as a template."""

FINETUNE = ("--train", "{corpus}/calib.txt", "--steps", "1", "--batch-size", "4", "--seqlen", "32", "--lr", "1e-3",
            "--quiet")
"""``proxjax finetune`` arguments: one step of 4 windows of 32 tokens (one row per device of the 4-device mesh)."""

PROXSPARSE = dict(steps=2, lam1=0.1, lam_relative=True, learning_rate=1e-2, lam2=0.1, batch_size=4)
"""ProxSparse settings of :func:`proxsparse_run` and :func:`proxsparse_args`: two steps (the first at learning rate 0,
the warm-up's: prox only; the second with the full rate) of 4 pieces of 32 tokens."""

PROSPARSE = ("--train", "{corpus}/calib.txt", "--steps", "2", "--batch-size", "4", "--seqlen", "32", "--lr", "1e-3",
             "--l1-stages", "2:1e-3", "--eval", "{corpus}/eval.txt", "--eval-seqlen", "32", "--max-windows", "8",
             "--quiet")
"""``proxjax prosparse`` arguments: two steps of 4 windows, λ rising to 1e-3, perplexity and sparsity on 8 windows."""

TASKS = ("--tasks", "proxjax_mc,lee_last_word,proxjax_gen", "--limit", "8", "--batch-size", "4", "--quiet")
"""``proxjax eval --tasks`` arguments: a multiple-choice task (loglikelihood), the shipped ``lee_last_word`` (its
perplexity, a bootstrapped standard error) and a generation task (``generate_until``), 8 documents each."""


def harness_requests(checkpoint: str, mesh: Any = None) -> dict[str, Any]:
  """The lm-eval backend (:class:`proxjax.pipeline.harness.ProxjaxLM`, ``max_length`` 48, batches of 4) on
  ``mesh`` or one device: greedy generations of 15 requests (three stop settings, a prompt truncated from the left),
  rolling log-likelihoods of two documents (one of several windows) and the ``(log-likelihood, is greedy)`` of
  continuations of 8 token contexts."""
  import numpy as np  # noqa: PLC0415
  from lm_eval.api.instance import Instance  # noqa: PLC0415

  from proxjax import data  # noqa: PLC0415
  from proxjax.pipeline import harness  # noqa: PLC0415

  lee = data.load_documents("lee", split="all")
  lm = harness.ProxjaxLM(pretrained=checkpoint, batch_size=4, max_length=48, mesh=mesh)
  prompts = ["The government said", "Police", lee[12][:400], "Rain and", "<eos>The"]
  settings = [{"until": ["\n"], "max_gen_toks": 12}, {"until": [" the", "."], "max_gen_toks": 12},
              {"max_gen_toks": 10}]
  generate = [Instance("generate_until", {}, (p, k), i) for i, (p, k) in enumerate((p, k) for k in settings
                                                                                     for p in prompts)]
  rolling = [Instance("loglikelihood_rolling", {}, (s,), i) for i, s in enumerate([lee[2][:900], "x"])]
  rng = np.random.default_rng(0)
  tokens = [(None, rng.integers(1, 320, n).tolist(), rng.integers(1, 320, k).tolist())
            for n, k in [(5, 3), (30, 4), (60, 2), (1, 1), (47, 1), (48, 1), (100, 6), (12, 12)]]
  return {"generate": lm.generate_until(generate, disable_tqdm=True),
          "rolling": lm.loglikelihood_rolling(rolling, disable_tqdm=True),
          "tokens": lm._loglikelihood_tokens(tokens, disable_tqdm=True), "batch_size": lm.batch_size}


STOPPED = 75
"""The exit status of a process stopped by ``stop``."""

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def distributed_flags(process_id: int, port: int, join: int = 60, heartbeat: int = 20) -> list[str]:
  """``--coordinator ... --process-id`` for one of 2 processes on this machine."""
  return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(process_id),
          "--join-timeout", str(join), "--heartbeat-timeout", str(heartbeat)]


def calibration_ids(checkpoint: str, corpus: str) -> Any:
  """The calibration windows ``ARGS`` describe (6 x 32 packed tokens of ``corpus/calib.txt``)."""
  from proxjax import data  # noqa: PLC0415

  documents = data.load_documents(f"{corpus}/calib.txt", split="calibration")
  return data.calibration_windows(data.load_tokenizer(checkpoint), documents, nsamples=6, seqlen=32, seed=0,
                                  mode="packed")


def proxsparse_args(corpus: str) -> list[str]:
  """The ``proxjax proxsparse`` options of :data:`PROXSPARSE` on ``corpus/calib.txt`` cut into 32-token pieces."""
  p = PROXSPARSE
  return ["--train", f"{corpus}/calib.txt", "--split-documents", "--seqlen", "32", "--steps", str(p["steps"]),
          "--lam1", str(p["lam1"]), "--lam-relative", "--lr", str(p["learning_rate"]), "--lam2", str(p["lam2"]),
          "--batch-size", str(p["batch_size"]), "--quiet"]


def proxsparse_run(checkpoint: str, corpus: str, mesh: Any = None) -> Any:
  """:func:`proxjax.training.proxsparse.proxsparse` with :data:`PROXSPARSE` on the checkpoint (float32), on ``mesh``
  or one device, with the documents ``proxjax proxsparse`` would use; returns its result (``return_learned``)."""
  import jax.numpy as jnp  # noqa: PLC0415

  from proxjax import data  # noqa: PLC0415
  from proxjax.core import sharding  # noqa: PLC0415
  from proxjax.models import load_pretrained  # noqa: PLC0415
  from proxjax.training import proxsparse as ps  # noqa: PLC0415

  model = load_pretrained(checkpoint, sharding=None if mesh is None else sharding.checkpoint_sharding(mesh),
                          param_dtype=jnp.float32)
  documents = data.load_documents(f"{corpus}/calib.txt", split="calibration")
  docs = ps.tokenize_documents(data.load_tokenizer(checkpoint), documents, 32, split=True)
  return ps.proxsparse(model, docs, mesh=mesh, progress=False, return_learned=True, **PROXSPARSE)


CACHED_PPL = 12345.0
"""The before-training perplexity ``train`` puts in the cached ``eval-before.json`` of its second ProSparse run."""

HISTORY = ("losses", "regularizer", "lam2_terms", "grad_norms", "fraction_24")
"""The per-step histories of a ProxSparse result the tests compare."""


def by_path(tree: Any) -> dict[str, Any]:
  """``{key path: leaf}`` of a pytree (``jax.tree_util.keystr``)."""
  import jax  # noqa: PLC0415

  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def kernels(model: Any) -> dict[str, Any]:
  """``{"BLOCK.NAME": kernel}`` of every projection."""
  return {f"{b}.{name}": functools.reduce(getattr, name.split("."), block).kernel[...]
          for b, block in enumerate(model.model.layers) for name in LINEARS}


def _pruned_on_mesh(checkpoint: str, corpus: str, method: str, **kwargs: Any) -> tuple[dict[str, Any], Any]:
  """The checkpoint loaded onto the mesh of every process's devices and pruned by ``method``: its kernels (global
  arrays) and the pipeline's result."""
  from proxjax.core import sharding  # noqa: PLC0415
  from proxjax.models import load_pretrained  # noqa: PLC0415
  from proxjax.pipeline import prune_model  # noqa: PLC0415

  mesh = sharding.make_mesh()
  model = load_pretrained(checkpoint, sharding=sharding.checkpoint_sharding(mesh))
  result = prune_model(model, calibration_ids(checkpoint, corpus), method, batch_size=4, mesh=mesh, progress=False,
                       **kwargs)
  return kernels(model), result


def session(process_id: int, port: int, work: str, checkpoint: str, corpus: str) -> int:
  import jax  # noqa: PLC0415

  from proxjax import cli  # noqa: PLC0415

  compiles: list[str] = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **__: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
  t0 = time.perf_counter()
  marks = [(time.perf_counter(), time.process_time(), 0)]

  def mark(step: str) -> None:
    marks.append((time.perf_counter(), time.process_time(), len(compiles)))
    steps.append(step)

  steps: list[str] = []
  flags = distributed_flags(process_id, port)
  done = {"prune": cli.main(["prune", checkpoint, f"{work}/wanda", "--method", "wanda",
                             *(a.format(corpus=corpus) for a in ARGS), *flags])}
  mark("prune")
  if done["prune"] == 0:
    done["eval"] = cli.main(["eval", f"{work}/wanda", "--dataset", f"{corpus}/eval.txt", "--seqlen", "32", "--quiet",
                             "--max-windows", "16", "--json", f"{work}/eval.json", *flags])
    mark("eval")
  # offloaded: the whole model in each process's host memory, one block on the global mesh at a time
  done["offload"] = cli.main(["prune", checkpoint, f"{work}/offloaded-wanda", "--method", "wanda", "--offload",
                              *(a.format(corpus=corpus) for a in ARGS), *flags])
  mark("offload")

  import numpy as np  # noqa: PLC0415

  from proxjax.core import distributed  # noqa: PLC0415

  from tests.support.reads import recording  # noqa: PLC0415

  with recording() as reads:  # what this process reads of the weight files while loading onto the global mesh
    pruned, _ = _pruned_on_mesh(checkpoint, corpus, "magnitude", state_dir=f"{work}/state")
  with open(f"{work}/reads-{process_id}.json", "w") as f:
    json.dump(reads, f)
  sharded = sorted(k for k, v in pruned.items() if not v.is_fully_addressable)
  first = distributed.gather(pruned)
  np.savez(f"{work}/magnitude-{process_id}.npz", **first)
  mark("magnitude")
  resumed, result = _pruned_on_mesh(checkpoint, corpus, "magnitude", state_dir=f"{work}/state")  # from the state
  resumed = distributed.gather(resumed)  # (also: every process has read the state before process 0 moves it below)
  resume = {"resumed_blocks": result.resumed_blocks,
            "equal": sorted(k for k in first if np.array_equal(first[k], resumed[k])) == sorted(first)}
  mark("resume")
  try:  # a writer that fails on process 0: every process raises the same kind of error
    distributed.on_coordinator(lambda: open(f"{work}/no-such-folder/file", "w"), "writing a file")
    failure = None
  except OSError as err:
    failure = f"{type(err).__name__}: {err}"
  # a state only process 0 sees (no shared file system): its finished blocks are moved to state-0, and each process
  # is given state-PROCESS_ID; refused on every process before any work
  distributed.on_coordinator(lambda: os.rename(f"{work}/state", f"{work}/state-0"), "moving the state")
  try:
    _pruned_on_mesh(checkpoint, corpus, "magnitude", state_dir=f"{work}/state-{process_id}")
    refused = None
  except ValueError as err:
    refused = str(err)
  usage = resource.getrusage(resource.RUSAGE_SELF)
  per_step = {s: {"wall_s": b[0] - a[0], "cpu_s": b[1] - a[1], "compiles": b[2] - a[2]}
              for s, a, b in zip(steps, marks, marks[1:])}
  with open(f"{work}/session-{process_id}.json", "w") as f:
    json.dump({"exit": done, "devices": len(jax.devices()), "local_devices": len(jax.local_devices()),
               "processes": jax.process_count(), "sharded_across_processes": sharded, "steps": per_step,
               "failure": failure, "resume": resume, "state_dir": refused,
               "cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": time.perf_counter() - t0}, f)
  return max(done.values())


def train(process_id: int, port: int, work: str, checkpoint: str, corpus: str, pruned: str) -> int:
  import numpy as np  # noqa: PLC0415

  from proxjax import cli  # noqa: PLC0415
  from proxjax.core import distributed, sharding  # noqa: PLC0415

  flags = distributed_flags(process_id, port)
  done = [cli.main(["finetune", pruned, f"{work}/finetune", *(a.format(corpus=corpus) for a in FINETUNE), *flags]),
          cli.main(["proxsparse", checkpoint, f"{work}/proxsparse", *proxsparse_args(corpus), *flags]),
          cli.main(["prosparse", checkpoint, f"{work}/prosparse", *(a.format(corpus=corpus) for a in PROSPARSE),
                    "--state-dir", f"{work}/kept-prosparse-state", "--keep-state", *flags])]
  if done[-1] == 0:  # ProSparse again with a cached before-training evaluation (process 0 writes it): a marked one
    def cache() -> None:
      with open(f"{work}/kept-prosparse-state/eval-before.json") as f:
        saved = json.load(f)
      saved["before"]["ppl"] = CACHED_PPL
      os.makedirs(f"{work}/cached-prosparse-state")
      with open(f"{work}/cached-prosparse-state/eval-before.json", "w") as f:
        json.dump(saved, f)

    distributed.on_coordinator(cache, "writing the cached evaluation")
    done.append(cli.main(["prosparse", checkpoint, f"{work}/cached-prosparse",
                          *(a.format(corpus=corpus) for a in PROSPARSE), "--state-dir",
                          f"{work}/cached-prosparse-state", *flags]))
  result = proxsparse_run(checkpoint, corpus, sharding.make_mesh())
  np.savez(f"{work}/api-proxsparse-{process_id}.npz", **by_path(distributed.gather(result.learned)))
  with open(f"{work}/api-proxsparse-{process_id}.json", "w") as f:
    json.dump({k: getattr(result, k) for k in HISTORY}, f)
  return max(done)


def tasks(process_id: int, port: int, work: str, checkpoint: str, task_dir: str) -> int:
  from proxjax import cli  # noqa: PLC0415
  from proxjax.core import sharding  # noqa: PLC0415

  done = cli.main(["eval", checkpoint, *TASKS, "--include-path", task_dir, "--json", f"{work}/tasks.json",
                   *distributed_flags(process_id, port)])
  with open(f"{work}/harness-{process_id}.json", "w") as f:
    json.dump(harness_requests(checkpoint, sharding.make_mesh()), f)
  return done


def methods(process_id: int, port: int, work: str, checkpoint: str, corpus: str, names: str) -> int:
  import numpy as np  # noqa: PLC0415

  from proxjax.core import distributed  # noqa: PLC0415

  distributed.initialize(distributed.DistributedConfig(f"127.0.0.1:{port}", 2, process_id, join_timeout=60,
                                                       heartbeat_timeout=30), fingerprint=names)
  for method in names.split(","):
    pruned, result = _pruned_on_mesh(checkpoint, corpus, method)
    np.savez(f"{work}/{method}-{process_id}.npz", **distributed.gather(pruned))
    with open(f"{work}/{method}-{process_id}.json", "w") as f:
      json.dump({f"{r.block}.{r.name}": r.loss_after_refine for r in result.layers}, f)
  return 0


def main(argv: list[str]) -> int:
  if argv[0] == "cli":
    from proxjax import cli  # noqa: PLC0415
    return cli.main(argv[1:])
  if argv[0] == "stop":
    from proxjax import cli  # noqa: PLC0415
    from proxjax.pipeline import prune  # noqa: PLC0415
    from proxjax.training import loop  # noqa: PLC0415

    saves, stop_after = [0], int(argv[1])

    def counted(save: Any) -> Any:
      def wrapper(*args: Any, **kwargs: Any) -> Any:
        save(*args, **kwargs)
        saves[0] += 1
        if saves[0] == stop_after:
          print(f"stopped after save {stop_after}", flush=True)
          os._exit(STOPPED)
      return wrapper

    prune._save_block = counted(prune._save_block)
    loop._save_progress = counted(loop._save_progress)
    return cli.main(argv[2:])
  if argv[0] == "join":
    command_line = importlib.import_module("proxjax.cli.main")  # the module (proxjax.cli.main is also the function)
    command_line._join(command_line.build_parser().parse_args(argv[1:]))
    print("joined", flush=True)
    time.sleep(600)
    return 1
  if argv[0] == "detect":
    import jax  # noqa: PLC0415

    command_line = importlib.import_module("proxjax.cli.main")
    command_line._join(command_line.build_parser().parse_args(argv[2:]))
    with open(argv[1], "w") as f:
      json.dump({"process": jax.process_index(), "processes": jax.process_count(), "devices": len(jax.devices())}, f)
    return 0
  if argv[0] == "session":
    process_id, port, work, checkpoint, corpus = argv[1:]
    return session(int(process_id), int(port), work, checkpoint, corpus)
  if argv[0] == "train":
    process_id, port, work, checkpoint, corpus, pruned = argv[1:]
    return train(int(process_id), int(port), work, checkpoint, corpus, pruned)
  if argv[0] == "tasks":
    process_id, port, work, checkpoint, task_dir = argv[1:]
    return tasks(int(process_id), int(port), work, checkpoint, task_dir)
  if argv[0] == "methods":
    process_id, port, work, checkpoint, corpus, names = argv[1:]
    return methods(int(process_id), int(port), work, checkpoint, corpus, names)
  raise SystemExit(f"unknown mode {argv[0]!r}")


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
