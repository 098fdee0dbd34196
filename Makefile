# One entry point for humans and CI. `make test` and `make demo` work on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv test test-unit test-trainer test-server test-chart browser terminal demo bench bench-serve bench-operator clean images

help:
	@echo "make demo   - run the product end to end on this machine (FAMILY=sdxl|sd3|flux: another model family)"
	@echo "make test   - build what the tests need and run the whole suite"
	@echo "make images - build the operator, trainer and inference images (buildah; sizes printed)"
	@echo "make bench  - dreambooth train vs the train_dreambooth.py loop as users run it (ABBA rounds); SDXL-LoRA and Flux-LoRA vs the diffusers example loops"
	@echo "make bench-serve - the server vs the plain diffusers loop at the same batch and one request at a time (tiny on CPU, SD1.5 on a GPU)"
	@echo "make bench-operator - the operator at scale on KWOK GPU nodes: 1,000 idle finished jobs, a 200-job burst, 1,000 arrivals at 10/s (apply->Job p50/p99, API calls per job, RSS)"
	@echo "make testbed-up / testbed-down - the local Kubernetes test bed (source .testbed/env to use it)"

# The venv is created once; packages are installed only when pyproject.toml changes
# (uv links wheels from its cache, so a fresh clone installs in seconds once warm).
$(PY):
	python3 -m venv $(VENV)

$(UV): | $(PY)
	$(PY) -m pip install --quiet uv

# Bytecode is written by Python itself as each module is first imported. PYTHONDONTWRITEBYTECODE
# (set on CI) is unexported: with it every Python process would recompile torch, Lightning and
# diffusers from source (~5 s of CPU each). Compiling all of site-packages up front instead took
# 36 s (66 CPU-s) before the first test, for the small part of it that is ever imported.
unexport PYTHONDONTWRITEBYTECODE
$(STAMP): pyproject.toml | $(UV)
	$(UV) pip install --quiet --python $(PY) -e '.[test]'
	touch $@

venv: $(STAMP)

# The e2e tests run beside the rest (niced), then the chart and test-bed tests: most of the
# e2e tests' time is spent waiting on the cluster (tests/run-suites.sh).
test: $(STAMP) testbed-binaries browser terminal images
	PY=$(PY) bash tests/run-suites.sh $(PYTEST_ARGS)

# Debian's chromium for the web-page test (installed once; a no-op when present).
browser:
	bash tests/server/install-browser.sh

# Debian's tmux for the terminal test of `dreambooth submit` (a no-op when present).
terminal:
	bash tests/apt-install.sh tmux tmux

test-server: $(STAMP) browser
	$(PY) -m pytest tests/server $(PYTEST_ARGS)

test-chart: $(STAMP) testbed-binaries
	$(PY) -m pytest tests/chart tests/unit/test_images.py tests/unit/test_chart_crds.py tests/unit/test_chart_values.py $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-trainer: $(STAMP) testbed-binaries
	$(PY) -m pytest tests/trainer $(PYTEST_ARGS)

# FAMILY=sdxl|sd3|flux: the same demo with that family's tiny model (LoRA); default: the SD1 `tiny`.
FAMILY ?= tiny
demo: $(STAMP) testbed-binaries images
	$(PY) examples/demo.py --out demo-output --family $(FAMILY)

bench: $(STAMP)
	$(PY) benchmarks/bench_trainer.py
	$(PY) benchmarks/bench_families.py

bench-serve: $(STAMP)
	$(PY) benchmarks/bench_serve.py

bench-operator: $(STAMP) testbed-binaries
	$(PY) benchmarks/bench_operator.py

# The three images, from images/*.Dockerfile, built by buildah on a Debian-made Python base; cached
# by content (an unchanged tree rebuilds nothing). After the venv: the build reuses uv's cache.
images: $(STAMP)
	python3 images/build.py

clean:
	rm -rf demo-output bench-output .pytest_cache

include tests/testbed/testbed.mk
