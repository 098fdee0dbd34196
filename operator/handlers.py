"""kopf handlers: thin. They read the world (`kube`, `store`), let `lifecycle.decide` choose,
act through `kube`, and record status. Run: `kopf run -m dreambooth_operator.handlers -A`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime, timezone
from typing import Any

import kopf

from dreambooth_trainer.config import ConfigError
from dreambooth_trainer.spec import GROUP, PLURAL, VERSION, DreamboothJobSpec, parse_spec, with_operator_defaults

from . import builders, kube, lifecycle, metrics, registration, store
from .network_policies import build_job_network_policy
from .shared_server import LABEL_SERVER
from .conditions import ACCEPTED, FAILED, TERMINAL_PHASES, is_true

# Timers catch what no event announces (progress, backoff expiry, deadlines, TTL).
RECONCILE_INTERVAL = 10.0
TEMPORARY_DELAY = 15.0
CHILD_LABELS = {builders.LABEL_MANAGED_BY: "dreambooth-operator"}

def operator_defaults(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, Any]:
    """What this installation fills in for jobs that leave it out (the chart sets these env vars)."""
    secure = environ.get("DREAMBOOTH_STORAGE_SECURE", "").strip().lower()
    secret = environ.get("DREAMBOOTH_STORAGE_CREDENTIALS_SECRET") or None
    read_only = environ.get("DREAMBOOTH_STORAGE_SERVING_CREDENTIALS_SECRET") or None
    return {
        "resources.image": environ.get("DREAMBOOTH_TRAINER_IMAGE") or None,
        "serving.image": environ.get("DREAMBOOTH_INFERENCE_IMAGE") or None,
        "storage.endpoint": environ.get("DREAMBOOTH_STORAGE_ENDPOINT") or None,
        "storage.bucket": environ.get("DREAMBOOTH_STORAGE_BUCKET") or None,
        "storage.secure": {"true": True, "false": False}.get(secure),
        "storage.credentialsSecretRef": {"name": secret} if secret else None,
        "storage.servingCredentialsSecretRef": {"name": read_only} if read_only else None,
    }


def spec_with_defaults(raw: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The job's spec completed by the installation's defaults; `secure` goes with the endpoint, and
    the read-only serving Secret with the installation's read-write one."""
    storage = raw.get("storage") or {}
    if "endpoint" in storage:
        defaults = {path: value for path, value in defaults.items() if path != "storage.secure"}
    if "credentialsSecretRef" in storage:
        defaults = {path: value for path, value in defaults.items() if path != "storage.servingCredentialsSecretRef"}
    return with_operator_defaults(raw, defaults)


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    # Progress and diff-base in annotations: status stays the job's, and is never pruned away.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # Events come from transitions, not from every log line
    settings.execution.max_workers = int(os.environ.get("DREAMBOOTH_OPERATOR_WORKERS", "8"))
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # With Roles limited to some namespaces (the chart's rbac.namespaces), cluster-wide
    # scanning is forbidden: skip it instead of retrying for a minute at start-up.
    settings.scanning.disabled = os.environ.get("DREAMBOOTH_OPERATOR_SCANNING", "true").lower() == "false"
    # A deleted job's timer is noticed within seconds, so its finalizer goes promptly.
    settings.background.cancellation_polling = 2
    port = int(os.environ.get("DREAMBOOTH_OPERATOR_METRICS_PORT", "9464"))
    if port:
        metrics.serve(port)
        logger.info("metrics on :%d/metrics", port)


@kopf.on.create(GROUP, VERSION, PLURAL)
def on_create(name: str, namespace: str, logger: logging.Logger, **_: Any) -> None:
    reconcile(namespace, name, logger)


@kopf.on.resume(GROUP, VERSION, PLURAL)
def on_resume(name: str, namespace: str, logger: logging.Logger, **_: Any) -> None:
    reconcile(namespace, name, logger)


@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_spec_change(name: str, namespace: str, logger: logging.Logger, **_: Any) -> None:
    reconcile(namespace, name, logger)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RECONCILE_INTERVAL, sharp=False)
