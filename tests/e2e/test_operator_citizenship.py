"""A DreamboothJob as a citizen of a shared GPU cluster, on the test bed's KWOK pool: failure
classes, lost nodes, unplaceable gangs, name collisions, edits that take effect, waits that
return, pod-template pass-through, server-side filtered watches, frozen installation defaults.
KWOK runs the pods; the tests play the trainer's (and the cluster's) part by setting pod phases."""
from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import (
    OperatorProcess,
    condition,
    get_job,
    gpu_spec,
    job_manifest,
    trainer_jobs,
    trainer_pods,
    wait_phase,
)

pytestmark = [pytest.mark.testbed, pytest.mark.usefixtures("operator", "kwok_keeps_job_pods_running")]


@pytest.fixture(autouse=True)
def _free_the_gpus(testbed: Any, namespace: str) -> Iterator[None]:
    yield
    testbed.kubectl("delete", "dbj", "--all", "-n", namespace, "--wait=true", timeout=60, check=False)
    selector = "app.kubernetes.io/managed-by=dreambooth-operator"
    testbed.wait_for("the test's pods removed", lambda: not testbed.kubectl(
        "get", "pods", "-n", namespace, "-l", selector, "-o", "name").stdout.strip(), timeout=90)


def start(testbed: Any, namespace: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None) -> None:
    manifest = job_manifest(testbed, name, spec)
    if labels:
        manifest["metadata"]["labels"] = labels
    testbed.apply(manifest, namespace)


def running(testbed: Any, namespace: str, name: str, gang: int, nodes: int = 2) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        pods = [p for p in trainer_pods(testbed, namespace, name, gang) if p["status"].get("phase") == "Running"]
        return pods if len(pods) == nodes else None

    return testbed.wait_for(f"gang {gang} of {name} running", ready, timeout=60)


def reason_of(testbed: Any, namespace: str, name: str, type_: str) -> str:
    return (condition(get_job(testbed, namespace, name), type_) or {}).get("reason", "")


def kubectl_wait(testbed: Any, namespace: str, name: str, what: str, timeout: int = 20) -> subprocess.CompletedProcess:
    return testbed.kubectl("wait", f"dbj/{name}", "-n", namespace, f"--for={what}", f"--timeout={timeout}s",
                           check=False, timeout=timeout + 10)


