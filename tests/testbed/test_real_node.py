"""real-0 is a Kubernetes node as on a cluster: a real kubelet on containerd, pods on a CNI bridge,
Services through kube-proxy, names through CoreDNS, the API server through the `kubernetes` Service.

Test pods run Python in the operator image (`python_image`: Python and the Kubernetes client)."""
from __future__ import annotations

import json
import socket
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.testbed import node_images
from tests.testbed.cluster import REAL_NODE
from tests.testbed.realnode import DNS_SERVICE_IP, KUBERNETES_SERVICE_IP

pytestmark = pytest.mark.testbed


def pod(image: str, name: str, code: str, **spec: Any) -> dict[str, Any]:
    """A pod on real-0 running `code` with the image's Python."""
    container = {"name": "main", "image": image, "command": ["python", "-c", textwrap.dedent(code)]}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **spec.pop("metadata", {})},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": REAL_NODE}, "restartPolicy": "Never",
                     "containers": [container], **spec}}


def finished(testbed: Any, name: str, namespace: str, timeout: float = 90) -> str:
    return testbed.wait_for(f"{name} to finish", lambda: testbed.pod_phase(name, namespace) in ("Succeeded", "Failed")
                            and testbed.pod_phase(name, namespace), timeout=timeout)


def result(testbed: Any, name: str, namespace: str) -> dict[str, Any]:
    """The JSON a test pod printed after `RESULT `."""
    log = testbed.pod_log(name, namespace)
    line = next((x for x in log.splitlines() if x.startswith("RESULT ")), None)
    assert line, f"{name} printed no result: {log[-2000:]}"
    return json.loads(line[len("RESULT "):])


def test_real_0_is_a_kubelet_on_containerd_and_the_pods_run_there(testbed, python_image, namespace):
    node = testbed.get("node", REAL_NODE)
    info = node["status"]["nodeInfo"]
    assert info["containerRuntimeVersion"].startswith("containerd://1."), info
    assert info["kubeletVersion"] == "v1.36.3" and info["kubeProxyVersion"] in ("", "v1.36.3")
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert not addresses["InternalIP"].startswith("127."), "the node IP is not loopback"
    assert addresses["InternalIP"] == testbed.bed.real_node().addresses.node_ip

    testbed.apply(pod(python_image, "hello", "import socket; print('RESULT', '{\"host\": \"%s\"}' % socket.gethostname())"),
                  namespace)
    assert finished(testbed, "hello", namespace) == "Succeeded", testbed.pod_log("hello", namespace)
    ran = testbed.get("pod", "hello", namespace)
    assert ran["spec"]["nodeName"] == REAL_NODE and result(testbed, "hello", namespace) == {"host": "hello"}
    status = ran["status"]["containerStatuses"][0]
    runtime, _, container_id = status["containerID"].partition("://")
    assert runtime == "containerd"
    assert container_id in testbed.bed.real_node().ctr("containers", "ls", "-q").stdout.split(), \
        "real-0's containerd holds the pod's container"
    assert status["imageID"] == node_images.local_image(python_image).image_id, "the very image buildah built"
    # Imported once per content: asking again imports nothing.
    assert node_images.load_images(testbed.bed.real_node(), [python_image]) == []


SERVER = """
    import http.server, os
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(os.environ["HOSTNAME"].encode())
        def log_message(self, *args):
            pass
    http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Handler).serve_forever()
"""


