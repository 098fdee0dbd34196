"""Golden tests: each builder's whole output against the expected manifest (the diff is the review)."""
from __future__ import annotations

from typing import Any

import yaml

from dreambooth_operator import builders
from dreambooth_trainer.spec import parse_spec

GPU_SPEC: dict[str, Any] = {
    "data": {"instanceUri": "s3://subjects/rex", "instancePrompt": "a photo of sks dog"},
    "prior": {"classPrompt": "a photo of dog"},
    "training": {"maxSteps": 800},
    "resources": {"nodes": 2, "gpusPerNode": 8, "cpu": 48, "memory": "512Gi", "sharedMemory": "64Gi", "image": "trainer:1"},
    "storage": {"endpoint": "minio.storage:9000", "bucket": "dreambooth", "credentialsSecretRef": {"name": "s3"}},
    "serving": {"replicas": 2, "image": "inference:1", "resources": {"gpus": 1, "cpu": "4", "memory": "16Gi"}},
    "scheduling": {
        "nodeSelector": {"pool": "h100"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "priorityClassName": "training",
        "schedulerName": "volcano",
        "labels": {"kueue.x-k8s.io/queue-name": "gpu"},
    },
}

CPU_SPEC: dict[str, Any] = {
    "model": {"source": "tiny"},
    "data": {"instanceUri": "s3://dreambooth/subjects/tiny", "instancePrompt": "a photo of sks dog", "resolution": 32},
    "prior": {"enabled": False},
    "resources": {"nodes": 2, "accelerator": "cpu", "cpu": "1", "memory": "2Gi", "sharedMemory": "256Mi"},
    "storage": {"endpoint": "127.0.0.1:9000", "bucket": "dreambooth", "secure": True, "region": "eu-1",
                "credentialsSecretRef": {"name": "creds", "accessKeyKey": "access", "secretKeyKey": "secret"}},
    "serving": {"resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"}},
}


def gpu_job() -> builders.JobRef:
    return builders.JobRef("rex", "team-a", "uid-1", parse_spec(GPU_SPEC))


def cpu_job() -> builders.JobRef:
    return builders.JobRef("tiny", "demo", "uid-2", parse_spec(CPU_SPEC))


def labels(name: str, component: str, **extra: str) -> dict[str, str]:
    return {
        **extra,
        "app.kubernetes.io/name": "dreambooth",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "dreambooth-operator",
        "dreambooth.dev/job-name": name,
        "app.kubernetes.io/component": component,
    }


SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
CREDS = [
    {"name": "AWS_ENDPOINT_URL", "value": "http://minio.storage:9000"},
    {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}},
    {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}}},
]


def test_names_are_deterministic() -> None:
    assert builders.config_map_name("rex") == "rex-config"
    assert builders.worker_service_name("rex") == "rex-workers"
    assert builders.trainer_job_name("rex", 3) == "rex-train-3"
    assert builders.inference_name("rex") == "rex-serve"
    assert builders.master_addr("rex", 3) == "rex-train-3-0.rex-workers"
    assert builders.endpoint_url("rex", "team-a") == "http://rex-serve.team-a.svc:8080"
    assert builders.build_trainer_job(gpu_job(), 1) == builders.build_trainer_job(gpu_job(), 1)


def test_worker_service() -> None:
    assert builders.build_worker_service(gpu_job()) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "rex-workers", "namespace": "team-a", "labels": labels("rex", "trainer")},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"dreambooth.dev/job-name": "rex", "app.kubernetes.io/component": "trainer"},
            "ports": [{"name": "rendezvous", "port": 29500, "targetPort": 29500, "protocol": "TCP"}],
        },
    }


def test_config_map_holds_the_trainer_config() -> None:
    manifest = builders.build_config_map(gpu_job())
    assert manifest["metadata"] == {"name": "rex-config", "namespace": "team-a", "labels": labels("rex", "config")}
    assert list(manifest["data"]) == ["config.yaml"]
    config = yaml.safe_load(manifest["data"]["config.yaml"])
    assert config["output"]["uri"] == "s3://dreambooth/jobs/team-a/rex/uid-1"
    assert config["training"]["max_steps"] == 800
    assert config["data"]["instance_uri"] == "s3://subjects/rex"


