"""Pure functions that turn one DreamboothJob into the manifests it owns.

No API calls, no clock, no randomness: the same job gives the same dicts (golden-tested).
Owner references are added by the handlers (`kopf.adopt`).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from dreambooth_api.v1alpha1.labels import (
    COMPLETION_INDEX_ANNOTATION, LABEL_COMPONENT, LABEL_GANG, LABEL_INSTANCE, LABEL_JOB, LABEL_JOB_UID, LABEL_MANAGED_BY,
    LABEL_NAME, SERVER_CONTAINER, TRAINER_CONTAINER,
)
from dreambooth_api.v1alpha1.pod_template import PodPlacement
from dreambooth_api.v1alpha1.spec import (
    DreamboothJobSpec,
    SecretKeyRef,
    ServingAuth,
    StorageSpec,
    output_uri,
    served_export_prefix,
    train_config_from_spec,
)

CONFIG_DIR = "/etc/dreambooth"
# The pods' root filesystems are read-only: they write only to emptyDirs, each with a size limit
# (the kubelet evicts a pod that outgrows one). /tmp stages checkpoints and exports; CACHE_DIR
# holds base models fetched from storage and Hugging Face files (the images point HF_HOME,
# DREAMBOOTH_CACHE and XDG_CACHE_HOME there).
CACHE_DIR = "/var/cache/dreambooth"
TRAINER_SCRATCH_LIMIT = "100Gi"
TRAINER_CACHE_LIMIT = "100Gi"
SERVER_SCRATCH_LIMIT = "4Gi"
SERVER_CACHE_LIMIT = "100Gi"
CONFIG_KEY = "config.yaml"
MASTER_PORT = 29500
SERVE_PORT = 8080
RUN_AS_USER = 1000
# The trainer's exit code for bad config or input: restarting cannot help.
EXIT_BAD_INPUT = 2
EXIT_SIGTERM = 143
EXIT_SIGKILL = 137
GPU_RESOURCE = "nvidia.com/gpu"
# The env var `dreambooth serve` reads its bearer token from (dreambooth_serving.settings.TOKEN_ENV).
API_TOKEN_ENV = "DREAMBOOTH_API_TOKEN"

# Hash of what a trainer Job was built from (scheduling + podTemplate): edits show as a difference.
ANNOTATION_TEMPLATE_HASH = "dreambooth.dev/template-hash"
# Hash of the inference Deployment as built: an edit of serving/podTemplate rolls it.
ANNOTATION_SPEC_HASH = "dreambooth.dev/spec-hash"
# Kueue: a Job with this label is queued; it is created suspended and only Kueue unsuspends it.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
# Labels of the DreamboothJob itself that its trainer Job carries (how users label Kubeflow jobs for Kueue).
FORWARDED_JOB_LABELS = (KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_LABEL)

# The trainer Job's podFailurePolicy, in order (the first rule that matches decides). The Job's
# Failed condition names the index of the rule, which failures.rule_kinds() maps to a class:
# exit 2 is bad input (permanent); DisruptionTarget is a disruption; exit 137 (SIGKILL) is looked
# at for OOMKilled. Everything else fails the Job (backoffLimit 0).
# Exit 143 (SIGTERM, after the trainer's checkpoint) is ignored: the Job controller judges the
# pods of a suspended Job too, and a FailJob on 143 would fail every Job that Kueue or
# runPolicy.suspend stops. A rank that stopped on SIGTERM in a running gang is the operator's to
# see (lifecycle: a disruption).
POD_FAILURE_RULES: list[dict[str, Any]] = [
    {"action": "FailJob", "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In", "values": [EXIT_BAD_INPUT]}},
    {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    {"action": "Ignore", "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In", "values": [EXIT_SIGTERM]}},
    {"action": "FailJob", "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In", "values": [EXIT_SIGKILL]}},
]


@dataclass(frozen=True)
class JobRef:
    """One DreamboothJob as the builders see it: identity plus the validated spec."""

    name: str
    namespace: str
    uid: str
    spec: DreamboothJobSpec
    labels: dict[str, str] = field(default_factory=dict)  # the DreamboothJob's own metadata.labels

    @property
    def output_uri(self) -> str:
        return output_uri(self.spec, self.namespace, self.name, self.uid)

    @property
    def queue_name(self) -> str:
        """The Kueue LocalQueue of the trainer Jobs: the job's label, else spec.scheduling.labels."""
        return self.labels.get(KUEUE_QUEUE_LABEL) or self.spec.scheduling.labels.get(KUEUE_QUEUE_LABEL, "")


