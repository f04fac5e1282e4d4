#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with kiln and its test tools.
# Idempotent: a second run only re-checks. Uses the torch already installed if it is in range
# (the GPU machine's), else the CPU build pinned below.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c 'import torch, sys; v=tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if (2,11)<=v<(2,14) else 1)' 2>/dev/null; then
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q torch==2.13.0
fi
"$VPY" -m pip install -q -e '.[serve,test]'
