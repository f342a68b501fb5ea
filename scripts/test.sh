#!/usr/bin/env bash
# The one test command (README and .ci/run): install fervit with its test extras on a fresh machine, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test]"
exec $PY -m pytest "$@"
