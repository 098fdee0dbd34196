"""One inference server per base model, shared by the LoRA jobs that name it (`serving.server`).

Pure: the server's definition, who may share it, registry edits, and the manifests. What talks
to the API is `registration.py`.

Objects, in the jobs' namespace, for `serving.server: sd15`:
- ConfigMap `sd15-registry`: `registry.json`, the adapters the server draws (model name = job
  name -> `<outputUri>/final/lora`, dreambooth_serving.registry), and `server.json`, how the
  server runs (base model, image, resources, storage, token; fixed by the job that created it).
  Its ownerReferences list every registered job, none as controller, so the garbage collector
  deletes it when the last of them is gone and drops a deleted job's reference before that.
- Deployment, Service and NetworkPolicy `sd15-shared`, owned by that ConfigMap: `dreambooth serve
  --model <base> --model-name sd15 --registry <mounted registry.json>`. The kubelet rewrites the
  mounted file when the ConfigMap changes, and the server follows the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ConfigDict

from dreambooth_serving.registry import REGISTRY_KEY, AdapterEntry, RegistryDocument, parse_registry, registry_json
from dreambooth_api.v1alpha1.sections import Section
from dreambooth_api.v1alpha1.spec import TINY_FAMILIES, DreamboothJobSpec, IngressPeer, ServingAuth, ServingResources, StorageSpec, served_export_prefix, spec_family

from . import builders
from .conditions import format_time
from .network_policies import build_shared_network_policy

DEFINITION_KEY = "server.json"
REGISTRY_MOUNT = "/etc/dreambooth/registry"
COMPONENT = "shared-inference"
LABEL_SERVER = "dreambooth.dev/server"
REGISTRY_COMPONENT = "adapter-registry"


@dataclass(frozen=True)
class SharedServerState:
    """What a job's reconcile sees of its shared server."""

    server: str
    registered: bool = False  # this job's adapter is in the registry, as it should be
    stale: bool = False  # entries of deleted jobs wait to be dropped
    running: bool = False  # the server's Deployment exists
    ready_replicas: int = 0
    conflict: str | None = None  # why this job cannot share the server
    answers: bool = False  # every ready server pod answers GET /v1/models/<job> (its registry file caught up)


class ServerDefinition(Section):
    """How a shared server runs; taken from the job that created it."""

    model_config = ConfigDict(extra="ignore")

    base_model: str
    family: str | None = None  # model.family as the job named or implied it
    tiny_seed: int | None = None
    tiny_resolution: int | None = None
    image: str
    replicas: int
    resources: ServingResources
    storage: StorageSpec
    auth: ServingAuth
    ingress_from: list[IngressPeer] = []


def definition_from(spec: DreamboothJobSpec) -> ServerDefinition:
    tiny = spec.model.source in TINY_FAMILIES
    return ServerDefinition(
        base_model=spec.model.source,
        family=spec_family(spec.model),
        tiny_seed=spec.training.seed if tiny else None,
        tiny_resolution=spec.model.tiny_resolution if tiny else None,
        image=spec.serving.image,
        replicas=spec.serving.replicas,
        resources=spec.serving.resources,
        storage=spec.storage,
        auth=spec.serving.auth,
        ingress_from=spec.serving.ingress_from,
    )


def base_model_text(definition: ServerDefinition) -> str:
    if definition.tiny_seed is None:
        return definition.base_model
    return f"{definition.base_model} (training.seed {definition.tiny_seed}, model.tinyResolution {definition.tiny_resolution})"


