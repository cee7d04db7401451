"""The toy layer of docs/method.md ("The toy layer"), on which the prox method visibly beats the layer-wise baselines.

Consecutive input features come in strongly correlated pairs, so the best 2:4 support keeps one feature of a pair and
lets refinement move the other's weight onto it; magnitude and Wanda scores cannot see that, the local loss can.
Used by the tests and benchmarks; handy for trying methods and options.
"""

from __future__ import annotations

import numpy as np

__all__ = ["correlated_pairs_layer"]


def correlated_pairs_layer(d_in: int = 64, d_out: int = 32, tokens: int = 4000, *, rho: float = 0.95,
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  r"""A random layer and calibration inputs with correlated feature pairs (docs/method.md, "The toy layer").

  ``z ~ N(0, I)``; ``x_{2j} = z_{2j}``, ``x_{2j+1} = ρ z_{2j} + \sqrt{1 − ρ²} z_{2j+1}``; every feature scaled by
  ``U(0.5, 2)``; ``W ~ N(0, 1)``.

  Returns:
    ``(kernel, x, hessian)``: the kernel in Flax layout ``(d_in, d_out)`` float32, the inputs ``X`` ``(d_in, tokens)``
    float64 and ``H = X Xᵀ / tokens`` float64 (cast it to float32 for the pruners).

  Example:
    >>> import numpy as np, proxjax
    >>> from proxjax.core.toy import correlated_pairs_layer
    >>> k, x, h = correlated_pairs_layer()
    >>> res = proxjax.prune_kernel(k, h.astype(np.float32), "wanda")
    >>> round(float(res.info.loss_after_refine), 3)
    0.101
  """
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(d_in, tokens))
  x = z.copy()
  x[1::2] = rho * z[0::2] + np.sqrt(1 - rho**2) * z[1::2]
  x *= rng.uniform(0.5, 2.0, size=(d_in, 1))
  w = rng.normal(size=(d_out, d_in))
  return w.T.astype(np.float32), x, x @ x.T / tokens