def owner_reference(api_version: str, kind: str, name: str, uid: str) -> dict[str, Any]:
    """The job as the controller of what it creates (the garbage collector deletes them with it)."""
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": True, "blockOwnerDeletion": True}


# --- names ------------------------------------------------------------------------------


def config_map_name(name: str) -> str:
    return f"{name}-config"


def worker_service_name(name: str) -> str:
    return f"{name}-workers"


def trainer_job_name(name: str, gang: int) -> str:
    """One Job per gang: a restarted gang never shares pod host names with the old one."""
    return f"{name}-train-{gang}"


def inference_name(name: str) -> str:
    return f"{name}-serve"


def endpoint_url(name: str, namespace: str) -> str:
    return f"http://{inference_name(name)}.{namespace}.svc:{SERVE_PORT}"


def master_addr(name: str, gang: int) -> str:
    return f"{trainer_job_name(name, gang)}-0.{worker_service_name(name)}"


# --- labels -----------------------------------------------------------------------------


def selector_labels(name: str, component: str) -> dict[str, str]:
    return {LABEL_JOB: name, LABEL_COMPONENT: component}


def trainer_selector(job: "JobRef") -> dict[str, str]:
    """The trainer pods of this very job (by uid: not those of a deleted job of the same name)."""
    return {**selector_labels(job.name, "trainer"), LABEL_JOB_UID: job.uid}


def common_labels(name: str, component: str) -> dict[str, str]:
    return {
        LABEL_NAME: "dreambooth",
        LABEL_INSTANCE: name,
        LABEL_MANAGED_BY: "dreambooth-operator",
        **selector_labels(name, component),
    }


def _metadata(job: JobRef, name: str, component: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    return {"name": name, "namespace": job.namespace, "labels": {**(extra or {}), **common_labels(job.name, component)}}


# --- shared pod pieces --------------------------------------------------------------------


def storage_env(job: JobRef) -> list[dict[str, Any]]:
    return storage_env_from(job.spec.storage, job.spec.storage.credentials_secret_ref)


def storage_env_from(storage: StorageSpec, ref: SecretKeyRef) -> list[dict[str, Any]]:
    scheme = "https" if storage.secure else "http"
    env: list[dict[str, Any]] = [
        {"name": "AWS_ENDPOINT_URL", "value": f"{scheme}://{storage.endpoint}"},
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.access_key_key}}},
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.secret_key_key}}},
    ]
    if storage.region:
        env.append({"name": "AWS_REGION", "value": storage.region})
    return env


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def _resources(cpu: str, memory: str, gpus: int) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        amounts[GPU_RESOURCE] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def cpu_threads(cpu: str, ranks: int) -> int:
    """Threads per rank that the pod's CPU limit pays for (at least one)."""
    from kubernetes.utils import parse_quantity

    return max(1, math.floor(parse_quantity(cpu) / ranks))


