"""Local-loss quality table on the toy layer of [docs/method.md](docs/method.md#the-toy-layer) (correlated feature pairs), every method and refinement.

Run: ``python benchmarks/toy_quality.py [--seeds 0 1 2]``. Prints the relative local loss
``tr((K − K₀)ᵀ H (K − K₀)) / tr(K₀ᵀ H K₀)`` per method and seed (d_in = 64, d_out = 32, n = 4000 tokens).
"""

from __future__ import annotations

import argparse

import numpy as np

import proxjax
from proxjax.core.toy import correlated_pairs_layer

METHODS = [
    ("magnitude", "magnitude", None, {}),
    ("wanda", "wanda", None, {}),
    ("sparsegpt", "sparsegpt", None, {}),
    ("magnitude + GD", "magnitude", "gd", {}),
    ("wanda + GD", "wanda", "gd", {}),
    ("wanda + CG", "wanda", "cg", {}),
    ("sparsegpt + GD", "sparsegpt", "gd", {}),
    ("prox (λ₀=0.01, β=1.2) + GD", "prox", "gd", dict(lam0=0.01, beta=1.2, accelerate=False)),
    ("prox (λ₀=0.01, β=1.2) + CG", "prox", "cg", dict(lam0=0.01, beta=1.2, accelerate=False)),
    ("prox (λ₀=1e-3, β=1.1) + GD", "prox", "gd", dict(lam0=1e-3, beta=1.1, accelerate=False)),
    ("prox (λ₀=0.01, β=1.01) + GD (paper)", "prox", "gd", dict(lam0=0.01, beta=1.01, accelerate=False,
                                                                 column_stop=False)),
    ("prox (default: FISTA, budget 150, paced) + GD", "prox", "gd", {}),
    ("prox (default: FISTA, budget 150, paced) + CG", "prox", "cg", {}),
]


def toy(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """docs/method.md, "The toy layer" (:func:`proxjax.core.toy.correlated_pairs_layer`): the kernel and ``H`` float32."""
  k, _, h = correlated_pairs_layer(seed=seed)
  return k, h.astype(np.float32)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  args = parser.parse_args()
  data = [toy(s) for s in args.seeds]
  print(f"toy layer, relative local loss, seeds {args.seeds}")
  print(f"{'method':48s} " + " ".join(f"seed {s:<3d}" for s in args.seeds) + "  iterations (prox)")
  for name, method, refine, opts in METHODS:
    losses, iters = [], []
    for kernel, h in data:
      res = proxjax.prune_kernel(kernel, h, method, refine=refine, **opts)
      assert bool(proxjax.is_nm(res.kernel, axis=0))
      losses.append(res.info.loss_after_refine)
      iters.append(res.info.iterations)
    extra = " ".join(str(i) for i in iters) if method == "prox" else ""
    print(f"{name:48s} " + " ".join(f"{v:8.4f}" for v in losses) + f"  {extra}")


if __name__ == "__main__":
  main()