def sharing_conflict(server: str, job_name: str, existing: ServerDefinition, wanted: ServerDefinition) -> str | None:
    """Why a job cannot put its adapter on this server (the message names the field), or None."""
    if job_name == server:
        return f"a job named like its server ({server}) would hide the server's base model: rename the job or the server"
    if existing.family and wanted.family and existing.family != wanted.family:
        return (f"serving.server {server} serves a {existing.family} model; this job's model.family is {wanted.family}: "
                "adapters of one family cannot load into another: name another server")
    if base_model_text(existing) != base_model_text(wanted):
        return (f"serving.server {server} serves base model {base_model_text(existing)}; this job trained on "
                f"{base_model_text(wanted)}: name another server")
    mine, theirs = wanted.storage, existing.storage
    read_with = (theirs.serving_credentials_secret_ref or theirs.credentials_secret_ref).name
    if (mine.endpoint, mine.secure) != (theirs.endpoint, theirs.secure) or \
            (mine.serving_credentials_secret_ref or mine.credentials_secret_ref).name != read_with:
        return (f"serving.server {server} reads storage at {theirs.endpoint} with Secret {read_with}; "
                "this job's storage or credentials differ: name another server")
    if existing.ingress_from != wanted.ingress_from:
        return (f"serving.server {server} admits {_peers(existing.ingress_from)} to its inference port; this job's "
                "serving.ingressFrom differs (one set of peers per server): name the same peers or another server")
    if existing.auth != wanted.auth:
        token = existing.auth.token_secret_ref
        return (f"serving.server {server} takes its token from "
                f"{f'Secret {token.name} key {token.key}' if token else 'no Secret (it is open)'}; "
                "serving.auth.tokenSecretRef must name the same (one token per server)")
    return None


def _peers(peers: list[IngressPeer]) -> str:
    if not peers:
        return "every pod of its namespace"
    return "; ".join(peer.model_dump_json(by_alias=True, exclude_none=True) for peer in peers)


# --- names and labels ------------------------------------------------------------------------


def registry_name(server: str) -> str:
    return f"{server}-registry"


def shared_name(server: str) -> str:
    return f"{server}-shared"


def shared_url(server: str, namespace: str) -> str:
    return f"http://{shared_name(server)}.{namespace}.svc:{builders.SERVE_PORT}"


def shared_labels(server: str, component: str) -> dict[str, str]:
    return {
        builders.LABEL_NAME: "dreambooth",
        builders.LABEL_INSTANCE: server,
        builders.LABEL_MANAGED_BY: "dreambooth-operator",
        builders.LABEL_COMPONENT: component,
        LABEL_SERVER: server,
    }


def shared_selector(server: str) -> dict[str, str]:
    return {LABEL_SERVER: server, builders.LABEL_COMPONENT: COMPONENT}


def adapter_uri(job: builders.JobRef) -> str:
    return f"{job.output_uri}/{served_export_prefix(job.spec.serving.checkpoint)}/lora"


def ready_pod_names(pods: list[dict[str, Any]]) -> list[str]:
    """The pods that are Ready and not going away: those the Service sends requests to."""
    def ready(pod: dict[str, Any]) -> bool:
        conditions = (pod.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    return sorted(p["metadata"]["name"] for p in pods if ready(p) and not p["metadata"].get("deletionTimestamp"))


# --- the registry ConfigMap -----------------------------------------------------------------


def read_registry(config_map: dict[str, Any] | None) -> tuple[RegistryDocument, ServerDefinition | None]:
    data = (config_map or {}).get("data") or {}
    document = parse_registry(data.get(REGISTRY_KEY, ""), "registry ConfigMap")
    definition = ServerDefinition.model_validate_json(data[DEFINITION_KEY]) if DEFINITION_KEY in data else None
    return document, definition


def owner_reference(api_version: str, kind: str, name: str, uid: str, controller: bool = False) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": controller,
            "blockOwnerDeletion": controller}


def job_owner(job: builders.JobRef) -> dict[str, Any]:
    from dreambooth_api.v1alpha1.spec import API_VERSION, KIND

    return owner_reference(API_VERSION, KIND, job.name, job.uid)


def stale_adapters(config_map: dict[str, Any]) -> list[str]:
    """Entries whose job is no longer an owner (the garbage collector dropped its reference)."""
    document, _ = read_registry(config_map)
    owners = {ref.get("uid") for ref in config_map["metadata"].get("ownerReferences") or []}
    return sorted(name for name, entry in document.adapters.items() if entry.uid not in owners)


def is_registered(config_map: dict[str, Any] | None, job: builders.JobRef) -> bool:
    if config_map is None:
        return False
    entry = read_registry(config_map)[0].adapters.get(job.name)
    owners = {ref.get("uid") for ref in config_map["metadata"].get("ownerReferences") or []}
    return entry is not None and entry.uid == job.uid and entry.uri == adapter_uri(job) and job.uid in owners


