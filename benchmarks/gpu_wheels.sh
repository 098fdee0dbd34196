#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels a device machine lacks for benchmarks/gpu_session.sh:
# its python3 (3.12) already has torch, Lightning, transformers, peft, safetensors, tensorboard,
# pytest; this project also needs diffusers, pydantic, minio, the server's web stack and
# bitsandbytes (8-bit Adam). Run on a machine that reaches PyPI, from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
wheels=(
  diffusers==0.42.1 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2
  minio==7.2.20 argon2-cffi==25.1.0 argon2-cffi-bindings==25.1.0 pycryptodome==3.23.0
  fastapi==0.165.0 starlette==0.50.0 uvicorn==0.38.0 python-multipart==0.0.20
  bitsandbytes==0.48.2
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d .whl "${wheels[@]}"
du -sh .whl
