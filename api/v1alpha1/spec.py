"""The DreamboothJob spec: the trainer config sections plus what the cluster needs.

This model is the single source of truth for the CRD (`crd_manifest()` derives the OpenAPI
schema from it), for the operator (which validates every spec with it) and for the trainer
config (`train_config_from_spec()` is the one mapping). Imports only pydantic and the
standard library, so the slim operator image never pulls torch.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, ValidationError, WithJsonSchema, field_validator, model_validator

from .architectures import ARCHITECTURES, PUBLISHED_SOURCES
from .memory import MemoryPlan, PlanInputs, exact_bytes_cel, plan
from .pod_template import (
    DNS_SUBDOMAIN_RE,
    RESERVED_ENV,
    RESERVED_VOLUMES,
    PodPlacement,
    PodTemplateOverrides,
    SchedulingSpec,
    Toleration,
    label_key_rule,
)
from .sections import (
    MODEL_SOURCE_RE,
    ORDINARY_WORDS,
    SERVED_CHECKPOINT_RE,
    ConfigError,
    OutputConfig,
    Section,
    TrainConfig,
    TrainerSections,
    config_from_dict,
)

GROUP = "dreambooth.dev"
VERSION = "v1alpha1"
KIND = "DreamboothJob"
PLURAL = "dreamboothjobs"
SINGULAR = "dreamboothjob"
SHORT_NAMES = ["dbj"]
CATEGORIES = ["all", "dreambooth", "ml"]
API_VERSION = f"{GROUP}/{VERSION}"

# Bounds the CRD applies to every string and list, so CEL cost estimates stay finite; the
# model enforces the same numbers (`_bounded`), so both refuse the same specs.
MAX_STRING_LENGTH = 1024
MAX_LIST_ITEMS = 64
MAX_MAP_ENTRIES = 64
# metadata.name feeds the Service, Job and pod host names (`<name>-train-<n>-<index>` <= 63).
MAX_NAME_LENGTH = 40
NAME_RE = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_NODES = 512
MAX_RESTARTS = 100
SHARED_NEEDS_LORA = ("serving.server needs training.lora.enabled: a shared server switches LoRA adapters; "
                     "a full fine-tune is served by a Deployment of its own")
TOKEN_RE = r"^[A-Za-z0-9_<>-]+$"
QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
# Sections that stay editable once the job is accepted; every other section of the spec is
# frozen then (changing it mid-run would not resume). Edits to these take effect: runPolicy at
# once, serving rolls the Deployment, scheduling and podTemplate apply to the next gang.
MUTABLE_SECTIONS = ("runPolicy", "serving", "scheduling", "podTemplate", "retention")
# The status field that freezes the spec: set by the operator when it accepts the job.
LOCK_FIELD = "acceptedGeneration"
# Long enough for rank 0 to write a full SD checkpoint to object storage after SIGTERM.
CHECKPOINT_GRACE_SECONDS = 600
DEFAULT_TRAINER_IMAGE = "dreambooth/trainer:0.1.0"
DEFAULT_INFERENCE_IMAGE = "dreambooth/inference:0.1.0"
# What an operator installation may default for every job (the Helm chart's images and storage
# values): the CRD leaves these optional and without a default, and the operator fills what a
# job leaves out before validating it with this model (`with_operator_defaults`).
OPERATOR_DEFAULTED = ("resources.image", "serving.image", "storage", "storage.endpoint", "storage.bucket",
                      "storage.secure", "storage.credentialsSecretRef", "storage.servingCredentialsSecretRef")


def _quantity(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    return value


def _check_quantity(value: str) -> str:
    if not QUANTITY_RE.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)")
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}),
]


class SecretKeyRef(Section):
    name: str = Field(..., min_length=1, max_length=253, description="Secret in the job's namespace holding the storage credentials.")
    access_key_key: str = Field("AWS_ACCESS_KEY_ID", min_length=1, description="Key of the access key id in the Secret.")
    secret_key_key: str = Field("AWS_SECRET_ACCESS_KEY", min_length=1, description="Key of the secret access key in the Secret.")


class StorageSpec(Section):
    endpoint: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$",
        description="S3/MinIO endpoint as host[:port], no scheme (e.g. minio.storage.svc:9000).",
    )
    bucket: str = Field(..., pattern=r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$", description="Bucket for checkpoints, the final model, progress and samples.")
    secure: bool = Field(False, description="Use https to reach the endpoint.")
    region: str | None = Field(None, description="S3 region, when the endpoint needs one.")
    credentials_secret_ref: SecretKeyRef = Field(..., description="Secret with the access key id and secret access key (read by secretKeyRef, never copied).")
    serving_credentials_secret_ref: SecretKeyRef | None = Field(
        None, description="Read-only credentials for the inference pods (they only read final/); unset: credentialsSecretRef.")


class ResourcesSpec(Section):
    nodes: int = Field(1, ge=1, le=MAX_NODES, description="Pods in the gang: one per node, each running NPROC_PER_NODE ranks.")
    accelerator: Literal["gpu", "cpu"] = Field(
        "gpu", description="gpu: each pod asks for gpusPerNode nvidia.com/gpu and runs one rank per GPU (NCCL). cpu: no GPU asked, one rank per pod (gloo)."
    )
    gpus_per_node: int = Field(1, ge=1, le=16, description="nvidia.com/gpu per pod (and ranks per pod); must stay 1 when accelerator is cpu.")
    cpu: Quantity = Field("8", description="CPU request and limit per pod.")
    memory: Quantity = Field("64Gi", description="Memory request and limit per pod.")
    shared_memory: Quantity = Field("8Gi", description="Size of the in-memory /dev/shm volume (dataloader workers, NCCL).")
    image: str = Field(DEFAULT_TRAINER_IMAGE, min_length=1, description="Trainer image (runs `dreambooth train`); default: the operator's (the chart's images.trainer).")
    gpu_memory: Quantity | None = Field(
        None, description="Memory of one GPU (e.g. 24Gi for an L4 or A10G, 80Gi for an H100). The memory plan (condition MemoryPlan, `dreambooth plan`) compares the job with it; a job whose exact parts alone (weights, gradients, optimizer state) exceed it is refused.")

    @field_validator("cpu", "memory", "shared_memory", "gpu_memory")
    @classmethod
    def _quantities(cls, value: str | None) -> str | None:
        return value if value is None else _check_quantity(value)


class ServingResources(Section):
    gpus: int = Field(1, ge=0, le=16, description="nvidia.com/gpu per inference pod (0: CPU).")
    cpu: Quantity = Field("4", description="CPU request and limit per inference pod.")
    memory: Quantity = Field("16Gi", description="Memory request and limit per inference pod.")

    @field_validator("cpu", "memory")
    @classmethod
    def _quantities(cls, value: str) -> str:
        return _check_quantity(value)


class TokenSecretRef(Section):
    name: str = Field(..., min_length=1, max_length=253, description="Secret in the job's namespace holding the API token.")
    key: str = Field("token", min_length=1, max_length=253, description="Key of the token in the Secret.")


class ServingAuth(Section):
    token_secret_ref: TokenSecretRef | None = Field(
        None, description="Bearer token the inference server requires (OpenAI SDKs send it as api_key); unset: no token.")


class IngressPeer(Section):
    """Who may reach the inference port, as NetworkPolicy selectors (matchLabels)."""

    pod_selector: dict[str, str] | None = Field(None, description="Pods with these labels (in the job's namespace, or in the namespaces namespaceSelector picks).")
    namespace_selector: dict[str, str] | None = Field(None, description="Namespaces with these labels.")

    @model_validator(mode="after")
    def _selects_something(self) -> "IngressPeer":
        if self.pod_selector is None and self.namespace_selector is None:
            raise ValueError("each serving.ingressFrom peer needs a podSelector or a namespaceSelector")
        return self


class ServingSpec(Section):
    enabled: bool = Field(True, description="On success, serve final/ with an inference Deployment and Service.")
    replicas: int = Field(1, ge=1, le=64, description="Inference pods.")
    resources: ServingResources = Field(default_factory=ServingResources)
    image: str = Field(DEFAULT_INFERENCE_IMAGE, min_length=1, description="Inference image (runs `dreambooth serve`); default: the operator's (the chart's images.inference).")
    scheduling: PodPlacement = Field(default_factory=PodPlacement, description="Placement of the inference pods (edits roll the Deployment).")
    server: str | None = Field(
        None, pattern=NAME_RE, max_length=MAX_NAME_LENGTH,
        description="LoRA jobs only: the shared inference server (one per base model, in the job's namespace) that serves this job's "
                    "adapter, created by the first job that names it; unset: a Deployment of the job's own.")
    auth: ServingAuth = Field(default_factory=ServingAuth)
    service_account_name: str | None = Field(
        None, pattern=DNS_SUBDOMAIN_RE, max_length=253,
        description="ServiceAccount of the inference pods (they only read final/); unset: the namespace's default. "
                    "podTemplate.serviceAccountName is the trainer pods' alone (a read-write workload identity stays off the server).")
    ingress_from: list[IngressPeer] = Field(
        default_factory=list, description="Who may reach the inference port (NetworkPolicy peers); empty: every pod in the job's namespace.")
    checkpoint: str = Field(
        "final", pattern=SERVED_CHECKPOINT_RE, max_length=20,
        description="What is served: final (the end of training), best (the checkpoint validation.fidelity.select picks; exports/best/) "
                    "or step-N (a checkpoint still kept, exported to exports/step-N/ when first asked for). Changing it after success "
                    "re-exports if needed and rolls the Deployment (or re-registers the adapter on a shared server).")


# Disruptions a job survives by default: enough for a preemptible pool, finite so a job evicted at
# the same point again and again ends.
DEFAULT_MAX_DISRUPTIONS = 20


class RetentionSpec(Section):
    """What happens to the job's data when the DreamboothJob is deleted (a bounded finalizer does it)."""

    outputs: Literal["Retain", "Delete"] = Field(
        "Retain", description="The job's output prefix (checkpoints, final model, samples, progress): Retain keeps it, Delete removes it with the job.")
    subject_photos: Literal["Retain", "Delete"] = Field(
        "Retain", description="The photos under data.instanceUri (personal data): Delete removes them with the job. Other jobs reading the same prefix lose them too.")


