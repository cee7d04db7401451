"""Lazy re-exports: a package lists its public names and the modules that define them, and a name's module is
imported on first access (PEP 562), so ``import proxjax`` and the command line's argument checks do not import JAX."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(package: str, table: Mapping[str, Sequence[str]]) -> tuple[Callable[[str], Any], Callable[[], list]]:
  """``(__getattr__, __dir__)`` for ``package``, given ``{module: [names it exports]}``.

  Example:
    >>> getattr_, dir_ = lazy_exports("m", {"math": ["pi"]})
    >>> round(getattr_("pi"), 2), "pi" in dir_()
    (3.14, True)
  """
  owner = {name: module for module, names in table.items() for name in names}

  def getattr_(name: str) -> Any:
    if name not in owner:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return getattr(importlib.import_module(owner[name]), name)

  def dir_() -> list[str]:
    return sorted(owner)

  return getattr_, dir_
