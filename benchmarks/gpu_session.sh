#!/usr/bin/env bash
# The one GPU script: the figures only a GPU gives, in at most 8 minutes on one H100 (80 GB) with no
# network. Parts run in order of importance, each under its own time budget, all under one deadline
# (DEADLINE_S, default 465 s); every JSON line a benchmark prints lands in $OUT as it is printed, so a
# part cut by its budget keeps what it measured.
#
#   bash benchmarks/gpu_session.sh             # on the GPU machine, from the repository root
#   bash benchmarks/gpu_session.sh --dry-run   # anywhere, on the CPU: the same parts on tiny shapes (make test runs it)
#
# Parts (budget in seconds on a GPU):
#   prepare (20)          the interpreter, the device, free disk
#   bench-trainer (150)   SD1.5 shapes at 512 px: trainer_speedup, trainer_speedup_tuned (both sides
#                         torch.compile'd), trainer_speedup_same_work, mfu_1+1 (benchmarks/bench_trainer.py)
#   family-sdxl (60)      random full-size SDXL built in code and saved, SDXL-LoRA at 1024 px: ours vs
#                         diffusers' loop, step time and peak memory of each side; the folder removed after
#   family-flux (110)     the same for FLUX.1-dev (~34 GB folder), with gradient checkpointing on both sides
#   bench-serve (30)      serve_speedup (same batch) and vs one request at a time (benchmarks/bench_serve.py)
#   many-subjects (25)    20 LoRA subjects on one server vs a server per subject
#   gpu-tests (55)        the GPU-marked tests (precisions, 8-bit Adam, compile, the no-sync step loop)
# The dry run uses tiny models, 1-2 rounds, aot_eager for the compiled pair (inductor's C++ compile
# would cost minutes of CPU), and budgets for a shared 2-core machine (DRY_BUDGET_SCALE, default 3x, and
# at least DRY_MIN_BUDGET_S, default 180 s, a part: many-subjects took its whole 75 s at load 15).
#
# $OUT (default bench-output/gpu-session) gets four files:
#   parts.jsonl    one line per part: name, exit code, seconds, budget, scratch GiB, free disk GiB
#   figures.jsonl  every JSON line of every part, with its part's name
#   console.log    everything printed;   tests.xml  the GPU tests' JUnit report
# Disk: models, outputs and caches live in $SCRATCH (removed at exit); each model folder is removed
# after its part, so the most at once is FLUX.1-dev's folder. Exit code: 0 only if every part exited 0.
#
# GPU_SESSION_PARTS=bench-trainer,gpu-tests runs only those parts (a rerun of what a first run lost).
# On a machine whose python3 has torch but not this project's other packages, carry .whl (filled by
# `bash benchmarks/gpu_wheels.sh` where PyPI is reachable); nothing else is needed: models are built in code.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; elif [ $# -gt 0 ]; then echo "usage: $0 [--dry-run]" >&2; exit 2; fi
OUT="${OUT:-bench-output/gpu-session}"
mkdir -p "$OUT"
: > "$OUT/parts.jsonl"; : > "$OUT/figures.jsonl"; : > "$OUT/console.log"
SCRATCH="$(mktemp -d "${SCRATCH_PARENT:-/tmp}/dreambooth-gpu-session.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  TORCHINDUCTOR_CACHE_DIR="$SCRATCH/inductor" DREAMBOOTH_CACHE="$SCRATCH/cache" TMPDIR="$SCRATCH"
SCALE=1
DRY_MIN_BUDGET="${DRY_MIN_BUDGET_S:-180}"
if [ $DRY = 1 ]; then SCALE="${DRY_BUDGET_SCALE:-3}"; fi
DEADLINE=$((SECONDS + ${DEADLINE_S:-$((465 * SCALE))}))
status=0

PY=python3
if [ -x .venv/bin/python ]; then
  PY=$PWD/.venv/bin/python
else
  # A bare machine: the carried wheels, and this project's packages linked by their import names
  # (pyproject's package-dir), in one folder on PYTHONPATH.
  site="$SCRATCH/site"
  mkdir -p "$site"
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
  fi
  python3 -c '
import os, sys, tomllib
with open("pyproject.toml", "rb") as handle:
    folders = tomllib.load(handle)["tool"]["setuptools"]["package-dir"]
for name, folder in folders.items():
    os.symlink(os.path.abspath(folder), os.path.join(sys.argv[1], name))
' "$site" || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

tagged() {  # tagged NAME: lines to the terminal and console.log; JSON lines also to figures.jsonl, with the part
  local name="$1" line
  while IFS= read -r line; do
    printf '%s\n' "$line"
    printf '%s\n' "$line" >> "$OUT/console.log"
    if [[ $line == '{"'* ]]; then
      printf '{"part": "%s", %s\n' "$name" "${line:1}" >> "$OUT/figures.jsonl"
    fi
  done
}

gib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 2^30 }'; }

