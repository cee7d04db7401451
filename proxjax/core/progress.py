"""A progress meter that compiled loops can advance: ``meter.tick(k, every)`` inside ``jit`` (a host callback every
``every`` iterations, ``every`` traced, 0 = off) moves the tqdm bar that the non-jitted caller opened with
``with meter.show(total, desc):``.

The compiled program holds only the meter's name, never a bar, so one compile serves every call with the bar on or
off; the bar is found by name while it is shown. That lookup table of the bars being shown is the one piece of
module state in proxjax, and it exists for this reason (equinox and diffrax progress meters work the same way). The
cost when off is one scalar ``lax.cond`` per iteration.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["ProgressMeter", "every_n"]

DEFAULT_EVERY = 10


def every_n(progress: bool | int | None) -> int:
  """The callback interval of a ``progress`` option: ``True`` → 10, ``False``/``None`` → 0 (off), ``N > 0`` → N.

  Example:
    >>> every_n(True), every_n(False), every_n(25)
    (10, 0, 25)
  """
  if progress is True:
    return DEFAULT_EVERY
  if progress is False or progress is None:
    return 0
  if isinstance(progress, int) and progress > 0:
    return progress
  raise ValueError(f"progress must be a bool or a positive int (report every N iterations), got {progress!r}")


class ProgressMeter:
  """A named progress bar for compiled loops.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> meter = ProgressMeter("demo")
    >>> @jax.jit
    ... def count(n, every):
    ...   def body(k, x):
    ...     meter.tick(k + 1, every)
    ...     return x + 1
    ...   return jax.lax.fori_loop(0, n, body, 0)
    >>> with meter.show(100, "counting", enabled=False):
    ...   int(count(100, 0))
    100
  """

  _shown: ClassVar[dict[str, Any]] = {}

  def __init__(self, name: str):
    self.name = name

  @staticmethod
  def _update(name: str, k: Any, left: Any) -> None:
    bar = ProgressMeter._shown.get(name)
    if bar is None:
      return
    k = int(k)
    if k > bar.n:
      bar.update(k - bar.n)
    if int(left) >= 0:
      bar.set_postfix(groups_left=int(left), refresh=False)

  def tick(self, k: jax.Array, every: jax.Array | None, left: jax.Array | int = -1) -> None:
    """Inside a compiled loop: report iteration ``k`` (and an optional count ``left``) when ``every > 0`` divides it.

    ``every=None`` compiles no callback at all.
    """
    if every is None:
      return
    report = functools.partial(ProgressMeter._update, self.name)
    left = jnp.asarray(left, jnp.int32)
    every = jnp.asarray(every, jnp.int32)
    due = (every > 0) & (k % jnp.maximum(every, 1) == 0)
    lax.cond(due, lambda: jax.debug.callback(report, k, left), lambda: None)

  @contextlib.contextmanager
  def show(self, total: int, desc: str, enabled: bool = True) -> Iterator[None]:
    """Shows a tqdm bar that this meter's ticks advance while a (blocking) computation runs."""
    if not enabled:
      yield
      return
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=total, desc=desc, leave=False)
    ProgressMeter._shown[self.name] = bar
    try:
      yield
    finally:
      jax.effects_barrier()
      ProgressMeter._shown.pop(self.name, None)
      bar.close()


PROX = ProgressMeter("prox")
"""The meter of the prox-gradient loop."""

REFINE = ProgressMeter("refine")
"""The meter of the refinement loops."""
