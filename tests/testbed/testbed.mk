# Test bed (tests/testbed, docs/testbed.md): real control plane from pinned Go modules, KWOK GPU
# nodes, real-0 (a real kubelet on containerd), MinIO. Binaries are cached outside the repo ($(TESTBED_CACHE)).
TESTBED_CACHE ?= $(HOME)/.cache/dreambooth-testbed
TESTBED_ROOT ?= .testbed
export TESTBED_CACHE

.PHONY: testbed-binaries testbed-up testbed-down testbed-status

testbed-binaries:
	bash tests/testbed/build.sh

# Builds what is missing (timed), starts everything, writes $(TESTBED_ROOT)/kubeconfig and
# $(TESTBED_ROOT)/env (`source .testbed/env` for kubectl, helm and the MinIO endpoint).
testbed-up: $(STAMP)
	$(PY) -m tests.testbed up --root $(TESTBED_ROOT)

testbed-down: $(STAMP)
	$(PY) -m tests.testbed down --root $(TESTBED_ROOT)

testbed-status: $(STAMP)
	$(PY) -m tests.testbed status --root $(TESTBED_ROOT)
