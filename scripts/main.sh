#!/usr/bin/env bash
# The main job: set up (idempotent), then run the end-to-end example.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
python examples/record_attention.py "$@"