def test_services_and_names_work_as_on_a_cluster(testbed, python_image, namespace):
    """A ClusterIP Service (port 80 to targetPort 8000, through kube-proxy), its DNS names short and
    long, a headless Service's per-pod name, and the pods' resolver being the kube-dns Service."""
    web = pod(python_image, "web-0", SERVER, metadata={"labels": {"app": "web"}}, hostname="web-0", subdomain="webs",
              container={"readinessProbe": {"tcpSocket": {"port": 8000}, "periodSeconds": 1}})
    testbed.apply([
        web,
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
         "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8000}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "webs"},
         "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": 8000}]}},
    ], namespace)
    testbed.wait_for("web-0 ready", lambda: all(c.get("ready") for c in (testbed.get("pod", "web-0", namespace)["status"]
                                                                          .get("containerStatuses") or [{}])), timeout=90)
    client = """
        import json, os, socket, time, urllib.request
        ns = os.environ["NS"]
        out = {"resolv": open("/etc/resolv.conf").read()}
        deadline = time.time() + 30
        while True:  # the endpoints reach kube-proxy and CoreDNS within seconds
            try:
                out["service_ip"] = socket.gethostbyname(f"web.{ns}.svc.cluster.local")
                out["pod_name_ip"] = socket.gethostbyname(f"web-0.webs.{ns}.svc.cluster.local")
                out["short"] = urllib.request.urlopen("http://web/", timeout=5).read().decode()
                out["long"] = urllib.request.urlopen(f"http://web.{ns}.svc.cluster.local:80/", timeout=5).read().decode()
                break
            except OSError as error:
                if time.time() > deadline:
                    out["error"] = repr(error)
                    break
                time.sleep(0.5)
        print("RESULT " + json.dumps(out), flush=True)
    """
    testbed.apply(pod(python_image, "client", client, container={"env": [
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]}), namespace)
    assert finished(testbed, "client", namespace) == "Succeeded", testbed.pod_log("client", namespace)
    out = result(testbed, "client", namespace)
    assert "error" not in out, out
    service = testbed.get("service", "web", namespace)
    assert out["service_ip"] == service["spec"]["clusterIP"]
    assert out["pod_name_ip"] == testbed.get("pod", "web-0", namespace)["status"]["podIP"]
    assert out["short"] == out["long"] == "web-0"
    assert f"nameserver {DNS_SERVICE_IP}" in out["resolv"] and f"search {namespace}.svc.cluster.local" in out["resolv"]


def test_in_cluster_clients_reach_the_api_server_through_the_kubernetes_service(testbed, python_image, namespace):
    """The token mounted in a pod is a real one: in-cluster config verifies the server at the
    `kubernetes` Service's address and RBAC refuses what the account may not do."""
    testbed.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    code = """
        import json, os
        from kubernetes import client, config
        config.load_incluster_config()
        out = {"host": os.environ["KUBERNETES_SERVICE_HOST"], "version": client.VersionApi().get_code().git_version}
        try:
            client.CoreV1Api().list_namespaced_pod(open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read())
            out["list"] = "allowed"
        except client.exceptions.ApiException as error:
            out["list"] = error.status
        print("RESULT " + json.dumps(out), flush=True)
    """
    testbed.apply(pod(python_image, "incluster", code, serviceAccountName="nobody"), namespace)
    assert finished(testbed, "incluster", namespace) == "Succeeded", testbed.pod_log("incluster", namespace)
    assert result(testbed, "incluster", namespace) == {"host": KUBERNETES_SERVICE_IP, "version": "v1.36.3", "list": 403}


def test_pods_reach_minio_and_the_host_reaches_pods(testbed, python_image, namespace):
    """Each pod has its own address; the test bed's MinIO endpoint works from inside pods, and
    the host connects to pod IPs (as tests and `make demo` do)."""
    code = """
        import os, socket, urllib.request
        with urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL"] + "/minio/health/live", timeout=5) as r:
            assert r.status == 200
        server = socket.create_server(("0.0.0.0", 8080))
        print("ready-" + "to-serve", flush=True)
        server.settimeout(60)
        conn, _ = server.accept()
        conn.sendall(os.environ["HOSTNAME"].encode())
        conn.close()
    """
    env = [{"name": "AWS_ENDPOINT_URL", "value": testbed.minio.url}]
    testbed.apply([pod(python_image, f"same-port-{i}", code, container={"env": env}) for i in range(2)], namespace)
    for i in range(2):
        name = f"same-port-{i}"
        testbed.wait_for(f"{name} serving", lambda n=name: "ready-to-serve" in testbed.pod_log(n, namespace)
                         or testbed.pod_phase(n, namespace) == "Failed", timeout=90)
        assert "ready-to-serve" in testbed.pod_log(name, namespace), testbed.pod_log(name, namespace)
        ip = testbed.get("pod", name, namespace)["status"]["podIP"]
        with socket.create_connection((ip, 8080), timeout=10) as conn:
            assert conn.recv(100).decode() == name
    for i in range(2):
        assert finished(testbed, f"same-port-{i}", namespace) == "Succeeded"


