"""`real-0`: a test-bed node run by a real kubelet, with containerd, CNI, kube-proxy and CoreDNS.

The node is a network namespace and a mount namespace of its own, as a kind node is a container:

* a holder process (`unshare --mount --net`, then `sleep`) owns both namespaces; containerd, the
  kubelet, kube-proxy and CoreDNS run inside them (`nsenter`). What they mount (volumes, netns
  files, overlay roots) stays in the node's mount namespace and goes with it; what kube-proxy
  programs (iptables) stays in the node's network namespace, so several test beds on one machine
  never touch each other's rules;
* a veth pair links the node to the host: the host end `tbh<B>` is 10.B.255.1 (the control plane
  and MinIO listen there), the node end `eth0` is 10.B.255.2 (the node's InternalIP). Pods get
  10.B.0.0/17 addresses on the CNI bridge `cni0` inside the node; the host routes that range to
  the node, so tests reach pod IPs directly. `B` is claimed per running test bed with a lock in
  /run/dreambooth-testbed/ (`prefix-B.lock`, as older checkouts' node agents claim theirs);
* containerd keeps its root (images, snapshots) in a slot of the machine-wide cache
  ($TESTBED_CACHE/containerd/slot-N, one per running test bed, kept across restarts: images are
  imported once per content hash, tests/testbed/node_images.py); its state, socket and runc's
  state live in /run/dreambooth-testbed/real-<B>/;
* Services work as on a cluster: kube-proxy (iptables mode) in the node, the `kubernetes` Service
  at 10.0.0.1 (the API server's default range; its advertise address is 10.B.255.1), CoreDNS with
  the `kubernetes` plugin behind `kube-system/kube-dns` at 10.0.0.10, which the kubelet gives pods
  as their nameserver.

What this machine needs (../shared/design/TESTBED-NOTES.md): cgroup v1 allowed, no per-QoS cgroups,
no node-allocatable enforcement, containerd's `restrict_oom_score_adj` (lowering oom_score_adj is
refused here) and a node IP that is not loopback.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

NODE_NAME = "real-0"
CLUSTER_DOMAIN = "cluster.local"
KUBERNETES_SERVICE_IP = "10.0.0.1"  # first address of kube-apiserver's default range 10.0.0.0/24
DNS_SERVICE_IP = "10.0.0.10"
CRI_NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin uses
RUN_DIR = Path("/run/dreambooth-testbed")
CONTAINERD_SLOTS = 16
NODE_LABELS = {"dreambooth.dev/pool": "local", "testbed.dreambooth.dev/runtime": "containerd"}
# Folders the node's components hard-code, given a tmpfs of the node's own (nothing left on the host).
PRIVATE_DIRS = ("/run/netns", "/run/containerd", "/var/log/containers", "/var/lib/cni")


def log(msg: str) -> None:
    print(f"[real-0] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class NodeAddresses:
    """The node's addresses for network prefix B."""
    prefix: int

    @property
    def host_ip(self) -> str:
        return f"10.{self.prefix}.255.1"

    @property
    def node_ip(self) -> str:
        return f"10.{self.prefix}.255.2"

    @property
    def host_link(self) -> str:
        return f"tbh{self.prefix}"

    @property
    def pod_cidr(self) -> str:
        return f"10.{self.prefix}.0.0/17"

    @property
    def pod_gateway(self) -> str:
        return f"10.{self.prefix}.0.1"