def threads_env(cpu: str, ranks: int, user_env: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """OMP_NUM_THREADS from the CPU limit: torch would otherwise start one thread per core of the
    node and, throttled to the limit, run several times slower. With more than one thread,
    OMP_WAIT_POLICY=PASSIVE: OpenMP's idle workers otherwise spin after each of torch's parallel
    ops, spending the pod's CPU quota on waiting (on a busy node, several times the work's CPU).
    A podTemplate value of either wins."""
    given = {item.get("name") for item in user_env}
    threads = cpu_threads(cpu, ranks)
    env = [] if "OMP_NUM_THREADS" in given else [{"name": "OMP_NUM_THREADS", "value": str(threads)}]
    if "OMP_WAIT_POLICY" not in given and (threads > 1 or "OMP_NUM_THREADS" in given):
        env.append({"name": "OMP_WAIT_POLICY", "value": "PASSIVE"})
    return env


def _gpu_tolerations(gpus: int) -> list[dict[str, Any]]:
    return [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}] if gpus else []


# --- training ---------------------------------------------------------------------------


def build_config_map(job: JobRef) -> dict[str, Any]:
    config = train_config_from_spec(job.spec, job.output_uri)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, config_map_name(job.name), "config"),
        "data": {CONFIG_KEY: yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)},
    }


def build_worker_service(job: JobRef) -> dict[str, Any]:
    """Headless Service giving each trainer pod a DNS name (`<job>-<index>.<service>`)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, worker_service_name(job.name), "trainer"),
        "spec": {
            "clusterIP": "None",
            # Ranks must find the master before any pod is Ready.
            "publishNotReadyAddresses": True,
            "selector": trainer_selector(job),
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT, "protocol": "TCP"}],
        },
    }


def gpus_per_pod(spec: DreamboothJobSpec) -> int:
    return spec.resources.gpus_per_node if spec.resources.accelerator == "gpu" else 0


def trainer_env(job: JobRef, gang: int) -> list[dict[str, Any]]:
    resources = job.spec.resources
    on_gpu = resources.accelerator == "gpu"
    env: list[dict[str, Any]] = [
        {"name": "MASTER_ADDR", "value": master_addr(job.name, gang)},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "NNODES", "value": str(resources.nodes)},
        {
            "name": "NODE_RANK",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
        },
        {"name": "NPROC_PER_NODE", "value": str(resources.gpus_per_node if on_gpu else 1)},
        *storage_env(job),
        {"name": "DREAMBOOTH_LOG_FORMAT", "value": "json"},
        {"name": "DREAMBOOTH_JOB", "value": f"{job.namespace}/{job.name}"},
        {"name": "DREAMBOOTH_GANG", "value": str(gang)},
        # The gang's execution attempt: its checkpoint writes are fenced by it (dreambooth_trainer.checkpoint).
        {"name": "DREAMBOOTH_ATTEMPT", "value": str(gang)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *threads_env(resources.cpu, resources.gpus_per_node if on_gpu else 1,
                     [e.model_dump(by_alias=True) for e in job.spec.pod_template.env]),
    ]
    if on_gpu:
        env += [
            {"name": "NCCL_DEBUG", "value": "WARN"},
            # A hung collective becomes a failed pod, which the gang restart can handle.
            {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
        ]
    return env


def spec_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trainer_template_hash(spec: DreamboothJobSpec) -> str:
    """What a gang's pods take from the editable sections (scheduling, podTemplate, the grace period)."""
    return spec_hash([
        spec.scheduling.model_dump(mode="json", by_alias=True),
        spec.pod_template.model_dump(mode="json", by_alias=True),
        spec.run_policy.termination_grace_period_seconds,
    ])


def _placement(placement: PodPlacement, gpus: int) -> dict[str, Any]:
    """nodeSelector, tolerations, affinity, spread and priority of a pod spec."""
    pod: dict[str, Any] = {
        "tolerations": _gpu_tolerations(gpus) + [t.model_dump(by_alias=True, exclude_none=True) for t in placement.tolerations],
    }
    if placement.node_selector:
        pod["nodeSelector"] = dict(placement.node_selector)
    if placement.affinity:
        pod["affinity"] = placement.affinity
    if placement.topology_spread_constraints:
        pod["topologySpreadConstraints"] = list(placement.topology_spread_constraints)
    if placement.priority_class_name:
        pod["priorityClassName"] = placement.priority_class_name
    return pod