def container_status(testbed: Any, name: str, namespace: str) -> dict[str, Any]:
    pod = testbed.get("pod", name, namespace) or {}
    return ((pod.get("status") or {}).get("containerStatuses") or [{}])[0]


def terminated(testbed: Any, name: str, namespace: str) -> dict[str, Any] | None:
    return container_status(testbed, name, namespace).get("state", {}).get("terminated")


HOLD = "testbed.dreambooth.dev/hold"  # a second finalizer, as log shippers and service meshes add


def test_deletion_sends_sigterm_and_sigkills_after_the_grace_period_while_a_finalizer_holds_the_pod(
        testbed, python_image, namespace):
    """A deleted pod's container gets SIGTERM; one that ignores it is killed when its
    terminationGracePeriodSeconds are up. A second finalizer keeps both ended pods visible, with
    their exit codes (the Job controller reads them so), until it is removed."""
    polite = """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # as the trainer: 128 + SIGTERM
        print("serv" + "ing", flush=True)
        while True:
            time.sleep(0.1)
    """
    stubborn = polite.replace("lambda *_: sys.exit(143)", "signal.SIG_IGN")
    grace = 4
    testbed.apply([pod(python_image, name, code, metadata={"finalizers": [HOLD]}, terminationGracePeriodSeconds=grace)
                   for name, code in (("polite", polite), ("stubborn", stubborn))], namespace)
    for name in ("polite", "stubborn"):
        testbed.wait_for(f"{name} serving", lambda n=name: "serving" in testbed.pod_log(n, namespace), timeout=90)
    deleted = time.monotonic()
    testbed.kubectl("delete", "pod", "polite", "stubborn", "-n", namespace, "--wait=false")
    ended = {}
    while len(ended) < 2 and time.monotonic() - deleted < grace + 30:
        for name in ("polite", "stubborn"):
            if name not in ended and terminated(testbed, name, namespace):
                ended[name] = time.monotonic() - deleted
        time.sleep(0.2)
    assert set(ended) == {"polite", "stubborn"}, f"ended: {ended}"
    assert ended["polite"] < grace, f"SIGTERM ended polite in {ended['polite']:.1f} s"
    assert grace <= ended["stubborn"] < grace + 10, f"stubborn was killed {ended['stubborn']:.1f} s after the delete"
    assert terminated(testbed, "polite", namespace)["exitCode"] == 143
    assert terminated(testbed, "stubborn", namespace)["exitCode"] == 137
    for name in ("polite", "stubborn"):
        held = testbed.get("pod", name, namespace)
        assert held["metadata"]["deletionTimestamp"] and held["status"]["phase"] == "Failed", held["status"]
        testbed.kubectl("patch", "pod", name, "-n", namespace, "--type=json", "-p", '[{"op": "remove", "path": "/metadata/finalizers"}]')
    testbed.wait_for("both pods gone", lambda: not any(testbed.get("pod", n, namespace) for n in ("polite", "stubborn")), timeout=30)


