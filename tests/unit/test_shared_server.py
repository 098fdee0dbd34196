"""Shared inference servers, pure: who may share, registry edits, manifests, and the decisions."""
from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from typing import Any

from dreambooth_operator import builders, lifecycle, shared_server
from dreambooth_operator.lifecycle import Action, Observation, TrainerJobState
from dreambooth_operator.network_policies import build_job_network_policy
from dreambooth_operator.shared_server import SharedServerState
from dreambooth_api.v1alpha1.spec import parse_spec

T0 = datetime(2026, 11, 26, 6, 0, 0, tzinfo=timezone.utc)
LORA_SPEC: dict[str, Any] = {
    "model": {"source": "tiny"},
    "data": {"instanceUri": "s3://dreambooth/subjects/rex", "instancePrompt": "a photo of sks dog", "resolution": 32},
    "prior": {"enabled": False},
    "training": {"maxSteps": 4, "lora": {"enabled": True}},
    "resources": {"accelerator": "cpu"},
    "storage": {"endpoint": "minio:9000", "bucket": "dreambooth", "credentialsSecretRef": {"name": "s3-rw"},
                "servingCredentialsSecretRef": {"name": "s3-ro"}},
    "serving": {"server": "sd", "auth": {"tokenSecretRef": {"name": "api", "key": "token"}},
                "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"}},
}


def job(name: str = "rex", uid: str = "uid-rex", **sections: Any) -> builders.JobRef:
    data = copy.deepcopy(LORA_SPEC)
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return builders.JobRef(name, "team-a", uid, parse_spec(data))


def saved(config_map: dict[str, Any], uid: str = "cm-uid") -> dict[str, Any]:
    """As the API server answers: with a uid and a resourceVersion."""
    result = copy.deepcopy(config_map)
    result["metadata"].update(uid=uid, resourceVersion="7")
    return result


def registry(config_map: dict[str, Any]) -> dict[str, Any]:
    return json.loads(config_map["data"]["registry.json"])


def test_a_shared_server_needs_a_lora_job() -> None:
    import pytest

    from dreambooth_trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"spec.serving.server needs training.lora.enabled"):
        job(training={"lora": {"enabled": False}})


def test_who_may_share_a_server() -> None:
    first = shared_server.definition_from(job().spec)
    assert shared_server.sharing_conflict("sd", "mia", first, shared_server.definition_from(job("mia").spec)) is None
    other_base = shared_server.definition_from(job(training={"seed": 3}).spec)
    assert "training.seed 3" in shared_server.sharing_conflict("sd", "mia", first, other_base)
    flux = shared_server.definition_from(job("mia", model={"source": "tiny-flux"}).spec)
    assert flux.family == "flux" and first.family == "sd"
    assert "model.family is flux" in shared_server.sharing_conflict("sd", "mia", first, flux)
    no_token = shared_server.definition_from(job(serving={"auth": {}}).spec)
    assert "Secret api key token" in shared_server.sharing_conflict("sd", "mia", first, no_token)
    elsewhere = shared_server.definition_from(job(storage={"endpoint": "other:9000"}).spec)
    assert "minio:9000" in shared_server.sharing_conflict("sd", "mia", first, elsewhere)
    assert "named like its server" in shared_server.sharing_conflict("sd", "sd", first, first)
    # image, replicas and resources are the server's: a later job does not change them
    bigger = shared_server.definition_from(job(serving={"replicas": 3}).spec)
    assert shared_server.sharing_conflict("sd", "mia", first, bigger) is None


def test_registering_and_unregistering_edits_the_registry_and_its_owners() -> None:
    rex, mia = job(), job("mia", "uid-mia")
    first = saved(shared_server.with_adapter(None, rex, "sd", T0))
    assert first["metadata"]["name"] == "sd-registry" and first["metadata"]["labels"]["dreambooth.dev/server"] == "sd"
    assert registry(first) == {"server": "sd", "baseModel": "tiny", "adapters": {"rex": {
        "uri": "s3://dreambooth/jobs/team-a/rex/uid-rex/final/lora", "job": "rex", "uid": "uid-rex", "registered": "2026-11-26T06:00:00Z"}}}
    assert [ref["uid"] for ref in first["metadata"]["ownerReferences"]] == ["uid-rex"]
    assert not any(ref["controller"] for ref in first["metadata"]["ownerReferences"])
    assert shared_server.is_registered(first, rex) and not shared_server.is_registered(first, mia)

    both = saved(shared_server.with_adapter(first, mia, "sd", T0))
    assert sorted(registry(both)["adapters"]) == ["mia", "rex"] and shared_server.is_registered(both, mia)
    assert json.loads(both["data"]["server.json"]) == json.loads(first["data"]["server.json"])

    # the garbage collector dropped rex's reference (rex was deleted): rex's entry is stale
    collected = copy.deepcopy(both)
    collected["metadata"]["ownerReferences"] = [ref for ref in both["metadata"]["ownerReferences"] if ref["uid"] != "uid-rex"]
    assert shared_server.stale_adapters(collected) == ["rex"]
    again = shared_server.with_adapter(collected, job("zed", "uid-zed"), "sd", T0)
    assert sorted(registry(again)["adapters"]) == ["mia", "zed"]

    without = shared_server.without_adapters(both, ["mia"])
    assert sorted(registry(without)["adapters"]) == ["rex"]
    assert [ref["uid"] for ref in without["metadata"]["ownerReferences"]] == ["uid-rex"]


