"""DreamboothJobs queued by a real Kueue (built from its Go module, run by the test bed) on the KWOK
GPU pool: quota for one gang at a time, preemption by priority. KWOK runs the pods; the tests
play the trainer's part by finishing them."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import condition, get_job, gpu_spec, job_manifest, trainer_jobs, trainer_pods, wait_phase
from tests.testbed.kueue import LOCAL_QUEUE

pytestmark = [pytest.mark.testbed, pytest.mark.usefixtures("operator", "kwok_keeps_job_pods_running")]
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


@pytest.fixture(autouse=True)
def _free_the_quota(testbed: Any, namespace: str) -> Iterator[None]:
    """The ClusterQueue is shared by the session: each test removes its jobs (and so their Workloads)."""
    yield
    testbed.kubectl("delete", "dbj", "--all", "-n", namespace, "--wait=true", timeout=60, check=False)
    testbed.wait_for("the test's Workloads gone", lambda: not testbed.kubectl(
        "get", "workloads.kueue.x-k8s.io", "-n", namespace, "-o", "name").stdout.strip(), timeout=60)


@pytest.fixture(scope="module")
def priorities(testbed: Any) -> dict[str, str]:
    classes = {"low": 100, "high": 1000}
    for name, value in classes.items():
        testbed.apply({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                       "metadata": {"name": f"dbj-{name}"}, "value": value, "preemptionPolicy": "Never",
                       "description": f"e2e: {name} priority DreamboothJobs"})
    return {name: f"dbj-{name}" for name in classes}


def queued(testbed: Any, namespace: str, name: str, subject: str, priority: str | None = None, **sections: Any) -> None:
    spec = gpu_spec(testbed, subject, **sections)
    if priority:
        spec["scheduling"] = {"priorityClassName": priority}
    manifest = job_manifest(testbed, name, spec)
    manifest["metadata"]["labels"] = {QUEUE_LABEL: LOCAL_QUEUE}
    testbed.apply(manifest, namespace)


def the_job(testbed: Any, namespace: str, name: str, gang: int = 0) -> dict[str, Any]:
    (job,) = [j for j in trainer_jobs(testbed, namespace, name) if j["metadata"]["name"] == f"{name}-train-{gang}"]
    return job


def finish(testbed: Any, namespace: str, name: str) -> None:
    """Play the trainer: every running rank of the job's gang exits 0."""
    pods = testbed.wait_for(f"{name}'s pods running", lambda: [p for p in trainer_pods(testbed, namespace, name)
                                                                if p["status"].get("phase") == "Running"] or None, timeout=60)
    for pod in pods:
        testbed.set_pod_phase(pod["metadata"]["name"], namespace, "Succeeded")


def suspend_managers(testbed: Any, namespace: str, name: str) -> set[str]:
    """Who wrote spec.suspend of a Job last (server-side field ownership)."""
    job = json.loads(testbed.kubectl("get", "job", name, "-n", namespace, "-o", "json", "--show-managed-fields").stdout)
    return {entry["manager"] for entry in job["metadata"].get("managedFields") or []
            if '"f:suspend"' in json.dumps((entry.get("fieldsV1") or {}).get("f:spec") or {})}


def test_two_jobs_quota_for_one_the_second_waits_queued_then_runs(testbed: Any, queue: str, namespace: str, s3_secret: str, subject: str) -> None:
    no_serving = {"enabled": False}
    queued(testbed, namespace, "first", subject, serving=no_serving)
    first = wait_phase(testbed, namespace, "first", "Running", timeout=90)
    assert condition(first, "Queued")["status"] == "False" and condition(first, "Queued")["reason"] == "Admitted"
    # The second one's deadline is shorter than its wait: queued time must not count.
    queued(testbed, namespace, "second", subject, serving=no_serving, runPolicy={"activeDeadlineSeconds": 12})
    second = wait_phase(testbed, namespace, "second", "Queued", timeout=60)
    waiting = condition(second, "Queued")
    assert waiting["status"] == "True" and waiting["reason"] == "WaitingForAdmission"
    job = the_job(testbed, namespace, "second")
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][QUEUE_LABEL] == LOCAL_QUEUE
    testbed.wait_for("Kueue's reason in the condition", lambda: "quota" in (condition(get_job(testbed, namespace, "second"), "Queued") or {}).get("message", ""), timeout=30)
    time.sleep(14)  # past the second job's activeDeadlineSeconds, still queued
    second = get_job(testbed, namespace, "second")
    assert second["status"]["phase"] == "Queued" and "startTime" not in second["status"]
    assert not trainer_pods(testbed, namespace, "second"), "no pod before Kueue admits the gang"

    finish(testbed, namespace, "first")
    wait_phase(testbed, namespace, "first", "Succeeded", timeout=60)
    second = wait_phase(testbed, namespace, "second", "Running", timeout=90)
    assert condition(second, "Queued")["reason"] == "Admitted" and second["status"]["restarts"] == 0
    managers = suspend_managers(testbed, namespace, "second-train-0")
    assert managers and all("kueue" in m.lower() for m in managers), f"only Kueue unsuspends a queued Job (spec.suspend owned by {managers})"


