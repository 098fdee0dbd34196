"""The real thing on the test bed's local node: examples/job-tiny.yaml trains for real (2 pods x
1 process over gloo) in this checkout's trainer image under runc, with a read-only root, keeps
checkpoints in MinIO, succeeds and serves from the inference image; a preempted pod restarts
the gang, which resumes from the checkpoint."""
from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import BUCKET, condition, get_job, png_bytes, trainer_pods, upload

pytestmark = [pytest.mark.testbed, pytest.mark.slow, pytest.mark.usefixtures("operator")]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "job-tiny.yaml"


def tiny_job(testbed: Any, minio_client: Any, namespace: str, images: dict[str, str], **training: Any) -> dict[str, Any]:
    """examples/job-tiny.yaml pointed at the test MinIO and this checkout's images, with its own subject photos."""
    for index in range(4):
        upload(minio_client, f"subjects/{namespace}/{index}.png", png_bytes(index))
    manifest = yaml.safe_load(EXAMPLE.read_text())
    spec = manifest["spec"]
    spec["storage"]["endpoint"] = testbed.minio.endpoint
    spec["data"]["instanceUri"] = f"s3://{BUCKET}/subjects/{namespace}"
    spec["training"].update(training)
    spec["resources"]["image"] = images["trainer"]
    spec["serving"]["image"] = images["inference"]
    return manifest


def watch(testbed: Any, namespace: str, name: str, until: str, timeout: float) -> list[dict[str, Any]]:
    """Poll the job until `until`, keeping every distinct progress seen (what `kubectl get dbj` shows)."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get_job(testbed, namespace, name)
        status = job.get("status") or {}
        progress = status.get("progress")
        if progress and (not seen or seen[-1]["progress"] != progress):
            seen.append({"phase": status.get("phase"), "progress": progress, "at": time.time()})
        if status.get("phase") == until:
            return seen
        if status.get("phase") == "Failed":
            raise AssertionError(f"job failed: {json.dumps(status, indent=1)}")
        time.sleep(1)
    raise TimeoutError(f"{name} not {until} after {timeout} s; seen {seen}")


def objects(minio_client: Any, prefix: str) -> list[str]:
    return [o.object_name for o in minio_client.list_objects(BUCKET, prefix=prefix, recursive=True)]


def ran_from(pod: dict[str, Any], image: str) -> bool:
    """The pod's container ran from `image` under runc, with a read-only root."""
    container = pod["spec"]["containers"][0]
    status = (pod["status"].get("containerStatuses") or [{}])[0]
    return (container["image"] == image and container["securityContext"]["readOnlyRootFilesystem"]
            and status.get("containerID", "").startswith("runc://") and status.get("imageID", "").startswith("sha256:"))


def test_tiny_job_trains_checkpoints_succeeds_and_serves(testbed: Any, minio_client: Any, namespace: str, s3_secret: str,
                                                         images: dict[str, str]) -> None:
    # One thread per rank trains ~90 images/s here (40 plain steps: about 2 s). 16 micro-batches a
    # step make the run last ~25 s, several of the operator's progress reads.
    manifest = tiny_job(testbed, minio_client, namespace, images, maxSteps=40, gradientAccumulationSteps=16)
    testbed.apply(manifest, namespace)
    name = manifest["metadata"]["name"]
    seen = watch(testbed, namespace, name, "Succeeded", timeout=600)
    running = [s for s in seen if s["phase"] == "Running"]
    steps = sorted({s["progress"]["step"] for s in running})
    assert len(steps) >= 2, f"progress should move while training: {seen}"
    for sample in running:
        updated = time.mktime(time.strptime(sample["progress"]["updateTime"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        assert sample["at"] - updated < 30, f"stale progress {sample}"

    job = get_job(testbed, namespace, name)
    prefix = job["status"]["outputUri"].removeprefix(f"s3://{BUCKET}/")
    stored = objects(minio_client, prefix + "/")
    assert any(key.endswith("/manifest.json") and "/checkpoints/step-" in key for key in stored), stored
    assert f"{prefix}/final/model_index.json" in stored
    assert job["status"]["latestCheckpoint"].startswith(job["status"]["outputUri"] + "/checkpoints/step-")
    assert job["status"]["progress"]["step"] == 40
    trained = trainer_pods(testbed, namespace, name)
    assert len(trained) == 2 and all(ran_from(pod, images["trainer"]) for pod in trained), "both ranks ran the trainer image"

    testbed.wait_for("ServingReady", lambda: (condition(get_job(testbed, namespace, name), "ServingReady") or {}).get("status") == "True", timeout=300)
    pods = json.loads(testbed.kubectl("get", "pods", "-n", namespace, "-l", "app.kubernetes.io/component=inference", "-o", "json").stdout)["items"]
    server = next(p for p in pods if p["status"].get("phase") == "Running")
    assert ran_from(server, images["inference"])
    ip = server["status"]["podIP"]
    request = urllib.request.Request(
        f"http://{ip}:8080/v1/generate",
        data=json.dumps({"prompt": "a photo of sks dog on the moon", "steps": 2, "seed": 1}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"] == "image/png"
        assert response.read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_preempted_pod_restarts_the_gang_from_the_checkpoint(testbed: Any, minio_client: Any, namespace: str, s3_secret: str,
                                                               images: dict[str, str]) -> None:
    # 8 micro-batches a step: at ~90 images/s the 80 plain steps would end in ~4 s, before the kill.
    manifest = tiny_job(testbed, minio_client, namespace, images, maxSteps=80, gradientAccumulationSteps=8)
    manifest["spec"]["serving"]["enabled"] = False
    testbed.apply(manifest, namespace)
    name = manifest["metadata"]["name"]

    def checkpointed() -> int | None:
        status = get_job(testbed, namespace, name).get("status") or {}
        latest = status.get("latestCheckpoint") or ""
        match = re.search(r"step-(\d+)$", latest)
        return int(match.group(1)) if match and status.get("phase") == "Running" else None

    step = testbed.wait_for("a checkpoint while running", checkpointed, timeout=600, interval=1)
    assert step < 80, "the run ended before it could be preempted; make it longer"
    victim = next(p for p in trainer_pods(testbed, namespace, name, 0) if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1")
    testbed.kubectl("delete", "pod", victim["metadata"]["name"], "-n", namespace, "--wait=false")

    testbed.wait_for("gang 1", lambda: trainer_pods(testbed, namespace, name, 1), timeout=300, interval=1)
    seen = watch(testbed, namespace, name, "Succeeded", timeout=600)
    job = get_job(testbed, namespace, name)
    assert (job["status"]["disruptions"], job["status"]["restarts"]) == (1, 0), "a deleted pod (SIGTERM, exit 143) is a disruption"
    assert job["status"]["progress"]["step"] == 80
    rank0 = next(p for p in trainer_pods(testbed, namespace, name, 1) if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0")
    log = testbed.pod_log(rank0["metadata"]["name"], namespace)
    starts = [int(m) for m in re.findall(r'"start_step":\s*(\d+)', log)]
    assert starts and starts[0] >= step, f"gang 1 should resume from step {step}: {log[-2000:]}"
    after = [s["progress"]["step"] for s in seen if s["phase"] == "Running"]
    assert all(value >= step for value in after), f"the step count continues from the checkpoint: {after}"
