"""Pods bound to local-0 run for real: from their images, under runc (node agent).

Test pods run Python scripts in the operator image (`python_image`: Python and the Kubernetes
client, nothing more)."""
from __future__ import annotations

import json
import textwrap

import pytest

from tests.testbed.cluster import LOCAL_NODE

pytestmark = pytest.mark.testbed


def _pod(image: str, name: str, code: str, **spec) -> dict:
    container = {"name": "main", "image": image, "command": ["python", "-c", textwrap.dedent(code)]}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **spec.pop("metadata", {})},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": LOCAL_NODE}, "restartPolicy": "Never",
                     "containers": [container], **spec}}


def _terminated(testbed, name: str, namespace: str) -> dict:
    pod = testbed.get("pod", name, namespace)
    return pod["status"]["containerStatuses"][0]["state"]["terminated"]


def test_exit_0_succeeds_and_exit_3_fails_with_its_code(testbed, python_image, namespace):
    testbed.apply([_pod(python_image, "ok", "import sys; sys.exit(0)"), _pod(python_image, "bad", "import sys; sys.exit(3)")], namespace)
    testbed.wait_for("ok Succeeded", lambda: testbed.pod_phase("ok", namespace) == "Succeeded", timeout=60)
    testbed.wait_for("bad Failed", lambda: testbed.pod_phase("bad", namespace) == "Failed", timeout=60)
    assert _terminated(testbed, "ok", namespace)["exitCode"] == 0
    bad = _terminated(testbed, "bad", namespace)
    assert bad["exitCode"] == 3 and bad["reason"] == "Error"
    assert testbed.get("pod", "ok", namespace)["spec"]["nodeName"] == LOCAL_NODE


