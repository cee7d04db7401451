"""Throughput of the 2:4 prox, reported as ratios measured side by side in one run.

For each size ``G`` (number of groups of four) and each lambda regime this measures, best of ``--repeats`` after a
warm-up (compile time excluded, every result synchronized):

  (a) roofline: a jitted memory-bound JAX pass over the same array (``x * 2.0`` into a new array: 16 B read +
      16 B written = 32 bytes per group), as groups/s and GB/s;
  (b) ``proxjax.prox_24`` (jitted) on the Flax-layout kernel ``(4 K, d_out)`` with groups along axis 0;
  (c) the ProxSparse solver in eager PyTorch (CPU, or CUDA when JAX runs on a GPU and CUDA torch is installed),
      on the PyTorch layout of the same data (``weight.view(-1, 4)``);
  (d) the ProxSparse solver ported to JAX and jitted, on the same ``(G, 4)`` layout.

It prints groups/s for each and the ratios proxjax / roofline, proxjax / torch-eager ProxSparse and proxjax /
JAX-jit ProxSparse; times are printed only as supporting information. It also reports, on a subsample, how often
ProxSparse's heuristic ends at a worse objective than proxjax (and the converse), in float64.

Run from the repository root::

  python benchmarks/bench_prox.py --quick                       # 2^16-group smoke run
  python benchmarks/bench_prox.py                               # 2^20, 2^22, 2^24 groups, both lambda regimes
  python benchmarks/bench_prox.py --log2-groups 20 22 24 --lam-mode threshold --repeats 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import proxjax  # noqa: E402
from proxsparse_solver import objective, proxsparse_prox_jax, proxsparse_prox_torch  # noqa: E402

try:
  import torch
except ImportError:  # torch is optional: the torch-eager column is then skipped
  torch = None

BYTES_PER_GROUP = 32  # float32: 4 x 4 B read + 4 x 4 B written

# Nominal peak memory bandwidth (bytes/s) by substring of jax's device_kind, for the GPU roofline line.
_NOMINAL_BW = (
    ("GH200", 4.0e12),  # before "H200": the name contains it
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM, HBM3
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100-SXM4-40GB", 1.555e12),
    ("A100-PCIE-40GB", 1.555e12),
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("A10G", 0.6e12),
)


# --------------------------------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------------------------------


def _cpu_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _nominal_bandwidth(kind: str) -> float | None:
  for key, bw in _NOMINAL_BW:
    if key.lower() in kind.lower():
      return bw
  return None


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--log2-groups", type=int, nargs="+", default=[20, 22, 24], help="sizes G = 2^k groups of four")
  p.add_argument("--lam-mode", nargs="+", choices=["threshold", "unit"], default=["threshold", "unit"],
                 help="threshold: lam = median 2-sparse threshold a3/(a1 a2) of the data; unit: lam = 1")
  p.add_argument("--repeats", type=int, default=5, help="timed repeats; the best is reported")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (the first one compiles)")
  p.add_argument("--min-time", type=float, default=0.05,
                 help="each repeat runs the call back to back until it lasts at least this many seconds "
                      "(matters for sub-millisecond GPU kernels)")
  p.add_argument("--d-out", type=int, default=1024, help="columns of the (4 K, d_out) Flax-layout kernel")
  p.add_argument("--sweeps", type=int, default=100, help="ProxSparse coordinate sweeps per candidate")
  p.add_argument("--torch-max-log2", type=int, default=22,
                 help="largest log2(G) run with torch eager (it is slow: 100 sweeps x ~60 eager tensor ops)")
  p.add_argument("--torch-repeats", type=int, default=None, help="timed repeats for torch eager (default --repeats)")
  p.add_argument("--torch-device", choices=["auto", "cpu", "cuda", "none"], default="auto",
                 help="auto: CPU when JAX is on CPU; CUDA when JAX is on GPU and CUDA torch exists, else skipped")
  p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: the CPU cores)")
  p.add_argument("--torch-tol", type=float, default=1e-8,
                 help="ProxSparse's global early-exit tolerance in torch eager, as released; <= 0 disables it")
  p.add_argument("--jax-tol", type=float, default=None,
                 help="early-exit tolerance for the JAX port (default: none, exactly --sweeps via fori_loop)")
  p.add_argument("--jax-sort", choices=["network", "lax"], default="network",
                 help="sort in the JAX port: a fused 4-element sorting network, or lax.sort (slow on CPU)")
  p.add_argument("--miss-log2-groups", type=int, default=18, help="subsample size for the miss-rate comparison")
  p.add_argument("--miss-rtol", type=float, default=1e-6, help="relative margin for counting a miss")
  p.add_argument("--miss-atol", type=float, default=1e-12, help="absolute floor added to the margin")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", type=str, default=None, help="also write all results to this JSON file")
  p.add_argument("--quick", action="store_true",
                 help="smoke run: 2^16 groups, 3 repeats, 2^16-group miss-rate subsample")
  args = p.parse_args(argv)
  if args.quick:
    args.log2_groups = [16]
    args.repeats = 3
    args.miss_log2_groups = 16
  if args.torch_repeats is None:
    args.torch_repeats = args.repeats
  return args


def _pick_torch_device(choice: str, jax_backend: str) -> tuple[str | None, str]:
  """Returns (torch device or None, reason)."""
  if torch is None:
    return None, "torch is not installed"
  if choice == "none":
    return None, "disabled by --torch-device none"
  if choice == "cpu":
    return "cpu", "requested"
  cuda_ok = torch.cuda.is_available()
  if choice == "cuda":
    return ("cuda", "requested") if cuda_ok else (None, "CUDA torch is not available")
  if jax_backend == "cpu":
    return "cpu", "JAX runs on CPU"
  if cuda_ok:
    return "cuda", "JAX runs on GPU and CUDA torch is available"
  return None, "JAX runs on GPU but this torch has no CUDA (a CPU-vs-GPU ratio would be meaningless)"


def _print_header(args: argparse.Namespace, torch_device: str | None, torch_reason: str, threads: int) -> dict:
  devs = jax.devices()
  info = {
      "python": platform.python_version(),
      "platform": platform.platform(),
      "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      "jax_devices": [str(d) for d in devs],
      "device_kind": devs[0].device_kind,
      "cpu_count": os.cpu_count(),
      "cpu_cores_usable": _cpu_cores(),
      "numpy": np.__version__,
      "torch": None if torch is None else torch.__version__,
      "torch_device": torch_device,
      "torch_threads": threads if torch_device == "cpu" else None,
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
  }
  print("=" * 100)
  print("2:4 prox throughput benchmark (proxjax vs ProxSparse)")
  print("=" * 100)
  print(f"python {info['python']} on {info['platform']}")
  print(f"jax {info['jax']}  backend={info['jax_backend']}  devices={info['jax_devices']}  "
        f"kind={info['device_kind']!r}")
  print(f"CPU: os.cpu_count()={info['cpu_count']}  usable cores={info['cpu_cores_usable']}  "
        f"XLA_FLAGS={info['XLA_FLAGS']!r}")
  if torch is None:
    print("torch: not installed -> torch-eager ProxSparse skipped")
  else:
    tdesc = f"device={torch_device} ({torch_reason})"
    if torch_device == "cpu":
      tdesc += f", torch.set_num_threads({threads}) -> get_num_threads()={torch.get_num_threads()}"
    print(f"torch {torch.__version__}: {tdesc}")
  print(f"numpy {info['numpy']}")
  print(f"protocol: float32, Flax kernel (4K, d_out={args.d_out}) with groups along axis 0 for proxjax; the same data "
        f"as PyTorch weight.view(-1, 4), i.e. (G, 4), for ProxSparse; best of {args.repeats} after {args.warmup} "
        f"warm-up call(s) (torch eager: best of {args.torch_repeats}); {BYTES_PER_GROUP} B/group for GB/s; "
        f"ProxSparse sweeps={args.sweeps}, torch early-exit tol={args.torch_tol if args.torch_tol > 0 else 'off'}, "
        f"JAX-port tol={args.jax_tol if args.jax_tol is not None else 'off (fixed sweeps)'}, "
        f"JAX-port sort={args.jax_sort}")
  return info


# --------------------------------------------------------------------------------------------------------------------
# data and lambda
# --------------------------------------------------------------------------------------------------------------------


def _kernel(groups: int, d_out: int, seed: int) -> np.ndarray:
  """N(0, 1) float32 kernel shaped (4 * groups / d_out, d_out): groups of four along axis 0."""
  d = min(d_out, groups)
  if groups % d:
    raise ValueError(f"G={groups} is not a multiple of d_out={d}")
  rng = np.random.default_rng(seed)
  return rng.standard_normal((4 * groups // d, d), dtype=np.float32)


def _torch_layout(kernel: np.ndarray) -> np.ndarray:
  """The same layer in PyTorch layout (d_out, d_in) viewed as (G, 4): group g holds kernel[4k:4k+4, j]."""
  return np.ascontiguousarray(kernel.T).reshape(-1, 4)


def _threshold_lambda(groups_g4: np.ndarray) -> float:
  """Median over groups of a3 / (a1 a2): the lam at which the top-2 point (a1, a2, 0, 0) stops being stationary."""
  a = -np.sort(-np.abs(groups_g4.astype(np.float64)), axis=1)
  den = a[:, 0] * a[:, 1]
  ok = den > 0
  return float(np.float32(np.median(a[ok, 2] / den[ok])))  # float32-representable: every solver sees the same lam


# --------------------------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------------------------


def _best_time(fn: Callable[[], Any], sync: Callable[[Any], Any], repeats: int, warmup: int,
               min_time: float) -> tuple[float, int]:
  """Best per-call seconds over ``repeats``; each repeat runs ``inner`` calls back to back (calibrated once)."""
  for _ in range(max(warmup, 1)):
    sync(fn())
  t0 = time.perf_counter()
  sync(fn())
  once = time.perf_counter() - t0
  inner = max(1, min(1000, math.ceil(min_time / max(once, 1e-9)))) if once < min_time else 1
  best = once if inner == 1 else math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = None
    for _ in range(inner):
      out = fn()
    sync(out)
    best = min(best, (time.perf_counter() - t0) / inner)
  return best, inner


def _jax_sync(x: Any) -> Any:
  return jax.block_until_ready(x)


def _torch_sync(device: str) -> Callable[[Any], Any]:
  def sync(x: Any) -> Any:
    if device == "cuda":
      torch.cuda.synchronize()
    return x
  return sync


@jax.jit
def _memory_pass(x: jax.Array) -> jax.Array:
  return x * 2.0


@jax.jit
def _proxjax(x: jax.Array, lam: jax.Array) -> jax.Array:
  return proxjax.prox_24(x, lam, axis=0)


# --------------------------------------------------------------------------------------------------------------------
# miss rate
# --------------------------------------------------------------------------------------------------------------------


def _miss_stats(obj_other: np.ndarray, obj_ref: np.ndarray, rtol: float, atol: float) -> dict:
  """Fraction of groups where ``obj_other`` exceeds ``obj_ref`` by more than the margin, with the excess sizes."""
  margin = rtol * np.abs(obj_ref) + atol
  worse = obj_other > obj_ref + margin
  rel = (obj_other - obj_ref) / np.maximum(np.abs(obj_ref), atol)
  return {
      "rate": float(np.mean(worse)),
      "count": int(np.sum(worse)),
      "mean_rel_excess_of_misses": float(np.mean(rel[worse])) if worse.any() else 0.0,
      "max_rel_excess": float(np.max(rel[worse])) if worse.any() else 0.0,
  }


def _miss_rates(args: argparse.Namespace, lams: dict[str, float], torch_device: str | None) -> dict:
  groups = 1 << args.miss_log2_groups
  kernel = _kernel(groups, args.d_out, args.seed + 1)
  y = _torch_layout(kernel)
  torch_tol = args.torch_tol if args.torch_tol > 0 else None
  out = {}
  print()
  print(f"miss rate on {groups} = 2^{args.miss_log2_groups} groups (float64 objective; a miss: objective > "
        f"reference * (1 + {args.miss_rtol:g}) + {args.miss_atol:g})")
  for mode, lam in lams.items():
    w_pj = _torch_layout(np.asarray(_proxjax(jnp.asarray(kernel), jnp.float32(lam))))
    o_pj = objective(w_pj, y, lam)
    w_psj = proxsparse_prox_jax(jnp.asarray(y), lam, args.sweeps, args.jax_tol, args.jax_sort)
    solvers = {"ProxSparse JAX-jit": np.asarray(w_psj)}
    if torch_device is not None:
      yt = torch.from_numpy(y).to(torch_device)
      solvers["ProxSparse torch-eager"] = proxsparse_prox_torch(yt, lam, args.sweeps, torch_tol).cpu().numpy()
    res = {"lam": lam, "groups": groups}
    for name, w in solvers.items():
      o_ps = objective(w, y, lam)
      ps_worse = _miss_stats(o_ps, o_pj, args.miss_rtol, args.miss_atol)
      pj_worse = _miss_stats(o_pj, o_ps, args.miss_rtol, args.miss_atol)
      res[name] = {"proxsparse_worse": ps_worse, "proxjax_worse": pj_worse}
      print(f"  [{mode:9s} lam={lam:.4g}] {name:23s}: ProxSparse worse than proxjax in {100 * ps_worse['rate']:7.3f}% "
            f"({ps_worse['count']}; mean rel. excess {ps_worse['mean_rel_excess_of_misses']:.2e}, max "
            f"{ps_worse['max_rel_excess']:.2e}) | proxjax worse than ProxSparse in {100 * pj_worse['rate']:7.3f}% "
            f"({pj_worse['count']}; max rel. excess {pj_worse['max_rel_excess']:.2e})")
    out[mode] = res
  return out


# --------------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------------


def _fmt_rate(groups_per_s: float | None) -> str:
  if groups_per_s is None:
    return "skipped"
  return f"{groups_per_s / 1e6:10.2f}"


def _fmt_ratio(num: float | None, den: float | None) -> str:
  if num is None or den is None:
    return "n/a"
  return f"{num / den:.3g}"


def main(argv: list[str] | None = None) -> dict:
  args = _parse_args(argv)
  backend = jax.default_backend()
  torch_device, torch_reason = _pick_torch_device(args.torch_device, backend)
  threads = args.torch_threads or _cpu_cores()
  if torch_device == "cpu":
    torch.set_num_threads(threads)
  info = _print_header(args, torch_device, torch_reason, threads)
  torch_tol = args.torch_tol if args.torch_tol > 0 else None

  # lambda regimes (a property of the N(0, 1) data distribution: computed once on the miss-rate subsample)
  lam_thr = _threshold_lambda(_torch_layout(_kernel(1 << args.miss_log2_groups, args.d_out, args.seed + 1)))
  all_lams = {"threshold": lam_thr, "unit": 1.0}
  lams = {m: all_lams[m] for m in args.lam_mode}
  print("lambda regimes: " + ", ".join(
      f"{m}: lam={v:.6g}" + (" (median of a3/(a1 a2) over N(0,1) groups)" if m == "threshold" else " (N(0,1) data)")
      for m, v in lams.items()))

  results = []
  for k in args.log2_groups:
    groups = 1 << k
    kernel = _kernel(groups, args.d_out, args.seed)
    y = _torch_layout(kernel)
    x_j = jax.device_put(kernel)
    y_j = jax.device_put(y)
    roof_t, roof_inner = _best_time(lambda: _memory_pass(x_j), _jax_sync, args.repeats, args.warmup, args.min_time)
    roof = groups / roof_t
    run_torch = torch_device is not None and k <= args.torch_max_log2
    y_t = torch.from_numpy(y).to(torch_device) if run_torch else None
    for mode, lam in lams.items():
      lam_j = jnp.float32(lam)
      pj_t, pj_inner = _best_time(lambda: _proxjax(x_j, lam_j), _jax_sync, args.repeats, args.warmup, args.min_time)
      psj_t, psj_inner = _best_time(
          lambda: proxsparse_prox_jax(y_j, lam_j, args.sweeps, args.jax_tol, args.jax_sort), _jax_sync,
          args.repeats, args.warmup, args.min_time)
      row = {"log2_groups": k, "groups": groups, "shape": list(kernel.shape), "lam_mode": mode, "lam": lam,
             "roofline_s": roof_t, "proxjax_s": pj_t, "proxsparse_jax_s": psj_t,
             "inner_calls": {"roofline": roof_inner, "proxjax": pj_inner, "proxsparse_jax": psj_inner},
             "roofline_gps": roof, "proxjax_gps": groups / pj_t, "proxsparse_jax_gps": groups / psj_t,
             "proxsparse_torch_s": None, "proxsparse_torch_gps": None, "torch_sweeps": None}
      if run_torch:
        sweep_info: dict = {}
        pst_t, _ = _best_time(lambda: proxsparse_prox_torch(y_t, lam, args.sweeps, torch_tol, sweep_info),
                              _torch_sync(torch_device), args.torch_repeats, args.warmup, 0.0)
        row.update(proxsparse_torch_s=pst_t, proxsparse_torch_gps=groups / pst_t, torch_sweeps=dict(sweep_info))
      results.append(row)
      print(f"  measured G=2^{k} {mode}: proxjax {groups / pj_t / 1e6:.2f} Mgroups/s", flush=True)
    del x_j, y_j, y_t

  # ---- report ------------------------------------------------------------------------------------------------------
  print()
  if backend != "cpu":
    kind = info["device_kind"]
    nominal = _nominal_bandwidth(kind)
    print(f"GPU roofline ({kind}), {BYTES_PER_GROUP} B/group: "
          + (f"nominal HBM {nominal / 1e9:.0f} GB/s = {nominal / BYTES_PER_GROUP / 1e9:.2f} Ggroups/s"
             if nominal else "nominal bandwidth unknown for this device"))
    for r in results:
      if r["lam_mode"] != args.lam_mode[0]:
        continue
      bw = r["roofline_gps"] * BYTES_PER_GROUP
      line = (f"  G=2^{r['log2_groups']}: measured memory pass {bw / 1e9:.0f} GB/s = "
              f"{r['roofline_gps'] / 1e9:.2f} Ggroups/s")
      if nominal:
        line += f" ({100 * bw / nominal:.0f}% of nominal)"
      print(line)
    info["nominal_bandwidth_Bps"] = nominal
  torch_col = "PS torch" + ("" if torch_device is None else f" ({torch_device})")
  hdr = (f"{'regime':9s} {'G':>5s} | {'roofline':>10s} {'(GB/s)':>7s} | {'proxjax':>10s} {'(GB/s)':>7s} | "
         f"{torch_col:>15s} | {'PS JAX-jit':>10s} || {'pj/roofline':>11s} {'pj/PS-torch':>11s} {'pj/PS-jax':>10s}")
  print("throughput in Mgroups/s (1 group = 4 float32 = 32 B read+written); ratios > 1 mean proxjax is faster")
  print(hdr)
  print("-" * len(hdr))
  for r in results:
    gbs = lambda gps: gps * BYTES_PER_GROUP / 1e9  # noqa: E731
    print(f"{r['lam_mode']:9s} {'2^' + str(r['log2_groups']):>5s} | {_fmt_rate(r['roofline_gps'])} "
          f"{gbs(r['roofline_gps']):7.1f} | {_fmt_rate(r['proxjax_gps'])} {gbs(r['proxjax_gps']):7.1f} | "
          f"{_fmt_rate(r['proxsparse_torch_gps']):>15s} | {_fmt_rate(r['proxsparse_jax_gps'])} || "
          f"{_fmt_ratio(r['proxjax_gps'], r['roofline_gps']):>11s} "
          f"{_fmt_ratio(r['proxjax_gps'], r['proxsparse_torch_gps']):>11s} "
          f"{_fmt_ratio(r['proxjax_gps'], r['proxsparse_jax_gps']):>10s}")
  skipped = sorted({r["log2_groups"] for r in results if r["proxsparse_torch_gps"] is None})
  if skipped and torch_device is not None:
    print(f"torch eager skipped for G = {', '.join('2^' + str(s) for s in skipped)} (> 2^{args.torch_max_log2}: "
          f"too slow; raise --torch-max-log2 to include it)")
  elif torch_device is None:
    print(f"torch eager skipped: {torch_reason}")

  print()
  print("supporting info: best time per call in ms [back-to-back calls per repeat]; torch sweeps actually run "
        "(3-support/dense)")
  for r in results:
    ic = r["inner_calls"]
    t_torch = "skipped" if r["proxsparse_torch_s"] is None else f"{1e3 * r['proxsparse_torch_s']:.3f}"
    sw = r["torch_sweeps"]
    sw_s = "" if sw is None else f" (sweeps {sw['sweeps_3']}/{sw['sweeps_4']})"
    print(f"  {r['lam_mode']:9s} 2^{r['log2_groups']:<3d} shape={tuple(r['shape'])}: roofline "
          f"{1e3 * r['roofline_s']:.3f} [{ic['roofline']}], proxjax {1e3 * r['proxjax_s']:.3f} [{ic['proxjax']}], "
          f"PS torch {t_torch}{sw_s}, PS JAX-jit {1e3 * r['proxsparse_jax_s']:.3f} [{ic['proxsparse_jax']}]")

  miss = _miss_rates(args, lams, torch_device)

  report = {"info": info, "args": vars(args), "lambdas": lams, "throughput": results, "miss_rate": miss}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
    print(f"\nwrote {args.json}")
  return report


if __name__ == "__main__":
  main()
