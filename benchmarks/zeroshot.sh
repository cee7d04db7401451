#!/usr/bin/env bash
# Zero-shot accuracy of SmolLM2-135M pruned to 2:4 by every method, on the bundled offline task lee_last_word
# (docs/method.md, "Zero-shot task"), with proxjax's lm-eval backend: issue "zero-shot accuracy". Each model is pruned
# at the README table's protocol (32 x 512 wiki tokens, seed 0, lee PPL at 512), then evaluated; results go to
# $OUT/NAME.json (lm-eval's results) beside the pruned checkpoints in $MODELS/NAME. Finished steps are skipped, so an
# interrupted run picks up where it stopped. The prox and SparseGPT + CG models are those of seed_spread.sh (seed 0).
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/zeroshot}; MODELS=${MODELS:-runs/zeroshot-models}; SPREAD=${SPREAD:-runs/seed-spread}
COMMON="--nsamples 32 --seqlen 512 --calibration wiki --seed 0 --eval lee --eval-seqlen 512 --quiet"
mkdir -p $OUT $MODELS
prune() { name=$1; shift
  if [ -f $MODELS/$name/proxjax-report.json ]; then return; fi
  echo "=== prune $name: $(date +%H:%M:%S)"
  /usr/bin/time -f "$name prune wall %e s" .venv/bin/proxjax prune smollm2 $MODELS/$name $COMMON "$@" 2>&1 | tail -3; }
evaluate() { name=$1; model=$2
  if [ -f $OUT/$name.json ]; then echo "skip eval $name"; return; fi
  echo "=== eval $name: $(date +%H:%M:%S)"
  /usr/bin/time -f "$name eval wall %e s" .venv/bin/proxjax eval $model --tasks lee_last_word --json $OUT/$name.json \
    2>&1 | tail -4; }
evaluate dense smollm2
for m in magnitude wanda sparsegpt; do prune $m --method $m; evaluate $m $MODELS/$m; done
prune wanda-cg --method wanda --refine cg; evaluate wanda-cg $MODELS/wanda-cg
evaluate prox-seed0 $SPREAD/prox-seed0
evaluate sparsegpt-cg-seed0 $SPREAD/sparsegpt-cg-seed0
# recovery fine-tuning of the prox + CG model, the README's protocol (40 steps of 4 x 256 wiki tokens, lr 5e-5)
if [ ! -f $MODELS/prox-seed0-ft/proxjax-finetune.json ]; then
  echo "=== finetune prox-seed0: $(date +%H:%M:%S)"
  .venv/bin/proxjax finetune $SPREAD/prox-seed0 $MODELS/prox-seed0-ft --train wiki --steps 40 --batch-size 4 \
    --seqlen 256 --lr 5e-5 --eval lee --quiet 2>&1 | tail -3
fi
evaluate prox-seed0-ft $MODELS/prox-seed0-ft
# ProxSparse, the README's protocol (400 steps of 256 wiki tokens, lambda1 0.003 relative); --save-every 25 makes an
# interrupted run resume from its last saved step
if [ ! -f $MODELS/proxsparse400/proxjax-report.json ]; then
  echo "=== proxsparse: $(date +%H:%M:%S)"
  /usr/bin/time -f "proxsparse train wall %e s" .venv/bin/proxjax proxsparse smollm2 $MODELS/proxsparse400 --steps 400 \
    --seqlen 256 --split-documents --train wiki --lr 5e-4 --lam1 0.003 --lam-relative --save-every 25 --eval lee \
    --eval-seqlen 512 --quiet 2>&1 | tail -3
fi
evaluate proxsparse400 $MODELS/proxsparse400
python3 - "$OUT" <<'PY'
import json, pathlib, sys
print("| model | acc | acc stderr | perplexity of the last word |\n|---|---|---|---|")
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
  r = json.loads(p.read_text())["results"]["lee_last_word"]
  print(f"| {p.stem} | {r['acc,none']:.4f} | {r['acc_stderr,none']:.4f} | {r['perplexity,none']:.2f} |")
PY
echo "=== done $(date +%H:%M:%S)"
