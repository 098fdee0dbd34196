"""The real thing on the test bed's kubelet node real-0: examples/job-tiny.yaml trains for real
(2 pods x 1 process over gloo, rendezvous through the workers Service's DNS names) in this
checkout's trainer image on containerd, with a read-only root, keeps checkpoints in MinIO,
succeeds and serves from the inference image; a preempted pod restarts the gang, which resumes
from the checkpoint."""
from __future__ import annotations

import copy
import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import BUCKET, condition, get_job, png_bytes, trainer_jobs, trainer_pods, upload, wait_phase
from tests.testbed import node_images
from tests.testbed.cluster import REAL_NODE

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
    """The pod's container ran on real-0's containerd from the very image buildah built, with a read-only root."""
    container = pod["spec"]["containers"][0]
    status = (pod["status"].get("containerStatuses") or [{}])[0]
    return (pod["spec"]["nodeName"] == REAL_NODE and container["image"] == image
            and container["securityContext"]["readOnlyRootFilesystem"]
            and status.get("containerID", "").startswith("containerd://")
            and status.get("imageID") == node_images.local_image(image).image_id)


def test_tiny_job_trains_checkpoints_succeeds_and_serves(testbed: Any, minio_client: Any, namespace: str, s3_secret: str,
                                                         images: dict[str, str]) -> None:
    # One rank trains ~27 micro-batches/s here (40 plain steps: under 2 s). 6 micro-batches a step
    # make the run last ~9 s: several of the test-bed operator's progress reads (every 2 s).
    manifest = tiny_job(testbed, minio_client, namespace, images, maxSteps=40, gradientAccumulationSteps=6)
    manifest["spec"]["checkpointing"]["everyNSteps"] = 10  # each checkpoint is also a fidelity scoring: 4, not 10
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
    a_hung_server_is_taken_out_of_service_and_restarted(testbed, namespace, name, server)


def _server_ready(testbed: Any, namespace: str, pod_name: str) -> dict[str, Any] | None:
    status = (((testbed.get("pod", pod_name, namespace) or {}).get("status") or {}).get("containerStatuses") or [{}])[0]
    return status if status.get("ready") else None


