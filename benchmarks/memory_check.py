"""Checks :mod:`proxjax.pipeline.memory`'s model against this machine, as ratios predicted / measured.

1. **Memory** (``--configs``): for SmolLM2-135M's configuration (``LlamaConfig.from_dir(default_model_dir())``,
   float32) and a LLaMA-2-7B-shaped one (bfloat16), the predicted bytes live during every compiled piece,
   :func:`proxjax.pipeline.memory.pruner_pieces` (one per distinct kernel shape) and :func:`proxjax.pipeline.memory.block_passes`
   (the propagation forward and each stage's Hessian accumulation), against XLA's ``memory_analysis()`` of the very
   pieces compiled on this backend (:func:`proxjax.pipeline.memory.measure_pruner`, :func:`proxjax.pipeline.memory.measure_block`:
   abstract arguments, nothing allocated). The model is meant to bound XLA from above within 2x (ratios in
   ``[1, 2]``). On a GPU the script also runs one :func:`proxjax.prune_kernel` (setup, prox loop, finish) of a
   4096x11008 layer and compares the predicted live bytes with the allocator's ``peak_bytes_in_use``.
2. **Time** (``--report``): for a pipeline report (``proxjax-report.json``, written by ``proxjax prune``), this
   machine's float32 matmul rate (``Precision.HIGHEST``, ``H̃ @ V`` of the report's largest layer) and memory
   bandwidth (a large elementwise pass) are measured in the same run; with them and each layer's actual
   ``iterations`` and ``refine_steps`` the roofline :func:`proxjax.pipeline.memory.linear_cost` predicts each layer's
   ``seconds``. Printed: predicted / measured per linear type and in total, over all blocks and over blocks >= 1
   (block 0's seconds include the compilation of each new shape), and a second prediction that uses the matmul
   rate measured on each layer's own shape (small layers run far below the machine's large-matmul rate). The report
   must come from this machine (and ideally from an idle one) for the ratios to mean anything.

Run from the repository root (about a minute on 2 CPU cores)::

  python benchmarks/memory_check.py --report runs/prox-cg/proxjax-report.json
  python benchmarks/memory_check.py --configs smollm2          # memory only, SmolLM2
  python benchmarks/memory_check.py --configs none --report R  # time only
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench_pruner import _best  # benchmarks/ is on sys.path when run as a script
from proxjax.pipeline import memory
from proxjax.models import LlamaConfig

_HI = jax.lax.Precision.HIGHEST
_MIB = 2 ** 20
_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, dtype="bfloat16")


def _on_gpu() -> bool:
  return jax.devices()[0].platform in ("gpu", "cuda", "rocm")


# --------------------------------------------------------------------------------------------------- memory --


def _configs(names: list[str]) -> list[tuple[str, LlamaConfig, Any, int, int]]:
  """(label, config, param dtype, batch, seqlen) for each requested configuration."""
  out = []
  for name in names:
    if name == "smollm2":
      from proxjax.models import convert  # pylint: disable=import-outside-toplevel
      cfg = LlamaConfig.from_dir(convert.default_model_dir())
      out.append(("SmolLM2-135M fp32, 8 x 512", cfg, jnp.float32, 8, 512))
    elif name == "7b":
      out.append(("7B-shaped bf16, 8 x 2048", LLAMA2_7B, jnp.bfloat16, 8, 2048))
    elif name != "none":
      raise SystemExit(f"unknown config {name!r}: expected smollm2, 7b or none")
  return out


def _shapes(cfg: LlamaConfig) -> dict[tuple[int, int], list[str]]:
  """Distinct kernel shapes (d_in, d_out) → the linears that have them."""
  q, kv, d, i = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size, \
      cfg.intermediate_size
  out: dict[tuple[int, int], list[str]] = defaultdict(list)
  for name, shape in [("q", (d, q)), ("k", (d, kv)), ("v", (d, kv)), ("o", (q, d)), ("gate", (d, i)), ("up", (d, i)),
                      ("down", (i, d))]:
    out[shape].append(name)
  return dict(out)


def _row(label: str, pred: memory.PieceMemory, meas: memory.CompiledMemory, ratios: list[float]) -> str:
  r = pred.total / meas.total
  ratios.append(r)
  flag = "" if 1.0 <= r <= 2.0 else "   <-- outside [1, 2]"
  return (f"  {label:<44}{r:8.3f}{pred.temps / max(meas.temps, 1):9.3f}{pred.total / _MIB:12.1f}"
          f"{meas.total / _MIB:12.1f}{flag}")


def check_memory(configs: list[str], method: str) -> list[float]:
  """Model vs XLA per compiled piece; returns every ratio predicted/measured."""
  ratios: list[float] = []
  print(f"== memory: predicted / XLA memory_analysis() on {jax.default_backend()} (bytes live during the piece: "
        "arguments + outputs + temporaries)")
  print(f"  {'piece':<44}{'ratio':>8}{'temps':>9}{'pred MiB':>12}{'XLA MiB':>12}")
  for label, cfg, dtype, batch, seqlen in _configs(configs):
    pb = jnp.dtype(dtype).itemsize
    print(f" {label}")
    for (d_in, d_out), names in _shapes(cfg).items():
      pred = memory.pruner_pieces(d_in, d_out, method=method, param_bytes=pb)
      meas = memory.measure_pruner(d_in, d_out, method=method, param_dtype=dtype)
      for piece in meas:
        print(_row(f"{'/'.join(names)} {d_in}x{d_out}: {piece}", pred[piece], meas[piece], ratios))
    pred = memory.block_passes(cfg, batch_size=batch, seqlen=seqlen, param_bytes=pb)
    meas = memory.measure_block(cfg, batch_size=batch, seqlen=seqlen, param_dtype=dtype)
    for key in meas:
      print(_row(f"block {key}", pred[key], meas[key], ratios))
  if ratios:
    print(f"  ratio range {min(ratios):.3f} - {max(ratios):.3f} over {len(ratios)} pieces (the model aims at [1, 2]; "
          "'temps' is the ratio of the temporaries alone)")
  return ratios


def _prune_live_bytes(d_in: int, d_out: int, method: str, pb: int) -> int:
  """Predicted bytes live while :func:`proxjax.prune_kernel` runs on one kernel: the kernel, ``H`` and the largest
  piece with every array the earlier pieces returned (the estimate's ``prune`` phase without weights and states)."""
  refine = "cg" if method == "prox" else None
  held: dict[str, int] = {}
  best = 0
  steps = memory._pruner_steps(d_in, d_out, method, refine, pb, 1)  # pylint: disable=protected-access
  for _, args, outs, temps in steps:
    arrays = {k: v for k, v in {**held, **args}.items() if k not in ("kernel", "H", "pre.hessian", "pre.scale")}
    best = max(best, sum(arrays.values()) + sum(outs.values()) + temps)
    held.update(outs)
  return pb * d_in * d_out + 4 * d_in * d_in + best


def check_gpu_peak() -> float | None:
  """One prune_kernel of a 4096x11008 bf16 layer on the GPU: predicted live bytes / the allocator's peak."""
  import proxjax  # pylint: disable=import-outside-toplevel
  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    print("  (no memory_stats() on this device: skipped)")
    return None
  d_in, d_out, n = 4096, 11008, 8192
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (d_in, n), jnp.float32)
  hessian = jnp.matmul(a, a.T, precision=_HI) / n
  kernel = jax.random.normal(kb, (d_in, d_out), jnp.bfloat16)
  jax.block_until_ready((hessian, kernel))
  del a
  before = jax.devices()[0].memory_stats()
  res = proxjax.prune_kernel(kernel, hessian, "prox", cap=30, refine_steps=10)
  jax.block_until_ready(res.kernel)
  after = jax.devices()[0].memory_stats()
  pred = _prune_live_bytes(d_in, d_out, "prox", 2)
  meas = after["peak_bytes_in_use"]
  print(f"  prune_kernel {d_in}x{d_out} bf16 (prox {res.info.iterations} iterations, CG {res.info.refine_steps} "
        f"steps): predicted / peak_bytes_in_use = {pred / meas:.3f}  ({pred / _MIB:.0f} / {meas / _MIB:.0f} MiB; "
        f"in use before the call {before['bytes_in_use'] / _MIB:.0f} MiB, the process's peak so far "
        f"{before['peak_bytes_in_use'] / _MIB:.0f} MiB)")
  return pred / meas


