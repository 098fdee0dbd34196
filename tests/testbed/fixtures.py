"""pytest fixtures for the test bed (register with `pytest_plugins = ["tests.testbed.fixtures"]`).

`testbed` (session): one test bed per session, started with the same code as
`make testbed-up` (tests/testbed/cluster.py) under .testbed/pytest-<pid>/ and stopped at the
end. `images` (session): this checkout's images, built where stale (images/build.py), by name;
`operator_image`: the operator's alone; `python_image`: the one test pods use. `namespace` (function): a fresh namespace, deleted afterwards.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.testbed.cluster import DEFAULT_ROOT, Testbed, marked_pids
from tests.testbed.kueue import KueueProcess, local_queue, start_kueue
from tests.testbed.minio_server import MinioServer


# The kinds the tests poll, by the names they use: (API group/version path, plural, namespaced).
# Polls read them over the session's one API connection: a kubectl process costs ~0.09 CPU-s, and
# the e2e tests poll several times a second (on two cores, about a quarter of one).
READ_PATHS: dict[str, tuple[str, str, bool]] = {
    **dict.fromkeys(("pod", "pods"), ("api/v1", "pods", True)),
    **dict.fromkeys(("configmap", "configmaps"), ("api/v1", "configmaps", True)),
    **dict.fromkeys(("service", "services"), ("api/v1", "services", True)),
    **dict.fromkeys(("event", "events"), ("api/v1", "events", True)),
    **dict.fromkeys(("node", "nodes"), ("api/v1", "nodes", False)),
    **dict.fromkeys(("deployment", "deployments"), ("apis/apps/v1", "deployments", True)),
    **dict.fromkeys(("job", "jobs"), ("apis/batch/v1", "jobs", True)),
    **dict.fromkeys(("dbj", "dreamboothjob", "dreamboothjobs"), ("apis/dreambooth.dev/v1alpha1", "dreamboothjobs", True)),
    **dict.fromkeys(("crd", "customresourcedefinition", "customresourcedefinitions"),
                    ("apis/apiextensions.k8s.io/v1", "customresourcedefinitions", False)),
}


def read_path(kind: str, namespace: str | None, name: str | None = None) -> str | None:
    """The API path of an object (or, without a name, a list) of a kind in READ_PATHS; None for
    other kinds. A namespaced kind without a namespace is read in `default`, as kubectl does."""
    if kind not in READ_PATHS:
        return None
    prefix, plural, namespaced = READ_PATHS[kind]
    scope = f"/namespaces/{namespace or 'default'}" if namespaced else ""
    return f"/{prefix}{scope}/{plural}" + (f"/{name}" if name else "")


@dataclass
class TestbedHandle:
    """What tests get: paths, clients and helpers for the running test bed."""
    __test__ = False  # not a test class

    bed: Testbed
    kubeconfig: Path
    api_client: Any  # kubernetes.client.ApiClient
    minio: MinioServer

    @property
    def root(self) -> Path:
        return self.bed.root

    @property
    def logs(self) -> Path:
        return self.bed.logs

    @property
    def bin_dir(self) -> Path:
        return self.bed.bin_dir

    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG, the MinIO contract and the test-bed kubectl/helm on PATH."""
        env = dict(os.environ, **self.bed.env_vars())
        env["PATH"] = f"{self.bed.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the test-bed kubectl (admin kubeconfig); RuntimeError with stderr if check fails."""
        return self.bed.kubectl(*args, check=check, input=input, timeout=timeout)

    def apply(self, manifest: dict | list | str, namespace: str | None = None) -> None:
        if isinstance(manifest, list):
            manifest = {"apiVersion": "v1", "kind": "List", "items": manifest}
        body = manifest if isinstance(manifest, str) else json.dumps(manifest)
        self.kubectl("apply", *(["-n", namespace] if namespace else []), "-f", "-", input=body)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        """One object as `kubectl get -o json` shows it, None if there is none. The kinds in
        READ_PATHS are read over the session's API connection, the others with kubectl."""
        path = read_path(kind, namespace, name)
        if path is not None:
            return self._read(path)
        result = self.kubectl("get", kind, name, *(["-n", namespace] if namespace else []), "-o", "json",
                              check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            raise RuntimeError(result.stderr)
        return json.loads(result.stdout)

    def items(self, kind: str, namespace: str | None = None, selector: str | None = None,
              field_selector: str | None = None) -> list[dict]:
        """The items of `kubectl get <kind> [-n namespace] [-l selector] [--field-selector ...] -o
        json` for a kind in READ_PATHS, each with its kind and apiVersion as kubectl gives them."""
        path = read_path(kind, namespace)
        if path is None:
            raise ValueError(f"testbed.items({kind!r}): not a kind in READ_PATHS; use testbed.kubectl")
        query = {key: value for key, value in (("labelSelector", selector), ("fieldSelector", field_selector)) if value}
        found = self._read(path, query)
        if found is None:
            raise RuntimeError(f"GET {path}: 404")
        item_kind = found["kind"].removesuffix("List")
        return [{"kind": item_kind, "apiVersion": found["apiVersion"], **item} for item in found["items"]]

    def _read(self, path: str, query: dict[str, str] | None = None) -> dict | None:
        client = self.api_client
        method, url, headers, _, _ = client.param_serialize("GET", path, query_params=list((query or {}).items()),
                                                            auth_settings=["BearerToken"])
        response = client.call_api(method, url, header_params=headers, _request_timeout=60)
        data = response.read()
        if response.status == 404:
            return None
        if response.status >= 300:
            raise RuntimeError(f"GET {path}: {response.status} {response.reason}: {data[-2000:].decode(errors='replace')}")
        found = json.loads(data)
        for item in [found, *found.get("items", [])]:  # kubectl leaves managedFields out unless asked
            (item.get("metadata") or {}).pop("managedFields", None)
        return found

    def wait_for(self, what: str, predicate: Callable[[], Any], timeout: float = 60,
                 interval: float = 0.3) -> Any:
        """Poll predicate until it returns something truthy; TimeoutError naming `what`."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")

    def pod_phase(self, name: str, namespace: str) -> str | None:
        pod = self.get("pod", name, namespace)
        return None if pod is None else (pod.get("status") or {}).get("phase")

    def set_pod_phase(self, name: str, namespace: str, phase: str, exit_code: int | None = None,
                      reason: str | None = None, conditions: list[dict[str, Any]] | None = None) -> None:
        """Drive a pod on a KWOK node to Succeeded/Failed (kwok only takes pods to Running); `reason`
        is the container's (e.g. OOMKilled), `conditions` extra pod conditions (e.g. DisruptionTarget)."""
        code = exit_code if exit_code is not None else (0 if phase == "Succeeded" else 1)
        pod = self.get("pod", name, namespace)
        assert pod is not None, f"pod {namespace}/{name} not found"
        finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        statuses = [{
            "name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
            "restartCount": 0, "started": False,
            "state": {"terminated": {"exitCode": code, "reason": reason or ("Completed" if code == 0 else "Error"),
                                     "finishedAt": finished, "startedAt": finished}},
        } for c in pod["spec"]["containers"]]
        patch = {"status": {"phase": phase, "containerStatuses": statuses,
                            "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"},
                                           {"type": "ContainersReady", "status": "False",
                                            "reason": "PodCompleted"}, *(conditions or [])]}}
        self.kubectl("patch", "pod", name, "-n", namespace, "--subresource=status", "--type=strategic",
                     "-p", json.dumps(patch))

    def pod_log(self, name: str, namespace: str, container: str | None = None, previous: bool = False) -> str:
        """A pod's container log as the kubelet serves it (`kubectl logs`; the first container by
        default, `previous`: the one before the last restart); '' if there is none."""
        args = ["logs", name, "-n", namespace, *(["-c", container] if container else []), *(["--previous"] if previous else [])]
        result = self.kubectl(*args, check=False)
        return result.stdout if result.returncode == 0 else ""


