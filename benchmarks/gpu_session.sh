#!/usr/bin/env bash
# Every GPU check in one prepared run (<= 8 minutes on one H100/H200): the GPU-marked tests
# (fp16, bf16, auto precision, 8-bit Adam, inductor compile, the no-sync step loop), `make bench`
# and `make bench-serve`; then the model families at native size (~10 more minutes, ~45 GB of
# disk; SKIP_FAMILIES=1 leaves them out): random full-size SDXL and FLUX.1-dev folders, and
# SDXL-LoRA and Flux-LoRA at 1024 px, ours vs the diffusers example loops, peak memory of each.
# JSON lines go to $OUT (default: bench-output/gpu-session/):
#   summary.jsonl   one line per part: name, exit code, seconds
#   tests.xml       the GPU tests' JUnit report
#   bench.jsonl     bench_trainer.py's output;   serve.jsonl  bench_serve.py's throughput case
#   many-subjects.jsonl  bench_serve.py's many-subjects case (20 LoRA subjects on one server)
#   families.jsonl  bench_families.py's output at 1024 px (speedups, peak GiB per family and side)
#
# Where to run it:
#   - here (no GPU): a dry run; the GPU tests are skipped, the benchmarks run tiny shapes on CPU.
#   - a device machine whose python3 has torch but not this project's other packages: first, on a
#     machine that reaches PyPI, `bash benchmarks/gpu_wheels.sh` fills .whl/ (git-ignored); carry
#     .whl and run `bash benchmarks/gpu_session.sh` from the repository root.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-output/gpu-session}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
PY=python3
if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  # A bare machine: the carried wheels, and this project's packages linked by their import
  # names (pyproject's package-dir), in one folder on PYTHONPATH.
  site=/tmp/dreambooth-site
  mkdir -p "$site"
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
  fi
  python3 -c '
import os, sys, tomllib
with open("pyproject.toml", "rb") as handle:
    folders = tomllib.load(handle)["tool"]["setuptools"]["package-dir"]
for name, folder in folders.items():
    link = os.path.join(sys.argv[1], name)
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.abspath(folder), link)
' "$site" || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c 'import json, torch; print(json.dumps({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__}))' \
  | tee "$OUT/device.json"

part() {  # part NAME SECONDS_LIMIT COMMAND...: run one part, record its exit code and duration
  local name="$1" limit="$2" started=$SECONDS code
  shift 2
  timeout "$limit" "$@"
  code=$?
  printf '{"part": "%s", "exit": %d, "seconds": %d}\n' "$name" "$code" "$((SECONDS - started))" | tee -a "$OUT/summary.jsonl"
}

: > "$OUT/summary.jsonl"
part gpu-tests 180 "$PY" -m pytest -q -m gpu tests/trainer/test_gpu.py tests/trainer/test_training.py \
  -p no:cacheprovider --junitxml="$OUT/tests.xml"
part bench 210 bash -c "\"$PY\" benchmarks/bench_trainer.py --rounds 3 | tee \"$OUT/bench.jsonl\""
part bench-serve 90 bash -c "\"$PY\" benchmarks/bench_serve.py --case throughput | tee \"$OUT/serve.jsonl\""
# Its own part: 20 subjects, 4 cases, 3 rounds (the CPU dry run takes ~65 s of it; all of
# bench_serve.py at 5 rounds overran one 90 s part there).
part bench-many-subjects 180 bash -c "\"$PY\" benchmarks/bench_serve.py --case many-subjects --rounds 3 | tee \"$OUT/many-subjects.jsonl\""
if [ "${SKIP_FAMILIES:-0}" != 1 ]; then
  MODELS="${MODELS:-/tmp/dreambooth-random-models}"
  part random-sdxl 240 "$PY" benchmarks/random_models.py --family sdxl --out "$MODELS/sdxl"
  part random-flux 420 "$PY" benchmarks/random_models.py --family flux --out "$MODELS/flux"
  part bench-families 900 bash -c "\"$PY\" benchmarks/bench_families.py --sdxl \"$MODELS/sdxl\" --flux \"$MODELS/flux\" \
    --resolution 1024 --rounds 1 | tee \"$OUT/families.jsonl\""
fi
