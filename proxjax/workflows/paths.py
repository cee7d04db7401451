"""Checks of the paths a workflow reads and writes, made before anything is loaded (no JAX is imported here).

The source is sacred: no output, state directory or report may be the input checkpoint, lie inside it or contain it,
with or without ``--overwrite``; ``--overwrite`` replaces only a previous proxjax output. Every path to be written
must lie below directories (not below a regular file) and in a writable place. Each problem is one
``ValueError`` naming the argument and what would be valid.

Example:
  >>> import tempfile, os
  >>> src = tempfile.mkdtemp()
  >>> check_output(src, sources=[src], overwrite=True)
  Traceback (most recent call last):
  ValueError: OUT_DIR ... is the input checkpoint ...; choose another directory (the source is never written)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["OUTPUT_MARKERS", "check_file", "check_output", "check_state_dir", "model_path"]

OUTPUT_MARKERS = ("proxjax.json", "proxjax_conversion.json")
"""Files that mark a directory as a previous proxjax output (which ``--overwrite`` may replace)."""


def model_path(name: str) -> str:
  """The checkpoint directory a model argument names, without converting or loading anything: ``smollm2`` is the
  bundled model's cache directory, anything else must be a directory."""
  if name == "smollm2":
    from proxjax.models.convert import bundled_model_dir  # pylint: disable=import-outside-toplevel
    return str(bundled_model_dir())
  if not os.path.isdir(name):
    raise ValueError(f"{name} is not a directory (expected a Hugging Face checkpoint directory or 'smollm2')")
  return name


def _real(path: str) -> str:
  return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(path: str, parent: str) -> bool:
  return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def _check_place(path: str, what: str, sources: Sequence[str]) -> str:
  """Common checks of a path to be written: not the source, not inside or around it, below directories only, and
  in a writable place. Returns the real absolute path."""
  real = _real(path)
  for source in sources:
    src = _real(source)
    if real == src:
      raise ValueError(f"{what} {path} is the input checkpoint {source}; choose another directory (the source is "
                       "never written)")
    if _inside(real, src):
      raise ValueError(f"{what} {path} lies inside the input checkpoint {source}; choose a path outside it")
    if _inside(src, real):
      raise ValueError(f"{what} {path} contains the input checkpoint {source}; choose a path that does not")
  probe = real
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if probe != real and not os.path.isdir(probe):
    raise ValueError(f"{what} {path} lies below {probe}, which is a file, not a directory")
  if not os.access(probe if os.path.isdir(probe) else os.path.dirname(probe), os.W_OK | os.X_OK):
    raise ValueError(f"{what} {path}: {probe} is not writable")
  return real


def check_output(out_dir: str, *, sources: Sequence[str] = (), overwrite: bool = False,
                 what: str = "OUT_DIR") -> str:
  """The absolute output directory, checked: a new or empty directory, or (with ``overwrite``) a previous proxjax
  output (it holds one of :data:`OUTPUT_MARKERS`); never a source, inside one or around one."""
  _check_place(out_dir, what, sources)
  out = os.path.abspath(out_dir)
  if os.path.exists(out):
    if not os.path.isdir(out):
      raise ValueError(f"{what} {out_dir} exists and is a file, not a directory")
    entries = os.listdir(out)
    if entries and not overwrite:
      raise ValueError(f"{what} {out} exists and is not empty (use --overwrite to replace a previous output)")
    if entries and not any(m in entries for m in OUTPUT_MARKERS):
      raise ValueError(f"{what} {out} is not empty and is not a proxjax output (no {' or '.join(OUTPUT_MARKERS)}); "
                       "--overwrite replaces only a previous output: choose an empty or new directory")
  return out


def check_state_dir(state_dir: str, *, sources: Sequence[str] = (), what: str = "--state-dir") -> str:
  """The absolute resume-state directory, checked: a directory (or not yet existing) in a writable place, not a
  source."""
  _check_place(state_dir, what, sources)
  if os.path.exists(state_dir) and not os.path.isdir(state_dir):
    raise ValueError(f"{what} {state_dir} exists and is a file, not a directory")
  return os.path.abspath(state_dir)


def check_file(path: str, *, sources: Sequence[str] = (), what: str) -> str:
  """The absolute path of a file to be written (a report, a plot, a JSON result), checked: not a directory, in a
  writable place, not inside a source."""
  _check_place(path, what, sources)
  if os.path.isdir(path):
    raise ValueError(f"{what} {path} is a directory; give a file path")
  return os.path.abspath(path)
