"""Golden tests: each builder's whole output against the expected manifest (the diff is the review)."""
from __future__ import annotations

from typing import Any

import yaml

from dreambooth_operator import builders
from dreambooth_api.v1alpha1.spec import parse_spec

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
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
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
            # by uid: a deleted job's still-terminating pods of the same name are never selected
            "selector": {"dreambooth.dev/job-name": "rex", "app.kubernetes.io/component": "trainer", "dreambooth.dev/job-uid": "uid-1"},
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
        "metadata": {"name": "rex-train-1", "namespace": "team-a", "labels": job_labels,
                     "annotations": {"dreambooth.dev/template-hash": builders.trainer_template_hash(gpu_job().spec)}},
        "spec": {
            "completionMode": "Indexed",
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 0,
            "podFailurePolicy": {
                "rules": [
                    # the index of each rule is its failure class (failures.rule_kinds)
                    {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}},
                    {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                    {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [143]}},
                    {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [137]}},
                ]
            },
            # kueue.x-k8s.io/queue-name: created suspended; only Kueue unsuspends it
            "suspend": True,
            "template": {
                "metadata": {"labels": {**job_labels, "dreambooth.dev/job-uid": "uid-1"}},
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
                                {"name": "DREAMBOOTH_ATTEMPT", "value": "1"},
                                {"name": "PYTHONUNBUFFERED", "value": "1"},
                                {"name": "OMP_NUM_THREADS", "value": "6"},
                                {"name": "OMP_WAIT_POLICY", "value": "PASSIVE"},
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
                                {"name": "cache", "mountPath": "/var/cache/dreambooth"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "config", "configMap": {"name": "rex-config"}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}},
                        {"name": "scratch", "emptyDir": {"sizeLimit": "100Gi"}},
                        {"name": "cache", "emptyDir": {"sizeLimit": "100Gi"}},
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
        {"name": "DREAMBOOTH_ATTEMPT", "value": "0"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "OMP_NUM_THREADS", "value": "1"},
    ]


def threads(container: dict[str, Any], name: str = "OMP_NUM_THREADS") -> list[str]:
    return [e["value"] for e in container["env"] if e["name"] == name]


def test_torch_threads_follow_the_cpu_limit_per_rank_unless_the_pod_template_sets_them() -> None:
    trainer = builders.build_trainer_job(gpu_job(), 0)["spec"]["template"]["spec"]["containers"][0]
    server = builders.build_inference_deployment(gpu_job())["spec"]["template"]["spec"]["containers"][0]
    assert threads(trainer) == ["6"], "48 CPUs for 8 ranks"
    assert threads(server) == ["4"]
    half = parse_spec({**CPU_SPEC, "resources": {**CPU_SPEC["resources"], "cpu": "500m"}})
    assert threads(builders.build_trainer_job(builders.JobRef("tiny", "demo", "u", half), 0)["spec"]["template"]["spec"]["containers"][0]) == ["1"]
    own = parse_spec({**GPU_SPEC, "podTemplate": {"env": [{"name": "OMP_NUM_THREADS", "value": "12"}]}})
    job = builders.JobRef("rex", "team-a", "uid-1", own)
    for container in (builders.build_trainer_job(job, 0)["spec"]["template"]["spec"]["containers"][0],
                      builders.build_inference_deployment(job)["spec"]["template"]["spec"]["containers"][0]):
        assert threads(container) == ["12"], "the user's value, once"


def test_openmp_workers_sleep_when_idle_instead_of_spending_the_cpu_limit() -> None:
    """More than one thread a rank: OMP_WAIT_POLICY=PASSIVE (spinning workers burn the pod's quota);
    one thread has no worker to wait; the pod template's own policy wins."""
    trainer = builders.build_trainer_job(gpu_job(), 0)["spec"]["template"]["spec"]["containers"][0]
    server = builders.build_inference_deployment(gpu_job())["spec"]["template"]["spec"]["containers"][0]
    assert threads(trainer, "OMP_WAIT_POLICY") == threads(server, "OMP_WAIT_POLICY") == ["PASSIVE"]
    assert threads(builders.build_trainer_job(cpu_job(), 0)["spec"]["template"]["spec"]["containers"][0], "OMP_WAIT_POLICY") == []
    own = parse_spec({**GPU_SPEC, "podTemplate": {"env": [{"name": "OMP_WAIT_POLICY", "value": "ACTIVE"}]}})
    container = builders.build_trainer_job(builders.JobRef("rex", "team-a", "uid-1", own), 0)["spec"]["template"]["spec"]["containers"][0]
    assert threads(container, "OMP_WAIT_POLICY") == ["ACTIVE"] and threads(container) == ["6"]


