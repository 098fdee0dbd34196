"""NetworkPolicies: who may reach a job's pods and a shared server's pods.

Per job (`<job>-network`, over every pod of the job): the trainer pods accept connections only
from the job's own trainer pods — the rendezvous port and the ports the collectives open
between ranks, which NCCL and gloo pick at run time — and the inference port accepts the job's
namespace (or the peers in `serving.ingressFrom`). Per shared server (`<server>-shared`): its
inference port, likewise. A policy is only enforced by a CNI that implements NetworkPolicy.
"""
from __future__ import annotations

from typing import Any

from dreambooth_api.v1alpha1.spec import IngressPeer

from . import builders


def network_policy_name(name: str) -> str:
    return f"{name}-network"


def ingress_peers(ingress_from: list[IngressPeer]) -> list[dict[str, Any]]:
    """The user's peers as NetworkPolicy peers; none given: every pod of the namespace."""
    if not ingress_from:
        return [{"podSelector": {}}]
    peers = []
    for peer in ingress_from:
        entry: dict[str, Any] = {}
        if peer.pod_selector is not None:
            entry["podSelector"] = {"matchLabels": dict(peer.pod_selector)}
        if peer.namespace_selector is not None:
            entry["namespaceSelector"] = {"matchLabels": dict(peer.namespace_selector)}
        peers.append(entry)
    return peers


def inference_port_rule(ingress_from: list[IngressPeer]) -> dict[str, Any]:
    return {"from": ingress_peers(ingress_from), "ports": [{"protocol": "TCP", "port": builders.SERVE_PORT}]}


def network_policy_hash(job: builders.JobRef) -> str:
    """What the job's NetworkPolicy is built from that a user may edit (serving.ingressFrom)."""
    return builders.spec_hash([peer.model_dump(mode="json", by_alias=True) for peer in job.spec.serving.ingress_from])


def build_job_network_policy(job: builders.JobRef) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": network_policy_name(job.name), "namespace": job.namespace,
                     "labels": builders.common_labels(job.name, "network"),
                     "annotations": {builders.ANNOTATION_SPEC_HASH: network_policy_hash(job)}},
        "spec": {
            "podSelector": {"matchLabels": {builders.LABEL_JOB: job.name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": builders.trainer_selector(job)}}]},
                inference_port_rule(job.spec.serving.ingress_from),
            ],
        },
    }


def build_shared_network_policy(metadata: dict[str, Any], selector: dict[str, str], ingress_from: list[IngressPeer]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress"], "ingress": [inference_port_rule(ingress_from)]},
    }
