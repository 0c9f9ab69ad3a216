#!/usr/bin/env bash
# One-shot GPU check for a lent CUDA machine (see benchmarks/RESULTS.md): installs what the device image lacks from
# ./.whl (wheels carried along), then runs the CUDA tests and the CUDA part of the precompute benchmark.
set -uo pipefail
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
pip install -q --no-deps .whl/*.whl 2>&1 | tail -1
pip install -q --no-deps -e . 2>&1 | tail -1
python -c "import torch, transformers, zarr, datasets, rapidfuzz; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_losses.py -x 2>&1 | tail -5