def test_kueue_preemption_stops_the_gang_and_readmission_resumes_it_without_a_restart(
    testbed: Any, queue: str, namespace: str, s3_secret: str, subject: str, priorities: dict[str, str]
) -> None:
    queued(testbed, namespace, "low", subject, priority=priorities["low"], serving={"enabled": False})
    wait_phase(testbed, namespace, "low", "Running", timeout=90)
    queued(testbed, namespace, "high", subject, priority=priorities["high"], serving={"enabled": False})
    wait_phase(testbed, namespace, "low", "Queued", timeout=90)
    # The Job's suspension and the Workload's eviction arrive on two watches: the reason follows the latter.
    low = testbed.wait_for("low Queued as Preempted or Evicted", lambda: (lambda j: j if condition(j, "Queued")["reason"] in ("Preempted", "Evicted") else None)(
        get_job(testbed, namespace, "low")), timeout=30, interval=0.5)
    assert low["status"]["restarts"] == 0 and low["status"]["gang"] == 0 and not low["status"].get("disruptions")
    assert the_job(testbed, namespace, "low")["spec"]["suspend"] is True, "Kueue suspended the same Job"
    testbed.wait_for("the preempted gang's pods gone", lambda: not trainer_pods(testbed, namespace, "low"), timeout=60)
    wait_phase(testbed, namespace, "high", "Running", timeout=90)

    finish(testbed, namespace, "high")
    low = wait_phase(testbed, namespace, "low", "Running", timeout=120)
    assert low["status"]["restarts"] == 0 and low["status"]["gang"] == 0, "readmitted: the same gang resumes"
    assert [j["metadata"]["name"] for j in trainer_jobs(testbed, namespace, "low")] == ["low-train-0"]


def workloads_by_job(testbed: Any, namespace: str) -> dict[str, dict[str, Any]]:
    """The namespace's Kueue Workloads by the name of the Job each stands for."""
    items = json.loads(testbed.kubectl("get", "workloads.kueue.x-k8s.io", "-n", namespace, "-o", "json").stdout)["items"]
    return {ref["name"]: w for w in items for ref in w["metadata"].get("ownerReferences") or [] if ref.get("kind") == "Job"}


def admitted(workload: dict[str, Any] | None) -> bool:
    return any(c["type"] == "Admitted" and c["status"] == "True" for c in ((workload or {}).get("status") or {}).get("conditions") or [])


def counter(metrics: str, name: str, labels: str = "") -> float:
    """One sample of the Prometheus text exposition (0 when absent)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(f"{name}{{{labels}}} " if labels else f"{name} "))


def seconds_to_the_next_gang(testbed: Any, namespace: str, name: str, nodes: int = 2) -> dict[str, float]:
    """Fail one rank of gang 0, then poll: seconds until gang 1's Workload exists, is admitted, and all its pods run."""
    pod = next(p for p in trainer_pods(testbed, namespace, name, 0) if p["status"].get("phase") == "Running")
    failed_at = time.monotonic()
    testbed.set_pod_phase(pod["metadata"]["name"], namespace, "Failed", exit_code=1)
    seen: dict[str, float] = {}
    next_job = f"{name}-train-1"
    while "running" not in seen:
        assert time.monotonic() - failed_at < 120, f"gang 1 of {name} not running 120 s after the failure: {seen}"
        workload = workloads_by_job(testbed, namespace).get(next_job)
        if workload is not None:
            seen.setdefault("workload", time.monotonic() - failed_at)
        if admitted(workload):
            seen.setdefault("admitted", time.monotonic() - failed_at)
        if len([p for p in trainer_pods(testbed, namespace, name, 1) if p["status"].get("phase") == "Running"]) == nodes:
            seen.setdefault("running", time.monotonic() - failed_at)
        time.sleep(0.2)
    return seen


