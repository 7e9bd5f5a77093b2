#!/usr/bin/env bash
# The paper protocol (224 px, HAM10000 authors' split) on a GPU, time-boxed: `full` and `basic`.
#
#   benchmarks/gpu_paper_protocol.sh pack [HAM_DIR] [TAR]   # on the CPU machine: images + metadata
#                                                          # + splits into one tar (~55 MiB < 64 MiB)
#   benchmarks/gpu_paper_protocol.sh run  [TAR] [SECONDS]  # on the GPU machine: unpack, then fit (at
#                                                          # most SECONDS each, default 240) and test
#                                                          # `full` and `basic`; prints ONE JSON line
#
# Defaults: HAM_DIR=../shared/data/ham10000, TAR=shared/ham10000.tar.  The fit is stopped with
# SIGINT when its time box ends (Lightning stops cleanly; the checkpoint selected on the validation
# split so far is tested).  Epochs: full = 3 DCG warm-up + 30 joint, basic = 33 (the time box ends
# them first on most GPUs); eval: the preset's truncated chain (250 steps), 1 sample.
# Environment: PY (default .venv/bin/python), EXTRA (more key=value overrides for both fits).
# This is far shorter than the paper's 1000 epochs: its numbers are NOT the paper's (0.906 / 0.816).
set -euo pipefail
mode=${1:-}
PY=${PY:-.venv/bin/python}
case "$mode" in
  pack)
    src=${2:-../shared/data/ham10000}; tar_out=${3:-shared/ham10000.tar}
    mkdir -p "$(dirname "$tar_out")"
    tar -C "$src" -cf "$tar_out" images HAM10000_metadata.csv splits
    size=$(stat -c %s "$tar_out")
    echo "{\"packed\": \"$tar_out\", \"bytes\": $size, \"under_64MiB\": $([ "$size" -lt 67108864 ] && echo true || echo false)}"
    ;;
  run)
    tar_in=${2:-shared/ham10000.tar}; box=${3:-240}
    work=$(mktemp -d); mkdir -p "$work/ham10000"
    tar -C "$work/ham10000" -xf "$tar_in"
    out=${OUT:-$work}
    for v in full basic; do
      if [ "$v" = basic ]; then ep="train.epochs=33"; else ep="train.epochs=30 train.dcg_warmup_epochs=3"; fi
      start=$(date +%s)
      set +e
      timeout -s INT "$box" "$PY" -m diffmic.cli fit --config ham10000 data.root="$work/ham10000" \
        run.dir="$out/runs/$v" model.variant=$v $ep train.check_val_every_n_epoch=1 train.progress_bar=false \
        data.cache_dir="$work/cache" ${EXTRA:-} > "$out/fit_$v.log" 2>&1
      echo $? > "$out/fit_$v.rc"
      set -e
      echo $(( $(date +%s) - start )) > "$out/fit_$v.seconds"
      "$PY" -m diffmic.cli test --run "$out/runs/$v" > "$out/test_$v.log" 2>&1 || echo "test failed" > "$out/test_$v.rc"
    done
    "$PY" - "$out" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1]); res = {"protocol": "HAM10000 authors split, 224 px, time-boxed", "paper": {"acc": 0.906, "f1": 0.816}}
for v in ("full", "basic"):
    r = {"fit_seconds": int((out / f"fit_{v}.seconds").read_text()), "fit_rc": int((out / f"fit_{v}.rc").read_text())}
    m = out / "runs" / v / "test_metrics.json"
    if m.exists():
        d = json.loads(m.read_text()); r.update({k: round(d[k], 4) for k in ("acc", "f1", "balanced_acc", "kappa", "auroc")})
    log = out / "runs" / v / "logs" / "metrics.csv"
    if log.exists():
        r["epochs_logged"] = max((int(l.split(",")[0]) for l in log.read_text().splitlines()[1:] if l.split(",")[0].isdigit()), default=-1) + 1
    res[v] = r
print(json.dumps(res))
PYEOF
    ;;
  *) echo "usage: $0 pack [HAM_DIR] [TAR] | run [TAR] [SECONDS]" >&2; exit 2 ;;
esac
