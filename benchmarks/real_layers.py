"""Prox quality per cost on REAL layer statistics: every method and prox variant on the same kernels and Hessians.

For a few decoder blocks of SmolLM2-135M, the kernels of all 7 projections and their ``H = XXᵀ/n`` are taken from
the **dense** model (:func:`proxjax.pipeline.layer_statistics`; calibration: offline Wikipedia calibration articles,
packed, seed 0), so every method solves the same problems with no sequential drift. Each method prunes every
projection; reported per projection type (mean over the blocks): the relative local loss ``tr((V−W)H(V−W)ᵀ)/tr(WHWᵀ)``
after refinement, and per method the total wall time relative to Wanda's and to SparseGPT + CG's, measured side by
side in this run. Every method is compiled first (one warm-up call per method and layer shape, with
``refine_steps=1``: the same executables; the prox runs its whole loop, which also compiles the narrower loops
it goes on with as columns stop), so times exclude compiles.

Methods (``--methods``, default all but ``prox-paced-K``, ``prox-shared``, ``prox-interleaved``, ``prox-noshort``
and ``prox-paper``,
which alone takes ~20 minutes on 2 CPU cores):

* ``wanda``, ``sparsegpt+cg``: the references.
* ``prox`` the library default (FISTA, ``lam0_relative=1e-4``, ``budget=150`` paced by the state, ``pace=0.01``,
  the column stop; docs/method.md, "Acceleration", "Schedule and iteration estimate" and "The prox method").
* ``prox-geometric``: the default until 2026-12-05, ``lam0_relative=1e-3``, ``budget=200``, ``λ₀ β^k`` (no pacing).
* ``prox-fista-K``: FISTA with ``budget=K`` (K in ``--budgets``; ``λ₀`` from ``--lam0-relative``, else the
  default's), the geometric schedule ``λ₀ β^k``: the frontier of loss vs time.
* ``prox-paced-K``: ``prox-fista-K`` with the schedule paced by the state (``pace``, ``--pace``, default 0.01;
  docs/method.md, "Schedule and iteration estimate"); not in the default list.
* ``prox-plain-300``: plain proximal gradient, ``lam0_relative=1e-3``, ``budget=300``, geometric (the earlier fast
  setting).
* ``prox-paper``: the paper's schedule (``λ₀ = 0.01``, ``β = 1.01``, plain, every column until the whole kernel is
  2:4; 1000–1800 iterations per layer).
* ``prox-f32``: the default with the loop's gradient matmul in float32 (``grad_dtype="float32"``, the default until
  2026-12-05; the default rounds its operands to bfloat16 and accumulates in float32).
* ``prox-allcols``: the default with ``column_stop=False``: every column runs until the whole kernel is 2:4 (the
  default until 2026-12-04).
* ``prox-nocert``: the default without the 2-sparse certificate in the loop (every iteration runs the Newton solve
  on every group; ``proxjax.pruning.pruner.CERTIFY`` set to ``Certify(capacity=0)``): the same iterates up to
  float rounding, to time the certificate.
* ``prox-noshort``: the default without the prox's short program in the loop's early iterations
  (``Certify(short_from=2.0)``: every group by the full Newton program while the list cannot hold the uncertified
  ones; docs/method.md, "A short program for the strongly convex regime"): the same iterates up to float rounding,
  to time the short program.
* ``prox-interleaved``: the default with the loop on the kernel's own rows instead of planar ones (the loop before
  2026-12-05; docs/method.md, "The prox method"): the same iterates up to the matmul's rounding, to time the layout.
* ``prox-shared``: the default, but the linears that share an input (and so ``H``) pruned as one kernel: q|k|v and
  gate|up concatenated along the output axis, one ``prune_kernel`` call each (one set-up, one loop that runs until
  the last group of all of them is 2:4, ``κ`` the quantile over all their groups); each projection's loss is then
  computed on its own columns.

Run from the repository root (after ``bash setup.sh``; converts the bundled model on first use)::

  python benchmarks/real_layers.py                          # CPU: blocks 0 15 29, ~9 min on 2 cores
  python benchmarks/real_layers.py --methods wanda sparsegpt+cg prox prox-paper   # with the paper's schedule
  python benchmarks/real_layers.py --blocks 15 --cache /tmp/b15.npz --methods wanda sparsegpt+cg prox prox-shared

``--gpu`` runs the same comparison on one 7B-shaped block (LLaMA-2 7B: 4096 → 4096 / 11008; synthetic kernels and
Hessians from ``benchmarks/scale_blocks.py``'s generator, since no checkpoint reaches the GPU machine), for when an
accelerator is lent::

  python benchmarks/real_layers.py --gpu --methods wanda sparsegpt+cg prox prox-fista-50 prox-paper
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

import proxjax
from proxjax.pruning import pruner

NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")


def methods(budgets: list[int], pace: float = 0.01, lam0_relative: float | None = None
            ) -> dict[str, tuple[str, str | None, dict[str, Any]]]:
  """label -> (prune_kernel method, refine, options)."""
  out = {"wanda": ("wanda", None, {}), "sparsegpt+cg": ("sparsegpt", "cg", {}), "prox": ("prox", "cg", {})}
  start = {} if lam0_relative is None else {"lam0_relative": lam0_relative}
  for k in budgets:
    out[f"prox-fista-{k}"] = ("prox", "cg", {"budget": k, "pace": 0.0, **start})
    out[f"prox-paced-{k}"] = ("prox", "cg", {"budget": k, "pace": pace, **start})
  out["prox-plain-300"] = ("prox", "cg", {"budget": 300, "accelerate": False, "lam0_relative": 1e-3, "pace": 0.0})
  out["prox-geometric"] = ("prox", "cg", {"budget": 200, "lam0_relative": 1e-3, "pace": 0.0})
  out["prox-paper"] = ("prox", "cg", {"lam0": 0.01, "beta": 1.01, "accelerate": False, "column_stop": False})
  out["prox-allcols"] = ("prox", "cg", {"column_stop": False})
  out["prox-f32"] = ("prox", "cg", {"grad_dtype": "float32"})
  out["prox-shared"] = ("prox", "cg", {SHARED: True})
  out["prox-nocert"] = ("prox", "cg", {CERTIFY: pruner.Certify(capacity=0.0)})
  out["prox-noshort"] = ("prox", "cg", {CERTIFY: pruner.Certify(short_from=2.0)})
  out["prox-interleaved"] = ("prox", "cg", {INTERLEAVED: True})
  return out


CERTIFY = "_certify"  # the default prox run with other certificate settings (proxjax.pruning.pruner.Certify)


@contextlib.contextmanager
def certificate(settings: Any = None) -> Iterator[None]:
  """The prox loop's certificate settings (``pruner.CERTIFY``) replaced by ``settings`` (``None``: as they are) for
  the duration (restored afterwards)."""
  saved = pruner.CERTIFY
  pruner.CERTIFY = saved if settings is None else settings
  try:
    yield
  finally:
    pruner.CERTIFY = saved


INTERLEAVED = "_interleaved"  # marks the default prox run with the loop on the kernel's own (interleaved) rows


@contextlib.contextmanager
def loop_rows(planar: bool) -> Iterator[None]:
  """The prox loop on planar rows (as it is) or on the kernel's own interleaved rows (the loop's static ``planar``
  option, which ``prune_kernel`` leaves at its default), for the duration (restored afterwards)."""
  saved = pruner.prox_loop_statics
  if not planar:
    pruner.prox_loop_statics = lambda *args, **kwargs: {**saved(*args, **kwargs), "planar": False}
  try:
    yield
  finally:
    pruner.prox_loop_statics = saved


SHARED = "_shared"  # marks a variant that prunes the linears sharing an input as one kernel
GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def shared_units(layers: dict[tuple[int, str], Any]) -> list[tuple[list[tuple[int, str]], Any, Any]]:
  """The layers as pruning units: (keys, concatenated kernel, H), one unit per group of linears sharing an input."""
  units, done = [], set()
  for key in layers:
    if key in done:
      continue
    block, name = key
    group = next((g for g in GROUPS if name in g), (name,))
    keys = [(block, n) for n in group if (block, n) in layers]
    done.update(keys)
    units.append((keys, jax.numpy.concatenate([layers[k][0] for k in keys], axis=1), layers[key][1]))
  return units


def prune_shared(layers: dict[tuple[int, str], Any], options: dict[str, Any], units: list[Any] | None = None
                 ) -> dict[tuple[int, str], tuple[float, int, int]]:
  """Prunes every unit of :func:`shared_units` with the prox (CG refinement); per layer (loss, iterations, CG steps)."""
  done = [(keys, hess, proxjax.prune_kernel(kernel, hess, "prox", refine="cg", **options))
          for keys, kernel, hess in units or shared_units(layers)]
  return _split_losses(layers, done)


def _split_losses(layers: dict[tuple[int, str], Any], done: list[Any]) -> dict[tuple[int, str], tuple[float, int, int]]:
  out = {}
  for keys, hess, res in done:
    start = 0
    for key in keys:
      width = layers[key][0].shape[1]
      loss = float(proxjax.relative_local_loss(res.kernel[:, start:start + width], layers[key][0], hess))
      out[key] = (loss, res.info.iterations, res.info.refine_steps)
      start += width
  return out


def smollm2_layers(blocks: list[int], nsamples: int, seqlen: int, seed: int) -> dict[tuple[int, str], Any]:
  from proxjax import data  # pylint: disable=import-outside-toplevel
  from proxjax.models import load_pretrained  # pylint: disable=import-outside-toplevel
  from proxjax.models.convert import default_model_dir  # pylint: disable=import-outside-toplevel
  from proxjax.pipeline import layer_statistics  # pylint: disable=import-outside-toplevel
  model_dir = default_model_dir()
  tok = data.load_tokenizer(model_dir)
  ids = data.calibration_windows(tok, data.load_documents("wiki", split="calibration"), nsamples=nsamples,
                                 seqlen=seqlen, seed=seed)
  return layer_statistics(load_pretrained(model_dir), ids, blocks)


def synthetic_7b_layers(seed: int, tokens: int) -> dict[tuple[int, str], Any]:
  """One LLaMA-2-7B-shaped block: bf16 kernels N(0, 0.02²), H from scale_blocks' low-rank + outlier generator."""
  sys.path.insert(0, os.path.dirname(__file__))
  import scale_blocks as sb  # pylint: disable=import-outside-toplevel
  args = sb.build_parser().parse_args(["--model", "7b", "--tokens", str(tokens), "--seed", str(seed)])
  lin = sb.linears(sb.MODELS["7b"])
  hessians: dict[str, Any] = {}
  out = {}
  for short, name in zip(sb.LINEARS, NAMES):
    spec = lin[short]
    if spec["input"] not in hessians:
      hessians[spec["input"]], _ = sb.measure_hessian(spec["input"], spec["d_in"], args, None, None, set())
    kernel = sb.random_kernel(jax.random.key(sb._seed(seed, short)), (spec["d_in"], spec["d_out"]),  # pylint: disable=protected-access
                              "normal", 0.02)
    out[(0, name)] = (kernel, hessians[spec["input"]])
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--blocks", type=int, nargs="+", default=[0, 15, 29])
  p.add_argument("--nsamples", type=int, default=16)
  p.add_argument("--seqlen", type=int, default=512)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--budgets", type=int, nargs="*", default=[50, 100, 300], help="prox-fista-K variants")
  p.add_argument("--pace", type=float, default=0.01, help="prox-paced-K variants: the schedule's pace")
  p.add_argument("--lam0-relative", type=float, help="prox-fista-K and prox-paced-K variants: λ₀ relative to the "
                 "layer (default: the library's, 1e-4)")
  p.add_argument("--methods", nargs="+", help="labels to run (default: all but prox-paper, prox-shared, "
                 "prox-interleaved, prox-noshort and prox-paced-K)")
  p.add_argument("--gpu", action="store_true", help="one synthetic LLaMA-2-7B-shaped block instead of SmolLM2")
  p.add_argument("--tokens", type=int, default=131072, help="--gpu: calibration tokens per input")
  p.add_argument("--rounds", type=int, default=1, help="run every method this many times, interleaved; the table "
                 "uses each method's fastest round")
  p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                 help="wall time, or the process's CPU time (robust to other jobs on the machine; with XLA:CPU "
                 "single-threaded, XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1', "
                 "it measures each method's work)")
  p.add_argument("--cache", help="an .npz file: the layers are read from it if it exists, else computed and saved "
                 "there")
  args = p.parse_args()

  table = methods(args.budgets, args.pace, args.lam0_relative)
  labels = args.methods or [label for label in table
                             if label not in ("prox-paper", "prox-shared", "prox-interleaved", "prox-noshort")
                             and not label.startswith("prox-paced")]
  unknown = [label for label in labels if label not in table]
  if unknown:
    p.error(f"unknown methods {unknown}; choose from {list(table)}")
  for ref in ("wanda", "sparsegpt+cg"):
    if ref not in labels:
      labels.insert(0, ref)
  if args.gpu:
    layers = synthetic_7b_layers(args.seed, args.tokens)
    print(f"one LLaMA-2-7B-shaped block (synthetic, seed {args.seed}, {args.tokens} tokens per input) on "
          f"{jax.devices()[0].device_kind}")
  elif args.cache and os.path.exists(args.cache):
    with np.load(args.cache) as saved:
      layers = {(b, n): (jax.numpy.asarray(saved[f"{b}/{n}/k"]), jax.numpy.asarray(saved[f"{b}/{n}/h"]))
                for b in args.blocks for n in NAMES}
  else:
    layers = smollm2_layers(args.blocks, args.nsamples, args.seqlen, args.seed)
    if args.cache:
      np.savez(args.cache, **{f"{b}/{n}/{x}": np.asarray(v) for (b, n), pair in layers.items()
                              for x, v in zip("kh", pair)})
  if not args.gpu:
    print(f"SmolLM2-135M-Instruct (dequantized Q4_1), blocks {args.blocks}, calibration wiki {args.nsamples}×"
          f"{args.seqlen} packed seed {args.seed}; H from the dense model for all methods; {jax.devices()[0]}")
  blocks = sorted({b for b, _ in layers})

  results: dict[tuple[str, tuple[int, str]], Any] = {}
  rounds: dict[str, list[float]] = {label: [] for label in labels}
  seconds: dict[str, float] = {}
  for r in range(args.rounds):  # every round runs every method once: the methods are timed interleaved
    for label in labels:
      method, refine, options = table[label]
      with certificate(options.get(CERTIFY)), loop_rows(not options.get(INTERLEAVED)):
        rounds[label].append(run_method(label, method, refine, options, layers, results, warm_up=r == 0,
                                        clock=CLOCKS[args.clock]))
      seconds[label] = min(rounds[label])
      print(f"  done {label} in {rounds[label][-1]:.1f} s (round {r + 1})", flush=True)
      if label not in ("wanda", "sparsegpt+cg") and r == args.rounds - 1:
        table_of(labels[:labels.index(label) + 1], table, layers, blocks, results, seconds)
  if args.rounds > 1:
    print("\nseconds per round (the table uses each method's fastest): "
          + "; ".join(f"{label} " + " ".join(f"{t:.1f}" for t in rounds[label]) for label in labels))


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def run_method(label: str, method: str, refine: str | None, options: dict[str, Any], layers: dict[Any, Any],
               results: dict[Any, Any], warm_up: bool, clock: Any = time.perf_counter) -> float:
  """Prunes every layer with one method (compiled first when ``warm_up``); stores its rows, returns the seconds
  (of ``clock``)."""
  shared = bool(options.get(SHARED))
  options = {k: v for k, v in options.items() if k not in (SHARED, CERTIFY, INTERLEAVED)}
  if shared:
    units = shared_units(layers)
    seen = set()
    for _, kernel, hess in units:  # compile once per shape
      if warm_up and kernel.shape not in seen:
        seen.add(kernel.shape)
        jax.block_until_ready(proxjax.prune_kernel(kernel, hess, "prox", refine="cg", refine_steps=1,
                                                   **options).kernel)
    t0 = clock()
    done = [(keys, hess, proxjax.prune_kernel(kernel, hess, "prox", refine="cg", **options))
            for keys, kernel, hess in units]
    jax.block_until_ready([res.kernel for _, _, res in done])
    took = clock() - t0  # the losses below are not timed (their compiles would count)
    for key, row in _split_losses(layers, done).items():
      results[(label, key)] = row
    return took
  warm = {**options, **({"refine_steps": 1} if refine else {})}
  seen = set()
  for kernel, hess in layers.values():
    if warm_up and kernel.shape not in seen:  # compile once per shape (traced options: the same executables)
      seen.add(kernel.shape)
      jax.block_until_ready(proxjax.prune_kernel(kernel, hess, method, refine=refine, **warm).kernel)
  t0 = clock()
  for key, (kernel, hess) in layers.items():
    res = proxjax.prune_kernel(kernel, hess, method, refine=refine, **options)
    results[(label, key)] = (res.info.loss_after_refine, res.info.iterations, res.info.refine_steps)
  return clock() - t0


def table_of(labels: list[str], table: dict[str, Any], layers: dict[Any, Any], blocks: list[int],
             results: dict[Any, Any], seconds: dict[str, float]) -> None:
  """Prints the table of the methods run so far (after each one: a long run that is stopped keeps its rows)."""
  print(f"\nrelative local loss after refinement, mean over blocks {blocks} (lower is better); times measured in "
        "this run, compiles excluded")
  head = "| method | " + " | ".join(n.split(".")[1] for n in NAMES) + " | mean | time / Wanda | time / SparseGPT+CG |"
  print(head + " prox iterations |")
  print("|" + "---|" * (len(NAMES) + 5))
  for label in labels:
    row = [np.mean([results[(label, (b, n))][0] for b in blocks]) for n in NAMES]
    its = [results[(label, k)][1] for k in layers]
    print(f"| {label} | " + " | ".join(f"{v:.4f}" for v in row) + f" | {np.mean(row):.4f} | "
          f"{seconds[label] / seconds['wanda']:.1f} | {seconds[label] / seconds['sparsegpt+cg']:.2f} | "
          + (f"{min(its)}–{max(its)} |" if table[label][0] == "prox" else "– |"), flush=True)


if __name__ == "__main__":
  main()
