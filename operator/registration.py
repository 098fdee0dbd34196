"""Registering a finished LoRA job's adapter with its shared server, and taking it off again.

Every change is a read-modify-write of the server's registry ConfigMap at the resourceVersion it
was read at (replace, or delete with a precondition), retried on conflict: jobs finishing or
going away together never lose each other's entries. The one module besides `kube` and the
handlers that changes the cluster; decisions stay in `lifecycle` and `shared_server`.
"""
from __future__ import annotations

import logging
from datetime import datetime

from dreambooth_serving.settings import TOKEN_HEADER

from . import builders, kube
from .shared_server import (
    ServerDefinition,
    SharedServerState,
    build_shared_objects,
    definition_from,
    is_registered,
    read_registry,
    ready_pod_names,
    registry_name,
    shared_name,
    shared_selector,
    sharing_conflict,
    stale_adapters,
    with_adapter,
    without_adapters,
)

ATTEMPTS = 6
log = logging.getLogger("dreambooth.operator")


def observe(job: builders.JobRef) -> SharedServerState:
    server = job.spec.serving.server or ""
    config_map = kube.read_object("v1", "ConfigMap", job.namespace, registry_name(server))
    try:
        definition = read_registry(config_map)[1] if config_map else None
    except ValueError as error:  # edited by hand into something unreadable: say so, change nothing
        return SharedServerState(server, conflict=f"ConfigMap {registry_name(server)} is not a readable registry: {error}")
    conflict = sharing_conflict(server, job.name, definition or definition_from(job.spec), definition_from(job.spec))
    deployment = kube.read_deployment(job.namespace, shared_name(server))
    registered = is_registered(config_map, job)
    ready = int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)
    return SharedServerState(
        server=server,
        registered=registered,
        stale=bool(config_map and stale_adapters(config_map)),
        running=deployment is not None,
        ready_replicas=ready,
        conflict=conflict,
        answers=bool(registered and ready and not conflict and definition and server_answers(job, definition)),
    )


def server_answers(job: builders.JobRef, definition: ServerDefinition) -> bool:
    """Whether every ready pod of the job's server answers GET /v1/models/<job> (each pod's registry
    file follows the ConfigMap on its own, up to a minute after the registration)."""
    server, namespace = job.spec.serving.server or "", job.namespace
    try:
        pods = ready_pod_names(kube.list_pods(namespace, shared_selector(server)))
        ref = definition.auth.token_secret_ref
        token = kube.read_secret_key(namespace, ref.name, ref.key) if ref else None
    except kube.KubeError as error:
        log.info("cannot ask shared server %s/%s for %s yet: %s", namespace, server, job.name, error)
        return False
    headers = {TOKEN_HEADER: token} if token else {}
    return bool(pods) and all(kube.pod_get_status(namespace, pod, builders.SERVE_PORT, f"/v1/models/{job.name}", headers) == 200
                              for pod in pods)


def register(job: builders.JobRef, now: datetime) -> None:
    """Put the job's adapter in its server's registry (creating the server when it is the first),
    drop entries of jobs that are gone, and bring the server's objects to its definition."""
    server = job.spec.serving.server or ""
    for _ in range(ATTEMPTS):
        config_map = kube.read_object("v1", "ConfigMap", job.namespace, registry_name(server))
        definition = (read_registry(config_map)[1] if config_map else None) or definition_from(job.spec)
        if sharing_conflict(server, job.name, definition, definition_from(job.spec)):
            return  # the job's ServingReady says why; nothing to change
        updated = with_adapter(config_map, job, server, now)
        try:
            saved = kube.replace_object(updated) if config_map else kube.create_object(updated)
        except kube.Conflict:
            continue
        break
    else:
        raise kube.KubeError(f"ConfigMap {job.namespace}/{registry_name(server)} kept changing; retrying later")
    for manifest in build_shared_objects(server, job.namespace, definition, saved["metadata"]["uid"]):
        kube.ensure(manifest, saved["metadata"]["uid"])
    log.info("adapter %s registered with shared server %s/%s", job.name, job.namespace, server)


def unregister(namespace: str, server: str, job_name: str, uid: str | None = None) -> None:
    """Take the job's adapter (and any of deleted jobs) off the server; the last one out deletes
    the registry, and the server's objects go with it (they are its dependents)."""
    for _ in range(ATTEMPTS):
        config_map = kube.read_object("v1", "ConfigMap", namespace, registry_name(server))
        if config_map is None:
            return
        document, _ = read_registry(config_map)
        entry = document.adapters.get(job_name)
        mine = [job_name] if entry is not None and (uid is None or entry.uid == uid) else []
        leaving = mine + [name for name in stale_adapters(config_map) if name not in mine]
        if not leaving:
            return
        updated = without_adapters(config_map, leaving)
        try:
            if read_registry(updated)[0].adapters:
                kube.replace_object(updated)
            else:
                kube.delete_object("v1", "ConfigMap", namespace, registry_name(server), config_map["metadata"]["resourceVersion"])
        except kube.Conflict:
            continue
        log.info("adapters %s unregistered from shared server %s/%s", ", ".join(leaving), namespace, server)
        return
    raise kube.KubeError(f"ConfigMap {namespace}/{registry_name(server)} kept changing; retrying later")


def registered_jobs(namespace: str, server: str) -> list[str]:
    config_map = kube.read_object("v1", "ConfigMap", namespace, registry_name(server))
    return sorted(read_registry(config_map)[0].adapters) if config_map else []