class RunPolicySpec(Section):
    max_restarts: int = Field(3, ge=0, le=MAX_RESTARTS, description="Whole-gang restarts after a failed or preempted pod before the job fails.")
    active_deadline_seconds: int | None = Field(None, ge=1, description="Fail with DeadlineExceeded after this long running (suspended time excluded).")
    suspend: bool = Field(False, description="true: remove the pods, keep the checkpoint; false again: resume from it.")
    clean_pod_policy: Literal["None", "Running", "All"] = Field(
        "Running", description="Pods removed when the job finishes: All, only still-running ones, or None."
    )
    ttl_seconds_after_finished: int | None = Field(None, ge=0, description="Delete the DreamboothJob (and all it owns) this long after it finished.")
    max_disruptions: int | None = Field(
        DEFAULT_MAX_DISRUPTIONS, ge=0,
        description="Gang restarts after disruptions (preemption, eviction, node loss, SIGTERM) before the job fails; null: no limit. They never spend maxRestarts."
    )
    retry_on_out_of_memory: bool = Field(
        False, description="false: an OOM-killed trainer fails the job at once (reason OutOfMemory); true: it restarts the gang and spends maxRestarts."
    )
    admission_deadline_seconds: int = Field(
        600, ge=1, le=86400,
        description="How long a job waits in Pending, retrying with backoff, for what may heal (the Secret, its keys, readable photos, reachable storage) before it fails.",
    )
    termination_grace_period_seconds: int = Field(
        CHECKPOINT_GRACE_SECONDS, ge=1, le=86400,
        description="Seconds a stopped trainer pod has to write its checkpoint; past it, a pod stuck on a lost node is force-deleted.",
    )


