"""Container entry for the local node: runs inside `unshare --mount --uts` (private mount and
UTS namespaces), bind-mounts the pod's volumes at their mountPath and the pod's hosts file over
/etc/hosts, sets the pod hostname, then execs the container command with the pod's env.

Usage (by node_agent only): python -m tests.testbed.pod_exec SPEC.json
SPEC: {"argv": [...], "env": {...}, "cwd": str|null, "hostname": str, "hosts": path,
       "mounts": [{"source": path, "target": path, "readOnly": bool}]}
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import sys

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _mount(source: str, target: str, flags: int) -> None:
    if _libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def bind(source: str, target: str, read_only: bool) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target) or "/", exist_ok=True)
        if not os.path.exists(target):
            open(target, "a").close()
    _mount(source, target, MS_BIND | MS_REC)
    if read_only:
        _mount(source, target, MS_BIND | MS_REMOUNT | MS_RDONLY)


# The checkout (its .venv runs the pod, its .testbed holds the volume sources). A volume mounted
# over one of its ancestors (an emptyDir at /tmp when the checkout lives under /tmp) must not
# hide it: sources are opened before any mount, and the checkout is bound back afterwards.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def held(path: str) -> str:
    """A /proc/self/fd path that keeps reaching `path` after mounts cover it."""
    return f"/proc/self/fd/{os.open(path, os.O_PATH)}"


def restore_checkout(fd_path: str, before: os.stat_result) -> None:
    try:
        now = os.stat(CHECKOUT)
        if (now.st_dev, now.st_ino) == (before.st_dev, before.st_ino):
            return
    except FileNotFoundError:
        pass
    os.makedirs(CHECKOUT, exist_ok=True)
    _mount(fd_path, CHECKOUT, MS_BIND | MS_REC)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    try:
        checkout, checkout_stat = held(CHECKOUT), os.stat(CHECKOUT)
        mounts = [(held(m["source"]), m["target"], bool(m.get("readOnly"))) for m in spec.get("mounts", [])]
        if spec.get("hosts"):
            bind(spec["hosts"], "/etc/hosts", read_only=True)
        if spec.get("hostname"):
            socket.sethostname(spec["hostname"][:63])
            if spec.get("hostnameFile"):
                bind(spec["hostnameFile"], "/etc/hostname", read_only=True)
        for source, target, read_only in mounts:
            bind(source, target, read_only)
        restore_checkout(checkout, checkout_stat)
        if spec.get("cwd"):
            os.makedirs(spec["cwd"], exist_ok=True)
            os.chdir(spec["cwd"])
    except OSError as e:
        print(f"local-0: container setup failed: {e}", file=sys.stderr, flush=True)
        os._exit(128)
    argv = spec["argv"]
    env = spec["env"]
    if not argv:
        print("local-0: the container has no command; image entrypoints are unknown here "
              "(set command/args in the pod spec)", file=sys.stderr, flush=True)
        os._exit(127)
    program = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env.get("PATH", os.defpath))
    if program is None:
        print(f"local-0: {argv[0]}: command not found on PATH {env.get('PATH')}", file=sys.stderr, flush=True)
        os._exit(127)
    try:
        os.execve(program, argv, env)
    except OSError as e:
        print(f"local-0: exec {argv[0]}: {e}", file=sys.stderr, flush=True)
        os._exit(126)


if __name__ == "__main__":
    main()
