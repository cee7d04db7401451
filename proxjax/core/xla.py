"""Compilation helpers: XLA:CPU fast-math for the prox's elementwise Newton iterations."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

CPU_FAST_MATH = dict(
    xla_cpu_enable_fast_math=True,
    xla_cpu_fast_math_honor_nans=True,
    xla_cpu_fast_math_honor_infs=True,
    xla_cpu_fast_math_honor_division=True,
    xla_cpu_fast_math_honor_functions=True,
)
"""XLA compiler options that let XLA:CPU reassociate and contract (FMA) floating-point arithmetic while still honouring
NaNs, infinities, exact division and exact library functions.

XLA:CPU's default strict mode makes the prox's elementwise Newton iterations about 3x slower; with these options the
prox still passes the exactness tests (tests/core/test_prox_exact.py: zero misses against the brute force). proxjax uses
them for its own top-level CPU compilations (``prox_24`` called eagerly, the prox-gradient loop of
``prune_kernel``); pass them yourself to a jitted training step that calls ``prox_24`` on CPU::

  step = jax.jit(train_step, compiler_options=proxjax.CPU_FAST_MATH)

They are ``xla_cpu_*`` options: other backends ignore them.
"""


def _is_cpu_value(x: Any) -> bool:
  if isinstance(x, jax.core.Tracer):
    return False
  if isinstance(x, jax.Array):
    return all(d.platform == "cpu" for d in x.devices())
  return jax.default_backend() == "cpu"


def jit_fast_on_cpu(fun: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
  """``jax.jit(fun, **jit_kwargs)``, compiled with :data:`CPU_FAST_MATH` when called at top level on CPU arrays.

  Inside another trace (nested jit, vmap, grad) the strict version is used: XLA accepts compiler options only for
  top-level compilations, and the caller's options then apply.
  """
  strict = jax.jit(fun, **jit_kwargs)
  fast = jax.jit(fun, compiler_options=CPU_FAST_MATH, **jit_kwargs)

  @functools.wraps(fun)
  def call(*args: Any, **kwargs: Any) -> Any:
    leaves = jax.tree.leaves((args, kwargs))
    if leaves and all(_is_cpu_value(x) for x in leaves):
      return fast(*args, **kwargs)
    return strict(*args, **kwargs)

  call.strict = strict  # type: ignore[attr-defined]
  call.fast = fast  # type: ignore[attr-defined]
  return call
