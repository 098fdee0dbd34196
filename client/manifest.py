"""From what a user says (`--token sks --class dog --steps 800 ...`) to a validated DreamboothJob.

Pure: no cluster, no storage. The spec is validated by the same model the CRD is generated from
(`dreambooth_api.v1alpha1.spec.parse_spec`), so what passes here passes admission.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from pydantic.alias_generators import to_camel

from dreambooth_trainer.config import ConfigError, apply_overrides
from dreambooth_api.v1alpha1.architectures import FAMILY_NATIVE_SIZE, architecture_of
from dreambooth_api.v1alpha1.spec import MAX_NAME_LENGTH, NAME_RE, TINY_FAMILIES, parse_spec

from .errors import ClientError
from .kube import job_manifest

DEFAULT_MODEL = "hf://stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY_RESOLUTION = 32  # the built-in tiny models' shape
EXPONENT_RE = re.compile(r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PHOTOS_ANNOTATION = "dreambooth.dev/uploaded-photos"
CREATED_BY_LABEL = "app.kubernetes.io/created-by"
CREATED_BY = "dreambooth-client"
# Validation grids during training: this many over the run (0 turns them off).
SAMPLES_PER_RUN = 4
# `--model tiny` is for trying the product out: small and quick everywhere unless overridden.
# Fidelity is scored on three of the paper's prompts, not all 25: on CPU each scoring of the 25
# costs about as much as 150 tiny training steps, and the quick start scores at every validation.
TINY_FIDELITY_PROMPTS = ["a {token} {class} in the snow", "a red {token} {class}", "a {token} {class} on the beach"]
TINY_PRESET = {
    "prior": {"numClassImages": 4, "sampleSteps": 2},
    "validation": {"steps": 2, "numImages": 1, "fidelity": {"prompts": TINY_FIDELITY_PROMPTS}},
}
# --cpu: requests that fit an ordinary node (the spec's defaults are sized for GPU nodes).
CPU_TRAINER_RESOURCES = {"cpu": "2", "memory": "8Gi"}
CPU_SERVING_RESOURCES = {"gpus": 0, "cpu": "1", "memory": "4Gi"}


@dataclass
class SubmitOptions:
    """Everything `dreambooth submit` and `Client.submit` accept, before any default is applied."""

    token: str
    class_name: str
    model: str = DEFAULT_MODEL
    family: str | None = None
    prompt: str | None = None
    validation_prompts: list[str] = field(default_factory=list)
    prior: bool = True
    lora: bool = False
    steps: int | None = None
    resolution: int | None = None
    gpus: int | None = None
    nodes: int | None = None
    cpu: bool = False
    queue: str | None = None
    name: str | None = None
    serve: bool = True
    sample_every: int | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def instance_prompt(self) -> str:
        return self.prompt or f"a photo of {self.token} {self.class_name}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of {self.class_name}"

    def prompts(self) -> list[str]:
        return self.validation_prompts or [f"{self.instance_prompt} on the beach"]

    def training_resolution(self) -> int:
        """The user's, else the model's own (what the photos are checked against): a published
        model's, the family's (SD 512; SDXL, SD3, Flux 1024), the tiny model's 32 px."""
        if self.resolution:
            return self.resolution
        if self.model in TINY_FAMILIES:
            return TINY_RESOLUTION
        known = architecture_of(self.model)
        family = known.family if known else self.family or TINY_FAMILIES.get(self.model) or "sd"
        return known.native_size if known else FAMILY_NATIVE_SIZE[family]


def job_name(options: SubmitOptions) -> str:
    """The user's name, or `<token>-<class>-<5 random>` cut to what the CRD allows."""
    if options.name:
        if not re.match(NAME_RE, options.name) or len(options.name) > MAX_NAME_LENGTH:
            raise ClientError(f"--name {options.name!r} must be a DNS-1035 label (lowercase letters, digits, '-'; "
                              f"starts with a letter) of at most {MAX_NAME_LENGTH} characters")
        return options.name
    stem = re.sub(r"[^a-z0-9]+", "-", f"{options.token}-{options.class_name}".lower()).strip("-")
    stem = re.sub(r"^[^a-z]+", "", stem)[: MAX_NAME_LENGTH - 6].strip("-") or "subject"
    return f"{stem}-{secrets.token_hex(3)[:5]}"


