#!/usr/bin/env bash
# The lent-GPU session's one prepared run: card facts, the CUDA tests, the GPU inference
# benchmark, then the CPU model tests under the GPU machine's torch (2.11) for compatibility.
# Writes logs and gpu.json under $OUT (the device tool's folder; ./gpu-out elsewhere).
set -o pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, torchvision, sys; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.get_device_name())' | tee -a "$OUT/gpu.txt"
timeout "${CUDA_TESTS_S:-240}" python3 -m pytest -p no:cacheprovider -m cuda -rA -s \
    tests/test_cuda.py tests/test_postprocess.py -k cuda 2>&1 | tee "$OUT/cuda-tests.log"
timeout "${BENCH_S:-300}" python3 -m bench.inference_bench --device cuda --images 64 --seed-images 16 \
    --precisions fp32,tf32,bf16 --batch-sizes "${BATCH_SIZES:-1,8,16,32}" --serial-postprocess-row --json "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log"
timeout "${COMPAT_S:-100}" python3 -m pytest -p no:cacheprovider -q -x tests/test_model.py tests/test_preprocess.py 2>&1 | tee "$OUT/torch-compat.log"
