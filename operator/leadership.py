"""Which of several operator replicas acts: kopf peering, read the way client-go reads a lease.

kopf keeps one record per running operator in a (Cluster)KopfPeering object (priority, lifetime,
last keep-alive) and pauses its own watching unless it has the highest priority among the live
peers. This operator's reconcile threads and child watches run outside kopf, so they ask the same
question here: am I the one live peer with the highest priority? Each replica takes a distinct
priority from its start time (older wins, so a restarted pod never preempts the active one).

Liveness is never judged by comparing another replica's `lastseen` with this machine's wall clock
(clock skew would make two leaders): as client-go's leader election does, a record is live while
it was seen to change, by this replica's own monotonic clock, within its lifetime. And the leader
stops acting once its own record has not been seen renewed for RENEW_FRACTION of the lifetime,
before any follower may take over.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
import time

from collections.abc import Callable
from typing import Any

from . import kube, metrics

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0
PRIORITY_BASE = 10**13  # > epoch milliseconds for centuries: priorities stay positive
# Replicas the kubelet starts together can read the same millisecond: random low digits break the
# tie (two equal priorities would both stand by, and no replica would ever act). The product stays
# below 2**53, so a reader that takes JSON numbers as floats still tells them apart.
TIE_BREAK = 100
# The leader stops acting when its own record was last seen renewed this share of its lifetime ago
# (followers wait the whole lifetime after the last change they saw).
RENEW_FRACTION = 0.8


def priority_for_start(started: float, tie_break: int | None = None) -> int:
    """Older replicas get higher priorities (a restarted pod waits behind the running one); two
    started in the same millisecond differ in the random low digits."""
    low = secrets.randbelow(TIE_BREAK) if tie_break is None else tie_break
    return (PRIORITY_BASE - int(started * 1000)) * TIE_BREAK + low


class PeerView:
    """The peering records as seen from one replica: when (local monotonic time) each last changed."""

    def __init__(self, own_priority: int) -> None:
        self.own_priority = own_priority
        self._seen: dict[str, tuple[str, float, dict[str, Any]]] = {}  # peer id -> (record, changed at, record)

    def observe(self, peers: dict[str, Any], now: float) -> None:
        current = {key: info for key, info in peers.items() if isinstance(info, dict)}
        for key, info in current.items():
            text = json.dumps(info, sort_keys=True, default=str)
            old = self._seen.get(key)
            if old is None or old[0] != text:
                self._seen[key] = (text, now, info)
        for key in set(self._seen) - set(current):
            del self._seen[key]

    def leading(self, now: float) -> bool:
        """The highest priority among the peers seen renewed within their lifetime, alone, and
        this replica's own record seen renewed within RENEW_FRACTION of its lifetime."""
        live, own_fresh = [], False
        for _, changed, info in self._seen.values():
            try:
                lifetime, priority = float(info.get("lifetime", 60)), int(info.get("priority", 0))
            except (TypeError, ValueError):
                continue  # a record nobody can read leads nothing
            if now - changed < lifetime:
                live.append(priority)
            if priority == self.own_priority and now - changed < lifetime * RENEW_FRACTION:
                own_fresh = True
        if not own_fresh:
            return False  # not announced yet, or our keep-alives are not getting through: stop first
        return live.count(self.own_priority) == 1 and self.own_priority == max(live)


class Leadership:
    """Polls the peering object; `leading()` is the gate of the reconcile threads."""

    def __init__(self, peering: str | None, namespace: str | None, priority: int,
                 on_gain: Callable[[], None]) -> None:
        self.peering, self.namespace, self.priority = peering, namespace, priority
        self.on_gain = on_gain
        self._leading = peering is None  # standalone: always
        self._stop = threading.Event()
        self._view = PeerView(priority)

    def leading(self) -> bool:
        return self._leading

    def _path(self) -> str:
        if self.namespace:
            return kube.ns_path("kopf.dev/v1", self.namespace, "kopfpeerings", str(self.peering))
        return kube.cluster_path("kopf.dev/v1", "clusterkopfpeerings", str(self.peering))

    def start(self) -> None:
        metrics.LEADER.set(1 if self._leading else 0)
        if self.peering is None:
            return
        threading.Thread(target=self._run, name="leadership", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _read(self) -> bool:
        """One look at the peering object. A failed read changes nothing seen: the leader goes on
        until its own record was not seen renewed for RENEW_FRACTION of its lifetime."""
        try:
            found = kube.request("GET", self._path(), missing_ok=True, timeout=(3.0, 5.0))
            if found is None:
                return False
            self._view.observe(found.get("status") or {}, time.monotonic())
        except kube.KubeError as error:
            log.warning("peering %s not readable: %s", self.peering, error)
        except Exception:  # a malformed record must not end the loop: a dead loop never leads again
            log.exception("peering %s not understood", self.peering)
        return self._view.leading(time.monotonic())

    def _run(self) -> None:
        while not self._stop.is_set():
            leading = self._read()
            if leading != self._leading:
                self._leading = leading
                metrics.LEADER.set(1 if leading else 0)
                log.info("%s (peering %s, priority %d)", "leading: this replica acts" if leading else "standing by",
                         self.peering, self.priority)
                if leading:
                    self.on_gain()
            self._stop.wait(POLL_SECONDS)