def test_kubectl_logs_and_restarts(testbed, python_image, namespace):
    testbed.apply(_pod(python_image, "flaky", "import sys; print('attempt', flush=True); sys.exit(1)", restartPolicy="OnFailure"),
                  namespace)
    testbed.wait_for("two restarts", lambda: (testbed.get("pod", "flaky", namespace)["status"]
                                              .get("containerStatuses") or [{}])[0].get("restartCount", 0) >= 2,
                     timeout=60)
    status = testbed.get("pod", "flaky", namespace)["status"]
    assert status["phase"] == "Running"
    assert status["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 1
    logs = testbed.kubectl("logs", "flaky", "-n", namespace).stdout
    assert logs.count("attempt") >= 2 and "---" not in logs


def test_env_volumes_and_workdir_in_the_container(testbed, python_image, namespace):
    testbed.apply([
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
         "data": {"greeting": "hello", "settings.yaml": "steps: 3\n"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"password": "hunter2"}},
    ], namespace)
    code = """
        import json, os, sys
        out = {k: os.environ.get(k) for k in ("GREETING", "PASSWORD", "POD_NAME", "POD_NS", "POD_IP",
                                              "INDEX", "LITERAL", "KUBERNETES_SERVICE_HOST")}
        out["python"] = sys.executable
        out["cwd"] = os.getcwd()
        shm = os.statvfs("/dev/shm")
        out["shm_bytes"] = shm.f_blocks * shm.f_frsize
        out["settings"] = open("/etc/app/settings.yaml").read()
        out["password_file"] = open("/etc/creds/password").read()
        open("/scratch/x", "w").write("w")
        out["scratch"] = os.listdir("/scratch")
        out["sa"] = sorted(os.listdir("/var/run/secrets/kubernetes.io/serviceaccount"))
        print("RESULT " + json.dumps(out))
    """
    env = [
        {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "LITERAL", "value": "name-is-$(POD_NAME)"},
    ]
    testbed.apply(_pod(python_image,
        "envy", code,
        metadata={"annotations": {"batch.kubernetes.io/job-completion-index": "5"}},
        container={"env": env, "workingDir": "/etc/app", "volumeMounts": [
            {"name": "cfg", "mountPath": "/etc/app"}, {"name": "creds", "mountPath": "/etc/creds"},
            {"name": "scratch", "mountPath": "/scratch"}, {"name": "dshm", "mountPath": "/dev/shm"}]},
        volumes=[{"name": "cfg", "configMap": {"name": "cfg"}}, {"name": "creds", "secret": {"secretName": "creds"}},
                 {"name": "scratch", "emptyDir": {}}, {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}],
    ), namespace)
    testbed.wait_for("envy Succeeded", lambda: testbed.pod_phase("envy", namespace) == "Succeeded", timeout=60)
    line = next(x for x in testbed.pod_log("envy", namespace).splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    pod = testbed.get("pod", "envy", namespace)
    assert out["GREETING"] == "hello" and out["PASSWORD"] == "hunter2"
    assert out["POD_NAME"] == "envy" and out["POD_NS"] == namespace
    assert out["POD_IP"] == pod["status"]["podIP"]
    assert out["INDEX"] == "5" and out["LITERAL"] == "name-is-envy"
    assert out["python"] == "/opt/venv/bin/python", "the image's Python, not the node's"
    assert out["cwd"] == "/etc/app" and out["shm_bytes"] == 64 * 2**20
    assert out["settings"] == "steps: 3\n" and out["password_file"] == "hunter2"
    assert out["scratch"] == ["x"]
    assert out["sa"] == ["ca.crt", "namespace", "token"]
    assert out["KUBERNETES_SERVICE_HOST"]


def test_deleting_a_running_pod_delivers_sigterm(testbed, python_image, namespace):
    code = """
        import signal, sys, time
        def on_term(signum, frame):
            print("got SIGTERM", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        print("wait" + "ing-for-sigterm", flush=True)  # (spelt apart: the log's start line shows the code)
        while True:
            time.sleep(0.1)
    """
    testbed.apply(_pod(python_image, "sleeper", code, terminationGracePeriodSeconds=20), namespace)
    testbed.wait_for("sleeper running", lambda: "waiting-for-sigterm" in testbed.pod_log("sleeper", namespace), timeout=60)
    testbed.kubectl("delete", "pod", "sleeper", "-n", namespace, "--wait=false")
    testbed.wait_for("sleeper gone", lambda: testbed.get("pod", "sleeper", namespace) is None, timeout=15)
    assert "got SIGTERM" in testbed.pod_log("sleeper", namespace)


def test_sigkill_after_the_grace_period(testbed, python_image, namespace):
    code = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stub" + "born-ignoring-sigterm", flush=True)
        while True:
            time.sleep(0.1)
    """
    testbed.apply(_pod(python_image, "stubborn", code, terminationGracePeriodSeconds=2), namespace)
    testbed.wait_for("stubborn running", lambda: "stubborn-ignoring-sigterm" in testbed.pod_log("stubborn", namespace), timeout=60)
    testbed.kubectl("delete", "pod", "stubborn", "-n", namespace, "--wait=false")
    testbed.wait_for("stubborn gone", lambda: testbed.get("pod", "stubborn", namespace) is None, timeout=15)
    assert "exit 137" in testbed.pod_log("stubborn", namespace)


PEER = """
    import os, socket, sys, time
    index = int(os.environ["JOB_COMPLETION_INDEX"])
    me = socket.gethostname()
    peer = f"pair-{1 - index}.peers.{os.environ['NS']}.svc.cluster.local"
    server = socket.create_server((socket.gethostbyname(me), 7070))
    server.settimeout(60)
    deadline = time.time() + 60
    while True:  # the peer may not be up yet
        try:
            conn = socket.create_connection((peer, 7070), timeout=2)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    conn.sendall(f"hello from {me}".encode())
    conn.close()
    got, _ = server.accept()
    message = got.recv(100).decode()
    print(f"{me} resolved {peer} -> {socket.gethostbyname(peer)}; received: {message}", flush=True)
    sys.exit(0 if message == f"hello from pair-{1 - index}" else 1)
"""


def test_indexed_job_pods_reach_each_other_by_dns(testbed, python_image, namespace):
    testbed.apply([
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "peers"},
         "spec": {"clusterIP": "None", "selector": {"job-name": "pair"}, "ports": [{"port": 7070}]}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "pair"},
         "spec": {"completions": 2, "parallelism": 2, "completionMode": "Indexed", "backoffLimit": 0,
                  "template": {"spec": {
                      "subdomain": "peers", "restartPolicy": "Never",
                      "nodeSelector": {"kubernetes.io/hostname": LOCAL_NODE},
                      "containers": [{"name": "main", "image": python_image,
                                      "command": ["python", "-c", textwrap.dedent(PEER)],
                                      "env": [{"name": "NS", "valueFrom": {"fieldRef": {
                                          "fieldPath": "metadata.namespace"}}}]}]}}}},
    ], namespace)

    def finished():
        job = testbed.get("job", "pair", namespace)
        conds = {c["type"]: c["status"] for c in (job.get("status") or {}).get("conditions") or []}
        return "Complete" if conds.get("Complete") == "True" else ("Failed" if conds.get("Failed") == "True" else None)

    result = testbed.wait_for("job pair to finish", finished, timeout=90)
    pods = json.loads(testbed.kubectl("get", "pods", "-n", namespace, "-l", "job-name=pair", "-o", "json").stdout)["items"]
    logs = {p["metadata"]["name"]: testbed.pod_log(p["metadata"]["name"], namespace) for p in pods}
    assert result == "Complete", logs
    text = "\n".join(logs.values())
    assert "received: hello from pair-0" in text and "received: hello from pair-1" in text
    assert len({p["status"]["podIP"] for p in pods}) == 2


SERVER = """
    import http.server, os
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(os.environ["HOSTNAME"].encode())
        def log_message(self, *args):
            pass
    http.server.HTTPServer((os.environ["POD_IP"], 8080), Handler).serve_forever()
"""


def test_deployment_on_local_node_becomes_ready_by_probe(testbed, python_image, namespace):
    testbed.apply({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                     "nodeSelector": {"kubernetes.io/hostname": LOCAL_NODE},
                     "containers": [{
                         "name": "main", "image": python_image,
                         "command": ["python", "-c", textwrap.dedent(SERVER)],
                         "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                         "ports": [{"name": "http", "containerPort": 8080}],
                         "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 2},
                     }]}}}}, namespace)
    testbed.wait_for("2 ready replicas",
                     lambda: testbed.get("deployment", "web", namespace)["status"].get("readyReplicas") == 2,
                     timeout=60)
    # The Service name resolves for local pods (to a ready pod it selects; port == targetPort).
    testbed.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                   "spec": {"selector": {"app": "web"}, "ports": [{"port": 8080}]}}, namespace)
    client = """
        import os, sys, time, urllib.request
        url = f"http://web.{os.environ['NS']}.svc.cluster.local:8080/healthz"
        for _ in range(100):
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    print("served by", resp.read().decode(), flush=True)
                    sys.exit(0)
            except OSError:
                time.sleep(0.2)
        sys.exit(1)
    """
    testbed.apply(_pod(python_image, "client", client, container={"env": [
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]}), namespace)
    testbed.wait_for("client finished", lambda: testbed.pod_phase("client", namespace) in ("Succeeded", "Failed"),
                     timeout=60)
    assert testbed.pod_phase("client", namespace) == "Succeeded", testbed.pod_log("client", namespace)
    assert "served by web-" in testbed.kubectl("logs", "client", "-n", namespace).stdout
    # A probe that never passes keeps the pod unready (and the Deployment short of it).
    testbed.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "never-ready", "labels": {"x": "y"}},
                   "spec": {"nodeSelector": {"kubernetes.io/hostname": LOCAL_NODE},
                            "containers": [{"name": "main", "image": python_image,
                                            "command": ["python", "-c", "import time; time.sleep(600)"],
                                            "readinessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1}}]}},
                  namespace)
    testbed.wait_for("never-ready Running", lambda: testbed.pod_phase("never-ready", namespace) == "Running")
    import time

    time.sleep(3)
    pod = testbed.get("pod", "never-ready", namespace)
    assert pod["status"]["containerStatuses"][0]["ready"] is False


def test_pod_uses_its_service_account_token_in_cluster(testbed, python_image, namespace):
    """A pod's mounted token is a real one: in-cluster config works and RBAC refuses it."""
    testbed.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    code = """
        import sys
        from kubernetes import client, config
        config.load_incluster_config()
        try:
            client.CoreV1Api().list_namespaced_pod(open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read())
        except client.exceptions.ApiException as e:
            print("status", e.status, flush=True)
            sys.exit(0 if e.status == 403 else 1)
        print("allowed?!", flush=True)
        sys.exit(1)
    """
    testbed.apply(_pod(python_image, "incluster", code, serviceAccountName="nobody"), namespace)
    testbed.wait_for("incluster finished", lambda: testbed.pod_phase("incluster", namespace) in ("Succeeded", "Failed"),
                     timeout=60)
    assert testbed.pod_phase("incluster", namespace) == "Succeeded", testbed.pod_log("incluster", namespace)
    assert "status 403" in testbed.pod_log("incluster", namespace)


def test_pods_have_their_own_network_and_reach_host_services(testbed, python_image, namespace):
    """Each pod has its own address and ports (bind 0.0.0.0:8080 twice) and still reaches
    MinIO and the apiserver at the 127.0.0.1 endpoints the test bed hands out."""
    node = testbed.get("node", LOCAL_NODE)
    if node["metadata"]["labels"].get("testbed.dreambooth.dev/pod-network") != "netns":
        pytest.skip("local-0 runs with the shared-loopback pod network")
    code = """
        import os, socket, sys, time, urllib.request
        server = socket.create_server(("0.0.0.0", 8080))
        with urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL"] + "/minio/health/live", timeout=5) as r:
            assert r.status == 200
        from kubernetes import client, config
        config.load_incluster_config()
        print("api", client.VersionApi().get_code().git_version, flush=True)
        print("ready-" + "to-serve", flush=True)
        server.settimeout(60)
        conn, _ = server.accept()
        conn.sendall(os.environ["HOSTNAME"].encode())
        conn.close()
    """
    env = [{"name": "AWS_ENDPOINT_URL", "value": testbed.minio.url}]
    testbed.apply([_pod(python_image, f"same-port-{i}", code, container={"env": env}) for i in range(2)], namespace)
    import socket

    for i in range(2):
        name = f"same-port-{i}"
        testbed.wait_for(f"{name} serving", lambda n=name: "ready-to-serve" in testbed.pod_log(n, namespace)
                         or testbed.pod_phase(n, namespace) == "Failed", timeout=60)
        assert "ready-to-serve" in testbed.pod_log(name, namespace), testbed.pod_log(name, namespace)
        ip = testbed.get("pod", name, namespace)["status"]["podIP"]
        with socket.create_connection((ip, 8080), timeout=10) as conn:  # the host reaches pod IPs
            assert conn.recv(100).decode() == name
    for i in range(2):
        testbed.wait_for("exit", lambda n=f"same-port-{i}": testbed.pod_phase(n, namespace) == "Succeeded")


def test_host_network_pod_uses_the_host_address(testbed, python_image, namespace):
    code = """
        import socket, sys
        print("addr", socket.gethostbyname(socket.gethostname()), flush=True)
    """
    testbed.apply(_pod(python_image, "hostnet", code, hostNetwork=True), namespace)
    testbed.wait_for("hostnet Succeeded", lambda: testbed.pod_phase("hostnet", namespace) == "Succeeded", timeout=60)
    assert testbed.get("pod", "hostnet", namespace)["status"]["podIP"] == "127.0.0.1"


def test_children_left_behind_end_with_the_container(testbed, python_image, namespace):
    """When PID 1 of a container exits, its PID namespace ends and every process left in it dies."""
    import random
    from pathlib import Path

    seconds = str(random.randint(100000, 999999))
    code = f"""
        import subprocess
        subprocess.Popen(["sleep", "{seconds}"])
        print("spawned", flush=True)
    """
    testbed.apply(_pod(python_image, "parent", code), namespace)
    testbed.wait_for("parent Succeeded", lambda: testbed.pod_phase("parent", namespace) == "Succeeded", timeout=60)

    def orphans() -> list[str]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and (entry / "cmdline").read_bytes() == f"sleep\0{seconds}\0".encode():
                    found.append(entry.name)
            except OSError:
                pass
        return found

    testbed.wait_for("no orphan left", lambda: not orphans(), timeout=10)


RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]}}


