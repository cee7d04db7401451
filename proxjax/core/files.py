"""Files written so that a killed run never leaves a half-written one: atomic writes, JSON reports, run directories."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np


def json_default(obj: Any) -> Any:
  if isinstance(obj, np.generic) or (hasattr(obj, "shape") and hasattr(obj, "dtype")):
    arr = np.asarray(obj)
    return arr.item() if arr.ndim == 0 else arr.tolist()
  if isinstance(obj, tuple):
    return list(obj)
  if hasattr(obj, "_asdict"):
    return obj._asdict()
  return str(obj)


def json_roundtrip(obj: Any) -> Any:
  """``obj`` as it reads back from a JSON file written by :func:`write_json` (keys sorted): what a saved fingerprint
  compares equal to.

  Example:
    >>> json_roundtrip({"b": (1, 2), "a": np.float32(0.5)})
    {'a': 0.5, 'b': [1, 2]}
  """
  return json.loads(json.dumps(obj, default=json_default, sort_keys=True))


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Calls ``write(tmp)`` on a temporary sibling of ``path`` and renames it onto ``path``: all or nothing.

  A failure (or a killed process) leaves any previous ``path`` untouched and removes the temporary file.

  Example:
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "a.txt")
    >>> atomic_write(p, lambda tmp: open(tmp, "w").write("done"))
    >>> open(p).read()
    'done'
  """
  tmp = f"{path}.tmp-{os.getpid()}{os.path.splitext(path)[1]}"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically (:func:`atomic_write`), creating its directory.

  NumPy/JAX scalars and arrays become numbers and lists, NamedTuples become objects, anything else its ``str``.

  Example:
    >>> import tempfile, os, json
    >>> p = os.path.join(tempfile.mkdtemp(), "r.json")
    >>> write_json(p, {"ppl": np.float32(12.5)})
    >>> json.load(open(p))
    {'ppl': 12.5}
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(tmp: str) -> None:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1, default=json_default)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())

  atomic_write(path, write)


def open_run_dir(state_dir: str, fingerprint: dict[str, Any]) -> None:
  """Creates the resume directory ``state_dir`` with ``run.json = fingerprint``, or checks that an existing one
  belongs to the same run (the fingerprint compared as JSON) and refuses it with the differing keys otherwise.

  Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> open_run_dir(d, {"method": "prox"}); open_run_dir(d, {"method": "prox"})
    >>> open_run_dir(d, {"method": "wanda"})
    Traceback (most recent call last):
    ValueError: state directory ... belongs to a different run (differs in: method); ...
  """
  os.makedirs(state_dir, exist_ok=True)
  run = os.path.join(state_dir, "run.json")
  if not os.path.exists(run):
    write_json(run, fingerprint)
    return
  with open(run) as f:
    saved = json.load(f)
  as_json = lambda x: json.dumps(x, default=json_default)  # noqa: E731
  if saved != json.loads(as_json(fingerprint)):
    diff = sorted(k for k in set(saved) | set(fingerprint) if as_json(saved.get(k)) != as_json(fingerprint.get(k)))
    raise ValueError(f"state directory {state_dir} belongs to a different run (differs in: {', '.join(diff)}); "
                     "use another state directory or delete this one to start over")
