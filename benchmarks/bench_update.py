"""``prox_24_update`` on a whole model's kernels: how the selected leaves are batched, as ratios measured side by side.

The ProxSparse step applies the exact prox to every q/k/v/o/gate/up/down kernel of the model after each optimizer
step (SmolLM2-135M: 210 kernels, 26.5 M groups). Columns, each one jitted program on the same random kernels
(float32, ``compiler_options=proxjax.CPU_FAST_MATH`` on CPU, as the ProxSparse step is compiled):

* **roofline**: ``p + u`` into new arrays, a pure memory pass over the same leaves (reads 8 B, writes 4 B a weight);
* **stacked** (the default, ``fuse=True``): leaves of equal shape stacked and solved one by one with ``lax.map``;
* **one batch** (the layout used before 2026-12-01): the groups of all leaves laid side by side as one ``(4, G)``
  array and solved at once (re-implemented here for the comparison);
* **per leaf** (``fuse=False``, with ``--per-leaf``): every leaf solved alone (one compiled solver per leaf: its
  compile time grows with the number of leaves, minutes for 210).

Printed: compile and best run time of each column, groups per second, and the ratios stacked / one batch and
stacked / roofline (> 1: stacked is faster). All columns give the same values (stacked and per leaf bitwise).

Run from the repository root::

  python benchmarks/bench_update.py                 # SmolLM2-135M shapes, 30 layers
  python benchmarks/bench_update.py --layers 4 --per-leaf
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import optax

import proxjax
from proxjax.core import prox as _prox

SMOLLM2 = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def _one_batch(zs: list[jax.Array], lam: jax.Array) -> list[jax.Array]:
  """The previous fused layout: all groups as one ``(4, G)`` array, one solve."""
  rows = [jnp.moveaxis(x.reshape(x.shape[0] // 4, 4, x.shape[1]), 1, 0).reshape(4, -1) for x in zs]
  solved = _prox.prox_leaf(jnp.concatenate(rows, axis=1), lam, 0)  # pylint: disable=protected-access
  out, start = [], 0
  for x, r in zip(zs, rows):
    piece = solved[:, start:start + r.shape[1]].reshape(4, x.shape[0] // 4, x.shape[1])
    out.append(jnp.moveaxis(piece, 0, 1).reshape(x.shape))
    start += r.shape[1]
  return out


def _timed(fn, args, repeats: int) -> tuple[float, float, object]:
  t = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return first - best, best, out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--layers", type=int, default=30, help="decoder layers of SmolLM2-135M shapes (default 30)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--lam", type=float, default=0.02, help="prox strength (default 0.02; weights ~ N(0, 0.02²))")
  ap.add_argument("--per-leaf", action="store_true", help="also time fuse=False (slow to compile)")
  args = ap.parse_args()

  key = jax.random.key(0)
  params = {f"{i}_{j}": 0.02 * jax.random.normal(jax.random.fold_in(key, 7 * i + j), s)
            for i in range(args.layers) for j, s in enumerate(SMOLLM2)}
  updates = jax.tree.map(lambda p: 1e-4 * jnp.ones_like(p), params)
  groups = sum(p.size for p in params.values()) // 4
  lam = jnp.float32(args.lam)
  spec = lambda path, leaf: 0  # noqa: E731  every leaf, groups along axis 0
  opts = proxjax.CPU_FAST_MATH if jax.default_backend() == "cpu" else None

  def update(fuse):
    tx = proxjax.prox_24_update(lam, 1.0, spec=spec, fuse=fuse)
    return jax.jit(lambda u, p: optax.apply_updates(p, tx.update(u, tx.init(p), p)[0]), compiler_options=opts)

  columns = {
      "roofline": jax.jit(lambda u, p: jax.tree.map(jnp.add, p, u), compiler_options=opts),
      "stacked": update(True),
      "one batch": jax.jit(lambda u, p: dict(zip(p, _one_batch([p[k] + u[k] for k in p], lam))),
                           compiler_options=opts),
  }
  if args.per_leaf:
    columns["per leaf"] = update(False)
  print(f"{platform.processor() or platform.machine()}, jax {jax.__version__}, {jax.default_backend()}; "
        f"{args.layers} layers of SmolLM2-135M shapes: {len(params)} kernels, {groups / 1e6:.2f} M groups")
  times, outs = {}, {}
  for name, fn in columns.items():
    compile_s, run_s, outs[name] = _timed(fn, (updates, params), args.repeats)
    times[name] = run_s
    print(f"  {name:10s} compile {compile_s:7.1f} s  run {run_s:7.3f} s  {groups / run_s / 1e6:7.2f} Mgroups/s",
          flush=True)
  same = {name: max(float(jnp.max(jnp.abs(outs[name][k] - outs["stacked"][k]))) for k in params)
          for name in outs if name not in ("roofline", "stacked")}
  print(f"ratios: stacked / one batch {times['one batch'] / times['stacked']:.2f}x, "
        f"stacked / roofline {times['roofline'] / times['stacked']:.3f}; "
        f"max |difference| vs stacked: {same}")


if __name__ == "__main__":
  main()
