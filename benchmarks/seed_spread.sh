#!/usr/bin/env bash
# Prox (its default) against SparseGPT + CG on the whole of SmolLM2-135M, at the README table's protocol, for three
# calibration seeds and three calibration batch sizes (the float32 rounding spread): issue "prox quality per cost".
# Each run writes OUT/NAME/proxjax-report.json (lee PPL, per-layer losses, times); a finished run is skipped, an
# interrupted one resumes from its state directory. SEEDS="2 0 1" changes the order of the seeds (default 0 1 2).
# Summarize with: python benchmarks/seed_spread.py OUT
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/seed-spread}
COMMON="--nsamples 32 --seqlen 512 --calibration wiki --eval lee --eval-seqlen 512 --quiet"
run() { name=$1; shift; out=$OUT/$name
  if [ -f $out/proxjax-report.json ]; then echo "skip $name"; return; fi
  echo "=== $name: $(date +%H:%M:%S)"
  /usr/bin/time -f "$name wall %e s" .venv/bin/proxjax prune smollm2 $out $COMMON "$@" 2>&1 | tail -3; }
for seed in ${SEEDS:-0 1 2}; do
  run prox-seed$seed --method prox --seed $seed
  run sparsegpt-cg-seed$seed --method sparsegpt --refine cg --seed $seed
done
for bs in 1 2; do
  run prox-seed0-bs$bs --method prox --seed 0 --batch-size $bs
  run sparsegpt-cg-seed0-bs$bs --method sparsegpt --refine cg --seed 0 --batch-size $bs
done
echo "=== done $(date +%H:%M:%S)"