def test_a_failed_gang_under_kueue_is_a_new_workload_and_its_cost_in_seconds(
    testbed: Any, operator: Any, queue: str, namespace: str, s3_secret: str, subject: str
) -> None:
    """Defect 10's restart cost, queue otherwise empty, against the same restart with no queue."""
    no_serving = {"enabled": False}
    testbed.apply(job_manifest(testbed, "plain", gpu_spec(testbed, subject, serving=no_serving)), namespace)
    wait_phase(testbed, namespace, "plain", "Running", timeout=90)
    plain = seconds_to_the_next_gang(testbed, namespace, "plain")
    assert wait_phase(testbed, namespace, "plain", "Running")["status"]["restarts"] == 1
    assert not workloads_by_job(testbed, namespace), "a job with no queue label is no Workload"
    testbed.kubectl("delete", "dbj", "plain", "-n", namespace, "--wait=true", timeout=60)

    queued(testbed, namespace, "rex", subject, serving=no_serving)
    wait_phase(testbed, namespace, "rex", "Running", timeout=90)
    first = workloads_by_job(testbed, namespace)["rex-train-0"]
    assert admitted(first)
    restarts_before = counter(operator.metrics(), "dreambooth_gang_restarts_total")
    kueued = seconds_to_the_next_gang(testbed, namespace, "rex")
    rex = wait_phase(testbed, namespace, "rex", "Running", timeout=30)
    assert rex["status"]["restarts"] == 1 and rex["status"]["gang"] == 1
    assert condition(rex, "Queued")["reason"] == "Admitted"
    second = workloads_by_job(testbed, namespace)["rex-train-1"]
    assert admitted(second) and second["metadata"]["uid"] != first["metadata"]["uid"], "each gang is its own Workload"
    testbed.wait_for("the failed gang's Workload gone with its Job",
                     lambda: "rex-train-0" not in workloads_by_job(testbed, namespace), timeout=60)
    assert counter(operator.metrics(), "dreambooth_gang_restarts_total") == restarts_before + 1, "the operator counts a restart"
    print(f"\nrestart cost, seconds from the failed pod (load {os.getloadavg()[0]:.1f}): "
          f"no queue: next gang running {plain['running']:.1f}; "
          f"Kueue: new Workload {kueued['workload']:.1f}, admitted {kueued['admitted']:.1f}, running {kueued['running']:.1f}")
    assert kueued["workload"] <= kueued["admitted"] <= kueued["running"]


def one_running_the_rest_queued(testbed: Any, namespace: str, subject: str, running: str, *waiting: str) -> None:
    """Jobs without serving: the first admitted and Running, the others waiting for its quota."""
    no_serving = {"enabled": False}
    queued(testbed, namespace, running, subject, serving=no_serving)
    wait_phase(testbed, namespace, running, "Running", timeout=90)
    for name in waiting:
        queued(testbed, namespace, name, subject, serving=no_serving)
    for name in waiting:
        wait_phase(testbed, namespace, name, "Queued", timeout=60)


def test_a_restarted_gang_queues_behind_a_job_already_waiting(
    testbed: Any, operator: Any, queue: str, namespace: str, s3_secret: str, subject: str
) -> None:
    """The failed gang gives its quota back: the job that was waiting runs first, the restart waits for it."""
    one_running_the_rest_queued(testbed, namespace, subject, "rex", "other")
    pod = next(p for p in trainer_pods(testbed, namespace, "rex", 0) if p["status"].get("phase") == "Running")
    failed_at = time.monotonic()
    testbed.set_pod_phase(pod["metadata"]["name"], namespace, "Failed", exit_code=1)
    wait_phase(testbed, namespace, "other", "Running", timeout=90)
    other_running = time.monotonic() - failed_at
    waiting = testbed.wait_for("the restarted gang's Workload", lambda: workloads_by_job(testbed, namespace).get("rex-train-1"), timeout=30)
    assert not admitted(waiting), "the restarted gang waits behind the job that was waiting"
    rex = wait_phase(testbed, namespace, "rex", "Queued", timeout=30)
    assert rex["status"]["restarts"] == 1 and condition(rex, "Queued")["reason"] == "WaitingForAdmission"
    assert not trainer_pods(testbed, namespace, "rex", 1)

    finish(testbed, namespace, "other")
    finished_at = time.monotonic()
    rex = wait_phase(testbed, namespace, "rex", "Running", timeout=90)
    assert rex["status"]["restarts"] == 1 and rex["status"]["gang"] == 1
    print(f"\nbehind a waiting job (load {os.getloadavg()[0]:.1f}): the waiting job ran {other_running:.1f} s "
          f"after the failed pod; the restarted gang ran {time.monotonic() - finished_at:.1f} s after that job finished")


def workload_reads(testbed: Any) -> float:
    """LISTs and GETs of Kueue Workloads the API server has served (its own apiserver_request_total)."""
    metrics = testbed.kubectl("get", "--raw", "/metrics").stdout
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("apiserver_request_total{") and 'resource="workloads"' in line
               and 'group="kueue.x-k8s.io"' in line and ('verb="LIST"' in line or 'verb="GET"' in line))


def test_queued_jobs_do_not_poll_the_workload_list(
    testbed: Any, operator: Any, queue: str, namespace: str, s3_secret: str, subject: str
) -> None:
    """Defect 10: Workloads are watched; 3 queued jobs for 20 s must not LIST them every few seconds (was 12)."""
    one_running_the_rest_queued(testbed, namespace, subject, "blocker", "q1", "q2", "q3")
    before = workload_reads(testbed)
    time.sleep(20)
    reads = workload_reads(testbed) - before
    print(f"\nWorkload LISTs+GETs served in 20 s with 3 queued jobs: {reads:.0f}")
    assert reads <= 5, f"{reads:.0f} LISTs/GETs of workloads in 20 s with 3 queued jobs: polled, not watched"
