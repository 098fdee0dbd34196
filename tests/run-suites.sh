#!/usr/bin/env bash
# `make test`: two lines of pytest processes side by side on a 2-core machine.
# - In front: the e2e tests (tests/e2e), the longest path: one test bed (control plane, KWOK nodes,
#   real-0, MinIO) whose trainer and inference pods need the CPU when they run.
# - Beside them: the trainer, server, client and unit tests (mostly CPU), niced and at one thread
#   each (OMP_NUM_THREADS reaches the trainers they start), so they fill the cores the test bed
#   leaves idle instead of slowing its pods; then, at normal priority, the chart and test-bed
#   tests on a test bed of their own (mostly waiting on the cluster; their operator pods must not
#   starve behind the e2e pods).
# The second line's output follows the first's. Arguments go to every pytest; with a test path
# among them, one pytest runs just that.
set -uo pipefail
PY=${PY:-.venv/bin/python}
E2E_SUITES=(tests/e2e)
OTHER_SUITES=(tests/client tests/server tests/trainer tests/unit)
CLUSTER_SUITES=(tests/chart tests/testbed)

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
beside() {
  echo "==== ${OTHER_SUITES[*]} (niced, beside the e2e tests) ===="
  OMP_NUM_THREADS=1 nice -n 10 "$PY" -m pytest "${OTHER_SUITES[@]}" "$@"
  local other_rc=$?
  echo
  echo "==== ${CLUSTER_SUITES[*]} (then, beside the e2e tests) ===="
  "$PY" -m pytest "${CLUSTER_SUITES[@]}" "$@"
  local cluster_rc=$?
  echo "other suites: exit $other_rc; chart and test-bed suites: exit $cluster_rc"
  return $(( other_rc != 0 ? other_rc : cluster_rc ))
}
beside "$@" > "$log" 2>&1 &
second=$!
"$PY" -m pytest "${E2E_SUITES[@]}" "$@"
e2e_rc=$?
wait "$second"
second_rc=$?
echo
cat "$log"
echo "e2e suite: exit $e2e_rc; the suites beside it: exit $second_rc"
exit $(( e2e_rc != 0 ? e2e_rc : second_rc ))
