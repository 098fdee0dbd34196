"""The running operator: kopf's job events and the child watches feed a work queue; reconcile
threads serve it while this replica leads; Events are posted by a thread of their own.

kopf delivers the DreamboothJob events (and keeps the peering records); everything else runs on
plain threads started here, so that no handler blocks kopf's event loop and no finished job
holds a timer.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any

from . import kube, metrics, registration
from .engine import WorkQueue
from .leadership import Leadership
from .reconciler import Reconciler
from .watches import Children

log = logging.getLogger(__name__)
COMPONENT = "dreambooth-operator"
OWN_WRITES_KEPT = 4096
# A job whose namespace cannot be watched yet is looked at again this often.
NOT_SYNCED_RETRY_SECONDS = 5.0


class EventPoster:
    """Posts Events off the reconcile path; an outage drops them rather than holding workers."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[dict[str, Any], str, str, str] | None] = queue.Queue(maxsize=10000)
        self._instance = os.environ.get("POD_ID") or socket.gethostname()

    def post(self, body: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        involved = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                    "metadata": {k: body["metadata"].get(k) for k in ("name", "namespace", "uid")}}
        try:
            self._queue.put_nowait((involved, event_type, reason, message))
        except queue.Full:
            log.warning("event queue full: dropping %s %s", reason, message)

    def start(self) -> None:
        threading.Thread(target=self._run, name="events", daemon=True).start()

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            involved, event_type, reason, message = item
            now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            try:
                kube.create_event(involved, event_type, reason, message, COMPONENT, self._instance, now)
            except kube.KubeError as error:
                log.info("event %s not posted: %s", reason, error)


class Runtime:
    def __init__(self, workers: int, namespaces: list[str] | None, peering: str | None,
                 peering_namespace: str | None, priority: int) -> None:
        self.events = EventPoster()
        self.children = Children(namespaces, self._child_changed, self._server_changed)
        self._own: OrderedDict[str, str] = OrderedDict()  # key -> resourceVersion we wrote last
        self._lock = threading.Lock()
        self.reconciler = Reconciler(self.children, self.events.post, self._wrote)
        self.leadership = Leadership(peering, peering_namespace, priority, self._resync)
        self.queue = WorkQueue(self._reconcile, workers, gate=self._may_act)
        self.namespaces = namespaces

    def start(self) -> None:
        self.events.start()
        self.children.start()
        self.leadership.start()
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()
        self.children.stop()
        self.leadership.stop()
        self.events.stop()

    # ------------------------------------------------------------------ inputs
    def job_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        """A DreamboothJob event from kopf (None: the initial listing)."""
        meta = body.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        if event_type == "DELETED":
            self.queue.forget(key)
            self.reconciler.forget(meta.get("namespace", ""), meta.get("name", ""))
            if self._may_act():
                self.reconciler.released(body)
            return
        with self._lock:
            if self._own.get(key) == meta.get("resourceVersion"):
                return  # our own status write coming back: nothing new to decide on
        self.reconciler.bodies.offer(key, body)
        # A job not looked at yet, or edited, goes before the routine reconciles of running ones.
        status = body.get("status") or {}
        self.queue.add(key, urgent=not status or status.get("observedGeneration") != meta.get("generation"))

    def _child_changed(self, namespace: str, job: str) -> None:
        self.queue.add(f"{namespace}/{job}")

    def _server_changed(self, namespace: str, server: str) -> None:
        """A shared server changed: every job it serves may see ServingReady change."""
        try:
            jobs = registration.registered_jobs(namespace, server)
        except (kube.KubeError, ValueError) as error:  # its registry is read again on the jobs' next look
            log.info("shared server %s/%s: registry not readable: %s", namespace, server, error)
            return
        for job in jobs:
            self.queue.add(f"{namespace}/{job}")

    def _wrote(self, key: str, version: str) -> None:
        with self._lock:
            self._own[key] = version
            self._own.move_to_end(key)
            while len(self._own) > OWN_WRITES_KEPT:
                self._own.popitem(last=False)

    # ------------------------------------------------------------------ running
    def _may_act(self) -> bool:
        return self.leadership.leading()

    def _reconcile(self, key: Any) -> float | None:
        namespace, name = str(key).split("/", 1)
        metrics.UNWATCHED.set(len(self.children.failing()))
        if not self.children.synced(namespace):
            # Its namespace's children are not listed (yet, or no more: a Role removed): deciding on
            # an empty cache would duplicate gangs. Jobs of the namespaces that work go on.
            return NOT_SYNCED_RETRY_SECONDS
        again = self.reconciler.reconcile(namespace, name)
        metrics.TIMERS.set(self.queue.delayed())
        return again

    def _resync(self) -> None:
        """This replica just became the active one: look at every job once."""
        try:
            scopes = self.namespaces or [None]
            for scope in scopes:
                for item in kube.list_dreamboothjobs(scope):
                    self.queue.add(f"{item['metadata']['namespace']}/{item['metadata']['name']}")
        except kube.KubeError as error:
            log.warning("resync after gaining leadership failed: %s", error)
        self.queue.wake()
