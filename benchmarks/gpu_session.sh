#!/usr/bin/env bash
# One accelerator session, prepared ahead. The lent machine has PyTorch and Lightning but not
# every package this project needs: wheels travel in .whl/ (fetched with `pip download` for
# cp312 manylinux). Each step has its own time limit, most important first.
set -u
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
out="${OUT:-/tmp/gpu-out}"
mkdir -p "$out" /tmp/pkgs
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
ln -sfn "$PWD/trainer" /tmp/pkgs/dreambooth_trainer   # the package-dir mapping of pyproject.toml
export PYTHONPATH=/tmp/pkgs:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, pytorch_lightning as pl; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'lightning', pl.__version__)" | tee -a "$out/gpu.txt"
step() { local name="$1" limit="$2"; shift 2; echo "== $name" | tee -a "$out/summary.txt"; timeout "$limit" "$@" > "$out/$name.log" 2>&1; grep -E '^\{|speedup|passed|failed|rror' "$out/$name.log" | tee -a "$out/summary.txt"; }
step trainer-compiled "${TRAINER_LIMIT:-240}" python3 benchmarks/bench_trainer.py --modes default
step gpu-tests 75 python3 -m pytest -q -m gpu tests/trainer/test_training.py -p no:cacheprovider -x
step trainer-cudagraphs "${CUDAGRAPH_LIMIT:-100}" python3 benchmarks/bench_trainer.py --modes reduce-overhead
exit 0
