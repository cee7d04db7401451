"""Run reports: atomic JSON files and the per-layer local-loss plot."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


def _default(obj: Any) -> Any:
  if isinstance(obj, np.generic) or (hasattr(obj, "shape") and hasattr(obj, "dtype")):
    arr = np.asarray(obj)
    return arr.item() if arr.ndim == 0 else arr.tolist()
  if isinstance(obj, tuple):
    return list(obj)
  if hasattr(obj, "_asdict"):
    return obj._asdict()
  return str(obj)


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
      json.dump(obj, f, indent=1, default=_default)
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
  as_json = lambda x: json.dumps(x, default=_default)  # noqa: E731
  if saved != json.loads(as_json(fingerprint)):
    diff = sorted(k for k in set(saved) | set(fingerprint) if as_json(saved.get(k)) != as_json(fingerprint.get(k)))
    raise ValueError(f"state directory {state_dir} belongs to a different run (differs in: {', '.join(diff)}); "
                     "use another state directory or delete this one to start over")


def plot_layer_losses(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str, *,
                      key: str = "loss_after_refine", title: str | None = None) -> None:
  """Plots per-layer relative local loss, one line per run (e.g. per method), to a PNG written atomically.

  Args:
    runs: label → the ``layers`` list of a prune report (dicts with ``block``, ``name`` and ``key``).
    path: the PNG to write.
    key: which loss to plot (``"loss_after_refine"`` or ``"loss_before_refine"``).
    title: the figure title.

  The x axis is the linear's position in pruning order (block by block, projections in order), labelled by block;
  the y axis is logarithmic.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  if not runs:
    raise ValueError("nothing to plot: no runs given")
  fig, ax = plt.subplots(figsize=(11, 4.5))
  ticks: dict[int, int] = {}
  for label, layers in runs.items():
    if not layers:
      raise ValueError(f"run {label!r} has no layers")
    order = sorted(range(len(layers)), key=lambda i: (layers[i]["block"], i))
    ys = [max(float(layers[i][key]), 1e-8) for i in order]
    ax.plot(range(len(ys)), ys, marker=".", lw=1, ms=3, label=label)
    for x, i in enumerate(order):
      ticks.setdefault(int(layers[i]["block"]), x)
  ax.set_yscale("log")
  ax.set_xlabel("linear layer (pruning order; ticks mark the first linear of each block)")
  ax.set_ylabel("relative local loss" + (" (before refinement)" if key == "loss_before_refine" else ""))
  step = max(1, len(ticks) // 15)
  blocks = sorted(ticks)[::step]
  ax.set_xticks([ticks[b] for b in blocks], [str(b) for b in blocks])
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title)
  fig.tight_layout()
  try:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
  finally:
    plt.close(fig)
