"""Containers for `local-0`: each pod container runs from its image under runc.

* Images come from this machine's containers/storage (`make images`, images/build.py), looked up
  with buildah; nothing is pulled. A missing image is the node's ErrImagePull.
* Each image is mounted once per test bed (a buildah reference container, never written to) and
  each container gets an overlay of its own on top of it: a fresh writable layer per start,
  which runc turns read-only when the pod asks for readOnlyRootFilesystem.
* `runtime_spec` turns a pod's container (command/args over the image's entrypoint/cmd, env,
  user, security context, mounts, network namespace, hostname) into an OCI runtime config;
  it is pure and tested without runc (tests/testbed/test_oci_spec.py).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("node-agent")
_libc = ctypes.CDLL("libc.so.6", use_errno=True)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The capabilities a container gets unless its securityContext adds or drops some (containerd's set).
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
)
MASKED_PATHS = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


class ContainerConfigError(Exception):
    """The pod asks for something this container cannot be started with (CreateContainerConfigError)."""


def quantity_bytes(value: str | int) -> int:
    """A Kubernetes memory quantity ("256Mi", "2G", "1048576") in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kMGT]i?)?", str(value).strip())
    if not match:
        raise ContainerConfigError(f"unsupported quantity {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


@dataclass(frozen=True)
class ImageConfig:
    """What a container takes from its image (the OCI image config)."""

    id: str
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""

    @classmethod
    def from_inspect(cls, inspected: dict[str, Any]) -> "ImageConfig":
        config = (inspected.get("OCIv1") or {}).get("config") or {}
        return cls(id=inspected["FromImageID"], entrypoint=tuple(config.get("Entrypoint") or ()),
                   cmd=tuple(config.get("Cmd") or ()), env=tuple(config.get("Env") or ()),
                   working_dir=config.get("WorkingDir") or "", user=config.get("User") or "")


@dataclass(frozen=True)
class Mount:
    """A mount of the container: a bind of a host path, or a tmpfs (`source` None) of `size` bytes."""

    target: str
    source: str | None = None
    read_only: bool = False
    size: int | None = None


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass
class ContainerPlan:
    """Everything runtime_spec needs for one container start."""

    container: dict[str, Any]
    pod_spec: dict[str, Any]
    image: ImageConfig
    env: dict[str, str]
    mounts: list[Mount]
    rootfs: str
    hostname: str
    netns: str | None  # path of the pod's network namespace; None shares the node's (hostNetwork)
    identity: Identity
    cgroup: str
    open_files: int = 1024  # RLIMIT_NOFILE: the node's own hard limit, as container runtimes pass it on
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- pure
def process_args(container: dict[str, Any], image: ImageConfig) -> list[str]:
    """Kubernetes' rule: command replaces ENTRYPOINT (and drops CMD); args replace CMD."""
    command = container.get("command")
    args = container.get("args")
    if command:
        argv = [*command, *(args or [])]
    else:
        argv = [*image.entrypoint, *(args if args is not None else image.cmd)]
    if not argv:
        raise ContainerConfigError(f"container {container['name']}: no command, and the image has no entrypoint or cmd")
    return argv


def _passwd_lookup(rootfs: str, user: str, file: str) -> int | None:
    path = Path(rootfs) / "etc" / file
    if not path.exists():
        return None
    for line in path.read_text(errors="replace").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == user:
            return int(fields[2])
    return None


def _primary_gid(rootfs: str, uid: int) -> int:
    path = Path(rootfs) / "etc" / "passwd"
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        fields = line.split(":")
        if len(fields) >= 4 and fields[2] == str(uid):
            return int(fields[3])
    return 0


def resolve_identity(container: dict[str, Any], pod_spec: dict[str, Any], image: ImageConfig, rootfs: str) -> Identity:
    """runAsUser/runAsGroup (container over pod) or the image's USER; runAsNonRoot enforced."""
    pod_ctx = pod_spec.get("securityContext") or {}
    ctx = container.get("securityContext") or {}
    uid = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
    gid = ctx.get("runAsGroup", pod_ctx.get("runAsGroup"))
    image_user, _, image_group = image.user.partition(":")
    if uid is None and image_user:
        uid = int(image_user) if image_user.isdigit() else _passwd_lookup(rootfs, image_user, "passwd")
        if uid is None:
            raise ContainerConfigError(f"image user {image_user!r} is not in the image's /etc/passwd")
        if gid is None and image_group:  # the image's group goes with the image's user only
            gid = int(image_group) if image_group.isdigit() else _passwd_lookup(rootfs, image_group, "group")
    uid = int(uid or 0)
    if gid is None:
        gid = _primary_gid(rootfs, uid)
    non_root = ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))
    if non_root and uid == 0:
        raise ContainerConfigError("container has runAsNonRoot and image will run as root")
    groups = [int(g) for g in pod_ctx.get("supplementalGroups") or []]
    if pod_ctx.get("fsGroup") is not None:
        groups.append(int(pod_ctx["fsGroup"]))
    return Identity(uid, int(gid), tuple(dict.fromkeys(groups)))


