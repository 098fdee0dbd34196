"""What `submit` flags become: a spec validated by the CRD's own model, errors naming the field."""
from __future__ import annotations

import re

import pytest

from dreambooth_client.errors import ClientError
from dreambooth_client.manifest import (
    KUEUE_QUEUE_LABEL, PHOTOS_ANNOTATION, SubmitOptions, build_manifest, build_spec, camel_override, job_name,
)
from dreambooth_api.v1alpha1.spec import MAX_NAME_LENGTH, NAME_RE, parse_spec

STORAGE = {"endpoint": "minio.storage.svc:9000", "bucket": "dreambooth", "secure": False,
           "credentialsSecretRef": {"name": "dreambooth-s3"}}
PHOTOS = "s3://dreambooth/uploads/team-a/rex/0a1b2c3d"


def manifest(**options: object) -> dict:
    return build_manifest(SubmitOptions(token="sks", class_name="dog", **options), "team-a", "rex", PHOTOS, STORAGE)


def test_the_tiny_cpu_job_of_the_quick_start() -> None:
    spec = manifest(model="tiny", cpu=True, steps=8)["spec"]
    assert spec == {
        "model": {"source": "tiny"},
        "data": {"instanceUri": PHOTOS, "instancePrompt": "a photo of sks dog", "token": "sks", "resolution": 32},
        "prior": {"enabled": True, "classPrompt": "a photo of dog", "numClassImages": 4, "sampleSteps": 2},
        "training": {"maxSteps": 8},
        "validation": {"prompts": ["a photo of sks dog on the beach"], "everyNSteps": 2, "steps": 2, "numImages": 1,
                       "fidelity": {"prompts": ["a {token} {class} in the snow", "a red {token} {class}", "a {token} {class} on the beach"]}},
        "resources": {"accelerator": "cpu", "cpu": "2", "memory": "8Gi"},
        "storage": STORAGE,
        "serving": {"enabled": True, "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi"}},
    }
    parsed = parse_spec(spec)
    assert parsed.resources.gpus_per_node == 1 and parsed.serving.resources.gpus == 0


def test_a_gpu_job_keeps_the_spec_defaults_and_records_the_photos() -> None:
    job = manifest(steps=800, gpus=8, nodes=2, lora=True, queue="team-a-gpus")
    spec = job["spec"]
    assert job["metadata"]["annotations"] == {PHOTOS_ANNOTATION: PHOTOS}
    assert spec["model"] == {"source": "hf://stable-diffusion-v1-5/stable-diffusion-v1-5"}
    assert "resolution" not in spec["data"], "the trainer takes the model's native size"
    assert spec["validation"]["everyNSteps"] == 200
    assert spec["resources"] == {"accelerator": "gpu", "gpusPerNode": 8, "nodes": 2}
    assert spec["training"] == {"maxSteps": 800, "lora": {"enabled": True}}
    assert spec["scheduling"] == {"labels": {KUEUE_QUEUE_LABEL: "team-a-gpus"}}


def test_set_takes_either_spelling_and_yaml_values() -> None:
    spec = build_spec(SubmitOptions(token="sks", class_name="dog", overrides=[
        "training.learning_rate=1e-6", "training.maxSteps=50", "runPolicy.maxRestarts=0", "validation.prompts=[a, b]",
    ]), PHOTOS, STORAGE)
    assert spec["training"] == {"learningRate": 1e-6, "maxSteps": 50}
    assert spec["runPolicy"] == {"maxRestarts": 0} and spec["validation"]["prompts"] == ["a", "b"]
    assert camel_override("serving.resources.gpus=0") == "serving.resources.gpus=0"
    family = build_spec(SubmitOptions(token="sks", class_name="dog", family="sdxl"), PHOTOS, STORAGE)
    assert family["model"]["family"] == "sdxl"


@pytest.mark.parametrize("options, message", [
    ({"prompt": "a photo of a dog"}, "spec.data.instancePrompt 'a photo of a dog' must contain the token 'sks'"),
    ({"overrides": ["training.maxSteps=0"]}, "spec.training.maxSteps: Input should be greater than 0"),
    ({"overrides": ["training.maxStep=5"]}, "spec.training.maxStep: unknown field"),
    ({"gpus": 2, "cpu": True}, "resources.gpusPerNode must be 1 (or unset) when resources.accelerator is cpu"),
    ({"overrides": ["training"]}, "--set 'training': expected dotted.key=value"),
])
def test_bad_input_is_refused_naming_the_field(options: dict, message: str) -> None:
    with pytest.raises(ClientError) as error:
        manifest(**options)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_token_that_is_an_ordinary_word_is_refused() -> None:
    with pytest.raises(ClientError, match="must be one rare word"):
        build_manifest(SubmitOptions(token="dog", class_name="dog"), "team-a", "rex", PHOTOS, STORAGE)


@pytest.mark.parametrize("class_name", ["", "  ", "dog\n", " dog"])
def test_a_class_that_says_nothing_is_refused(class_name: str) -> None:
    """It becomes 'a photo of ' for the prior images and the default prompts."""
    with pytest.raises(ClientError, match=r"^--class .* must say what the subject is"):
        build_spec(SubmitOptions(token="sks", class_name=class_name), PHOTOS, STORAGE)
    assert build_spec(SubmitOptions(token="sks", class_name="teddy bear"), PHOTOS, STORAGE)["prior"]["classPrompt"] == "a photo of teddy bear"


def test_names() -> None:
    generated = job_name(SubmitOptions(token="sks", class_name="Golden Retriever"))
    assert re.fullmatch(r"sks-golden-retriever-[0-9a-f]{5}", generated)
    long = job_name(SubmitOptions(token="sks", class_name="x" * 80))
    assert re.match(NAME_RE, long) and len(long) <= MAX_NAME_LENGTH
    assert re.match(NAME_RE, job_name(SubmitOptions(token="<v1>", class_name="9 lives")))
    assert job_name(SubmitOptions(token="sks", class_name="dog", name="rex")) == "rex"
    with pytest.raises(ClientError, match="--name 'Rex_1' must be a DNS-1035 label"):
        job_name(SubmitOptions(token="sks", class_name="dog", name="Rex_1"))


@pytest.mark.parametrize(("model", "family", "native"), [
    ("hf://stable-diffusion-v1-5/stable-diffusion-v1-5", None, 512), ("hf://stabilityai/stable-diffusion-xl-base-1.0", None, 1024),
    ("hf://black-forest-labs/FLUX.1-dev@main", None, 1024), ("hf://someone/sd3-finetune", "sd3", 1024),
    ("hf://stabilityai/stable-diffusion-2-1", None, 768), ("tiny-flux", None, 32)])
def test_photos_are_checked_at_the_models_native_size_which_the_spec_leaves_to_the_trainer(model: str, family: str | None, native: int) -> None:
    from dreambooth_client.manifest import SubmitOptions

    options = SubmitOptions(token="sks", class_name="dog", model=model, family=family, lora=True)
    assert options.training_resolution() == native
    assert SubmitOptions(token="sks", class_name="dog", model=model, resolution=640).training_resolution() == 640
