#!/usr/bin/env bash
# BENCHMARKS.md's GPU measurement in one command, at most 9 minutes on one H200 (16 CPUs):
#   experiments/plans/bench_h200.sh DATA OUT [PRESET ...]
# DATA: the FER-2013 folder layout (or a .zip of it, unpacked to /tmp/fer); OUT: where bench-h200.json and
# bench-h200.log go; PRESETs: the models with full rows (default vit_cnn, vit_patch and the hybrid preset,
# vit_resnet; any preset works), the first of them also gets the step-mode and concurrency rows.
# The bench writes its JSON after every section ("partial": true until it ends), so the time limit
# below can only cost the sections it had not reached. A CPU dry run with tiny sizes:
#   FERVIT_BENCH_TINY=1 experiments/plans/bench_h200.sh /tmp/tiny-fer /tmp/out tiny   (a tests/conftest.py make_layout)
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:?usage: bench_h200.sh DATA OUT [PRESET ...]}
OUT=${2:?usage: bench_h200.sh DATA OUT [PRESET ...]}
shift 2
if [ $# -gt 0 ]; then MODELS=("$@"); else MODELS=(vit_cnn vit_patch hybrid); fi
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [[ "$DATA" == *.zip ]]; then
  [ -d /tmp/fer ] || "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/fer')" "$DATA"
  DATA=/tmp/fer
fi
export FERVIT_CACHE=${FERVIT_CACHE:-/tmp/fervit-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
if [ "${FERVIT_BENCH_TINY:-0}" = 1 ]; then
  # the same sections at toy sizes, to prove the command on a CPU
  SIZES=(--device cpu --batch-size 4 --steps 1 --data-images 16 --eval-images 8 --repeats 1 --concurrency 1 2
         --concurrency-steps 1)
  LIMIT=600
else
  # 100 steps of 128 per training figure (12,800 images) and 8,192 images per data-path figure: stable to a
  # few percent on a GPU, and the two usual pipelines (16 and 4 workers) fit beside the compilations.
  # compile mode is not a separate row here: the "fervit" rows train the torch.compile'd model already.
  SIZES=(--device cuda --batch-size 128 --steps 100 --data-images 8192 --repeats 2 --step-modes eager cuda_graph
         --concurrency 1 2 4 8 --concurrency-steps 100)
  LIMIT=530
fi
set +e
timeout --signal=INT "$LIMIT" "$PY" -m fervit bench --data "$DATA" --json "$OUT/bench-h200.json" \
  --models "${MODELS[@]}" "${SIZES[@]}" 2>&1 | tee "$OUT/bench-h200.log"
rc=${PIPESTATUS[0]}
set -e
echo "fervit bench exit $rc; JSON: $OUT/bench-h200.json"
exit "$rc"