def _template_pieces(spec: DreamboothJobSpec) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """podTemplate: (pod-spec fields, extra env, extra volume mounts) shared by trainer and server
    (its serviceAccountName is the trainers' alone: build_trainer_job adds it)."""
    template = spec.pod_template
    pod: dict[str, Any] = {}
    if template.image_pull_secrets:
        pod["imagePullSecrets"] = [ref.model_dump(by_alias=True) for ref in template.image_pull_secrets]
    env = [e.model_dump(by_alias=True, exclude_none=True) for e in template.env]
    mounts = [m.model_dump(by_alias=True, exclude_none=True) for m in template.volume_mounts]
    return pod, env, mounts


def _pod_metadata(labels: dict[str, str], spec: DreamboothJobSpec) -> dict[str, Any]:
    """The pods' labels (ours win over the user's) and annotations."""
    metadata: dict[str, Any] = {"labels": {**spec.pod_template.labels, **labels}}
    if spec.pod_template.annotations:
        metadata["annotations"] = dict(spec.pod_template.annotations)
    return metadata


POD_GROUP_API = "scheduling.k8s.io/v1alpha2"


def build_pod_group(job: JobRef, gang: int) -> dict[str, Any]:
    """The gang as a PodGroup with a gang policy: the scheduler places all its pods or none."""
    return {
        "apiVersion": POD_GROUP_API,
        "kind": "PodGroup",
        "metadata": _metadata(job, trainer_job_name(job.name, gang), "trainer", {LABEL_GANG: str(gang)}),
        "spec": {"schedulingPolicy": {"gang": {"minCount": job.spec.resources.nodes}}},
    }


def build_trainer_job(job: JobRef, gang: int, pod_group: bool = False) -> dict[str, Any]:
    """Indexed Job, one pod per node; any failed pod fails the Job so the gang restarts whole.

    A queued job (Kueue) is created suspended with the queue label; only Kueue unsuspends it.
    With `pod_group`, its pods join the gang's PodGroup (build_pod_group)."""
    spec = job.spec
    nodes = spec.resources.nodes
    gpus = gpus_per_pod(spec)
    forwarded = {key: job.labels[key] for key in FORWARDED_JOB_LABELS if job.labels.get(key)}
    labels = {**spec.scheduling.labels, **forwarded, LABEL_GANG: str(gang)}
    metadata = _metadata(job, trainer_job_name(job.name, gang), "trainer", labels)
    metadata["annotations"] = {ANNOTATION_TEMPLATE_HASH: trainer_template_hash(spec)}
    template_pod, extra_env, extra_mounts = _template_pieces(spec)
    if spec.pod_template.service_account_name:
        template_pod["serviceAccountName"] = spec.pod_template.service_account_name
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": worker_service_name(job.name),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": spec.run_policy.termination_grace_period_seconds,
        **template_pod,
        "containers": [
            {
                "name": TRAINER_CONTAINER,
                "image": spec.resources.image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["dreambooth", "train", f"{CONFIG_DIR}/{CONFIG_KEY}"],
                "env": trainer_env(job, gang) + extra_env,
                "ports": [{"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"}],
                "resources": _resources(spec.resources.cpu, spec.resources.memory, gpus),
                "securityContext": container_security_context(),
                "volumeMounts": [
                    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    {"name": "scratch", "mountPath": "/tmp"},
                    {"name": "cache", "mountPath": CACHE_DIR},
                    *extra_mounts,
                ],
            }
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(job.name)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}},
            {"name": "scratch", "emptyDir": {"sizeLimit": TRAINER_SCRATCH_LIMIT}},
            {"name": "cache", "emptyDir": {"sizeLimit": TRAINER_CACHE_LIMIT}},
            *[volume.model_dump(by_alias=True, exclude_none=True) for volume in spec.pod_template.volumes],
        ],
        **_placement(spec.scheduling, gpus),
    }
    if spec.scheduling.scheduler_name:
        pod_spec["schedulerName"] = spec.scheduling.scheduler_name
    if pod_group:
        pod_spec["schedulingGroup"] = {"podGroupName": trainer_job_name(job.name, gang)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            # The operator restarts the whole gang itself; the Job never replaces one pod.
            "backoffLimit": 0,
            "podFailurePolicy": {"rules": [dict(rule) for rule in POD_FAILURE_RULES]},
            # Only Kueue unsuspends a queued Job; runPolicy.suspend is handled before any Job exists.
            "suspend": bool(job.queue_name),
            "template": {"metadata": _pod_metadata({**metadata["labels"], LABEL_JOB_UID: job.uid}, spec), "spec": pod_spec},
        },
    }


