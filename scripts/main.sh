#!/usr/bin/env bash
# The main job: set up (idempotent), then train the digits example with every callback, test it, write the
# explainability report and print where the dashboards and the report are.
#   bash scripts/main.sh            TensorBoard + files on disk (outputs/digits_vit/)
#   bash scripts/main.sh --wandb    and Weights & Biases (offline unless WANDB_API_KEY or ~/.netrc has a key)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
python -m examples.main_job "$@"
