#!/usr/bin/env bash
# One-shot GPU check for a lent CUDA machine whose image has torch + transformers but not the rest (see
# benchmarks/RESULTS.md): wheels for zarr, numcodecs, rapidfuzz, typer, tqdm travel in ./.whl (ignored; fetch them
# with `pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl zarr numcodecs donfig
# google-crc32c rapidfuzz typer tqdm`), installed into a side folder; then the CUDA tests run. The CUDA part of the
# precompute benchmark is `python benchmarks/precompute.py --part cuda`.
set -uo pipefail
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pip install -q --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
python -m pytest -q -p no:cacheprovider -rA tests/test_cuda.py tests/test_losses.py
