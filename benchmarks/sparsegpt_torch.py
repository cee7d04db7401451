"""A PyTorch transcription of the reference SparseGPT ``fasterprune`` for N:M sparsity (tests and benchmarks).

Written the way the reference code (Frantar & Alistarh, ``sparsegpt.py``) is structured, from the algorithm's
description: Python loops over blocks and over the columns of a block, ``torch.linalg.cholesky``,
``torch.cholesky_inverse`` and the upper Cholesky factor of the inverse. Layout is the PyTorch one: ``W`` is
``(d_out, d_in)`` and the N:M groups run along a row.

Deliberate differences from the reference, so that it can be compared exactly with ``proxjax.pruning.baselines.sparsegpt``:

* ``n`` is the number of weights **kept** per group of ``m`` (the reference's ``prunen`` counts pruned ones; for 2:4
  both are 2), and the kept set is the ``n`` largest scores with ties going to the lower index (a stable sort)
  instead of ``torch.topk(largest=False)``, whose tie order is unspecified.
* ``H`` is passed as ``X Xᵀ / n`` and doubled here (the reference accumulates ``2 X Xᵀ / #samples`` itself).
* ``blocksize`` must be a multiple of ``m`` (otherwise the reference scores a group cut by a block boundary on a
  truncated slice); the last block may be shorter.
* ``dtype`` selects the compute precision (``torch.float64`` for test references; the reference uses float32).

Run ``python benchmarks/sparsegpt_torch.py`` for a small self-check and timing.
"""

from __future__ import annotations

import time

import numpy as np
import torch


def sparsegpt_torch(W, H, *, n: int = 2, m: int = 4, blocksize: int = 128, damp: float = 0.01,
                    dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
  """SparseGPT N:M pruning of ``W`` (``(d_out, d_in)``) given ``H = X Xᵀ / n`` (``(d_in, d_in)``).

  Returns ``(W_new, keep)``: the pruned and updated weights in ``dtype`` and the bool keep-mask, both
  ``(d_out, d_in)``. Raises ``torch.linalg.LinAlgError`` when the damped Hessian is not positive definite.
  """
  W = torch.as_tensor(np.asarray(W) if not isinstance(W, torch.Tensor) else W).to(dtype).clone()
  H = torch.as_tensor(np.asarray(H) if not isinstance(H, torch.Tensor) else H).to(dtype).clone()
  rows, columns = W.shape
  if H.shape != (columns, columns):
    raise ValueError(f"H must be ({columns}, {columns}), got {tuple(H.shape)}")
  if columns % m or blocksize % m:
    raise ValueError("d_in and blocksize must be multiples of m")

  H = 2 * H
  dead = torch.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0

  d = damp * torch.mean(torch.diag(H))
  diag = torch.arange(columns)
  H[diag, diag] += d
  H = torch.linalg.cholesky(H)
  H = torch.cholesky_inverse(H)
  H = torch.linalg.cholesky(H, upper=True)
  Hinv = H

  keep = torch.zeros_like(W, dtype=torch.bool)
  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    count = i2 - i1

    W1 = W[:, i1:i2].clone()
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    prune1 = torch.zeros_like(W1, dtype=torch.bool)

    for i in range(count):
      w = W1[:, i]
      dd = Hinv1[i, i]

      if i % m == 0:
        tmp = W1[:, i:(i + m)] ** 2 / (torch.diag(Hinv1)[i:(i + m)].reshape((1, -1))) ** 2
        order = torch.sort(tmp, dim=1, descending=True, stable=True)[1]  # ties: lower index first
        prune1[:, i:(i + m)].scatter_(1, order[:, n:], True)

      q = w.clone()
      q[prune1[:, i]] = 0
      Q1[:, i] = q

      err1 = (w - q) / dd
      W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
      Err1[:, i] = err1

    W[:, i1:i2] = Q1
    keep[:, i1:i2] = ~prune1
    W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

  return W, keep


def _main() -> None:
  import argparse

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--d-in", type=int, default=1024)
  ap.add_argument("--d-out", type=int, default=1024)
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--blocksize", type=int, default=128)
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  d_in, d_out, tokens = args.d_in, args.d_out, args.tokens
  X = rng.normal(size=(d_in, tokens))
  X[1::2] = 0.95 * X[0::2] + np.sqrt(1 - 0.95**2) * X[1::2]  # docs/method.md, "The toy layer": correlated consecutive pairs
  X *= rng.uniform(0.5, 2.0, size=(d_in, 1))
  H = X @ X.T / tokens
  W = rng.normal(size=(d_out, d_in))

  def report(name, Wn, keep, dt, ref_keep=None):
    Wn, keep = np.asarray(Wn, np.float64), np.asarray(keep)
    D = Wn - W
    loss = np.trace(D @ H @ D.T) / np.trace(W @ H @ W.T)
    line = (f"{name:>18}: {dt:8.3f} s  kept/group {sorted(set(keep.reshape(d_out, -1, 4).sum(-1).ravel().tolist()))}  "
            f"zeros off-mask {bool(np.all(Wn[~keep] == 0))}  relative local loss {loss:.5f}")
    if ref_keep is not None:
      line += f"  groups differing from float64: {(keep != ref_keep).reshape(d_out, -1, 4).any(-1).mean():.4%}"
    print(line)

  print(f"W ({d_out}, {d_in}), {tokens} tokens, blocksize {args.blocksize}, torch threads {torch.get_num_threads()}")
  ref_keep = None
  for dtype in (torch.float64, torch.float32):
    t0 = time.perf_counter()
    Wn, keep = sparsegpt_torch(W, H, blocksize=args.blocksize, dtype=dtype)
    dt = time.perf_counter() - t0
    report(f"torch {str(dtype)[6:]}", Wn.numpy(), keep.numpy(), dt, ref_keep)
    ref_keep = keep.numpy() if ref_keep is None else ref_keep
  try:
    import jax
    import jax.numpy as jnp

    from proxjax.pruning import baselines
  except ImportError:
    return
  k, h = jnp.asarray(W.T, jnp.float32), jnp.asarray(H, jnp.float32)
  t0 = time.perf_counter()
  jax.block_until_ready(baselines.sparsegpt(k, h, blocksize=args.blocksize))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  kn, mask = jax.block_until_ready(baselines.sparsegpt(k, h, blocksize=args.blocksize))
  dt = time.perf_counter() - t0
  report(f"proxjax ({jax.default_backend()})", np.asarray(kn).T, np.asarray(mask).T, dt, ref_keep)
  print(f"{'':>18}  (first call incl. compile {compile_s:.3f} s)")


if __name__ == "__main__":
  _main()