# ----------------------------------------------------------------------------------------------------- time --


def find_report() -> str | None:
  """A prox report under ``runs/`` (``runs/*/`` or ``runs/*/*/``), else any report there."""
  paths = sorted(glob.glob("runs/*/proxjax-report.json") + glob.glob("runs/*/*/proxjax-report.json"))
  for path in paths:
    with open(path) as f:
      if json.load(f).get("method") == "prox":
        return path
  return paths[0] if paths else None


def matmul_rate(d_in: int, d_out: int, budget_s: float = 1.0) -> float:
  """FLOP/s of float32 ``V ← H̃ @ V`` (``(d_in, d_in) @ (d_in, d_out)``, ``Precision.HIGHEST``) repeated in one
  jitted ``fori_loop``, as the prox loop runs it (one allocation per call, not per product): best of a few calls
  within about ``budget_s``."""
  h = jax.random.normal(jax.random.key(1), (d_in, d_in), jnp.float32) / np.sqrt(d_in)  # norms grow ~2x per product
  v = jax.random.normal(jax.random.key(2), (d_in, d_out), jnp.float32)
  flops = 2.0 * d_in * d_in * d_out
  steps = int(min(50, max(2, 2e9 / flops)))  # about 2 GFLOP per call
  fn = jax.jit(lambda h, v: jax.lax.fori_loop(0, steps, lambda i, v: jnp.matmul(h, v, precision=_HI), v))
  one = _best(lambda: fn(h, v), 1)
  return steps * flops / _best(lambda: fn(h, v), int(min(10, max(2, budget_s / max(one, 1e-6)))))


