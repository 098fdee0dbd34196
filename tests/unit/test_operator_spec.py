"""The DreamboothJob spec model: CRD generation and sync, spec -> trainer config, bad specs."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dreambooth_cli.main import crd_yaml
from dreambooth_trainer.config import ConfigError, TrainConfig, config_yaml
from dreambooth_api.v1alpha1.spec import (
    CEL_RULES,
    crd_manifest,
    output_uri,
    parse_spec,
    train_config_from_spec,
)

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "dreambooth.dev_dreamboothjobs.yaml"

MINIMAL: dict[str, Any] = {
    "data": {"instanceUri": "s3://subjects/rex", "instancePrompt": "a photo of sks dog"},
    "prior": {"classPrompt": "a photo of dog"},
    "storage": {"endpoint": "minio:9000", "bucket": "dreambooth", "credentialsSecretRef": {"name": "s3"}},
}


def spec_with(**changes: Any) -> dict[str, Any]:
    """MINIMAL with dotted keys replaced: spec_with(**{"training.maxSteps": 0})."""
    spec = copy.deepcopy(MINIMAL)
    for dotted, value in changes.items():
        node = spec
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return spec


# --- the CRD --------------------------------------------------------------------------


def test_committed_crd_matches_the_model() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), "run `dreambooth crd > crds/dreambooth.dev_dreamboothjobs.yaml`"


def test_cli_prints_the_crd() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from dreambooth_cli.main import main; main()", "crd"],
        capture_output=True, text=True, check=True,
    )
    assert result.stdout == crd_yaml()


def test_crd_identity_and_printer_columns() -> None:
    crd = crd_manifest()
    assert crd["metadata"]["name"] == "dreamboothjobs.dreambooth.dev"
    spec = crd["spec"]
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "DreamboothJob"
    assert spec["names"]["shortNames"] == ["dbj"]
    assert spec["names"]["categories"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    assert [c["name"].upper() for c in version["additionalPrinterColumns"]] == ["PHASE", "PROGRESS", "ETA", "RESTARTS", "FIDELITY", "SERVING", "AGE"]


def _walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural() -> None:
    root = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(root):
        assert "$ref" not in node and "$defs" not in node and "title" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{path}: anyOf only for int-or-string"
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
        if node.get("type") == "string" and path.startswith((".spec", ".status")):
            assert "maxLength" in node, f"{path}: CEL cost needs a bound"
        if node.get("type") == "array":
            assert "maxItems" in node, path


def test_spec_defaults_are_valid_and_status_has_none() -> None:
    root = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(root["properties"]["status"], ".status"):
        assert "default" not in node, path
    spec = root["properties"]["spec"]["properties"]
    assert spec["training"]["properties"]["maxSteps"] == {
        "description": "Optimizer steps to train.", "type": "integer", "minimum": 0, "exclusiveMinimum": True, "default": 400,
    }
    # A section left out gets its fields' defaults, so CEL rules see prior.enabled etc.
    assert spec["prior"]["default"]["enabled"] is True
    assert spec["training"]["default"]["lora"] == {"enabled": False, "rank": 4, "dropout": 0.0}
    assert "default" not in spec["data"]  # required sections get no default
    assert spec["training"]["properties"]["maxGradNorm"]["nullable"] is True  # null disables clipping


def test_status_keeps_every_operator_field() -> None:
    status = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert set(status["properties"]) >= {
        "phase", "conditions", "progress", "restarts", "latestCheckpoint", "endpoint", "observedGeneration", "kopf",
    }
    condition = status["properties"]["conditions"]["items"]
    assert set(condition["properties"]) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}
    assert set(condition["required"]) == {"type", "status", "reason", "message", "lastTransitionTime"}
    assert status["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert set(status["properties"]["progress"]["properties"]) >= {"step", "totalSteps", "percent", "loss", "imagesPerSecond", "etaSeconds"}


def test_cel_rules_name_their_field() -> None:
    root = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    count = 0
    for path, rules in CEL_RULES.items():
        node = root
        for part in filter(None, path.split(".")):
            node = node["properties"][part]
        assert node["x-kubernetes-validations"] == rules
        for rule in rules:
            count += 1
            field = rule.get("fieldPath", f".{path}" if path else ".metadata.name").lstrip(".")
            assert field.split(".")[-1] in rule["message"], rule
            assert "\n" not in rule["rule"]
    assert count >= 12


# --- spec -> trainer config -------------------------------------------------------------


def test_train_config_from_spec_is_the_trainer_config() -> None:
    spec = parse_spec(spec_with(**{"training.maxSteps": 12, "resources.nodes": 2}))
    uri = output_uri(spec, "team-a", "rex", "u-1")
    assert uri == "s3://dreambooth/jobs/team-a/rex/u-1"
    config = train_config_from_spec(spec, uri)
    assert isinstance(config, TrainConfig)
    dumped = yaml.safe_load(config_yaml(config))
    assert set(dumped) == {"model", "data", "prior", "training", "checkpointing", "validation", "output"}
    assert dumped["training"]["max_steps"] == 12
    assert dumped["data"] == {
        "instance_uri": "s3://subjects/rex",
        "instance_prompt": "a photo of sks dog",
        "token": "sks",
        "resolution": None,  # the model's native size, read by the trainer from the model
        "center_crop": True,
        "random_flip": False,
        "num_workers": 0,
        "caption_dropout": 0.0,
        "caption_template": None,
        "bucketing": False,
        "bucket_step": 64,
    }
    assert dumped["output"]["uri"] == uri
    assert dumped["output"]["log_format"] == "json"
    # The trainer reads its YAML back to the same config.
    assert TrainConfig.model_validate(dumped) == config


def test_examples_are_valid_specs() -> None:
    for name in ("job.yaml", "job-tiny.yaml"):
        manifest = yaml.safe_load((REPO / "examples" / name).read_text())
        assert manifest["apiVersion"] == "dreambooth.dev/v1alpha1" and manifest["kind"] == "DreamboothJob"
        parse_spec(manifest["spec"])
    big = parse_spec(yaml.safe_load((REPO / "examples" / "job.yaml").read_text())["spec"])
    assert (big.resources.nodes, big.resources.gpus_per_node, big.resources.accelerator) == (2, 8, "gpu")
    assert big.model.source.startswith("hf://")
    tiny = parse_spec(yaml.safe_load((REPO / "examples" / "job-tiny.yaml").read_text())["spec"])
    assert (tiny.resources.nodes, tiny.resources.accelerator, tiny.model.source) == (2, "cpu", "tiny")


@pytest.mark.parametrize(("name", "family"), [("job-sdxl-lora.yaml", "sdxl"), ("job-flux-lora.yaml", "flux")])
def test_family_examples_are_gpu_lora_jobs_on_public_models(name: str, family: str) -> None:
    manifest = yaml.safe_load((REPO / "examples" / name).read_text())
    spec = parse_spec(manifest["spec"])
    assert spec.model.family == family and spec.model.source.startswith("hf://")
    assert spec.training.lora.enabled and spec.serving.server, "a LoRA job served by its family's shared server"
    assert (spec.resources.accelerator, spec.data.resolution) == ("gpu", 1024), "the family's native size on GPUs"
    assert train_config_from_spec(spec, "s3://b/p").training.mixed_precision == "bf16"
    # The same spec with the other family's loss options is refused (DDPM options on Flux) or kept.
    ddpm = spec_with(**{"model.source": spec.model.source, "model.family": family, "training.minSnrGamma": 5.0})
    if family == "flux":
        with pytest.raises(ConfigError, match="spec.training.minSnrGamma"):
            parse_spec(ddpm)
    else:
        assert parse_spec(ddpm).training.min_snr_gamma == 5.0


def test_quantities_accept_numbers_and_strings() -> None:
    spec = parse_spec(spec_with(**{"resources.cpu": 4, "resources.memory": "64Gi", "serving.resources.cpu": "500m"}))
    assert (spec.resources.cpu, spec.resources.memory, spec.serving.resources.cpu) == ("4", "64Gi", "500m")


# --- bad specs: refused, and the message names the field ---------------------------------

BAD_SPECS = [
    ("zero steps", {"training.maxSteps": 0}, "training.maxSteps"),
    ("zero gpus", {"resources.gpusPerNode": 0}, "resources.gpusPerNode"),
    ("zero nodes", {"resources.nodes": 0}, "resources.nodes"),
    ("token missing from instance prompt", {"data.instancePrompt": "a photo of a dog"}, "data.instancePrompt"),
    ("token in class prompt", {"prior.classPrompt": "a photo of sks dog"}, "prior.classPrompt"),
    ("ordinary word as token", {"data.token": "dog", "data.instancePrompt": "a photo of dog"}, "data.token"),
    ("class prompt missing", {"prior.classPrompt": None}, "prior.classPrompt"),
    ("resolution not a multiple of 8", {"data.resolution": 500}, "data.resolution"),
    ("unknown precision", {"training.mixedPrecision": "fp8"}, "training.mixedPrecision"),
    ("unknown field", {"training.maxStep": 10}, "training.maxStep"),
    ("instance data not in object storage", {"data.instanceUri": "/data/rex"}, "data.instanceUri"),
    ("bad bucket name", {"storage.bucket": "Bad_Bucket"}, "storage.bucket"),
    ("endpoint with a scheme", {"storage.endpoint": "http://minio:9000"}, "storage.endpoint"),
    ("cpu job asking for gpus", {"resources.accelerator": "cpu", "resources.gpusPerNode": 4}, "resources.gpusPerNode"),
    ("negative restarts", {"runPolicy.maxRestarts": -1}, "runPolicy.maxRestarts"),
    ("malformed model source", {"model.source": "hf://only-org"}, "model.source"),
    ("bad quantity", {"resources.memory": "lots"}, "resources.memory"),
    ("missing secret name", {"storage.credentialsSecretRef": {}}, "storage.credentialsSecretRef.name"),
    ("cached latents with random crop", {"training.cacheLatents": True, "data.centerCrop": False}, "training.cacheLatents"),
    ("label key with a space", {"podTemplate.labels": {"my team": "a"}}, "podTemplate.labels"),
    ("label value too long", {"scheduling.labels": {"team": "x" * 64}}, "scheduling.labels.team"),
    ("label value with a slash", {"podTemplate.labels": {"team": "a/b"}}, "podTemplate.labels.team"),
    ("annotation key with two slashes", {"podTemplate.annotations": {"a/b/c": "x"}}, "podTemplate.annotations"),
    ("node selector key", {"serving.scheduling.nodeSelector": {"-pool": "l4"}}, "serving.scheduling.nodeSelector"),
    ("env the operator sets", {"podTemplate.env": [{"name": "MASTER_ADDR", "value": "x"}]}, "podTemplate.env"),
    ("volume name the operator uses", {"podTemplate.volumes": [{"name": "dshm", "emptyDir": {}}]}, "podTemplate.volumes"),
    ("the images' cache volume", {"podTemplate.volumes": [{"name": "cache", "emptyDir": {}}]}, "podTemplate.volumes"),
    ("mount of no volume", {"podTemplate.volumeMounts": [{"name": "cache", "mountPath": "/cache"}]}, "podTemplate.volumeMounts"),
    ("service account not a DNS name", {"podTemplate.serviceAccountName": "Trainer_SA"}, "podTemplate.serviceAccountName"),
    ("negative disruptions", {"runPolicy.maxDisruptions": -1}, "runPolicy.maxDisruptions"),
    ("min-SNR on a flow-matching family", {"model.source": "hf://org/flux-model", "model.family": "flux", "training.minSnrGamma": 5.0}, "training.minSnrGamma"),
    ("noise offset on tiny sd3", {"model.source": "tiny-sd3", "training.noiseOffset": 0.05}, "training.noiseOffset"),
    ("flux resolution not a multiple of 16", {"model.source": "hf://org/flux-model", "model.family": "flux", "data.resolution": 1000}, "data.resolution"),
    ("sd3 resolution not a multiple of 16", {"model.source": "tiny-sd3", "data.resolution": 40}, "data.resolution"),
    ("flux bucket step not a multiple of 16", {"model.source": "tiny-flux", "data.bucketing": True, "data.bucketStep": 8}, "data.bucketStep"),
    ("family not the tiny model's", {"model.source": "tiny-sdxl", "model.family": "flux"}, "model.family"),
    ("unknown family", {"model.family": "sd4"}, "model.family"),
    ("unknown strategy", {"training.strategy": "zero3"}, "training.strategy"),
    ("served checkpoint not final, best or step-N", {"serving.checkpoint": "latest"}, "serving.checkpoint"),
    ("served step that is no checkpoint", {"training.maxSteps": 400, "checkpointing.everyNSteps": 100, "serving.checkpoint": "step-150"}, "serving.checkpoint"),
    ("served step past the end", {"training.maxSteps": 400, "serving.checkpoint": "step-500"}, "serving.checkpoint"),
    ("best without scores", {"serving.checkpoint": "best", "validation.fidelity": {"enabled": False}}, "serving.checkpoint"),
    ("unknown selection score", {"validation.fidelity": {"select": {"score": "lpips"}}}, "validation.fidelity.select.score"),
]


@pytest.mark.parametrize(("what", "changes", "field"), BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_spec_is_refused_naming_the_field(what: str, changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_spec(spec_with(**changes))
    assert f"spec.{field}" in str(refused.value), str(refused.value)


def test_overlong_strings_and_lists_are_refused() -> None:
    with pytest.raises(ConfigError, match="validation.prompts"):
        parse_spec(spec_with(**{"validation.prompts": ["a photo of sks dog"] * 65}))
    with pytest.raises(ConfigError, match="data.instancePrompt"):
        parse_spec(spec_with(**{"data.instancePrompt": "a photo of sks dog " + "x" * 2000}))


def test_the_installation_defaults_fill_only_what_a_job_leaves_out() -> None:
    from dreambooth_operator.installation import current as operator_defaults, spec_with_defaults

    env = {"DREAMBOOTH_TRAINER_IMAGE": "reg/trainer:1", "DREAMBOOTH_INFERENCE_IMAGE": "reg/inference:1",
           "DREAMBOOTH_STORAGE_ENDPOINT": "minio.storage.svc:9000", "DREAMBOOTH_STORAGE_BUCKET": "shared",
           "DREAMBOOTH_STORAGE_SECURE": "true", "DREAMBOOTH_STORAGE_CREDENTIALS_SECRET": "team-s3"}
    bare = {k: v for k, v in MINIMAL.items() if k != "storage"}
    spec = parse_spec(spec_with_defaults(bare, operator_defaults(env)))
    assert (spec.resources.image, spec.serving.image) == ("reg/trainer:1", "reg/inference:1")
    assert (spec.storage.endpoint, spec.storage.bucket, spec.storage.secure) == ("minio.storage.svc:9000", "shared", True)
    assert spec.storage.credentials_secret_ref.name == "team-s3"
    own = parse_spec(spec_with_defaults(MINIMAL, operator_defaults(env)))
    assert (own.storage.endpoint, own.storage.bucket, own.storage.secure) == ("minio:9000", "dreambooth", False), \
        "a job's own storage wins, and `secure` goes with its endpoint"
    with pytest.raises(ConfigError, match="storage"):
        parse_spec(spec_with_defaults(bare, operator_defaults({})))


def test_the_installations_read_only_secret_goes_with_its_read_write_one() -> None:
    from dreambooth_operator.installation import current as operator_defaults, spec_with_defaults

    env = {"DREAMBOOTH_STORAGE_ENDPOINT": "minio.storage.svc:9000", "DREAMBOOTH_STORAGE_BUCKET": "shared",
           "DREAMBOOTH_STORAGE_CREDENTIALS_SECRET": "team-s3", "DREAMBOOTH_STORAGE_SERVING_CREDENTIALS_SECRET": "team-s3-ro"}
    bare = {k: v for k, v in MINIMAL.items() if k != "storage"}
    spec = parse_spec(spec_with_defaults(bare, operator_defaults(env)))
    assert (spec.storage.credentials_secret_ref.name, spec.storage.serving_credentials_secret_ref.name) == ("team-s3", "team-s3-ro")
    own = parse_spec(spec_with_defaults(MINIMAL, operator_defaults(env)))
    assert own.storage.serving_credentials_secret_ref is None, "a job with its own keys does not get the installation's read-only ones"
    assert parse_spec(spec_with_defaults(bare, operator_defaults({**env, "DREAMBOOTH_STORAGE_SERVING_CREDENTIALS_SECRET": ""}))) \
        .storage.serving_credentials_secret_ref is None


def test_the_crd_leaves_storage_and_images_to_the_installation() -> None:
    spec = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert "storage" not in spec.get("required", [])
    assert "required" not in spec["properties"]["storage"]
    assert "image" not in spec["properties"]["resources"]["default"]
    assert "default" not in spec["properties"]["serving"]["properties"]["image"]


def test_the_spec_locks_at_acceptance_except_the_mutable_sections() -> None:
    from dreambooth_api.v1alpha1.spec import MUTABLE_SECTIONS, locked_sections

    locked = locked_sections()
    assert set(locked) == {"model", "data", "prior", "training", "checkpointing", "validation", "resources", "storage"}
    assert not set(locked) & set(MUTABLE_SECTIONS)
    rules = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    locks = [r for r in rules if "immutable" in r["message"]]
    assert len(locks) == len(locked)
    for rule in locks:
        assert "oldSelf.status.acceptedGeneration" in rule["rule"] and "phase" not in rule["rule"], "keyed on acceptance, not on phase"


def test_pod_template_pieces_are_kept_as_given() -> None:
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": "zone", "operator": "In", "values": ["a"]}]}]}}}
    parsed = parse_spec(spec_with(**{"scheduling.affinity": affinity, "podTemplate.volumes": [{"name": "c", "csi": {"driver": "x"}}]}))
    assert parsed.scheduling.affinity == affinity
    assert parsed.pod_template.volumes[0].model_dump(by_alias=True) == {"name": "c", "csi": {"driver": "x"}}
    schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert schema["scheduling"]["properties"]["affinity"]["x-kubernetes-preserve-unknown-fields"] is True
    assert schema["podTemplate"]["properties"]["volumes"]["items"]["x-kubernetes-preserve-unknown-fields"] is True


def test_the_served_checkpoint_may_be_final_best_or_a_written_step() -> None:
    for checkpoint in ("final", "best", "step-200", "step-400"):
        spec = parse_spec(spec_with(**{"training.maxSteps": 400, "checkpointing.everyNSteps": 100, "serving.checkpoint": checkpoint}))
        assert spec.serving.checkpoint == checkpoint
    assert parse_spec(spec_with()).serving.checkpoint == "final"