def test_no_secret_value_in_any_manifest() -> None:
    job = cpu_job()
    text = str([builders.build_trainer_job(job, 0), builders.build_inference_deployment(job), builders.build_config_map(job)])
    assert "secretKeyRef" in text and "AWS_SECRET_ACCESS_KEY', 'value'" not in text


def test_only_a_queued_job_is_created_suspended() -> None:
    unqueued = dict(GPU_SPEC, scheduling={}, runPolicy={"suspend": True})
    job = builders.build_trainer_job(builders.JobRef("rex", "team-a", "uid-1", parse_spec(unqueued)), 0)
    assert job["spec"]["suspend"] is False, "runPolicy.suspend is handled before a Job exists"
    # The queue label on the DreamboothJob itself (as users label Kubeflow jobs for Kueue) goes to the Job.
    labelled = builders.JobRef("rex", "team-a", "uid-1", parse_spec(dict(GPU_SPEC, scheduling={})),
                               {"kueue.x-k8s.io/queue-name": "team-a", "kueue.x-k8s.io/priority-class": "high", "team": "x"})
    queued = builders.build_trainer_job(labelled, 0)
    assert queued["spec"]["suspend"] is True and labelled.queue_name == "team-a"
    assert queued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert queued["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    assert "team" not in queued["metadata"]["labels"]


POD_TEMPLATE: dict[str, Any] = {
    "scheduling": {
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["z1"]}]}]}}},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
                                       "labelSelector": {"matchLabels": {"dreambooth.dev/job-name": "rex"}}}],
    },
    "podTemplate": {
        "labels": {"team": "vision", "app.kubernetes.io/name": "mine"},
        "annotations": {"sidecar.istio.io/inject": "false"},
        "serviceAccountName": "trainer-wi",
        "imagePullSecrets": [{"name": "regcred"}],
        "env": [{"name": "HF_HOME", "value": "/cache/hf"}, {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "t", "key": "k"}}}],
        "volumes": [{"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}}],
        "volumeMounts": [{"name": "hf-cache", "mountPath": "/cache", "readOnly": True}],
    },
    "serving": {"scheduling": {"nodeSelector": {"pool": "l4"}, "priorityClassName": "serving"}},
}


def test_pod_template_pieces_reach_the_trainer_and_inference_pods() -> None:
    job = builders.JobRef("rex", "team-a", "uid-1", parse_spec({**GPU_SPEC, **POD_TEMPLATE, "scheduling": {**GPU_SPEC["scheduling"], **POD_TEMPLATE["scheduling"]}}))
    trainer = builders.build_trainer_job(job, 0)["spec"]["template"]
    server = builders.build_inference_deployment(job)["spec"]["template"]
    for template in (trainer, server):
        pod, (container,) = template["spec"], template["spec"]["containers"]
        assert template["metadata"]["labels"]["team"] == "vision"
        assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "dreambooth", "the operator's labels win"
        assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
        assert pod["automountServiceAccountToken"] is False
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}} in pod["volumes"]
        assert {"name": "hf-cache", "mountPath": "/cache", "readOnly": True} in container["volumeMounts"]
        assert container["env"][-2:] == [{"name": "HF_HOME", "value": "/cache/hf"},
                                         {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "t", "key": "k"}}}]
    # The trainers' workload identity (it writes checkpoints) stays off the inference pods.
    assert trainer["spec"]["serviceAccountName"] == "trainer-wi" and "serviceAccountName" not in server["spec"]
    reader = builders.JobRef("rex", "team-a", "uid-1", parse_spec({**GPU_SPEC, **POD_TEMPLATE, "serving": {"serviceAccountName": "reader-wi"}}))
    assert builders.build_inference_deployment(reader)["spec"]["template"]["spec"]["serviceAccountName"] == "reader-wi"
    assert trainer["spec"]["affinity"] == POD_TEMPLATE["scheduling"]["affinity"]
    assert trainer["spec"]["topologySpreadConstraints"] == POD_TEMPLATE["scheduling"]["topologySpreadConstraints"]
    assert trainer["spec"]["priorityClassName"] == "training"
    assert server["spec"]["nodeSelector"] == {"pool": "l4"} and server["spec"]["priorityClassName"] == "serving"
    assert "affinity" not in server["spec"]


