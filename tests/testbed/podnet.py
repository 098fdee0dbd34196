"""Pod networking for local-0.

`netns` (default): each pod gets its own network namespace with a veth on a per-test-bed
bridge `tbbr<B>` (10.B.0.1/16) and its own address 10.B.x.y, so pods may all bind the same
port and really talk across hosts. The test bed's host services (kube-apiserver, MinIO) listen
on the host's 127.0.0.1; inside each pod a forwarder listens on 127.0.0.1:<same port> and
relays to the host, so KUBERNETES_SERVICE_HOST=127.0.0.1 and AWS_ENDPOINT_URL=http://127.0.0.1:P
work unchanged in pods.

`loopback` (fallback, TESTBED_NETWORK=loopback): pods share the host network and each gets a
distinct 127.B.x.y address.
"""
from __future__ import annotations

import asyncio
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import socket
import subprocess
import threading
from pathlib import Path

from tests.testbed import oci
from tests.testbed.realnode import claim_lock

CLONE_NEWNET = 0x40000000
log = logging.getLogger("node-agent")
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def prefix_for(root: Path) -> int:
    """The test bed's second address octet B (pod addresses 10.B.x.y or 127.B.x.y)."""
    return 100 + int(hashlib.sha1(str(root).encode()).hexdigest(), 16) % 100


LOCK_DIR = Path("/run/dreambooth-testbed")


def _lock_path(prefix: int) -> Path:
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    return LOCK_DIR / f"prefix-{prefix}.lock"


def acquire_prefix(root: Path) -> tuple[int, int]:
    """Claim a network prefix B no other running test bed holds: (B, fd holding its flock).

    The agent keeps the fd for its lifetime (the kernel drops the lock when it exits), so two
    test beds never share a bridge, namespaces or addresses; real-0 claims its own the same way.
    """
    return claim_lock(LOCK_DIR, "prefix", 100, base=100, first=prefix_for(root) - 100)


def write_info(root: Path, prefix: int, mode: str) -> None:
    (root / "network.json").write_text(json.dumps({"prefix": prefix, "mode": mode}))


def cleanup_after(root: Path) -> list[str]:
    """After a test bed's agent is gone: remove what it left (containers, overlays, network), unless
    its prefix is held again."""
    info_path = root / "network.json"
    if not info_path.exists():
        return []
    prefix = json.loads(info_path.read_text())["prefix"]
    fd = os.open(_lock_path(prefix), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []  # another live test bed owns this prefix now (it cleaned up at its start)
        removed = oci.cleanup_containers(prefix, root / "pods") + cleanup_leftovers(prefix)
        info_path.unlink(missing_ok=True)
        return removed
    finally:
        os.close(fd)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def cleanup_leftovers(prefix: int) -> list[str]:
    """Delete the network namespaces and bridge of test bed `prefix` (after its agent is gone)."""
    removed = []
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(f"tb{prefix}-"):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    if _ip("link", "show", f"tbbr{prefix}", check=False).returncode == 0:
        _ip("link", "del", f"tbbr{prefix}", check=False)
        removed.append(f"tbbr{prefix}")
    return removed


class Network:
    def __init__(self, mode: str, prefix: int, forward_ports: list[int]) -> None:
        self.mode = mode
        self.prefix = prefix
        self.forward_ports = sorted(set(forward_ports))
        self.bridge = f"tbbr{prefix}"
        self.servers: dict[str, list[asyncio.AbstractServer]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ node
    def setup(self) -> None:
        if self.mode != "netns":
            return
        try:
            cleanup_leftovers(self.prefix)
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"10.{self.prefix}.0.1/16", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except OSError as e:
            log.warning("per-pod network namespaces unavailable (%s): using shared loopback", e)
            self.mode = "loopback"
            return
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="forwarder").start()

    def teardown(self) -> None:
        if self.mode != "netns":
            return
        for uid in list(self.servers):
            self._close_servers(uid)
        cleanup_leftovers(self.prefix)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)

    def address(self, n: int) -> str:
        first = 10 if self.mode == "netns" else 127
        return f"{first}.{self.prefix}.{n // 250}.{n % 250 + 2}"

    # ------------------------------------------------------------------ pods
    def netns(self, uid: str) -> str:
        return f"tb{self.prefix}-{uid[:8]}"

    def create(self, uid: str, ip: str) -> None:
        """The pod's namespace: lo, eth0 (ip/16 on the bridge), default route, forwarders."""
        if self.mode != "netns":
            return
        ns, veth = self.netns(uid), f"tv{self.prefix}{uid[:8]}"
        _ip("netns", "del", ns, check=False)
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{ip}/16", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "default", "via", f"10.{self.prefix}.0.1")
        servers = []
        for port in self.forward_ports:
            sock = self._listen_in(f"/run/netns/{ns}", port)
            assert self.loop is not None
            fut = asyncio.run_coroutine_threadsafe(
                asyncio.start_server(lambda r, w, p=port: self._relay(r, w, p), sock=sock), self.loop)
            servers.append(fut.result(10))
        self.servers[uid] = servers

    def destroy(self, uid: str) -> None:
        if self.mode != "netns":
            return
        self._close_servers(uid)
        _ip("netns", "del", self.netns(uid), check=False)

    def netns_path(self, uid: str) -> str | None:
        """The pod's network namespace; None in loopback mode (pods share the node's)."""
        return f"/run/netns/{self.netns(uid)}" if self.mode == "netns" else None

    # ------------------------------------------------------------------ forwarders
    def _close_servers(self, uid: str) -> None:
        for server in self.servers.pop(uid, []):
            if self.loop is not None:
                self.loop.call_soon_threadsafe(server.close)

    @staticmethod
    def _listen_in(ns_path: str, port: int) -> socket.socket:
        """A socket listening on 127.0.0.1:port inside another network namespace.

        setns() switches only the calling thread, so a short-lived thread makes the socket;
        the socket stays in that namespace, and the host-side loop serves it.
        """
        result: dict = {}

        def work() -> None:
            fd = os.open(ns_path, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {ns_path}: {os.strerror(err)}")
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
                sock.listen(128)
                sock.setblocking(False)
                result["sock"] = sock
            except BaseException as e:  # noqa: BLE001
                result["err"] = e
            finally:
                os.close(fd)

        t = threading.Thread(target=work, name="setns")
        t.start()
        t.join()
        if "err" in result:
            raise result["err"]
        return result["sock"]

    @staticmethod
    async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()  # pass the half-close on; the other direction may still flow
            except (OSError, asyncio.CancelledError):
                pass

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                try:
                    w.close()
                except OSError:
                    pass