def a_hung_server_is_taken_out_of_service_and_restarted(testbed: Any, namespace: str, name: str, server: dict[str, Any]) -> None:
    """The inference pod's probes as the operator builds them, run by the kubelet: a stopped server
    (SIGSTOP) fails readiness (out of the Service, ServingReady=False), then liveness (the kubelet
    kills and restarts its container in the same pod), and is ready again after the restart."""
    pod_name = server["metadata"]["name"]
    container_id = server["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    pid = testbed.bed.real_node().task_pid(container_id)
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        testbed.wait_for("the hung server not ready", lambda: not _server_ready(testbed, namespace, pod_name), timeout=120, interval=1)
        testbed.wait_for("ServingReady=False", lambda: (condition(get_job(testbed, namespace, name), "ServingReady") or {}).get("status") == "False",
                         timeout=60, interval=1)
        unready = time.monotonic() - stopped

        def killed_for_liveness() -> bool:
            events = testbed.items("events", namespace, field_selector=f"involvedObject.name={pod_name}")
            return any(e["reason"] == "Killing" and "liveness" in e.get("message", "") for e in events)

        testbed.wait_for("the kubelet killing the server for its liveness probe", killed_for_liveness, timeout=180, interval=1)
    finally:
        os.kill(pid, signal.SIGCONT)  # the pending SIGTERM is delivered: the server stops at once
    status = testbed.wait_for("the restarted server ready", lambda: _server_ready(testbed, namespace, pod_name), timeout=300, interval=1)
    assert status["restartCount"] == 1 and status["lastState"]["terminated"], status
    testbed.wait_for("ServingReady=True again", lambda: (condition(get_job(testbed, namespace, name), "ServingReady") or {}).get("status") == "True",
                     timeout=60, interval=1)
    print(f"\n[e2e] hung server: not ready after {unready:.0f} s, restarted and ready again after {time.monotonic() - stopped:.0f} s")


def test_a_preempted_pod_restarts_the_gang_from_the_checkpoint(testbed: Any, minio_client: Any, namespace: str, s3_secret: str,
                                                               images: dict[str, str]) -> None:
    # 4 micro-batches a step: at ~27 micro-batches/s the run lasts ~12 s, its first checkpoint (step
    # 4) is in the status 2-4 s in (the test-bed operator reads progress every 2 s), long before the end.
    manifest = tiny_job(testbed, minio_client, namespace, images, maxSteps=80, gradientAccumulationSteps=4)
    manifest["spec"]["checkpointing"]["everyNSteps"] = 10  # each checkpoint is also a fidelity scoring: 8, not 20
    manifest["spec"]["serving"]["enabled"] = False
    testbed.apply(manifest, namespace)
    name = manifest["metadata"]["name"]

    def checkpointed() -> int | None:
        status = get_job(testbed, namespace, name).get("status") or {}
        latest = status.get("latestCheckpoint") or ""
        match = re.search(r"/step-(\d+)(?:-a\d+)?$", latest)  # issue 19 keys checkpoints by attempt: step-N-aA
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


HOLD = "testbed.dreambooth.dev/hold"  # a second finalizer on the trainer pods, as log shippers add


def _set_hold(testbed: Any, namespace: str, pod: dict[str, Any], held: bool) -> None:
    finalizers = [f for f in pod["metadata"].get("finalizers") or [] if f != HOLD] + ([HOLD] if held else [])
    testbed.kubectl("patch", "pod", pod["metadata"]["name"], "-n", namespace, "--type=merge",
                    "-p", json.dumps({"metadata": {"finalizers": finalizers}}))


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    return ((pod["status"].get("containerStatuses") or [{}])[0].get("state") or {}).get("terminated")


def hold(testbed: Any, namespace: str, pods: list[dict[str, Any]]) -> None:
    for pod in pods:
        _set_hold(testbed, namespace, pod, True)


def release(testbed: Any, namespace: str, name: str) -> None:
    for pod in trainer_pods(testbed, namespace, name):
        if HOLD in (pod["metadata"].get("finalizers") or []):
            _set_hold(testbed, namespace, pod, False)


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


def test_suspending_a_running_gang_sigterms_its_trainers_and_the_same_gang_resumes(
        testbed: Any, minio_client: Any, namespace: str, s3_secret: str, images: dict[str, str]) -> None:
    """runPolicy.suspend on a running gang: the Job controller deletes its pods, the kubelet
    SIGTERMs the trainers, which checkpoint and exit 143 within their grace period. While a
    second finalizer keeps the ended pods visible, the suspended Job must not be failed by its
    podFailurePolicy (today: FailJob on 143 gives FailureTarget within seconds); on resume the
    same gang, unfailed, carries on from the SIGTERM checkpoint: no restart, no disruption."""
    manifest = tiny_job(testbed, minio_client, namespace, images, maxSteps=400, gradientAccumulationSteps=8)
    manifest["spec"]["serving"]["enabled"] = False
    manifest["spec"]["checkpointing"]["everyNSteps"] = 1000  # the only checkpoint is SIGTERM's
    testbed.apply(manifest, namespace)
    name = manifest["metadata"]["name"]

    def training() -> list[dict[str, Any]] | None:
        status = get_job(testbed, namespace, name).get("status") or {}
        pods = trainer_pods(testbed, namespace, name, 0)
        return pods if len(pods) == 2 and (status.get("progress") or {}).get("step", 0) >= 2 else None

    pods = testbed.wait_for("the gang training", training, timeout=600, interval=1)
    for pod in pods:
        _set_hold(testbed, namespace, pod, True)
    testbed.kubectl("patch", "dbj", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    suspended_at = time.monotonic()

    def ended() -> list[dict[str, Any]] | None:
        found = [testbed.get("pod", p["metadata"]["name"], namespace) for p in pods]
        return found if all(f and _terminated(f) for f in found) else None

    held = testbed.wait_for("the SIGTERMed trainers ended", ended, timeout=120, interval=0.5)
    print(f"\n[e2e] trainers ended {time.monotonic() - suspended_at:.1f} s after the suspend")
    for pod in held:
        assert pod["metadata"]["deletionTimestamp"], "the Job controller deleted the pod"
        assert _terminated(pod)["exitCode"] == 143, f"a SIGTERMed trainer checkpoints and exits 143: {_terminated(pod)}"
    time.sleep(5)  # the Job controller has seen the Failed pods (it reacts within 2 s)
    job = trainer_jobs(testbed, namespace, name)[0]
    failing = [c for c in job["status"].get("conditions") or [] if c["type"] in ("FailureTarget", "Failed") and c["status"] == "True"]
    assert not failing, f"a suspended Job must not be failed by its SIGTERMed pods: {failing}"
    suspended = wait_phase(testbed, namespace, name, "Suspended", timeout=30)["status"]
    assert suspended.get("disruptions", 0) == 0
    # checkpointing.everyNSteps is past the run: the only checkpoint is the one written on SIGTERM.
    prefix = suspended["outputUri"].removeprefix(f"s3://{BUCKET}/") + "/checkpoints/"
    steps = {int(m.group(1)) for key in objects(minio_client, prefix) if (m := re.search(r"/step-(\d+)", key))}
    assert len(steps) == 1, f"one checkpoint, written on SIGTERM: {sorted(steps)}"
    stopped_at = steps.pop()

    for pod in held:
        _set_hold(testbed, namespace, pod, False)
    testbed.kubectl("patch", "dbj", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    resumed = wait_phase(testbed, namespace, name, "Running", timeout=120)
    assert (resumed["status"].get("restarts", 0), resumed["status"].get("disruptions", 0)) == (0, 0), resumed["status"]
    assert {j["metadata"]["labels"]["dreambooth.dev/gang"] for j in trainer_jobs(testbed, namespace, name)} == {"0"}

    def resumed_from() -> int | None:
        fresh = [p for p in trainer_pods(testbed, namespace, name, 0) if p["metadata"]["uid"] not in {h["metadata"]["uid"] for h in held}]
        starts = [re.findall(r'"start_step":\s*(\d+)', testbed.pod_log(p["metadata"]["name"], namespace)) for p in fresh]
        return int(starts[0][0]) if fresh and starts and starts[0] else None

    assert testbed.wait_for("the resumed gang's first step", resumed_from, timeout=600, interval=2) == stopped_at


CPU_QUEUE, CPU_CLUSTER_QUEUE = "cpu-queue", "cpu-cq"


@pytest.fixture()
def cpu_queue(testbed: Any, kueue: Any, namespace: str) -> str:
    """Kueue quota for exactly one tiny job (2 pods x 1 CPU, 2Gi), shared by real-0 and the KWOK pool."""
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
    low = tiny_job(testbed, minio_client, namespace, images, maxSteps=80, gradientAccumulationSteps=4)
    low["spec"]["checkpointing"]["everyNSteps"] = 10  # each checkpoint is also a fidelity scoring: 8, not 20
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
