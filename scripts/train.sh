#!/usr/bin/env bash
# The main job on a fresh machine: install fervit, then `fervit train` with the arguments given.
# Data: --data ROOT, else $FERVIT_DATA, else data/emotion_detection_fer, else ../shared/data/emotion_detection_fer.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# a machine without torch gets 2.13.0 (a CPU build where only that is on offer, the default build elsewhere)
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e .
if [ -z "${FERVIT_DATA:-}" ] && [ ! -d data/emotion_detection_fer ] && [ -d ../shared/data/emotion_detection_fer ]; then
  export FERVIT_DATA=../shared/data/emotion_detection_fer
fi
exec $PY -m fervit train "$@"
