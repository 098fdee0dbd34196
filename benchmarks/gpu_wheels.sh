#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels a device machine lacks for benchmarks/gpu_session.sh, at
# the versions this checkout's .venv runs (so the GPU runs what the tests here ran). The machine's
# python3 (3.12) already has torch, Lightning, transformers, peft, safetensors, tensorboard,
# accelerate, httpx, typer, prometheus-client, pytest; this project also needs diffusers, pydantic,
# minio and the server's web stack. bitsandbytes (8-bit Adam) is left out: its wheel alone is larger
# than the 64 MiB a device call may carry, and the 8-bit test skips without it.
# Run from the repository root, on a machine that reaches the package index, after `make venv`.
set -euo pipefail
cd "$(dirname "$0")/.."
names=(diffusers pydantic pydantic-core annotated-types typing-inspection typing-extensions minio argon2-cffi argon2-cffi-bindings
  cffi pycparser pycryptodome fastapi starlette uvicorn annotated-doc)
mapfile -t pins < <(.venv/bin/python -c '
import sys
from importlib.metadata import version
for name in sys.argv[1:]:
    print(f"{name}=={version(name)}")
' "${names[@]}")
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d .whl "${pins[@]}"
size=$(du -sb .whl | cut -f1)
echo "$(ls .whl | wc -l) wheels, $((size / 2**20)) MiB: ${pins[*]}"
if [ "$size" -gt $((48 * 2**20)) ]; then echo "over 48 MiB: with the working tree it would not travel" >&2; exit 1; fi
