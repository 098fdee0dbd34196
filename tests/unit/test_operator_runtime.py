"""The operator's machinery without a cluster: the work queue, leader election, timeouts, the
storage breaker."""
from __future__ import annotations

import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from dreambooth_operator import kube, leadership, store
from dreambooth_operator.engine import WorkQueue


def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_many_events_for_one_job_are_one_reconcile_and_never_two_at_once() -> None:
    calls: list[str] = []
    running = threading.Event()
    release = threading.Event()
    overlap = []

    def reconcile(key: Any) -> float | None:
        if running.is_set():
            overlap.append(key)
        running.set()
        calls.append(key)
        release.wait(5)
        running.clear()
        return None

    queue = WorkQueue(reconcile, workers=4)
    queue.start()
    try:
        queue.add("ns/a")
        wait_until(lambda: calls == ["ns/a"])
        for _ in range(50):  # events while it runs: one more reconcile afterwards, not fifty
            queue.add("ns/a")
        release.set()
        wait_until(lambda: len(calls) == 2)
        time.sleep(0.2)
        assert calls == ["ns/a", "ns/a"] and not overlap
    finally:
        queue.stop()


def test_a_reconcile_says_when_to_look_again_and_a_finished_one_has_no_timer() -> None:
    calls: list[float] = []
    answers = iter([0.2, None])

    def reconcile(key: Any) -> float | None:
        calls.append(time.monotonic())
        return next(answers, None)

    queue = WorkQueue(reconcile, workers=1)
    queue.start()
    try:
        queue.add("ns/a")
        wait_until(lambda: len(calls) == 2)
        assert calls[1] - calls[0] >= 0.18
        wait_until(lambda: queue.delayed() == 0)
        time.sleep(0.3)
        assert len(calls) == 2, "None: no timer"
    finally:
        queue.stop()


def test_a_failing_reconcile_is_retried_with_backoff_and_the_pool_survives() -> None:
    calls: list[str] = []

    def reconcile(key: Any) -> float | None:
        calls.append(key)
        if key == "ns/bad" and len([c for c in calls if c == "ns/bad"]) == 1:
            raise RuntimeError("boom")
        return None

    queue = WorkQueue(reconcile, workers=1)
    queue.start()
    try:
        queue.add("ns/bad")
        queue.add("ns/good")
        wait_until(lambda: calls.count("ns/bad") == 2 and "ns/good" in calls, timeout=5)
    finally:
        queue.stop()


def test_nothing_runs_while_the_gate_is_closed() -> None:
    leading = threading.Event()
    calls: list[str] = []
    queue = WorkQueue(lambda key: calls.append(key) or None, workers=2, gate=leading.is_set)
    queue.start()
    try:
        queue.add("ns/a")
        time.sleep(0.3)
        assert calls == []
        leading.set()
        queue.wake()
        wait_until(lambda: calls == ["ns/a"])
    finally:
        queue.stop()


NOW = datetime(2026, 11, 26, 6, 0, tzinfo=timezone.utc)


def peer(priority: int, seconds_ago: float, lifetime: int = 10) -> dict[str, Any]:
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - timedelta(seconds=seconds_ago)).isoformat()}


def test_the_oldest_live_replica_leads() -> None:
    old, young = leadership.priority_for_start(1000.0), leadership.priority_for_start(2000.0)
    assert old > young
    peers = {"pod-a": peer(old, 1), "pod-b": peer(young, 1)}
    assert leadership.is_leading(peers, old, NOW) and not leadership.is_leading(peers, young, NOW)
    # The old one was killed: its record expires after its lifetime, then the young one leads.
    peers["pod-a"] = peer(old, 11)
    assert leadership.is_leading(peers, young, NOW)
    # Not announced yet (kopf has not written our record): do not act.
    assert not leadership.is_leading({"pod-a": peer(old, 1)}, young, NOW)
    # The same priority twice: nobody acts (as kopf itself pauses).
    assert not leadership.is_leading({"a": peer(old, 1), "b": peer(old, 1)}, old, NOW)