def test_trainer_job_on_gpus() -> None:
    job_labels = labels("rex", "trainer", **{"kueue.x-k8s.io/queue-name": "gpu", "dreambooth.dev/gang": "1"})
    assert builders.build_trainer_job(gpu_job(), 1) == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "rex-train-1", "namespace": "team-a", "labels": job_labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 0,
            "podFailurePolicy": {
                "rules": [
                    {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}}
                ]
            },
            "suspend": False,
            "template": {
                "metadata": {"labels": job_labels},
                "spec": {
                    "restartPolicy": "Never",
                    "subdomain": "rex-workers",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": SECURITY,
                    "terminationGracePeriodSeconds": 600,
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "trainer:1",
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["dreambooth", "train", "/etc/dreambooth/config.yaml"],
                            "env": [
                                {"name": "MASTER_ADDR", "value": "rex-train-1-0.rex-workers"},
                                {"name": "MASTER_PORT", "value": "29500"},
                                {"name": "NNODES", "value": "2"},
                                {
                                    "name": "NODE_RANK",
                                    "valueFrom": {
                                        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
                                    },
                                },
                                {"name": "NPROC_PER_NODE", "value": "8"},
                                *CREDS,
                                {"name": "DREAMBOOTH_LOG_FORMAT", "value": "json"},
                                {"name": "DREAMBOOTH_JOB", "value": "team-a/rex"},
                                {"name": "DREAMBOOTH_GANG", "value": "1"},
                                {"name": "PYTHONUNBUFFERED", "value": "1"},
                                {"name": "NCCL_DEBUG", "value": "WARN"},
                                {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
                            ],
                            "ports": [{"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"}],
                            "resources": {
                                "requests": {"cpu": "48", "memory": "512Gi", "nvidia.com/gpu": "8"},
                                "limits": {"cpu": "48", "memory": "512Gi", "nvidia.com/gpu": "8"},
                            },
                            "securityContext": CONTAINER_SECURITY,
                            "volumeMounts": [
                                {"name": "config", "mountPath": "/etc/dreambooth", "readOnly": True},
                                {"name": "dshm", "mountPath": "/dev/shm"},
                                {"name": "scratch", "mountPath": "/tmp"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "config", "configMap": {"name": "rex-config"}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}},
                        {"name": "scratch", "emptyDir": {}},
                    ],
                    "tolerations": [
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
                    ],
                    "nodeSelector": {"pool": "h100"},
                    "priorityClassName": "training",
                    "schedulerName": "volcano",
                },
            },
        },
    }


def test_trainer_job_on_cpu_differs_only_where_it_should() -> None:
    job = builders.build_trainer_job(cpu_job(), 0)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert job["metadata"]["name"] == "tiny-train-0"
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
    assert pod["tolerations"] == []
    assert "nodeSelector" not in pod and "priorityClassName" not in pod and "schedulerName" not in pod
    assert container["env"] == [
        {"name": "MASTER_ADDR", "value": "tiny-train-0-0.tiny-workers"},
        {"name": "MASTER_PORT", "value": "29500"},
        {"name": "NNODES", "value": "2"},
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "NPROC_PER_NODE", "value": "1"},
        {"name": "AWS_ENDPOINT_URL", "value": "https://127.0.0.1:9000"},
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "access"}}},
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "secret"}}},
        {"name": "AWS_REGION", "value": "eu-1"},
        {"name": "DREAMBOOTH_LOG_FORMAT", "value": "json"},
        {"name": "DREAMBOOTH_JOB", "value": "demo/tiny"},
        {"name": "DREAMBOOTH_GANG", "value": "0"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def test_no_secret_value_in_any_manifest() -> None:
    job = cpu_job()
    text = str([builders.build_trainer_job(job, 0), builders.build_inference_deployment(job), builders.build_config_map(job)])
    assert "secretKeyRef" in text and "AWS_SECRET_ACCESS_KEY', 'value'" not in text


def test_suspended_spec_builds_a_suspended_job() -> None:
    spec = dict(GPU_SPEC, runPolicy={"suspend": True})
    job = builders.build_trainer_job(builders.JobRef("rex", "team-a", "uid-1", parse_spec(spec)), 0)
    assert job["spec"]["suspend"] is True


def test_inference_deployment() -> None:
    assert builders.build_inference_deployment(gpu_job()) == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "rex-serve", "namespace": "team-a", "labels": labels("rex", "inference")},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"dreambooth.dev/job-name": "rex", "app.kubernetes.io/component": "inference"}},
            "template": {
                "metadata": {"labels": labels("rex", "inference")},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": SECURITY,
                    "containers": [
                        {
                            "name": "server",
                            "image": "inference:1",
                            "imagePullPolicy": "IfNotPresent",
                            "command": [
                                "dreambooth", "serve",
                                "--model", "s3://dreambooth/jobs/team-a/rex/uid-1/final",
                                "--model-name", "rex",
                                "--host", "0.0.0.0",
                                "--port", "8080",
                            ],
                            "env": [*CREDS, {"name": "DREAMBOOTH_LOG_FORMAT", "value": "json"}],
                            "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                            "readinessProbe": {
                                "httpGet": {"path": "/readyz", "port": "http"},
                                "periodSeconds": 10,
                                "timeoutSeconds": 5,
                                "failureThreshold": 3,
                            },
                            "livenessProbe": {
                                "httpGet": {"path": "/healthz", "port": "http"},
                                "periodSeconds": 10,
                                "timeoutSeconds": 5,
                                "initialDelaySeconds": 30,
                                "failureThreshold": 6,
                            },
                            "resources": {
                                "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
                                "limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
                            },
                            "securityContext": CONTAINER_SECURITY,
                            "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}],
                        }
                    ],
                    "volumes": [{"name": "scratch", "emptyDir": {}}],
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                },
            },
        },
    }


def test_inference_deployment_on_cpu_asks_for_no_gpu() -> None:
    pod = builders.build_inference_deployment(cpu_job())["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "1", "memory": "2Gi"}
    assert pod["tolerations"] == []


def test_inference_service() -> None:
    assert builders.build_inference_service(gpu_job()) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "rex-serve", "namespace": "team-a", "labels": labels("rex", "inference")},
        "spec": {
            "selector": {"dreambooth.dev/job-name": "rex", "app.kubernetes.io/component": "inference"},
            "ports": [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}],
        },
    }