class DreamboothJobSpec(TrainerSections):
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    storage: StorageSpec
    serving: ServingSpec = Field(default_factory=ServingSpec)
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    pod_template: PodTemplateOverrides = Field(default_factory=PodTemplateOverrides)
    retention: RetentionSpec = Field(default_factory=RetentionSpec, description="What is deleted with the job (default: nothing).")

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        _check_bounds(data, ())
        return data

    @model_validator(mode="after")
    def _cluster_rules(self) -> "DreamboothJobSpec":
        if not self.data.instance_uri.startswith("s3://"):
            raise ValueError(f"data.instanceUri {self.data.instance_uri!r} must be an s3://bucket/prefix URI (pods share no volume)")
        if self.resources.accelerator == "cpu" and self.resources.gpus_per_node != 1:
            raise ValueError("resources.gpusPerNode must be 1 (or unset) when resources.accelerator is cpu")
        self.pod_template.mounts_name_volumes()
        if self.serving.server and not self.training.lora.enabled:
            raise ValueError(SHARED_NEEDS_LORA)
        if self.training.strategy == "fsdp" and self.resources.nodes * self.resources.gpus_per_node < 2:
            raise ValueError("training.strategy fsdp shards the model across 2 or more ranks; raise resources.nodes or resources.gpusPerNode, or use ddp")
        for refusal in family_refusals(self):
            raise ValueError(refusal)
        for refusal in served_checkpoint_refusals(self):
            raise ValueError(refusal)
        plan = memory_plan(self)
        if plan.verdict == "too-big":
            raise ValueError(f"resources.gpuMemory {self.resources.gpu_memory} is less than what this job holds on each GPU for certain: "
                             f"{plan.summary()}; use larger GPUs, LoRA, model.quantize, or training.strategy fsdp over more GPUs")
        try:
            train_config_from_spec(self, f"s3://{self.storage.bucket}/jobs/validate")
        except ConfigError as error:
            raise ValueError(camel_keys(str(error))) from None
        return self


def served_step(checkpoint: str) -> int | None:
    """`step-200` -> 200; final and best -> None."""
    return int(checkpoint.removeprefix("step-")) if checkpoint.startswith("step-") else None


def served_export_prefix(checkpoint: str) -> str:
    """Where a served checkpoint's export lives in the output: final/, exports/best/, exports/step-0000000N/."""
    step = served_step(checkpoint)
    return "final" if checkpoint == "final" else "exports/best" if step is None else f"exports/step-{step:08d}"


def served_checkpoint_refusals(spec: "DreamboothJobSpec") -> list[str]:
    """serving.checkpoint names something the run can have (the CEL rules' twin)."""
    checkpoint, training = spec.serving.checkpoint, spec.training
    step = served_step(checkpoint)
    if checkpoint == "best" and not spec.validation.fidelity.enabled:
        return ["serving.checkpoint best needs validation.fidelity.enabled (the scores pick the best checkpoint)"]
    if step is not None and (step < 1 or step > training.max_steps
                             or (step % spec.checkpointing.every_n_steps and step != training.max_steps)):
        return [f"serving.checkpoint {checkpoint} is not a checkpoint of this run: checkpoints are written every "
                f"checkpointing.everyNSteps={spec.checkpointing.every_n_steps} steps and at training.maxSteps={training.max_steps}"]
    return []


