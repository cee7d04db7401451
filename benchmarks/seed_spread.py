"""Summarizes ``benchmarks/seed_spread.sh``: lee perplexity, mean relative local loss and times per run, the spread
over seeds and batch sizes per method, and the ratios between the methods (issue "prox quality per cost").

    python benchmarks/seed_spread.py runs/seed-spread
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out", type=pathlib.Path, help="the OUT folder of seed_spread.sh")
  args = parser.parse_args()
  rows = {}
  for report in sorted(args.out.glob("*/proxjax-report.json")):
    r = json.loads(report.read_text())
    prune_s = sum(layer["seconds"] for layer in r["layers"])
    rows[report.parent.name] = (r["eval"]["ppl"], r["summary"]["mean_relative_local_loss"], prune_s, r["seconds"])
  print("| run | lee PPL | mean relative local loss | pruning s (sum over layers) | run s |")
  print("|---|---|---|---|---|")
  for name, (ppl, loss, prune_s, total) in rows.items():
    print(f"| {name} | {ppl:.2f} | {loss:.4f} | {prune_s:.0f} | {total:.0f} |")
  print()
  for method in ("prox", "sparsegpt-cg"):
    for kind, keys in (("seeds 0,1,2", [f"{method}-seed{s}" for s in range(3)]),
                       ("batch sizes 8,1,2 (seed 0)", [f"{method}-seed0"] + [f"{method}-seed0-bs{b}" for b in (1, 2)])):
      ppl = [rows[k][0] for k in keys if k in rows]
      if len(ppl) > 1:
        mean = statistics.mean(ppl)
        print(f"{method}, {kind}: PPL {' '.join(f'{p:.2f}' for p in ppl)}; mean {mean:.2f}, "
              f"spread ±{(max(ppl) - min(ppl)) / 2 / mean:.1%}")
  for seed in range(3):
    p, s = rows.get(f"prox-seed{seed}"), rows.get(f"sparsegpt-cg-seed{seed}")
    if p and s:
      print(f"seed {seed}: prox PPL {p[0] / s[0] - 1:+.1%} against SparseGPT + CG, pruning time {p[2] / s[2]:.2f}x")


if __name__ == "__main__":
  main()
