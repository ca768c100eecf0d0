#!/usr/bin/env bash
# Set-up of .venv, idempotent: the CPU build of torch that lies on disk first (a bare `torch` requirement would
# pull a multi-GB CUDA build), then the package in editable mode with the extras the caller needs:
#   bash scripts/setup.sh        runtime extras only (wandb, tensorboard, examples): what the main job needs
#   bash scripts/setup.sh dev    every extra and the test tools (pytest, ruff, mypy, captum, relplot, selenium)
# pip runs only when pyproject.toml or the chosen extras changed since the last successful set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="wandb,tensorboard,examples"
[ "${1:-}" = "dev" ] && extras="dev"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
stamp=".venv/.lightning_attn-setup-$extras"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[$extras]"
echo "$want" > "$stamp"
