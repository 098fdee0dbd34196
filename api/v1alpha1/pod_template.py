"""What a DreamboothJob passes through to the pods it runs: placement and pod-template pieces.

The pieces users of Kubeflow and KubeRay set on their pod templates (affinity, spread, labels,
annotations, a service account for workload identity, pull secrets, priority, extra env and
volumes), as typed sections of the job spec. Kubernetes objects the API server validates when the
operator creates the Job or Deployment (affinity, volumes, env sources) are kept as given; what
can be checked at `kubectl apply` (label keys and values, names the operator owns) is checked
here and by the CRD's rules, which say the same thing. Imports only pydantic and the stdlib.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, WithJsonSchema, field_validator

from .sections import Section

# Label syntax (k8s.io/apimachinery validation): [prefix/]name, name <= 63, prefix a DNS subdomain.
LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
LABEL_KEY_RE = rf"^({DNS_LABEL}(\.{DNS_LABEL})*/)?{LABEL_NAME}$"
LABEL_VALUE_RE = rf"^({LABEL_NAME})?$"
MAX_LABEL_PREFIX = 253
ENV_NAME_RE = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
DNS_SUBDOMAIN_RE = rf"^{DNS_LABEL}(\.{DNS_LABEL})*$"
# The env contract the operator sets itself (README "Storage and distribution contract").
RESERVED_ENV = (
    "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "DREAMBOOTH_JOB", "DREAMBOOTH_GANG", "DREAMBOOTH_ATTEMPT",
)
# Volumes and mount paths of the pods the operator builds.
RESERVED_VOLUMES = ("config", "dshm", "scratch", "cache")
RESERVED_MOUNT_PATHS = ("/etc/dreambooth", "/dev/shm", "/tmp", "/var/cache/dreambooth")  # the last: the images' cache (builders.CACHE_DIR)

# A Kubernetes object kept as given (the API server validates it when the pods are made).
KubeObject = Annotated[dict[str, Any], WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True})]


def not_reserved(value: str, reserved: tuple[str, ...], what: str) -> str:
    if value in reserved:
        raise ValueError(f"{what} {value!r} is used by the operator itself ({', '.join(reserved)})")
    return value


def check_label_key(key: str) -> str:
    prefix = key.rsplit("/", 1)[0] if "/" in key else ""
    if not re.match(LABEL_KEY_RE, key) or len(prefix) > MAX_LABEL_PREFIX:
        raise ValueError(f"{key!r} is not a label key ([prefix/]name: name of at most 63 letters, digits, '-', '_', '.'; prefix a DNS subdomain)")
    return key


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        check_label_key(key)
        if not re.match(LABEL_VALUE_RE, value):
            raise ValueError(f"label {key}: {value!r} is not a label value (at most 63 letters, digits, '-', '_', '.', starting and ending alphanumeric)")
    return labels


def check_annotation_keys(annotations: dict[str, str]) -> dict[str, str]:
    for key in annotations:
        check_label_key(key)
    return annotations


LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_RE)]


class Toleration(Section):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)


class PodPlacement(Section):
    """Where pods may run: the scheduling fields of a pod spec."""

    node_selector: dict[str, LabelValue] = Field(default_factory=dict, description="Node labels the pods must match.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations added to the pods (GPU pods also tolerate nvidia.com/gpu).")
    affinity: KubeObject | None = Field(None, description="Pod affinity as in a pod spec (nodeAffinity, podAffinity, podAntiAffinity).")
    topology_spread_constraints: list[KubeObject] = Field(
        default_factory=list, description="topologySpreadConstraints as in a pod spec (e.g. spread ranks across zones)."
    )
    priority_class_name: str | None = Field(None, description="PriorityClass of the pods (Kueue also takes the workload's priority from it).")

    @field_validator("node_selector")
    @classmethod
    def _selector_keys(cls, value: dict[str, str]) -> dict[str, str]:
        return check_labels(value)


class SchedulingSpec(PodPlacement):
    """Trainer pods and their Job. Edits apply to the next gang (condition UpdatePending says so)."""

    scheduler_name: str | None = Field(None, description="Scheduler for the trainer pods (e.g. a gang scheduler).")
    labels: dict[str, LabelValue] = Field(default_factory=dict, description="Extra labels on the trainer Job and its pods (e.g. kueue.x-k8s.io/queue-name).")

    @field_validator("labels")
    @classmethod
    def _label_syntax(cls, value: dict[str, str]) -> dict[str, str]:
        return check_labels(value)


class EnvVar(Section):
    name: str = Field(..., min_length=1, pattern=ENV_NAME_RE, description="Variable name.")
    value: str | None = Field(None, description="Literal value.")
    value_from: KubeObject | None = Field(None, description="A source as in a pod spec (secretKeyRef, configMapKeyRef, fieldRef, ...).")

    @field_validator("name")
    @classmethod
    def _not_the_operators(cls, value: str) -> str:
        return not_reserved(value, RESERVED_ENV, "env name")


class Volume(Section):
    """A pod volume as in a pod spec; only its name is checked here."""

    model_config = {**Section.model_config, "extra": "allow"}
    name: str = Field(..., min_length=1, max_length=63, pattern=rf"^{DNS_LABEL}$")

    @field_validator("name")
    @classmethod
    def _not_the_operators(cls, value: str) -> str:
        return not_reserved(value, RESERVED_VOLUMES, "volume name")


class VolumeMount(Section):
    name: str = Field(..., min_length=1, max_length=63, description="A volume of podTemplate.volumes.")
    mount_path: str = Field(..., min_length=1, pattern=r"^/", description="Absolute path in the container.")
    read_only: bool = False
    sub_path: str | None = None

    @field_validator("mount_path")
    @classmethod
    def _not_the_operators(cls, value: str) -> str:
        return not_reserved(value.rstrip("/") or "/", RESERVED_MOUNT_PATHS, "mount path")


class LocalObjectReference(Section):
    name: str = Field(..., min_length=1, max_length=253)


class PodTemplateOverrides(Section):
    """Added to the trainer and the inference pods (trainer: from the next gang on; serving: rolled)."""

    labels: dict[str, LabelValue] = Field(default_factory=dict, description="Extra labels on the pods.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations on the pods (e.g. for a service mesh or log shipper).")
    service_account_name: str | None = Field(
        None, max_length=253, pattern=DNS_SUBDOMAIN_RE,
        description="ServiceAccount the pods run as (workload identity: GKE, IRSA, Azure). Its API token is still not mounted.",
    )
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list, description="Secrets to pull the trainer and inference images.")
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables of the trainer and server containers.")
    volumes: list[Volume] = Field(default_factory=list, description="Extra volumes as in a pod spec (a Secret, a ConfigMap, a CSI volume, ...).")
    volume_mounts: list[VolumeMount] = Field(default_factory=list, description="Where podTemplate.volumes are mounted in the containers.")

    @field_validator("labels")
    @classmethod
    def _label_syntax(cls, value: dict[str, str]) -> dict[str, str]:
        return check_labels(value)

    @field_validator("annotations")
    @classmethod
    def _annotation_keys(cls, value: dict[str, str]) -> dict[str, str]:
        return check_annotation_keys(value)

    def mounts_name_volumes(self) -> None:
        names = {volume.name for volume in self.volumes}
        for mount in self.volume_mounts:
            if mount.name not in names:
                raise ValueError(f"podTemplate.volumeMounts: {mount.name!r} is not a volume of podTemplate.volumes")


def label_key_rule(path: str) -> dict[str, str]:
    """CEL: every key of the map at `path` is a label key (the schema checks the values)."""
    return {
        "rule": f"self.all(k, k.matches('{LABEL_KEY_RE.replace(chr(92), chr(92) * 2)}') && (!k.contains('/') || k.indexOf('/') <= {MAX_LABEL_PREFIX}))",
        "message": f"{path}: every key must be a label key ([prefix/]name: name of at most 63 letters, digits, '-', '_', '.'; prefix a DNS subdomain)",
    }
