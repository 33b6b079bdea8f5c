#!/usr/bin/env bash
# Fetch the wheels bench/gpu_check.sh installs on the GPU machine (Python 3.12, x86-64, no
# network there) into .whl/, here, before the device run that carries them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -v '^#' bench/gpu_wheels.txt | xargs python3 -m pip download --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d .whl
du -sh .whl
