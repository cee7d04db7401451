"""Costs of the layer-wise prox pruner, reported as ratios measured side by side in one run.

1. **Step vs matmul**: one prox-gradient step ``prox_24(Ṽ − η H̃(Ṽ − K̃₀), λ, η)`` (jitted) against the bare matmul
   ``H̃ @ Ṽ`` of the same shape (jitted), for the SmolLM2-135M shapes 576→1536 (``up_proj``: ``d_in = 576``) and
   1536→576 (``down_proj``: ``d_in = 1536``); also the prox alone. Best of ``--repeats`` after a warm-up.
2. **CG vs GD**: the paper's 1000 masked GD steps against masked CG on the same layer and mask (Wanda mask,
   576→1536): CG iterations (and wall time) to reach GD's final loss, and CG's loss at its tolerance.
3. **Iterations used vs the estimate** ``log(Lκ/λ₀)/log β`` for a few ``(λ₀, β)``, on the toy layer (docs/method.md, "The toy layer") and on
   128→512 and 576→1536 synthetic layers.
4. **while_loop vs scan**: the prox loop as a ``lax.while_loop`` that exits when done against a ``lax.scan`` of ``cap``
   iterations whose body is a ``lax.cond`` no-op once done; also the cost of one no-op iteration relative to one
   active iteration, ``((t_scan − t_while)/(cap − iters)) / (t_while/iters)``.

Synthetic layers: ``X = diag(s) (A Z + 0.5 N)`` with ``A`` ``(d_in, d_in/4)``, ``Z``, ``N`` Gaussian (correlated
features) and per-feature scales ``s ~ lognormal(0, 1)`` (uneven feature norms, as in LLM activations), ``n = 2 d_in``
tokens; ``K ~ N(0, 1)``. Matmul precision: ``HIGHEST`` everywhere (on CPU float32 matmuls are full precision anyway).

Run from the repository root::

  python benchmarks/bench_pruner.py --quick
  python benchmarks/bench_pruner.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import proxjax
from proxjax.pruning import baselines
from proxjax.pruning import pruner
from proxjax.pruning import refine
from proxjax.core.toy import correlated_pairs_layer

_HI = jax.lax.Precision.HIGHEST


def _best(fn: Callable[[], object], repeats: int) -> float:
  jax.block_until_ready(fn())  # warm-up (compile)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def _layer(d_in: int, d_out: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  n = 2 * d_in
  a = rng.normal(size=(d_in, d_in // 4)) / np.sqrt(d_in // 4)
  x = a @ rng.normal(size=(d_in // 4, n)) + 0.5 * rng.normal(size=(d_in, n))
  x *= rng.lognormal(0.0, 1.0, size=(d_in, 1))
  return rng.normal(size=(d_in, d_out)).astype(np.float32), (x @ x.T / n).astype(np.float32)


def _toy() -> tuple[np.ndarray, np.ndarray]:
  k, _, h = correlated_pairs_layer()
  return k, h.astype(np.float32)


@jax.jit
def _matmul(ht, v):
  return jnp.matmul(ht, v, precision=_HI)


def _step_fn(ht, v, k0t, eta, lam):
  return proxjax.prox_24(v - eta * jnp.matmul(ht, v - k0t, precision=_HI), lam, eta)


def _prox_fn(v, eta, lam):
  return proxjax.prox_24(v, lam, eta)


# Strict XLA floating point (a plain jax.jit) and proxjax.CPU_FAST_MATH (what prune_kernel's loop uses on CPU).
_step, _prox = jax.jit(_step_fn), jax.jit(_prox_fn)
_step_fast = jax.jit(_step_fn, compiler_options=proxjax.CPU_FAST_MATH)
_prox_fast = jax.jit(_prox_fn, compiler_options=proxjax.CPU_FAST_MATH)


def bench_step(repeats: int) -> None:
  print("\n[1] prox-gradient step vs bare matmul H̃ @ V (same shapes; ratios = time / matmul time); 'fast' = compiled"
        " with proxjax.CPU_FAST_MATH, as prune_kernel's loop is on CPU")
  print(f"{'d_in→d_out':>12} {'step/matmul':>12} {'prox/matmul':>12} {'fast step/mm':>13} {'fast prox/mm':>13}"
        f" {'matmul ms':>10}")
  for d_in, d_out in ((576, 1536), (1536, 576)):
    k, h = _layer(d_in, d_out)
    pre = refine.precondition(h)
    k0t = pre.scale[:, None] * jnp.asarray(k)
    v = proxjax.prox_24(k0t, 0.05, 1.0 / pre.lipschitz)  # a mid-schedule iterate: some groups already 2-sparse
    eta, lam = 1.0 / pre.lipschitz, jnp.float32(0.05)
    t_mm = _best(lambda: _matmul(pre.hessian, v), repeats)
    t_step = _best(lambda: _step(pre.hessian, v, k0t, eta, lam), repeats)
    t_prox = _best(lambda: _prox(v, eta, lam), repeats)
    t_step_fast = _best(lambda: _step_fast(pre.hessian, v, k0t, eta, lam), repeats)
    t_prox_fast = _best(lambda: _prox_fast(v, eta, lam), repeats)
    print(f"{f'{d_in}→{d_out}':>12} {t_step / t_mm:12.2f} {t_prox / t_mm:12.2f} {t_step_fast / t_mm:13.2f}"
          f" {t_prox_fast / t_mm:13.2f} {1e3 * t_mm:10.2f}")


def bench_cg_vs_gd(repeats: int, d_in: int = 576, d_out: int = 1536) -> None:
  print(f"\n[2] masked CG vs the paper's 1000 masked GD steps ({d_in}→{d_out}, Wanda mask)")
  k, h = _layer(d_in, d_out, seed=1)
  mask = baselines.wanda_mask(k, h)
  start = jnp.where(mask, k, 0.0)
  loss = lambda out: float(refine.relative_local_loss(out, k, h))
  gd = lambda: refine.refine_gd(start, mask, k, h, steps=1000)
  loss_gd = loss(gd())
  cg = lambda s, tol=0.0: refine.refine_cg(start, mask, k, h, steps=s, tol=tol)
  lo, hi = 0, 1
  while loss(cg(hi)) > loss_gd and hi < 4096:
    lo, hi = hi, 2 * hi
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if loss(cg(mid)) <= loss_gd else (mid, hi)
  t_gd = _best(gd, max(1, repeats // 2))
  t_cg = _best(lambda: cg(hi), repeats)
  info = pruner.prune_kernel(k, h, "wanda", refine="cg").info  # defaults: tol 1e-6, cap 200
  print(f"  loss: start {loss(start):.5f}  GD(1000) {loss_gd:.6f}  CG(tol 1e-6) {info.loss_after_refine:.6f} "
        f"after {info.refine_steps} iterations")
  print(f"  CG iterations to reach GD(1000)'s loss: {hi}  -> steps ratio GD/CG = {1000 / hi:.1f}, "
        f"wall-time ratio GD/CG = {t_gd / t_cg:.1f}")


def bench_iterations(quick: bool) -> None:
  print("\n[3] prox iterations used vs estimate ceil(log(Lκ/λ₀)/log β), κ = 0.99-quantile (refine=None)")
  print(f"{'layer':>10} {'λ₀':>7} {'β':>6} {'used':>6} {'estimate':>9} {'used/est':>9}")
  layers = {"toy 64→32": _toy(), "128→512": _layer(128, 512, seed=3), "576→1536": _layer(576, 1536, seed=2)}
  for name, (k, h) in layers.items():
    for lam0, beta in ((0.01, 1.2), (1e-3, 1.1), (0.01, 1.05), (1e-3, 1.02)):
      if name == "576→1536" and (quick or beta < 1.1):
        continue
      info = pruner.prune_kernel(k, h, lam0=lam0, beta=beta, refine=None).info
      est = info.schedule.estimated_iterations
      print(f"{name:>10} {lam0:7.0e} {beta:6.2f} {info.iterations:6d} {est:9d} {info.iterations / max(est, 1):9.2f}")


def bench_loops(repeats: int, quick: bool) -> None:
  print("\n[4] prox loop: lax.while_loop (exits when done) vs lax.scan over cap=3000 with a lax.cond no-op body")
  print(f"{'layer':>10} {'β':>5} {'iters':>6} {'scan/while':>11} {'no-op/active iteration':>23}")
  cases = [("toy 64→32", _toy(), 1.2), ("128→512", _layer(128, 512, seed=3), 1.2),
           ("128→512", _layer(128, 512, seed=3), 1.05)]
  if not quick:
    cases.append(("576→1536", _layer(576, 1536, seed=2), 1.2))
  for name, (k, h), beta in cases:
    pre, k0t, lip, _ = pruner._constants(jnp.asarray(k), jnp.asarray(h), 0.99, 0.0)  # pylint: disable=protected-access
    args = (k0t, pre.hessian, jnp.float32(1.0 / lip), jnp.float32(0.0), jnp.float32(0.01), jnp.float32(beta),
            jnp.int32(0), jnp.int32(3000), jnp.int32(0), jnp.int32(0), jnp.float32(0.0))
    run = lambda loop: pruner._run(  # pylint: disable=protected-access
        "prox_loop", None, k.shape, *args, loop=loop, scan_length=3000 if loop == "scan" else None, precision=_HI)
    iters = int(run("while")[3])
    t_while = _best(lambda: run("while"), repeats)
    t_scan = _best(lambda: run("scan"), repeats)
    noop = max(t_scan - t_while, 0.0) / (3000 - iters) / (t_while / iters)
    print(f"{name:>10} {beta:5.2f} {iters:6d} {t_scan / t_while:11.2f} {noop:23.4f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--quick", action="store_true", help="skip the 576→1536 layer in [3] and [4]")
  parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4], help="which of [1]-[4] to run")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; precision HIGHEST; float32")
  sections = {1: lambda: bench_step(args.repeats), 2: lambda: bench_cg_vs_gd(args.repeats),
              3: lambda: bench_iterations(args.quick), 4: lambda: bench_loops(args.repeats, args.quick)}
  for i in args.sections:
    sections[i]()


if __name__ == "__main__":
  main()
