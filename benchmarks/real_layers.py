"""Layer-wise quality on REAL layer statistics: every method on the same kernels and Hessians of SmolLM2-135M.

For a few decoder blocks of the dense model, the inputs of all 7 projections are captured from the dense model
(calibration: offline Wikipedia calibration articles, packed, seed 0) and ``H = XXᵀ/n`` is accumulated; then every
method prunes every projection against the SAME ``H`` and the relative local loss ``tr((V−W)H(V−W)ᵀ)/tr(WHWᵀ)`` is
reported per projection type (mean over the chosen blocks) — a side-by-side comparison with no sequential drift
between methods. Times are per method relative to Wanda's.

Run from the repository root (after ``bash setup.sh``; converts the bundled model on first use)::

  python benchmarks/real_layers.py --blocks 0 14 29 --nsamples 16 --seqlen 512
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np

import proxjax
from proxjax import data
from proxjax.pruning import calibration
from proxjax.pipeline import prune as pipeline
from proxjax.models.convert import default_model_dir
from proxjax.models import LINEAR_NAMES, load_pretrained

METHODS = (
    ("magnitude", "magnitude", None, {}),
    ("wanda", "wanda", None, {}),
    ("wanda+cg", "wanda", "cg", {}),
    ("sparsegpt", "sparsegpt", None, {}),
    ("sparsegpt+cg", "sparsegpt", "cg", {}),
    ("prox(budget 300)+cg", "prox", "cg", {"budget": 300}),
    ("prox(paper: λ₀ .01, β 1.01)+cg", "prox", "cg", {}),
)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--blocks", type=int, nargs="+", default=[0, 14, 29])
  p.add_argument("--nsamples", type=int, default=16)
  p.add_argument("--seqlen", type=int, default=512)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--skip", nargs="*", default=[], help="method labels to skip")
  args = p.parse_args()

  model_dir = default_model_dir()
  model = load_pretrained(model_dir)
  tok = data.load_tokenizer(model_dir)
  ids = data.calibration_windows(tok, data.load_documents("wiki", split="calibration"), nsamples=args.nsamples,
                                 seqlen=args.seqlen, seed=args.seed)
  print(f"SmolLM2-135M-Instruct (dequantized Q4_1), blocks {args.blocks}, calibration wiki {args.nsamples}×"
        f"{args.seqlen} packed seed {args.seed}; H from the dense model for all methods")
  rope = model.rope(jnp.arange(args.seqlen))
  h = np.concatenate([np.asarray(pipeline._embed(model, jnp.asarray(ids[i:i + 4])))  # pylint: disable=protected-access
                      for i in range(0, len(ids), 4)])
  layers = {}
  for b, block in enumerate(model.model.layers):
    if b > max(args.blocks):
      break
    if b in args.blocks:
      states = pipeline._hessians(block, h, rope, LINEAR_NAMES, 4, None)  # pylint: disable=protected-access
      for name in LINEAR_NAMES:
        kernel = pipeline._submodule(block, name).kernel[...]  # pylint: disable=protected-access
        layers[(b, name)] = (kernel, calibration.hessian_from_state(states[name]))
    h = pipeline._propagate(block, h, rope, 4, None)  # pylint: disable=protected-access

  results, times = {}, {}
  for label, method, refine, options in METHODS:
    if label in args.skip:
      continue
    t0 = time.perf_counter()
    for key, (kernel, hess) in layers.items():
      res = proxjax.prune_kernel(kernel, hess, method, refine=refine, **options)
      results[(label, key)] = (res.info.loss_after_refine, res.info.iterations)
    times[label] = time.perf_counter() - t0
    print(f"  done {label} in {times[label]:.0f} s", flush=True)

  labels = [m[0] for m in METHODS if m[0] in times]
  print(f"\nrelative local loss, mean over blocks {args.blocks} (lower is better)")
  print(f"{'method':<32}" + "".join(f"{n.split('.')[1]:>10}" for n in LINEAR_NAMES) + f"{'mean':>10}{'time/wanda':>12}")
  for label in labels:
    row = [np.mean([results[(label, (b, n))][0] for b in args.blocks]) for n in LINEAR_NAMES]
    print(f"{label:<32}" + "".join(f"{v:10.4f}" for v in row) + f"{np.mean(row):10.4f}"
          f"{times[label] / times['wanda']:12.1f}")
  for label in labels:
    if label.startswith("prox"):
      its = [results[(label, k)][1] for k in layers]
      print(f"{label}: iterations {min(its)}–{max(its)}")


if __name__ == "__main__":
  main()