# ------------------------------------------------------------------------------ pure builders
def cni_config(addresses: NodeAddresses) -> dict[str, Any]:
    """One bridge network: pods on `cni0` with host-local addresses, routed (not masqueraded)."""
    return {
        "cniVersion": "1.0.0",
        "name": "testbed",
        "plugins": [
            {
                "type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                # A pod reaching itself through its Service's ClusterIP needs hairpin mode.
                "hairpinMode": True,
                "ipam": {"type": "host-local", "dataDir": "/var/lib/cni/networks",
                         "ranges": [[{"subnet": addresses.pod_cidr, "gateway": addresses.pod_gateway}]],
                         "routes": [{"dst": "0.0.0.0/0"}]},
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def containerd_config(root: Path, state: Path, socket: Path, runc_root: Path, cni_dir: Path,
                      sandbox_image: str) -> str:
    """containerd's config.toml: its own root, state and socket; the CRI plugin as this VM needs it."""
    disabled = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
                "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
                "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp",
                "io.containerd.internal.v1.tracing"]
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = {json.dumps(str(root))}
state = {json.dumps(str(state))}
disabled_plugins = {json.dumps(disabled)}

[grpc]
  address = {json.dumps(str(socket))}

[ttrpc]
  address = {json.dumps(str(socket) + ".ttrpc")}

[metrics]
  address = ""

[{cri}]
  sandbox_image = {json.dumps(sandbox_image)}
  # This VM refuses lowering oom_score_adj; without this every sandbox fails to start.
  restrict_oom_score_adj = true
  enable_selinux = false
  max_container_log_line_size = 16384

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  Root = {json.dumps(str(runc_root))}
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = {json.dumps(str(cni_dir))}
  max_conf_num = 1
"""


def kubelet_config(addresses: NodeAddresses, socket: Path, pod_logs: Path) -> dict[str, Any]:
    """KubeletConfiguration for this VM (cgroup v1 hybrid, no per-QoS cgroups, no swap check)."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": addresses.node_ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        # The API server calls the kubelet with the admin identity; the kubelet trusts its network.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "containerRuntimeEndpoint": f"unix://{socket}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "failSwapOn": False,
        # No eviction and no image garbage collection: the machine's disk is shared, not the node's.
        "evictionHard": {},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "podLogsDir": str(pod_logs),
        "serializeImagePulls": False,
        "shutdownGracePeriod": "0s",
        "maxPods": 110,
        # A pod's ConfigMap volumes are rewritten at its periodic sync: every 10 s here, not every
        # minute (the default), so a shared server reads a new subject's registry entry within
        # seconds; the e2e tests of shared serving otherwise wait a minute for each subject.
        "syncFrequency": "10s",
    }


def kube_proxy_config(addresses: NodeAddresses, kubeconfig: Path) -> dict[str, Any]:
    """KubeProxyConfiguration: iptables mode in the node's namespace; conntrack sysctls left alone
    (the global ones cannot be written from a network namespace)."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "mode": "iptables",
        "clusterCIDR": addresses.pod_cidr,
        "healthzBindAddress": f"{addresses.node_ip}:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


def corefile(kubeconfig: Path) -> str:
    """CoreDNS: Service and pod records of cluster.local from the API server; nothing forwarded
    (pods have no route beyond the test bed)."""
    return f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{
    errors
    health 127.0.0.1:8080
    ready :8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
    loadbalance
}}
"""


def dns_service(addresses: NodeAddresses) -> list[dict[str, Any]]:
    """kube-system/kube-dns at DNS_SERVICE_IP, its endpoint the node's CoreDNS (no selector:
    CoreDNS runs on the node, not in a pod)."""
    ports = [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system",
                      "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}},
         "spec": {"clusterIP": DNS_SERVICE_IP, "ports": [{**p, "targetPort": 53} for p in ports]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "kube-dns-real-0", "namespace": "kube-system",
                      "labels": {"kubernetes.io/service-name": "kube-dns",
                                 "endpointslice.kubernetes.io/managed-by": "testbed.dreambooth.dev"}},
         "addressType": "IPv4",
         "endpoints": [{"addresses": [addresses.node_ip], "conditions": {"ready": True}, "nodeName": NODE_NAME}],
         "ports": ports},
    ]


ADVERTISED_CPU = "32"  # the tests' pods fit side by side on a 2-core machine (CPU limits stay enforced)


def capacity_policy(cpu: str = ADVERTISED_CPU, gpus: int = 0) -> list[dict[str, Any]]:
    """A MutatingAdmissionPolicy on real-0's Node status: the scheduler (and the kubelet's own
    admission, which reads the Node) see `cpu` CPUs, and `gpus` nvidia.com/gpu for bookkeeping.
    CPU limits stay enforced (CFS quota); only how many pods fit is changed."""
    resources = {"cpu": cpu, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    quantities = ", ".join(f'"{key}": "{value}"' for key, value in resources.items())
    name = "testbed-real-node-capacity"
    return [
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicy",
         "metadata": {"name": name},
         "spec": {
             "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                                                     "operations": ["CREATE", "UPDATE"],
                                                     "resources": ["nodes", "nodes/status"]}]},
             "matchConditions": [{"name": "real-node", "expression": f"object.metadata.name == '{NODE_NAME}'"}],
             "failurePolicy": "Fail",
             "reinvocationPolicy": "Never",
             "mutations": [{"patchType": "ApplyConfiguration", "applyConfiguration": {
                 "expression": f"Object{{status: Object.status{{capacity: {{{quantities}}}, allocatable: {{{quantities}}}}}}}"}}],
         }},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicyBinding",
         "metadata": {"name": name}, "spec": {"policyName": name}},
    ]


