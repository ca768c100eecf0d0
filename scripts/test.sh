#!/usr/bin/env bash
# The README's test command: set up .venv with the dev extras (idempotent), install headless Chromium and its
# driver for the browser tests when possible, then lint (ruff), type-check (mypy) and run the pytest suite.
# Arguments go to pytest (bash scripts/test.sh -k calibration -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "chromium could not be installed: the browser tests will skip"
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true MPLBACKEND=Agg
echo "ruff check:" && ruff check .
echo "mypy lightning_attn:" && mypy lightning_attn
python -m pytest "$@"