def _clean_stale_roots(base: Path) -> None:
    """Remove .testbed/pytest-<pid> folders of sessions that are no longer running."""
    for old in base.glob("pytest-*"):
        m = re.fullmatch(r"pytest-(\d+)", old.name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        Testbed(old, name=old.name).stop(quiet=True)
        if not marked_pids(old.resolve()):
            shutil.rmtree(old, ignore_errors=True)


@pytest.fixture(scope="session")
def testbed() -> Iterator[TestbedHandle]:
    """A running test bed for the whole session (control plane, KWOK GPU nodes, real-0, MinIO)."""
    from kubernetes import config

    base = Path(os.environ.get("TESTBED_PYTEST_BASE", DEFAULT_ROOT))
    base.mkdir(parents=True, exist_ok=True)
    _clean_stale_roots(base)
    name = f"pytest-{os.getpid()}"
    bed = Testbed(base / name, name=name)
    seconds = bed.start()
    print(f"\n[testbed] started in {seconds:.1f} s at {bed.root}")
    api_client = config.new_client_from_config(config_file=str(bed.kubeconfig))
    assert bed.minio is not None
    try:
        yield TestbedHandle(bed=bed, kubeconfig=bed.kubeconfig, api_client=api_client, minio=bed.minio)
    finally:
        api_client.close()
        left = bed.stop()
        # Keep the logs for a failed run; drop the bulky rest.
        for sub in ("kwok", "minio", "bin"):
            shutil.rmtree(bed.root / sub, ignore_errors=True)
        if left:
            raise RuntimeError(f"test-bed processes left after stop: {left}")


def _runnable(testbed: TestbedHandle, built: dict[str, str]) -> dict[str, str]:
    """Built images imported into real-0's containerd (once per content): {name: ref pods use}."""
    refs = testbed.bed.load_images(list(built.values()))
    return dict(zip(built, refs))


@pytest.fixture(scope="session")
def images(testbed: TestbedHandle) -> dict[str, str]:
    """The operator, trainer and inference images of this checkout: {name: ref real-0 runs}."""
    from tests.testbed.images import built_images

    return _runnable(testbed, built_images())


@pytest.fixture(scope="session")
def operator_image(testbed: TestbedHandle) -> str:
    """This checkout's operator image (built alone when that is all a session needs: no torch)."""
    from tests.testbed.images import built_images

    return _runnable(testbed, built_images("operator"))["operator"]


@pytest.fixture(scope="session")
def python_image(operator_image: str) -> str:
    """An image with Python and the Kubernetes client for test pods: the operator's."""
    return operator_image


@pytest.fixture()
def namespace(testbed: TestbedHandle, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test (the default ServiceAccount is waited for)."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{slug}-{uuid.uuid4().hex[:5]}"
    testbed.kubectl("create", "namespace", name)
    testbed.wait_for(f"default ServiceAccount in {name}",
                     lambda: testbed.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
                     timeout=30)
    yield name
    testbed.kubectl("delete", "namespace", name, "--wait=false", check=False)


# One gang of 2 nodes x 8 GPUs fits the quota; the KWOK pool (4 x 8) could hold two.
KUEUE_GPU_QUOTA = 16


@pytest.fixture(scope="session")
def kueue(testbed: TestbedHandle) -> Iterator[KueueProcess]:
    """Kueue running against the session's test bed, with a ClusterQueue of KUEUE_GPU_QUOTA GPUs."""
    handle = start_kueue(testbed.bed, gpus=KUEUE_GPU_QUOTA)
    yield handle
    handle.stop()


@pytest.fixture()
def queue(testbed: TestbedHandle, kueue: KueueProcess, namespace: str) -> str:
    """A LocalQueue in the test's namespace, pointing at the shared ClusterQueue; returns its name."""
    manifest = local_queue(namespace)
    testbed.apply(manifest)
    return manifest["metadata"]["name"]
