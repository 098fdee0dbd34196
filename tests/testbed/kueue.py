"""Kueue on the test bed: the controller built from its Go module (build.sh), run out of cluster.

What it takes (read from Kueue's source; ../shared/design/KUEUE-NOTES.md): a strict config file
with leader election, internal cert management, webhooks' use and the visibility server off; a key
pair in the webhook cert dir (the server starts even with no webhook registered) and at the
hard-coded /etc/kueue/metrics/certs (bound there in a private mount namespace, so the host's /etc
gains at most an empty folder); its CRDs from the module source, applied server-side. No webhook
configuration is registered: the operator creates queued Jobs suspended itself.

Then one ResourceFlavor and one ClusterQueue covering the KWOK GPU pool's resources (quota as
given); LocalQueues are per namespace (`local_queue`).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.testbed.cluster import MARKER
from tests.testbed.minio_server import cached_binary, free_port, pinned_versions

FLAVOR = "default-flavor"
CLUSTER_QUEUE = "gpu-cq"
LOCAL_QUEUE = "user-queue"
KUEUE_NAMESPACE = "kueue-system"
METRICS_CERTS = Path("/etc/kueue/metrics/certs")  # hard-coded in Kueue's main.go


def kueue_module_dir(version: str) -> Path:
    """Kueue's module source (its CRDs), from the module cache (build.sh left it there)."""
    result = subprocess.run(["go", "mod", "download", "-json", f"sigs.k8s.io/kueue@{version}"],
                            capture_output=True, text=True, timeout=300, cwd="/")
    if result.returncode != 0:
        raise RuntimeError(f"cannot fetch the kueue {version} module: {result.stderr.strip() or result.stdout.strip()}")
    return Path(json.loads(result.stdout)["Dir"])


def config(cert_dir: Path, health_port: int, webhook_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "leaderElection": {"leaderElect": False},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
        # Gang semantics: all pods Ready within the timeout, else the workload is evicted and requeued.
        "waitForPodsReady": {
            "timeout": "5m", "blockAdmission": False, "recoveryTimeout": "3m",
            "requeuingStrategy": {"timestamp": "Eviction", "backoffBaseSeconds": 10, "backoffMaxSeconds": 300, "backoffLimitCount": 3},
        },
        "featureGates": {"VisibilityOnDemand": False},
    }


def queue_objects(gpus: int, cpu: str = "96", memory: str = "1000Gi") -> list[dict[str, Any]]:
    """A ResourceFlavor and a ClusterQueue covering cpu, memory and GPUs (every resource a pod asks for)."""
    return [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}},
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": CLUSTER_QUEUE},
            "spec": {
                "namespaceSelector": {},  # every namespace (nil would admit none)
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [{
                    "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                    "flavors": [{"name": FLAVOR, "resources": [
                        {"name": "cpu", "nominalQuota": cpu},
                        {"name": "memory", "nominalQuota": memory},
                        {"name": "nvidia.com/gpu", "nominalQuota": str(gpus)},
                    ]}],
                }],
            },
        },
    ]


def local_queue(namespace: str, name: str = LOCAL_QUEUE) -> dict[str, Any]:
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
            "metadata": {"namespace": namespace, "name": name}, "spec": {"clusterQueue": CLUSTER_QUEUE}}


def _key_pair(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "tls.crt").exists():
        return
    subprocess.run(["openssl", "req", "-x509", "-nodes", "-newkey", "rsa:2048", "-days", "3650", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(directory / "tls.key"), "-out", str(directory / "tls.crt")],
                   check=True, capture_output=True, timeout=60)


def _wait(what: str, ready: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout} s")
        time.sleep(0.3)


@dataclass
class KueueProcess:
    process: subprocess.Popen
    health_port: int
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_kueue(bed: Any, gpus: int, timeout: float = 90) -> KueueProcess:
    """Start Kueue against the test bed `bed` (tests.testbed.cluster.Testbed) with a `gpus` quota."""
    started = time.monotonic()
    version = pinned_versions()["KUEUE_VERSION"]
    binary = cached_binary("kueue", "KUEUE_VERSION")
    root = bed.root / "kueue"
    certs = root / "certs"
    _key_pair(certs)
    crds = kueue_module_dir(version) / "config" / "components" / "crd" / "bases"
    bed.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds), timeout=120)
    for crd in sorted(crds.glob("*.yaml")):  # a CRD created a moment ago may have no conditions yet
        name = f"{crd.stem.split('_', 1)[1]}.{crd.stem.split('_', 1)[0]}"
        _wait(f"CRD {name} established", lambda: bed.kubectl(
            "get", "crd", name, "-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}", check=False).stdout == "True")
    bed.kubectl("create", "namespace", KUEUE_NAMESPACE, check=False)
    health, webhook = free_port(), free_port()
    config_path = root / "kueue.yaml"
    config_path.write_text(json.dumps(config(certs, health, webhook), indent=2))  # JSON is YAML
    # A private mount namespace puts the pair where main.go looks for the metrics certificate.
    script = (f"mkdir -p {METRICS_CERTS} && mount --bind {certs} {METRICS_CERTS} && "
              f"exec {binary} --config={config_path} --kubeconfig={bed.kubeconfig} --zap-log-level=info")
    log_path = bed.logs / "kueue.log"
    env = dict(os.environ, **{MARKER: str(bed.root)})  # `down` finds and ends it by this marker
    with open(log_path, "ab") as log:
        process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                   env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    handle = KueueProcess(process, health, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kueue exited ({process.returncode}); see {log_path}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=2).read()
            break
        except OSError:
            time.sleep(0.5)
    else:
        handle.stop()
        raise TimeoutError(f"kueue not ready in {timeout} s; see {log_path}")
    body = json.dumps({"apiVersion": "v1", "kind": "List", "items": queue_objects(gpus)})
    bed.kubectl("apply", "-f", "-", input=body)
    print(f"[testbed] kueue {version} up in {time.monotonic() - started:.1f} s (ClusterQueue {CLUSTER_QUEUE}: {gpus} GPUs)")
    return handle
