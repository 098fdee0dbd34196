"""A DreamboothJob's life on the KWOK GPU pool, with the operator running against the test bed.

KWOK takes the trainer pods to Running; the tests play the trainer's part by setting pod phases
(a failed rank, a finished run), the way a preempted or finished pod reports to the API.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import (
    condition,
    get_job,
    gpu_spec,
    job_manifest,
    png_bytes,
    trainer_jobs,
    trainer_pods,
    upload,
    wait_phase,
)

pytestmark = [pytest.mark.testbed, pytest.mark.usefixtures("operator")]
# Tests that play the trainer's part need KWOK to leave Job pods Running until they say otherwise.
needs_held_pods = pytest.mark.usefixtures("kwok_keeps_job_pods_running")


@pytest.fixture(autouse=True)
def _free_the_gpus(testbed: Any, namespace: str) -> Iterator[None]:
    """The KWOK pool holds two 16-GPU gangs: each test removes its jobs (and so their pods)."""
    yield
    testbed.kubectl("delete", "dbj", "--all", "-n", namespace, "--wait=true", timeout=60, check=False)
    selector = "app.kubernetes.io/managed-by=dreambooth-operator"
    testbed.wait_for(
        "the test's pods removed",
        lambda: not testbed.items("pods", namespace, selector),
        timeout=90,
    )


def start(testbed: Any, namespace: str, name: str, spec: dict[str, Any]) -> None:
    testbed.apply(job_manifest(testbed, name, spec), namespace)


def running_gang(testbed: Any, namespace: str, name: str, gang: int, nodes: int = 2) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        pods = [p for p in trainer_pods(testbed, namespace, name, gang) if p["status"].get("phase") == "Running"]
        return pods if len(pods) == nodes else None

    return testbed.wait_for(f"gang {gang} of {name} running", ready, timeout=60)


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


@needs_held_pods
def test_a_gang_of_two_gpu_nodes(testbed: Any, namespace: str, s3_secret: str, subject: str) -> None:
    start(testbed, namespace, "rex", gpu_spec(testbed, subject))
    job = wait_phase(testbed, namespace, "rex", "Running")
    uid = job["metadata"]["uid"]
    assert condition(job, "Accepted")["status"] == "True"
    assert condition(job, "Running")["observedGeneration"] == job["metadata"]["generation"]
    assert job["status"]["outputUri"] == f"s3://dreambooth/jobs/{namespace}/rex/{uid}"

    service = testbed.get("service", "rex-workers", namespace)
    assert service["spec"]["clusterIP"] == "None"
    (batch,) = trainer_jobs(testbed, namespace, "rex")
    assert batch["metadata"]["name"] == "rex-train-0"
    assert (batch["spec"]["completionMode"], batch["spec"]["completions"], batch["spec"]["parallelism"]) == ("Indexed", 2, 2)
    assert batch["metadata"]["ownerReferences"][0]["uid"] == uid

    pods = sorted(running_gang(testbed, namespace, "rex", 0), key=lambda p: p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])
    assert all(p["spec"]["nodeName"].startswith("gpu-") for p in pods)
    assert len({p["spec"]["nodeName"] for p in pods}) == 2, "one pod per node"
    for index, pod in enumerate(pods):
        container = pod["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert pod["spec"]["hostname"] == f"rex-train-0-{index}" and pod["spec"]["subdomain"] == "rex-workers"
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        env = env_of(pod)
        assert env["MASTER_ADDR"] == "rex-train-0-0.rex-workers"
        assert (env["NNODES"], env["NPROC_PER_NODE"], env["MASTER_PORT"]) == ("2", "8", "29500")
        assert env["NODE_RANK"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
        assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "dreambooth-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
        assert env["AWS_ENDPOINT_URL"] == f"http://{testbed.minio.endpoint}"
    config = yaml.safe_load(testbed.get("configmap", "rex-config", namespace)["data"]["config.yaml"])
    assert config["output"]["uri"] == job["status"]["outputUri"]
    row = testbed.kubectl("get", "dbj", "rex", "-n", namespace, "--no-headers").stdout.split()
    assert row[:2] == ["rex", "Running"]
    events = json.loads(testbed.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    assert {"ChecksPassed", "GangRunning"} <= {e["reason"] for e in events if e["involvedObject"]["kind"] == "DreamboothJob"}


@needs_held_pods
def test_a_failed_pod_restarts_the_whole_gang_until_max_restarts(testbed: Any, operator: Any, namespace: str, s3_secret: str, subject: str) -> None:
    start(testbed, namespace, "rex", gpu_spec(testbed, subject, runPolicy={"maxRestarts": 1}))
    first = running_gang(testbed, namespace, "rex", 0)
    testbed.set_pod_phase(first[1]["metadata"]["name"], namespace, "Failed", exit_code=1)
    restarting = wait_phase(testbed, namespace, "rex", "Restarting", timeout=30)
    assert restarting["status"]["restarts"] == 1 and condition(restarting, "Restarting")["reason"] == "GangFailed"
    second = running_gang(testbed, namespace, "rex", 1)
    assert wait_phase(testbed, namespace, "rex", "Running")["status"]["restarts"] == 1
    assert {p["metadata"]["name"] for p in second}.isdisjoint({p["metadata"]["name"] for p in first})
    assert env_of(second[0])["MASTER_ADDR"] == "rex-train-1-0.rex-workers"
    testbed.wait_for("the failed gang's Job deleted", lambda: [j["metadata"]["name"] for j in trainer_jobs(testbed, namespace, "rex")] == ["rex-train-1"], timeout=30)
    assert "dreambooth_gang_restarts_total" in operator.metrics()

    testbed.set_pod_phase(second[0]["metadata"]["name"], namespace, "Failed", exit_code=1)
    failed = wait_phase(testbed, namespace, "rex", "Failed", timeout=30)
    assert condition(failed, "Failed")["reason"] == "MaxRestartsExceeded"
    assert failed["status"]["restarts"] == 1
    time.sleep(3)
    assert len(trainer_jobs(testbed, namespace, "rex")) == 1, "no new gang after Failed"


@needs_held_pods
def test_bad_input_fails_without_restarting(testbed: Any, namespace: str, s3_secret: str, subject: str) -> None:
    start(testbed, namespace, "rex", gpu_spec(testbed, subject))
    pods = running_gang(testbed, namespace, "rex", 0)
    testbed.set_pod_phase(pods[0]["metadata"]["name"], namespace, "Failed", exit_code=2)
    failed = wait_phase(testbed, namespace, "rex", "Failed", timeout=30)
    assert condition(failed, "Failed")["reason"] == "TrainerRejectedInput"
    assert failed["status"]["restarts"] == 0


@needs_held_pods
def test_suspend_removes_the_pods_and_resume_brings_them_back(testbed: Any, namespace: str, s3_secret: str, subject: str) -> None:
    start(testbed, namespace, "rex", gpu_spec(testbed, subject))
    running_gang(testbed, namespace, "rex", 0)
    testbed.kubectl("patch", "dbj", "rex", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    suspended = wait_phase(testbed, namespace, "rex", "Suspended", timeout=30)
    assert condition(suspended, "Suspended")["status"] == "True"
    testbed.wait_for("no trainer pods", lambda: not trainer_pods(testbed, namespace, "rex"), timeout=60)
    assert trainer_jobs(testbed, namespace, "rex")[0]["spec"]["suspend"] is True
    testbed.kubectl("patch", "dbj", "rex", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    resumed = wait_phase(testbed, namespace, "rex", "Running", timeout=60)
    assert condition(resumed, "Suspended")["status"] == "False" and condition(resumed, "Suspended")["reason"] == "Resumed"
    assert resumed["status"]["restarts"] == 0, "suspend/resume is not a restart"
    running_gang(testbed, namespace, "rex", 0)


@needs_held_pods
def test_active_deadline_fails_the_job(testbed: Any, namespace: str, s3_secret: str, subject: str) -> None:
    start(testbed, namespace, "rex", gpu_spec(testbed, subject, runPolicy={"activeDeadlineSeconds": 5}))
    failed = wait_phase(testbed, namespace, "rex", "Failed", timeout=60)
    assert condition(failed, "Failed")["reason"] == "DeadlineExceeded"
    testbed.wait_for("the gang removed", lambda: not trainer_jobs(testbed, namespace, "rex"), timeout=30)


@needs_held_pods
def test_success_serves_the_model_and_delete_cascades(testbed: Any, namespace: str, s3_secret: str, subject: str) -> None:
    spec = gpu_spec(testbed, subject, serving={"replicas": 1, "resources": {"gpus": 1, "cpu": "2", "memory": "8Gi"}})
    start(testbed, namespace, "rex", spec)
    for pod in running_gang(testbed, namespace, "rex", 0):
        testbed.set_pod_phase(pod["metadata"]["name"], namespace, "Succeeded")
    done = wait_phase(testbed, namespace, "rex", "Succeeded", timeout=60)
    assert done["status"]["progress"]["summary"] == "400/400 (100%)"
    assert done["status"]["endpoint"] == f"http://rex-serve.{namespace}.svc:8080"
    deployment = testbed.get("deployment", "rex-serve", namespace)
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:4] == ["dreambooth", "serve", "--model", f"{done['status']['outputUri']}/final"]
    ready = testbed.wait_for("ServingReady", lambda: (condition(get_job(testbed, namespace, "rex"), "ServingReady") or {}).get("status") == "True", timeout=60)
    assert ready

    testbed.kubectl("delete", "dbj", "rex", "-n", namespace, "--wait=true", timeout=60)

    def owned_left() -> list[str]:
        out = testbed.kubectl("get", "jobs,deployments,services,configmaps,pods", "-n", namespace, "-l", "dreambooth.dev/job-name=rex", "-o", "name").stdout
        return out.split()

    testbed.wait_for("everything owned removed", lambda: not owned_left(), timeout=60)


@needs_held_pods
def test_a_secret_created_late_is_waited_for(testbed: Any, namespace: str, subject: str) -> None:
    start(testbed, namespace, "rex", gpu_spec(testbed, subject))
    waiting = testbed.wait_for("rex waiting for its Secret", lambda: (condition(get_job(testbed, namespace, "rex"), "Accepted") or {}).get("reason") == "SecretNotFound", timeout=30)
    assert waiting
    pending = get_job(testbed, namespace, "rex")
    assert pending["status"]["phase"] == "Pending" and "dreambooth-s3" in condition(pending, "Accepted")["message"]
    assert trainer_jobs(testbed, namespace, "rex") == []
    testbed.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "dreambooth-s3", "namespace": namespace},
                   "stringData": {"AWS_ACCESS_KEY_ID": testbed.minio.access_key, "AWS_SECRET_ACCESS_KEY": testbed.minio.secret_key}})
    running = wait_phase(testbed, namespace, "rex", "Running", timeout=60)
    assert condition(running, "Accepted")["status"] == "True"
    events = json.loads(testbed.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=rex", "-o", "json").stdout)["items"]
    assert sum(1 for e in events if e["reason"] == "SecretNotFound") <= 1, "retries are not a Warning flood"


def test_past_the_admission_deadline_a_missing_secret_fails_the_job_without_pods(testbed: Any, namespace: str, subject: str) -> None:
    start(testbed, namespace, "rex", gpu_spec(testbed, subject, runPolicy={"admissionDeadlineSeconds": 4}))
    failed = wait_phase(testbed, namespace, "rex", "Failed", timeout=60)
    assert condition(failed, "Failed")["reason"] == "SecretNotFound"
    assert "dreambooth-s3" in condition(failed, "Failed")["message"] and "admissionDeadlineSeconds" in condition(failed, "Failed")["message"]
    assert condition(failed, "Finished")["status"] == "True"
    assert trainer_jobs(testbed, namespace, "rex") == []


def test_an_unreadable_instance_image_is_named_and_waited_for(testbed: Any, minio_client: Any, namespace: str, s3_secret: str) -> None:
    upload(minio_client, f"subjects/{namespace}/0.png", png_bytes(0))
    upload(minio_client, f"subjects/{namespace}/1.jpg", b"this is not a jpeg")
    start(testbed, namespace, "rex", gpu_spec(testbed, f"s3://dreambooth/subjects/{namespace}", serving={"enabled": False}))

    def reason() -> str:
        return (condition(get_job(testbed, namespace, "rex"), "Accepted") or {}).get("reason", "")

    testbed.wait_for("the unreadable photo named", lambda: reason() == "InstanceDataUnreadable", timeout=30)
    assert f"subjects/{namespace}/1.jpg" in condition(get_job(testbed, namespace, "rex"), "Accepted")["message"]
    assert trainer_jobs(testbed, namespace, "rex") == []
    upload(minio_client, f"subjects/{namespace}/1.jpg", png_bytes(1))  # the real photo, uploaded a little later
    testbed.wait_for("accepted once the photo is readable", lambda: reason() == "ChecksPassed", timeout=60)
    assert trainer_jobs(testbed, namespace, "rex")


@needs_held_pods
def test_killing_the_operator_mid_job_makes_no_duplicates(testbed: Any, operator: Any, namespace: str, s3_secret: str, subject: str) -> None:
    start(testbed, namespace, "rex", gpu_spec(testbed, subject, runPolicy={"maxRestarts": 3}))
    first = running_gang(testbed, namespace, "rex", 0)
    small = {"gpusPerNode": 4}  # three gangs share the 32-GPU pool
    operator.kill()
    try:
        # The world changes while nobody watches: a rank fails, a new job is applied.
        testbed.set_pod_phase(first[0]["metadata"]["name"], namespace, "Failed", exit_code=1)
        start(testbed, namespace, "late", gpu_spec(testbed, subject, resources=small))
    finally:
        operator.start()
    running_gang(testbed, namespace, "rex", 1)
    wait_phase(testbed, namespace, "rex", "Running", timeout=60)
    wait_phase(testbed, namespace, "late", "Running", timeout=60)
    # A kill right after a create, and another restart: still one Job per gang.
    start(testbed, namespace, "quick", gpu_spec(testbed, subject, resources=small))
    time.sleep(0.5)
    operator.kill()
    operator.start()
    wait_phase(testbed, namespace, "quick", "Running", timeout=60)
    time.sleep(12)  # at least one timer tick after the restart
    for name, gang in (("rex", 1), ("late", 0), ("quick", 0)):
        jobs = [j["metadata"]["name"] for j in trainer_jobs(testbed, namespace, name)]
        assert jobs == [f"{name}-train-{gang}"], jobs
        live = [p for p in trainer_pods(testbed, namespace, name) if not p["metadata"].get("deletionTimestamp")]
        assert len(live) == 2, [p["metadata"]["name"] for p in live]
    assert get_job(testbed, namespace, "rex")["status"]["restarts"] == 1