def on_timer(name: str, namespace: str, logger: logging.Logger, **_: Any) -> None:
    reconcile(namespace, name, logger)


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
@kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS)
def on_child_event(labels: dict[str, str], namespace: str, logger: logging.Logger, **_: Any) -> None:
    owner = labels.get(builders.LABEL_JOB)
    if owner:
        reconcile(namespace, owner, logger)
    elif labels.get(LABEL_SERVER):  # a shared server: every job it serves may change ServingReady
        for job in registration.registered_jobs(namespace, labels[LABEL_SERVER]):
            reconcile(namespace, job, logger)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def on_delete(name: str, namespace: str, uid: str, status: dict[str, Any], logger: logging.Logger, **_: Any) -> None:
    # Children go with the owner references (garbage collector); a shared server's registry
    # entry is taken out here at once (and swept later, should this fail).
    server = (status.get("serving") or {}).get("server")
    if server:
        try:
            registration.unregister(namespace, server, name, uid)
        except kube.KubeError as error:
            logger.warning("adapter %s stays registered with %s until the next sweep: %s", name, server, error)
    metrics.forget(f"{namespace}/{name}")
    with _locks_guard:
        _locks.pop(f"{namespace}/{name}", None)


# --- the reconcile ------------------------------------------------------------------------


def _lock_for(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def reconcile(namespace: str, name: str, logger: logging.Logger) -> None:
    """Read the job fresh, converge it one step; serialized per job across handlers."""
    key = f"{namespace}/{name}"
    started = time.monotonic()
    with _lock_for(key):
        body = kube.read_dreamboothjob(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        try:
            _reconcile(body, logger)
        except (store.StoreUnavailable, kube.KubeError) as error:
            raise kopf.TemporaryError(str(error), delay=TEMPORARY_DELAY) from None
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)


def _reconcile(body: dict[str, Any], logger: logging.Logger) -> None:
    meta = body["metadata"]
    status = body.get("status") or {}
    now = datetime.now(timezone.utc)
    generation = meta.get("generation")
    conditions = status.get("conditions") or []
    try:
        spec = parse_spec(spec_with_defaults(body.get("spec") or {}, operator_defaults()))
    except ConfigError as error:
        if status.get("phase") != "Failed":
            _commit(body, lifecycle.reject(status, generation, now, "InvalidSpec", str(error)), logger)
            raise kopf.PermanentError(f"invalid spec: {error}") from None
        return
    ref = builders.JobRef(meta["name"], meta["namespace"], meta["uid"], spec)
    if not is_true(conditions, ACCEPTED):
        if is_true(conditions, FAILED):
            return  # refused earlier: no pods, no retry storm
        problem = admission_problem(ref)
        if problem:
            _commit(body, lifecycle.reject(status, generation, now, *problem), logger)
            return
        plan = lifecycle.accept(status, generation, now, ref.output_uri)
        _commit(body, plan, logger)
        status = plan.status
        _ensure_training_objects(body, ref)
    plan = lifecycle.decide(observe(ref, status, generation, now, logger))
    _commit(body, plan, logger)
    for action in plan.actions:
        _act(body, ref, action, logger)


def admission_problem(ref: builders.JobRef) -> tuple[str, str] | None:
    """What admission cannot check: the Secret, the instance images, the model source."""
    secret_ref = ref.spec.storage.credentials_secret_ref
    data = kube.read_secret_data(ref.namespace, secret_ref.name)
    if data is None:
        return "SecretNotFound", f"storage.credentialsSecretRef: Secret {ref.namespace}/{secret_ref.name} does not exist"
    for key in (secret_ref.access_key_key, secret_ref.secret_key_key):
        if not data.get(key):
            return "SecretKeyMissing", f"storage.credentialsSecretRef: Secret {secret_ref.name} has no key {key!r}"
    creds = _credentials(ref.spec, data)
    try:
        store.check_instance_images(creds, ref.spec.data.instance_uri)
    except store.StoreRefused as error:
        return "InstanceDataUnreadable", f"data.instanceUri: {error}"
    try:
        store.check_model_source(creds, ref.spec.model.source)
    except store.StoreRefused as error:
        return "ModelSourceUnreachable", f"model.source: {error}"
    if not ref.spec.model.source.startswith(("tiny", "hf://", "s3://", "/")):
        return "ModelSourceUnreachable", f"model.source {ref.spec.model.source!r}: a relative path is not reachable from the pods; use s3://, hf:// or an absolute path in the image"
    return None


def _credentials(spec: DreamboothJobSpec, secret: dict[str, str]) -> store.Credentials:
    ref = spec.storage.credentials_secret_ref
    return store.Credentials(
        endpoint=spec.storage.endpoint,
        secure=spec.storage.secure,
        access_key=secret[ref.access_key_key],
        secret_key=secret[ref.secret_key_key],
        region=spec.storage.region,
    )


def observe(ref: builders.JobRef, status: dict[str, Any], generation: int | None, now: datetime, logger: logging.Logger) -> lifecycle.Observation:
    gang = int(status.get("restarts") or 0)
    current, stale_jobs = lifecycle.split_gangs(kube.list_trainer_jobs(ref.namespace, ref.name), gang)
    job = lifecycle.trainer_job_state(current) if current else None
    stale_pods = 0
    if job is None or ref.spec.run_policy.suspend:
        stale_pods = lifecycle.count_stale_pods(kube.list_trainer_pods(ref.namespace, ref.name), gang)
    progress = latest = None
    terminal = status.get("phase") in TERMINAL_PHASES
    if not terminal:
        progress, latest = _read_progress(ref, status, logger)
    serving = shared = None
    if terminal or (job is not None and job.succeeded):
        serving = lifecycle.serving_state(kube.read_deployment(ref.namespace, builders.inference_name(ref.name)))
        shared = registration.observe(ref) if ref.spec.serving.server and ref.spec.serving.enabled else None
    return lifecycle.Observation(
        name=ref.name, namespace=ref.namespace, generation=generation, spec=ref.spec, status=status, now=now,
        job=job, stale_jobs=stale_jobs, stale_pods=stale_pods, progress=progress, latest_checkpoint=latest, serving=serving,
        shared=shared,
    )


def _read_progress(ref: builders.JobRef, status: dict[str, Any], logger: logging.Logger) -> tuple[dict[str, Any] | None, str | None]:
    secret = kube.read_secret_data(ref.namespace, ref.spec.storage.credentials_secret_ref.name) or {}
    try:
        creds = _credentials(ref.spec, secret)
        return store.read_progress(creds, ref.output_uri), store.read_latest_checkpoint(creds, ref.output_uri)
    except (KeyError, store.StoreUnavailable, store.StoreRefused) as error:
        # Progress is best effort: training goes on while storage is briefly away.
        logger.warning("progress not readable: %s", error)
        return None, None


def _ensure_training_objects(body: dict[str, Any], ref: builders.JobRef) -> None:
    for manifest in (builders.build_config_map(ref), builders.build_worker_service(ref), build_job_network_policy(ref)):
        kopf.append_owner_reference(manifest, owner=body)
        kube.ensure(manifest)


def _act(body: dict[str, Any], ref: builders.JobRef, action: lifecycle.Action, logger: logging.Logger) -> None:
    ns, name = ref.namespace, ref.name
    if action.kind == "create_job":
        _ensure_training_objects(body, ref)
        manifest = builders.build_trainer_job(ref, action.gang or 0)
        kopf.append_owner_reference(manifest, owner=body)
        if kube.ensure(manifest):
            logger.info("created Job %s", manifest["metadata"]["name"])
    elif action.kind == "delete_job":
        if kube.delete_job(ns, builders.trainer_job_name(name, action.gang or 0)):
            logger.info("deleted Job %s", builders.trainer_job_name(name, action.gang or 0))
    elif action.kind == "suspend_job":
        kube.set_job_suspended(ns, builders.trainer_job_name(name, action.gang or 0), bool(action.value))
    elif action.kind == "ensure_serving":
        for manifest in (builders.build_inference_deployment(ref), builders.build_inference_service(ref)):
            kopf.append_owner_reference(manifest, owner=body)
            kube.ensure(manifest)
    elif action.kind == "delete_serving":
        kube.delete_serving(ns, builders.inference_name(name))
    elif action.kind == "register_adapter":
        registration.register(ref, datetime.now(timezone.utc))
    elif action.kind == "unregister_adapter":
        registration.unregister(ns, action.server or "", name, ref.uid)
    elif action.kind == "delete_self":
        logger.info("ttlSecondsAfterFinished passed: deleting %s/%s", ns, name)
        kube.delete_dreamboothjob(ns, name)


def _commit(body: dict[str, Any], plan: lifecycle.Plan, logger: logging.Logger) -> None:
    """Write what changed in status (before acting, so a crash never loses a decision), then Events."""
    meta = body["metadata"]
    old = body.get("status") or {}
    patch = {key: value for key, value in plan.status.items() if key != "kopf" and old.get(key) != value}
    patch.update({key: None for key in old if key not in plan.status and key != "kopf"})
    if patch:
        kube.patch_status(meta["namespace"], meta["name"], patch)
        body["status"] = {**old, **{k: v for k, v in patch.items() if v is not None}}
        for key in [k for k, v in patch.items() if v is None]:
            body["status"].pop(key, None)
    if int(plan.status.get("restarts") or 0) > int(old.get("restarts") or 0):
        metrics.RESTARTS.inc()
    metrics.record_phase(f"{meta['namespace']}/{meta['name']}", plan.phase)
    for event_type, reason, message in plan.events:
        kopf.event(body, type=event_type, reason=reason, message=message)
        if event_type == "Warning":
            logger.warning("%s: %s", reason, message)
        else:
            logger.info("%s: %s", reason, message)