# --- exporting a checkpoint after success -----------------------------------------------------

EXPORT_COMPONENT = "export"
EXPORT_BACKOFF_LIMIT = 2  # storage blips are retried; bad input (exit 2) fails at once


def export_job_name(name: str, checkpoint: str) -> str:
    """`<job>-export-best`, `<job>-export-step-200`: one Job per choice (a failed one stays to be read)."""
    return f"{name}-export-{checkpoint}"


def build_export_job(job: JobRef) -> dict[str, Any]:
    """One pod of the trainer image running `dreambooth export` on the job's own config: the
    checkpoint serving.checkpoint names after success, exported from object storage (on the CPU:
    no GPU is asked for) beside final/."""
    spec = job.spec
    checkpoint = spec.serving.checkpoint
    metadata = _metadata(job, export_job_name(job.name, checkpoint), EXPORT_COMPONENT)
    template_pod, extra_env, extra_mounts = _template_pieces(spec)
    if spec.pod_template.service_account_name:
        template_pod["serviceAccountName"] = spec.pod_template.service_account_name
    env = [*storage_env(job), {"name": "DREAMBOOTH_LOG_FORMAT", "value": "json"},
           {"name": "DREAMBOOTH_JOB", "value": f"{job.namespace}/{job.name}"}, {"name": "PYTHONUNBUFFERED", "value": "1"},
           *threads_env(spec.resources.cpu, 1, [e.model_dump(by_alias=True) for e in spec.pod_template.env]), *extra_env]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        **template_pod,
        "containers": [
            {
                "name": TRAINER_CONTAINER,
                "image": spec.resources.image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["dreambooth", "export", f"{CONFIG_DIR}/{CONFIG_KEY}", "--checkpoint", checkpoint],
                "env": env,
                "resources": _resources(spec.resources.cpu, spec.resources.memory, 0),
                "securityContext": container_security_context(),
                # The error line (exit 2: a checkpoint pruned since) becomes the pod's termination message.
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "volumeMounts": [
                    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                    {"name": "scratch", "mountPath": "/tmp"},
                    {"name": "cache", "mountPath": CACHE_DIR},
                    *extra_mounts,
                ],
            }
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(job.name)}},
            {"name": "scratch", "emptyDir": {"sizeLimit": TRAINER_SCRATCH_LIMIT}},
            {"name": "cache", "emptyDir": {"sizeLimit": TRAINER_CACHE_LIMIT}},
            *[volume.model_dump(by_alias=True, exclude_none=True) for volume in spec.pod_template.volumes],
        ],
        **_placement(spec.scheduling, 0),
    }
    if spec.scheduling.scheduler_name:
        pod_spec["schedulerName"] = spec.scheduling.scheduler_name
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": EXPORT_BACKOFF_LIMIT,
            "podFailurePolicy": {"rules": [dict(POD_FAILURE_RULES[0])]},
            "template": {"metadata": _pod_metadata({**metadata["labels"], LABEL_JOB_UID: job.uid}, spec), "spec": pod_spec},
        },
    }


# --- serving ----------------------------------------------------------------------------


def serving_hash(spec: DreamboothJobSpec) -> str:
    """What the inference Deployment is built from: an edit of it rolls the Deployment."""
    return spec_hash([spec.serving.model_dump(mode="json", by_alias=True), spec.pod_template.model_dump(mode="json", by_alias=True)])


