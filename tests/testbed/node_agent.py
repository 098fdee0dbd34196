"""Node agent for `local-0`: a tiny kubelet for the test bed.

It registers the Node and keeps it Ready (status heartbeats and a node Lease), and runs every
pod bound to it as local processes:

* each container's command/args run in the project's venv (its bin first on PATH) with the
  pod's environment (literal values with $(VAR) expansion, envFrom, secretKeyRef,
  configMapKeyRef, fieldRef incl. the Job completion-index annotation, KUBERNETES_SERVICE_*);
* ConfigMap/Secret/emptyDir/projected/downwardAPI/hostPath volumes are materialised under the
  pod's directory and bind-mounted at their mountPath inside a private mount (and UTS)
  namespace (`unshare`, see pod_exec.py), so product code sees the real paths;
* every pod gets its own loopback address (127.B.x.y) as pod IP and a hosts file (per
  namespace) bind-mounted over /etc/hosts mapping pod DNS names
  (<hostname>.<subdomain>.<ns>.svc.cluster.local and short forms) and Service names to
  pod addresses;
* it reports phase, conditions, container statuses, exit codes and pod IP; honours
  restartPolicy, readiness probes (httpGet/tcpSocket/exec/grpc-as-tcp) and deletion
  (SIGTERM, SIGKILL after the grace period); logs go to <root>/logs/<ns>_<pod>_<container>.log.

Run by tests/testbed/cluster.py: python -m tests.testbed.node_agent --kubeconfig K --root R
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import datetime as dt
import http.server
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from tests.testbed.podnet import Network, acquire_prefix, write_info

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
POD_EXEC = Path(__file__).with_name("pod_exec.py")
MARKER = "DREAMBOOTH_TESTBED_ROOT"
HOST_IP = "127.0.0.1"
TICK = 0.2
# How often mounted ConfigMaps follow their ConfigMap (a kubelet takes up to about a minute).
CONFIG_MAP_SYNC_S = 2.0
log = logging.getLogger("node-agent")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ConfigError(Exception):
    """A referenced ConfigMap/Secret/key is missing: the container cannot be configured yet."""


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: $(VAR) -> value if defined, $$ -> $."""
    def repl(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", repl, value)


# --------------------------------------------------------------------------------------
class Container:
    """One container of a pod: a process, its restarts and its last state."""

    def __init__(self, spec: dict, init: bool) -> None:
        self.spec = spec
        self.name = spec["name"]
        self.init = init
        self.proc: subprocess.Popen | None = None
        self.started_at: str | None = None
        self.restart_count = 0
        self.terminated: dict | None = None      # state.terminated of the current run
        self.last_terminated: dict | None = None  # lastState.terminated
        self.waiting_reason: str | None = "ContainerCreating"
        self.waiting_message: str | None = None
        self.next_start = 0.0
        self.ready = False
        self.probe_ok_count = 0
        self.probe_fail_count = 0
        self.next_probe = 0.0
        self.probe_future: concurrent.futures.Future | None = None
        self.container_id = ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.terminated is None


class PodRun:
    """Everything the agent does for one pod (by uid)."""

    def __init__(self, agent: "Agent", pod: dict, ip: str) -> None:
        self.agent = agent
        self.pod = pod
        self.uid = pod["metadata"]["uid"]
        self.ns = pod["metadata"]["namespace"]
        self.name = pod["metadata"]["name"]
        self.ip = ip
        self.dir = agent.root / "pods" / self.uid
        self.start_time = now()
        spec = pod["spec"]
        self.init_containers = [Container(c, True) for c in spec.get("initContainers") or []]
        self.containers = [Container(c, False) for c in spec.get("containers") or []]
        self.prepared = False
        self.net_ready = False
        self.prepare_error: str | None = None
        self.phase = "Pending"
        self.terminating_since: float | None = None
        self.kill_deadline: float | None = None
        self.deleted = False
        self.last_status: dict | None = None
        self.transitions: dict[str, tuple[str, str]] = {}
        self.env_cache: dict[str, dict[str, str]] = {}
        self.mounts_cache: dict[str, list[dict]] = {}
        self.volumes_synced = 0.0

    # ---------------------------------------------------------------- identity
    @property
    def hostname(self) -> str:
        return (self.pod["spec"].get("hostname") or self.name)[:63]

    @property
    def subdomain(self) -> str | None:
        return self.pod["spec"].get("subdomain")

    @property
    def host_network(self) -> bool:
        return bool(self.pod["spec"].get("hostNetwork"))

    def wrap_net(self, argv: list[str]) -> list[str]:
        return self.agent.net.wrap(self.uid, argv) if self.net_ready else argv

    @property
    def restart_policy(self) -> str:
        return self.pod["spec"].get("restartPolicy") or "Always"

    @property
    def terminal(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    def all_processes(self) -> list[subprocess.Popen]:
        return [c.proc for c in self.init_containers + self.containers if c.proc and c.proc.poll() is None]

    # ---------------------------------------------------------------- field refs
    def field(self, path: str) -> str:
        md = self.pod["metadata"]
        simple = {
            "metadata.name": md["name"], "metadata.namespace": md["namespace"], "metadata.uid": md["uid"],
            "spec.nodeName": self.pod["spec"].get("nodeName", ""),
            "spec.serviceAccountName": self.pod["spec"].get("serviceAccountName", ""),
            "status.podIP": self.ip, "status.podIPs": self.ip,
            "status.hostIP": HOST_IP, "status.hostIPs": HOST_IP,
        }
        if path in simple:
            return simple[path]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (md.get(m.group(1)) or {}).get(m.group(2), "")
        if path in ("metadata.labels", "metadata.annotations"):
            items = md.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
        raise ConfigError(f"unsupported fieldRef {path}")

    def resource_field(self, container: dict, ref: dict) -> str:
        res = container.get("resources") or {}
        kind, _, name = ref["resource"].partition(".")
        value = (res.get(kind) or {}).get(name)
        if value is None:
            value = {"cpu": "32", "memory": str(64 * 2**30)}.get(name, "0")
        return str(value)

    # ---------------------------------------------------------------- env
    def build_env(self, container: dict) -> dict[str, str]:
        agent = self.agent
        env: dict[str, str] = {
            "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOSTNAME": self.hostname,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "KUBERNETES_SERVICE_HOST": agent.api_host,
            "KUBERNETES_SERVICE_PORT": str(agent.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(agent.api_port),
            "KUBERNETES_PORT": f"tcp://{agent.api_host}:{agent.api_port}",
            MARKER: str(agent.root),
        }
        for src in container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                ref = src["configMapRef"]
                data = agent.get_configmap(self.ns, ref["name"], ref.get("optional", False))
            else:
                ref = src["secretRef"]
                data = agent.get_secret(self.ns, ref["name"], ref.get("optional", False))
            for k, v in (data or {}).items():
                env[prefix + k] = v
        for item in container.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = expand(item.get("value", "") or "", env)
                continue
            vf = item["valueFrom"]
            if "fieldRef" in vf:
                env[name] = self.field(vf["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in vf or "configMapKeyRef" in vf:
                is_secret = "secretKeyRef" in vf
                ref = vf["secretKeyRef"] if is_secret else vf["configMapKeyRef"]
                optional = ref.get("optional", False)
                getter = agent.get_secret if is_secret else agent.get_configmap
                data = getter(self.ns, ref["name"], optional)
                if data is None or ref["key"] not in data:
                    if optional:
                        continue
                    kind = "secret" if is_secret else "configmap"
                    raise ConfigError(f'couldn\'t find key {ref["key"]} in {kind} {self.ns}/{ref["name"]}')
                env[name] = data[ref["key"]]
            elif "resourceFieldRef" in vf:
                env[name] = self.resource_field(container, vf["resourceFieldRef"])
        return env

    # ---------------------------------------------------------------- volumes
    def _write_items(self, target: Path, data: dict[str, bytes], items: list | None, mode: int | None,
                     optional: bool, what: str) -> None:
        target.mkdir(parents=True, exist_ok=True)
        if items:
            pairs = []
            for it in items:
                if it["key"] not in data:
                    if optional:
                        continue
                    raise ConfigError(f"key {it['key']} not found in {what}")
                pairs.append((it["path"], data[it["key"]], it.get("mode")))
        else:
            pairs = [(k, v, None) for k, v in data.items()]
        for rel, value, item_mode in pairs:
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() and path.read_bytes() == value:
                continue
            # Replaced whole (a reader never sees half a file), as the kubelet's atomic writer does.
            staging = path.with_name(f".{path.name}.new")
            staging.write_bytes(value)
            staging.chmod(item_mode if item_mode is not None else (mode if mode is not None else 0o644))
            staging.replace(path)

    def _configmap_bytes(self, name: str, optional: bool) -> dict[str, bytes] | None:
        cm = self.agent.get_configmap_raw(self.ns, name, optional)
        if cm is None:
            return None
        data = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
        return data

    def _secret_bytes(self, name: str, optional: bool) -> dict[str, bytes] | None:
        sec = self.agent.get_secret_raw(self.ns, name, optional)
        if sec is None:
            return None
        return {k: base64.b64decode(v) for k, v in (sec.get("data") or {}).items()}

    def prepare_volumes(self) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for vol in self.pod["spec"].get("volumes") or []:
            name = vol["name"]
            target = self.dir / "volumes" / name
            paths[name] = target
            if "emptyDir" in vol:
                target.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in vol:
                hp = vol["hostPath"]
                if hp.get("type") in ("DirectoryOrCreate",) or not Path(hp["path"]).exists():
                    Path(hp["path"]).mkdir(parents=True, exist_ok=True)
                paths[name] = Path(hp["path"])
            elif "configMap" in vol:
                src = vol["configMap"]
                data = self._configmap_bytes(src["name"], src.get("optional", False))
                if data is None:
                    data = {}
                self._write_items(target, data, src.get("items"), src.get("defaultMode"),
                                  src.get("optional", False), f"configmap {src['name']}")
            elif "secret" in vol:
                src = vol["secret"]
                data = self._secret_bytes(src["secretName"], src.get("optional", False))
                if data is None:
                    data = {}
                self._write_items(target, data, src.get("items"), src.get("defaultMode"),
                                  src.get("optional", False), f"secret {src['secretName']}")
            elif "downwardAPI" in vol:
                self._downward(target, vol["downwardAPI"].get("items") or [], vol["downwardAPI"].get("defaultMode"))
            elif "projected" in vol:
                proj = vol["projected"]
                mode = proj.get("defaultMode")
                target.mkdir(parents=True, exist_ok=True)
                for source in proj.get("sources") or []:
                    if "serviceAccountToken" in source:
                        sat = source["serviceAccountToken"]
                        token = self.agent.request_token(self, sat.get("audience"), sat.get("expirationSeconds", 3600))
                        path = target / sat["path"]
                        path.write_text(token)
                        path.chmod(mode if mode is not None else 0o644)
                    elif "configMap" in source:
                        src = source["configMap"]
                        data = self._configmap_bytes(src["name"], src.get("optional", False)) or {}
                        self._write_items(target, data, src.get("items"), mode, src.get("optional", False),
                                          f"configmap {src['name']}")
                    elif "secret" in source:
                        src = source["secret"]
                        data = self._secret_bytes(src["name"], src.get("optional", False)) or {}
                        self._write_items(target, data, src.get("items"), mode, src.get("optional", False),
                                          f"secret {src['name']}")
                    elif "downwardAPI" in source:
                        self._downward(target, source["downwardAPI"].get("items") or [], mode)
            else:
                raise ConfigError(f"volume {name}: only configMap, secret, emptyDir, projected, downwardAPI "
                                  "and hostPath volumes are supported on local-0")
        return paths

    def sync_config_map_volumes(self) -> None:
        """Rewrite configMap volumes whose ConfigMap changed, as the kubelet does for running pods
        (a subPath mount keeps the file it started with: the replaced file is a new inode)."""
        if time.monotonic() - self.volumes_synced < CONFIG_MAP_SYNC_S:
            return
        self.volumes_synced = time.monotonic()
        for vol in self.pod["spec"].get("volumes") or []:
            if "configMap" not in vol:
                continue
            src = vol["configMap"]
            data = self._configmap_bytes(src["name"], True)
            if data is not None:
                try:
                    self._write_items(self.dir / "volumes" / vol["name"], data, src.get("items"), src.get("defaultMode"),
                                      True, f"configmap {src['name']}")
                except (ConfigError, OSError) as e:
                    log.info("pod %s/%s: volume %s not refreshed: %s", self.ns, self.name, vol["name"], e)

    def _downward(self, target: Path, items: list, mode: int | None) -> None:
        target.mkdir(parents=True, exist_ok=True)
        for it in items:
            if "fieldRef" in it:
                value = self.field(it["fieldRef"]["fieldPath"])
            else:
                value = self.resource_field(self.containers[0].spec, it["resourceFieldRef"])
            path = target / it["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(value)
            path.chmod(it.get("mode") or mode or 0o644)

    def mounts_for(self, container: dict, volumes: dict[str, Path]) -> list[dict]:
        kinds = {v["name"]: v for v in self.pod["spec"].get("volumes") or []}
        mounts = []
        for vm in container.get("volumeMounts") or []:
            if vm["name"] not in volumes:
                raise ConfigError(f"volumeMount {vm['name']}: no such volume")
            source = volumes[vm["name"]]
            if vm.get("subPath"):
                source = source / vm["subPath"]
                if not source.exists() and "emptyDir" in kinds.get(vm["name"], {}):
                    source.mkdir(parents=True, exist_ok=True)
            vol = kinds.get(vm["name"], {})
            read_only = bool(vm.get("readOnly")) or any(k in vol for k in ("configMap", "secret", "projected", "downwardAPI"))
            mounts.append({"source": str(source), "target": vm["mountPath"], "readOnly": read_only})
        return mounts

    # ---------------------------------------------------------------- lifecycle
    def prepare(self) -> bool:
        """Materialise volumes and env for all containers; False (and a waiting reason) if not yet possible."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            volumes = self.prepare_volumes()
            for c in self.init_containers + self.containers:
                self.env_cache[c.name] = self.build_env(c.spec)
                self.mounts_cache[c.name] = self.mounts_for(c.spec, volumes)
            if not self.net_ready and not self.host_network:
                self.agent.net.create(self.uid, self.ip)
                self.net_ready = True
        except (ConfigError, OSError) as e:
            if self.prepare_error != str(e):
                log.info("pod %s/%s: %s", self.ns, self.name, e)
            self.prepare_error = str(e)
            for c in self.init_containers + self.containers:
                c.waiting_reason, c.waiting_message = "CreateContainerConfigError", str(e)
            return False
        self.prepare_error = None
        self.prepared = True
        (self.dir / "hostname").write_text(self.hostname + "\n")
        return True

    def start_container(self, c: Container) -> None:
        spec = c.spec
        env = self.env_cache[c.name]
        argv = [expand(a, env) for a in (spec.get("command") or []) + (spec.get("args") or [])]
        if not spec.get("command"):
            # No image entrypoints here: args alone are run as the command.
            argv = [expand(a, env) for a in spec.get("args") or []]
        run_spec = {
            "argv": argv, "env": env, "cwd": spec.get("workingDir"),
            "hostname": self.hostname, "hostnameFile": str(self.dir / "hostname"),
            "hosts": str(self.agent.hosts_file(self.ns)),
            "mounts": self.mounts_cache[c.name],
        }
        # This pod's names must resolve before its first process starts.
        self.agent.write_hosts(self.ns, self.agent.render_hosts(self.ns))
        spec_path = self.dir / f"{c.name}.json"
        spec_path.write_text(json.dumps(run_spec))
        spec_path.chmod(0o600)
        log_path = self.agent.logs / f"{self.ns}_{self.name}_{c.name}.log"
        with open(log_path, "ab") as out:
            out.write(f"--- {now()} start {c.name} (restart {c.restart_count}): {argv}\n".encode())
            out.flush()
            c.proc = subprocess.Popen(
                self.wrap_net([
                    "unshare", "--mount", "--uts", "--propagation", "private", "--",
                    sys.executable, "-I", str(POD_EXEC), str(spec_path)]),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=str(self.dir),
                env={"PATH": os.environ.get("PATH", os.defpath), MARKER: str(self.agent.root)},
            )
        c.container_id = f"local://{self.uid[:8]}-{c.name}-{c.restart_count}-{c.proc.pid}"
        c.started_at = now()
        c.terminated = None
        c.waiting_reason = c.waiting_message = None
        c.ready = False
        c.probe_ok_count = c.probe_fail_count = 0
        probe = spec.get("readinessProbe") or {}
        c.next_probe = time.monotonic() + float(probe.get("initialDelaySeconds", 0))
        log.info("pod %s/%s: started %s pid %d: %s", self.ns, self.name, c.name, c.proc.pid, argv)

    def reap(self, c: Container) -> bool:
        """Record the exit of c's process; True if it just exited."""
        if c.proc is None or c.terminated is not None:
            return False
        rc = c.proc.poll()
        if rc is None:
            return False
        code = rc if rc >= 0 else 128 - rc
        try:  # as when a container's PID 1 exits: whatever it left behind goes too
            os.killpg(c.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        reason = "Completed" if code == 0 else "Error"
        c.terminated = {"exitCode": code, "reason": reason, "startedAt": c.started_at,
                        "finishedAt": now(), "containerID": c.container_id}
        if rc < 0:
            c.terminated["signal"] = -rc
        c.ready = False
        log.info("pod %s/%s: %s exited with %d", self.ns, self.name, c.name, code)
        with open(self.agent.logs / f"{self.ns}_{self.name}_{c.name}.log", "ab") as out:
            out.write(f"--- {now()} exit {code}\n".encode())
        return True

    def should_restart(self, c: Container) -> bool:
        code = c.terminated["exitCode"] if c.terminated else 0
        if c.init:
            return code != 0 and self.restart_policy != "Never"
        return self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and code != 0)

    def schedule_restart(self, c: Container) -> None:
        c.last_terminated = c.terminated
        c.restart_count += 1
        c.next_start = time.monotonic() + min(10.0, 0.5 * 2 ** min(c.restart_count, 5))
        c.proc = None
        c.terminated = None
        c.waiting_reason = "CrashLoopBackOff" if c.restart_count > 1 else None

    def step(self) -> None:
        """Advance the pod one tick: start, reap, restart, probe, decide the phase."""
        if self.terminal or self.terminating_since is not None:
            for c in self.init_containers + self.containers:
                self.reap(c)
            return
        if not self.prepared and not self.prepare():
            return
        # init containers, one after another
        for c in self.init_containers:
            if c.terminated and c.terminated["exitCode"] == 0:
                continue
            if c.proc is None:
                if time.monotonic() >= c.next_start:
                    self.start_container(c)
                return
            if self.reap(c) or c.terminated:
                if c.terminated["exitCode"] == 0:
                    continue
                if self.should_restart(c):
                    self.schedule_restart(c)
                else:
                    self.phase = "Failed"
                return
            return
        self.phase = "Running" if self.phase == "Pending" else self.phase
        for c in self.containers:
            if c.proc is None and c.terminated is None:
                if time.monotonic() >= c.next_start:
                    self.start_container(c)
                continue
            if self.reap(c) or c.terminated:
                if self.should_restart(c) and c.terminated is not None:
                    self.schedule_restart(c)
        self.sync_config_map_volumes()
        self.probe_all()
        if all(c.terminated is not None for c in self.containers):
            ok = all(c.terminated["exitCode"] == 0 for c in self.containers)
            self.phase = "Succeeded" if ok else "Failed"

    # ---------------------------------------------------------------- probes
    def probe_all(self) -> None:
        for c in self.containers:
            probe = c.spec.get("readinessProbe")
            if not c.running:
                continue
            if not probe:
                c.ready = True
                continue
            fut = c.probe_future
            if fut is not None:
                if not fut.done():
                    continue
                c.probe_future = None
                ok = fut.result()
                if ok:
                    c.probe_ok_count += 1
                    c.probe_fail_count = 0
                    if c.probe_ok_count >= int(probe.get("successThreshold", 1)):
                        c.ready = True
                else:
                    c.probe_fail_count += 1
                    c.probe_ok_count = 0
                    if c.probe_fail_count >= int(probe.get("failureThreshold", 3)):
                        c.ready = False
                period = float(probe.get("periodSeconds", 10))
                # Until the first success probe often, so Ready comes promptly; then at its period.
                c.next_probe = time.monotonic() + (period if c.ready else min(period, 1.0))
                continue
            if time.monotonic() >= c.next_probe:
                c.probe_future = self.agent.probes.submit(self.run_probe, c, probe)

    def _port(self, c: Container, port: Any) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"no port named {port}")

    def run_probe(self, c: Container, probe: dict) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in probe:
                hg = probe["httpGet"]
                scheme = (hg.get("scheme") or "HTTP").lower()
                host = hg.get("host") or self.ip
                url = f"{scheme}://{host}:{self._port(c, hg['port'])}{hg.get('path') or '/'}"
                req = urllib.request.Request(url, headers={h["name"]: h["value"] for h in hg.get("httpHeaders") or []})
                ctx = ssl._create_unverified_context() if scheme == "https" else None
                try:
                    with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
                        return 200 <= resp.status < 400
                except urllib.error.HTTPError as e:
                    return 200 <= e.code < 400
            if "tcpSocket" in probe or "grpc" in probe:
                ts = probe.get("tcpSocket") or probe["grpc"]
                host = ts.get("host") or self.ip
                with socket.create_connection((host, self._port(c, ts["port"])), timeout=timeout):
                    return True
            if "exec" in probe:
                if c.proc is None:
                    return False
                spaces = ["-m", "-u", "-n"] if self.net_ready else ["-m", "-u"]
                argv = ["nsenter", "-t", str(c.proc.pid), *spaces, "--", *probe["exec"]["command"]]
                result = subprocess.run(argv, env=self.env_cache[c.name], cwd=str(self.dir),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        timeout=max(timeout, 1.0))
                return result.returncode == 0
        except Exception:  # noqa: BLE001 - any failure is a failed probe
            return False
        return False

    # ---------------------------------------------------------------- termination
    def begin_termination(self, grace: float) -> None:
        if self.terminating_since is not None:
            return
        self.terminating_since = time.monotonic()
        self.kill_deadline = self.terminating_since + grace
        for p in self.all_processes():
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        log.info("pod %s/%s: SIGTERM sent, grace %.0f s", self.ns, self.name, grace)

    def termination_done(self) -> bool:
        """True when no process of the pod is left (SIGKILL after the grace period)."""
        for c in self.init_containers + self.containers:
            self.reap(c)
        procs = self.all_processes()
        if procs and self.kill_deadline is not None and time.monotonic() >= self.kill_deadline:
            self.kill_all()
            procs = self.all_processes()
        if not procs:
            # the session (children too) goes with the main process
            for c in self.init_containers + self.containers:
                if c.proc is not None:
                    try:
                        os.killpg(c.proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
        return not procs

    def kill_all(self) -> None:
        for c in self.init_containers + self.containers:
            if c.proc is None:
                continue
            try:
                os.killpg(c.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                c.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            self.reap(c)

    # ---------------------------------------------------------------- status
    def _cstatus(self, c: Container) -> dict:
        status: dict[str, Any] = {
            "name": c.name, "image": c.spec.get("image", ""), "imageID": "",
            "ready": bool(c.ready and c.running), "restartCount": c.restart_count,
            "started": c.running,
        }
        if c.container_id:
            status["containerID"] = c.container_id
        if c.terminated is not None:
            status["state"] = {"terminated": c.terminated}
        elif c.running:
            status["state"] = {"running": {"startedAt": c.started_at}}
        else:
            waiting = {"reason": c.waiting_reason or "ContainerCreating"}
            if c.waiting_message:
                waiting["message"] = c.waiting_message
            status["state"] = {"waiting": waiting}
        if c.last_terminated is not None:
            status["lastState"] = {"terminated": c.last_terminated}
        return status

    def _cond(self, ctype: str, ok: bool, reason: str | None = None) -> dict:
        value = "True" if ok else "False"
        prev = self.transitions.get(ctype)
        if prev is None or prev[0] != value:
            self.transitions[ctype] = (value, now())
        cond = {"type": ctype, "status": value, "lastProbeTime": None,
                "lastTransitionTime": self.transitions[ctype][1]}
        if reason and not ok:
            cond["reason"] = reason
        return cond

    def status(self) -> dict:
        inits_done = all(c.terminated and c.terminated["exitCode"] == 0 for c in self.init_containers)
        ready = (self.phase == "Running" and self.terminating_since is None
                 and all(c.ready and c.running for c in self.containers))
        terminal_reason = "PodCompleted" if self.terminal else "ContainersNotReady"
        return {
            "phase": self.phase,
            "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}],
            "podIP": self.ip, "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "conditions": [
                self._cond("PodReadyToStartContainers", self.prepared),
                self._cond("Initialized", inits_done, "ContainersNotInitialized"),
                self._cond("Ready", ready, terminal_reason),
                self._cond("ContainersReady", ready, terminal_reason),
                self._cond("PodScheduled", True),
            ],
            "initContainerStatuses": [self._cstatus(c) for c in self.init_containers],
            "containerStatuses": [self._cstatus(c) for c in self.containers],
        }


# --------------------------------------------------------------------------------------
MARK_LINE = re.compile(rb"^--- \d{4}-\d\d-\d\dT[0-9:]+Z (start|exit) ")


class KubeletHandler(http.server.BaseHTTPRequestHandler):
    """The part of the kubelet API the apiserver proxies for `kubectl logs` (containerLogs)."""

    agent: "Agent"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if parts == ["healthz"]:
            self._reply(200, b"ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._reply(501, b"local-0 serves only containerLogs (no exec, attach or port-forward)")
            return
        _, ns, pod, container = parts
        query = urllib.parse.parse_qs(url.query)
        path = self.agent.logs / f"{ns}_{pod}_{container}.log"
        if not path.exists():
            self._reply(404, f"no log for {ns}/{pod}/{container} on local-0".encode())
            return
        follow = query.get("follow", ["false"])[0] == "true"
        tail = int(query.get("tailLines", ["-1"])[0])
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        with open(path, "rb") as f:
            lines = [ln for ln in f.readlines() if not MARK_LINE.match(ln)]
            if tail >= 0:
                lines = lines[-tail:] if tail else []
            self.wfile.write(b"".join(lines))
            self.wfile.flush()
            while follow and self.agent.container_running(ns, pod, container):
                chunk = f.readline()
                if not chunk:
                    time.sleep(0.2)
                    continue
                if not MARK_LINE.match(chunk):
                    self.wfile.write(chunk)
                    self.wfile.flush()
            for chunk in f.readlines() if follow else []:
                if not MARK_LINE.match(chunk):
                    self.wfile.write(chunk)

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Agent:
    def __init__(self, kubeconfig: str, root: Path, node: str, tls_cert: str | None = None,
                 tls_key: str | None = None, gpus: int = 0, network: str = "netns",
                 forward_ports: list[int] | None = None) -> None:
        self.root = root
        self.gpus = gpus
        self.kubelet_port = 0
        self.tls = (tls_cert, tls_key) if tls_cert and tls_key else None
        self.node = node
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        (root / "hosts").mkdir(parents=True, exist_ok=True)
        self.api_client = config.new_client_from_config(config_file=kubeconfig)
        self.v1 = client.CoreV1Api(self.api_client)
        url = self.api_client.configuration.host  # https://127.0.0.1:PORT
        hostport = url.split("://", 1)[1].rstrip("/")
        self.api_host, port = hostport.rsplit(":", 1)
        self.api_port = int(port)
        if self.api_host in ("localhost", "0.0.0.0"):
            self.api_host = HOST_IP
        self.runs: dict[str, PodRun] = {}
        self.probes = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe")
        # Each test bed gets its own 127.B.0.0/16 for pod addresses.
        self.ip_prefix, self._prefix_lock = acquire_prefix(root)
        self.net = Network(network, self.ip_prefix, [self.api_port, *(forward_ports or [])])
        self.free_ips: list[str] = []
        self.next_ip = 0
        self.stopping = False
        self.hosts_content: dict[str, str] = {}
        self.last_services = 0.0
        self.services: list[dict] = []
        self.cache: dict[tuple, tuple[float, Any]] = {}

    # ---------------------------------------------------------------- api helpers
    def raw(self, method: str, path: str, body: Any = None, query: list | None = None,
            content_type: str = "application/json") -> Any:
        """One API request, JSON in and out; ApiException on a non-2xx answer."""
        m, url, headers, data, post = self.api_client.param_serialize(
            method, path, query_params=query or [], body=body,
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        resp = self.api_client.call_api(m, url, header_params=headers, body=data, post_params=post,
                                        _request_timeout=30)
        payload = resp.read()
        if not 200 <= resp.status < 300:
            raise ApiException(status=resp.status, reason=resp.reason,
                               body=payload.decode("utf-8", "replace") if payload else None)
        return json.loads(payload) if payload else None

    def _get_cached(self, kind: str, ns: str, name: str, optional: bool) -> dict | None:
        key = (kind, ns, name)
        hit = self.cache.get(key)
        if hit and time.monotonic() - hit[0] < 0.5:
            return hit[1]
        try:
            obj = self.raw("GET", f"/api/v1/namespaces/{ns}/{kind}/{name}")
        except ApiException as e:
            if e.status != 404:
                raise
            obj = None
        self.cache[key] = (time.monotonic(), obj)
        if obj is None and not optional:
            raise ConfigError(f"{kind[:-1]} {ns}/{name} not found")
        return obj

    def get_configmap_raw(self, ns: str, name: str, optional: bool) -> dict | None:
        return self._get_cached("configmaps", ns, name, optional)

    def get_secret_raw(self, ns: str, name: str, optional: bool) -> dict | None:
        return self._get_cached("secrets", ns, name, optional)

    def get_configmap(self, ns: str, name: str, optional: bool) -> dict[str, str] | None:
        cm = self.get_configmap_raw(ns, name, optional)
        return None if cm is None else dict(cm.get("data") or {})

    def get_secret(self, ns: str, name: str, optional: bool) -> dict[str, str] | None:
        sec = self.get_secret_raw(ns, name, optional)
        if sec is None:
            return None
        return {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (sec.get("data") or {}).items()}

    def request_token(self, run: PodRun, audience: str | None, expiration: int) -> str:
        sa = run.pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": int(expiration),
                         "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": run.name, "uid": run.uid}}}
        if audience:
            body["spec"]["audiences"] = [audience]
        try:
            result = self.raw("POST", f"/api/v1/namespaces/{run.ns}/serviceaccounts/{sa}/token", body)
        except ApiException as e:
            raise ConfigError(f"token for serviceaccount {run.ns}/{sa}: {e.status} {e.reason}") from e
        return result["status"]["token"]

    # ---------------------------------------------------------------- node
    def register_node(self) -> None:
        from tests.testbed.minio_server import pinned_versions

        version = pinned_versions().get("KUBERNETES_VERSION", "v0.0.0")
        node = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.node, "labels": {
                "kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "dreambooth.dev/pool": "local",
                "node.kubernetes.io/instance-type": "local-process",
                "testbed.dreambooth.dev/pod-network": self.net.mode}},
            "spec": {},
        }
        try:
            self.raw("POST", "/api/v1/nodes", node)
        except ApiException as e:
            if e.status != 409:
                raise
        capacity = {"cpu": "32", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}
        if self.gpus:  # bookkeeping only: pods asking for them still run on the CPU
            capacity["nvidia.com/gpu"] = str(self.gpus)
        self.raw("PATCH", f"/api/v1/nodes/{self.node}/status", {"status": {
            "capacity": capacity, "allocatable": capacity,
            # No Hostname address: the apiserver would dial "local-0" for logs.
            "addresses": [{"type": "InternalIP", "address": HOST_IP}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "osImage": "local processes",
                         "kernelVersion": os.uname().release, "kubeletVersion": version,
                         "kubeProxyVersion": version, "containerRuntimeVersion": "local-process://1",
                         "machineID": "", "systemUUID": "", "bootID": ""},
        }}, content_type="application/merge-patch+json")
        self.heartbeat()

    def heartbeat(self) -> None:
        t = now()
        conds = [
            {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
            {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure"},
            {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID"},
            {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "local-0 node agent is posting ready status"},
        ]
        for c in conds:
            c["lastHeartbeatTime"] = t
            c.setdefault("lastTransitionTime", self.started_at)
        self.raw("PATCH", f"/api/v1/nodes/{self.node}/status", {"status": {"conditions": conds}},
                 content_type="application/strategic-merge-patch+json")
        lease_path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}"
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": self.node, "namespace": "kube-node-lease"},
                 "spec": {"holderIdentity": self.node, "leaseDurationSeconds": 40, "renewTime": now_micro()}}
        try:
            self.raw("PATCH", lease_path, {"spec": lease["spec"]}, content_type="application/merge-patch+json")
        except ApiException as e:
            if e.status != 404:
                raise
            self.raw("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease)

    def heartbeat_loop(self) -> None:
        while not self.stopping:
            try:
                self.heartbeat()
            except Exception:  # noqa: BLE001
                log.exception("heartbeat failed")
            for _ in range(50):
                if self.stopping:
                    return
                time.sleep(0.1)

    # ---------------------------------------------------------------- addresses and names
    def alloc_ip(self) -> str:
        if self.free_ips:
            return self.free_ips.pop(0)
        self.next_ip += 1
        return self.net.address(self.next_ip)

    def hosts_file(self, ns: str) -> Path:
        path = self.root / "hosts" / ns
        if not path.exists():
            self.write_hosts(ns, self.render_hosts(ns))
        return path

    def render_hosts(self, ns: str) -> str:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                 f"{HOST_IP}\tkubernetes kubernetes.default kubernetes.default.svc kubernetes.default.svc.cluster.local"]
        live = [r for r in self.runs.values() if not r.terminal and r.terminating_since is None]
        short_count: dict[str, int] = {}
        for r in live:
            if r.ns == ns:
                short_count[r.hostname] = short_count.get(r.hostname, 0) + 1
        for r in sorted(live, key=lambda r: (r.ns, r.name)):
            names = []
            if r.subdomain:
                fq = f"{r.hostname}.{r.subdomain}.{r.ns}.svc"
                names += [f"{fq}.cluster.local", fq]
                if r.ns == ns:
                    names += [f"{r.hostname}.{r.subdomain}.{r.ns}", f"{r.hostname}.{r.subdomain}"]
            if r.ns == ns and short_count.get(r.hostname) == 1:
                names.append(r.hostname)
            if names:
                lines.append(f"{r.ip}\t{' '.join(names)}")
        # Services: their names resolve to a local, ready pod they select (no kube-proxy here).
        for svc in self.services:
            md, spec = svc["metadata"], svc.get("spec") or {}
            selector = spec.get("selector")
            if not selector:
                continue
            targets = [r for r in live if r.ns == md["namespace"]
                       and all((r.pod["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())]
            if not targets:
                continue
            ready = [r for r in targets if all(c.ready for c in r.containers)] or targets
            fq = f"{md['name']}.{md['namespace']}.svc"
            names = [f"{fq}.cluster.local", fq]
            if md["namespace"] == ns:
                names += [f"{md['name']}.{md['namespace']}", md["name"]]
            lines.append(f"{sorted(ready, key=lambda r: r.name)[0].ip}\t{' '.join(names)}")
        return "\n".join(lines) + "\n"

    def write_hosts(self, ns: str, content: str) -> None:
        path = self.root / "hosts" / ns
        if self.hosts_content.get(ns) == content and path.exists():
            return
        # Rewrite in place: pods have this very inode bind-mounted over /etc/hosts.
        with open(path, "r+" if path.exists() else "w") as f:
            f.write(content)
            f.truncate()
        self.hosts_content[ns] = content

    def refresh_hosts(self) -> None:
        if time.monotonic() - self.last_services > 1.0:
            try:
                self.services = self.raw("GET", "/api/v1/services")["items"]
                self.last_services = time.monotonic()
            except Exception:  # noqa: BLE001
                log.exception("listing services failed")
        namespaces = {r.ns for r in self.runs.values()} | set(self.hosts_content)
        for ns in namespaces:
            self.write_hosts(ns, self.render_hosts(ns))

    # ---------------------------------------------------------------- reconcile
    def list_pods(self) -> list[dict]:
        return self.raw("GET", "/api/v1/pods", query=[("fieldSelector", f"spec.nodeName={self.node}")])["items"]

    def push_status(self, run: PodRun) -> None:
        status = run.status()
        if status == run.last_status:
            return
        try:
            self.raw("PATCH", f"/api/v1/namespaces/{run.ns}/pods/{run.name}/status", {
                "metadata": {"uid": run.uid}, "status": status},
                content_type="application/strategic-merge-patch+json")
            run.last_status = status
        except ApiException as e:
            if e.status not in (404, 409, 422):
                raise
            if e.status == 422:
                log.warning("status of %s/%s refused: %s", run.ns, run.name, e.body)
                run.last_status = status

    def finalize_delete(self, run: PodRun) -> None:
        if run.deleted:
            return
        try:
            self.raw("DELETE", f"/api/v1/namespaces/{run.ns}/pods/{run.name}",
                     {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                      "preconditions": {"uid": run.uid}})
        except ApiException as e:
            if e.status not in (404, 409):
                raise
        run.deleted = True
        log.info("pod %s/%s: deleted", run.ns, run.name)

    def agent_net_destroy(self, run: PodRun) -> None:
        try:
            self.net.destroy(run.uid)
        except OSError:
            log.exception("pod %s/%s: removing its network namespace failed", run.ns, run.name)

    def release(self, run: PodRun) -> None:
        for c in run.init_containers + run.containers:
            if c.proc is not None and c.proc.poll() is None:
                run.kill_all()
                break
        self.runs.pop(run.uid, None)
        if run.net_ready:
            self.agent_net_destroy(run)
        if run.ip != HOST_IP:
            self.free_ips.append(run.ip)
        shutil.rmtree(run.dir, ignore_errors=True)

    def reconcile(self) -> None:
        pods = self.list_pods()
        seen = set()
        for pod in pods:
            seen.add(pod["metadata"]["uid"])
            try:
                self.reconcile_pod(pod)
            except Exception:  # noqa: BLE001 - one broken pod must not stall the others
                log.exception("pod %s/%s: reconcile failed", pod["metadata"]["namespace"], pod["metadata"]["name"])
        for uid in list(self.runs):
            if uid not in seen:
                run = self.runs[uid]
                log.info("pod %s/%s: gone from the API", run.ns, run.name)
                self.release(run)
        self.refresh_hosts()

    def reconcile_pod(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        run = self.runs.get(uid)
        deleting = pod["metadata"].get("deletionTimestamp") is not None
        if run is None:
            phase = (pod.get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                if deleting:
                    self.finalize_delete(PodRun(self, pod, "0.0.0.0"))
                return  # finished before this agent started: nothing to run
            if deleting:
                self.finalize_delete(PodRun(self, pod, "0.0.0.0"))
                return
            run = PodRun(self, pod, HOST_IP if pod["spec"].get("hostNetwork") else self.alloc_ip())
            self.runs[uid] = run
            log.info("pod %s/%s: admitted with IP %s", run.ns, run.name, run.ip)
        run.pod = pod
        if deleting:
            grace = pod["metadata"].get("deletionGracePeriodSeconds")
            run.begin_termination(float(30 if grace is None else grace))
            if run.termination_done():
                if not run.terminal:
                    run.phase = "Failed" if run.restart_policy == "Always" or any(
                        c.terminated is None or c.terminated["exitCode"] != 0 for c in run.containers) else "Succeeded"
                self.push_status(run)
                self.finalize_delete(run)
            return
        run.step()
        self.push_status(run)

    def container_running(self, ns: str, pod: str, container: str) -> bool:
        for run in list(self.runs.values()):
            if run.ns == ns and run.name == pod:
                return any(c.name == container and (c.running or c.proc is None and not run.terminal)
                           for c in run.init_containers + run.containers) and not self.stopping
        return False

    def serve_kubelet_api(self) -> None:
        """HTTPS on 127.0.0.1:<free port>: the apiserver proxies `kubectl logs` here."""
        handler = type("Handler", (KubeletHandler,), {"agent": self})
        server = http.server.ThreadingHTTPServer((HOST_IP, 0), handler)
        server.daemon_threads = True
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self.kubelet_port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True, name="kubelet-api").start()

    def run(self) -> None:
        self.started_at = now()
        self.net.setup()
        write_info(self.root, self.ip_prefix, self.net.mode)
        log.info("pod network: %s, prefix %d", self.net.mode, self.ip_prefix)
        self.serve_kubelet_api()
        self.register_node()
        threading.Thread(target=self.heartbeat_loop, daemon=True, name="heartbeat").start()
        while not self.stopping:
            t0 = time.monotonic()
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001 - keep serving; the API may be restarting
                log.exception("reconcile failed")
                time.sleep(1)
            time.sleep(max(0.0, TICK - (time.monotonic() - t0)))
        self.shutdown()

    def shutdown(self) -> None:
        """End every pod process: SIGTERM, then SIGKILL after 5 s."""
        runs = list(self.runs.values())
        for run in runs:
            run.begin_termination(5.0)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(r.termination_done() for r in runs):
            time.sleep(0.1)
        for run in runs:
            run.kill_all()
        self.probes.shutdown(wait=False, cancel_futures=True)
        self.net.teardown()
        log.info("node agent stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--node", default="local-0")
    parser.add_argument("--tls-cert", help="serving certificate for the kubelet API (logs)")
    parser.add_argument("--tls-key")
    parser.add_argument("--network", choices=["netns", "loopback"], default="netns")
    parser.add_argument("--forward-port", type=int, action="append", default=[],
                        help="host 127.0.0.1 port that pods reach at their own 127.0.0.1 (netns mode)")
    parser.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu capacity to advertise (no real GPUs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    agent = Agent(args.kubeconfig, args.root.resolve(), args.node, args.tls_cert, args.tls_key, args.gpus,
                  args.network, args.forward_port)

    def stop(signum: int, _frame: Any) -> None:
        agent.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()


if __name__ == "__main__":
    main()