def capabilities(container: dict[str, Any]) -> list[str]:
    caps = (container.get("securityContext") or {}).get("capabilities") or {}
    drop = {c.upper().removeprefix("CAP_") for c in caps.get("drop") or []}
    add = [f"CAP_{c.upper().removeprefix('CAP_')}" for c in caps.get("add") or []]
    kept = [] if "ALL" in drop else [c for c in DEFAULT_CAPABILITIES if c.removeprefix("CAP_") not in drop]
    return list(dict.fromkeys([*kept, *add]))


def _oci_mount(mount: Mount) -> dict[str, Any]:
    if mount.source is None:
        options = ["nosuid", "nodev", "mode=1777"] + ([f"size={mount.size}"] if mount.size else [])
        return {"destination": mount.target, "type": "tmpfs", "source": "tmpfs", "options": options}
    return {"destination": mount.target, "type": "bind", "source": mount.source,
            "options": ["rbind", "rprivate", "ro" if mount.read_only else "rw"]}


def default_mounts(shm: Mount | None) -> list[dict[str, Any]]:
    """/proc, /dev, /sys and friends, as `runc spec` lays them out; /dev/shm from the pod if it mounts one."""
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]
    if shm is None:
        mounts.append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                       "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=67108864"]})
    return mounts


def runtime_spec(plan: ContainerPlan) -> dict[str, Any]:
    """The OCI runtime config (config.json) for one start of `plan.container`."""
    container = plan.container
    ctx = container.get("securityContext") or {}
    caps = capabilities(container)
    env = {**{k: v for k, v in (item.split("=", 1) for item in plan.image.env if "=" in item)}, **plan.env}
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", "/")
    shm = next((m for m in plan.mounts if m.target == "/dev/shm"), None)
    volumes = sorted(plan.mounts, key=lambda m: m.target.rstrip("/").count("/"))
    limits = (container.get("resources") or {}).get("limits") or {}
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if limits.get("memory"):
        resources["memory"] = {"limit": quantity_bytes(limits["memory"])}
    namespaces: list[dict[str, str]] = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
    if plan.netns:
        namespaces.append({"type": "network", "path": plan.netns})
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": plan.identity.uid, "gid": plan.identity.gid,
                     **({"additionalGids": list(plan.identity.groups)} if plan.identity.groups else {})},
            "args": process_args(container, plan.image),
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": container.get("workingDir") or plan.image.working_dir or "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "inheritable": [], "ambient": []},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": plan.open_files, "soft": plan.open_files}],
            # allowPrivilegeEscalation defaults to true in Kubernetes.
            "noNewPrivileges": ctx.get("allowPrivilegeEscalation") is False,
        },
        "root": {"path": plan.rootfs, "readonly": bool(ctx.get("readOnlyRootFilesystem"))},
        "hostname": plan.hostname,
        "mounts": default_mounts(shm) + [_oci_mount(m) for m in volumes],
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": plan.cgroup,
            "resources": resources,
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
        **plan.extra,
    }


# --------------------------------------------------------------------------------------------- images
class ImageStore:
    """Lookups in the machine's containers/storage, and one read-only mount per image for this test bed."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix  # names every buildah container this test bed makes
        self.mounts: dict[str, str] = {}

    def lookup(self, ref: str) -> ImageConfig | None:
        result = subprocess.run(["buildah", "inspect", "--type", "image", ref], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            return None
        return ImageConfig.from_inspect(json.loads(result.stdout))

    def reference_name(self, image_id: str) -> str:
        return f"{self.prefix}-image-{image_id[:12]}"

    def mount(self, image: ImageConfig) -> str:
        """The image's files, mounted once: the lower layer of every container started from it."""
        if image.id in self.mounts:
            return self.mounts[image.id]
        name = self.reference_name(image.id)
        made = subprocess.run(["buildah", "from", "--pull=never", "--name", name, image.id],
                              capture_output=True, text=True, timeout=300)
        if made.returncode != 0 and "already in use" not in made.stderr:
            raise OSError(f"buildah from {image.id[:12]}: {made.stderr.strip()}")
        mounted = subprocess.run(["buildah", "mount", name], capture_output=True, text=True, timeout=120)
        if mounted.returncode != 0:
            raise OSError(f"buildah mount {name}: {mounted.stderr.strip()}")
        self.mounts[image.id] = mounted.stdout.strip()
        return self.mounts[image.id]

    def release(self) -> None:
        for image_id in list(self.mounts):
            subprocess.run(["buildah", "rm", self.reference_name(image_id)], capture_output=True, timeout=120)
            self.mounts.pop(image_id)