def with_adapter(config_map: dict[str, Any] | None, job: builders.JobRef, server: str, now: datetime) -> dict[str, Any]:
    """The registry ConfigMap with `job`'s adapter in it (created when absent), stale entries out."""
    if config_map is None:
        definition = definition_from(job.spec)
        config_map = {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": registry_name(server), "namespace": job.namespace,
                         "labels": shared_labels(server, REGISTRY_COMPONENT), "ownerReferences": []},
            "data": {DEFINITION_KEY: definition.model_dump_json(by_alias=True, exclude_none=True)},
        }
    config_map = without_adapters(config_map, stale_adapters(config_map) if "uid" in config_map["metadata"] else [])
    document, definition = read_registry(config_map)
    document.server, document.base_model = server, definition.base_model if definition else ""
    document.adapters[job.name] = AdapterEntry(uri=adapter_uri(job), job=job.name, uid=job.uid, registered=format_time(now))
    owners = [ref for ref in config_map["metadata"].get("ownerReferences") or [] if ref.get("name") != job.name]
    config_map["metadata"]["ownerReferences"] = [*owners, job_owner(job)]
    config_map["data"][REGISTRY_KEY] = registry_json(document)
    return config_map


def without_adapters(config_map: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The registry ConfigMap without these adapters and their jobs' ownerReferences."""
    if not names:
        return config_map
    document, _ = read_registry(config_map)
    uids = {document.adapters[name].uid for name in names if name in document.adapters}
    for name in names:
        document.adapters.pop(name, None)
    result = {**config_map, "metadata": dict(config_map["metadata"]), "data": dict(config_map.get("data") or {})}
    result["metadata"]["ownerReferences"] = [ref for ref in config_map["metadata"].get("ownerReferences") or []
                                             if ref.get("uid") not in uids]
    result["data"][REGISTRY_KEY] = registry_json(document)
    return result


# --- the server's manifests -----------------------------------------------------------------


def _shared_metadata(server: str, namespace: str, owner: dict[str, Any]) -> dict[str, Any]:
    return {"name": shared_name(server), "namespace": namespace, "labels": shared_labels(server, COMPONENT),
            "ownerReferences": [owner]}


def server_args(server: str, definition: ServerDefinition) -> list[str]:
    args = ["--model", definition.base_model, "--model-name", server, "--registry", f"{REGISTRY_MOUNT}/{REGISTRY_KEY}"]
    if definition.tiny_seed is not None:
        args += ["--tiny-seed", str(definition.tiny_seed), "--tiny-resolution", str(definition.tiny_resolution)]
    return args


def build_shared_deployment(server: str, namespace: str, definition: ServerDefinition, owner: dict[str, Any]) -> dict[str, Any]:
    volume = {"name": "registry", "configMap": {"name": registry_name(server), "items": [{"key": REGISTRY_KEY, "path": REGISTRY_KEY}]}}
    template = builders.inference_pod_template(
        shared_labels(server, COMPONENT), definition.image, server_args(server, definition),
        builders.serving_env(definition.storage, definition.auth), definition.resources,
        mounts=[{"name": "registry", "mountPath": REGISTRY_MOUNT, "readOnly": True}], volumes=[volume],
    )
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _shared_metadata(server, namespace, owner),
        "spec": {"replicas": definition.replicas, "selector": {"matchLabels": shared_selector(server)}, "template": template},
    }


def build_shared_service(server: str, namespace: str, owner: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _shared_metadata(server, namespace, owner),
        "spec": {
            "selector": shared_selector(server),
            "ports": [{"name": "http", "port": builders.SERVE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_shared_objects(server: str, namespace: str, definition: ServerDefinition, registry_uid: str) -> list[dict[str, Any]]:
    """Deployment, Service and NetworkPolicy of the server, owned by its registry ConfigMap."""
    owner = owner_reference("v1", "ConfigMap", registry_name(server), registry_uid, controller=True)
    return [
        build_shared_deployment(server, namespace, definition, owner),
        build_shared_service(server, namespace, owner),
        build_shared_network_policy(_shared_metadata(server, namespace, owner), shared_selector(server), definition.ingress_from),
    ]
