"""Every API permission the operator uses, and why: the one list the chart's RBAC, the docs'
table and the tests are checked against (`python -m dreambooth_operator.permissions` prints the table).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Permission:
    group: str  # "" is the core group
    resource: str
    verbs: tuple[str, ...]
    why: str
    cluster: bool = False  # a cluster-scoped grant (only in cluster-wide installs)


NAMESPACED = (
    Permission("dreambooth.dev", "dreamboothjobs", ("get", "list", "watch", "patch", "delete"),
               "kopf watches them; a reconcile reads one fresh; kopf drops a finalizer left by an older version (patch); ttlSecondsAfterFinished deletes it"),
    Permission("dreambooth.dev", "dreamboothjobs/status", ("patch",), "conditions, phase, progress, counters"),
    Permission("dreambooth.dev", "dreamboothjobs/finalizers", ("update",),
               "owner references with blockOwnerDeletion on what a job owns (OwnerReferencesPermissionEnforcement)"),
    Permission("", "secrets", ("get",), "the credentials named by spec.storage.credentialsSecretRef and a shared server's "
               "serving.auth.tokenSecretRef (to ask the server): read, never listed"),
    Permission("batch", "jobs", ("get", "list", "watch", "create", "patch", "delete"),
               "the gang's Indexed Job: watched (label-filtered by the server), created, suspended, deleted on restart"),
    Permission("", "pods", ("list", "delete"), "a gang's pods: placement and failure causes; force-delete one stuck on a lost node"),
    Permission("", "pods/proxy", ("get",), "GET /v1/models/<job> on each ready pod of a shared server: ServingReady once the server answers for the job"),
    Permission("", "configmaps", ("get", "create", "update", "delete"),
               "the trainer config; a shared server's adapter registry (replaced whole, deleted with its last adapter)"),
    Permission("", "services", ("get", "create", "patch", "delete"), "the headless worker Service and the inference Service"),
    Permission("apps", "deployments", ("get", "list", "watch", "create", "update", "delete"),
               "the inference Deployment and a shared server's: watched (label-filtered), created, rolled on edits, removed"),
    Permission("networking.k8s.io", "networkpolicies", ("get", "create", "update", "delete"),
               "one NetworkPolicy per job and per shared server: who may reach the trainers and the inference port"),
    Permission("scheduling.k8s.io", "podgroups", ("get", "create", "delete"),
               "a gang's PodGroup with a gang policy (all pods placed or none), where the cluster serves scheduling.k8s.io/v1alpha2"),
    Permission("", "events", ("create", "list"), "one Event per condition transition; a gang's Job's FailedCreate (why the cluster refused its pods)"),
    Permission("kueue.x-k8s.io", "workloads", ("list", "watch"),
               "Kueue's Workloads of the gangs, watched: admitted or why not (the Queued condition), deactivated, its LocalQueue"),
)
# Leader election between replicas (kopf peering): namespaced installs use one KopfPeering per namespace.
PEERING_NAMESPACED = Permission("kopf.dev", "kopfpeerings", ("get", "list", "watch", "patch"), "leader election between replicas (kopf peering)")
CLUSTER = (
    Permission("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch"), "kopf notices CRDs that appear or change", cluster=True),
    Permission("", "nodes", ("get",), "whether a stuck pod's node is gone (else the pod is given a minute more)", cluster=True),
    Permission("kopf.dev", "clusterkopfpeerings", ("get", "list", "watch", "patch"), "leader election between replicas (kopf peering)", cluster=True),
)


def cluster_wide() -> tuple[Permission, ...]:
    """What a cluster-wide install grants (one ClusterRole)."""
    return NAMESPACED + CLUSTER


def per_namespace() -> tuple[Permission, ...]:
    """What a namespaced install grants in each listed namespace (and nothing cluster-wide)."""
    return NAMESPACED + (PEERING_NAMESPACED,)


def grants(permissions: tuple[Permission, ...]) -> set[tuple[str, str, str]]:
    """(group, resource, verb) triples, as RBAC rules are compared."""
    return {(p.group, p.resource, verb) for p in permissions for verb in p.verbs}


def markdown_table() -> str:
    rows = ["| API group | resource | verbs | scope | why |", "|---|---|---|---|---|"]
    for p in cluster_wide() + (PEERING_NAMESPACED,):
        scope = "cluster (cluster-wide installs only)" if p.cluster else (
            "each served namespace (namespaced installs)" if p is PEERING_NAMESPACED else "each served namespace")
        rows.append(f"| `{p.group or 'core'}` | `{p.resource}` | {', '.join(p.verbs)} | {scope} | {p.why} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
