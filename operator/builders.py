"""Pure functions that turn one DreamboothJob into the manifests it owns.

No API calls, no clock, no randomness: the same job gives the same dicts (golden-tested).
Owner references are added by the handlers (`kopf.adopt`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dreambooth_trainer.spec import (
    DreamboothJobSpec,
    SecretKeyRef,
    ServingAuth,
    StorageSpec,
    output_uri,
    train_config_from_spec,
)

CONFIG_DIR = "/etc/dreambooth"
CONFIG_KEY = "config.yaml"
MASTER_PORT = 29500
SERVE_PORT = 8080
RUN_AS_USER = 1000
# Long enough for rank 0 to write a full SD checkpoint to object storage after SIGTERM.
CHECKPOINT_GRACE_SECONDS = 600
TRAINER_CONTAINER = "trainer"
SERVER_CONTAINER = "server"
# The trainer's exit code for bad config or input: restarting cannot help.
EXIT_BAD_INPUT = 2
GPU_RESOURCE = "nvidia.com/gpu"
# The env var `dreambooth serve` reads its bearer token from (dreambooth_serving.settings.TOKEN_ENV).
API_TOKEN_ENV = "DREAMBOOTH_API_TOKEN"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB = "dreambooth.dev/job-name"
LABEL_GANG = "dreambooth.dev/gang"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


@dataclass(frozen=True)
class JobRef:
    """One DreamboothJob as the builders see it: identity plus the validated spec."""

    name: str
    namespace: str
    uid: str
    spec: DreamboothJobSpec

    @property
    def output_uri(self) -> str:
        return output_uri(self.spec, self.namespace, self.name, self.uid)


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
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _resources(cpu: str, memory: str, gpus: int) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        amounts[GPU_RESOURCE] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _gpu_tolerations(gpus: int) -> list[dict[str, Any]]:
    return [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}] if gpus else []


# --- training ---------------------------------------------------------------------------


def build_config_map(job: JobRef) -> dict[str, Any]:
    config = train_config_from_spec(job.spec, job.output_uri)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, config_map_name(job.name), "config"),
        "data": {CONFIG_KEY: config.to_yaml()},
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
            "selector": selector_labels(job.name, "trainer"),
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
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if on_gpu:
        env += [
            {"name": "NCCL_DEBUG", "value": "WARN"},
            # A hung collective becomes a failed pod, which the gang restart can handle.
            {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
        ]
    return env


def build_trainer_job(job: JobRef, gang: int) -> dict[str, Any]:
    """Indexed Job, one pod per node; any failed pod fails the Job so the gang restarts whole."""
    spec = job.spec
    nodes = spec.resources.nodes
    gpus = gpus_per_pod(spec)
    labels = {**spec.scheduling.labels, LABEL_GANG: str(gang)}
    metadata = _metadata(job, trainer_job_name(job.name, gang), "trainer", labels)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": worker_service_name(job.name),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": CHECKPOINT_GRACE_SECONDS,
        "containers": [
            {
                "name": TRAINER_CONTAINER,
                "image": spec.resources.image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["dreambooth", "train", f"{CONFIG_DIR}/{CONFIG_KEY}"],
                "env": trainer_env(job, gang),
                "ports": [{"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"}],
                "resources": _resources(spec.resources.cpu, spec.resources.memory, gpus),
                "securityContext": container_security_context(),
                "volumeMounts": [
                    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    {"name": "scratch", "mountPath": "/tmp"},
                ],
            }
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(job.name)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}},
            {"name": "scratch", "emptyDir": {}},
        ],
        "tolerations": _gpu_tolerations(gpus) + [t.model_dump(by_alias=True, exclude_none=True) for t in spec.scheduling.tolerations],
    }
    if spec.scheduling.node_selector:
        pod_spec["nodeSelector"] = dict(spec.scheduling.node_selector)
    if spec.scheduling.priority_class_name:
        pod_spec["priorityClassName"] = spec.scheduling.priority_class_name
    if spec.scheduling.scheduler_name:
        pod_spec["schedulerName"] = spec.scheduling.scheduler_name
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
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In", "values": [EXIT_BAD_INPUT]},
                    }
                ]
            },
            "suspend": spec.run_policy.suspend,
            "template": {"metadata": {"labels": dict(metadata["labels"])}, "spec": pod_spec},
        },
    }


# --- serving ----------------------------------------------------------------------------


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
                    "env": env,
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
                    "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}, *mounts],
                }
            ],
            "volumes": [{"name": "scratch", "emptyDir": {}}, *volumes],
            "tolerations": _gpu_tolerations(resources.gpus),
        },
    }


def build_inference_deployment(job: JobRef) -> dict[str, Any]:
    serving = job.spec.serving
    name = inference_name(job.name)
    metadata = _metadata(job, name, "inference")
    args = ["--model", f"{job.output_uri}/final", "--model-name", job.name]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": serving.replicas,
            "selector": {"matchLabels": selector_labels(job.name, "inference")},
            "template": inference_pod_template(metadata["labels"], serving.image, args,
                                               serving_env(job.spec.storage, serving.auth), serving.resources),
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
