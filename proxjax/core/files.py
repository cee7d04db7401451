"""Files written so that a killed run never leaves a half-written one: atomic writes, JSON reports, run directories."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
from collections.abc import Callable, Iterator
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


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def run_lock(path: str, what: str) -> Iterator[None]:
  """Holds the lock file ``path`` while a run writes ``what``: created exclusively with this process's host and pid,
  removed at the end (also on errors). A second run on the same ``what`` refuses with a ``ValueError`` naming the
  holder instead of racing it; a lock left by a process that no longer runs (same host, dead pid) is taken over.

  Example:
    >>> import tempfile, os
    >>> lock = os.path.join(tempfile.mkdtemp(), "out.proxjax-lock")
    >>> with run_lock(lock, "out"):
    ...   with run_lock(lock, "out"):
    ...     pass
    Traceback (most recent call last):
    ValueError: another proxjax run (pid ...) is writing out; wait for it to finish, or remove ... if it is gone
    >>> os.path.exists(lock)
    False
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  me = {"host": socket.gethostname(), "pid": os.getpid()}
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        with open(path) as f:
          holder = json.load(f)
      except (OSError, ValueError):
        holder = {}
      if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)  # stale: its process is gone
        continue
      raise ValueError(f"another proxjax run (pid {holder.get('pid', '?')} on {holder.get('host', '?')}) is writing "
                       f"{what}; wait for it to finish, or remove {path} if it is gone") from None
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    break
  try:
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


def remove_stale_temporaries(directory: str) -> list[str]:
  """Removes what :func:`atomic_write` leaves behind when a process is killed mid-write (``NAME.tmp-PID...`` files
  in ``directory``); call it while holding the run's lock. Returns the removed paths."""
  removed = []
  for p in glob.glob(os.path.join(glob.escape(directory), "*.tmp-*")):
    if os.path.isfile(p):
      os.remove(p)
      removed.append(p)
  return removed
