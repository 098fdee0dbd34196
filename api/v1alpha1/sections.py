"""The trainer's sections of the API: what to train and how (model, data, prior, training,
checkpointing, validation, output). A DreamboothJob's spec and a `dreambooth train` config share them.

Imports only pydantic and the standard library (the operator's image is slim). Keys are snake_case
in config files (`training.max_steps`); the CRD spells the same fields in camelCase
(`training.maxSteps`); both spellings validate.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .architectures import ARCHITECTURE_NAMES

MODEL_SOURCE_RE = re.compile(
    r"^(tiny|hf://[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+(@[A-Za-z0-9_.\-/]+)?|s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|[^:]+)$"
)
# Words too common to be a DreamBooth identifier: the token must be rare so the model binds it
# to the subject instead of overwriting a word it already knows.
ORDINARY_WORDS = frozenset(
    "a an the of on in at to and or photo picture image dog cat man woman person car house "
    "style art painting portrait of with".split()
)


class ConfigError(ValueError):
    """A config that cannot run; the message names the dotted key."""


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        validate_assignment=True,
    )


class ModelConfig(Section):
    source: str = Field(
        "tiny",
        description="Base model: a built-in random model (`tiny` SD1, `tiny-sdxl`, `tiny-sd3`, `tiny-flux`), `hf://org/name[@revision]`, `s3://bucket/prefix`, or a local diffusers folder.",
    )
    family: Literal["auto", "sd", "sdxl", "sd3", "flux"] = Field(
        "auto", description="Model family; auto reads it from the model (model_index.json's pipeline class). An explicit family must match the model.")
    tiny_resolution: int = Field(32, ge=8, description="Sample size in pixels the built-in tiny model is shaped for.")
    architecture: Literal[ARCHITECTURE_NAMES] | None = Field(
        None, description="The published model this source is a copy of (s3://, a folder), for the memory plan; read from source when it names a published model.")
    quantize: Literal["none", "int8", "fp8"] = Field(
        "none", description="LoRA only: keep the frozen denoiser and frozen text encoders in 8 bits (torchao weight-only int8, or fp8 on GPUs that have it), so Flux and SD3.5-Large LoRA fit 24 GB cards. The adapters and the exported files stay full precision.")

    @field_validator("source")
    @classmethod
    def _source_is_well_formed(cls, value: str) -> str:
        if not value or not MODEL_SOURCE_RE.match(value) or value.startswith(("hf:/", "s3:/")) and "://" not in value:
            raise ValueError(f"{value!r} is not tiny, hf://org/name[@revision], s3://bucket/prefix or a local path")
        return value


class DataConfig(Section):
    instance_uri: str = Field(..., description="Folder or s3://bucket/prefix holding 3-20 photos of the subject.")
    instance_prompt: str = Field(..., description="Prompt naming the subject with the identifier token, e.g. `a photo of sks dog`.")
    token: str = Field("sks", min_length=1, description="The rare identifier token bound to the subject.")
    resolution: int | None = Field(
        None, ge=8, description="Training resolution in pixels (multiple of 8). Default: the model's native size (sd 512, SD 2.x-v 768, sdxl, sd3 and flux 1024; a built-in tiny model its model.tiny_resolution).")
    center_crop: bool = Field(True, description="Center crop after resizing (random crop when false).")
    random_flip: bool = Field(False, description="Randomly flip images horizontally.")
    num_workers: int = Field(0, ge=0, description="Dataloader worker processes.")
    caption_dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Chance that a training row's prompt is replaced by the empty prompt, so the unconditional prediction that classifier-free guidance steers away from is trained too (drawn from the seed and the micro-step: the same rows drop on resume and for any worker count).")
    caption_template: str | None = Field(
        None, description="Prompt for a photo with a caption file (`photo.txt` beside `photo.jpg`), e.g. `a photo of {token} {caption}`. "
        "Without it the caption itself is the prompt and must contain the token. Photos without a caption use instance_prompt.")
    bucketing: bool = Field(False, description="Aspect-ratio buckets: photos keep their shape (area about resolution², sides multiples of bucket_step); each batch comes from one bucket.")
    bucket_step: int = Field(64, ge=8, description="Bucket sides are multiples of this many pixels (a multiple of 8; 16 for Flux).")

    @field_validator("resolution", "bucket_step")
    @classmethod
    def _multiple_of_eight(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError("must be a multiple of 8")
        return value

    @model_validator(mode="after")
    def _buckets_fit(self) -> "DataConfig":
        if self.bucketing and self.resolution is not None and self.resolution % self.bucket_step:
            raise ValueError(f"data.bucket_step {self.bucket_step} must divide data.resolution {self.resolution} when data.bucketing is true")
        return self


class PriorConfig(Section):
    enabled: bool = Field(True, description="Prior preservation: train on class images too.")
    class_prompt: str | None = Field(None, description="Prompt for the subject's class, without the token, e.g. `a photo of dog`.")
    class_uri: str | None = Field(None, description="Folder or s3:// prefix with existing class images; missing ones are generated.")
    num_class_images: int = Field(100, ge=1, description="Class images wanted; generated when fewer exist.")
    loss_weight: float = Field(1.0, ge=0.0, description="λ in loss = mse(instance) + λ·mse(class) (diffusers' prior_loss_weight).")
    sampler: Literal["ddim", "pndm", "euler", "dpm"] | None = Field(
        None, description="Scheduler that draws class images (DDPM families: sd, sdxl). Default: ddim for sd, the pipeline's own for sdxl (euler); sd3 and flux refuse it (they draw with their flow-matching scheduler).")
    sample_steps: int = Field(25, ge=1, le=1000, description="Denoising steps per generated class image.")
    guidance_scale: float | None = Field(
        None, ge=0.0, description="Guidance for class images. Default: the family's pipeline default (sd 7.5, sdxl 5.0, sd3 7.0, flux 3.5, Flux-dev's distilled guidance).")
    sample_batch_size: int = Field(4, ge=1, description="Class images generated per batch on each rank.")
    cache_uri: str | None = Field(
        None,
        description="Content-addressed class-image cache. Default: s3://<output bucket>/class-cache, or ~/.cache/dreambooth/class-cache for local output.",
    )


class LoraConfig(Section):
    enabled: bool = Field(False, description="Train LoRA adapters instead of full weights.")
    rank: int = Field(4, ge=1, description="LoRA rank.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (default: rank).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=list, description="Denoiser modules adapted; empty: the family's usual ones (SD/SDXL attention to_q/k/v/out; SD3 and Flux also the text stream, Flux the feed-forwards).")


class DdpConfig(Section):
    static_graph: bool = Field(True, description="The set of trained parameters never changes between steps: DDP skips re-discovering it. Off while training.gradientAccumulationSteps > 1 (a static graph cannot record a step under no_sync).")
    bucket_cap_mb: int | None = Field(None, ge=1, le=1024, description="Gradient bucket size in MiB; default: the trained parameters' size / 16, within 25-200.")
    gradient_compression: Literal["none", "fp16", "bf16"] = Field(
        "none", description="Compress gradients to this type for the all-reduce (halves the traffic between nodes).")


class FsdpConfig(Section):
    block_classes: list[str] = Field(
        default_factory=list,
        description="Denoiser block classes sharded one by one (e.g. FluxTransformerBlock); default: the model's `_no_split_modules`.")
    reshard_after_forward: bool = Field(
        True, description="Free each block's gathered weights after its forward (least memory); false keeps them for the backward (less traffic).")


# What FSDP cannot combine with, each naming its field: (field, is it set?, why).
FSDP_CONFLICTS: tuple[tuple[str, Any, str], ...] = (
    ("training.ema", lambda t: t.ema, "the EMA copy would be a second unsharded UNet"),
    ("training.compile", lambda t: t.compile, "torch.compile of the sharded denoiser is not supported yet"),
    ("training.train_text_encoder", lambda t: t.train_text_encoder, "text encoders stay out of FSDP, unsynchronised"),
    ("training.optimizer", lambda t: t.optimizer == "adamw_8bit", "bitsandbytes does not step sharded (DTensor) parameters"),
    ("training.mixed_precision", lambda t: t.mixed_precision == "fp16", "Lightning's FSDP2 strategy has no fp16 loss scaling; use bf16"),
    ("training.channels_last", lambda t: t.channels_last, "sharded parameters keep the default memory format"),
)


class TrainingConfig(Section):
    max_steps: int = Field(400, gt=0, description="Optimizer steps to train.")
    seed: int = Field(0, ge=0, description="Seed for data order, noise, timesteps and the tiny model.")
    learning_rate: float | None = Field(
        None, gt=0, description="Default: 1e-4 with LoRA (diffusers' LoRA DreamBooth scripts), 5e-6 for a full fine-tune (train_dreambooth.py).")
    text_encoder_learning_rate: float | None = Field(None, gt=0, description="Default: learning_rate.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(1, ge=1, description="Instance images per rank per micro-batch (as many class images join them).")
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, else full precision (fp32).")
    train_text_encoder: bool = False
    max_grad_norm: float | None = Field(1.0, gt=0)
    optimizer: Literal["adamw", "adamw_8bit"] = Field("adamw", description="adamw_8bit needs bitsandbytes and a GPU.")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    ema: bool = Field(False, description="Keep an exponential moving average of the UNet; exported instead of the raw weights.")
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    compile: bool = Field(False, description="torch.compile the UNet.")
    compile_backend: str = Field("inductor", description="torch.compile backend (inductor on GPUs; aot_eager compiles fast for checks).")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode; reduce-overhead adds CUDA graphs.")
    cache_latents: bool = Field(False, description="Encode images and prompts once; the hot step runs the UNet only.")
    attention: Literal["sdpa", "default"] = Field("sdpa", description="Attention kernel: PyTorch SDPA or the model's default.")
    channels_last: bool = Field(False, description="Channels-last memory format for the UNet (faster on GPUs).")
    min_snr_gamma: float | None = Field(None, gt=0, description="Min-SNR-γ loss weighting (5 is usual; epsilon and v-prediction models); unset: off.")
    noise_offset: float = Field(0.0, ge=0, le=1, description="Offset noise: add this x a normal draw per sample and channel to the noise (0.05-0.1 is usual); 0: off.")
    weighting_scheme: Literal["logit_normal", "mode", "uniform"] | None = Field(
        None, description="Flow-matching families (sd3, flux): how timesteps are drawn (SD3 paper). Default: the family's reference script's, logit_normal for sd3, uniform for flux.")
    precondition_outputs: bool | None = Field(
        None, description="sd3: compare the x0 estimate (x_t - sigma * prediction) with the clean latents, which weights each timestep by sigma squared (diffusers' SD3 scripts by default, kohya's SD3 trainer); false compares the raw velocity with noise - x0. Default: true for sd3; other families refuse it.")
    distilled_guidance: float | None = Field(
        None, ge=0, description="flux (FLUX.1-dev, a guidance-embedding model): the guidance value the transformer is conditioned on while training. Default: 3.5 (diffusers' Flux scripts; kohya's docs suggest 1.0); other families refuse it.")
    max_sequence_length: int | None = Field(
        None, ge=1, le=512, description="sd3, flux: T5 tokens of the training prompts. Default: the reference script's, 77 for sd3, 512 for flux; other families refuse it.")
    logit_mean: float = Field(0.0, description="logit_normal: mean of the normal before the sigmoid.")
    logit_std: float = Field(1.0, gt=0, description="logit_normal: its standard deviation.")
    mode_scale: float = Field(1.29, description="mode: how strongly the middle timesteps are favoured.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    ddp: DdpConfig = Field(default_factory=DdpConfig)
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every GPU holds the whole model. fsdp: parameters, gradients and optimizer state of the denoiser are sharded across the gang (needs 2 or more processes).")
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)

    @model_validator(mode="after")
    def _fsdp_combinations(self) -> "TrainingConfig":
        if self.strategy == "fsdp":
            for field, is_set, why in FSDP_CONFLICTS:
                if is_set(self):
                    raise ValueError(f"{field}={getattr(self, field.split('.')[1])} cannot be used with training.strategy=fsdp ({why})")
        return self


class CheckpointingConfig(Section):
    every_n_steps: int = Field(500, gt=0, description="Write a full checkpoint every N optimizer steps.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted after a new one is complete.")
    on_sigterm: bool = Field(True, description="Write a checkpoint when the process gets SIGTERM, then exit.")
    resume: bool = Field(True, description="Resume from `latest` when output.uri holds a checkpoint.")


# A fidelity backbone: the built-in random one (tiny models, tests), hf://org/name[@revision],
# s3://bucket/prefix or a local folder holding a transformers model and its image processor.
BACKBONE_SOURCE_RE = re.compile(r"^(tiny|hf://[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+(@[A-Za-z0-9_.\-/]+)?|s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|[^:]+)$")
# The scores a checkpoint can be chosen by, and the metrics.jsonl figure each one is.
SELECT_SCORES = ("auto", "dino", "clip-i", "clip-t", "pixel")


class FidelityModels(Section):
    dino: str | None = Field(
        None, description="DINO backbone for the DINO score and prior drift (the DreamBooth paper: ViT-S/16, e.g. hf://facebook/dino-vits16): "
        "tiny (a random ViT built in code), hf://org/name[@revision], s3://bucket/prefix or a folder. Unset: tiny for the built-in tiny models, none otherwise.")
    clip: str | None = Field(
        None, description="CLIP model for CLIP-I and CLIP-T (e.g. hf://openai/clip-vit-base-patch32): tiny, hf://, s3:// or a folder. "
        "Unset: tiny for the built-in tiny models, none otherwise.")

    @field_validator("dino", "clip")
    @classmethod
    def _backbone_source(cls, value: str | None) -> str | None:
        if value is not None and (not BACKBONE_SOURCE_RE.match(value) or value.startswith(("hf:/", "s3:/")) and "://" not in value):
            raise ValueError(f"{value!r} is not tiny, hf://org/name[@revision], s3://bucket/prefix or a local path")
        return value


class FidelitySelect(Section):
    score: Literal[SELECT_SCORES] = Field(  # type: ignore[valid-type]
        "auto", description="The score that picks the best checkpoint (higher is better; pixel: the instance prompt's distance to the photos, lower is better). auto: dino when a DINO backbone is there, else clip-i, else pixel.")
    min_clip_t: float | None = Field(
        None, ge=-1.0, le=1.0, description="A checkpoint whose CLIP-T (prompt-image similarity) is below this is never the best, so a copy of the photos that ignores the prompts does not win (needs models.clip).")


class FidelityConfig(Section):
    """Subject fidelity, scored the DreamBooth paper's way before training and at every checkpoint."""

    enabled: bool = Field(True, description="Score the subject's fidelity before training, at each checkpoint and validation, and at the end.")
    models: FidelityModels = Field(default_factory=FidelityModels)
    prompts: list[str] = Field(
        default_factory=list, description="Prompts the scores are measured on ({token} and {class} are filled in). Empty: the DreamBooth paper's 25 prompts (its live-subject list for dogs and cats, its object list otherwise) with the token and class noun.")
    class_noun: str | None = Field(None, min_length=1, description="The class noun of the prompts. Default: the last word of prior.class_prompt.")
    images_per_prompt: int = Field(1, ge=1, le=16, description="Images per prompt at each checkpoint (seeds validation.seed + i). The paper drew 4; 1 keeps a checkpoint's scoring to 25 images.")
    select: FidelitySelect = Field(default_factory=FidelitySelect)
    export_best: bool = Field(True, description="At the end, export the best checkpoint (by select) to exports/best/ beside final/, so serving.checkpoint best serves it without another export.")


