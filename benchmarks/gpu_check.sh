#!/usr/bin/env bash
# One prepared GPU check (run once where a CUDA GPU is lent; about 10 minutes of device time):
#   1. the pixel stage at the paper defaults, for each precision, against the GPU's own GEMM peak;
#   2. end-to-end images/s per GPU at the paper defaults (wide_resnet50_2 with random weights:
#      the GPU machine cannot download ImageNet weights) on the synthetic archive.
# Usage: bash benchmarks/gpu_check.sh  (from the repository root, in the project's venv or after `make venv`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
test -x "$PY" || { make venv >/dev/null; PY=.venv/bin/python; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" benchmarks/pixel_knn.py --device cuda --precision all --batch 16
"$PY" benchmarks/pipeline_throughput.py --backbone wide_resnet50_2 --weights random --image-size 224 --k 50 \
    --train 400 --test-per-defect 100 --shard-size 64 --batch-size 16 2>&1 | tail -3
