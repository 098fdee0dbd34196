#!/usr/bin/env bash
# `make test`: two pytest processes side by side, one for the tests that share the session's test
# bed (a control plane, KWOK nodes, MinIO; mostly waiting on the cluster), one for the trainer,
# server, client and unit tests (mostly CPU). The second's output follows the first's.
# Arguments go to both; with a test path among them, one pytest runs just that.
set -uo pipefail
PY=${PY:-.venv/bin/python}
TESTBED_SUITES=(tests/chart tests/e2e tests/testbed)
OTHER_SUITES=(tests/client tests/server tests/trainer tests/unit)

for arg in "$@"; do
  if [[ $arg != -* && -e ${arg%%::*} ]]; then
    exec "$PY" -m pytest "$@"
  fi
done

# `make demo` leaves its test bed running under .testbed; the suites start their own, and on a small
# machine the demo's pods would starve them. The whole suite stops it first, and says so.
demo_bed="$(cd "$(dirname "$0")/.." && pwd)/.testbed"
if "$PY" -c 'import sys; from pathlib import Path; from tests.testbed.cluster import marked_pids; sys.exit(0 if marked_pids(Path(sys.argv[1])) else 1)' "$demo_bed"; then
  echo "make test: stopping the test bed running at $demo_bed (make demo's or make testbed-up's; either starts it again)"
  "$PY" -m tests.testbed down --root "$demo_bed" || exit 1
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The test-bed tests are the longer path and wait on pods that need the CPU now: the other suites
# run niced and with one thread each (OMP_NUM_THREADS reaches the trainers they start), so they
# fill the cores the test bed leaves idle instead of slowing its pods.
OMP_NUM_THREADS=1 nice -n 10 "$PY" -m pytest "${OTHER_SUITES[@]}" "$@" > "$log" 2>&1 &
other=$!
"$PY" -m pytest "${TESTBED_SUITES[@]}" "$@"
testbed_rc=$?
wait "$other"
other_rc=$?
echo
echo "==== ${OTHER_SUITES[*]} (ran beside the test-bed tests) ===="
cat "$log"
echo "test-bed suites: exit $testbed_rc; other suites: exit $other_rc"
exit $(( testbed_rc != 0 ? testbed_rc : other_rc ))
