#!/usr/bin/env bash
# The lent-GPU session's one prepared run: card facts, the CUDA tests, the GPU inference
# benchmark (fixed 640x480 images, then eight mixed sizes grouped by aspect ratio as the worker
# does), CPU tests under the GPU machine's torch for compatibility (the model tests need
# ../shared/reference, which is not on that machine; the CUDA tests load the model there), then
# where the postprocessing time goes (bench.postprocess_profile).
# Writes logs and JSON under $OUT (the device tool's folder; ./gpu-out elsewhere).
# The GPU machine has torch but not the service clients: carry pure-Python extras for the tests in
# .gpu-py (pip install --no-deps --target .gpu-py prometheus_client).
set -o pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$PWD/.gpu-py${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, torchvision, sys; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.get_device_name())' | tee -a "$OUT/gpu.txt"
timeout "${CUDA_TESTS_S:-150}" python3 -m pytest -p no:cacheprovider -m cuda -rA \
    tests/test_cuda.py tests/test_postprocess.py -k cuda 2>&1 | tee "$OUT/cuda-tests.log"
timeout "${BENCH_S:-200}" python3 -m bench.inference_bench --device cuda --images 64 --seed-images 16 \
    --precisions fp32,tf32,bf16 --batch-sizes "${BATCH_SIZES:-16,32}" --in-turn-rows --nchw-rows --json "$OUT/gpu-640x480.json" 2>&1 | tee "$OUT/bench.log"
timeout "${MIXED_S:-150}" python3 -m bench.inference_bench --device cuda --images 64 --seed-images 16 \
    --precisions fp32,tf32,bf16 --batch-sizes 16 --mixed-sizes --group-by-aspect --json "$OUT/gpu-mixed.json" 2>&1 | tee "$OUT/bench-mixed.log"
timeout "${COMPAT_S:-80}" python3 -m pytest -p no:cacheprovider -q -x tests/test_preprocess.py 2>&1 | tee "$OUT/torch-compat.log"
timeout "${PROFILE_S:-90}" python3 -m bench.postprocess_profile --device cuda --rows 25 2>&1 \
    | grep -v USDT | tee "$OUT/postprocess-profile.log"
