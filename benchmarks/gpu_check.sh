#!/usr/bin/env bash
# One prepared GPU check (run once where a CUDA GPU is lent; 110 s on an H200, plus the machine's start):
#   1. the pixel stage at the paper defaults, for each precision, against the GPU's own GEMM peak;
#   2. end-to-end images/s per GPU at the paper defaults (wide_resnet50_2 with random weights:
#      the GPU machine cannot download ImageNet weights) on the synthetic archive: the Ray
#      pipeline against the in-process API where Ray is installed, else the in-process API alone.
# Usage: here, `bash benchmarks/gpu_wheels.sh` once; then on the device, from the repository root,
# with .whl carried: `bash benchmarks/gpu_check.sh` (PYTHON defaults to python3, the one with torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
"$PY" benchmarks/pixel_knn.py --device cuda --precision all --batch 16
pipeline=--in-process-only
if "$PY" -c "import ray" 2>/dev/null; then pipeline=; fi
"$PY" benchmarks/pipeline_throughput.py --device cuda $pipeline --backbone wide_resnet50_2 --weights random \
    --image-size 224 --k 50 --train 400 --test-per-defect 100 --shard-size 64 --batch-size 16 2>&1 | tail -4
