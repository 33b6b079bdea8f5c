#!/usr/bin/env bash
# The lent-GPU session's one prepared run (issue 14), about 9 minutes at most:
#   1. the service clients `panoptic-batch run` imports (celery, sqlalchemy, alembic, boto3…),
#      carried as cp312 wheels in .whl/ (bench/gpu_wheels.txt), installed into .gpu-site;
#   2. card and software facts;
#   3. bench.e2e_gpu: `panoptic-batch run` over 1,024 COCO-like JPEGs and a 128-image job, per
#      config (bf16/tf32/fp32 at batch 16, bf16 at 32, bf16 with two batches in flight, bf16
#      with 16 postprocessing threads instead of 8): marginal images/s, GPU busy fraction,
#      memory, start-up, and the honest seed baseline (the reference's own steps at batch 1 on
#      the GPU); its JSON is rewritten after every config;
#   4. the CUDA tests (pytest -m cuda), then the CPU preprocessing tests under the GPU machine's
#      torch (2.11) for compatibility.
# Each step has its own timeout (seconds, overridable: E2E_S, CUDA_TESTS_S, COMPAT_S), so that a
# hung step costs only its own share. Writes at most 8 files under $OUT (./gpu-out elsewhere):
# gpu.txt, install.log, e2e.json, e2e.log, e2e-runs.tar.gz, cuda-tests.log, torch-compat.log.
# The exact device-tool call is in BENCHMARKS.md ("GPU: end to end").
set -o pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
SITE="$PWD/.gpu-site"
{
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    else
        echo "no .whl/ carried: using the installed packages"
    fi
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    python3 -c 'import celery, sqlalchemy, alembic, boto3, click, rich, prometheus_client, zlib_ng.zlib_ng; import scheduler.cli, worker.pipeline, storage.jobs; print("imports ok")'
} 2>&1 | tee "$OUT/install.log"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c 'import torch, torchvision, sys, os; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.get_device_name(), os.cpu_count(), "cores")'
    git rev-parse HEAD 2>/dev/null || echo "commit: see the session's branch"
} 2>&1 | tee "$OUT/gpu.txt"

WORK=/tmp/e2e-work; rm -rf "$WORK"
timeout "${E2E_S:-360}" python3 -m bench.e2e_gpu --device cuda --images "${E2E_IMAGES:-1024}" --small 128 \
    --configs "${E2E_CONFIGS:-bf16:16,tf32:16,fp32:16,bf16:32,bf16:16:2,bf16:16:1:16}" --seed-images 16 \
    --workdir "$WORK" --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log"
tar -czf "$OUT/e2e-runs.tar.gz" -C "$WORK" $(cd "$WORK" 2>/dev/null && ls run-*.log 2>/dev/null) 2>/dev/null

timeout "${CUDA_TESTS_S:-120}" python3 -m pytest -p no:cacheprovider -m cuda -rA \
    tests/test_cuda.py tests/test_postprocess.py -k cuda 2>&1 | tee "$OUT/cuda-tests.log"
timeout "${COMPAT_S:-45}" python3 -m pytest -p no:cacheprovider -q -x tests/test_preprocess.py 2>&1 \
    | tee "$OUT/torch-compat.log"
ls -la "$OUT"
