"""Prometheus metrics of the operator: jobs by phase, reconcile latency, gang restarts."""
from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

PHASES = ("Pending", "Queued", "Running", "Restarting", "Suspended", "Succeeded", "Failed")

JOBS = Gauge("dreambooth_jobs", "DreamboothJobs known to this operator, by phase.", ["phase"])
RECONCILE_SECONDS = Histogram(
    "dreambooth_reconcile_seconds",
    "Time to reconcile one DreamboothJob (read the world, decide, act, record).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
RESTARTS = Counter("dreambooth_gang_restarts_total", "Whole-gang restarts after a failed or preempted pod.")
DISRUPTIONS = Counter("dreambooth_gang_disruptions_total", "Whole-gang restarts after a disruption (preemption, eviction, node loss).")
WATCH_EVENTS = Counter("dreambooth_child_watch_events_total", "Events received on the server-side filtered watches of owned objects.", ["kind"])
LEADER = Gauge("dreambooth_operator_leader", "1 when this replica is the active one (kopf peering), else 0.")
TIMERS = Gauge("dreambooth_scheduled_reconciles", "Jobs with a reconcile scheduled by time (finished jobs have none).")
UNWATCHED = Gauge("dreambooth_unwatched_namespaces", "Served namespaces whose Jobs or Deployments cannot be watched now (their jobs wait).")
# Every call this operator makes to the API server (kopf's own watch of DreamboothJobs aside), by
# HTTP verb; WATCH: a watch stream opened. What a cluster's API server pays for each job.
API_REQUESTS = Counter("dreambooth_api_requests_total", "Calls to the Kubernetes API by this operator, by verb (WATCH: a watch opened).", ["verb"])
TRANSITIONS = Counter("dreambooth_phase_transitions_total", "Phase changes, by the phase entered.", ["phase"])

_phases: dict[str, str] = {}
_lock = threading.Lock()


def record_phase(key: str, phase: str) -> None:
    with _lock:
        previous = _phases.get(key)
        _phases[key] = phase
        _refresh()
    if previous != phase:
        TRANSITIONS.labels(phase=phase).inc()


def forget(key: str) -> None:
    with _lock:
        _phases.pop(key, None)
        _refresh()


def _refresh() -> None:
    counts = {phase: 0 for phase in PHASES}
    for phase in _phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase, count in counts.items():
        JOBS.labels(phase=phase).set(count)


def serve(port: int) -> None:
    start_http_server(port)