def job_events(testbed: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    return testbed.items("events", namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=DreamboothJob")


# --- failure classes ---------------------------------------------------------------------------


def test_disruptions_restart_the_gang_without_spending_restarts(testbed: Any, namespace: str, s3_secret: str, subject: str) -> None:
    start(testbed, namespace, "rex", gpu_spec(testbed, subject, runPolicy={"maxRestarts": 0}, serving={"enabled": False}))
    first = running(testbed, namespace, "rex", 0)
    # A preempted pod (the scheduler's DisruptionTarget condition); its peer dies with it.
    disrupted = [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler", "message": "preempted"}]
    testbed.set_pod_phase(first[1]["metadata"]["name"], namespace, "Failed", exit_code=1, conditions=disrupted)
    second = running(testbed, namespace, "rex", 1)
    job = wait_phase(testbed, namespace, "rex", "Running", timeout=30)
    assert (job["status"]["restarts"], job["status"]["disruptions"], job["status"]["gang"]) == (0, 1, 1)
    # SIGTERM (exit 143): a drained node, a deleted pod.
    testbed.set_pod_phase(second[0]["metadata"]["name"], namespace, "Failed", exit_code=143)
    running(testbed, namespace, "rex", 2)
    job = wait_phase(testbed, namespace, "rex", "Running", timeout=30)
    assert (job["status"]["restarts"], job["status"]["disruptions"]) == (0, 2), "maxRestarts: 0 and still running"
    assert {"GangDisrupted"} <= {e["reason"] for e in job_events(testbed, namespace, "rex")}


def test_out_of_memory_fails_at_once_naming_memory(testbed: Any, namespace: str, s3_secret: str, subject: str) -> None:
    start(testbed, namespace, "rex", gpu_spec(testbed, subject, runPolicy={"maxRestarts": 3}, serving={"enabled": False}))
    pods = running(testbed, namespace, "rex", 0)
    testbed.set_pod_phase(pods[0]["metadata"]["name"], namespace, "Failed", exit_code=137, reason="OOMKilled")
    failed = wait_phase(testbed, namespace, "rex", "Failed", timeout=30)
    message = condition(failed, "Failed")["message"]
    assert condition(failed, "Failed")["reason"] == "OutOfMemory" and "64Gi" in message and "spec.resources.memory" in message
    assert failed["status"]["restarts"] == 0
    # One wait for every outcome: Finished returns on failure too.
    assert kubectl_wait(testbed, namespace, "rex", "condition=Finished").returncode == 0


def test_a_gang_that_cannot_be_placed_waits_and_spends_nothing(testbed: Any, namespace: str, s3_secret: str, subject: str) -> None:
    # Both 8-GPU pods may only go to gpu-0: room for one. The test bed serves PodGroups (as clusters
    # with gang scheduling do), so neither is placed; the job waits and spends no restart on it.
    spec = gpu_spec(testbed, subject, runPolicy={"maxRestarts": 0}, serving={"enabled": False},
                    scheduling={"nodeSelector": {"kubernetes.io/hostname": "gpu-0"}})
    start(testbed, namespace, "rex", spec)
    testbed.wait_for("GangNotPlaced", lambda: reason_of(testbed, namespace, "rex", "Running") == "GangNotPlaced", timeout=60)
    message = condition(get_job(testbed, namespace, "rex"), "Running")["message"]
    assert "0/2 pods of gang 0 placed" in message and "no restart is spent" in message, message
    time.sleep(15)  # past a placement poll and the unplaced-restart delay: still waiting, nothing spent
    job = get_job(testbed, namespace, "rex")
    assert job["status"]["phase"] != "Failed" and job["status"]["restarts"] == 0 and not job["status"].get("disruptions")
    assert [j["metadata"]["name"] for j in trainer_jobs(testbed, namespace, "rex")] == ["rex-train-0"]
    assert not [p for p in trainer_pods(testbed, namespace, "rex", 0) if p["spec"].get("nodeName")], "half a gang was placed"


@pytest.fixture()
def doomed_nodes(testbed: Any, namespace: str) -> Iterator[list[str]]:
    """Two fresh KWOK GPU nodes only this test's pods go to (label dreambooth.dev/test-pool)."""
    names = [f"{namespace[-5:]}-node-{i}" for i in range(2)]
    capacity = {"cpu": "96", "memory": "1500Gi", "pods": "110", "nvidia.com/gpu": "8"}
    nodes = [{"apiVersion": "v1", "kind": "Node",
              "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                           "labels": {"kubernetes.io/hostname": name, "dreambooth.dev/test-pool": namespace}},
              "status": {"allocatable": capacity, "capacity": capacity}} for name in names]
    testbed.apply({"apiVersion": "v1", "kind": "List", "items": nodes})
    testbed.wait_for("the test nodes Ready", lambda: all(
        testbed.kubectl("get", "node", n, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False).stdout == "True"
        for n in names), timeout=60)
    yield names
    # The jobs' pods go first: a pod left on a deleted node would wait for PodGC (40 s).
    testbed.kubectl("delete", "dbj", "--all", "-n", namespace, "--wait=true", timeout=60, check=False)
    testbed.wait_for("the test's pods removed", lambda: not testbed.kubectl(
        "get", "pods", "-n", namespace, "-o", "name").stdout.strip(), timeout=60)
    testbed.kubectl("delete", "nodes", *names, "--wait=false", check=False)


def lose(testbed: Any, node: str) -> None:
    """The node is gone (its Node object too, as a cloud controller does): nobody confirms its pods' deletion."""
    testbed.kubectl("delete", "node", node, "--wait=true")


def test_an_old_gang_stuck_on_a_lost_node_is_force_deleted_after_its_grace(
    testbed: Any, operator: OperatorProcess, namespace: str, s3_secret: str, subject: str, doomed_nodes: list[str]
) -> None:
    spec = gpu_spec(testbed, subject, serving={"enabled": False}, scheduling={"nodeSelector": {"dreambooth.dev/test-pool": namespace}},
                    runPolicy={"maxRestarts": 1, "terminationGracePeriodSeconds": 3})
    start(testbed, namespace, "rex", spec)
    pods = running(testbed, namespace, "rex", 0)
    on_lost = next(p for p in pods if p["spec"]["nodeName"] == doomed_nodes[1])
    other = next(p for p in pods if p is not on_lost)
    lose(testbed, doomed_nodes[1])
    testbed.set_pod_phase(other["metadata"]["name"], namespace, "Failed", exit_code=1)  # its peer is unreachable
    # The failed gang's Job is deleted; the pod on the lost node can never confirm its deletion.
    testbed.wait_for("the stuck pod force-deleted", lambda: testbed.get("pod", on_lost["metadata"]["name"], namespace) is None, timeout=35)
    assert f"force-deleting pod {on_lost['metadata']['name']}" in operator.log(), "removed by the operator (before PodGC's 40 s)"
    testbed.wait_for("gang 1 created", lambda: any(j["metadata"]["name"] == "rex-train-1" for j in trainer_jobs(testbed, namespace, "rex")), timeout=30)
    job = get_job(testbed, namespace, "rex")
    assert job["status"]["disruptions"] == 1 and job["status"]["restarts"] == 0, "a lost node is a disruption"


# --- own only what you own ---------------------------------------------------------------------


def test_a_name_collision_creates_nothing_and_adopts_nothing(testbed: Any, namespace: str, s3_secret: str, subject: str) -> None:
    stranger = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "rex-workers", "namespace": namespace, "labels": {"app": "theirs"}},
                "spec": {"selector": {"app": "theirs"}, "ports": [{"port": 80}]}}
    testbed.apply(stranger)
    start(testbed, namespace, "rex", gpu_spec(testbed, subject, serving={"enabled": False}))
    testbed.wait_for("NameConflict", lambda: reason_of(testbed, namespace, "rex", "NameConflict") == "ObjectNotOwned", timeout=60)
    message = condition(get_job(testbed, namespace, "rex"), "NameConflict")["message"]
    assert f"Service {namespace}/rex-workers" in message
    theirs = testbed.get("service", "rex-workers", namespace)
    assert not theirs["metadata"].get("ownerReferences") and theirs["spec"]["selector"] == {"app": "theirs"}, "never adopted or changed"
    assert trainer_jobs(testbed, namespace, "rex") == [] and testbed.get("configmap", "rex-config", namespace) is None, "nothing created"
    assert any(e["reason"] == "ObjectNotOwned" and e["type"] == "Warning" for e in job_events(testbed, namespace, "rex"))

    testbed.kubectl("delete", "service", "rex-workers", "-n", namespace)
    wait_phase(testbed, namespace, "rex", "Running", timeout=60)
    assert reason_of(testbed, namespace, "rex", "NameConflict") == "Resolved"


# --- edits take effect; waits return; events once ------------------------------------------------


def test_edits_take_effect_and_waits_return_after_them(testbed: Any, namespace: str, s3_secret: str, subject: str) -> None:
    spec = gpu_spec(testbed, subject, serving={"replicas": 1, "resources": {"gpus": 1, "cpu": "2", "memory": "8Gi"}})
    start(testbed, namespace, "rex", spec)
    pods = running(testbed, namespace, "rex", 0)
    # A scheduling edit: the running gang keeps its pods, and a condition says when it applies.
    testbed.kubectl("patch", "dbj", "rex", "-n", namespace, "--type=merge", "-p", json.dumps(
        {"spec": {"scheduling": {"tolerations": [{"key": "team", "operator": "Exists", "effect": "NoSchedule"}]}}}))
    testbed.wait_for("UpdatePending", lambda: reason_of(testbed, namespace, "rex", "UpdatePending") == "AppliesToNextGang", timeout=30)
    assert kubectl_wait(testbed, namespace, "rex", "condition=Running").returncode == 0, "waits work after an edit"
    for pod in pods:
        testbed.set_pod_phase(pod["metadata"]["name"], namespace, "Succeeded")
    wait_phase(testbed, namespace, "rex", "Succeeded", timeout=60)
    assert kubectl_wait(testbed, namespace, "rex", "condition=Finished", timeout=60).returncode == 0
    # A serving edit on a finished job rolls the Deployment; waits still return afterwards.
    testbed.kubectl("patch", "dbj", "rex", "-n", namespace, "--type=merge", "-p", '{"spec":{"serving":{"replicas":2},"runPolicy":{"ttlSecondsAfterFinished":3600}}}')
    testbed.wait_for("2 inference replicas", lambda: (testbed.get("deployment", "rex-serve", namespace) or {}).get("spec", {}).get("replicas") == 2, timeout=30)
    job = get_job(testbed, namespace, "rex")
    generation = job["metadata"]["generation"]
    testbed.wait_for("conditions at the new generation", lambda: {c.get("observedGeneration") for c in get_job(testbed, namespace, "rex")["status"]["conditions"]} == {generation}, timeout=30)
    assert kubectl_wait(testbed, namespace, "rex", "condition=Succeeded").returncode == 0
    assert kubectl_wait(testbed, namespace, "rex", "condition=Finished").returncode == 0
    # Each transition is one Event, posted once.
    seen: dict[tuple[str, str], int] = {}
    for event in job_events(testbed, namespace, "rex"):
        key = (event["reason"], event["message"])
        seen[key] = seen.get(key, 0) + int(event.get("count") or 1)
    assert seen and all(n == 1 for n in seen.values()), {k: n for k, n in seen.items() if n > 1}


# --- pod templates ---------------------------------------------------------------------------------


def test_pod_template_pieces_reach_the_trainer_and_inference_pods(testbed: Any, namespace: str, s3_secret: str, subject: str) -> None:
    testbed.kubectl("create", "serviceaccount", "trainer-wi", "-n", namespace)
    testbed.kubectl("create", "serviceaccount", "server-wi", "-n", namespace)
    testbed.apply({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "dbj-training"}, "value": 10,
                   "preemptionPolicy": "Never"})
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "dreambooth.dev/pool", "operator": "In", "values": ["gpu"]}]}]}}}
    spread = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
               "labelSelector": {"matchLabels": {"dreambooth.dev/job-name": "rex"}}}]
    template = {
        "labels": {"team": "vision"}, "annotations": {"example.com/owner": "team-vision"},
        "serviceAccountName": "trainer-wi", "imagePullSecrets": [{"name": "regcred"}],
        "env": [{"name": "HF_HOME", "value": "/cache/hf"}],
        "volumes": [{"name": "hf-cache", "emptyDir": {"sizeLimit": "1Gi"}}],
        "volumeMounts": [{"name": "hf-cache", "mountPath": "/cache"}],
    }
    spec = gpu_spec(testbed, subject, scheduling={"affinity": affinity, "topologySpreadConstraints": spread, "priorityClassName": "dbj-training"},
                    serving={"replicas": 1, "resources": {"gpus": 1, "cpu": "2", "memory": "8Gi"}, "scheduling": {"nodeSelector": {"dreambooth.dev/pool": "gpu"}},
                             "serviceAccountName": "server-wi"})
    spec["podTemplate"] = template
    start(testbed, namespace, "rex", spec)
    pods = running(testbed, namespace, "rex", 0)
    for pod in pods:
        assert pod["metadata"]["labels"]["team"] == "vision" and pod["metadata"]["annotations"]["example.com/owner"] == "team-vision"
        assert pod["spec"]["serviceAccountName"] == "trainer-wi" and pod["spec"]["automountServiceAccountToken"] is False
        assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}] and pod["spec"]["priorityClassName"] == "dbj-training"
        assert pod["spec"]["affinity"] == affinity and pod["spec"]["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
        container = pod["spec"]["containers"][0]
        assert {"name": "HF_HOME", "value": "/cache/hf"} in container["env"]
        assert any(m["name"] == "hf-cache" and m["mountPath"] == "/cache" for m in container["volumeMounts"])
    for pod in pods:
        testbed.set_pod_phase(pod["metadata"]["name"], namespace, "Succeeded")
    wait_phase(testbed, namespace, "rex", "Succeeded", timeout=60)
    served = testbed.wait_for("the inference Deployment", lambda: testbed.get("deployment", "rex-serve", namespace), timeout=30)
    pod_spec = served["spec"]["template"]["spec"]
    # The trainers' identity (podTemplate.serviceAccountName) is not the server's: serving.serviceAccountName is.
    assert pod_spec["serviceAccountName"] == "server-wi" and pod_spec["nodeSelector"] == {"dreambooth.dev/pool": "gpu"}
    assert served["spec"]["template"]["metadata"]["labels"]["team"] == "vision"


def test_a_pod_template_the_api_server_refuses_fails_the_job_naming_the_field(testbed: Any, namespace: str, s3_secret: str, subject: str) -> None:
    bad = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "Sideways", "values": ["a"]}]}]}}}
    start(testbed, namespace, "rex", gpu_spec(testbed, subject, scheduling={"affinity": bad}))
    failed = wait_phase(testbed, namespace, "rex", "Failed", timeout=60)
    assert condition(failed, "Failed")["reason"] == "InvalidPodTemplate"
    assert "affinity" in condition(failed, "Failed")["message"] and "Sideways" in condition(failed, "Failed")["message"]


