"""The N:M pattern's argument check, free of JAX so that configurations can be validated before JAX is imported."""

from __future__ import annotations


def check_nm(n: int, m: int) -> None:
  """Raises ``ValueError`` unless ``n`` and ``m`` are Python ints with ``0 <= n < m``.

  Example:
    >>> check_nm(2, 4)
    >>> check_nm(4, 4)
    Traceback (most recent call last):
    ValueError: N:M sparsity needs 0 <= n < m, got n=4, m=4
  """
  if not (isinstance(n, int) and isinstance(m, int)) or isinstance(n, bool) or isinstance(m, bool):
    raise ValueError(f"n and m must be Python ints, got n={n!r}, m={m!r}")
  if m < 1 or n < 0 or n >= m:
    raise ValueError(f"N:M sparsity needs 0 <= n < m, got n={n}, m={m}")


def check_blocksize(blocksize: object, m: int) -> None:
  """Raises ``ValueError`` unless SparseGPT's ``blocksize`` is a positive multiple of ``m`` (a group may not straddle
  two blocks)."""
  if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 1 or blocksize % m:
    raise ValueError(f"blocksize must be a positive multiple of m={m} (groups may not straddle blocks), "
                     f"got {blocksize!r}")