def _fidelity_from_bool(value: Any) -> Any:
    """`fidelity: true|false` (the older form) reads as `fidelity.enabled`."""
    return {"enabled": value} if isinstance(value, bool) else value


class ValidationConfig(Section):
    prompts: list[str] = Field(default_factory=list, description="Prompts rendered into a grid every N steps and at the end.")
    every_n_steps: int = Field(0, ge=0, description="0 disables periodic validation.")
    num_images: int = Field(2, ge=1, le=16)
    steps: int = Field(25, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, description="Default: the family's pipeline default (sd 7.5, sdxl 5.0, sd3 7.0, flux 3.5).")
    seed: int = 0
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig, description="Subject-fidelity scores (DINO, CLIP-I, CLIP-T, prior drift, pixel distance) and the choice of the best checkpoint.")
    fidelity_model: str | None = Field(
        None, description="Older form of fidelity.models: a CLIP model here is read as fidelity.models.clip, any other vision model as fidelity.models.dino.")

    @field_validator("fidelity", mode="before")
    @classmethod
    def _older_fidelity(cls, value: Any) -> Any:
        return _fidelity_from_bool(value)


SERVED_CHECKPOINT_RE = r"^(final|best|step-[0-9]{1,9})$"


class OutputConfig(Section):
    uri: str = Field(..., description="Local folder or s3://bucket/prefix for checkpoints, final model, progress, samples, logs.")
    serve: str = Field("final", pattern=SERVED_CHECKPOINT_RE, max_length=20, description=(
        "The checkpoint that will be served (a DreamboothJob's serving.checkpoint): step-N is exported to exports/step-N/ "
        "at the end and kept by checkpoint pruning; best is exports/best/."))
    progress_every_seconds: float = Field(5.0, gt=0, le=10, description="How often rank 0 rewrites progress.json.")
    tensorboard: bool = True
    wandb: bool = Field(False, description="Log to Weights & Biases (needs the wandb extra and WANDB_API_KEY).")
    wandb_project: str = "dreambooth"
    log_format: Literal["auto", "json", "text"] = Field("auto", description="auto: a progress bar in a terminal, JSON lines otherwise.")


