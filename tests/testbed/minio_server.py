"""A real MinIO server for tests and the demo: built by build.sh, started on a free loopback port."""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("TESTBED_CACHE", Path.home() / ".cache" / "dreambooth-testbed"))
VERSIONS = Path(__file__).with_name("versions.env")


def pinned_versions() -> dict[str, str]:
    """The KEY=VALUE pins of versions.env."""
    pins: dict[str, str] = {}
    for line in VERSIONS.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            pins[key] = value
    return pins


def cached_binary(name: str, version_key: str) -> Path:
    """Path of a test-bed binary in the cache; a clear error if build.sh has not built it."""
    path = CACHE / "bin" / f"{name}-{pinned_versions()[version_key]}"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `bash tests/testbed/build.sh` (make test does)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MinioServer:
    endpoint: str  # host:port
    access_key: str
    secret_key: str
    process: subprocess.Popen
    data_dir: Path

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def env(self) -> dict[str, str]:
        """The storage env contract the trainer reads (same names the operator sets in pods)."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_minio(data_dir: Path, log_path: Path | None = None, port: int | None = None,
                credentials: tuple[str, str] | None = None, host: str = "127.0.0.1") -> MinioServer:
    """Start MinIO on host (loopback by default) with random credentials and wait until it is live."""
    binary = cached_binary("minio", "MINIO_VERSION")
    port = port or free_port()
    console = free_port()
    access, secret = credentials or ("test" + secrets.token_hex(6), secrets.token_hex(20))
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MINIO_ROOT_USER=access, MINIO_ROOT_PASSWORD=secret, MINIO_BROWSER="off")
    log = open(log_path or data_dir.parent / "minio.log", "ab")
    process = subprocess.Popen(
        [str(binary), "server", "--quiet", "--address", f"{host}:{port}",
         "--console-address", f"{host}:{console}", str(data_dir)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    server = MinioServer(f"{host}:{port}", access, secret, process, data_dir)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"minio exited with {process.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"{server.url}/minio/health/live", timeout=1):
                return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise TimeoutError(f"minio did not become live on {server.endpoint} in 60 s")
