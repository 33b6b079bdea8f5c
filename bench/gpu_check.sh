#!/usr/bin/env bash
# The lent-GPU session's prepared runs (issue 14). Two phases, each one device call:
#   PHASE=diagnose (about 5 minutes): where a bf16 `run` spends its time — the e2e bf16 row with
#     the predictor alone beside it and per-stage medians, a py-spy profile of a second bf16 run
#     (every thread, idle too), CPU against nvJPEG decoding, and the CUDA tests.
#   PHASE=measure (default, about 7 minutes): the CUDA tests, then the figures for BENCHMARKS.md —
#     bf16/tf32/fp32 rows (E2E_CONFIGS; E2E_SMALL=0: steady rates from the large job only) with the
#     honest seed baseline, then the CPU preprocessing tests under the GPU machine's torch (2.11).
#     PROFILE=idle or gil: a py-spy profile of the first config (every thread, or the GIL holder).
# Both first install the service clients `panoptic-batch run` imports (celery, sqlalchemy,
# alembic, boto3…) and py-spy, carried as cp312 wheels in .whl/ (bench/gpu_wheels.txt, fetched by
# bench/fetch_gpu_wheels.sh), into .gpu-site, and print the card and software facts.
# Each step has its own timeout (seconds, overridable: E2E_S, CUDA_TESTS_S, COMPAT_S) so that a
# hung step costs only its own share. At most 8 files under $OUT (./gpu-out elsewhere): gpu.txt,
# install.log, e2e.json, e2e.log, runs.tar.gz (run logs and profiles), decode.json,
# cuda-tests.log, torch-compat.log. The device-tool call is in BENCHMARKS.md ("GPU: end to end").
set -o pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
PHASE=${PHASE:-measure}
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
    echo "phase: $PHASE"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c 'import torch, torchvision, sys, os; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.get_device_name(), os.cpu_count(), "cores")'
    echo "commit: ${PANOPTIC_BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null)} (PANOPTIC_BENCH_COMMIT: the device's .git may be stale)"
} 2>&1 | tee "$OUT/gpu.txt"

cuda_tests() {
    # No -x: one failing test must not hide the others' results (it did, 2026-12-04).
    timeout "${CUDA_TESTS_S:-120}" python3 -m pytest -p no:cacheprovider -n 0 -m cuda -rA \
        tests/test_cuda.py tests/test_postprocess.py -k cuda 2>&1 | tee "$OUT/cuda-tests.log"
}

WORK=/tmp/e2e-work; rm -rf "$WORK"
if [ "$PHASE" = diagnose ]; then
    timeout 60 python3 -m bench.decode_bench --images 256 --threads 8,16 --gpu-batches 16,64 \
        --json "$OUT/decode.json" 2>&1 | tail -5
    PROFILER=$SITE/bin/py-spy; [ -x "$PROFILER" ] || PROFILER=
    timeout "${E2E_S:-200}" python3 -m bench.e2e_gpu --device cuda --images "${E2E_IMAGES:-1024}" --small 128 \
        --configs "${E2E_CONFIGS:-bf16:16}" --seed-images 8 --predictor-images 256 \
        ${PROFILER:+--profile "$PROFILER"} --workdir "$WORK" --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log"
    cuda_tests
else
    cuda_tests                  # first: whether the figures below come from correct code
    # PROFILE=idle|gil: the first config's large run again under py-spy (every thread, or the GIL holder).
    [ "${PROFILE:-}" = gil ] && export PROFILE_GIL=1
    PROFILER=$SITE/bin/py-spy; [ -x "$PROFILER" ] && [ -n "${PROFILE:-}" ] || PROFILER=
    timeout "${E2E_S:-330}" python3 -m bench.e2e_gpu --device cuda --images "${E2E_IMAGES:-1024}" \
        --small "${E2E_SMALL:-128}" --configs "${E2E_CONFIGS:-bf16:16,tf32:16,fp32:16}" \
        --seed-images "${E2E_SEED_IMAGES:-16}" --predictor-images 128 \
        ${PROFILER:+--profile "$PROFILER"} --workdir "$WORK" --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log"
    timeout "${COMPAT_S:-45}" python3 -m pytest -p no:cacheprovider -n 0 -q -x tests/test_preprocess.py 2>&1 \
        | tee "$OUT/torch-compat.log"
fi
(cd "$WORK" 2>/dev/null && tar -czf "$OUT/runs.tar.gz" $(ls run-*.log profile-*.txt 2>/dev/null)) 2>/dev/null
ls -la "$OUT"