def test_a_memory_limit_oom_kills_the_container_with_its_reason(testbed, python_image, namespace):
    code = "data = b'x' * (256 << 20); print('survived', len(data))"  # bytes are written: the pages are touched
    testbed.apply(pod(python_image, "hungry", code, container={"resources": {"limits": {"memory": "64Mi", "cpu": "1"}}}), namespace)
    assert finished(testbed, "hungry", namespace) == "Failed"
    state = terminated(testbed, "hungry", namespace)
    assert (state["reason"], state["exitCode"]) == ("OOMKilled", 137), state
    assert "survived" not in testbed.pod_log("hungry", namespace)


def test_on_failure_restarts_the_container_in_the_same_pod(testbed, python_image, namespace):
    """restartPolicy OnFailure: the failed container is restarted in place (same pod, same
    emptyDir), its previous run's log still readable; the second run succeeds."""
    code = """
        import os, sys
        first = not os.path.exists("/work/ran")
        open("/work/ran", "a").close()
        print("run", "first" if first else "again", flush=True)
        if first:
            sys.exit(3)
        while not os.path.exists("/work/done"):  # the test reads both runs' logs meanwhile
            time.sleep(0.1)
        time.sleep(2)  # the exec that made the file ends first: a container that exits kills its execs (137)
    """
    testbed.apply(pod(python_image, "flaky", code.replace("import os, sys", "import os, sys, time"), restartPolicy="OnFailure",
                      container={"volumeMounts": [{"name": "work", "mountPath": "/work"}]},
                      volumes=[{"name": "work", "emptyDir": {}}]), namespace)
    testbed.wait_for("the second run", lambda: "run again" in testbed.pod_log("flaky", namespace), timeout=90)
    status = container_status(testbed, "flaky", namespace)
    assert status["restartCount"] == 1 and status["lastState"]["terminated"]["exitCode"] == 3
    assert "run first" in testbed.pod_log("flaky", namespace, previous=True)
    testbed.kubectl("exec", "flaky", "-n", namespace, "--", "python", "-c", "open('/work/done', 'w').close()")
    assert finished(testbed, "flaky", namespace) == "Succeeded"


def test_a_missing_image_with_pull_policy_never_is_err_image_never_pull(testbed, python_image, namespace):
    missing = "localhost/dreambooth/not-built:0.0.0"
    testbed.apply(pod(missing, "absent", "print('never')", container={"imagePullPolicy": "Never"}), namespace)

    def waiting() -> dict[str, Any] | None:
        state = container_status(testbed, "absent", namespace).get("state", {}).get("waiting")
        return state if state and state.get("reason") == "ErrImageNeverPull" else None

    state = testbed.wait_for("ErrImageNeverPull", waiting, timeout=60)
    assert missing in state["message"], state
    assert testbed.pod_phase("absent", namespace) == "Pending"


def test_a_pods_root_is_an_overlay_on_the_image_snapshots_and_goes_with_the_pod(testbed, python_image, namespace):
    """No copy of the image per pod: the container's root is an overlay whose lower layers are the
    image's snapshots in real-0's containerd slot; its writable layer is removed with the pod."""
    testbed.apply(pod(python_image, "rooted", "import time; print('up', flush=True); time.sleep(600)"), namespace)
    testbed.wait_for("rooted up", lambda: "up" in testbed.pod_log("rooted", namespace), timeout=90)
    node = testbed.bed.real_node()
    container_id = container_status(testbed, "rooted", namespace)["containerID"].removeprefix("containerd://")
    mountinfo = Path(f"/proc/{node.task_pid(container_id)}/mountinfo").read_text().splitlines()
    root = next(line for line in mountinfo if line.split()[4] == "/")
    snapshots = str(node.containerd_root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots")
    options = root.split(" - ", 1)[1]
    assert options.startswith("overlay ") and f"lowerdir={snapshots}/" in options, root
    assert container_id in node.ctr("snapshots", "ls").stdout.split()
    testbed.kubectl("delete", "pod", "rooted", "-n", namespace, "--grace-period=1", "--wait=true", timeout=60)
    testbed.wait_for("the container's snapshot removed",
                     lambda: container_id not in node.ctr("snapshots", "ls").stdout.split(), timeout=30)
