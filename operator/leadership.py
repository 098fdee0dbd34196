"""Which of several operator replicas acts: kopf peering, read the way kopf reads it.

kopf keeps one record per running operator in a (Cluster)KopfPeering object (priority, lifetime,
last keep-alive) and pauses its own watching unless it has the highest priority among the live
peers. This operator's reconcile threads and child watches run outside kopf, so they ask the same
question here: am I the one live peer with the highest priority? Each replica takes a distinct
priority from its start time (older wins, so a restarted pod never preempts the active one).
A killed leader's record expires after its lifetime; the next one takes over then.
"""
from __future__ import annotations

import logging
import threading

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from . import kube, metrics

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0
PRIORITY_BASE = 10**13  # > epoch milliseconds for centuries: priorities stay positive


def priority_for_start(started: float) -> int:
    """Older replicas get higher priorities (a restarted pod waits behind the running one)."""
    return PRIORITY_BASE - int(started * 1000)


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def is_leading(peers: dict[str, Any], own_priority: int, now: datetime) -> bool:
    """True when this operator's priority is the highest among live peers, and no one else shares it."""
    live = []
    for info in peers.values():
        if not isinstance(info, dict) or "lastseen" not in info:
            continue
        deadline = _parse(str(info["lastseen"])) + timedelta(seconds=int(info.get("lifetime", 60)))
        if deadline > now:
            live.append(int(info.get("priority", 0)))
    if own_priority not in live:
        return False  # kopf has not announced us yet (or our record expired)
    return live.count(own_priority) == 1 and own_priority == max(live)


class Leadership:
    """Polls the peering object; `leading()` is the gate of the reconcile threads."""

    def __init__(self, peering: str | None, namespace: str | None, priority: int,
                 on_gain: Callable[[], None]) -> None:
        self.peering, self.namespace, self.priority = peering, namespace, priority
        self.on_gain = on_gain
        self._leading = peering is None  # standalone: always
        self._stop = threading.Event()

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
        """One look at the peering object; any failure reads as 'not leading' (the other replica may act)."""
        try:
            found = kube.request("GET", self._path(), missing_ok=True, timeout=(3.0, 5.0))
            return found is not None and is_leading(found.get("status") or {}, self.priority, datetime.now(timezone.utc))
        except kube.KubeError as error:
            log.warning("peering %s not readable: %s", self.peering, error)
        except Exception:  # a malformed record must not end the loop: a dead loop never leads again
            log.exception("peering %s not understood", self.peering)
        return False

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