def test_a_record_it_cannot_read_does_not_end_the_leadership_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A malformed peering record reads as 'standing by' and the next good one still makes it lead."""
    mine = leadership.priority_for_start(1000.0)
    answers = [{"status": {"me": {"priority": "not a number", "lastseen": "yesterday"}}},
               {"status": {"me": {"priority": mine, "lifetime": 60,
                                  "lastseen": datetime.now(timezone.utc).isoformat()}}}]
    monkeypatch.setattr(kube, "request", lambda *a, **kw: answers.pop(0) if len(answers) > 1 else answers[0])
    monkeypatch.setattr(leadership, "POLL_SECONDS", 0.01)
    gained = threading.Event()
    lead = leadership.Leadership("peers", None, mine, gained.set)
    lead.start()
    try:
        assert gained.wait(5), "the loop died on the malformed record"
        assert lead.leading()
    finally:
        lead.stop()

class _RecordingApi:
    """Stands in for kubernetes.client.ApiClient: records the timeout of every call."""

    def __init__(self) -> None:
        self.timeouts: list[Any] = []

    def param_serialize(self, **kw: Any) -> tuple[Any, ...]:
        return (kw["method"], kw["resource_path"], {}, kw.get("body"), None)

    def call_api(self, *params: Any, _request_timeout: Any = None) -> Any:
        self.timeouts.append(_request_timeout)

        class Response:
            status, data = 200, b"{}"

            def read(self) -> None:
                return None

        return Response()


def test_every_api_call_has_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    api = _RecordingApi()
    monkeypatch.setattr(kube, "_api_client", api)
    kube.read_dreamboothjob("ns", "a")
    kube.list_trainer_pods("ns", "a")
    kube.set_job_suspended("ns", "a-train-0", True)
    kube.patch_status("ns", "a", {"phase": "Running"}, "12")
    kube.read_workload("ns", "uid")
    assert len(api.timeouts) == 5 and all(t == kube.REQUEST_TIMEOUT for t in api.timeouts)
    assert all(t is not None and min(t) > 0 for t in api.timeouts)


def test_an_unreachable_store_fails_fast_and_then_at_once() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    creds = store.Credentials(endpoint=f"127.0.0.1:{port}", secure=False, access_key="a", secret_key="b")
    started = time.monotonic()
    with pytest.raises(store.StoreUnavailable):
        store.read_progress(creds, "s3://bucket/jobs/ns/a/u")
    first = time.monotonic() - started
    started = time.monotonic()
    with pytest.raises(store.StoreUnavailable, match="unreachable"):
        store.check_instance_images(creds, "s3://bucket/subjects/a")
    assert first < store.CONNECT_TIMEOUT + 2 and time.monotonic() - started < 0.1, "the breaker answers without waiting"


def test_a_new_job_goes_before_routine_work() -> None:
    gate = threading.Event()
    calls: list[str] = []
    queue = WorkQueue(lambda key: calls.append(key) or None, workers=1, gate=gate.is_set)
    queue.start()
    try:
        for index in range(5):
            queue.add(f"ns/running-{index}")
        queue.add("ns/new", urgent=True)
        queue.add("ns/running-3", urgent=True)  # edited while waiting: moves up
        gate.set()
        queue.wake()
        wait_until(lambda: len(calls) == 6)
        assert calls[:2] == ["ns/running-3", "ns/new"]
    finally:
        queue.stop()


def test_a_new_key_wakes_a_worker_not_the_timer_thread() -> None:
    picked: list[float] = []
    queue = WorkQueue(lambda key: picked.append(time.monotonic()) or None, workers=1)
    queue.start()
    try:
        time.sleep(1.2)  # the worker's 1 s wait lapsed and it waits again, now behind the timer thread
        for attempt in range(3):
            added = time.monotonic()
            queue.add(f"ns/job-{attempt}")
            wait_until(lambda: len(picked) == attempt + 1)
            assert picked[-1] - added < 0.5, "the notify went to the timer thread: the worker slept on"
            time.sleep(1.1)
    finally:
        queue.stop()
