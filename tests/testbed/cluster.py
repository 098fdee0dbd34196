"""The test bed: a real control plane (kwokctl --runtime binary over the pinned, locally built
binaries), KWOK GPU nodes, `real-0` (a real kubelet with containerd, CNI, kube-proxy and CoreDNS:
tests/testbed/realnode.py), and MinIO.

`make testbed-up`/`make testbed-down` (``python -m tests.testbed up|down``) and the pytest
fixtures (tests/testbed/fixtures.py) both use `Testbed` below.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.testbed import node_images
from tests.testbed.minio_server import CACHE, MinioServer, cached_binary, free_port, pinned_versions, start_minio
from tests.testbed.realnode import NODE_NAME as REAL_NODE
from tests.testbed.realnode import KUBERNETES_SERVICE_IP, NodeState, RealNode, capacity_policy, dns_service, prefix_for

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO / ".testbed"
# Every process the test bed starts carries this variable (value: the test-bed root), so
# `down` can find and end anything left behind, whoever started it.
MARKER = "DREAMBOOTH_TESTBED_ROOT"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"

GPU_NODES = 4
GPU_PER_NODE = 8
GPU_POOL_LABELS = {
    "dreambooth.dev/pool": "gpu",
    "nvidia.com/gpu.present": "true",
    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    "nvidia.com/gpu.count": str(GPU_PER_NODE),
    "type": "kwok",
}


def log(msg: str) -> None:
    print(f"[testbed] {msg}", file=sys.stderr, flush=True)


def binaries() -> dict[str, Path]:
    """Every cached binary the test bed runs (build.sh builds them; nothing is fetched here)."""
    return {
        "kube-apiserver": cached_binary("kube-apiserver", "KUBERNETES_VERSION"),
        "kube-controller-manager": cached_binary("kube-controller-manager", "KUBERNETES_VERSION"),
        "kube-scheduler": cached_binary("kube-scheduler", "KUBERNETES_VERSION"),
        "kubectl": cached_binary("kubectl", "KUBERNETES_VERSION"),
        "etcd": cached_binary("etcd", "ETCD_VERSION"),
        "kwok": cached_binary("kwok", "KWOK_VERSION"),
        "kwokctl": cached_binary("kwokctl", "KWOK_VERSION"),
        "helm": cached_binary("helm", "HELM_VERSION"),
        "kubelet": cached_binary("kubelet", "KUBERNETES_VERSION"),
        "kube-proxy": cached_binary("kube-proxy", "KUBERNETES_VERSION"),
        "coredns": cached_binary("coredns", "COREDNS_VERSION"),
    }


def build_binaries() -> float:
    """Run build.sh (a no-op when the cache is warm); returns the seconds it took."""
    start = time.monotonic()
    subprocess.run(["bash", str(Path(__file__).with_name("build.sh"))], check=True)
    return time.monotonic() - start


@dataclass
class State:
    """What `down` needs to stop a test bed; saved as <root>/state.json."""
    name: str
    root: str
    kubeconfig: str
    minio_pid: int = 0
    minio_endpoint: str = ""
    minio_access_key: str = ""
    minio_secret_key: str = ""
    real_node: dict = field(default_factory=dict)  # realnode.NodeState
    extra: dict = field(default_factory=dict)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def marked_pids(root: Path) -> list[int]:
    """PIDs of live processes whose environment carries MARKER=<root>."""
    needle = f"{MARKER}={root}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _command(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return str(pid)
    return f"{pid} {argv[:80].strip()}"


def _terminate(pids: list[int], grace: float = 10.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass



KWOK_STAGES = (
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "pod/fast/pod-ready.yaml",
    "pod/fast/pod-delete.yaml",
)


def kwok_module_dir(version: str) -> Path:
    """kwok's module source (its Stage YAMLs), from the module cache; fetched through the module
    proxy if the cache lacks it (build.sh normally left it there when it built kwok)."""
    result = subprocess.run(["go", "mod", "download", "-json", f"sigs.k8s.io/kwok@{version}"],
                            capture_output=True, text=True, timeout=300, cwd="/")
    if result.returncode != 0:
        raise RuntimeError(f"cannot fetch the kwok {version} module: {result.stderr.strip() or result.stdout.strip()}")
    return Path(json.loads(result.stdout)["Dir"])


class Testbed:
    """One test bed rooted at `root` (kubeconfig, env, logs, kwok work dir, MinIO data)."""

    def __init__(self, root: Path = DEFAULT_ROOT, name: str = "dreambooth-testbed",
                 local_gpus: int | None = None) -> None:
        self.root = Path(root).resolve()
        # nvidia.com/gpu that real-0 advertises (bookkeeping only; its pods run on the CPU).
        self.local_gpus = int(os.environ.get("TESTBED_LOCAL_GPUS", "0")) if local_gpus is None else local_gpus
        self.name = name
        self.kubeconfig = self.root / "kubeconfig"
        self.env_file = self.root / "env"
        self.logs = self.root / "logs"
        self.state_file = self.root / "state.json"
        self.kwok_workdir = self.root / "kwok"
        self.bin_dir = self.root / "bin"
        self.minio: MinioServer | None = None
        self.state: State | None = None
        self.node: RealNode | None = None
        self._real_node_started = 0.0
        self._handed_out: set[str] = set()  # image refs load_images returned: never removed as older tags

    # ---------------------------------------------------------------- helpers
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[MARKER] = str(self.root)
        env["KWOK_WORKDIR"] = str(self.kwok_workdir)
        return env

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True, text=True, input=input, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def load_state(self) -> State | None:
        if self.state_file.exists():
            saved = json.loads(self.state_file.read_text())
            # A state.json of an older checkout (its node agent's fields) still stops cleanly.
            return State(**{key: value for key, value in saved.items() if key in State.__dataclass_fields__})
        return None

    def _save_state(self) -> None:
        assert self.state is not None
        self.state_file.write_text(json.dumps(asdict(self.state), indent=2))

    def is_up(self) -> bool:
        state = self.load_state()
        if not state or not _alive(state.minio_pid) or not state.real_node:
            return False
        if not all(_alive(pid) for pid in [state.real_node.get("holder_pid", 0), *state.real_node.get("pids", {}).values()]):
            return False
        try:
            return self.kubectl("get", "--raw", "/readyz", check=False, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    # ---------------------------------------------------------------- start
    def start(self) -> float:
        """Start everything; returns the start time in seconds (binaries must be built)."""
        t0 = time.monotonic()
        if self.root.exists():
            self.stop(quiet=True)
            # A fresh start: the previous run's logs, node, cluster and objects go ("pods" and
            # "hosts": what an older checkout's node agent left).
            for sub in ("logs", REAL_NODE, "pods", "hosts", "kwok", "minio"):
                shutil.rmtree(self.root / sub, ignore_errors=True)
        for sub in (self.logs, self.bin_dir, self.kwok_workdir):
            sub.mkdir(parents=True, exist_ok=True)
        bins = binaries()
        for name in ("kubectl", "helm", "kwokctl"):
            link = self.bin_dir / name
            link.unlink(missing_ok=True)
            link.symlink_to(bins[name])
        self.state = State(name=self.name, root=str(self.root), kubeconfig=str(self.kubeconfig))
        self._save_state()
        try:
            self._claim_real_node()
            self._start_minio()
            self._start_control_plane(bins)
            self._create_nodes()
            self._start_real_node(bins)
            self._wait_ready()
            self._write_env()
        except BaseException:
            log(f"start failed; logs are in {self.logs} and {self.kwok_workdir}")
            if os.environ.get("TESTBED_KEEP_FAILED") != "1":  # =1: leave it running to look at
                self.stop(quiet=True)
            raise
        return time.monotonic() - t0

    @property
    def host_ip(self) -> str:
        """Where the control plane and MinIO listen: the host's end of real-0's link (pods reach it)."""
        state = self.state or self.load_state()
        assert state is not None and state.real_node, "the test bed is not up"
        return RealNode(self.root, CACHE, {}, NodeState(**state.real_node)).addresses.host_ip

    def _claim_real_node(self) -> None:
        """real-0's network prefix, containerd slot and namespaces: the host address comes from it."""
        assert self.state is not None
        self.node = RealNode(self.root, CACHE, self._env())
        addresses = self.node.claim(prefix_for(self.root))
        self.state.real_node = self.node.to_json()
        self._save_state()
        log(f"real-0: node {addresses.node_ip}, host {addresses.host_ip}, pods {addresses.pod_cidr}, "
            f"containerd slot {self.node.containerd_root}")

    def _start_real_node(self, bins: dict[str, Path]) -> None:
        """containerd (with the pause image), then the kubelet, kube-proxy and CoreDNS."""
        assert self.node is not None and self.state is not None
        self._real_node_started = time.monotonic()
        pause = node_images.ensure_pause_image(CACHE)
        self.node.start_containerd(sandbox_image=node_images.qualified(pause))
        self.state.real_node = self.node.to_json()
        self._save_state()
        for imported in node_images.load_images(self.node, [pause]):
            log(f"imported {imported.ref} into real-0 ({imported.new_layers} layers, {imported.seconds:.1f} s)")
        # Before the kubelet registers: its Node is created with the capacity the tests need.
        items = [*dns_service(self.node.addresses), *capacity_policy(gpus=self.local_gpus)]
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
        self.node.start_components(bins["kubelet"], bins["kube-proxy"], bins["coredns"])
        self.state.real_node = self.node.to_json()
        self._save_state()

    def load_images(self, refs: list[str]) -> list[str]:
        """Make `refs` (buildah images of this machine) runnable on real-0; returns the refs pods use."""
        node = self.real_node()
        for imported in node_images.load_images(node, refs, keep=frozenset(self._handed_out)):
            log(f"imported {imported.ref} into real-0: {imported.new_layers} new layers "
                f"({imported.new_bytes / 1e9:.2f} GB) in {imported.seconds:.1f} s")
        runnable = [node_images.qualified(ref) for ref in refs]
        self._handed_out |= set(runnable)  # a later call's "older tag" may be one a session fixture still uses
        return runnable

    def real_node(self) -> RealNode:
        if self.node is None:
            state = self.state or self.load_state()
            assert state is not None and state.real_node, "the test bed is not up"
            self.node = RealNode(self.root, CACHE, self._env(), NodeState(**state.real_node))
        return self.node

    def _start_minio(self) -> None:
        old = os.environ.get(MARKER)
        os.environ[MARKER] = str(self.root)  # start_minio passes os.environ on
        try:
            self.minio = start_minio(self.root / "minio" / "data", log_path=self.logs / "minio.log",
                                     host=self.host_ip)
        finally:
            if old is None:
                os.environ.pop(MARKER, None)
            else:
                os.environ[MARKER] = old
        assert self.state is not None
        self.state.minio_pid = self.minio.process.pid
        self.state.minio_endpoint = self.minio.endpoint
        self.state.minio_access_key = self.minio.access_key
        self.state.minio_secret_key = self.minio.secret_key
        self._save_state()

    def _kwokctl_config(self) -> Path:
        """KwokctlConfiguration: local binaries only, kwok manages annotated nodes only."""
        pins = pinned_versions()
        cfg = {
            "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
            "kind": "KwokctlConfiguration",
            "options": {
                "runtime": "binary",
                "bindAddress": "127.0.0.1",  # real-0 reaches the API server through a DNAT on its link
                # The `kubernetes` Service's address: in-cluster clients on real-0 verify it.
                "kubeApiserverCertSANs": [KUBERNETES_SERVICE_IP, self.host_ip],
                "kubeVersion": pins["KUBERNETES_VERSION"],
                "etcdVersion": pins["ETCD_VERSION"].lstrip("v"),
                "kwokVersion": pins["KWOK_VERSION"],
                # Gang scheduling in Kubernetes itself (alpha in 1.36): the Workload API's PodGroup with a
                # gang policy, served and honoured by the scheduler (apiserver, scheduler, controller-manager).
                "kubeFeatureGates": "GenericWorkload=true,GangScheduling=true",
                "kubeRuntimeConfig": "scheduling.k8s.io/v1alpha2=true",
            },
            "componentsPatches": [
                {
                    # kwokctl runs kwok with --manage-all-nodes=true; real-0 is its kubelet's.
                    "name": "kwok-controller",
                    "extraArgs": [
                        {"key": "manage-all-nodes", "value": "false", "override": True},
                        {"key": "manage-nodes-with-annotation-selector",
                         "value": f"{FAKE_NODE_ANNOTATION}=fake"},
                    ],
                },
                {
                    # Pods asking for nvidia.com/gpu tolerate the GPU pool's taint (as on GKE); owner
                    # references that block the owner's deletion need update on its finalizers (as on
                    # OpenShift and other hardened clusters).
                    "name": "kube-apiserver",
                    "extraArgs": [
                        {"key": "enable-admission-plugins", "value": "ExtendedResourceToleration,OwnerReferencesPermissionEnforcement"},
                        # The `kubernetes` Service's endpoint: where pods on real-0 reach the API server.
                        {"key": "advertise-address", "value": self.host_ip},
                        # Logs and exec go to a node's InternalIP (its name resolves nowhere).
                        {"key": "kubelet-preferred-address-types", "value": "InternalIP,Hostname"},
                    ],
                },
            ],
        }
        # Our Stage set replaces kwokctl's defaults (a config holding any Stage uses only those):
        # nodes initialise and heartbeat, pods go Running and deletions complete, but KWOK
        # never completes Job pods by itself; lifecycle tests set those phases.
        stage_dir = kwok_module_dir(pins["KWOK_VERSION"]) / "kustomize" / "stage"
        stages = [(stage_dir / rel).read_text() for rel in KWOK_STAGES]
        path = self.root / "kwokctl.yaml"
        path.write_text("\n---\n".join([json.dumps(cfg, indent=2), *stages]))  # JSON is YAML
        return path

    def _start_control_plane(self, bins: dict[str, Path]) -> None:
        config = self._kwokctl_config()
        cmd = [
            str(bins["kwokctl"]), "--name", self.name, "create", "cluster",
            "--config", str(config),
            "--runtime", "binary",
            "--kube-apiserver-binary", str(bins["kube-apiserver"]),
            "--kube-controller-manager-binary", str(bins["kube-controller-manager"]),
            "--kube-scheduler-binary", str(bins["kube-scheduler"]),
            "--etcd-binary", str(bins["etcd"]),
            "--kwok-controller-binary", str(bins["kwok"]),
            "--secure-port=true", "--kube-authorization=true", "--kube-admission=true",
            "--kubeconfig", "",
            "--wait", "120s", "--timeout", "180s",
        ]
        log("starting the control plane (kwokctl --runtime binary)")
        with open(self.logs / "kwokctl.log", "ab") as out:
            result = subprocess.run(cmd, env=self._env(), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=240)
        if result.returncode != 0:
            raise RuntimeError(f"kwokctl create cluster failed ({result.returncode}); see {self.logs / 'kwokctl.log'}")
        generated = self.kwok_workdir / "clusters" / self.name / "kubeconfig.yaml"
        shutil.copyfile(generated, self.kubeconfig)
        self.kubeconfig.chmod(0o600)
        self.real_node().expose_api(self.kubeconfig)

    def _create_nodes(self) -> None:
        """KWOK GPU nodes (kwok keeps them Ready; real-0 registers itself)."""
        items = []
        for i in range(GPU_NODES):
            name = f"gpu-{i}"
            items.append({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {FAKE_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {**GPU_POOL_LABELS, "kubernetes.io/hostname": name,
                               "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                               "node-role.kubernetes.io/gpu": ""},
                },
                "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
                "status": {
                    "allocatable": {"cpu": "96", "memory": "1500Gi", "pods": "110",
                                    "nvidia.com/gpu": str(GPU_PER_NODE), "ephemeral-storage": "1Ti"},
                    "capacity": {"cpu": "96", "memory": "1500Gi", "pods": "110",
                                 "nvidia.com/gpu": str(GPU_PER_NODE), "ephemeral-storage": "1Ti"},
                },
            })
        body = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        self.kubectl("apply", "-f", "-", input=body)

    def _wait_ready(self, timeout: float = 120) -> None:
        """All nodes Ready, the default ServiceAccount and root CA published (pods can be made)."""
        deadline = time.monotonic() + timeout
        want = {f"gpu-{i}" for i in range(GPU_NODES)} | {REAL_NODE}
        last = ""
        while time.monotonic() < deadline:
            node_waits = self.real_node().ready()
            nodes = self.kubectl("get", "nodes", "-o", "json", check=False)
            ready = set()
            if nodes.returncode == 0:
                for node in json.loads(nodes.stdout)["items"]:
                    for cond in node.get("status", {}).get("conditions") or []:
                        if cond["type"] == "Ready" and cond["status"] == "True":
                            ready.add(node["metadata"]["name"])
            sa = self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False)
            ca = self.kubectl("get", "configmap", "kube-root-ca.crt", "-n", "default", check=False)
            if want <= ready and sa.returncode == 0 and ca.returncode == 0 and not node_waits:
                log(f"real-0 Ready, with Services and DNS, {time.monotonic() - self._real_node_started:.1f} s after its start")
                return
            last = (f"ready nodes {sorted(ready)}; default SA {sa.returncode == 0}; root CA {ca.returncode == 0}; "
                    f"real-0: {node_waits or 'up'}")
            time.sleep(0.5)
        raise TimeoutError(f"test bed not ready in {timeout} s: {last}")

    def env_vars(self) -> dict[str, str]:
        state = self.state or self.load_state()
        assert state is not None
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "AWS_ENDPOINT_URL": f"http://{state.minio_endpoint}",
            "AWS_ACCESS_KEY_ID": state.minio_access_key,
            "AWS_SECRET_ACCESS_KEY": state.minio_secret_key,
        }

    def _write_env(self) -> None:
        lines = ["# Test bed: `source .testbed/env`, then kubectl/helm talk to it."]
        lines += [f"export {k}='{v}'" for k, v in self.env_vars().items()]
        lines.append(f'export PATH="{self.bin_dir}:$PATH"')
        self.env_file.write_text("\n".join(lines) + "\n")

    # ---------------------------------------------------------------- stop
    def stop(self, quiet: bool = False) -> list[int]:
        """Stop everything of this root; returns the PIDs still alive afterwards (should be [])."""
        state = self.load_state()
        kwokctl = self.bin_dir / "kwokctl"
        if state and state.real_node:
            RealNode(self.root, CACHE, self._env(), NodeState(**state.real_node)).stop_components()
        cluster_dir = self.kwok_workdir / "clusters" / (state.name if state else self.name)
        if cluster_dir.exists() and kwokctl.exists():
            with open(self.logs / "kwokctl.log", "ab") if self.logs.exists() else open(os.devnull, "wb") as out:
                subprocess.run([str(kwokctl), "--name", state.name if state else self.name, "delete", "cluster"],
                               env=self._env(), stdout=out, stderr=subprocess.STDOUT, timeout=120, check=False)
        if self.minio is not None:
            self.minio.stop()
        elif state and _alive(state.minio_pid):
            _terminate([state.minio_pid])
        if state and state.real_node:  # last: the control plane listened on the node's link
            RealNode(self.root, CACHE, self._env(), NodeState(**state.real_node)).release()
        self.node = None
        leftovers = marked_pids(self.root)
        if leftovers:
            if not quiet:
                log(f"ending leftover test-bed processes {[_command(pid) for pid in leftovers]}")
            _terminate(leftovers, grace=5)
        self.state_file.unlink(missing_ok=True)
        self.env_file.unlink(missing_ok=True)
        return marked_pids(self.root)


__all__ = ["Testbed", "build_binaries", "binaries", "marked_pids", "REAL_NODE", "GPU_NODES",
           "GPU_PER_NODE", "GPU_POOL_LABELS", "MARKER", "REPO", "DEFAULT_ROOT", "free_port"]