# --- speed and scale -------------------------------------------------------------------------------


def watch_events(operator: OperatorProcess, kind: str) -> float:
    match = re.search(rf'dreambooth_child_watch_events_total{{kind="{kind}"}} ([0-9.e+]+)', operator.metrics())
    return float(match.group(1)) if match else 0.0


def test_the_operator_never_receives_jobs_it_does_not_own(testbed: Any, operator: OperatorProcess, namespace: str) -> None:
    def settled() -> tuple[float] | None:  # earlier tests' Jobs may still be going away
        first = watch_events(operator, "jobs")
        time.sleep(2)
        return (first,) if watch_events(operator, "jobs") == first else None

    (before,) = testbed.wait_for("no owned Job changing", settled, timeout=60)
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "someone-elses", "namespace": namespace},
           "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "nodeSelector": {"dreambooth.dev/pool": "gpu"},
                                                             "tolerations": [{"operator": "Exists"}], "containers": [{"name": "c", "image": "x"}]}}}}
    testbed.apply(job)
    testbed.wait_for("the stranger's pod running", lambda: "Running" in testbed.kubectl(
        "get", "pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=someone-elses", "-o", "jsonpath={.items[*].status.phase}").stdout, timeout=60)
    testbed.kubectl("delete", "job", "someone-elses", "-n", namespace, "--wait=true")
    time.sleep(1)
    assert watch_events(operator, "jobs") == before, "the label selector is applied by the API server"


