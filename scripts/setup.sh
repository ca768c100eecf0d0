#!/usr/bin/env bash
# One-time set-up of .venv: the CPU build of torch that lies on disk first (a bare `torch`
# requirement would pull a multi-GB CUDA build), then the package with every extra.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