def serving_env(storage: StorageSpec, auth: ServingAuth) -> list[dict[str, Any]]:
    """Inference pods read final/ only: the read-only credentials when the job or the installation
    gives them, and the API token, both by secretKeyRef (never copied into the manifest)."""
    env = storage_env_from(storage, storage.serving_credentials_secret_ref or storage.credentials_secret_ref)
    if auth.token_secret_ref is not None:
        ref = auth.token_secret_ref
        env.append({"name": API_TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return [*env, {"name": "DREAMBOOTH_LOG_FORMAT", "value": "json"}]


def inference_pod_template(labels: dict[str, str], image: str, args: list[str], env: list[dict[str, Any]],
                           resources: Any, mounts: list[dict[str, Any]] = (), volumes: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """A pod running `dreambooth serve <args>` on port http, ready once warmed up."""
    probe = {"httpGet": {"port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5}
    return {
        "metadata": {"labels": dict(labels)},
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": pod_security_context(),
            "containers": [
                {
                    "name": SERVER_CONTAINER,
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["dreambooth", "serve", *args, "--host", "0.0.0.0", "--port", str(SERVE_PORT)],
                    "env": [*threads_env(resources.cpu, 1, env), *env],
                    "ports": [{"name": "http", "containerPort": SERVE_PORT, "protocol": "TCP"}],
                    # Ready once the weights are loaded and a warm-up image was generated.
                    "readinessProbe": {**probe, "httpGet": {"path": "/readyz", "port": "http"}, "failureThreshold": 3},
                    # Loading big weights can take minutes: liveness only fails a long-hung server.
                    "livenessProbe": {
                        **probe,
                        "httpGet": {"path": "/healthz", "port": "http"},
                        "initialDelaySeconds": 30,
                        "failureThreshold": 6,
                    },
                    "resources": _resources(resources.cpu, resources.memory, resources.gpus),
                    "securityContext": container_security_context(),
                    "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}, {"name": "cache", "mountPath": CACHE_DIR}, *mounts],
                }
            ],
            "volumes": [
                {"name": "scratch", "emptyDir": {"sizeLimit": SERVER_SCRATCH_LIMIT}},
                {"name": "cache", "emptyDir": {"sizeLimit": SERVER_CACHE_LIMIT}},
                *volumes,
            ],
            "tolerations": _gpu_tolerations(resources.gpus),
        },
    }


def build_inference_deployment(job: JobRef) -> dict[str, Any]:
    serving = job.spec.serving
    name = inference_name(job.name)
    metadata = _metadata(job, name, "inference")
    metadata["annotations"] = {ANNOTATION_SPEC_HASH: serving_hash(job.spec)}
    args = ["--model", f"{job.output_uri}/{served_export_prefix(serving.checkpoint)}", "--model-name", job.name]
    template_pod, extra_env, extra_mounts = _template_pieces(job.spec)
    volumes = [volume.model_dump(by_alias=True, exclude_none=True) for volume in job.spec.pod_template.volumes]
    template = inference_pod_template(metadata["labels"], serving.image, args,
                                      [*serving_env(job.spec.storage, serving.auth), *extra_env],
                                      serving.resources, extra_mounts, volumes)
    # The user's podTemplate and serving.scheduling (our labels win; placement replaces the GPU-only tolerations).
    template["metadata"] = _pod_metadata(dict(metadata["labels"]), job.spec)
    template["spec"].update({**template_pod, **_placement(serving.scheduling, serving.resources.gpus)})
    if serving.service_account_name:  # never podTemplate's: the trainers' identity may write
        template["spec"]["serviceAccountName"] = serving.service_account_name
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": serving.replicas,
            "selector": {"matchLabels": selector_labels(job.name, "inference")},
            "template": template,
        },
    }


def build_inference_service(job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, inference_name(job.name), "inference"),
        "spec": {
            "selector": selector_labels(job.name, "inference"),
            "ports": [{"name": "http", "port": SERVE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