# The family admission can tell from the spec alone: model.family, or a built-in tiny model's.
TINY_FAMILIES = {"tiny": "sd", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux"}
FLOW_MATCHING = ("sd3", "flux")
DDPM = ("sd", "sdxl")


@dataclass(frozen=True)
class FamilyOption:
    """An option that means something for some families only; set for another, it is refused by name."""

    section: str  # training | prior
    field: str  # snake_case
    families: tuple[str, ...]
    why: str
    unset: Any = None  # the value that means "not set" (the field's default)

    @property
    def camel(self) -> str:
        return _to_camel(self.field)

    @property
    def path(self) -> str:
        return f"{self.section}.{self.camel}"


FAMILY_OPTIONS = (
    FamilyOption("training", "min_snr_gamma", DDPM, "a DDPM loss option (sd, sdxl); families sd3 and flux train by flow matching"),
    FamilyOption("training", "noise_offset", DDPM, "a DDPM loss option (sd, sdxl); families sd3 and flux train by flow matching", 0.0),
    FamilyOption("prior", "sampler", DDPM, "a DDPM sampler (sd, sdxl); sd3 and flux draw class images with their flow-matching scheduler"),
    FamilyOption("training", "weighting_scheme", FLOW_MATCHING, "how flow matching draws timesteps (sd3, flux)"),
    FamilyOption("training", "max_sequence_length", FLOW_MATCHING, "the T5 prompt length (sd3, flux)"),
    FamilyOption("training", "precondition_outputs", ("sd3",), "SD3's loss preconditioning (sd3 only)"),
    FamilyOption("training", "distilled_guidance", ("flux",), "Flux-dev's guidance embedding (flux only)"),
)
# Flux packs 2x2 latent patches of an 8x VAE, SD3 embeds 2x2 patches: pixel sides are multiples of 16.
PIXEL_MULTIPLE = {"sd3": 16, "flux": 16}


def spec_family(model: Any) -> str | None:
    """The family a spec names or implies; None when only the model's files can tell."""
    return model.family if model.family != "auto" else TINY_FAMILIES.get(model.source)


def option_set(option: FamilyOption, sections: Any) -> bool:
    """Whether a spec (or trainer config) sets a family option to something other than its default."""
    return getattr(getattr(sections, option.section), option.field) not in (None, option.unset)


def family_refusals(spec: "DreamboothJobSpec") -> list[str]:
    """What the spec asks of its family that the family does not support (the CEL rules' twin)."""
    family = spec_family(spec.model)
    refusals = []
    built_in = TINY_FAMILIES.get(spec.model.source)
    if built_in and spec.model.family not in ("auto", built_in):
        refusals.append(f"model.family {spec.model.family} does not match model.source {spec.model.source} (a {built_in} model): "
                        f"set model.family to {built_in} or auto")
    if family is not None:
        refusals += [f"{option.path} is {option.why}; model family {family} does not take it"
                     for option in FAMILY_OPTIONS if family not in option.families and option_set(option, spec)]
    multiple = PIXEL_MULTIPLE.get(family or "", 8)
    if spec.data.resolution is not None and spec.data.resolution % multiple:
        refusals.append(f"data.resolution must be a multiple of {multiple} for model family {family}")
    if spec.data.bucketing and spec.data.bucket_step % multiple:
        refusals.append(f"data.bucketStep must be a multiple of {multiple} for model family {family}")
    return refusals


def _check_bounds(value: Any, path: tuple[str, ...]) -> None:
    where = ".".join(path) or "spec"
    if isinstance(value, str) and len(value) > MAX_STRING_LENGTH:
        raise ValueError(f"{where}: longer than {MAX_STRING_LENGTH} characters")
    if isinstance(value, list):
        if len(value) > MAX_LIST_ITEMS:
            raise ValueError(f"{where}: more than {MAX_LIST_ITEMS} items")
        for item in value:
            _check_bounds(item, path)
    if isinstance(value, dict):
        if len(value) > MAX_MAP_ENTRIES:
            raise ValueError(f"{where}: more than {MAX_MAP_ENTRIES} entries")
        for key, item in value.items():
            _check_bounds(item, (*path, str(key)))


def camel_keys(message: str) -> str:
    """'config: data.instance_prompt ...' -> 'data.instancePrompt ...' (the CRD's spelling)."""
    message = message.removeprefix("config: ")
    return re.sub(r"\b(model|data|prior|training|checkpointing|validation)\.([a-z0-9_]+)", lambda m: f"{m.group(1)}.{_to_camel(m.group(2))}", message)


def _to_camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


QUANTITY_SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
                     "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "m": 10**-3}


def quantity_bytes(value: str) -> int:
    """A Kubernetes quantity (`24Gi`, `80G`) as a number."""
    match = QUANTITY_RE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    suffix = match.group(2) or ""
    return int(float(value[: len(value) - len(suffix)]) * QUANTITY_SUFFIXES[suffix])


def plan_inputs(spec: DreamboothJobSpec) -> PlanInputs:
    """What the memory plan needs from a job: its model, mode, precision, strategy and gang size."""
    training, resources = spec.training, spec.resources
    gpu = resources.accelerator == "gpu"
    precision = training.mixed_precision if training.mixed_precision != "auto" else ("bf16" if gpu else "no")
    return PlanInputs(
        source=spec.model.source, architecture=spec.model.architecture, lora=training.lora.enabled, rank=training.lora.rank,
        train_text_encoder=training.train_text_encoder, precision=precision, strategy=training.strategy,
        world=resources.nodes * (resources.gpus_per_node if gpu else 1), quantize=spec.model.quantize, optimizer=training.optimizer,
        ema=training.ema, batch_size=training.batch_size, prior=spec.prior.enabled, resolution=spec.data.resolution,
        gradient_checkpointing=training.gradient_checkpointing,
        gpu_memory=quantity_bytes(resources.gpu_memory) if resources.gpu_memory and gpu else None)


def memory_plan(spec: DreamboothJobSpec) -> MemoryPlan:
    return plan(plan_inputs(spec))


def train_config_from_spec(spec: DreamboothJobSpec, output_uri: str) -> TrainConfig:
    """The one mapping from a job spec to the trainer config the pods run."""
    data = {
        section: getattr(spec, section).model_dump(mode="json")
        for section in ("model", "data", "prior", "training", "checkpointing", "validation")
    }
    data["output"] = OutputConfig(uri=output_uri, log_format="json", serve=spec.serving.checkpoint).model_dump(mode="json")
    return config_from_dict(data)


def output_uri(spec: DreamboothJobSpec, namespace: str, name: str, uid: str) -> str:
    return f"s3://{spec.storage.bucket}/jobs/{namespace}/{name}/{uid}"


def parse_spec(data: dict[str, Any]) -> DreamboothJobSpec:
    """Validate a CRD spec; errors name the camelCase field (`training.maxSteps: ...`)."""
    try:
        return DreamboothJobSpec.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_spec_error(error)) from None


def format_spec_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"spec.{key}: {message}" if key else f"spec.{message}")
    return "; ".join(lines)


# --- status -----------------------------------------------------------------------------


