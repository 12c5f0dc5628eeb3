#!/usr/bin/env bash
# Fetches, on this machine, the wheels that the lent GPU machine lacks for benchmarks/gpu_check.sh
# into .whl/ (git-ignored; about 33 MB, under the 64 MiB a device call may carry). That machine has
# python3.12 with torch, torchvision, pyarrow, fsspec, scipy and pillow, and cannot fetch anything.
# Ray's wheel (79 MB) is over that limit, so there gpu_check.sh times the in-process API.
# Versions are this project's venv's, so the GPU run uses the code the tests ran with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "faiss-cpu==$(version faiss-cpu)" "botocore==$(version botocore)"
du -sh .whl
