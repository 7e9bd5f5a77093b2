#!/usr/bin/env bash
# Re-test finished grid cells with the deterministic few-step read-out (DDIM-5 from the prior mean at
# the first step of the truncated window, one sample; docs/performance.md "Few-step sampling"), without
# touching the cells: each run folder is copied (checkpoints, config, split) to DEST/<model>_det/seedN
# and tested there.
#   benchmarks/retest_deterministic.sh runs/exp_ham_core/ham10000 full runs/exp_ham_det/ham10000
set -euo pipefail
src=$1; model=$2; dest=$3
DIFFMIC=${DIFFMIC:-.venv/bin/diffmic}
for cell in "$src/$model"/seed*; do
  [ -f "$cell/test_metrics.json" ] || continue
  out="$dest/${model}_det/$(basename "$cell")"
  if [ -f "$out/test_metrics.json" ]; then echo "$out: done"; continue; fi
  if [ -e "$out" ]; then echo "$out exists and holds no test: remove it or choose another DEST" >&2; exit 2; fi
  mkdir -p "$out"
  cp -r "$cell/checkpoints" "$cell/config.yaml" "$cell/split.json" "$out/"
  sed -i "s#^  dir: .*#  dir: $out#" "$out/config.yaml"
  $DIFFMIC test --run "$out" eval.sampler=ddim eval.steps=5 eval.start=mean eval.t_start=24 eval.num_samples=1
done