class Condition(Section):
    """metav1.Condition."""

    type: str = Field(..., max_length=316)
    status: Literal["True", "False", "Unknown"]
    observed_generation: int | None = Field(None, ge=0)
    last_transition_time: str = Field(..., json_schema_extra={"format": "date-time"})
    reason: str = Field(..., max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field(..., max_length=32768)


class ProgressStatus(Section):
    step: int | None = None
    total_steps: int | None = None
    percent: float | None = None
    loss: float | None = None
    images_per_second: float | None = None
    eta_seconds: float | None = None
    eta: str | None = Field(None, description="Human form of etaSeconds (printer column).")
    summary: str | None = Field(None, description="`step/total (percent%)` (printer column).")
    update_time: str | None = Field(None, description="When rank 0 wrote the progress record.")


class InstallationDefaults(Section):
    """The operator installation's defaults as they were when the job was accepted (used from then on)."""

    trainer_image: str | None = None
    inference_image: str | None = None
    storage_endpoint: str | None = None
    storage_bucket: str | None = None
    storage_secure: bool | None = None
    storage_credentials_secret: str | None = None
    storage_serving_credentials_secret: str | None = None


PHASES = ("Pending", "Queued", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
class ServingStatus(Section):
    url: str | None = Field(None, description="Base URL of the inference server (OpenAI SDKs take `<url>/v1`).")
    model: str | None = Field(None, description="The `model` to name in requests for this job's subject.")
    server: str | None = Field(None, description="The shared server this job's adapter is registered with (LoRA jobs with serving.server).")


class FidelityScores(Section):
    """One checkpoint's subject-fidelity scores (cosine similarities; pixel: RMS distance in [0, 1])."""

    step: int | None = None
    dino: float | None = None
    clip_i: float | None = None
    clip_t: float | None = None
    pixel: float | None = Field(None, description="RMS pixel distance of the instance prompt's images to the nearest photo (lower is closer).")
    prior_similarity: float | None = Field(None, description="The class prompt's images' similarity to the subject (prior preservation keeps it low).")
    prior_diversity: float | None = Field(None, description="1 - the mean similarity between the class prompt's images (higher: more varied).")
    floor_met: bool | None = Field(None, description="False when no checkpoint met validation.fidelity.select.minClipT (the closest was taken).")


class FidelityStatus(Section):
    latest: FidelityScores | None = Field(None, description="The newest scored checkpoint.")
    best: FidelityScores | None = Field(None, description="The checkpoint validation.fidelity.select picks.")
    select: str | None = Field(None, description="The rule that picks the best, in words.")
    backbones: dict[str, str] | None = Field(None, description="Each score's backbone: name@revision and scale.")
    summary: str | None = Field(None, description="The best checkpoint's score and step (printer column).")
    served: str | None = Field(None, description="The checkpoint the endpoint serves (final or step-N) and where its export is.")


class DreamboothJobStatus(Section):
    phase: Literal[PHASES] | None = None  # type: ignore[valid-type]
    message: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    accepted_generation: int | None = Field(None, description="The generation the operator accepted; from then on the spec is frozen but for runPolicy, serving, scheduling and podTemplate.")
    installation_defaults: InstallationDefaults | None = Field(None, description="The installation's defaults snapshotted at acceptance; the job keeps using them after a helm upgrade.")
    progress: ProgressStatus | None = None
    gang: int | None = Field(None, description="Number of the current gang: its Job is <name>-train-<gang>.")
    restarts: int | None = Field(None, description="Gang restarts after failures (bounded by runPolicy.maxRestarts).")
    disruptions: int | None = Field(None, description="Gang restarts after disruptions: preemption, eviction, node loss (bounded by runPolicy.maxDisruptions).")
    job_suspended_by_operator: bool | None = Field(
        None, description="The operator suspended the current gang's Job itself (runPolicy.suspend); it unsuspends only such a Job, never one Kueue suspended."
    )
    queue_name: str | None = Field(None, description="Kueue LocalQueue of the current gang (kueue.x-k8s.io/queue-name).")
    restart_at: str | None = Field(None, description="Earliest time the next gang starts (restart backoff).")
    start_time: str | None = Field(None, description="When the current gang last started running (queued and suspended time excluded): activeDeadlineSeconds counts from here.")
    admission_start_time: str | None = Field(None, description="The operator's first look at the job: runPolicy.admissionDeadlineSeconds counts from here.")
    storage_unreachable_since: str | None = Field(None, description="Since when storage is unreachable while the job waits for admission (its own budget).")
    unplaced_restarts: int | None = Field(None, description="New gangs tried in a row because the last one was never all placed (bounded; spends nothing).")
    leaving_servers: list[str] | None = Field(None, description="Shared servers the job's adapter is being taken off (kept until done).")
    gang_scheduling: str | None = Field(None, description="How the current gang is placed: Kueue, PodGroup (all-or-nothing, scheduling.k8s.io) or Unprotected.")
    completion_time: str | None = None
    latest_checkpoint: str | None = None
    output_uri: str | None = None
    endpoint: str | None = None
    serving: ServingStatus | None = None
    fidelity: FidelityStatus | None = Field(None, description="Subject-fidelity scores of the latest and the best checkpoint.")


# --- CRD --------------------------------------------------------------------------------

_WORD_BOUNDARY_LEFT = "(^|[^A-Za-z0-9_])"
_WORD_BOUNDARY_RIGHT = "([^A-Za-z0-9_]|$)"
_ORDINARY = "[" + ", ".join(f"'{w}'" for w in sorted(ORDINARY_WORDS)) + "]"


def _contains_token(text: str, token: str) -> str:
    return f"{text}.matches('{_WORD_BOUNDARY_LEFT}' + {token} + '{_WORD_BOUNDARY_RIGHT}')"


def _quantity_rule(path: str, field: str) -> dict[str, str]:
    return {
        "rule": f"!has(self.{field}) || isQuantity(string(self.{field}))",
        "message": f"{path}.{field} must be a Kubernetes quantity (e.g. 8, 500m, 64Gi)",
        "fieldPath": f".{field}",
    }


def _unchanged(field: str) -> str:
    """CEL: spec.<field> did not change (a field the operator may default can be absent)."""
    same = f"self.spec.{field} == oldSelf.spec.{field}"
    if field not in OPERATOR_DEFAULTED:
        return same
    return (f"(has(self.spec.{field}) == has(oldSelf.spec.{field}) && "
            f"(!has(self.spec.{field}) || {same}))")


def locked_sections() -> list[str]:
    """The spec sections frozen at acceptance: all but MUTABLE_SECTIONS (new sections lock too)."""
    names = [info.alias or name for name, info in DreamboothJobSpec.model_fields.items()]
    return [name for name in names if name not in MUTABLE_SECTIONS]


def with_operator_defaults(spec: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A copy of a raw (camelCase) spec with the operator's defaults where the job is silent.

    `defaults` maps dotted paths of OPERATOR_DEFAULTED to values; None means no default."""
    merged = copy.deepcopy(spec)
    for path, value in defaults.items():
        if path not in OPERATOR_DEFAULTED:
            raise ValueError(f"{path} is not a field the operator may default")
        if value is None:
            continue
        *parents, leaf = path.split(".")
        node = merged
        for part in parents:
            node = node.setdefault(part, {})
        node.setdefault(leaf, copy.deepcopy(value))
    return merged


def _leave_to_operator(spec: dict[str, Any]) -> None:
    """Make OPERATOR_DEFAULTED optional in the spec schema, with no default of the CRD's own."""
    for path in OPERATOR_DEFAULTED:
        *parents, leaf = path.split(".")
        parent = _node_at(spec, ".".join(parents))
        parent["properties"][leaf].pop("default", None)
        if isinstance(parent.get("default"), dict):
            parent["default"].pop(leaf, None)
        if leaf in parent.get("required", []):
            parent["required"].remove(leaf)
            if not parent["required"]:
                del parent["required"]


def _family_in(families: tuple[str, ...]) -> str:
    """CEL: the spec's family (model.family, else the tiny source's) is one of `families`."""
    named = "[" + ", ".join(f"'{f}'" for f in families) + "]"
    tiny = "[" + ", ".join(f"'{s}'" for s, f in TINY_FAMILIES.items() if f in families) + "]"
    return f"(has(self.model.family) && self.model.family != 'auto' ? self.model.family in {named} : self.model.source in {tiny})"


def memory_rules() -> list[dict[str, str]]:
    """CEL, one rule per published architecture: a GPU job naming resources.gpuMemory holds no more
    than that per GPU for certain (the exact parts of its memory plan)."""
    rules = []
    for name, arch in ARCHITECTURES.items():
        sources = [source for source, arch_name in PUBLISHED_SOURCES.items() if arch_name == name]
        this = (f"(has(self.model.architecture) ? self.model.architecture == '{name}' "
                f": self.model.source.split('@')[0] in {sources})")
        rules.append({
            "rule": f"!has(self.resources.gpuMemory) || self.resources.accelerator != 'gpu' || !{this} "
                    f"|| quantity(string(self.resources.gpuMemory)).asInteger() >= {exact_bytes_cel(arch)}",
            "message": f"spec.resources.gpuMemory is less than what this {name} job holds on each GPU for certain (weights, "
                       "gradients and optimizer state: `dreambooth plan` prints them); use larger GPUs, LoRA, model.quantize, "
                       "or training.strategy fsdp",
            "fieldPath": ".resources.gpuMemory",
        })
    return rules


def family_rules() -> list[dict[str, str]]:
    """CEL rules on spec: options a family does not support, refused naming the field."""
    tiny = ", ".join(f"'{source}': '{family}'" for source, family in TINY_FAMILIES.items())
    rules = [
        {
            "rule": f"!has(self.model.family) || self.model.family == 'auto' || !(self.model.source in {{{tiny}}}) "
                    f"|| {{{tiny}}}[self.model.source] == self.model.family",
            "message": "spec.model.family does not match the built-in model spec.model.source (tiny: sd, tiny-sdxl: sdxl, "
                       "tiny-sd3: sd3, tiny-flux: flux); set it to that family or auto",
            "fieldPath": ".model.family",
        },
    ]
    rules += [
        {
            "rule": f"!has(self.{option.path}) || "
                    + (f"self.{option.path} == {option.unset!r} || " if option.unset is not None else "")
                    + "!" + _family_in(tuple(f for f in TINY_FAMILIES.values() if f not in option.families)),
            "message": f"spec.{option.path} is {option.why}",
            "fieldPath": f".{option.path}",
        }
        for option in FAMILY_OPTIONS
    ]
    rules += [
        {
            "rule": f"!{_family_in((family,))} || !has(self.data.resolution) || self.data.resolution % {multiple} == 0",
            "message": f"spec.data.resolution must be a multiple of {multiple} for model family {family}",
            "fieldPath": ".data.resolution",
        }
        for family, multiple in PIXEL_MULTIPLE.items()
    ]
    rules += [
        {
            "rule": f"!{_family_in((family,))} || !has(self.data.bucketing) || !self.data.bucketing "
                    f"|| !has(self.data.bucketStep) || self.data.bucketStep % {multiple} == 0",
            "message": f"spec.data.bucketStep must be a multiple of {multiple} for model family {family}",
            "fieldPath": ".data.bucketStep",
        }
        for family, multiple in PIXEL_MULTIPLE.items()
    ]
    return rules


def served_checkpoint_rules() -> list[dict[str, str]]:
    """CEL on spec: serving.checkpoint names what the run can have (served_checkpoint_refusals' twin)."""
    step = "int(self.serving.checkpoint.substring(5))"
    return [
        {
            "rule": "!has(self.serving.checkpoint) || self.serving.checkpoint != 'best' || !has(self.validation.fidelity) "
                    "|| !has(self.validation.fidelity.enabled) || self.validation.fidelity.enabled",
            "message": "spec.serving.checkpoint best needs spec.validation.fidelity.enabled (the scores pick the best checkpoint)",
            "fieldPath": ".serving.checkpoint",
        },
        {
            "rule": f"!has(self.serving.checkpoint) || !self.serving.checkpoint.startsWith('step-') || ({step} >= 1 "
                    f"&& {step} <= self.training.maxSteps && ({step} % self.checkpointing.everyNSteps == 0 || {step} == self.training.maxSteps))",
            "message": "spec.serving.checkpoint step-N is not a checkpoint of this run (checkpoints are written every "
                       "spec.checkpointing.everyNSteps steps and at spec.training.maxSteps)",
            "fieldPath": ".serving.checkpoint",
        },
    ]


# CEL rules, by the path of the schema node they sit on. Each message names the field.
CEL_RULES: dict[str, list[dict[str, str]]] = {
    "": [
        {
            "rule": f"self.metadata.name.matches('{NAME_RE}') && size(self.metadata.name) <= {MAX_NAME_LENGTH}",
            "message": f"metadata.name must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters (it names the Service, Job and pods)",
        },
        *[
            {
                "rule": f"!has(oldSelf.status) || !has(oldSelf.status.{LOCK_FIELD}) || {_unchanged(field)}",
                "message": f"spec.{field} is immutable once the job is accepted (status.{LOCK_FIELD} is set); "
                "create a new DreamboothJob instead",
                "fieldPath": f".spec.{field}",
            }
            for field in locked_sections()
        ],
    ],
    "spec": [
        {
            "rule": "!has(self.serving.server) || self.training.lora.enabled",
            "message": "spec." + SHARED_NEEDS_LORA,
            "fieldPath": ".serving.server",
        },
        {
            "rule": "!self.prior.enabled || (has(self.prior.classPrompt) && size(self.prior.classPrompt) > 0)",
            "message": "spec.prior.classPrompt is required when spec.prior.enabled is true",
            "fieldPath": ".prior.classPrompt",
        },
        {
            "rule": "!self.prior.enabled || !has(self.prior.classPrompt) || !self.data.token.matches('"
            + TOKEN_RE
            + "') || !"
            + _contains_token("self.prior.classPrompt", "self.data.token"),
            "message": "spec.prior.classPrompt must not contain the token spec.data.token (it names the class, not the subject)",
            "fieldPath": ".prior.classPrompt",
        },
        {
            "rule": "!self.training.cacheLatents || self.data.centerCrop",
            "message": "spec.training.cacheLatents needs spec.data.centerCrop=true (a random crop cannot be cached)",
            "fieldPath": ".training.cacheLatents",
        },
        *family_rules(),
        *memory_rules(),
        *served_checkpoint_rules(),
        {
            "rule": "!has(self.model.quantize) || self.model.quantize == 'none' || self.training.lora.enabled",
            "message": "spec.model.quantize quantizes the frozen base of a LoRA run: set spec.training.lora.enabled, or quantize none",
            "fieldPath": ".model.quantize",
        },
    ],
    "spec.data": [
        {
            "rule": f"self.token.matches('{TOKEN_RE}') && !(self.token.lowerAscii() in {_ORDINARY})",
            "message": "spec.data.token must be one rare word (e.g. sks), not an ordinary word",
            "fieldPath": ".token",
        },
        {
            "rule": f"!self.token.matches('{TOKEN_RE}') || " + _contains_token("self.instancePrompt", "self.token"),
            "message": "spec.data.instancePrompt must contain the token spec.data.token",
            "fieldPath": ".instancePrompt",
        },
        {
            "rule": "self.instanceUri.startsWith('s3://')",
            "message": "spec.data.instanceUri must be an s3://bucket/prefix URI (pods share no volume)",
            "fieldPath": ".instanceUri",
        },
        {
            "rule": "!has(self.resolution) || self.resolution % 8 == 0",
            "message": "spec.data.resolution must be a multiple of 8",
            "fieldPath": ".resolution",
        },
    ],
    "spec.model": [
        {
            "rule": "self.source.matches('" + MODEL_SOURCE_RE.pattern.replace("\\", "\\\\") + "')",
            "message": "spec.model.source must be tiny, hf://org/name[@revision], s3://bucket/prefix or a local path",
            "fieldPath": ".source",
        },
    ],
    "spec.resources": [
        {
            "rule": "self.accelerator != 'cpu' || self.gpusPerNode == 1",
            "message": "spec.resources.gpusPerNode must be 1 (or unset) when spec.resources.accelerator is cpu",
            "fieldPath": ".gpusPerNode",
        },
        *[_quantity_rule("spec.resources", field) for field in ("cpu", "memory", "sharedMemory")],
    ],
    "spec.serving": [
        {
            "rule": "!has(self.ingressFrom) || self.ingressFrom.all(peer, has(peer.podSelector) || has(peer.namespaceSelector))",
            "message": "spec.serving.ingressFrom: each peer needs a podSelector or a namespaceSelector",
            "fieldPath": ".ingressFrom",
        },
    ],
    "spec.serving.resources": [_quantity_rule("spec.serving.resources", field) for field in ("cpu", "memory")],
    "spec.scheduling.labels": [label_key_rule("spec.scheduling.labels")],
    "spec.scheduling.nodeSelector": [label_key_rule("spec.scheduling.nodeSelector")],
    "spec.serving.scheduling.nodeSelector": [label_key_rule("spec.serving.scheduling.nodeSelector")],
    "spec.podTemplate.labels": [label_key_rule("spec.podTemplate.labels")],
    "spec.podTemplate.annotations": [label_key_rule("spec.podTemplate.annotations")],
    "spec.podTemplate": [
        {
            "rule": "!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes) && self.volumes.exists(v, v.name == m.name))",
            "message": "spec.podTemplate.volumeMounts: every mount must name a volume of spec.podTemplate.volumes",
            "fieldPath": ".volumeMounts",
        },
    ],
    "spec.podTemplate.env": [
        {
            "rule": "self.all(e, !(e.name in [" + ", ".join(f"'{n}'" for n in RESERVED_ENV) + "]))",
            "message": "spec.podTemplate.env: " + ", ".join(RESERVED_ENV) + " are set by the operator",
        },
    ],
    "spec.podTemplate.volumes": [
        {
            "rule": "self.all(v, !(v.name in [" + ", ".join(f"'{n}'" for n in RESERVED_VOLUMES) + "]))",
            "message": "spec.podTemplate.volumes: the names " + ", ".join(RESERVED_VOLUMES) + " are used by the operator",
        },
    ],
}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Fidelity", "type": "string", "jsonPath": ".status.fidelity.summary"},
    # The endpoint's readiness: a row changes when serving becomes ready, not only at Succeeded.
    {"name": "Serving", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"ServingReady\")].status"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def openapi_schema(model: type[BaseModel], with_defaults: bool = True) -> dict[str, Any]:
    """A structural OpenAPI v3 schema (what a CRD accepts) from a pydantic model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}), with_defaults)


def _structural(node: dict[str, Any], defs: dict[str, Any], with_defaults: bool) -> dict[str, Any]:
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        target.update({k: v for k, v in node.items() if k != "$ref"})
        return _structural(target, defs, with_defaults)
    if "x-kubernetes-int-or-string" in node:
        out = {k: v for k, v in node.items() if k in ("x-kubernetes-int-or-string", "anyOf", "description")}
        if with_defaults and node.get("default") is not None:
            out["default"] = node["default"]
        return out
    node = dict(node)
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express {branches} in a structural schema")
        branch = branches[0]
        if "$ref" in branch:
            branch = copy.deepcopy(defs[branch["$ref"].split("/")[-1]])
        merged = {**branch, **node}
        if "x-kubernetes-int-or-string" in branch:  # an optional Quantity
            return _structural(merged, defs, with_defaults)
        if "default" in node and node["default"] is not None:
            merged["nullable"] = True  # null means "off" here (e.g. maxGradNorm: null), not "unset"
        node = merged
    out: dict[str, Any] = {}
    if "description" in node:
        out["description"] = node["description"]
    out["type"] = node["type"]
    for key in ("format", "minimum", "maximum", "minLength", "maxLength", "pattern", "enum", "nullable", "minItems", "maxItems"):
        if key in node:
            out[key] = node[key]
    if "exclusiveMinimum" in node:
        out["minimum"], out["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node:
        out["maximum"], out["exclusiveMaximum"] = node["exclusiveMaximum"], True
    if node.get("x-kubernetes-preserve-unknown-fields") or node.get("additionalProperties") is True:
        # A Kubernetes object kept as given (affinity, a volume): the API server checks it later.
        out["x-kubernetes-preserve-unknown-fields"] = True
    if out["type"] == "string":
        out.setdefault("maxLength", MAX_STRING_LENGTH)
    if out["type"] == "object":
        if "properties" in node:
            out["properties"] = {k: _structural(v, defs, with_defaults) for k, v in node["properties"].items()}
            if node.get("required"):
                out["required"] = list(node["required"])
        elif isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = _structural(node["additionalProperties"], defs, with_defaults)
            out["maxProperties"] = MAX_MAP_ENTRIES
    if out["type"] == "array":
        out["items"] = _structural(node["items"], defs, with_defaults)
        out.setdefault("maxItems", MAX_LIST_ITEMS)
    if with_defaults and "default" in node and node["default"] is not None:
        out["default"] = node["default"]
    elif with_defaults and out["type"] == "object" and "properties" in out and "required" not in out:
        # A section left out gets its fields' defaults (the API server checks CEL rules on it as is).
        out["default"] = {key: child["default"] for key, child in out["properties"].items() if "default" in child}
    return out


def _node_at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in filter(None, path.split(".")):
        node = node["properties"][part]
    return node


def spec_schema() -> dict[str, Any]:
    schema = openapi_schema(DreamboothJobSpec)
    schema["description"] = "What to train, on what, and where to keep it. See examples/job.yaml."
    _leave_to_operator(schema)
    return schema


def status_schema() -> dict[str, Any]:
    schema = openapi_schema(DreamboothJobStatus, with_defaults=False)
    schema["description"] = "Observed state, written by the operator."
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    # kopf keeps its own bookkeeping under status.kopf; keep it from being pruned.
    schema["properties"]["kopf"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return schema


def crd_manifest() -> dict[str, Any]:
    root: dict[str, Any] = {
        "type": "object",
        "description": "A DreamBooth fine-tuning job: trains on a few photos of a subject across a gang of pods, then serves the model.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
    }
    for path, rules in CEL_RULES.items():
        _node_at(root, path)["x-kubernetes-validations"] = copy.deepcopy(rules)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }
