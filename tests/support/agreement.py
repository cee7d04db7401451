"""The agreement criterion for iterative pruners (SparseGPT, prox) run on a mesh or across processes.

A sharded reduction (the Hessian summed over the data axis, a matmul split over the model axis) rounds differently
from the single-device one, and an iterative method can then decide a near-tie group the other way: on the tiny test
models one such group changes a layer's local loss by up to a few tenths of a percent (seen: 2 of 8192 weights,
0.27 %). A wrong reduction (a shard missing, a Hessian summed twice) changes most of the mask. So the criterion is:

- at least 99.9 % of every kernel's mask agrees, and
- where every mask is identical, each layer's relative local loss agrees to 1e-5 absolute (same supports, same
  refinement to the same tolerance: only rounding differs); once any mask differs, to 1 % of its value (a different
  mask upstream also changes the inputs, so the Hessians, of every later layer).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def assert_iterative_agreement(kernels: Mapping[str, np.ndarray], ref_kernels: Mapping[str, np.ndarray],
                               losses: Mapping[str, float], ref_losses: Mapping[str, float], what: str = "") -> None:
  """Asserts the criterion above for kernels and local losses keyed by layer name (``"block.name"``)."""
  assert kernels.keys() == ref_kernels.keys(), (what, sorted(kernels), sorted(ref_kernels))
  assert losses.keys() == ref_losses.keys(), (what, sorted(losses), sorted(ref_losses))
  agree = {n: float(np.mean((np.asarray(kernels[n]) != 0) == (np.asarray(r) != 0))) for n, r in ref_kernels.items()}
  for name, fraction in agree.items():
    assert fraction >= 0.999, (what, name, fraction)
  identical = all(fraction == 1.0 for fraction in agree.values())
  for name, ref in ref_losses.items():
    bound = 1e-5 if identical else 1e-2 * abs(ref)
    assert abs(losses[name] - ref) <= bound, (what, name, losses[name], ref, "masks identical" if identical else "")
