"""The operator's machinery without a cluster: the work queue, leader election, timeouts, the
storage breaker."""
from __future__ import annotations

import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from dreambooth_operator import kube, leadership, metrics, store
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


def test_replicas_started_in_the_same_millisecond_do_not_tie() -> None:
    """Two pods the kubelet started together read the same clock: equal priorities made both stand
    by for good (make demo's two operator replicas never acted). The low digits differ; age still wins."""
    same = {leadership.priority_for_start(1000.0004, tie) for tie in range(leadership.TIE_BREAK)}
    assert len(same) == leadership.TIE_BREAK
    assert min(same) > max(leadership.priority_for_start(1000.002, tie) for tie in range(leadership.TIE_BREAK)), "older still wins"
    assert leadership.priority_for_start(time.time()) < 2**53, "exact as a JSON number read as a float"
    a, b = leadership.priority_for_start(1000.0, 3), leadership.priority_for_start(1000.0, 7)
    views = {p: leadership.PeerView(p) for p in (a, b)}
    for view in views.values():
        view.observe({"pod-a": peer(a, 1), "pod-b": peer(b, 1)}, 0.0)
    assert [views[b].leading(0.5), views[a].leading(0.5)] == [True, False], "exactly one acts"


def test_the_oldest_live_replica_leads() -> None:
    old, young = leadership.priority_for_start(1000.0), leadership.priority_for_start(2000.0)
    assert old > young
    views = {p: leadership.PeerView(p) for p in (old, young)}
    for view in views.values():
        view.observe({"pod-a": peer(old, 1), "pod-b": peer(young, 1)}, 0.0)
    assert views[old].leading(0.5) and not views[young].leading(0.5)
    # The old one was killed: its record stops changing; the young one leads once it has been seen
    # unchanged for the record's lifetime, and not before.
    for t in range(1, 12):
        views[young].observe({"pod-a": peer(old, 1), "pod-b": peer(young, 1 - t)}, float(t))
    assert not views[young].leading(9.5) and views[young].leading(10.5)
    # Not announced yet (kopf has not written our record): do not act.
    fresh = leadership.PeerView(young)
    fresh.observe({"pod-a": peer(old, 1)}, 0.0)
    assert not fresh.leading(0.0)
    # The same priority twice: nobody acts (as kopf itself pauses).
    twins = leadership.PeerView(old)
    twins.observe({"a": peer(old, 1), "b": peer(old, 1)}, 0.0)
    assert not twins.leading(0.0)


def test_clock_skew_never_makes_two_leaders() -> None:
    """The leader's clock is 30 s behind the follower's: its lastseen looks stale to a wall clock."""
    leader_p, follower_p = leadership.priority_for_start(1000.0), leadership.priority_for_start(2000.0)
    leader, follower = leadership.PeerView(leader_p), leadership.PeerView(follower_p)
    for t in range(0, 60):  # both keep-alive every second; the leader writes times 30 s in the past
        records = {"a": peer(leader_p, 30 - t), "b": peer(follower_p, -t)}
        leader.observe(records, float(t))
        follower.observe(records, float(t))
        assert leader.leading(t + 0.5) and not follower.leading(t + 0.5), f"two leaders at t={t}"


def test_the_leader_stops_before_a_follower_may_take_over() -> None:
    """Its keep-alives stop getting through: it stands by before the followers' lifetime runs out."""
    mine, theirs = leadership.priority_for_start(1000.0), leadership.priority_for_start(2000.0)
    leader, follower = leadership.PeerView(mine), leadership.PeerView(theirs)
    for t in range(0, 3):
        records = {"a": peer(mine, -t), "b": peer(theirs, -t)}
        leader.observe(records, float(t))
        follower.observe(records, float(t))
    stops = takes_over = None
    for tenth in range(21, 200):  # the follower's own keep-alives go on; the leader's record no longer changes
        now = tenth / 10
        follower.observe({"a": peer(mine, -2), "b": peer(theirs, -now)}, now)
        if stops is None and not leader.leading(now):
            stops = now
        if takes_over is None and follower.leading(now):
            takes_over = now
    assert stops is not None and takes_over is not None and stops < takes_over, (stops, takes_over)


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
    kube.latest_event_message("ns", "uid", "FailedCreate")
    assert len(api.timeouts) == 5 and all(t == kube.REQUEST_TIMEOUT for t in api.timeouts)
    assert all(t is not None and min(t) > 0 for t in api.timeouts)


def test_every_api_call_is_counted_by_verb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "_api_client", _RecordingApi())

    def count(verb: str) -> float:
        return metrics.API_REQUESTS.labels(verb=verb)._value.get()

    before = {verb: count(verb) for verb in ("GET", "PATCH")}
    kube.read_dreamboothjob("ns", "a")
    kube.list_trainer_pods("ns", "a")
    kube.patch_status("ns", "a", {"phase": "Running"}, "12")
    assert (count("GET") - before["GET"], count("PATCH") - before["PATCH"]) == (2, 1)


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


def test_a_namespace_that_cannot_be_watched_stops_only_its_own_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A namespaced install whose Role in one namespace was deleted: the others are served."""
    from dreambooth_operator.runtime import Runtime

    runtime = Runtime(workers=2, namespaces=["good", "gone"], peering=None, peering_namespace=None, priority=1)
    for cache in (runtime.children.jobs, runtime.children.deployments):
        cache._synced["good"].set()  # "gone" never lists: its watch answers 403
        cache.failing["gone"] = "403 Forbidden"
    reconciled: list[str] = []
    monkeypatch.setattr(runtime.reconciler, "reconcile", lambda namespace, name: reconciled.append(f"{namespace}/{name}"))
    runtime.queue.start()
    try:
        runtime.queue.add("gone/a")
        runtime.queue.add("good/b")
        wait_until(lambda: "good/b" in reconciled)
        time.sleep(0.2)
        assert reconciled == ["good/b"], "no decision on the unlisted namespace's empty cache"
        assert runtime.children.failing() == {"gone": "403 Forbidden"}
    finally:
        runtime.queue.stop()
