#!/usr/bin/env bash
# Fetch, on a machine with internet, every wheel `make gpu-check` needs on an offline Linux x86_64 GPU machine.
#
#   bash bench/fetch_wheels.sh [DEST]        # default DEST: ./wheels
#   PYTHON_VERSION=3.11 CUDA_TAG=cu128 bash bench/fetch_wheels.sh
#
# Then copy DEST and this repository to the GPU machine and see bench/README.md ("GPU check offline").
set -euo pipefail
DEST="${1:-wheels}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
CUDA_TAG="${CUDA_TAG:-cu128}"          # must match the GPU machine's driver (nvidia-smi: CUDA Version ≥ this)
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PLATFORM="${PLATFORM:-manylinux_2_28_x86_64}"
PIP="${PIP:-python3 -m pip}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$DEST"
target=(--only-binary=:all: --platform "$PLATFORM" --python-version "$PYTHON_VERSION" --implementation cp --dest "$DEST")

# 1. torch built for CUDA (the default PyPI torch wheel may not match the machine's CUDA), and its CUDA libraries
$PIP download "${target[@]}" --index-url "https://download.pytorch.org/whl/${CUDA_TAG}" \
    --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}"
# 2. sftkit itself and its pinned dependencies, with the test and bench extras (pytest, hypothesis, trl, psutil)
#    and bitsandbytes for the QLoRA test
$PIP wheel --no-deps --wheel-dir "$DEST" "$HERE"
$PIP download "${target[@]}" --extra-index-url "https://download.pytorch.org/whl/${CUDA_TAG}" \
    "$(ls "$DEST"/sftkit-*.whl)[test,bench]" "bitsandbytes==0.50.2"
# 3. flash-attn is optional (varlen runs on torch's own varlen_attn without it). PyPI ships it as source only,
#    which needs nvcc and an hour to build; a prebuilt wheel for this torch/CUDA/python comes from
#    https://github.com/Dao-AILab/flash-attention/releases: set FLASH_ATTN_WHEEL_URL to fetch it here.
if [[ -n "${FLASH_ATTN_WHEEL_URL:-}" ]]; then
    (cd "$DEST" && curl -fLO "$FLASH_ATTN_WHEEL_URL")
fi
echo "Wheels in $DEST: $(ls "$DEST" | wc -l) files, $(du -sh "$DEST" | cut -f1)"