part() {  # part NAME BUDGET COMMAND...: run it under min(BUDGET x SCALE, time left); its exit code, not the pipe's
  local name="$1" budget=$(($2 * SCALE)) started=$SECONDS code left
  shift 2
  # A dry run's fixed costs (imports, building tiny models) do not shrink with the shapes: a floor per part.
  if [ $DRY = 1 ] && [ "$budget" -lt "$DRY_MIN_BUDGET" ]; then budget=$DRY_MIN_BUDGET; fi
  if [ -n "${GPU_SESSION_PARTS:-}" ] && [[ ",$GPU_SESSION_PARTS," != *",$name,"* ]]; then
    printf '{"part": "%s", "skipped": "not in GPU_SESSION_PARTS"}\n' "$name" >> "$OUT/parts.jsonl"
    return
  fi
  left=$((DEADLINE - SECONDS))
  if [ "$budget" -gt "$left" ]; then budget=$left; fi
  if [ "$budget" -le 0 ]; then
    code=124
    echo "[gpu-session] $name: no time left before the deadline" | tagged "$name"
  else
    echo "[gpu-session] $name: up to ${budget} s" | tagged "$name"
    timeout --kill-after=10 "$budget" "$@" < /dev/null 2>&1 | tagged "$name"
    code=${PIPESTATUS[0]}
  fi
  local scratch free
  scratch=$(du -sb "$SCRATCH" 2>/dev/null | cut -f1)
  free=$(df -B1 --output=avail "$SCRATCH" | tail -1)
  printf '{"part": "%s", "exit": %d, "seconds": %d, "budget_s": %d, "scratch_gib": %s, "disk_free_gib": %s}\n' \
    "$name" "$code" "$((SECONDS - started))" "$budget" "$(gib "${scratch:-0}")" "$(gib "${free:-0}")" | tee -a "$OUT/parts.jsonl"
  if [ "$code" -ne 0 ]; then status=1; fi
}

family() {  # family NAME BUDGET MODEL ARGS...: build the random model folder, run the family's case, remove the folder
  local name="$1" budget="$2" model="$3" folder="$SCRATCH/models/$3"
  shift 3
  part "family-$name" "$budget" bash -c '"$1" benchmarks/random_models.py --family "$2" --out "$3" || exit; "$1" benchmarks/bench_families.py --families "$4" "--$4" "$3" "${@:5}"' \
    _ "$PY" "$model" "$folder" "$name" "$@"
  rm -rf "$folder"
}

if [ $DRY = 1 ]; then
  trainer=(--tiny --rounds 2 --max-warmup-rounds 0 --steps 3 --warmup-steps 1 --compile-backend aot_eager)
  families=(--resolution 32 --rounds 1 --max-warmup-rounds 0 --steps 2 --warmup-steps 1)
  sdxl=tiny-sdxl flux=tiny-flux
  serve=(--tiny --steps 2 --throughput-rounds 1 --requests 2 --requests-concurrent 8)
  subjects=(--tiny --steps 2 --rounds 1 --mix-requests 16)
else
  trainer=(--rounds 2 --max-warmup-rounds 1 --compiled-warmup-rounds 0 --steps 15 --warmup-steps 5)
  families=(--resolution 1024 --rounds 1 --max-warmup-rounds 0 --steps 4 --warmup-steps 2)
  sdxl=sdxl flux=flux
  serve=(--throughput-rounds 2 --requests 4 --requests-concurrent 16)
  subjects=(--rounds 1 --mix-requests 24)
fi

part prepare 20 "$PY" -c '
import json, shutil, sys, torch, diffusers, pytorch_lightning, dreambooth_trainer.train
print(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
                  "lightning": pytorch_lightning.__version__, "cuda": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if torch.cuda.is_available() else None,
                  "disk_free_gib": round(shutil.disk_usage(sys.argv[1]).free / 2**30, 1)}))
' "$SCRATCH"
part bench-trainer 150 "$PY" benchmarks/bench_trainer.py --models "$SCRATCH/models" "${trainer[@]}" \
  --figures trainer_speedup,trainer_speedup_tuned,trainer_speedup_same_work
rm -rf "$SCRATCH/models"
family sdxl 60 "$sdxl" "${families[@]}"
family flux 110 "$flux" "${families[@]}" --gradient-checkpointing
part bench-serve 30 "$PY" benchmarks/bench_serve.py --case throughput "${serve[@]}"
part many-subjects 25 "$PY" benchmarks/bench_serve.py --case many-subjects "${subjects[@]}"
part gpu-tests 55 "$PY" -m pytest -v -m gpu tests/trainer/test_gpu.py tests/trainer/test_training.py \
  -p no:cacheprovider -o addopts="" --junitxml="$OUT/tests.xml"
echo "[gpu-session] $( [ $status = 0 ] && echo "every part exited 0" || echo "a part failed: see $OUT/parts.jsonl" ) in $SECONDS s"
exit $status
