"""The control plane and the KWOK GPU pool really work (scheduler, controller-manager, RBAC)."""
from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

import pytest

from tests.testbed.cluster import GPU_NODES, GPU_PER_NODE, REAL_NODE
from tests.testbed.realnode import ADVERTISED_CPU

pytestmark = pytest.mark.testbed


def _ready(node: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions") or [])


def test_nodes_are_ready_gpu_pool_and_real_node(testbed):
    nodes = {n["metadata"]["name"]: n for n in json.loads(testbed.kubectl("get", "nodes", "-o", "json").stdout)["items"]}
    assert set(nodes) == {f"gpu-{i}" for i in range(GPU_NODES)} | {REAL_NODE}
    assert all(_ready(n) for n in nodes.values())
    for i in range(GPU_NODES):
        node = nodes[f"gpu-{i}"]
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(GPU_PER_NODE)
        assert node["metadata"]["labels"]["dreambooth.dev/pool"] == "gpu"
    # real-0 is off the GPU pool; the capacity policy lets the tests' pods fit side by side.
    assert nodes[REAL_NODE]["metadata"]["labels"]["dreambooth.dev/pool"] == "local"
    assert nodes[REAL_NODE]["status"]["allocatable"]["cpu"] == ADVERTISED_CPU
    version = json.loads(testbed.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    from tests.testbed.minio_server import pinned_versions

    assert version == pinned_versions()["KUBERNETES_VERSION"]


def _gpu_deployment(name: str, replicas: int, gpus: int) -> dict:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": {"dreambooth.dev/pool": "gpu"},
                    "containers": [{"name": "main", "image": "trainer:test",
                                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
                },
            },
        },
    }


def test_deployment_on_gpu_pool_reaches_replicas(testbed, namespace):
    # 3 replicas x 4 GPUs: the scheduler must spread them (two fit per 8-GPU node).
    testbed.apply(_gpu_deployment("gpu-app", 3, 4), namespace)
    testbed.wait_for("3 ready replicas", lambda: (testbed.get("deployment", "gpu-app", namespace)["status"]
                                                  .get("readyReplicas") == 3), timeout=60)
    pods = json.loads(testbed.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
    assert len(pods) == 3
    assert all(p["spec"]["nodeName"].startswith("gpu-") for p in pods)
    assert all(p["status"]["phase"] == "Running" for p in pods)
    # ExtendedResourceToleration: GPU pods tolerate the pool's nvidia.com/gpu taint by themselves.
    assert any(t.get("key") == "nvidia.com/gpu" for t in pods[0]["spec"].get("tolerations") or [])


def test_too_many_gpus_stays_pending_with_failed_scheduling(testbed, namespace):
    testbed.apply({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "greedy"},
        "spec": {"containers": [{"name": "main", "image": "x",
                                 "resources": {"limits": {"nvidia.com/gpu": str(GPU_PER_NODE + 1)}}}]},
    }, namespace)

    def failed_scheduling():
        events = json.loads(testbed.kubectl("get", "events", "-n", namespace, "-o", "json",
                                            "--field-selector", "involvedObject.name=greedy").stdout)["items"]
        return [e for e in events if e["reason"] == "FailedScheduling"]

    events = testbed.wait_for("a FailedScheduling event", failed_scheduling, timeout=60)
    assert "nvidia.com/gpu" in events[0]["message"]
    pod = testbed.get("pod", "greedy", namespace)
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


def test_kwok_pods_run_and_can_be_driven_to_succeeded_or_failed(testbed, namespace):
    for name in ("kw-ok", "kw-bad"):
        testbed.apply({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeSelector": {"dreambooth.dev/pool": "gpu"}, "restartPolicy": "Never",
                     "containers": [{"name": "main", "image": "x", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
        }, namespace)
    for name in ("kw-ok", "kw-bad"):
        testbed.wait_for(f"{name} Running", lambda n=name: testbed.pod_phase(n, namespace) == "Running")
    testbed.set_pod_phase("kw-ok", namespace, "Succeeded")
    testbed.set_pod_phase("kw-bad", namespace, "Failed", exit_code=137)
    testbed.wait_for("kw-ok Succeeded", lambda: testbed.pod_phase("kw-ok", namespace) == "Succeeded")
    testbed.wait_for("kw-bad Failed", lambda: testbed.pod_phase("kw-bad", namespace) == "Failed")
    bad = testbed.get("pod", "kw-bad", namespace)
    assert bad["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137


def _api_get(testbed, path: str, token: str) -> int:
    server = testbed.api_client.configuration.host
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(server + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_service_account_without_role_is_refused(testbed, namespace):
    testbed.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    who = f"system:serviceaccount:{namespace}:nobody"
    can = testbed.kubectl("auth", "can-i", "list", "pods", "-n", namespace, "--as", who, check=False)
    assert can.stdout.strip() == "no" and can.returncode != 0
    token = testbed.kubectl("create", "token", "nobody", "-n", namespace).stdout.strip()
    assert _api_get(testbed, f"/api/v1/namespaces/{namespace}/pods", token) == 403
    # ...and RBAC grants exactly what a Role says: bind one and the same token may list pods.
    testbed.kubectl("create", "role", "pod-reader", "--verb=list", "--resource=pods", "-n", namespace)
    testbed.kubectl("create", "rolebinding", "nobody-reads", "--role=pod-reader",
                    f"--serviceaccount={namespace}:nobody", "-n", namespace)
    testbed.wait_for("the RoleBinding to take effect",
                     lambda: _api_get(testbed, f"/api/v1/namespaces/{namespace}/pods", token) == 200, timeout=30)
    assert _api_get(testbed, f"/api/v1/namespaces/{namespace}/secrets", token) == 403


def test_reads_over_the_api_connection_are_what_kubectl_shows(testbed, namespace):
    """testbed.get/items (the tests' polls, over one API connection) give kubectl's objects and items."""
    testbed.apply([{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"cm-{i}", "labels": {"pick": str(i % 2)}},
                    "data": {"i": str(i)}} for i in range(3)], namespace)
    assert testbed.get("configmap", "cm-1", namespace) == json.loads(testbed.kubectl("get", "configmap", "cm-1", "-n", namespace, "-o", "json").stdout)
    assert testbed.get("configmap", "cm-9", namespace) is None
    assert testbed.get("node", REAL_NODE)["metadata"]["name"] == REAL_NODE
    picked = testbed.items("configmaps", namespace, "pick=0")
    shown = json.loads(testbed.kubectl("get", "configmaps", "-n", namespace, "-l", "pick=0", "-o", "json").stdout)["items"]
    assert [c["metadata"]["name"] for c in picked] == ["cm-0", "cm-2"] == [c["metadata"]["name"] for c in shown]
    assert [(c["kind"], c["apiVersion"]) for c in picked] == [(c["kind"], c["apiVersion"]) for c in shown] == [("ConfigMap", "v1")] * 2
    assert testbed.items("configmaps", namespace, field_selector="metadata.name=cm-1")[0]["data"] == {"i": "1"}
