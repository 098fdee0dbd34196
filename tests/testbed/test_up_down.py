"""`make testbed-up` / `make testbed-down` on their own root: everything starts, nothing is left."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.testbed.cluster import MARKER, REAL_NODE, REPO, Testbed, marked_pids
from tests.testbed.realnode import RUN_DIR, NodeAddresses

pytestmark = pytest.mark.testbed


def _make(target: str, root, timeout: float) -> subprocess.CompletedProcess:
    # This test imports the one image it runs itself (a fresh containerd slot: no 5 GB trainer copy).
    env = {k: v for k, v in os.environ.items() if k != MARKER} | {"TESTBED_IMAGES": "0"}
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
        assert REAL_NODE in {n["metadata"]["name"] for n in nodes}
        Testbed(root).load_images([python_image])
        # A pod running on real-0 must be ended by testbed-down as well.
        token = f"lingerer-{os.getpid()}-{time.monotonic_ns()}"
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "lingerer"},
               "spec": {"nodeName": REAL_NODE, "containers": [
                   {"name": "main", "image": python_image, "command": ["python", "-c", f"import time; time.sleep(3600)  # {token}"]}]}}
        subprocess.run([*kubectl, "apply", "-f", "-"], input=json.dumps(pod), text=True, check=True, capture_output=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not _sleepers(token):
            time.sleep(0.3)
        assert _sleepers(token), "the pod's process never started"
        assert marked_pids(root.resolve())
        node = json.loads((root / "state.json").read_text())["real_node"]
    finally:
        down = _make("testbed-down", root, timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    assert marked_pids(root.resolve()) == []
    assert _processes_under(root) == []
    assert _sleepers(token) == []
    # real-0's link, route, API DNAT, run folder and pod volumes are gone; its containerd slot stays (images).
    real = NodeAddresses(node["prefix"])
    assert subprocess.run(["ip", "link", "show", real.host_link], capture_output=True).returncode != 0
    assert real.pod_cidr.split("/")[0] not in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    assert f"dreambooth-testbed-{node['prefix']} " not in subprocess.run(
        ["iptables", "-t", "nat", "-S"], capture_output=True, text=True).stdout + " "
    assert not (RUN_DIR / f"real-{node['prefix']}").exists()
    assert not (root / REAL_NODE / "kubelet").exists()
