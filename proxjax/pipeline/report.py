"""The per-layer local-loss plot of prune reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from proxjax.core.files import atomic_write

__all__ = ["plot_layer_losses"]


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
