"""The real thing on the test bed's local node: examples/job-tiny.yaml trains for real (2 pods x
1 process over gloo) in this checkout's trainer image under runc, with a read-only root, keeps
checkpoints in MinIO, succeeds and serves from the inference image; a preempted pod restarts
the gang, which resumes from the checkpoint."""
from __future__ import annotations

import copy
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import BUCKET, condition, get_job, png_bytes, trainer_jobs, trainer_pods, upload

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


# --- suspension with real pods: exit 143 after the SIGTERM checkpoint ---------------------------
# The ended pods are held visible by a second finalizer (as service meshes and log shippers add, or
# as a kubelet slower than the Job controller leaves them): the Job controller then judges their
# exit codes while the Job is suspended.
HOLD = "e2e.dreambooth.dev/hold"


def hold(testbed: Any, namespace: str, pods: list[dict[str, Any]]) -> None:
    for pod in pods:
        testbed.kubectl("patch", "pod", pod["metadata"]["name"], "-n", namespace, "--type=json",
                        "-p", json.dumps([{"op": "add", "path": "/metadata/finalizers/-", "value": HOLD}]))


def release(testbed: Any, namespace: str, name: str) -> None:
    for pod in trainer_pods(testbed, namespace, name):
        finalizers = pod["metadata"].get("finalizers") or []
        if HOLD in finalizers:
            testbed.kubectl("patch", "pod", pod["metadata"]["name"], "-n", namespace, "--type=merge",
                            "-p", json.dumps({"metadata": {"finalizers": [f for f in finalizers if f != HOLD]}}), check=False)


def exit_codes(pods: list[dict[str, Any]]) -> list[int | None]:
    return sorted(((s.get("state") or {}).get("terminated") or {}).get("exitCode", -1)
                  for p in pods for s in (p["status"].get("containerStatuses") or []) if s["name"] == "trainer")


def ended_on_sigterm(testbed: Any, namespace: str, name: str, gang: int = 0) -> list[dict[str, Any]] | None:
    pods = trainer_pods(testbed, namespace, name, gang)
    return pods if len(pods) == 2 and exit_codes(pods) == [143, 143] and all(p["status"].get("phase") == "Failed" for p in pods) else None


def batch_conditions(testbed: Any, namespace: str, job: str) -> dict[str, str]:
    found = testbed.get("job", job, namespace) or {}
    return {c["type"]: c["status"] for c in (found.get("status") or {}).get("conditions") or []}


def wait_checkpoint(testbed: Any, namespace: str, name: str, phase: str = "Running") -> int:
    def checkpointed() -> int | None:
        status = get_job(testbed, namespace, name).get("status") or {}
        match = re.search(r"step-(\d+)", status.get("latestCheckpoint") or "")
        return int(match.group(1)) if match and status.get("phase") == phase else None

    return testbed.wait_for(f"a checkpoint of {name} while {phase}", checkpointed, timeout=600, interval=1)