def check_class_name(class_name: str) -> None:
    """The class goes into the prior's and the default prompts ('a photo of dog'): a word or a few."""
    if not class_name.strip() or not class_name.isprintable() or class_name != class_name.strip():
        raise ClientError(f"--class {class_name!r} must say what the subject is, e.g. dog or teddy bear "
                          "(words without leading, trailing or control characters)")


def build_spec(options: SubmitOptions, instance_uri: str, storage: dict[str, Any]) -> dict[str, Any]:
    """The job's spec (camelCase, as applied), overrides included; not yet validated."""
    check_class_name(options.class_name)
    steps = options.steps
    spec: dict[str, Any] = {
        "model": {"source": options.model},
        "data": {"instanceUri": instance_uri, "instancePrompt": options.instance_prompt, "token": options.token},
        "prior": {"enabled": options.prior, "classPrompt": options.class_prompt},
        "training": {},
        "validation": {"prompts": options.prompts()},
        "resources": {"accelerator": "cpu" if options.cpu else "gpu"},
        "storage": storage,
        "serving": {"enabled": options.serve},
    }
    if options.family:
        spec["model"]["family"] = options.family
    if options.resolution or options.model in TINY_FAMILIES:  # else the trainer takes the model's native size
        spec["data"]["resolution"] = options.training_resolution()
    if steps:
        spec["training"]["maxSteps"] = steps
    sample_every = options.sample_every if options.sample_every is not None else max(1, (steps or 400) // SAMPLES_PER_RUN)
    spec["validation"]["everyNSteps"] = sample_every
    if options.lora:
        spec["training"]["lora"] = {"enabled": True}
    if options.gpus is not None:
        spec["resources"]["gpusPerNode"] = options.gpus
    if options.nodes is not None:
        spec["resources"]["nodes"] = options.nodes
    if options.cpu:
        spec["resources"].update(CPU_TRAINER_RESOURCES)
        spec["serving"]["resources"] = dict(CPU_SERVING_RESOURCES)
    if options.model == "tiny":
        for section, values in TINY_PRESET.items():
            spec[section].update(values)
    if options.queue:
        spec["scheduling"] = {"labels": {KUEUE_QUEUE_LABEL: options.queue}}
    try:
        return apply_overrides(spec, [camel_override(text) for text in options.overrides])
    except ConfigError as error:
        raise ClientError(str(error)) from None


def camel_override(text: str) -> str:
    """`training.max_steps=6` -> `training.maxSteps=6`: --set takes either spelling of a spec key;
    `1e-6` is a number (YAML 1.1 alone would read a string, which the API server refuses)."""
    key, sep, value = text.partition("=")
    if EXPONENT_RE.match(value.strip()):
        value = f"!!float {value.strip()}"
    return ".".join(to_camel(part) for part in key.split(".")) + sep + value


def validate_spec(spec: dict[str, Any]) -> None:
    """ClientError naming the field when the CRD's model refuses the spec."""
    try:
        parse_spec(spec)
    except ConfigError as error:
        raise ClientError(f"invalid job: {error}") from None


def build_manifest(options: SubmitOptions, namespace: str, name: str, instance_uri: str,
                   storage: dict[str, Any]) -> dict[str, Any]:
    spec = build_spec(options, instance_uri, storage)
    validate_spec(spec)
    return job_manifest(namespace, name, spec, annotations={PHOTOS_ANNOTATION: instance_uri},
                        labels={CREATED_BY_LABEL: CREATED_BY})


def upload_prefix(namespace: str, name: str) -> str:
    """Where a submit puts the photos (in the job's bucket): one fresh prefix per submission."""
    return f"uploads/{namespace}/{name}/{secrets.token_hex(4)}"
