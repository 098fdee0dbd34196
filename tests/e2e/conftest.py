"""End-to-end fixtures: the CRD installed on the test bed, the operator running against it,
storage credentials and subject photos in the test bed's MinIO."""
from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "dreambooth.dev_dreamboothjobs.yaml"
BUCKET = "dreambooth"
SECRET = "dreambooth-s3"


def pytest_configure(config: pytest.Config) -> None:
    # The test-bed fixtures, unless the root conftest already registered them.
    if not config.pluginmanager.has_plugin("tests.testbed.fixtures"):
        config.pluginmanager.import_plugin("tests.testbed.fixtures")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OperatorProcess:
    """`kopf run -m dreambooth_operator.handlers` against the test bed; can be killed and restarted."""

    def __init__(self, env: dict[str, str], log_path: Path, peering: str | None = None) -> None:
        self.env = env
        self.log_path = log_path
        self.metrics_port = _free_port()
        self.process: subprocess.Popen | None = None
        self.peering = peering  # None: --standalone; else a replica electing its leader in that ClusterKopfPeering

    def start(self) -> None:
        kopf = Path(sys.executable).with_name("kopf")
        env = dict(self.env, DREAMBOOTH_OPERATOR_METRICS_PORT=str(self.metrics_port))
        election = ["--standalone"] if self.peering is None else [f"--peering={self.peering}"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(kopf), "run", "-m", "dreambooth_operator.handlers", "--all-namespaces", *election],
                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"operator exited; see {self.log_path}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).read()
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"operator did not start; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL: the operator gets no chance to tidy up (as when its node dies)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def crd(testbed: Any) -> str:
    testbed.kubectl("apply", "-f", str(CRD))
    name = "dreamboothjobs.dreambooth.dev"

    # Polled, not `kubectl wait`: that errors out on a CRD whose status has no conditions yet.
    def established() -> bool:
        conditions = ((testbed.get("customresourcedefinition", name) or {}).get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)

    testbed.wait_for("the DreamboothJob CRD established", established, timeout=60)
    return name


@pytest.fixture(scope="session")
def operator(testbed: Any, crd: str, images: dict[str, str]) -> Iterator[OperatorProcess]:
    # Jobs that leave their images to the installation get this checkout's (real-0 runs them).
    # Progress is read every 2 s, not 12 (one small cluster): a job shows several records in a
    # few seconds of training, so the tests' tiny jobs need not train long to be seen running.
    env = dict(testbed.env(), DREAMBOOTH_TRAINER_IMAGE=images["trainer"], DREAMBOOTH_INFERENCE_IMAGE=images["inference"],
               DREAMBOOTH_OPERATOR_PROGRESS_SECONDS="2")
    process = OperatorProcess(env, testbed.logs / "operator.log")
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def minio_client(testbed: Any) -> Any:
    from minio import Minio

    client = Minio(testbed.minio.endpoint, testbed.minio.access_key, testbed.minio.secret_key, secure=False)
    if not client.bucket_exists(BUCKET):
        client.make_bucket(BUCKET)
    return client


def png_bytes(seed: int, size: int = 32) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (size, size), ((seed * 70) % 256, 120, (seed * 30) % 256))
    for x in range(size):
        image.putpixel((x, (x * (seed + 1)) % size), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def upload(client: Any, key: str, data: bytes) -> None:
    client.put_object(BUCKET, key, io.BytesIO(data), len(data))


@pytest.fixture(scope="session")
def subject(minio_client: Any) -> str:
    """Four subject photos in MinIO; returns their s3:// prefix."""
    for index in range(4):
        upload(minio_client, f"subjects/rex/{index}.png", png_bytes(index))
    return f"s3://{BUCKET}/subjects/rex"


@pytest.fixture()
def s3_secret(testbed: Any, namespace: str) -> str:
    secret = {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET, "namespace": namespace},
        "stringData": {"AWS_ACCESS_KEY_ID": testbed.minio.access_key, "AWS_SECRET_ACCESS_KEY": testbed.minio.secret_key},
    }
    testbed.apply(secret)
    return SECRET


def job_manifest(testbed: Any, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamboothJob", "metadata": {"name": name}, "spec": spec}


def gpu_spec(testbed: Any, instance_uri: str, **sections: Any) -> dict[str, Any]:
    """A 2-node x 8-GPU job for the KWOK GPU pool."""
    spec: dict[str, Any] = {
        "data": {"instanceUri": instance_uri, "instancePrompt": "a photo of sks dog"},
        "prior": {"classPrompt": "a photo of dog"},
        "training": {"maxSteps": 400},
        "resources": {"nodes": 2, "gpusPerNode": 8, "cpu": "8", "memory": "64Gi"},
        "storage": {"endpoint": testbed.minio.endpoint, "bucket": BUCKET, "credentialsSecretRef": {"name": SECRET}},
        "runPolicy": {"maxRestarts": 1},
    }
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values}
    return spec


def get_job(testbed: Any, namespace: str, name: str) -> dict[str, Any]:
    found = testbed.get("dreamboothjob", name, namespace)
    assert found is not None, f"DreamboothJob {namespace}/{name} is gone"
    return found


def condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (job.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def wait_phase(testbed: Any, namespace: str, name: str, phase: str, timeout: float = 90) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = get_job(testbed, namespace, name)
        return job if (job.get("status") or {}).get("phase") == phase else None

    try:
        return testbed.wait_for(f"{name} phase {phase}", reached, timeout=timeout, interval=0.5)
    except TimeoutError:
        status = (get_job(testbed, namespace, name).get("status") or {})
        raise TimeoutError(f"{name} never reached {phase}; status: {json.dumps(status, indent=1)}") from None


def trainer_pods(testbed: Any, namespace: str, name: str, gang: int | None = None) -> list[dict[str, Any]]:
    selector = f"dreambooth.dev/job-name={name},app.kubernetes.io/component=trainer"
    if gang is not None:
        selector += f",dreambooth.dev/gang={gang}"
    return testbed.items("pods", namespace, selector)


def trainer_jobs(testbed: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    selector = f"dreambooth.dev/job-name={name},app.kubernetes.io/component=trainer"
    return testbed.items("jobs", namespace, selector)


@pytest.fixture(scope="session")
def kwok_keeps_job_pods_running(testbed: Any) -> None:
    """Lifecycle tests drive pods to Failed/Succeeded themselves: KWOK must leave Job pods Running."""
    probe_ns = "kwok-probe"
    testbed.kubectl("create", "namespace", probe_ns, check=False)
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "probe", "namespace": probe_ns},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never", "nodeSelector": {"dreambooth.dev/pool": "gpu"},
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "c", "image": "probe"}],
        }}},
    }
    testbed.apply(job)
    selector = "batch.kubernetes.io/job-name=probe"

    def phase() -> str | None:
        pods = json.loads(testbed.kubectl("get", "pods", "-n", probe_ns, "-l", selector, "-o", "json").stdout)["items"]
        return pods[0]["status"].get("phase") if pods else None

    testbed.wait_for("KWOK probe pod", lambda: phase() in ("Running", "Succeeded"), timeout=60)
    time.sleep(3)
    final = phase()
    testbed.kubectl("delete", "namespace", probe_ns, "--wait=false", check=False)
    assert final == "Running", (
        "the test bed's KWOK completed a Job pod by itself (its default 'pod-complete' stage is "
        "back?); these tests need Job pods to stay Running until the test sets their phase"
    )