def bandwidth(nbytes: int = 64 * _MIB, passes: int = 20) -> float:
  """Bytes/s of an elementwise ``x ← a·x + b`` over a float32 array of ``nbytes`` (read once, written once per
  pass), ``passes`` times in one jitted ``fori_loop`` (a call's allocation, page faults included, is paid once, as
  in the prox loop; a bare call per pass measures the allocator instead: ~7x less on XLA:CPU)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  fn = jax.jit(lambda x: jax.lax.fori_loop(0, passes, lambda i, x: 1.0001 * x + 0.5, x))
  return passes * 2.0 * nbytes / _best(lambda: fn(x), 3)


def check_time(path: str, param_bytes: int) -> dict[str, float]:
  """Predicted / measured seconds per linear type and in total; returns the ratios."""
  with open(path) as f:
    report = json.load(f)
  method, refine = report["method"], report.get("refine")
  options = (report.get("config") or {}).get("options") or report.get("options") or {}
  layers = report["layers"]
  if not layers:
    raise SystemExit(f"{path}: no layers")
  shapes = sorted({tuple(layer["shape"]) for layer in layers}, key=lambda s: s[0] * s[0] * s[1])
  print(f"\n== time: predicted / measured prune seconds per linear, {path}")
  cal = report.get("calibration") or {}
  print(f"  report: method {method}, refine {refine}, options {options}, {len(layers)} linears, calibration "
        f"{cal.get('nsamples')} x {cal.get('seqlen')}")
  own = {s: matmul_rate(*s, budget_s=1.0 if s == shapes[-1] else 0.5) for s in shapes}  # each layer shape's own
  flops_per_s = own[shapes[-1]]  # the machine's rate: on the largest layer's product
  bytes_per_s = bandwidth()
  big = shapes[-1]
  load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
  print(f"  this machine ({jax.default_backend()}{load}): matmul {flops_per_s / 1e9:.1f} GFLOP/s (H̃ @ V, {big[0]}x"
        f"{big[0]} @ {big[0]}x{big[1]}, float32 HIGHEST), bandwidth {bytes_per_s / 1e9:.1f} GB/s; per shape "
        "(d_in x d_out): " + ", ".join(f"{s[0]}x{s[1]} {r / 1e9:.1f}" for s, r in own.items()) + " GFLOP/s")

  def predicted(layer: dict[str, Any], rate: float) -> tuple[float, dict[str, float]]:
    d_in, d_out = layer["shape"]
    cost = memory.linear_cost(d_in, d_out, method=method, refine=refine, iterations=layer["iterations"],
                              refine_steps=layer["refine_steps"], param_bytes=param_bytes,
                              blocksize=options.get("blocksize", 128), flops_per_s=rate, bytes_per_s=bytes_per_s)
    parts = {k: v.seconds for k, v in cost.items()}
    return sum(parts.values()), parts

  rows: dict[str, list[float]] = defaultdict(lambda: [0.0] * 6)  # meas, pred, meas>=1, pred>=1, own>=1, n
  share: dict[str, float] = defaultdict(float)
  for layer in layers:
    kind = layer["name"].split(".")[-1]
    pred, parts = predicted(layer, flops_per_s)
    pred_own, _ = predicted(layer, own[tuple(layer["shape"])])
    for key in (kind, "total"):
      r = rows[key]
      r[0] += layer["seconds"]
      r[1] += pred
      r[5] += 1
      if layer["block"] >= 1:
        r[2] += layer["seconds"]
        r[3] += pred
        r[4] += pred_own
    for k, v in parts.items():
      share[k] += v
  print(f"  {'linear':<12}{'n':>5}{'all blocks':>12}{'blocks >= 1':>13}{'own-shape rate':>16}   "
        "(ratios predicted / measured)")
  out = {}
  for key in [t for t in _TYPES if t in rows] + sorted(set(rows) - set(_TYPES) - {"total"}) + ["total"]:
    meas, pred, meas1, pred1, own1, n = rows[key]
    later = f"{pred1 / meas1:13.3f}{own1 / meas1:16.3f}" if meas1 > 0 else f"{'-':>13}{'-':>16}"
    print(f"  {key:<12}{int(n):5d}{pred / meas:12.3f}{later}")
    out[key] = pred / meas
  total = sum(share.values())
  print("  predicted time by part: " + ", ".join(f"{k} {v / total:.0%}" for k, v in share.items())
        + f"; the report's linears took {rows['total'][0] / report['seconds']:.0%} of its wall time")
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--configs", default="smollm2,7b", help="memory check: comma-separated smollm2, 7b, or none")
  p.add_argument("--method", default="prox", help="memory check: the pruning method (default prox, CG refinement)")
  p.add_argument("--report", help="time check: a proxjax-report.json (default: a prox report under runs/, if any)")
  p.add_argument("--param-bytes", type=int, default=4, help="time check: bytes per stored parameter (default 4)")
  args = p.parse_args(argv)
  print(f"proxjax memory_check: {platform.node()}, jax {jax.__version__}, {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), {os.cpu_count()} CPUs")
  check_memory([c.strip() for c in args.configs.split(",") if c.strip()], args.method)
  if _on_gpu():
    check_gpu_peak()
  path = args.report or find_report()
  if path is None:
    print("\n(no report given and none found under runs/: time check skipped; pass --report)")
  else:
    check_time(path, args.param_bytes)
  return 0


if __name__ == "__main__":
  sys.exit(main())