def test_the_shared_server_objects() -> None:
    definition = shared_server.definition_from(job().spec)
    deployment, service, policy = shared_server.build_shared_objects("sd", "team-a", definition, "cm-uid")
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "sd-registry", "uid": "cm-uid", "controller": True, "blockOwnerDeletion": True}
    for manifest in (deployment, service, policy):
        assert manifest["metadata"]["name"] == "sd-shared" and manifest["metadata"]["ownerReferences"] == [owner]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == [
        "dreambooth", "serve", "--model", "tiny", "--model-name", "sd", "--registry", "/etc/dreambooth/registry/registry.json",
        "--tiny-seed", "0", "--tiny-resolution", "32", "--host", "0.0.0.0", "--port", "8080"]
    env = {item["name"]: item for item in container["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-ro"  # read-only, never the trainer's
    assert env["DREAMBOOTH_API_TOKEN"] == {"name": "DREAMBOOTH_API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "api", "key": "token"}}}
    assert {"name": "registry", "mountPath": "/etc/dreambooth/registry", "readOnly": True} in container["volumeMounts"]
    assert {"name": "registry", "configMap": {"name": "sd-registry", "items": [{"key": "registry.json", "path": "registry.json"}]}} in pod["volumes"]
    selector = {"dreambooth.dev/server": "sd", "app.kubernetes.io/component": "shared-inference"}
    assert deployment["spec"]["selector"]["matchLabels"] == selector and service["spec"]["selector"] == selector
    assert policy["spec"] == {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress"],
                              "ingress": [{"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": 8080}]}]}


def test_the_job_network_policy() -> None:
    peers = [{"namespaceSelector": {"team": "web"}, "podSelector": {"app": "frontend"}}, {"podSelector": {"role": "client"}}]
    policy = build_job_network_policy(job(serving={"ingressFrom": peers}))
    assert policy["metadata"]["name"] == "rex-network"
    assert policy["spec"] == {
        "podSelector": {"matchLabels": {"dreambooth.dev/job-name": "rex"}},
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"dreambooth.dev/job-name": "rex", "app.kubernetes.io/component": "trainer",
                                                       "dreambooth.dev/job-uid": "uid-rex"}}}]},
            {"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}, "namespaceSelector": {"matchLabels": {"team": "web"}}},
                      {"podSelector": {"matchLabels": {"role": "client"}}}],
             "ports": [{"protocol": "TCP", "port": 8080}]},
        ],
    }


