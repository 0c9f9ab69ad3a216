#!/usr/bin/env bash
# One command on a fresh machine: install (.venv, CPU torch first; see scripts/setup.sh), then run `cdm demo`.
# Arguments go to `cdm demo`, e.g. `bash scripts/demo.sh --out /tmp/cdm-demo --steps 100`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/cdm demo "$@"
