#!/usr/bin/env bash
# One-shot GPU check for a lent CUDA machine whose image has torch + transformers but not the rest (see
# benchmarks/RESULTS.md): wheels for zarr, numcodecs, rapidfuzz, typer, tqdm travel in ./.whl (ignored; fetch them
# with `pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl zarr numcodecs donfig
# google-crc32c rapidfuzz typer tqdm`), installed into a side folder; then the CUDA tests and the CUDA part of the
# precompute benchmark run, then its store-writer part on the host CPUs; logs and results go to $OUT (or ./gpu-out).
# Time limits (s) add up to under the device's 600 s per call: kernels 80, tests 190 (Triton compiles ~16 kernel
# variants), CUDA benchmark 250, host side 50 (the least wanted part, so the one cut first). The CUDA tests run are the
# top-k and pipeline ones unless CDM_GPU_TEST_K says otherwise (CDM_GPU_TEST_K= runs all of tests/test_cuda.py).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -m pip install -q --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
# first the quickest and most wanted number: each top-k selection (torch, block maxima, the Triton kernels) per chunk
timeout "${CDM_GPU_KERNEL_TIMEOUT:-80}" python benchmarks/topk_kernels.py --part cuda --json "$OUT/topk_kernels.json" \
    2>&1 | tee "$OUT/topk_kernels.log" | grep -v "^DEBUG"
timeout "${CDM_GPU_TEST_TIMEOUT:-190}" python -m pytest -q -p no:cacheprovider -rA tests/test_cuda.py -k "${CDM_GPU_TEST_K-selectors or selections or pipelined or compiled_topk}" 2>&1 | tee "$OUT/test_cuda.log" | grep -v "^DEBUG"
timeout "${CDM_GPU_BENCH_TIMEOUT:-250}" python benchmarks/precompute.py --part cuda --json "$OUT/precompute_cuda.json" \
    --md "$OUT/precompute_cuda.md" 2>&1 | tee "$OUT/precompute_cuda.log" | grep -v "^DEBUG"
# the host side on this machine's CPUs: the store writer alone (thread vs process, a loop beside each), then data
# preparation + store writer against a simulated 300k tok/s device (the 135M shape's pipeline rate)
timeout "${CDM_GPU_HOST_TIMEOUT:-50}" bash -c 'python benchmarks/precompute.py --part writer --repeats 1 \
    --json "$0/precompute_writer.json" && python benchmarks/precompute.py --part prep --repeats 1 --prep-rows 6000 \
    --prep-rates 300000 --json "$0/precompute_host.json"' "$OUT" 2>&1 | tee "$OUT/precompute_host.log" | grep -v "^DEBUG"