def test_a_dedicated_server_reads_with_the_serving_credentials_and_the_token() -> None:
    ref = builders.JobRef("rex", "team-a", "uid-rex", parse_spec({**copy.deepcopy(LORA_SPEC), "serving": {"auth": {"tokenSecretRef": {"name": "api"}}}}))
    env = {item["name"]: item for item in builders.build_inference_deployment(ref)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-ro"
    assert env["DREAMBOOTH_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "api", "key": "token"}


# --- decisions ---------------------------------------------------------------------------------


def succeeded(ref: builders.JobRef, shared: SharedServerState | None, status: dict[str, Any] | None = None) -> lifecycle.Plan:
    base = lifecycle.accept({}, 1, T0, ref.output_uri).status
    base.update(status or {})
    observation = Observation(ref.name, ref.namespace, 1, ref.spec, base, T0, job=TrainerJobState(gang=0, succeeded=True), shared=shared)
    return lifecycle.decide(observation)


def serving_ready(plan: lifecycle.Plan) -> tuple[str, str]:
    condition = next(c for c in plan.status["conditions"] if c["type"] == "ServingReady")
    return condition["status"], condition["reason"]


def test_a_finished_lora_job_registers_then_turns_serving_ready() -> None:
    ref = job()
    plan = succeeded(ref, SharedServerState("sd"))
    assert Action("register_adapter") in plan.actions and Action("ensure_serving") not in plan.actions
    assert serving_ready(plan) == ("False", "RegisteringAdapter")
    assert plan.status["serving"] == {"url": "http://sd-shared.team-a.svc:8080", "model": "rex", "server": "sd"}
    assert plan.status["endpoint"] == "http://sd-shared.team-a.svc:8080"
    waiting = succeeded(ref, SharedServerState("sd", registered=True, running=True, ready_replicas=0))
    assert waiting.actions == [] and serving_ready(waiting) == ("False", "SharedServerNotReady")
    ready = succeeded(ref, SharedServerState("sd", registered=True, running=True, ready_replicas=1, answers=True))
    assert ready.actions == [] and serving_ready(ready) == ("True", "AdapterRegistered")
    sweep = succeeded(ref, SharedServerState("sd", registered=True, stale=True, running=True, ready_replicas=1))
    assert sweep.actions == [Action("register_adapter")]


def test_serving_ready_waits_until_the_running_server_answers_for_the_subject() -> None:
    """Registered and the server ready is not enough: its pods read the registry file up to a
    minute later, and until they answer GET /v1/models/<job> a client gets model_not_found."""
    syncing = succeeded(job(), SharedServerState("sd", registered=True, running=True, ready_replicas=1, answers=False))
    assert serving_ready(syncing) == ("False", "AdapterNotListed") and finished(syncing) is None
    assert syncing.actions == [] and syncing.requeue_after is not None, "looks again: nothing else tells it the pods caught up"


class ServerPods:
    """The calls `registration.server_answers` makes: pods, the token Secret, one GET per pod."""

    def __init__(self, answers: dict[str, int]) -> None:
        self.answers, self.asked = answers, []

    def list_pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        assert labels == shared_server.shared_selector("sd")
        ready = {"conditions": [{"type": "Ready", "status": "True"}]}
        return [{"metadata": {"name": "sd-shared-a"}, "status": ready},
                {"metadata": {"name": "sd-shared-b"}, "status": ready},
                {"metadata": {"name": "sd-shared-old", "deletionTimestamp": "2026-11-26T06:00:00Z"}, "status": ready},
                {"metadata": {"name": "sd-shared-new"}, "status": {"conditions": [{"type": "Ready", "status": "False"}]}}]

    def read_secret_key(self, namespace: str, name: str, key: str) -> str | None:
        return "t0ken" if (namespace, name, key) == ("team-a", "api", "token") else None

    def pod_get_status(self, namespace: str, pod: str, port: int, path: str, headers: dict[str, str], timeout: float = 5) -> int:
        self.asked.append((pod, port, path, headers))
        return self.answers[pod]


def test_the_operator_asks_every_ready_server_pod_with_the_servers_token(monkeypatch: Any) -> None:
    from dreambooth_operator import kube, registration

    definition = shared_server.definition_from(job().spec)
    for answers, expected in (({"sd-shared-a": 200, "sd-shared-b": 200}, True), ({"sd-shared-a": 200, "sd-shared-b": 404}, False)):
        pods = ServerPods(answers)
        for name in ("list_pods", "read_secret_key", "pod_get_status"):
            monkeypatch.setattr(kube, name, getattr(pods, name))
        assert registration.server_answers(job(), definition) is expected
        assert pods.asked == [(pod, 8080, "/v1/models/rex", {"X-Dreambooth-Token": "t0ken"}) for pod in ("sd-shared-a", "sd-shared-b")]


def test_a_job_that_cannot_share_says_why_and_registers_nothing() -> None:
    plan = succeeded(job(), SharedServerState("sd", conflict="serving.server sd serves base model hf://x"))
    assert plan.actions == [] and serving_ready(plan) == ("False", "SharedServerConflict")


def test_leaving_a_server_unregisters_from_it() -> None:
    moved = succeeded(job(serving={"server": "other"}), SharedServerState("other"), {"serving": {"server": "sd"}})
    assert Action("unregister_adapter", server="sd") in moved.actions and Action("register_adapter") in moved.actions
    disabled = succeeded(job(serving={"enabled": False}), None, {"serving": {"server": "sd"}})
    assert disabled.actions == [Action("unregister_adapter", server="sd")] and "serving" not in disabled.status


def finished(plan: lifecycle.Plan) -> tuple[str, str] | None:
    condition = next((c for c in plan.status["conditions"] if c["type"] == "Finished"), None)
    return None if condition is None else (condition["status"], condition["reason"])


def test_the_one_wait_returns_for_a_shared_server_too() -> None:
    waiting = succeeded(job(), SharedServerState("sd", registered=True, running=True, ready_replicas=0))
    assert finished(waiting) is None and waiting.requeue_after is not None, "looks again: the server's pods are not the job's"
    ready = succeeded(job(), SharedServerState("sd", registered=True, running=True, ready_replicas=1, answers=True))
    assert finished(ready) == ("True", "ServingReady")
    refused = succeeded(job(), SharedServerState("sd", conflict="serving.server sd serves base model hf://x"))
    assert finished(refused) == ("True", "ServingFailed")


def test_a_shared_servers_deployment_change_reaches_the_server_not_a_job() -> None:
    from dreambooth_operator.watches import ChildCache, slim_deployment

    jobs: list[str] = []
    servers: list[str] = []
    cache = ChildCache("apps/v1", "deployments", slim_deployment, None,
                       lambda ns, name: jobs.append(name), lambda ns, server: servers.append(server))
    cache._notify("team-a", "sd-shared", {"metadata": {"labels": {shared_server.LABEL_SERVER: "sd"}}})
    cache._notify("team-a", "rex-serve", {"metadata": {"labels": {builders.LABEL_JOB: "rex"}}})
    assert jobs == ["rex"] and servers == ["sd"]