# ------------------------------------------------------------------------------ locks and processes
def prefix_for(root: Path) -> int:
    """The test bed's preferred second address octet B (10.B.x.y), from its root; claim() takes
    the next free one if another test bed holds it."""
    return 100 + int(hashlib.sha1(str(root).encode()).hexdigest(), 16) % 100


def claim_lock(directory: Path, name: str, count: int, base: int = 0, first: int = 0) -> tuple[int, int]:
    """Take the first free flock among `<name>-<base + i>.lock`, from i = first: (base + i, fd).
    The caller hands the fd to the process that holds the claim."""
    directory.mkdir(parents=True, exist_ok=True)
    for offset in range(count):
        index = base + (first + offset) % count
        fd = os.open(directory / f"{name}-{index}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return index, fd
    raise RuntimeError(f"all {count} {name} locks in {directory} are held by running test beds")


def _run(*argv: str, check: bool = True, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _terminate(pid: int, grace: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class NodeState:
    """What `stop` needs, also from another process (saved in the test bed's state.json)."""
    prefix: int = 0
    slot: int = -1
    holder_pid: int = 0
    pids: dict[str, int] = field(default_factory=dict)


class RealNode:
    """real-0 of the test bed rooted at `root`: claim() its network and containerd slot (before the
    control plane: the host address comes from it), start_containerd() and start_components()
    against the API server; stop_components() and release() end everything it started."""

    def __init__(self, root: Path, cache: Path, env: dict[str, str], state: NodeState | None = None) -> None:
        self.root = root
        self.dir = root / NODE_NAME
        self.cache = cache
        self.env = env  # carries the test bed's marker: `down` finds whatever is left
        self.state = state or NodeState()

    # ------------------------------------------------------------------ layout
    @property
    def addresses(self) -> NodeAddresses:
        return NodeAddresses(self.state.prefix)

    @property
    def run_dir(self) -> Path:
        return RUN_DIR / f"real-{self.state.prefix}"

    @property
    def socket(self) -> Path:
        return self.run_dir / "containerd.sock"

    @property
    def runc_root(self) -> Path:
        return self.run_dir / "runc"

    @property
    def containerd_root(self) -> Path:
        return self.cache / "containerd" / f"slot-{self.state.slot}"

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig as the node uses it: the API server at the host's end of the link."""
        return self.dir / "kubeconfig"

    @property
    def pod_logs(self) -> Path:
        return self.dir / "pod-logs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def ctr(self, *args: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess:
        return _run("ctr", "--address", str(self.socket), "--namespace", CRI_NAMESPACE, *args,
                    check=check, timeout=timeout, input=input)

    def task_pid(self, container_id: str) -> int:
        """A container's init process as the host sees it (`ctr tasks ls`: TASK PID STATUS)."""
        for line in self.ctr("tasks", "ls").stdout.splitlines()[1:]:
            task, pid, *_ = line.split()
            if task == container_id:
                return int(pid)
        raise LookupError(f"no task {container_id} in real-0's containerd")

    def in_node(self, *argv: str) -> list[str]:
        """argv run inside the node's mount and network namespaces."""
        return ["nsenter", "--target", str(self.state.holder_pid), "--mount", "--net", "--", *argv]

    # ------------------------------------------------------------------ claim: network and slot
    def claim(self, first_prefix: int) -> NodeAddresses:
        """Claim a network prefix and a containerd slot, start the holder, link the node to the host."""
        # The lock files older checkouts' node agents take too: no two test beds share a prefix.
        prefix, prefix_fd = claim_lock(RUN_DIR, "prefix", 100, base=100, first=first_prefix - 100)
        slot, slot_fd = claim_lock(self.cache / "containerd", "slot", CONTAINERD_SLOTS)
        self.state.prefix, self.state.slot = prefix, slot
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        addresses = self.addresses
        _run("ip", "link", "del", addresses.host_link, check=False)  # a crashed run's, if its netns lingers
        self._remove_nat()
        mounts = "; ".join(f"mkdir -p {d} && mount -t tmpfs -o mode=0755 tmpfs {d}" for d in PRIVATE_DIRS)
        script = f"set -e; {mounts}; ip link set lo up; exec sleep infinity"
        try:
            holder = subprocess.Popen(["unshare", "--mount", "--net", "--propagation", "slave", "--", "sh", "-c", script],
                                      env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=open(self.logs / "real-0-holder.log", "ab"),
                                      pass_fds=(prefix_fd, slot_fd), start_new_session=True)
        finally:
            os.close(prefix_fd)  # the holder keeps both locks for the node's lifetime
            os.close(slot_fd)
        self.state.holder_pid = holder.pid
        self._wait_for_private_mounts()
        pid = str(holder.pid)
        host, node = addresses.host_link, self.in_node
        _run("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", pid)
        _run("ip", "addr", "add", f"{addresses.host_ip}/30", "dev", host)
        _run("ip", "link", "set", host, "up")
        _run(*node("ip", "addr", "add", f"{addresses.node_ip}/30", "dev", "eth0"))
        _run(*node("ip", "link", "set", "eth0", "up"))
        _run(*node("ip", "route", "add", "default", "via", addresses.host_ip))
        _run("ip", "route", "replace", addresses.pod_cidr, "via", addresses.node_ip, "dev", host)
        # The node routes for its pods; bridged replies to Service traffic pass iptables (kube-proxy).
        _run(*node("sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward && "
                               "echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables"))
        return addresses

    def _nat_comment(self) -> str:
        return f"dreambooth-testbed-{self.state.prefix}"

    def expose_api(self, admin_kubeconfig: Path) -> None:
        """The API server (on the host's loopback) at host_ip:<its port> for the node and its pods:
        a DNAT of what arrives on the link (route_localnet lets loopback answer there), and the
        node's kubeconfig pointing at it."""
        text = admin_kubeconfig.read_text()
        match = re.search(r"server:\s*https://127\.0\.0\.1:(\d+)", text)
        if not match:
            raise RuntimeError(f"no https://127.0.0.1:<port> server in {admin_kubeconfig}")
        port, addresses = match.group(1), self.addresses
        _run("sysctl", "-q", "-w", f"net.ipv4.conf.{addresses.host_link}.route_localnet=1")
        _run("iptables", "-t", "nat", "-A", "PREROUTING", "-i", addresses.host_link, "-d", addresses.host_ip,
             "-p", "tcp", "--dport", port, "-m", "comment", "--comment", self._nat_comment(),
             "-j", "DNAT", "--to-destination", f"127.0.0.1:{port}")
        self.kubeconfig.write_text(text.replace(match.group(0), f"server: https://{addresses.host_ip}:{port}"))
        self.kubeconfig.chmod(0o600)

    def _remove_nat(self) -> None:
        rules = _run("iptables", "-t", "nat", "-S", "PREROUTING", check=False).stdout.splitlines()
        for rule in rules:
            if f'"{self._nat_comment()}"' in rule or f" {self._nat_comment()} " in rule + " ":
                _run("iptables", "-t", "nat", *shlex.split(rule.replace("-A ", "-D ", 1)), check=False)

    def _wait_for_private_mounts(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(self.state.holder_pid):
                raise RuntimeError(f"the real-0 holder exited; see {self.logs / 'real-0-holder.log'}")
            try:
                cmdline = Path(f"/proc/{self.state.holder_pid}/cmdline").read_bytes()
                if cmdline.startswith(b"sleep"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError("the real-0 holder did not set up its namespaces in time")

    # ------------------------------------------------------------------ start
    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.logs / f"{name}.log", "ab")
        process = subprocess.Popen(self.in_node(*argv), env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.state.pids[name] = process.pid

    def start_containerd(self, binary: str = "containerd", sandbox_image: str = "") -> None:
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        cni_dir = self.dir / "cni"
        cni_dir.mkdir(parents=True, exist_ok=True)
        (cni_dir / "10-testbed.conflist").write_text(json.dumps(cni_config(self.addresses), indent=2))
        config = self.dir / "containerd.toml"
        config.write_text(containerd_config(self.containerd_root, self.run_dir / "state", self.socket,
                                            self.runc_root, cni_dir, sandbox_image))
        self._spawn("containerd", [binary, "--config", str(config)])
        self._wait("containerd", lambda: self.ctr("version", check=False, timeout=10).returncode == 0, 60)
        if self.ctr("containers", "ls", "-q").stdout.split():
            # A run that ended without `stop` left containers in this slot: remove them, then restart,
            # so the CRI plugin does not recover them.
            self.remove_containers()
            _terminate(self.state.pids.pop("containerd"), 20)
            self._spawn("containerd", [binary, "--config", str(config)])
            self._wait("containerd", lambda: self.ctr("version", check=False, timeout=10).returncode == 0, 60)

    def start_components(self, kubelet: Path, kube_proxy: Path, coredns: Path) -> None:
        """The kubelet, kube-proxy and CoreDNS (containerd and the pause image must be there)."""
        kubeconfig = self.kubeconfig
        kubelet_dir = self.dir / "kubelet"
        kubelet_dir.mkdir(parents=True, exist_ok=True)
        self.pod_logs.mkdir(parents=True, exist_ok=True)
        (self.dir / "kubelet.yaml").write_text(json.dumps(kubelet_config(self.addresses, self.socket, self.pod_logs), indent=2))
        (self.dir / "kube-proxy.yaml").write_text(json.dumps(kube_proxy_config(self.addresses, kubeconfig), indent=2))
        (self.dir / "Corefile").write_text(corefile(kubeconfig))
        labels = ",".join(f"{k}={v}" for k, v in NODE_LABELS.items())
        self._spawn("kubelet", [str(kubelet), "--config", str(self.dir / "kubelet.yaml"), "--kubeconfig", str(kubeconfig),
                                "--hostname-override", NODE_NAME, "--node-ip", self.addresses.node_ip,
                                "--root-dir", str(kubelet_dir), "--node-labels", labels])
        self._spawn("kube-proxy", [str(kube_proxy), "--config", str(self.dir / "kube-proxy.yaml")])
        self._spawn("coredns", [str(coredns), "-conf", str(self.dir / "Corefile")])

    def ready(self) -> str:
        """'' when CoreDNS and kube-proxy answer; else what is not ready yet (the Node is the API's to tell)."""
        for name, pid in self.state.pids.items():
            if not _alive(pid):
                raise RuntimeError(f"real-0's {name} exited; see {self.logs / (name + '.log')}")
        try:
            with urllib.request.urlopen(f"http://{self.addresses.node_ip}:8181/ready", timeout=2) as response:
                if response.status != 200:
                    return "CoreDNS not ready"
        except OSError as error:
            return f"CoreDNS not ready ({error})"
        try:
            with urllib.request.urlopen(f"http://{self.addresses.node_ip}:10256/healthz", timeout=2):
                pass
        except OSError as error:  # 503 until its first sync of Services
            return f"kube-proxy not healthy ({error})"
        return ""

    def _wait(self, what: str, predicate: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, pid in self.state.pids.items():
                if not _alive(pid):
                    raise RuntimeError(f"real-0's {name} exited; see {self.logs / (name + '.log')}")
            if predicate():
                return
            time.sleep(0.2)
        raise TimeoutError(f"real-0's {what} not up in {timeout} s; see {self.logs}")

    # ------------------------------------------------------------------ stop
    def remove_containers(self) -> None:
        """Every container and sandbox of the node, killed and removed from containerd and runc."""
        runc_ns = self.runc_root / CRI_NAMESPACE
        if runc_ns.exists():
            listing = _run("runc", "--root", str(runc_ns), "list", "-q", check=False).stdout.split()
            for container in listing:
                _run("runc", "--root", str(runc_ns), "delete", "--force", container, check=False)
        if self.socket.exists():
            for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
                self.ctr("tasks", "delete", "--force", container, check=False)
                self.ctr("containers", "delete", container, check=False)

    def stop_components(self) -> None:
        """The kubelet first (it would restart what is killed), then the pods, then containerd."""
        for name in ("kubelet", "kube-proxy", "coredns"):
            pid = self.state.pids.pop(name, 0)
            if pid:
                _terminate(pid, 10)
        containerd = self.state.pids.pop("containerd", 0)
        if containerd and _alive(containerd):
            self.remove_containers()  # recorded removed in the slot: the next start recovers nothing
            _terminate(containerd, 20)
        elif self.state.prefix:
            self.remove_containers()

    def release(self) -> None:
        """The node's namespaces (with the holder), its link and route, its run folder, its locks."""
        if self.state.holder_pid:
            _terminate(self.state.holder_pid, 5)
            self.state.holder_pid = 0
        if self.state.prefix:
            self._remove_nat()
            _run("ip", "route", "del", self.addresses.pod_cidr, check=False)
            _run("ip", "link", "del", self.addresses.host_link, check=False)
            shutil.rmtree(self.run_dir, ignore_errors=True)
        # The pods' volumes (emptyDirs can be large); unmounted with the namespace. Logs stay.
        shutil.rmtree(self.dir / "kubelet", ignore_errors=True)

    def to_json(self) -> dict[str, Any]:
        return asdict(self.state)