class TrainerSections(Section):
    """What to train and how: the sections a `dreambooth train` config and a DreamboothJob share."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    prior: PriorConfig = Field(default_factory=PriorConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    checkpointing: CheckpointingConfig = Field(default_factory=CheckpointingConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    @model_validator(mode="after")
    def _quantize_needs_lora(self) -> "TrainerSections":
        if self.model.quantize != "none" and not self.training.lora.enabled:
            raise ValueError(f"model.quantize={self.model.quantize} quantizes the frozen base of a LoRA run; set training.lora.enabled "
                             "or model.quantize=none (a full fine-tune trains those weights)")
        return self


class TrainConfig(TrainerSections):
    output: OutputConfig

    @model_validator(mode="after")
    def _token_rules(self) -> "TrainConfig":
        token = self.data.token
        if token.lower() in ORDINARY_WORDS or not re.fullmatch(r"[A-Za-z0-9_<>\-]+", token):
            raise ValueError(f"data.token {token!r} must be one rare word (e.g. sks), not an ordinary word")
        if not contains_word(self.data.instance_prompt, token):
            raise ValueError(f"data.instance_prompt {self.data.instance_prompt!r} must contain the token {token!r}")
        if self.prior.enabled:
            if not self.prior.class_prompt:
                raise ValueError("prior.class_prompt is required when prior.enabled is true")
            if contains_word(self.prior.class_prompt, token):
                raise ValueError(f"prior.class_prompt {self.prior.class_prompt!r} must not contain the token {token!r}")
        if self.data.caption_template is not None:
            check_caption_template(self.data.caption_template, token)
        if self.training.strategy == "fsdp" and self.validation.every_n_steps:
            raise ValueError("validation.every_n_steps cannot be used with training.strategy=fsdp (rank 0 alone cannot run the sharded denoiser); the final validation still runs")
        if self.training.cache_latents and not self.data.center_crop:
            raise ValueError("training.cache_latents needs data.center_crop=true (a random crop cannot be cached)")
        return self


def check_caption_template(template: str, token: str) -> None:
    """The template names only {token} and {caption}, uses {caption}, and its prompts hold the token."""
    try:
        rendered = template.format(token=token, caption="")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"data.caption_template {template!r} may use only {{token}} and {{caption}} ({error})") from None
    if "\0" not in template.format(token=token, caption="\0"):
        raise ValueError(f"data.caption_template {template!r} must contain {{caption}}")
    if not contains_word(rendered, token):
        raise ValueError(f"data.caption_template {template!r} must contain {{token}} or the token {token!r}")


def contains_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", text) is not None


def dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc if part != "__root__")


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = dotted(item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{key}: {message}")
    return "; ".join(lines)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None
