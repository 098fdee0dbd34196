"""Watches of the objects the operator creates, filtered by the API server, kept in a small cache.

One list+watch per kind (and per served namespace, or cluster-wide), with the label selector
`app.kubernetes.io/managed-by=dreambooth-operator` sent to the server, so the operator never
receives other Jobs or Deployments. Each object is kept slim (the fields the lifecycle reads)
and indexed by the DreamboothJob it belongs to; every change calls `on_change(namespace, job)`.
Reconciles read children from here instead of listing them.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import builders, kube, metrics
from .shared_server import LABEL_SERVER

log = logging.getLogger(__name__)
MANAGED_SELECTOR = f"{builders.LABEL_MANAGED_BY}=dreambooth-operator"
WATCH_SECONDS = 300  # the server ends a watch after this; it is resumed from the last resourceVersion
WORKLOADS_API = "kueue.x-k8s.io/v1beta2"
Slim = Callable[[dict[str, Any]], dict[str, Any]]


def _slim_metadata(obj: dict[str, Any], annotation: str) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    slim = {key: meta[key] for key in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp", "deletionTimestamp") if key in meta}
    slim["labels"] = dict(meta.get("labels") or {})
    annotations = meta.get("annotations") or {}
    if annotation in annotations:
        slim["annotations"] = {annotation: annotations[annotation]}
    slim["ownerReferences"] = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
    return slim


def slim_job(job: dict[str, Any]) -> dict[str, Any]:
    """What lifecycle.trainer_job_state reads of a batch/v1 Job."""
    status = job.get("status") or {}
    return {
        "metadata": _slim_metadata(job, builders.ANNOTATION_TEMPLATE_HASH),
        "spec": {"suspend": bool((job.get("spec") or {}).get("suspend"))},
        "status": {
            "active": status.get("active") or 0,
            "ready": status.get("ready") or 0,
            "startTime": status.get("startTime"),
            "conditions": [{k: c.get(k) for k in ("type", "status", "reason", "message")} for c in status.get("conditions") or []],
        },
    }


def slim_deployment(deployment: dict[str, Any]) -> dict[str, Any]:
    """What lifecycle.serving_state reads of a Deployment."""
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    containers = (spec.get("template") or {}).get("spec", {}).get("containers") or [{}]
    return {
        "metadata": _slim_metadata(deployment, builders.ANNOTATION_SPEC_HASH),
        "spec": {"replicas": spec.get("replicas"), "template": {"spec": {"containers": [{"image": containers[0].get("image", "")}]}}},
        "status": {
            "readyReplicas": status.get("readyReplicas") or 0,
            "conditions": [{k: c.get(k) for k in ("type", "status", "reason", "message")} for c in status.get("conditions") or []],
        },
    }


KUEUE_JOB_UID = "kueue.x-k8s.io/job-uid"
# An optional kind the cluster does not serve (Kueue installed after the operator) is looked for this
# often: one 404 per namespace scope, and a queued job's reason (Preempted, Evicted) is seen soon after.
ABSENT_RECHECK_SECONDS = 10.0


def slim_workload(workload: dict[str, Any]) -> dict[str, Any]:
    """What lifecycle.queue_state reads of a Kueue Workload (and the Job it stands for)."""
    meta = workload.get("metadata") or {}
    spec = workload.get("spec") or {}
    return {
        "metadata": {**{k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion") if k in meta},
                     "labels": {KUEUE_JOB_UID: (meta.get("labels") or {}).get(KUEUE_JOB_UID, "")},
                     "ownerReferences": [{"kind": r.get("kind"), "name": r.get("name"), "uid": r.get("uid")}
                                         for r in meta.get("ownerReferences") or [] if r.get("kind") == "Job"]},
        "spec": {"active": spec.get("active", True), "queueName": spec.get("queueName", "")},
        "status": {"conditions": [{k: c.get(k) for k in ("type", "status", "reason", "message")}
                                  for c in (workload.get("status") or {}).get("conditions") or []]},
    }


def _differs(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """True when anything but the resourceVersion changed."""
    strip = lambda o: {**o, "metadata": {k: v for k, v in o["metadata"].items() if k != "resourceVersion"}}  # noqa: E731
    return strip(old) != strip(new)


class ChildCache:
    """Server-side filtered list+watch of one kind, in the served namespaces (None: all)."""

    def __init__(self, api_version: str, plural: str, slim: Slim, namespaces: list[str] | None,
                 on_change: Callable[[str, str], None], on_server_change: Callable[[str, str], None] | None = None,
                 selector: str = MANAGED_SELECTOR, owner_of: Callable[[str, dict[str, Any]], str | None] | None = None,
                 optional: bool = False) -> None:
        self.api_version, self.plural, self.slim = api_version, plural, slim
        self.selector = selector
        # The DreamboothJob an object belongs to (default: its dreambooth.dev/job-name label).
        self.owner_of = owner_of or (lambda namespace, obj: obj["metadata"]["labels"].get(builders.LABEL_JOB))
        self.optional = optional  # a kind the cluster may not serve (Kueue's): absent reads as empty, quietly
        self._by_label: dict[str, tuple[str, str]] = {}  # e.g. job uid -> (namespace, name), for KUEUE_JOB_UID
        self.scopes: list[str | None] = list(namespaces) if namespaces else [None]
        self.on_change = on_change
        self.on_server_change = on_server_change  # (namespace, shared server) for a shared server's objects
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}  # (namespace, name) -> slim object
        self._by_owner: dict[tuple[str, str], set[str]] = {}  # (namespace, job) -> names
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._synced = {scope: threading.Event() for scope in self.scopes}
        self.failing: dict[str | None, str] = {}  # scope -> why its list/watch fails now
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ reading
    def synced(self, namespace: str | None = None) -> bool:
        """Every scope listed (namespace None), or the scope that holds `namespace`."""
        if namespace is None:
            return all(event.is_set() for event in self._synced.values())
        scope = namespace if namespace in self._synced else None
        return scope in self._synced and self._synced[scope].is_set()

    def owned_by(self, namespace: str, job: str) -> list[dict[str, Any]]:
        with self._lock:
            names = self._by_owner.get((namespace, job), set())
            return [self._objects[(namespace, name)] for name in sorted(names) if (namespace, name) in self._objects]

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objects.get((namespace, name))

    def by_job_uid(self, uid: str) -> dict[str, Any] | None:
        """The object labelled kueue.x-k8s.io/job-uid=<uid> (a Job's Workload)."""
        with self._lock:
            key = self._by_label.get(uid)
            return self._objects.get(key) if key else None

    def __len__(self) -> int:
        return len(self._objects)

    # ------------------------------------------------------------------ running
    def start(self) -> None:
        for scope in self.scopes:
            thread = threading.Thread(target=self._run, args=(scope,), name=f"watch-{self.plural}-{scope or 'all'}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()

    def _path(self, scope: str | None) -> str:
        return kube.ns_path(self.api_version, scope, self.plural) if scope else kube.cluster_path(self.api_version, self.plural)

    def _run(self, scope: str | None) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                version = self._relist(scope)
                self.failing.pop(scope, None)
                delay = 1.0
                while not self._stop.is_set():
                    version = self._watch(scope, version)
                    if version is None:
                        break  # expired (410): list again
            except Exception as error:  # network, API errors: list again after a pause
                if self.optional and " 404 " in str(error):
                    self._synced[scope].set()  # not served here (no Kueue): nothing to watch; look again later
                    self._stop.wait(ABSENT_RECHECK_SECONDS)
                    continue
                self.failing[scope] = str(error)[:300]
                log.warning("watch of %s (%s) failed: %s; retrying in %.0f s", self.plural, scope or "all namespaces", error, delay)
                self._stop.wait(delay * (1 + random.random() / 4))
                delay = min(delay * 2, 30.0)

    def _relist(self, scope: str | None) -> str:
        items: list[dict[str, Any]] = []
        query = {"labelSelector": self.selector, "limit": "500"}
        while True:
            page = kube.request("GET", self._path(scope), query=query) or {}
            items += page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                break
            query = {**query, "continue": token}
        fresh = {(o["metadata"]["namespace"], o["metadata"]["name"]): self.slim(o) for o in items}
        with self._lock:
            gone = [key for key in self._objects if (scope is None or key[0] == scope) and key not in fresh]
            changed = [(key, self._objects[key]) for key in gone]
            changed += [(key, obj) for key, obj in fresh.items() if self._objects.get(key) != obj]
            for key in gone:
                self._forget(key)
            for key, obj in fresh.items():
                self._store(key, obj)
        self._synced[scope].set()
        for (namespace, name), obj in changed:
            self._notify(namespace, name, obj)
        return str((page.get("metadata") or {}).get("resourceVersion") or "")

    def _watch(self, scope: str | None, version: str) -> str | None:
        query = {"labelSelector": self.selector, "watch": "1", "allowWatchBookmarks": "true",
                 "resourceVersion": version, "timeoutSeconds": str(WATCH_SECONDS)}
        for event in self._stream(scope, query):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    return None
                raise kube.KubeError(f"watch error: {obj.get('message')}")
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
            if kind == "BOOKMARK":
                continue
            metrics.WATCH_EVENTS.labels(kind=self.plural).inc()
            key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
            slim = self.slim(obj)
            with self._lock:
                old = self._objects.get(key)
                if kind == "DELETED":
                    self._forget(key)
                else:
                    self._store(key, slim)
            if kind == "DELETED" or old is None or _differs(old, slim):
                self._notify(*key, slim)  # a change of a field the lifecycle does not read is no news
        return version

    def _stream(self, scope: str | None, query: dict[str, str]) -> Iterator[dict[str, Any]]:
        api = kube.client()
        params = api.param_serialize(method="GET", resource_path=self._path(scope), query_params=list(query.items()),
                                     header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
        metrics.API_REQUESTS.labels(verb="WATCH").inc()
        # The read timeout outlasts the server's own timeoutSeconds: a silent connection is a dead one.
        response = api.call_api(*params, _request_timeout=(kube.REQUEST_TIMEOUT[0], WATCH_SECONDS + 30))
        raw = response.response
        if response.status != 200:
            raise kube.KubeError(f"watch {self._path(scope)}: {response.status} {raw.read()[:300]!r}")
        try:
            buffer = b""
            for chunk in raw.stream(65536, decode_content=True):
                if self._stop.is_set():
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            raw.release_conn()

    def _store(self, key: tuple[str, str], obj: dict[str, Any]) -> None:
        self._forget(key)
        self._objects[key] = obj
        job_uid = obj["metadata"]["labels"].get(KUEUE_JOB_UID)
        if job_uid:
            self._by_label[job_uid] = key
        owner = obj["metadata"]["labels"].get(builders.LABEL_JOB)
        if owner:
            self._by_owner.setdefault((key[0], owner), set()).add(key[1])

    def _forget(self, key: tuple[str, str]) -> None:
        old = self._objects.pop(key, None)
        job_uid = old and old["metadata"]["labels"].get(KUEUE_JOB_UID)
        if job_uid and self._by_label.get(job_uid) == key:
            del self._by_label[job_uid]
        owner = old and old["metadata"]["labels"].get(builders.LABEL_JOB)
        if owner:
            names = self._by_owner.get((key[0], owner))
            if names is not None:
                names.discard(key[1])
                if not names:
                    del self._by_owner[(key[0], owner)]

    def _notify(self, namespace: str, name: str, obj: dict[str, Any] | None) -> None:
        labels = ((obj or {}).get("metadata") or {}).get("labels", {})
        owner = self.owner_of(namespace, obj) if obj else None
        if owner:
            self.on_change(namespace, owner)
        elif labels.get(LABEL_SERVER) and self.on_server_change is not None:
            self.on_server_change(namespace, labels[LABEL_SERVER])


class Children:
    """The operator's trainer Jobs and inference Deployments, watched and cached."""

    def __init__(self, namespaces: list[str] | None, on_change: Callable[[str, str], None],
                 on_server_change: Callable[[str, str], None] | None = None) -> None:
        self.jobs = ChildCache("batch/v1", "jobs", slim_job, namespaces, on_change)
        self.deployments = ChildCache("apps/v1", "deployments", slim_deployment, namespaces, on_change, on_server_change)
        # Kueue's Workloads of our Jobs (one watch instead of a LIST per queued job every few seconds).
        self.workloads = ChildCache(WORKLOADS_API, "workloads", slim_workload, namespaces, on_change,
                                    selector=KUEUE_JOB_UID, owner_of=self._job_of_workload, optional=True)

    def _job_of_workload(self, namespace: str, workload: dict[str, Any]) -> str | None:
        """The DreamboothJob whose trainer Job a Workload stands for (only ours are ever notified)."""
        for ref in workload["metadata"].get("ownerReferences") or []:
            job = self.jobs.get(namespace, ref.get("name", ""))
            if job is not None and job["metadata"].get("uid") == ref.get("uid"):
                return job["metadata"]["labels"].get(builders.LABEL_JOB)
        return None

    def start(self) -> None:
        self.jobs.start()
        self.deployments.start()
        self.workloads.start()

    def stop(self) -> None:
        self.jobs.stop()
        self.deployments.stop()
        self.workloads.stop()

    def synced(self, namespace: str | None = None) -> bool:
        return self.jobs.synced(namespace) and self.deployments.synced(namespace)

    def failing(self) -> dict[str, str]:
        """Served namespaces (or "*": all) whose objects cannot be watched now, and why."""
        return {scope or "*": why for cache in (self.jobs, self.deployments) for scope, why in list(cache.failing.items())}

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.synced():
                return True
            time.sleep(0.05)
        return self.synced()