# --- frozen installation defaults ------------------------------------------------------------------


def test_a_helm_upgrade_of_the_defaults_does_not_reach_an_accepted_job(testbed: Any, operator: OperatorProcess, namespace: str, s3_secret: str, subject: str) -> None:
    """The session's operator is swapped for one with installation defaults, then for one with new ones."""
    defaults = {"DREAMBOOTH_STORAGE_ENDPOINT": testbed.minio.endpoint, "DREAMBOOTH_STORAGE_BUCKET": "dreambooth",
                "DREAMBOOTH_STORAGE_CREDENTIALS_SECRET": "dreambooth-s3"}
    old = OperatorProcess(dict(operator.env, DREAMBOOTH_TRAINER_IMAGE="dreambooth/trainer:old", **defaults), testbed.logs / "operator-old.log")
    new = OperatorProcess(dict(operator.env, DREAMBOOTH_TRAINER_IMAGE="dreambooth/trainer:new", **defaults), testbed.logs / "operator-new.log")
    operator.stop()
    try:
        old.start()
        spec = gpu_spec(testbed, subject, serving={"enabled": False}, runPolicy={"maxRestarts": 2})
        del spec["storage"]
        start(testbed, namespace, "rex", spec)
        first = running(testbed, namespace, "rex", 0)
        assert first[0]["spec"]["containers"][0]["image"] == "dreambooth/trainer:old"
        assert get_job(testbed, namespace, "rex")["status"]["installationDefaults"]["trainerImage"] == "dreambooth/trainer:old"
        old.stop()
        new.start()  # the upgrade
        testbed.set_pod_phase(first[0]["metadata"]["name"], namespace, "Failed", exit_code=1)
        second = running(testbed, namespace, "rex", 1)
        assert second[0]["spec"]["containers"][0]["image"] == "dreambooth/trainer:old", "the accepted job keeps its defaults"
        start(testbed, namespace, "fresh", {**spec, "resources": {**spec["resources"], "gpusPerNode": 4}})
        assert running(testbed, namespace, "fresh", 0)[0]["spec"]["containers"][0]["image"] == "dreambooth/trainer:new"
    finally:
        old.stop()
        new.stop()
        operator.start()
