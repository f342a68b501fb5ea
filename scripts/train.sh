#!/usr/bin/env bash
# The main job on a fresh machine: install fervit, then `fervit train` with the arguments given.
# Data: fervit's one rule (README "Data"): --data ROOT, else $FERVIT_DATA, else ./data/emotion_detection_fer,
# ../shared/data/emotion_detection_fer or where `fervit data fetch` puts it; so `fervit evaluate` and the others,
# run from this folder afterwards, find the same data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# a machine without torch gets 2.13.0 (a CPU build where only that is on offer, the default build elsewhere)
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e .
exec $PY -m fervit train "$@"
