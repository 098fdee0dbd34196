"""What real clusters do around a DreamboothJob, on the KWOK GPU pool: a quota that refuses pods,
gangs placed all-or-nothing by the Workload API's PodGroups (the test bed serves
scheduling.k8s.io/v1alpha2), and the data deleted with the job when spec.retention asks."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import BUCKET, condition, get_job, gpu_spec, job_manifest, png_bytes, trainer_pods, upload

pytestmark = [pytest.mark.testbed, pytest.mark.usefixtures("operator", "kwok_keeps_job_pods_running")]


@pytest.fixture(autouse=True)
def _free_the_gpus(testbed: Any, namespace: str) -> Iterator[None]:
    yield
    testbed.kubectl("delete", "dbj", "--all", "-n", namespace, "--wait=true", timeout=90, check=False)


def running_message(testbed: Any, namespace: str, name: str) -> str:
    return (condition(get_job(testbed, namespace, name), "Running") or {}).get("message", "")


def test_a_quota_that_refuses_a_pod_is_named(testbed: Any, namespace: str, s3_secret: str, subject: str) -> None:
    testbed.apply({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "one-pod", "namespace": namespace},
                   "spec": {"hard": {"pods": "1"}}})
    testbed.apply(job_manifest(testbed, "rex", gpu_spec(testbed, subject, serving={"enabled": False})), namespace)

    def refused() -> dict[str, Any] | None:
        found = condition(get_job(testbed, namespace, "rex"), "Running") or {}
        return found if found.get("reason") == "PodsRefused" else None

    found = testbed.wait_for("the quota named in the Running condition", refused, timeout=60, interval=1)
    assert "exceeded quota: one-pod" in found["message"] and "1/2 pods of gang 0" in found["message"], found
    job = get_job(testbed, namespace, "rex")
    assert job["status"]["phase"] == "Pending" and job["status"]["restarts"] == 0


def test_a_gang_is_placed_all_or_nothing_without_kueue(testbed: Any, namespace: str, s3_secret: str, subject: str) -> None:
    """Room for one pod of a 2-pod gang: with the gang's PodGroup the scheduler places neither (no
    node held by half a gang; two such gangs never livelock). Without it one pod would sit on gpu-0."""
    room_for_one = {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["gpu-0", "no-such-node"]}]}]}}}}
    testbed.apply(job_manifest(testbed, "rex", gpu_spec(testbed, subject, serving={"enabled": False}, scheduling=room_for_one)), namespace)
    testbed.wait_for("the PodGroup", lambda: testbed.get("podgroups.scheduling.k8s.io", "rex-train-0", namespace), timeout=30)
    group = testbed.get("podgroups.scheduling.k8s.io", "rex-train-0", namespace)
    assert group["spec"]["schedulingPolicy"] == {"gang": {"minCount": 2}}
    pods = testbed.wait_for("both pods of the gang", lambda: (lambda p: p if len(p) == 2 else None)(trainer_pods(testbed, namespace, "rex", 0)),
                            timeout=30)
    assert all(p["spec"]["schedulingGroup"] == {"podGroupName": "rex-train-0"} for p in pods)
    testbed.wait_for("the job says the gang is not placed", lambda: "GangNotPlaced" == (condition(get_job(testbed, namespace, "rex"), "Running") or {}).get("reason"),
                     timeout=60, interval=1)
    placed = [p["metadata"]["name"] for p in trainer_pods(testbed, namespace, "rex", 0) if p["spec"].get("nodeName")]
    assert placed == [], f"half a gang was placed: {placed}"
    job = get_job(testbed, namespace, "rex")
    assert condition(job, "GangScheduling")["reason"] == "PodGroup" and job["status"]["gangScheduling"] == "PodGroup"


def objects(minio_client: Any, prefix: str) -> list[str]:
    return [o.object_name for o in minio_client.list_objects(BUCKET, prefix=prefix, recursive=True)]


@pytest.mark.parametrize("policy", ["Delete", "Retain"])
def test_the_data_goes_with_the_job_only_when_asked(testbed: Any, minio_client: Any, namespace: str, s3_secret: str, policy: str) -> None:
    photos = f"subjects/{namespace}-{policy.lower()}"
    for index in range(3):
        upload(minio_client, f"{photos}/{index}.png", png_bytes(index))
    upload(minio_client, f"{photos}/0.txt", b"a photo of sks dog on a sofa")
    upload(minio_client, f"{photos}/notes.md", b"kept: not a training input")
    retention = {"outputs": policy, "subjectPhotos": policy}
    manifest = job_manifest(testbed, "rex", gpu_spec(testbed, f"s3://{BUCKET}/{photos}", serving={"enabled": False}))
    manifest["spec"]["retention"] = retention
    testbed.apply(manifest, namespace)
    output = testbed.wait_for("the output prefix", lambda: (get_job(testbed, namespace, "rex").get("status") or {}).get("outputUri"), timeout=60)
    prefix = output.removeprefix(f"s3://{BUCKET}/")
    upload(minio_client, f"{prefix}/checkpoints/step-00000004-a0/manifest.json", b"{}")
    upload(minio_client, f"{prefix}/latest", b"checkpoints/step-00000004-a0")
    finalizers = get_job(testbed, namespace, "rex")["metadata"].get("finalizers") or []
    assert ("dreambooth.dev/data-retention" in finalizers) == (policy == "Delete"), finalizers

    testbed.kubectl("delete", "dbj", "rex", "-n", namespace, "--wait=true", timeout=90)
    left, photos_left = objects(minio_client, prefix + "/"), objects(minio_client, photos + "/")
    if policy == "Delete":
        assert left == [], f"the job's outputs outlived it: {left}"
        assert photos_left == [f"{photos}/notes.md"], f"only the photos and their captions go: {photos_left}"
    else:
        assert len(left) == 2 and len(photos_left) == 5, "Retain (the default) keeps everything"
    events = json.loads(testbed.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    assert not [e for e in events if e["reason"] == "DataNotDeleted"]