def test_template_edits_change_the_hashes_that_roll_and_flag_them() -> None:
    before = parse_spec(GPU_SPEC)
    after = parse_spec({**GPU_SPEC, "podTemplate": {"labels": {"team": "x"}}})
    assert builders.trainer_template_hash(before) != builders.trainer_template_hash(after)
    assert builders.serving_hash(before) != builders.serving_hash(after)
    replicas = parse_spec({**GPU_SPEC, "serving": {**GPU_SPEC["serving"], "replicas": 3}})
    assert builders.serving_hash(replicas) != builders.serving_hash(before)
    assert builders.trainer_template_hash(replicas) == builders.trainer_template_hash(before), "serving is not the trainer's"


def test_inference_deployment() -> None:
    assert builders.build_inference_deployment(gpu_job()) == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "rex-serve", "namespace": "team-a", "labels": labels("rex", "inference"),
                     "annotations": {"dreambooth.dev/spec-hash": builders.serving_hash(gpu_job().spec)}},
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
                            "env": [{"name": "OMP_NUM_THREADS", "value": "4"}, {"name": "OMP_WAIT_POLICY", "value": "PASSIVE"}, *CREDS, {"name": "DREAMBOOTH_LOG_FORMAT", "value": "json"}],
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
                            "volumeMounts": [
                                {"name": "scratch", "mountPath": "/tmp"},
                                {"name": "cache", "mountPath": "/var/cache/dreambooth"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "scratch", "emptyDir": {"sizeLimit": "4Gi"}},
                        {"name": "cache", "emptyDir": {"sizeLimit": "100Gi"}},
                    ],
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


def test_the_server_loads_the_checkpoint_serving_checkpoint_names_and_the_trainer_is_told() -> None:
    from dreambooth_operator.shared_server import adapter_uri

    for checkpoint, prefix in (("final", "final"), ("best", "exports/best"), ("step-100", "exports/step-00000100")):
        spec = {**CPU_SPEC, "training": {"maxSteps": 200}, "checkpointing": {"everyNSteps": 100},
                "serving": {**CPU_SPEC["serving"], "checkpoint": checkpoint}}
        job = builders.JobRef("tiny", "demo", "uid-2", parse_spec(spec))
        args = builders.build_inference_deployment(job)["spec"]["template"]["spec"]["containers"][0]["command"]
        assert args[args.index("--model") + 1] == f"{job.output_uri}/{prefix}"
        assert adapter_uri(job) == f"{job.output_uri}/{prefix}/lora"
        config = yaml.safe_load(next(iter(builders.build_config_map(job)["data"].values())))
        assert config["output"]["serve"] == checkpoint, "the trainer exports and keeps what will be served"


def test_an_export_job_is_one_cpu_pod_of_the_trainer_image_on_the_jobs_config() -> None:
    data = {**GPU_SPEC, "checkpointing": {"everyNSteps": 200}, "serving": {**GPU_SPEC["serving"], "checkpoint": "step-400"}}
    job = builders.build_export_job(builders.JobRef("rex", "team-a", "uid-1", parse_spec(data)))
    assert job["metadata"]["name"] == "rex-export-step-400" and job["metadata"]["labels"] == labels("rex", "export")
    assert "completionMode" not in job["spec"] and job["spec"]["backoffLimit"] == 2
    assert job["spec"]["podFailurePolicy"]["rules"] == [builders.POD_FAILURE_RULES[0]], "exit 2 (bad input) is not retried"
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "trainer:1"
    assert container["command"] == ["dreambooth", "export", "/etc/dreambooth/config.yaml", "--checkpoint", "step-400"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"] and container["resources"]["limits"]["memory"] == "512Gi"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {"name": "config", "configMap": {"name": "rex-config"}} in pod["volumes"]
    assert [e for e in container["env"] if e["name"].startswith("AWS_")] == CREDS
    assert not {"MASTER_ADDR", "NODE_RANK", "DREAMBOOTH_ATTEMPT"} & {e["name"] for e in container["env"]}, "no gang: no rendezvous, no fencing"
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["securityContext"] == SECURITY
    assert job["spec"]["template"]["metadata"]["labels"]["dreambooth.dev/job-uid"] == "uid-1"
