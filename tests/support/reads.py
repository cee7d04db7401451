"""What :func:`proxjax.models.load_pretrained` reads of the weight files: :func:`recording` wraps the ``safe_open`` that
``proxjax.models.hf`` calls and notes every tensor data read (``get_tensor``: the whole tensor; ``get_slice(name)[...]``:
the block asked for). Reading a header (``keys``, ``get_slice(name).get_shape()``) reads no tensor data and is not
noted."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

Read = tuple[str, list[list[int]] | None, int]
"""``(tensor name, [[start, stop] per axis] or None for the whole tensor, bytes)``."""


def _ranges(index: Any, shape: list[int]) -> list[list[int]]:
  index = index if isinstance(index, tuple) else (index,)
  index = index + (slice(None),) * (len(shape) - len(index))
  return [list(s.indices(n)[:2]) for s, n in zip(index, shape)]


class _Slice:
  def __init__(self, real: Any, name: str, reads: list[Read]):
    self.real, self.name, self.reads = real, name, reads

  def get_shape(self) -> list[int]:
    return self.real.get_shape()

  def get_dtype(self) -> str:
    return self.real.get_dtype()

  def __getitem__(self, index: Any) -> Any:
    out = self.real[index]
    self.reads.append((self.name, _ranges(index, list(self.real.get_shape())), int(out.nbytes)))
    return out


class _File:
  def __init__(self, real: Any, reads: list[Read]):
    self.real, self.reads = real, reads

  def __enter__(self) -> _File:
    self.real.__enter__()
    return self

  def __exit__(self, *exc: Any) -> Any:
    return self.real.__exit__(*exc)

  def keys(self) -> list[str]:
    return self.real.keys()

  def metadata(self) -> Any:
    return self.real.metadata()

  def get_slice(self, name: str) -> _Slice:
    return _Slice(self.real.get_slice(name), name, self.reads)

  def get_tensor(self, name: str) -> Any:
    out = self.real.get_tensor(name)
    self.reads.append((name, None, int(out.nbytes)))
    return out


@contextlib.contextmanager
def recording() -> Iterator[list[Read]]:
  """Within it, every tensor read of ``proxjax.models.hf`` is appended to the yielded list (:data:`Read`)."""
  from proxjax.models import hf  # noqa: PLC0415

  reads: list[Read] = []
  real = hf.safe_open
  hf.safe_open = lambda path, framework: _File(real(path, framework=framework), reads)
  try:
    yield reads
  finally:
    hf.safe_open = real


def elements(ranges: list[list[int]]) -> int:
  """The number of elements of a block."""
  return math.prod(b - a for a, b in ranges)