def remove_reference_containers(prefix: str) -> list[str]:
    """buildah containers a test bed with this prefix left behind (its agent is gone)."""
    listing = subprocess.run(["buildah", "containers", "--format", "{{.ContainerName}}"], capture_output=True, text=True)
    names = [n for n in listing.stdout.split() if n.startswith(f"{prefix}-image-")]
    for name in names:
        subprocess.run(["buildah", "rm", name], capture_output=True)
    return names


# --------------------------------------------------------------------------------------------- rootfs
def _mount(source: str, target: str, fstype: str, options: str) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), 0, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def unmount(target: Path) -> None:
    if _libc.umount2(str(target).encode(), 2) != 0:  # MNT_DETACH: a process may still hold it
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL (not mounted), ENOENT
            raise OSError(err, f"umount {target}: {os.strerror(err)}")


def overlay_rootfs(lower: str, bundle: Path) -> Path:
    """A writable overlay over the image's files: the container's own root filesystem."""
    for sub in ("upper", "work", "rootfs"):
        (bundle / sub).mkdir(parents=True, exist_ok=True)
    rootfs = bundle / "rootfs"
    _mount("overlay", str(rootfs), "overlay", f"lowerdir={lower},upperdir={bundle / 'upper'},workdir={bundle / 'work'}")
    return rootfs


def unmount_under(root: Path) -> list[str]:
    """Unmount every mount below `root` (deepest first): overlays of containers an agent left."""
    targets = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].replace("\\040", " ")
        if mount_point.startswith(str(root) + "/"):
            targets.append(mount_point)
    for target in sorted(targets, key=len, reverse=True):
        unmount(Path(target))
    return targets


# --------------------------------------------------------------------------------------------- runc
class Runc:
    """runc with a state directory of its own per test bed."""

    def __init__(self, state_root: Path) -> None:
        self.state_root = state_root

    def base(self) -> list[str]:
        return ["runc", "--root", str(self.state_root)]

    def run_argv(self, bundle: Path, container_id: str) -> list[str]:
        """Foreground `runc run`: it forwards signals to the container and exits with its status."""
        return [*self.base(), "run", "--bundle", str(bundle), container_id]

    def exec_argv(self, container_id: str, argv: list[str]) -> list[str]:
        return [*self.base(), "exec", container_id, *argv]

    def kill(self, container_id: str, signal_name: str = "KILL") -> None:
        subprocess.run([*self.base(), "kill", container_id, signal_name], capture_output=True, timeout=30)

    def delete(self, container_id: str) -> None:
        subprocess.run([*self.base(), "delete", "--force", container_id], capture_output=True, timeout=30)

    def list_ids(self) -> list[str]:
        if not self.state_root.exists():
            return []
        result = subprocess.run([*self.base(), "list", "--quiet"], capture_output=True, text=True, timeout=30)
        return result.stdout.split()

    def version(self) -> str:
        result = subprocess.run(["runc", "--version"], capture_output=True, text=True)
        return result.stdout.split()[2] if result.returncode == 0 and len(result.stdout.split()) > 2 else "unknown"


def runc_state_root(prefix: int) -> Path:
    return Path("/run/dreambooth-testbed") / f"runc-{prefix}"


def cleanup_containers(prefix: int, pods_dir: Path) -> list[str]:
    """After a test bed's agent is gone: its runc containers, container overlays and image mounts."""
    runc = Runc(runc_state_root(prefix))
    removed: list[str] = []
    if shutil.which("runc") is None or shutil.which("buildah") is None:
        return removed  # the process runtime leaves no container behind
    for container_id in runc.list_ids():
        runc.delete(container_id)
        removed.append(container_id)
    removed += unmount_under(pods_dir)
    removed += remove_reference_containers(f"tb{prefix}")
    return removed
