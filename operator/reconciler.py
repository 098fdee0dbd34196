"""One reconcile of one DreamboothJob: read the world, let `lifecycle` decide, record, act.

Side effects live here and in `kube`/`store`; every decision is `lifecycle`'s. Status is written
before acting (so a crash never loses a decision) with the resourceVersion it was decided on as
a precondition (so a decision taken on a stale copy is never written: it is taken again).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from dreambooth_api.v1alpha1.sections import ConfigError
from dreambooth_api.v1alpha1.spec import API_VERSION, KIND, DreamboothJobSpec, memory_plan, served_export_prefix
from dreambooth_api.v1alpha1.stored import read_stored_spec

from . import builders, failures, installation, kube, lifecycle, metrics, polling, registration, retention, store
from .conditions import ACCEPTED, FAILED, NAME_CONFLICT, TERMINAL_PHASES, is_true, parse_time
from .network_policies import build_job_network_policy, network_policy_name
from .watches import Children

log = logging.getLogger(__name__)
# How soon a reconcile that hit an outage (API or storage) runs again.
TEMPORARY_DELAY = 10.0
SECRET_CACHE_SECONDS = 10.0
# How long the answer "does the cluster serve PodGroups" is kept (an upgrade may turn them on).
GANG_API_RECHECK_SECONDS = 300.0
# A held job (its accepted spec unreadable here) is looked at again this often.
HOLD_RETRY_SECONDS = 300.0
# Parsed specs kept (oldest dropped first): more than the unfinished jobs of a busy cluster.
SPECS_KEPT = 2048
# Pods of a gang are listed (to tell "not placed" from "starting") once its Job is this old.
PLACEMENT_LOOK_SECONDS = 5.0
EventSink = Callable[[dict[str, Any], str, str, str], None]
# Independent writes of one step (a gang's ConfigMap, Service, NetworkPolicy and Job) go out together;
# sized so the writes of every worker in a burst never wait for each other.
_POOL = ThreadPoolExecutor(max_workers=32, thread_name_prefix="writes")


class Bodies:
    """The newest copy of each unfinished job seen (kopf's events, our own writes), so a reconcile
    started by a child's event reads nothing. A stale copy is harmless: status is written with its
    resourceVersion as a precondition, and a conflict reads the job again."""

    def __init__(self) -> None:
        self._bodies: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _version(body: dict[str, Any]) -> int:
        text = str((body.get("metadata") or {}).get("resourceVersion") or "0")
        return int(text) if text.isdigit() else 0

    def offer(self, key: str, body: dict[str, Any]) -> None:
        with self._lock:
            old = self._bodies.get(key)
            if old is None or self._version(body) >= self._version(old):
                self._bodies[key] = body

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._bodies.get(key)

    def drop(self, key: str) -> None:
        with self._lock:
            self._bodies.pop(key, None)

    def __len__(self) -> int:
        return len(self._bodies)


@dataclass
class _ProgressPoll:
    sample: polling.ProgressSample | None = None
    interval: float | None = None
    due: float = 0.0
    since: float = 0.0  # when the gang's polling began (epoch seconds)


@dataclass
class Reconciler:
    children: Children
    post_event: EventSink
    own_writes: Callable[[str, str], None] = lambda key, version: None
    bodies: Bodies = field(default_factory=Bodies)
    _polls: dict[str, _ProgressPoll] = field(default_factory=dict)
    _specs: dict[tuple[Any, ...], DreamboothJobSpec] = field(default_factory=dict)
    _secrets: dict[tuple[str, str, tuple[str, ...]], tuple[float, dict[str, str] | None]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _release_errors: dict[str, str] = field(default_factory=dict)  # job uid -> why its data is not deleted yet
    _gang_api: tuple[bool, float] = (False, 0.0)  # (PodGroups served, until when that answer holds)
    _exports_seen: set[tuple[str, str]] = field(default_factory=set)  # (job uid, export prefix) found complete

    # ------------------------------------------------------------------ entry
    def reconcile(self, namespace: str, name: str) -> float | None:
        """Converge one job one step; returns when to look again (None: only on events)."""
        started = datetime.now(timezone.utc)
        key = f"{namespace}/{name}"
        body = self.bodies.get(key)
        try:
            for _ in range(3):
                current = body if body is not None else kube.read_dreamboothjob(namespace, name)
                if current is None:
                    self.forget(namespace, name)
                    return None
                if current["metadata"].get("deletionTimestamp"):
                    self.forget(namespace, name)
                    return self._release_data(current)
                # The cached copy changes only by offer(): a reconcile replaces status and bumps
                # metadata.resourceVersion in its own copy (status dicts are never edited in place).
                current = {**current, "metadata": dict(current["metadata"])}
                try:
                    again = self._reconcile(current)
                except kube.Conflict:
                    self.bodies.drop(key)
                    body = None  # changed since it was read: read it again and decide again
                    continue
                if (current.get("status") or {}).get("phase") in TERMINAL_PHASES:
                    self.bodies.drop(key)  # finished: nothing kept (edits arrive with their body)
                else:
                    self.bodies.offer(key, current)
                return again
            return 1.0
        except (store.StoreUnavailable, kube.KubeError) as error:
            log.warning("%s/%s: %s; again in %.0f s", namespace, name, error, TEMPORARY_DELAY)
            return TEMPORARY_DELAY
        finally:
            metrics.RECONCILE_SECONDS.observe((datetime.now(timezone.utc) - started).total_seconds())

    def _release_data(self, body: dict[str, Any]) -> float | None:
        """A job being deleted: delete what spec.retention says, then drop the finalizer (bounded)."""
        meta = body["metadata"]
        if retention.FINALIZER not in (meta.get("finalizers") or []):
            return None
        status, uid, now = body.get("status") or {}, meta.get("uid", ""), datetime.now(timezone.utc)
        try:
            spec: DreamboothJobSpec | None = self._spec(meta, body.get("spec") or {}, installation.for_job(status), keep=False)
        except ConfigError:
            spec = None
        plan = retention.release(status, spec.retention if spec else None, spec.data.instance_uri if spec else None,
                                 parse_time(meta["deletionTimestamp"]) or now, now, self._release_errors.get(uid, ""))
        if plan.warning:
            self.post_event(body, "Warning", "DataNotDeleted", plan.warning)
            log.warning("%s/%s: %s", meta["namespace"], meta["name"], plan.warning)
        try:
            if not plan.let_go and spec is not None:
                ref = spec.storage.credentials_secret_ref
                secret = self._secret(meta["namespace"], ref.name, (ref.access_key_key, ref.secret_key_key), fresh=True)
                if secret is None:
                    raise store.StoreRefused(f"Secret {meta['namespace']}/{ref.name} (storage.credentialsSecretRef) is gone")
                creds = _credentials(spec, secret)
                if any(what == "outputs" for what, _ in plan.prefixes) and self._stop_writers(meta):
                    return retention.RETRY_SECONDS / 5  # the trainers go first: nothing may write after the delete
                for what, uri in plan.prefixes:
                    count = store.delete_objects(creds, uri, retention.SUBJECT_SUFFIXES if what == "subject photos" else ())
                    log.info("%s/%s: spec.retention deleted %d objects (%s) under %s", meta["namespace"], meta["name"], count, what, uri)
            kube.set_finalizers(body, [f for f in meta.get("finalizers") or [] if f != retention.FINALIZER])
        except (store.StoreUnavailable, store.StoreRefused, kube.SecretValueUnreadable, KeyError) as error:
            self._release_errors[uid] = str(error)[:300]
            return plan.retry_in
        self._release_errors.pop(uid, None)
        return None

    @staticmethod
    def _stop_writers(meta: dict[str, Any]) -> bool:
        """Delete the job's gangs and kill their pods at once (their output is being deleted, no
        checkpoint is worth waiting for); True while some are still there."""
        pods = kube.list_trainer_pods(meta["namespace"], meta["name"])
        for pod in pods:
            job = ((pod.get("metadata") or {}).get("labels") or {}).get("batch.kubernetes.io/job-name")
            if job:
                kube.delete_job(meta["namespace"], job, meta["uid"])
            kube.force_delete_pod(meta["namespace"], pod["metadata"]["name"])
        return bool(pods)

    def _pod_groups_served(self) -> bool:
        """Whether gangs get a PodGroup (scheduling.k8s.io/v1alpha2), asked of discovery every few minutes."""
        now = datetime.now(timezone.utc).timestamp()
        with self._lock:
            known, until = self._gang_api
        if now < until:
            return known
        served = kube.serves(builders.POD_GROUP_API, "podgroups")
        with self._lock:
            self._gang_api = (bool(served) if served is not None else known, now + GANG_API_RECHECK_SECONDS)
            return self._gang_api[0]

    def _keep_finalizer(self, body: dict[str, Any], spec: DreamboothJobSpec) -> None:
        """A job whose retention deletes data carries the finalizer that does it; others carry none."""
        wanted = retention.finalizers_wanted(list(body["metadata"].get("finalizers") or []), spec.retention)
        if wanted is not None:
            kube.set_finalizers(body, wanted)
            raise kube.Conflict("finalizers changed: decide on the new version")

    def released(self, body: dict[str, Any]) -> None:
        """A deleted job leaves its shared server's registry at once (off the caller's thread; a
        failure is swept by the next registration on that server)."""
        meta, status = body.get("metadata") or {}, body.get("status") or {}
        servers = {*(status.get("leavingServers") or []), *filter(None, [(status.get("serving") or {}).get("server")])}
        if not servers:
            return

        def unregister() -> None:
            for server in sorted(servers):
                try:
                    registration.unregister(meta["namespace"], server, meta["name"], meta.get("uid"))
                except (kube.KubeError, ValueError) as error:
                    log.warning("adapter %s stays registered with %s until the next sweep: %s", meta["name"], server, error)

        _POOL.submit(unregister)

    def forget(self, namespace: str, name: str) -> None:
        metrics.forget(f"{namespace}/{name}")
        self.bodies.drop(f"{namespace}/{name}")
        with self._lock:
            self._polls.pop(f"{namespace}/{name}", None)

    # ------------------------------------------------------------------ the steps
    def _reconcile(self, body: dict[str, Any]) -> float | None:
        meta = body["metadata"]
        status = body.get("status") or {}
        now = datetime.now(timezone.utc)
        generation = meta.get("generation")
        snapshot = installation.for_job(status)
        try:
            spec = self._spec(meta, body.get("spec") or {}, snapshot, keep=status.get("phase") not in TERMINAL_PHASES)
        except ConfigError as error:
            if status.get("acceptedGeneration") is not None:
                # Accepted under another version's rules: never failed for it, held (a later read may pass).
                self._commit(body, lifecycle.hold(status, generation, now, str(error)))
                return HOLD_RETRY_SECONDS
            if not is_true(status.get("conditions") or [], FAILED):
                self._commit(body, lifecycle.reject(status, generation, now, "InvalidSpec", str(error)))
            return None
        self._keep_finalizer(body, spec)
        ref = builders.JobRef(meta["name"], meta["namespace"], meta["uid"], spec, dict(meta.get("labels") or {}))
        accepted_events: list[tuple[str, str, str]] = []
        if not is_true(status.get("conditions") or [], ACCEPTED):
            if is_true(status.get("conditions") or [], FAILED):
                return None  # refused for good earlier: no pods, no retries
            problem = self._admission_problem(ref)
            if problem is not None:
                return self._await_admission(body, spec, now, *problem)
            accepted = lifecycle.accept(status, generation, now, ref.output_uri, snapshot, memory_plan(spec))
            status, accepted_events = accepted.status, accepted.events
        obs = self._observe(ref, status, generation, now)
        plan = lifecycle.decide(obs)
        plan.events[:0] = accepted_events
        actions = list(plan.actions)
        committed = None
        if accepted_events and [a.kind for a in actions] == ["create_job"]:
            # Just accepted (the copy is fresh: nobody else accepts): record it while gang 0 is made.
            committed = _POOL.submit(self._commit, body, plan)
        else:
            self._commit(body, plan)
        conflict = None
        try:
            for action in actions:
                try:
                    self._act(body, ref, obs, action)
                except kube.NotOwned as error:
                    conflict = str(error)
                    break
                except kube.KubeRejected as error:
                    if action.kind != "create_job":
                        raise
                    if committed is not None:
                        committed.result()
                        committed = None
                    self._commit(body, lifecycle.give_up(body["status"], generation, now, "InvalidPodTemplate",
                                                         f"the trainer Job was refused by the API server: {error}"))
                    return None
        finally:
            if committed is not None:
                committed.result()
        if plan.done_when_acted and conflict is None:
            self._commit(body, lifecycle.acted(body["status"], plan.done_when_acted))
        created = any(a.kind in ("create_job", "ensure_serving") for a in actions)
        if conflict or (created and is_true(body["status"].get("conditions") or [], NAME_CONFLICT)):
            # Resolved only when what collided was created since: a step that made nothing proves nothing.
            self._commit(body, lifecycle.name_conflict(body["status"], generation, now, conflict))
            if conflict:
                return 10.0
        return self._next_look(ref, plan, obs)

    def _spec(self, meta: dict[str, Any], raw: dict[str, Any], snapshot: dict[str, Any], keep: bool) -> DreamboothJobSpec:
        """The validated spec, parsed once per generation and defaults snapshot (validation is the
        costliest part of a reconcile, and most reconciles are a child's event)."""
        key = (meta["uid"], meta.get("generation"), tuple(sorted(snapshot.items())))
        with self._lock:
            cached = self._specs.get(key)
        if cached is not None:
            return cached
        stored = read_stored_spec(installation.spec_with_defaults(raw, snapshot))
        if stored.ignored:
            log.info("%s/%s: fields unknown to this version ignored: %s", meta.get("namespace"), meta.get("name"), ", ".join(stored.ignored))
        spec = stored.spec
        if not keep:
            return spec  # a finished job is rarely looked at again: not worth its memory
        with self._lock:
            if len(self._specs) >= SPECS_KEPT:
                self._specs.pop(next(iter(self._specs)))
            self._specs[key] = spec
        return spec

    def _await_admission(self, body: dict[str, Any], spec: DreamboothJobSpec, now: datetime,
                         reason: str, message: str, permanent: bool) -> float | None:
        meta, status = body["metadata"], body.get("status") or {}
        plan = lifecycle.await_admission(status, meta.get("generation"), now, reason, message, permanent,
                                         spec.run_policy.admission_deadline_seconds)
        self._commit(body, plan)
        return plan.requeue_after

    def _admission_problem(self, ref: builders.JobRef) -> tuple[str, str, bool] | None:
        """What admission cannot check: (reason, message, permanent?) or None when all is well."""
        source = ref.spec.model.source
        if not source.startswith(("tiny", "hf://", "s3://", "/")):
            return ("ModelSourceUnreachable", f"model.source {source!r}: a relative path is not reachable from the pods; "
                    "use s3://, hf:// or an absolute path in the image", True)
        secret_ref = ref.spec.storage.credentials_secret_ref
        try:
            data = self._secret(ref.namespace, secret_ref.name, (secret_ref.access_key_key, secret_ref.secret_key_key))
        except kube.SecretValueUnreadable as error:
            return "SecretKeyUnreadable", f"storage.credentialsSecretRef: {error}", False
        if data is None:
            return "SecretNotFound", f"storage.credentialsSecretRef: Secret {ref.namespace}/{secret_ref.name} does not exist", False
        for key in (secret_ref.access_key_key, secret_ref.secret_key_key):
            if not data.get(key):
                return "SecretKeyMissing", f"storage.credentialsSecretRef: Secret {secret_ref.name} has no key {key!r}", False
        creds = _credentials(ref.spec, data)
        try:
            store.check_instance_images(creds, ref.spec.data.instance_uri)
        except store.StoreRefused as error:
            return "InstanceDataUnreadable", f"data.instanceUri: {error}", False
        except store.StoreUnavailable as error:
            return "StorageUnreachable", f"storage.endpoint {ref.spec.storage.endpoint}: {error}", False
        try:
            store.check_model_source(creds, source)
        except store.StoreRefused as error:
            return "ModelSourceUnreachable", f"model.source: {error}", False
        except store.StoreUnavailable as error:
            return "StorageUnreachable", f"storage.endpoint {ref.spec.storage.endpoint}: {error}", False
        return None

    def _secret(self, namespace: str, name: str, keys: tuple[str, ...], fresh: bool = False) -> dict[str, str] | None:
        """The credentials Secret's named keys, reused for a few seconds (a burst of jobs shares one;
        never logged). A missing Secret is never taken from the cache: it may have been created since."""
        key = (namespace, name, keys)
        now = datetime.now(timezone.utc).timestamp()
        with self._lock:
            cached = self._secrets.get(key)
        if cached and cached[1] is not None and not fresh and now < cached[0]:
            return cached[1]
        data = kube.read_secret_data(namespace, name, keys)
        with self._lock:
            if len(self._secrets) > 1000:
                self._secrets = {k: v for k, v in self._secrets.items() if v[0] > now}
            self._secrets[key] = (now + SECRET_CACHE_SECONDS, data)
        return data

    # ------------------------------------------------------------------ reading the world
    def _observe(self, ref: builders.JobRef, status: dict[str, Any], generation: int | None, now: datetime) -> lifecycle.Observation:
        gang = lifecycle.current_gang(status)
        owned = [j for j in self.children.jobs.owned_by(ref.namespace, ref.name) if lifecycle.owned_by(j, ref.uid)]
        current, stale_jobs = lifecycle.split_gangs(owned, gang)
        job = lifecycle.trainer_job_state(current) if current else None
        terminal = status.get("phase") in TERMINAL_PHASES
        pods: tuple[failures.PodState, ...] = ()
        old_pods: tuple[failures.PodState, ...] = ()
        stale_pods = 0
        nodes = ref.spec.resources.nodes
        placing = job is not None and not (job.suspended or job.succeeded or job.failed) and job.ready < nodes
        wants_pods = not terminal and (
            (job is None and gang > 0) or ref.spec.run_policy.suspend or (job is not None and job.failed)
            # a gang just created is given a few seconds before its placement is looked at
            or (placing and (job.created is None or (now - job.created).total_seconds() > PLACEMENT_LOOK_SECONDS))
        )
        if wants_pods:
            pods, old_pods = self._pods(ref, gang, job is not None and job.failed, now)
            stale_pods = sum(1 for pod in old_pods if not pod.ended)  # an ended pod a finalizer holds runs nothing
        refusal = ""
        if placing and wants_pods and job is not None and sum(1 for p in pods if not p.ended and p.deletion_deadline is None) < nodes:
            refusal = kube.latest_event_message(ref.namespace, job.uid, "FailedCreate")
        progress = latest = None
        if not terminal and job is not None and not job.suspended and (job.active or job.succeeded or job.failed):
            # A trainer that exited 0 wrote its last record: read it now (the poll may not be due).
            finishing = any(pod.exit_code == 0 or pod.phase == "Succeeded" for pod in pods)
            progress, latest = self._progress(ref, status, force=job.succeeded or finishing)
        serving = shared = None
        policy_hash = None
        if terminal or (job is not None and job.succeeded):
            deployment = self.children.deployments.get(ref.namespace, builders.inference_name(ref.name))
            if deployment is not None and lifecycle.owned_by(deployment, ref.uid):
                serving = lifecycle.serving_state(deployment)
                policy_hash = self._network_policy_hash(ref)
            if ref.spec.serving.server and ref.spec.serving.enabled:
                shared = registration.observe(ref)
        export = None
        if (terminal and status.get("phase") == "Succeeded") or (job is not None and job.succeeded):
            export = self._export(ref, owned)
        queue, queue_name = None, ref.queue_name or (job.queue_name if job else "")
        if job is not None and job.suspended and not terminal:
            workload = self.children.workloads.by_job_uid(job.uid)
            queue = lifecycle.queue_state(workload)
            # Kueue's default LocalQueue or manageJobsWithoutQueueName: queued though the job named no queue.
            queue_name = queue_name or ((workload or {}).get("spec") or {}).get("queueName", "")
        return lifecycle.Observation(
            name=ref.name, namespace=ref.namespace, generation=generation, spec=ref.spec, status=status, now=now,
            job=job, stale_jobs=stale_jobs, stale_pods=stale_pods, pods=pods, old_pods=old_pods, progress=progress,
            latest_checkpoint=latest, serving=serving, queue_name=queue_name, queue=queue, shared=shared,
            refusal=refusal, network_policy_hash=policy_hash, export=export,
            pod_groups_served=job is None and not terminal and self._pod_groups_served(),
        )

    def _export(self, ref: builders.JobRef, owned: list[dict[str, Any]]) -> lifecycle.ExportState | None:
        """Is serving.checkpoint's export in storage (asked until it is: then remembered), and its
        export Job's state; None when nothing is to wait for (final, serving off, storage away)."""
        checkpoint = ref.spec.serving.checkpoint
        if checkpoint == "final" or not ref.spec.serving.enabled:
            return None
        prefix = served_export_prefix(checkpoint)
        key = (ref.uid, prefix)
        with self._lock:
            if key in self._exports_seen:
                return lifecycle.ExportState(prefix, True)
        secret_ref = ref.spec.storage.credentials_secret_ref
        try:
            secret = self._secret(ref.namespace, secret_ref.name, (secret_ref.access_key_key, secret_ref.secret_key_key)) or {}
            exported = store.is_exported(_credentials(ref.spec, secret), ref.output_uri, prefix)
        except (KeyError, kube.SecretValueUnreadable, store.StoreUnavailable, store.StoreRefused) as error:
            log.info("%s/%s: export %s not checked: %s", ref.namespace, ref.name, prefix, error)
            return None  # what is served now keeps serving; the next look asks again
        if exported:
            with self._lock:
                if len(self._exports_seen) > SPECS_KEPT:
                    self._exports_seen.clear()
                self._exports_seen.add(key)
            return lifecycle.ExportState(prefix, True)
        name = builders.export_job_name(ref.name, checkpoint)
        found = next((j for j in owned if j["metadata"]["name"] == name and not j["metadata"].get("deletionTimestamp")), None)
        state = lifecycle.trainer_job_state(found) if found else None
        failure = self._export_failure(ref, name) if state is not None and state.failed else ""
        return lifecycle.ExportState(prefix, False, state, failure)

    @staticmethod
    def _export_failure(ref: builders.JobRef, job_name: str) -> str:
        """The failed export pod's error line (its termination message: the end of its log)."""
        for pod in kube.list_pods(ref.namespace, {"job-name": job_name}):
            for container in (pod.get("status") or {}).get("containerStatuses") or []:
                text = (((container.get("state") or {}).get("terminated") or {}).get("message") or "").strip()
                lines = [line for line in text.splitlines() if line.strip()]
                errors = [line for line in lines if line.startswith("error:")]
                if errors or lines:
                    return (errors or lines)[-1].removeprefix("error:").strip()[:500]
        return ""

    @staticmethod
    def _network_policy_hash(ref: builders.JobRef) -> str | None:
        """The served job's NetworkPolicy as built ("" when missing or not this job's: made again)."""
        policy = kube.read_object("networking.k8s.io/v1", "NetworkPolicy", ref.namespace, network_policy_name(ref.name))
        if policy is None or not lifecycle.owned_by(policy, ref.uid):
            return ""
        return ((policy.get("metadata") or {}).get("annotations") or {}).get(builders.ANNOTATION_SPEC_HASH, "")

    def _pods(self, ref: builders.JobRef, gang: int, failed: bool, now: datetime) -> tuple[tuple[failures.PodState, ...], tuple[failures.PodState, ...]]:
        """Pods of the current gang, and of older gangs (with their nodes' readiness when it matters)."""
        # A deleted job of the same name may leave pods behind: only this job's (pods made by older
        # operators carry no uid label and count as this job's).
        raw = [pod for pod in kube.list_trainer_pods(ref.namespace, ref.name)
               if ((pod.get("metadata") or {}).get("labels") or {}).get(builders.LABEL_JOB_UID, ref.uid) == ref.uid]
        readiness: dict[str, bool | None] = {}

        def ready(pod: dict[str, Any], needed: bool) -> bool | None:
            node = (pod.get("spec") or {}).get("nodeName")
            if not node or not needed:
                return None
            if node not in readiness:
                readiness[node] = kube.node_ready(node)
            return readiness[node]

        current, old = [], []
        for pod in raw:
            number = lifecycle.pod_state(pod).gang
            if number == gang:
                deleting = parse_time(pod["metadata"].get("deletionTimestamp"))
                current.append(lifecycle.pod_state(pod, ready(pod, failed or (deleting is not None and now > deleting))))
            elif number < gang:
                deleting = parse_time(pod["metadata"].get("deletionTimestamp"))
                old.append(lifecycle.pod_state(pod, ready(pod, deleting is not None and now > deleting)))
        return tuple(current), tuple(old)

    def _progress(self, ref: builders.JobRef, status: dict[str, Any], force: bool) -> tuple[dict[str, Any] | None, str | None]:
        """progress.json and `latest`, read when the job's poll is due (adapted to its step time)."""
        key = f"{ref.namespace}/{ref.name}"
        clock = datetime.now(timezone.utc).timestamp()
        with self._lock:
            # The first record comes after the model loads: no read in the gang's first seconds.
            poll = self._polls.setdefault(key, _ProgressPoll(due=clock + polling.FIRST_SECONDS, since=clock))
            if not force and clock < poll.due:
                return None, None
        secret_ref = ref.spec.storage.credentials_secret_ref
        try:
            secret = self._secret(ref.namespace, secret_ref.name, (secret_ref.access_key_key, secret_ref.secret_key_key)) or {}
            creds = _credentials(ref.spec, secret)
            record = store.read_progress(creds, ref.output_uri)
            latest = store.read_latest_checkpoint(creds, ref.output_uri)
        except (KeyError, kube.SecretValueUnreadable, store.StoreUnavailable, store.StoreRefused) as error:
            # Progress is best effort: training goes on while storage is briefly away (no event).
            log.info("%s: progress not readable: %s", key, error)
            with self._lock:
                poll.due = clock + polling.MAX_SECONDS / 2
            return None, None
        current = polling.sample(record)
        with self._lock:
            poll.interval = polling.next_poll_seconds(poll.sample, current, poll.interval, clock - poll.since)
            poll.sample = current or poll.sample
            poll.due = clock + poll.interval
        return record, latest

    def _next_look(self, ref: builders.JobRef, plan: lifecycle.Plan, obs: lifecycle.Observation) -> float | None:
        """When to reconcile again without an event: the plan's wish, or the next progress poll."""
        wanted = plan.requeue_after
        running = obs.job is not None and not obs.job.suspended and obs.job.active and plan.phase in ("Running", "Pending")
        if running:
            with self._lock:
                poll = self._polls.get(f"{ref.namespace}/{ref.name}")
                due = max(0.5, poll.due - datetime.now(timezone.utc).timestamp()) if poll else polling.FIRST_SECONDS
            wanted = due if wanted is None else min(wanted, due)
        if plan.phase in TERMINAL_PHASES:
            with self._lock:
                self._polls.pop(f"{ref.namespace}/{ref.name}", None)
        return wanted

    # ------------------------------------------------------------------ acting
    def _act(self, body: dict[str, Any], ref: builders.JobRef, obs: lifecycle.Observation, action: lifecycle.Action) -> None:
        ns, name, uid = ref.namespace, ref.name, ref.uid
        owner = builders.owner_reference(API_VERSION, KIND, name, uid)
        if action.kind == "create_job":
            # The Job only once its ConfigMap and Service are this job's: a collision makes no pod.
            first = [builders.build_config_map(ref), builders.build_worker_service(ref), build_job_network_policy(ref)]
            if action.value:  # the PodGroup before the pods that join it
                first.append(builders.build_pod_group(ref, action.gang or 0))
            made = self._create_all(ref, owner, tuple(first))
            self._create_all(ref, owner, (builders.build_trainer_job(ref, action.gang or 0, bool(action.value)),), undo=made)
        elif action.kind == "delete_job":
            if kube.delete_job(ns, builders.trainer_job_name(name, action.gang or 0), uid):
                log.info("%s/%s: deleted Job %s", ns, name, builders.trainer_job_name(name, action.gang or 0))
            if self._pod_groups_served():
                kube.delete_owned(builders.POD_GROUP_API, "PodGroup", ns, builders.trainer_job_name(name, action.gang or 0), uid)
        elif action.kind == "suspend_job":
            kube.set_job_suspended(ns, builders.trainer_job_name(name, action.gang or 0), bool(action.value))
        elif action.kind == "force_delete_pod":
            log.warning("%s/%s: force-deleting pod %s (past its grace period on a lost node)", ns, name, action.target)
            kube.force_delete_pod(ns, action.target)
        elif action.kind == "ensure_serving":
            self._create_all(ref, owner, (builders.build_inference_deployment(ref), builders.build_inference_service(ref),
                                          build_job_network_policy(ref)))
        elif action.kind == "create_export_job":
            # Its ConfigMap is the gang's (kept while the job exists); made again if someone removed it.
            self._create_all(ref, owner, (builders.build_config_map(ref), builders.build_export_job(ref)))
        elif action.kind == "ensure_network_policy":
            self._create_all(ref, owner, (build_job_network_policy(ref),))
        elif action.kind == "delete_serving":
            kube.delete_serving(ns, builders.inference_name(name), uid)
        elif action.kind == "register_adapter":
            registration.register(ref, datetime.now(timezone.utc))
        elif action.kind == "unregister_adapter":
            registration.unregister(ns, action.server or "", name, uid)
        elif action.kind == "delete_self":
            log.info("%s/%s: ttlSecondsAfterFinished passed: deleting it", ns, name)
            kube.delete_dreamboothjob(ns, name, uid)

    def _create_all(self, ref: builders.JobRef, owner: dict[str, Any], manifests: tuple[dict[str, Any], ...],
                    undo: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Create (or update) each, at once; a name taken by a stranger undoes what this step created
        (and `undo`, created just before). Returns what it created."""
        for manifest in manifests:
            manifest["metadata"]["ownerReferences"] = [owner]
        futures = [(manifest, _POOL.submit(kube.ensure, manifest, ref.uid)) for manifest in manifests]
        created, problem = [], None
        for manifest, future in futures:
            try:
                if future.result():
                    created.append(manifest)
            except Exception as error:  # the first problem wins; the others are waited for
                problem = problem or error
        for manifest in created:
            if manifest["kind"] == "Job":
                log.info("%s/%s: created Job %s", ref.namespace, ref.name, manifest["metadata"]["name"])
        if isinstance(problem, kube.NotOwned):
            for manifest in created + (undo or []):
                kube.delete_owned(manifest["apiVersion"], manifest["kind"], ref.namespace, manifest["metadata"]["name"], ref.uid)
        if problem is not None:
            raise problem
        return created

    def _commit(self, body: dict[str, Any], plan: lifecycle.Plan) -> None:
        """Write what changed in status (precondition: the resourceVersion decided on), then Events."""
        meta = body["metadata"]
        old = body.get("status") or {}
        patch = {key: value for key, value in plan.status.items() if old.get(key) != value}
        patch.update({key: None for key in old if key not in plan.status})
        if patch:
            written = kube.patch_status(meta["namespace"], meta["name"], patch, meta.get("resourceVersion"))
            if written is not None:
                meta["resourceVersion"] = written["metadata"]["resourceVersion"]
                self.own_writes(f"{meta['namespace']}/{meta['name']}", meta["resourceVersion"])
            body["status"] = {**old, **{k: v for k, v in patch.items() if v is not None}}
            for key in [k for k, v in patch.items() if v is None]:
                body["status"].pop(key, None)
        if int(plan.status.get("restarts") or 0) > int(old.get("restarts") or 0):
            metrics.RESTARTS.inc()
        if int(plan.status.get("disruptions") or 0) > int(old.get("disruptions") or 0):
            metrics.DISRUPTIONS.inc()
        metrics.record_phase(f"{meta['namespace']}/{meta['name']}", plan.phase)
        for event_type, reason, message in plan.events:
            self.post_event(body, event_type, reason, message)
            log.log(logging.WARNING if event_type == "Warning" else logging.INFO, "%s/%s: %s: %s",
                    meta["namespace"], meta["name"], reason, message)


def _credentials(spec: DreamboothJobSpec, secret: dict[str, str]) -> store.Credentials:
    ref = spec.storage.credentials_secret_ref
    return store.Credentials(
        endpoint=spec.storage.endpoint,
        secure=spec.storage.secure,
        access_key=secret[ref.access_key_key],
        secret_key=secret[ref.secret_key_key],
        region=spec.storage.region,
    )
