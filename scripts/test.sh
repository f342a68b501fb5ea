#!/usr/bin/env bash
# The one test command (README and .ci/run): install fervit with its test extras into a virtual environment, run
# pytest there. Arguments go to pytest.
#
# Environment: the active one ($VIRTUAL_ENV), else $FERVIT_VENV, else .venv in this clone, made when missing; the
# system's python is never installed into. Inside: torch 2.13.0 (its PyPI build is the CPU one; an unpinned torch
# would pull a multi-GB CUDA build) and fervit[test].
# The bench's comparison pipelines and the timm tests need torchvision, kornia and timm. PyPI's torchvision is built
# against CUDA torch and cannot be imported beside the CPU one, so the three go into a folder of their own,
# $VENV/fervit-test-extras, outside site-packages, and only pytest's processes see it, through
# scripts/test_extras/sitecustomize.py, which declares the two torchvision ops that cannot load (see there).
# System packages: the page test needs Chromium and its driver, one sweep test PostgreSQL. Where they are missing,
# this says so first, then installs them with apt-get when run as root; FERVIT_TEST_APT=0 (or not root) skips
# that, and those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "scripts/test.sh: $*" >&2; }

VENV=${VIRTUAL_ENV:-${FERVIT_VENV:-.venv}}
if [ ! -x "$VENV/bin/python" ]; then
  say "making the virtual environment $VENV (FERVIT_VENV=DIR or an active environment to use another)"
  if ! python3 -m venv "$VENV"; then
    rm -rf "$VENV"
    say "python3 -m venv failed; install the venv module (Debian: apt-get install python3-venv) or point FERVIT_VENV at an existing environment"
    exit 1
  fi
fi
PY="$VENV/bin/python"
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test]"

EXTRAS="$(cd "$VENV" && pwd)/fervit-test-extras"
if ! [ -d "$EXTRAS/torchvision" ] || ! [ -d "$EXTRAS/kornia" ] || ! [ -d "$EXTRAS/timm" ]; then
  rm -rf "$EXTRAS"
  $PY -m pip install -q --no-deps --target "$EXTRAS" torchvision==0.28.0 kornia==0.9.0 kornia_rs timm
fi
$PY -m pip install -q huggingface_hub pyyaml  # timm's other requirements, which import fine beside the CPU torch
export PYTHONPATH="$PWD/scripts/test_extras:$EXTRAS${PYTHONPATH:+:$PYTHONPATH}"

missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && [ "${FERVIT_TEST_APT:-1}" != 0 ]; then
    say "installing Debian's ${missing[*]} with apt-get for the page and PostgreSQL tests (FERVIT_TEST_APT=0 skips them)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    say "${missing[*]} not installed: their tests will skip (as root, apt-get install ${missing[*]})"
  fi
fi
exec $PY -m pytest "$@"
