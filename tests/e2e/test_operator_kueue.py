"""DreamboothJobs queued by a real Kueue (built from its Go module, run by the test bed) on the KWOK
GPU pool: quota for one gang at a time, preemption by priority. KWOK runs the pods; the tests
play the trainer's part by finishing them."""
from __future__ import annotations

import json
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
    low = wait_phase(testbed, namespace, "low", "Queued", timeout=90)
    assert condition(low, "Queued")["reason"] in ("Preempted", "Evicted"), condition(low, "Queued")
    assert low["status"]["restarts"] == 0 and low["status"]["gang"] == 0 and not low["status"].get("disruptions")
    assert the_job(testbed, namespace, "low")["spec"]["suspend"] is True, "Kueue suspended the same Job"
    testbed.wait_for("the preempted gang's pods gone", lambda: not trainer_pods(testbed, namespace, "low"), timeout=60)
    wait_phase(testbed, namespace, "high", "Running", timeout=90)

    finish(testbed, namespace, "high")
    low = wait_phase(testbed, namespace, "low", "Running", timeout=120)
    assert low["status"]["restarts"] == 0 and low["status"]["gang"] == 0, "readmitted: the same gang resumes"
    assert [j["metadata"]["name"] for j in trainer_jobs(testbed, namespace, "low")] == ["low-train-0"]
