#!/usr/bin/env bash
# Set up (idempotent), install headless Chromium for the HTML report test when possible, run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium could not be installed: the HTML test will skip"
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true MPLBACKEND=Agg
python -m pytest "$@"
