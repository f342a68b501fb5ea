#!/usr/bin/env bash
# The one test command (README and .ci/run): install fervit with its test extras on a fresh machine, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test]"
# the bench's comparison pipelines (its --quick test covers every row): the torchvision built for torch 2.13 and
# kornia, without their dependencies, which would replace the CPU torch with a CUDA one; the bench stubs the two
# torchvision C++ ops that cannot load beside the CPU torch (fervit/benchmark/pipelines.py)
$PY -c "import kornia, importlib.util as u; assert u.find_spec('torchvision')" 2>/dev/null || $PY -m pip install -q --no-deps torchvision==0.28.0 kornia==0.9.0 kornia_rs
# system packages for the page test (headless Chromium) and the PostgreSQL sweep test; installed once
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "scripts/test.sh: ${missing[*]} not installed and not root: their tests will skip" >&2
  fi
fi
$PY -m pytest "$@"
# timm backbones need a torchvision built for the installed torch, and the lean CPU torch above has none on
# offer, so their tests run again in a second environment: torch 2.14.1 + torchvision 0.29.1 (a CUDA build
# that runs on the CPU; ~80 s and 5.5 GB to build once, reused after). Only with the full suite (no
# arguments) or FERVIT_TEST_TIMM=1; FERVIT_TEST_TIMM=0 skips it.
if [ "${FERVIT_TEST_TIMM:-$([ $# -eq 0 ] && echo 1 || echo 0)}" = 1 ]; then
  VENV=${FERVIT_TIMM_VENV:-.venv-timm}
  if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
    rm -rf "$VENV" && $PY -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  fi
  "$VENV/bin/python" -m pip install -q -e ".[timm,onnx]" "pytest>=7" "pytest-timeout>=2"
  "$VENV/bin/python" -m pytest tests/test_timm.py
fi