def resumed_from(testbed: Any, namespace: str, name: str) -> list[int]:
    rank0 = [p for p in trainer_pods(testbed, namespace, name, 0)
             if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0"]
    return [int(m) for pod in rank0 for m in re.findall(r'"start_step":\s*(\d+)', testbed.pod_log(pod["metadata"]["name"], namespace))]


def assert_the_same_gang_resumed(testbed: Any, namespace: str, name: str, step: int) -> None:
    """Gang 0 runs again from its SIGTERM checkpoint (rank 0's log), counted as nothing. The rest of
    the run is the tiny example's, tested elsewhere: the job is not trained to the end here."""
    testbed.wait_for(f"{name}'s gang 0 resumed from step >= {step}", lambda: max(resumed_from(testbed, namespace, name), default=0) >= step
                     and get_job(testbed, namespace, name)["status"].get("phase") == "Running", timeout=300, interval=2)
    time.sleep(5)  # the operator has looked at the resumed gang
    job = get_job(testbed, namespace, name)
    assert job["status"]["phase"] == "Running", job["status"]
    assert (job["status"]["gang"], job["status"]["restarts"], job["status"]["disruptions"]) == (0, 0, 0), "the same gang resumed"
    assert [j["metadata"]["name"] for j in trainer_jobs(testbed, namespace, name)] == [f"{name}-train-0"]
    assert not {"Failed", "FailureTarget"} & {t for t, v in batch_conditions(testbed, namespace, f"{name}-train-0").items() if v == "True"}


def test_suspend_and_resume_keep_the_gang_when_real_pods_exit_143(testbed: Any, minio_client: Any, namespace: str, s3_secret: str,
                                                                  images: dict[str, str]) -> None:
    manifest = tiny_job(testbed, minio_client, namespace, images, maxSteps=80, gradientAccumulationSteps=8)
    manifest["spec"]["serving"]["enabled"] = False
    manifest["spec"]["runPolicy"]["maxDisruptions"] = 0  # a suspension counted as a disruption would fail it
    testbed.apply(manifest, namespace)
    name = manifest["metadata"]["name"]
    step = wait_checkpoint(testbed, namespace, name)
    assert step < 80, "the run ended before it could be suspended; make it longer"
    hold(testbed, namespace, trainer_pods(testbed, namespace, name, 0))
    try:
        testbed.kubectl("patch", "dbj", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
        testbed.wait_for("both ranks ended on SIGTERM (143), held visible", lambda: ended_on_sigterm(testbed, namespace, name), timeout=120)
        time.sleep(3)  # the Job controller syncs on every pod change: it has judged them
        assert batch_conditions(testbed, namespace, f"{name}-train-0").get("FailureTarget") != "True", \
            "exit 143 of a suspended Job's pods must not fail the Job"
        job = get_job(testbed, namespace, name)
        assert job["status"]["phase"] == "Suspended" and (job["status"]["gang"], job["status"]["disruptions"]) == (0, 0)
    finally:
        release(testbed, namespace, name)
    testbed.kubectl("patch", "dbj", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    assert_the_same_gang_resumed(testbed, namespace, name, step)


CPU_QUEUE, CPU_CLUSTER_QUEUE = "cpu-queue", "cpu-cq"


@pytest.fixture()
def cpu_queue(testbed: Any, kueue: Any, namespace: str) -> str:
    """Kueue quota for exactly one tiny job (2 pods x 1 CPU, 2Gi), shared by local-0 and the KWOK pool."""
    from tests.testbed.kueue import FLAVOR

    testbed.apply([
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": CPU_CLUSTER_QUEUE},
         "spec": {"namespaceSelector": {}, "preemption": {"withinClusterQueue": "LowerPriority"},
                  "resourceGroups": [{"coveredResources": ["cpu", "memory"], "flavors": [{"name": FLAVOR, "resources": [
                      {"name": "cpu", "nominalQuota": "2"}, {"name": "memory", "nominalQuota": "4Gi"}]}]}]}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": CPU_QUEUE, "namespace": namespace},
         "spec": {"clusterQueue": CPU_CLUSTER_QUEUE}},
        *[{"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": f"dbj-{level}"}, "value": value,
           "preemptionPolicy": "Never", "description": f"e2e: {level} priority DreamboothJobs"} for level, value in (("low", 100), ("high", 1000))],
    ])
    return CPU_QUEUE


@pytest.mark.usefixtures("kwok_keeps_job_pods_running")
def test_a_kueue_preemption_keeps_the_gang_when_real_pods_exit_143(testbed: Any, minio_client: Any, namespace: str, s3_secret: str,
                                                                   images: dict[str, str], cpu_queue: str) -> None:
    low = tiny_job(testbed, minio_client, namespace, images, maxSteps=80, gradientAccumulationSteps=8)
    low["metadata"] = {"name": "low", "labels": {"kueue.x-k8s.io/queue-name": cpu_queue}}
    low["spec"]["serving"]["enabled"] = False
    low["spec"]["runPolicy"]["maxDisruptions"] = 0
    low["spec"]["scheduling"]["priorityClassName"] = "dbj-low"
    testbed.apply(low, namespace)
    step = wait_checkpoint(testbed, namespace, "low")
    assert step < 80, "the run ended before it could be preempted; make it longer"
    hold(testbed, namespace, trainer_pods(testbed, namespace, "low", 0))
    # The same quota asked for by a higher priority: its pods go to the KWOK pool (the test finishes them).
    high = copy.deepcopy(low)
    high["metadata"] = {"name": "high", "labels": {"kueue.x-k8s.io/queue-name": cpu_queue}}
    high["spec"]["scheduling"] = {"priorityClassName": "dbj-high", "nodeSelector": {"dreambooth.dev/pool": "gpu"},
                                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    try:
        testbed.apply(high, namespace)
        testbed.wait_for("low's ranks ended on SIGTERM (143), held visible", lambda: ended_on_sigterm(testbed, namespace, "low"), timeout=180)
        time.sleep(3)
        assert batch_conditions(testbed, namespace, "low-train-0").get("FailureTarget") != "True", \
            "exit 143 of the pods Kueue stopped must not fail the Job"
        queued = get_job(testbed, namespace, "low")
        assert queued["status"]["phase"] == "Queued" and condition(queued, "Queued")["reason"] in ("Preempted", "Evicted")
        assert (queued["status"]["gang"], queued["status"]["disruptions"], queued["status"]["restarts"]) == (0, 0, 0)
    finally:
        release(testbed, namespace, "low")
    pods = testbed.wait_for("high's pods running", lambda: (lambda p: p if len(p) == 2 else None)(
        [p for p in trainer_pods(testbed, namespace, "high") if p["status"].get("phase") == "Running"]), timeout=120)
    for pod in pods:
        testbed.set_pod_phase(pod["metadata"]["name"], namespace, "Succeeded")
    assert_the_same_gang_resumed(testbed, namespace, "low", step)  # readmitted by Kueue
