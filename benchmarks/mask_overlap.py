"""How far a pruned checkpoint's 2:4 masks are from the magnitude masks of its dense source (or of another pruned one).

For every projection kernel (groups of 4 along the input axis) it prints the fraction of groups whose kept pair is
the same in both, per projection type and overall. A learned mask (ProxSparse) that stays close to magnitude has
learned little from the loss; layer-wise methods (Wanda, SparseGPT, prox) move away from it by design.

Run from the repository root::

  python benchmarks/mask_overlap.py runs/proxsparse400 smollm2              # against magnitude masks of the dense
  python benchmarks/mask_overlap.py runs/proxsparse400 runs/wanda --pruned-reference  # against another pruned one
"""

from __future__ import annotations

import argparse
import collections
import os

import numpy as np
from safetensors.numpy import load_file

import proxjax
from proxjax.workflows.common import model_dir
from proxjax.models import hf
from proxjax.models.llama import LINEAR_NAMES


def _tensors(model_dir: str) -> dict[str, np.ndarray]:
  """The projection weights of a checkpoint (single file or sharded index)."""
  files, _ = hf._weight_files(model_dir)  # pylint: disable=protected-access
  out: dict[str, np.ndarray] = {}
  for f in files:
    out.update({k: v for k, v in load_file(os.path.join(model_dir, f)).items()
                if any(k.endswith(n + ".weight") for n in LINEAR_NAMES)})
  if not out:
    raise SystemExit(f"{model_dir}: no projection weights found")
  return out


def _groups(w: np.ndarray) -> np.ndarray:
  """``(G, 4)`` magnitudes of the groups along the input axis of a PyTorch ``(d_out, d_in)`` weight."""
  return np.abs(w.astype(np.float32)).reshape(-1, 4)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("pruned", help="a 2:4 checkpoint directory")
  ap.add_argument("reference", help="its dense source ('smollm2' for the bundled model), or another pruned checkpoint")
  ap.add_argument("--pruned-reference", dest="pruned_ref", action="store_true",
                  help="the reference is pruned: compare non-zero patterns instead of magnitude masks")
  args = ap.parse_args()
  a = _tensors(model_dir(args.pruned))  # pylint: disable=protected-access
  b = _tensors(model_dir(args.reference))  # pylint: disable=protected-access
  same, total = collections.Counter(), collections.Counter()
  for name, w in a.items():
    if name not in b:
      raise SystemExit(f"{name} is missing from {args.reference}")
    ga, gb = _groups(w), _groups(b[name])
    ma = ga != 0
    mb = gb != 0 if args.pruned_ref else np.asarray(proxjax.nm_mask(gb, 2, 4, axis=1))  # ties: lower index
    if (ma.sum(axis=1) > 2).any():
      raise SystemExit(f"{args.pruned}: {name} is not 2:4")
    kind = name.split(".")[-2]
    # A group with fewer than 2 non-zeros (a kept weight that is exactly 0) counts as equal when it is a subset.
    eq = np.all(ma <= mb, axis=1)
    same[kind] += int(eq.sum())
    total[kind] += eq.size
  for kind in sorted(total):
    print(f"{kind:10s} {same[kind] / total[kind]:.4f} of {total[kind]} groups")
  print(f"{'overall':10s} {sum(same.values()) / sum(total.values()):.4f} of {sum(total.values())} groups the same "
        f"as the {'pruned reference' if args.pruned_ref else 'magnitude masks of the reference'}")


if __name__ == "__main__":
  main()
