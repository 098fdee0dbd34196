"""`make testbed-up` / `make testbed-down` on their own root: everything starts, nothing is left."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.testbed import podnet
from tests.testbed.cluster import LOCAL_NODE, MARKER, REPO, marked_pids

pytestmark = pytest.mark.testbed


def _make(target: str, root, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), target, f"TESTBED_ROOT={root}"],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _processes_under(root) -> list[str]:
    """Command lines of live processes that mention the root (belt and braces beside the marker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().split(") ", 1)[1][0]
        except OSError:
            continue
        if str(root) in cmd and state != "Z":
            found.append(f"{entry}: {cmd}")
    return found


def _sleepers(token: str) -> list[int]:
    """Processes running the pod's command (its container's PID 1: the token is in its command line)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if entry.isdigit() and token.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            pass
    return found


def test_make_testbed_up_then_down_leaves_no_process(tmp_path, python_image):
    root = tmp_path / "bed"
    up = _make("testbed-up", root, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "test bed started in" in up.stdout
        env_text = (root / "env").read_text()
        for key in ("KUBECONFIG", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PATH"):
            assert f"export {key}=" in env_text
        kubectl = [str(root / "bin" / "kubectl"), "--kubeconfig", str(root / "kubeconfig")]
        nodes = json.loads(subprocess.run([*kubectl, "get", "nodes", "-o", "json"], capture_output=True,
                                          text=True, check=True).stdout)["items"]
        assert LOCAL_NODE in {n["metadata"]["name"] for n in nodes}
        # A pod running on local-0 must be ended by testbed-down as well.
        token = f"lingerer-{os.getpid()}-{time.monotonic_ns()}"
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "lingerer"},
               "spec": {"nodeName": LOCAL_NODE, "containers": [
                   {"name": "main", "image": python_image, "command": ["python", "-c", f"import time; time.sleep(3600)  # {token}"]}]}}
        subprocess.run([*kubectl, "apply", "-f", "-"], input=json.dumps(pod), text=True, check=True,
                       capture_output=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _sleepers(token):
            time.sleep(0.3)
        assert _sleepers(token), "the pod process never started"
        assert marked_pids(root.resolve())
        prefix = json.loads((root / "network.json").read_text())["prefix"]
    finally:
        down = _make("testbed-down", root, timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    assert marked_pids(root.resolve()) == []
    assert _processes_under(root) == []
    assert _sleepers(token) == []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"tb{prefix}-" not in netns
    assert subprocess.run(["ip", "link", "show", f"tbbr{prefix}"], capture_output=True).returncode != 0
