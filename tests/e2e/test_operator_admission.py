"""Bad DreamboothJobs are refused by `kubectl apply` (OpenAPI schema + CEL), naming the field."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.testbed

GOOD: dict[str, Any] = {
    "data": {"instanceUri": "s3://dreambooth/subjects/rex", "instancePrompt": "a photo of sks dog"},
    "prior": {"classPrompt": "a photo of dog"},
    "resources": {"nodes": 2, "gpusPerNode": 8},
    "storage": {"endpoint": "minio:9000", "bucket": "dreambooth", "credentialsSecretRef": {"name": "s3"}},
}

# (what, dotted changes, text the refusal must contain: the field)
BAD = [
    ("zero steps", {"training.maxSteps": 0}, "spec.training.maxSteps"),
    ("zero gpus per node", {"resources.gpusPerNode": 0}, "spec.resources.gpusPerNode"),
    ("zero nodes", {"resources.nodes": 0}, "spec.resources.nodes"),
    ("token missing from the instance prompt", {"data.instancePrompt": "a photo of a dog"}, "spec.data.instancePrompt"),
    ("token in the class prompt", {"prior.classPrompt": "a photo of sks dog"}, "spec.prior.classPrompt"),
    ("ordinary word as token", {"data.token": "photo"}, "spec.data.token"),
    ("prior without a class prompt", {"prior.classPrompt": None}, "spec.prior.classPrompt"),
    ("resolution not a multiple of 8", {"data.resolution": 500}, "spec.data.resolution"),
    ("unknown precision", {"training.mixedPrecision": "fp8"}, "spec.training.mixedPrecision"),
    ("unknown field", {"training.maxStep": 10}, "spec.training.maxStep"),
    ("instance data on a local path", {"data.instanceUri": "/data/rex"}, "spec.data.instanceUri"),
    ("bad bucket name", {"storage.bucket": "Bad_Bucket"}, "spec.storage.bucket"),
    ("endpoint with a scheme", {"storage.endpoint": "http://minio:9000"}, "spec.storage.endpoint"),
    ("cpu job asking for several gpus", {"resources.accelerator": "cpu", "resources.gpusPerNode": 4}, "spec.resources.gpusPerNode"),
    ("negative restarts", {"runPolicy.maxRestarts": -1}, "spec.runPolicy.maxRestarts"),
    ("malformed model source", {"model.source": "hf://only-org"}, "spec.model.source"),
    ("not a quantity", {"resources.memory": "lots"}, "spec.resources.memory"),
    ("secret without a name", {"storage.credentialsSecretRef": {}}, "spec.storage.credentialsSecretRef.name"),
    ("cached latents with a random crop", {"training.cacheLatents": True, "data.centerCrop": False}, "spec.training.cacheLatents"),
    ("label key with a space", {"podTemplate.labels": {"my team": "a"}}, "spec.podTemplate.labels"),
    ("label value with a slash", {"podTemplate.labels": {"team": "a/b"}}, "spec.podTemplate.labels.team"),
    ("queue label value too long", {"scheduling.labels": {"kueue.x-k8s.io/queue-name": "q" * 64}}, "spec.scheduling.labels"),
    ("annotation key with two slashes", {"podTemplate.annotations": {"a/b/c": "x"}}, "spec.podTemplate.annotations"),
    ("env the operator sets", {"podTemplate.env": [{"name": "NODE_RANK", "value": "0"}]}, "spec.podTemplate.env"),
    ("volume name the operator uses", {"podTemplate.volumes": [{"name": "config", "emptyDir": {}}]}, "spec.podTemplate.volumes"),
    ("mount of no volume", {"podTemplate.volumeMounts": [{"name": "cache", "mountPath": "/cache"}]}, "spec.podTemplate.volumeMounts"),
    ("min-SNR on a flow-matching family", {"model.source": "hf://org/flux-model", "model.family": "flux", "training.minSnrGamma": 5.0}, "spec.training.minSnrGamma"),
    ("noise offset on tiny sd3", {"model.source": "tiny-sd3", "training.noiseOffset": 0.05}, "spec.training.noiseOffset"),
    ("flux resolution not a multiple of 16", {"model.source": "hf://org/flux-model", "model.family": "flux", "data.resolution": 1000}, "spec.data.resolution"),
    ("flux bucket step not a multiple of 16", {"model.source": "tiny-flux", "data.bucketing": True, "data.bucketStep": 8}, "spec.data.bucketStep"),
    ("family not the tiny model's", {"model.source": "tiny-sdxl", "model.family": "flux"}, "spec.model.family"),
    ("unknown family", {"model.family": "sd4"}, "spec.model.family"),
    ("SD3's preconditioning on flux", {"model.source": "tiny-flux", "training.preconditionOutputs": False}, "spec.training.preconditionOutputs"),
    ("Flux's guidance on sdxl", {"model.source": "tiny-sdxl", "training.distilledGuidance": 1.0}, "spec.training.distilledGuidance"),
    ("a DDPM sampler on flux", {"model.source": "tiny-flux", "prior.sampler": "euler"}, "spec.prior.sampler"),
    ("a T5 length on sd", {"model.source": "tiny", "training.maxSequenceLength": 128}, "spec.training.maxSequenceLength"),
    ("quantizing a full fine-tune", {"model.quantize": "int8"}, "spec.model.quantize"),
    ("Flux LoRA in bf16 on a 24 GB card", {"model.source": "hf://black-forest-labs/FLUX.1-dev", "training.lora": {"enabled": True},
                                           "resources.gpuMemory": "24Gi"}, "spec.resources.gpuMemory"),
    # serving.checkpoint: final | best | step-N, where N is a checkpoint of this run (defaults: 400 steps, one every 500)
    ("an unknown served checkpoint", {"serving.checkpoint": "latest"}, "spec.serving.checkpoint"),
    ("a served step between checkpoints", {"serving.checkpoint": "step-200"}, "spec.serving.checkpoint"),
    ("a served step past the end", {"serving.checkpoint": "step-800", "checkpointing.everyNSteps": 100}, "spec.serving.checkpoint"),
    ("a served step 0", {"serving.checkpoint": "step-0", "checkpointing.everyNSteps": 100}, "spec.serving.checkpoint"),
    ("the best without scores", {"serving.checkpoint": "best", "validation.fidelity": {"enabled": False}}, "spec.serving.checkpoint"),
]


def with_changes(changes: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(GOOD)
    for dotted, value in changes.items():
        node = spec
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return spec


def apply(testbed: Any, namespace: str, name: str, spec: dict[str, Any]) -> Any:
    manifest = {"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamboothJob", "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    return testbed.kubectl("apply", "-f", "-", input=json.dumps(manifest), check=False)


def test_a_good_spec_is_accepted_with_defaults(testbed: Any, crd: str, namespace: str) -> None:
    result = apply(testbed, namespace, "good", GOOD)
    assert result.returncode == 0, result.stderr
    stored = testbed.get("dreamboothjob", "good", namespace)["spec"]
    assert stored["training"]["maxSteps"] == 400 and stored["prior"]["enabled"] is True
    assert stored["runPolicy"] == {"maxRestarts": 3, "suspend": False, "cleanPodPolicy": "Running", "retryOnOutOfMemory": False,
                                   "admissionDeadlineSeconds": 600, "terminationGracePeriodSeconds": 600, "maxDisruptions": 20}
    short = testbed.kubectl("get", "dbj", "-n", namespace).stdout.split("\n")[0].split()
    assert short == ["NAME", "PHASE", "PROGRESS", "ETA", "RESTARTS", "FIDELITY", "SERVING", "AGE"]


@pytest.mark.parametrize("changes", [{"serving.checkpoint": "best"}, {"serving.checkpoint": "step-400"},
                                     {"serving.checkpoint": "step-200", "checkpointing.everyNSteps": 100},
                                     {"serving.checkpoint": "step-350", "checkpointing.everyNSteps": 350}],
                         ids=["best", "the last step", "a checkpoint", "a step that is both"])
def test_a_served_checkpoint_of_the_run_is_accepted(testbed: Any, crd: str, namespace: str, changes: dict[str, Any]) -> None:
    result = apply(testbed, namespace, "served", with_changes(changes))
    assert result.returncode == 0, result.stderr
    assert testbed.get("dreamboothjob", "served", namespace)["spec"]["serving"]["checkpoint"] == changes["serving.checkpoint"]


@pytest.mark.parametrize(("what", "changes", "field"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_spec_is_refused_naming_the_field(testbed: Any, crd: str, namespace: str, what: str, changes: dict[str, Any], field: str) -> None:
    result = apply(testbed, namespace, "bad", with_changes(changes))
    assert result.returncode != 0, f"{what}: accepted"
    assert field in result.stderr, result.stderr
    assert testbed.get("dreamboothjob", "bad", namespace) is None


@pytest.mark.parametrize("example", ["job-sdxl-lora.yaml", "job-flux-lora.yaml"])
def test_the_family_examples_pass_the_api_servers_rules(testbed: Any, crd: str, namespace: str, example: str) -> None:
    manifest = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / example).read_text())
    manifest["metadata"]["namespace"] = namespace

    def dry_run() -> Any:
        return testbed.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(manifest), check=False)

    accepted = dry_run()
    assert accepted.returncode == 0, accepted.stderr
    manifest["spec"]["training"]["minSnrGamma"] = 5.0  # a DDPM option: sdxl takes it, flux refuses it
    ddpm_option = dry_run()
    if manifest["spec"]["model"]["family"] == "flux":
        assert ddpm_option.returncode != 0 and "spec.training.minSnrGamma" in ddpm_option.stderr, ddpm_option.stderr
    else:
        assert ddpm_option.returncode == 0, ddpm_option.stderr


# Jobs whose exact memory the plan knows, in each published architecture and mode: the API server's
# CEL rule and the Python plan (`dreambooth plan`, the operator) draw the line at the same byte count.
PLANNED = [
    ("sd15", {"training.lora": {"enabled": False}}),
    ("sd21-v", {"training.lora": {"enabled": True, "rank": 64}, "training.trainTextEncoder": True}),
    ("sdxl-base", {"training.lora": {"enabled": True, "rank": 32}, "training.ema": True}),
    ("sdxl-base", {"training.lora": {"enabled": False}, "training.optimizer": "adamw_8bit", "training.mixedPrecision": "no"}),
    ("sd35-medium", {"training.lora": {"enabled": True}, "training.trainTextEncoder": True, "model.quantize": "int8"}),
    ("sd35-large", {"training.lora": {"enabled": False}, "training.strategy": "fsdp"}),
    ("flux1-dev", {"training.lora": {"enabled": True, "rank": 16}, "model.quantize": "fp8"}),
    ("flux1-schnell", {"training.lora": {"enabled": False}, "training.trainTextEncoder": True, "training.ema": True}),
]


@pytest.mark.parametrize(("architecture", "changes"), PLANNED, ids=[f"{a}-{i}" for i, (a, _) in enumerate(PLANNED)])
def test_the_api_server_refuses_exactly_the_jobs_the_memory_plan_cannot_fit(testbed: Any, crd: str, namespace: str,
                                                                          architecture: str, changes: dict[str, Any]) -> None:
    from dreambooth_api.v1alpha1.architectures import PUBLISHED_SOURCES
    from dreambooth_api.v1alpha1.spec import memory_plan, parse_spec

    source = next(s for s, a in PUBLISHED_SOURCES.items() if a == architecture)
    spec = with_changes({"model.source": source, **changes})
    exact = memory_plan(parse_spec(spec)).exact
    for gpu_memory, accepted in ((exact - 2**20, False), (exact + 2**20, True)):
        spec["resources"]["gpuMemory"] = str(gpu_memory)
        manifest = {"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamboothJob", "metadata": {"name": "planned", "namespace": namespace},
                    "spec": spec}
        result = testbed.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(manifest), check=False)
        assert (result.returncode == 0) == accepted, f"{gpu_memory} bytes for {exact} exact: {result.stderr}"
        if not accepted:
            assert "spec.resources.gpuMemory" in result.stderr, result.stderr


def test_a_bad_name_is_refused(testbed: Any, crd: str, namespace: str) -> None:
    result = apply(testbed, namespace, "a" * 41, GOOD)
    assert result.returncode != 0 and "metadata.name" in result.stderr, result.stderr


def test_the_spec_is_frozen_from_acceptance_not_from_a_phase(testbed: Any, crd: str, namespace: str) -> None:
    """The lock keys on status.acceptedGeneration: Pending with pods pending or after a restart is
    locked too; before acceptance (e.g. waiting for a Secret) the job may be fixed."""
    assert apply(testbed, namespace, "frozen", GOOD).returncode == 0
    if not (testbed.get("dreamboothjob", "frozen", namespace).get("status") or {}).get("acceptedGeneration"):
        # (an operator running in this session may have accepted it already)
        assert apply(testbed, namespace, "frozen", with_changes({"training.maxSteps": 10})).returncode == 0, "not accepted yet: may change"
    status = {"status": {"phase": "Pending", "acceptedGeneration": 1, "restarts": 1}}
    testbed.kubectl("patch", "dreamboothjob", "frozen", "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(status))
    refused = apply(testbed, namespace, "frozen", with_changes({"training.maxSteps": 30}))
    assert refused.returncode != 0 and "spec.training" in refused.stderr and "immutable" in refused.stderr, refused.stderr
    refused = apply(testbed, namespace, "frozen", with_changes({"resources.nodes": 4}))
    assert refused.returncode != 0 and "spec.resources" in refused.stderr, refused.stderr
    allowed = copy.deepcopy(testbed.get("dreamboothjob", "frozen", namespace)["spec"])
    allowed["runPolicy"]["suspend"] = True
    allowed["scheduling"] = {"nodeSelector": {"pool": "h200"}}
    allowed["podTemplate"] = {"labels": {"team": "vision"}}
    allowed["serving"]["replicas"] = 2
    result = apply(testbed, namespace, "frozen", allowed)
    assert result.returncode == 0, f"runPolicy, scheduling, podTemplate and serving stay mutable: {result.stderr}"
