# Test-bed binaries: built from pinned Go modules (tests/testbed/versions.env), cached outside the repo.
TESTBED_CACHE ?= $(HOME)/.cache/dreambooth-testbed

.PHONY: testbed-binaries
testbed-binaries:
	bash tests/testbed/build.sh
