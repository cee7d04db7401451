#!/usr/bin/env bash
# SmolLM2-135M results table: every method on the same calibration (offline Wikipedia calibration articles,
# 32 x 512 packed tokens, seed 0), evaluated on the offline news evaluation split (lee, seqlen 512).
# Resumable: a finished run (report present) is skipped; an interrupted one resumes from its state directory.
cd "$(dirname "$0")/.."
COMMON="--nsamples 32 --seqlen 512 --calibration wiki --seed 0 --eval lee --eval-seqlen 512 --quiet"
run() { name=$1; shift; out=${OUT:-runs}/$name
  if [ -f $out/proxjax-report.json ]; then echo "skip $name"; return; fi
  echo "=== $name: $(date +%H:%M:%S)"; /usr/bin/time -f "$name wall %e s" .venv/bin/proxjax prune smollm2 $out $COMMON "$@"; }
run wanda --method wanda
run prox-cg --method prox --budget 300
run sparsegpt --method sparsegpt
run wanda-cg --method wanda --refine cg
run sparsegpt-cg --method sparsegpt --refine cg
run magnitude --method magnitude
echo "=== done $(date +%H:%M:%S)"