def test_the_runtime_enforces_the_security_context(testbed, python_image, namespace):
    """UID/GID 1000, a read-only root (EROFS), no capabilities at all, no_new_privs; the emptyDir
    at /tmp is the only place to write."""
    code = """
        import errno, json, os
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        out = {"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
               "caps": {k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
               "no_new_privs": status["NoNewPrivs"].strip()}
        try:
            open("/opt/written-by-the-pod", "w")
            out["root_write"] = "allowed"
        except OSError as e:
            out["root_write"] = errno.errorcode[e.errno]
        open("/tmp/ok", "w").write("x")
        out["tmp_write"] = os.path.exists("/tmp/ok")
        print("RESULT " + json.dumps(out), flush=True)
    """
    testbed.apply(_pod(python_image, "locked", code, securityContext=RESTRICTED_POD,
                       container={"securityContext": RESTRICTED_CONTAINER, "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]},
                       volumes=[{"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}}]), namespace)
    testbed.wait_for("locked finished", lambda: testbed.pod_phase("locked", namespace) in ("Succeeded", "Failed"), timeout=60)
    log = testbed.pod_log("locked", namespace)
    out = json.loads(next(x for x in log.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    assert out["uid"] == 1000 and out["gid"] == 1000 and 1000 in out["groups"]
    assert out["root_write"] == "EROFS", out
    assert out["tmp_write"] is True
    assert set(out["caps"].values()) == {"0000000000000000"}, out["caps"]
    assert out["no_new_privs"] == "1"
    status = testbed.get("pod", "locked", namespace)["status"]["containerStatuses"][0]
    assert status["containerID"].startswith("runc://") and status["imageID"].startswith("sha256:")


def test_without_a_security_context_the_image_user_runs_on_a_fresh_writable_root(testbed, python_image, namespace):
    """The image's USER (1000:1000) applies; each container gets its own writable layer, which the
    next container does not see."""
    code = """
        import os, sys
        print("uid", os.getuid(), "gid", os.getgid(), flush=True)
        assert not os.path.exists("/var/tmp/left-by-the-last-one"), "a container saw another one's root"
        open("/var/tmp/left-by-the-last-one", "w").write("x")
    """
    testbed.apply(_pod(python_image, "plain", code, container={"securityContext": {"runAsUser": 0}}), namespace)
    testbed.apply(_pod(python_image, "imageuser", "import os; print('uid', os.getuid(), 'gid', os.getgid(), flush=True)"),
                  namespace)
    for name in ("plain", "imageuser"):
        testbed.wait_for(f"{name} Succeeded", lambda n=name: testbed.pod_phase(n, namespace) == "Succeeded", timeout=60)
    assert "uid 1000 gid 1000" in testbed.pod_log("imageuser", namespace)
    assert "uid 0 gid 0" in testbed.pod_log("plain", namespace)
    testbed.kubectl("delete", "pod", "plain", "-n", namespace, "--wait=true", "--timeout=60s")
    testbed.apply(_pod(python_image, "plain", code, container={"securityContext": {"runAsUser": 0}}), namespace)
    testbed.wait_for("plain again", lambda: testbed.pod_phase("plain", namespace) in ("Succeeded", "Failed"), timeout=60)
    assert testbed.pod_phase("plain", namespace) == "Succeeded", testbed.pod_log("plain", namespace)


def test_the_image_entrypoint_takes_the_pods_args(testbed, python_image, namespace):
    """No command: the image's ENTRYPOINT (`kopf run`) runs with the pod's args in place of CMD."""
    pod = _pod(python_image, "entry", "")
    del pod["spec"]["containers"][0]["command"]
    pod["spec"]["containers"][0]["args"] = ["--help"]
    testbed.apply(pod, namespace)
    testbed.wait_for("entry Succeeded", lambda: testbed.pod_phase("entry", namespace) == "Succeeded", timeout=60)
    assert "Usage: kopf run" in testbed.pod_log("entry", namespace)


def test_a_missing_image_is_err_image_pull(testbed, python_image, namespace):
    testbed.apply(_pod("dreambooth/not-built:0.0.0", "absent", "print('never')"), namespace)

    def waiting() -> dict | None:
        statuses = (testbed.get("pod", "absent", namespace).get("status") or {}).get("containerStatuses") or []
        state = statuses[0]["state"].get("waiting") if statuses else None
        return state if state and state.get("reason") in ("ErrImagePull", "ImagePullBackOff") else None

    state = testbed.wait_for("ErrImagePull", waiting, timeout=30)
    assert "dreambooth/not-built:0.0.0" in state["message"] and "not present" in state["message"]
    testbed.wait_for("ImagePullBackOff", lambda: (waiting() or {}).get("reason") == "ImagePullBackOff", timeout=30)
    assert testbed.pod_phase("absent", namespace) == "Pending"


def test_run_as_non_root_refuses_a_root_user(testbed, python_image, namespace):
    testbed.apply(_pod(python_image, "rooted", "print('ran')", securityContext={"runAsNonRoot": True},
                       container={"securityContext": {"runAsUser": 0}}), namespace)

    def refused() -> dict | None:
        statuses = (testbed.get("pod", "rooted", namespace).get("status") or {}).get("containerStatuses") or []
        state = statuses[0]["state"].get("waiting") if statuses else None
        return state if state and state.get("reason") == "CreateContainerConfigError" else None

    state = testbed.wait_for("CreateContainerConfigError", refused, timeout=30)
    assert "runAsNonRoot" in state["message"]
    assert "ran" not in testbed.pod_log("rooted", namespace)
