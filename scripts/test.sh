#!/usr/bin/env bash
# The whole test suite from a fresh clone: set up .venv, run pytest (slow tests included), then the vLLM lane.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
if [ -f scripts/vllm_lane.sh ] && [ "${CDM_SKIP_VLLM:-0}" != "1" ]; then
  bash scripts/vllm_lane.sh
fi
