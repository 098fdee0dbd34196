"""A job's memory plan: what each GPU holds, for the job's family, mode, precision, strategy, world
size and quantization. Weights, gradients and optimizer state are exact (parameter counts of the
published architecture x the bytes each is kept in, as the trainer keeps them); activations are an
estimate and labelled so. `dreambooth plan JOB.yaml` prints it; the operator puts it in the
MemoryPlan condition and admission refuses a job whose exact parts alone exceed `resources.gpuMemory`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .architectures import Architecture, architecture_of

GIB = 2**30
HALF, FP32, EIGHT_BIT = 2, 4, 1
VAE_IN_FP32 = ("sdxl", "sd3")  # the families whose VAE stays fp32 under mixed precision (NaN in fp16)
# T5 prompt tokens a DiT attends over besides the image (the training defaults: SD3 77 CLIP + 77 T5, Flux 512).
TEXT_TOKENS = {"sd3": 154, "flux": 512}
# Gradient checkpointing keeps about this share of a step's activations (each block's input, one block whole).
CHECKPOINTED_SHARE = 0.15


@dataclass(frozen=True)
class PlanInputs:
    """What a plan depends on, read from a job spec or a trainer config."""

    source: str
    architecture: str | None
    lora: bool
    rank: int
    train_text_encoder: bool
    precision: str  # no | bf16 | fp16 (auto resolved: bf16 on a GPU)
    strategy: str  # ddp | fsdp
    world: int  # ranks sharing the FSDP shards
    quantize: str  # none | int8 | fp8
    optimizer: str  # adamw | adamw_8bit
    ema: bool
    batch_size: int  # instance images per rank per micro-batch
    prior: bool  # as many class images join them
    resolution: int | None
    gradient_checkpointing: bool
    gpu_memory: int | None = None  # bytes


@dataclass(frozen=True)
class MemoryPlan:
    architecture: str | None  # None: not a published model the plan knows
    parts: dict[str, int] = field(default_factory=dict)  # exact, bytes per GPU
    activations: int = 0  # ESTIMATE, bytes per GPU
    gpu_memory: int | None = None

    @property
    def exact(self) -> int:
        return sum(self.parts.values())

    @property
    def total(self) -> int:
        return self.exact + self.activations

    @property
    def verdict(self) -> str:
        """fits | too-big (the exact parts alone exceed the GPU) | tight (with the activation estimate) | unknown."""
        if self.architecture is None or self.gpu_memory is None:
            return "unknown"
        if self.exact > self.gpu_memory:
            return "too-big"
        return "tight" if self.total > self.gpu_memory else "fits"

    def summary(self) -> str:
        """One line (the MemoryPlan condition's message)."""
        if self.architecture is None:
            return "no memory plan: model.source is not a published model the plan knows (name it with model.architecture)"
        parts = ", ".join(f"{name} {gib(size)}" for name, size in self.parts.items() if size >= 2**20)
        line = f"{self.architecture}: {gib(self.exact)} exact per GPU ({parts}) + about {gib(self.activations)} activations (estimate)"
        if self.gpu_memory is not None:
            line += f"; resources.gpuMemory {gib(self.gpu_memory)}: {self.verdict}"
        return line

    def table(self) -> str:
        """The plan as `dreambooth plan` prints it."""
        if self.architecture is None:
            return self.summary()
        rows = [(name, size, "exact") for name, size in self.parts.items() if size] + [("activations", self.activations, "estimate")]
        lines = [f"memory plan for {self.architecture}, per GPU:"]
        lines += [f"  {name:<18} {gib(size):>10}  {kind}" for name, size, kind in rows]
        lines.append(f"  {'total':<18} {gib(self.total):>10}  ({gib(self.exact)} exact)")
        if self.gpu_memory is not None:
            lines.append(f"  resources.gpuMemory {gib(self.gpu_memory)}: {self.verdict}")
        return "\n".join(lines)


def gib(size: int) -> str:
    """Sizes as people read them: GiB, or MiB below one GiB."""
    return f"{size / GIB:.1f} GiB" if size >= GIB else f"{size / 2**20:.0f} MiB"


def frozen_bytes(size: "object", half: int, quantize: str) -> int:
    """A frozen module's bytes: its linear weights in 8 bits (with a half-type scale per output) when quantized."""
    if quantize == "none":
        return size.parameters * half
    return size.linear_weights * EIGHT_BIT + size.linear_outputs * half + (size.parameters - size.linear_weights) * half


def plan(inputs: PlanInputs) -> MemoryPlan:
    arch = architecture_of(inputs.source, inputs.architecture)
    if arch is None:
        return MemoryPlan(None, gpu_memory=inputs.gpu_memory)
    half = FP32 if inputs.precision == "no" else HALF
    optimizer_bytes = 2 * (EIGHT_BIT if inputs.optimizer == "adamw_8bit" else FP32)
    shard = inputs.world if inputs.strategy == "fsdp" else 1
    text_trained = [inputs.train_text_encoder and per_rank > 0 for per_rank in arch.text_lora_per_rank]
    frozen = (FP32 if arch.family in VAE_IN_FP32 else half) * arch.vae
    if inputs.lora:
        frozen += frozen_bytes(arch.denoiser, half, inputs.quantize)
        frozen += sum(frozen_bytes(size, half, "none" if trained else inputs.quantize)
                      for size, trained in zip(arch.text_encoders, text_trained))
        adapters = inputs.rank * (arch.lora_per_rank + sum(p for p, t in zip(arch.text_lora_per_rank, text_trained) if t))
        trained_denoiser, trained = inputs.rank * arch.lora_per_rank, adapters
    else:
        frozen += sum(size.parameters * half for size, t in zip(arch.text_encoders, text_trained) if not t)
        trained_text = sum(size.parameters for size, t in zip(arch.text_encoders, text_trained) if t)
        trained_denoiser = arch.denoiser.parameters
        trained = trained_denoiser / shard + trained_text
    parts = {"frozen weights": frozen, "trained weights": int(trained * FP32), "gradients": int(trained * FP32),
             "optimizer state": int(trained * optimizer_bytes), "ema": trained_denoiser * FP32 if inputs.ema else 0}
    return MemoryPlan(arch.name, parts, activation_estimate(arch, inputs), inputs.gpu_memory)


def activation_estimate(arch: Architecture, inputs: PlanInputs) -> int:
    side = (inputs.resolution or arch.native_size) // 8
    images = inputs.batch_size * (2 if inputs.prior else 1)
    elements = arch.activation_per_latent_pixel * side * side + arch.activation_per_text_token * TEXT_TOKENS.get(arch.family, 0)
    share = CHECKPOINTED_SHARE if inputs.gradient_checkpointing else 1.0
    return int(images * elements * HALF * share)


# --- the same exact parts as a CEL expression (the CRD refuses a job that cannot fit at apply time) --


def exact_bytes_cel(arch: Architecture) -> str:
    """CEL over `self` (the job): the exact bytes per GPU of a GPU job on this architecture, the twin of
    `plan()`'s exact parts, with the architecture's counts written in."""
    half = "(self.training.mixedPrecision == 'no' ? 4 : 2)"
    quantized = "self.model.quantize != 'none'"
    trained_bytes = "(self.training.optimizer == 'adamw_8bit' ? 10 : 16)"  # weight + gradient (fp32) + two moments

    def frozen(size: "object", may_quantize: bool) -> str:
        packed = f"{size.linear_weights} + {size.linear_outputs + size.parameters - size.linear_weights} * {half}"
        plain = f"{size.parameters} * {half}"
        return f"({quantized} ? {packed} : {plain})" if may_quantize else plain

    trained_text = [(size, per_rank) for size, per_rank in zip(arch.text_encoders, arch.text_lora_per_rank) if per_rank > 0]
    frozen_text = [size for size, per_rank in zip(arch.text_encoders, arch.text_lora_per_rank) if per_rank == 0]
    vae = f"{arch.vae} * " + ("4" if arch.family in VAE_IN_FP32 else half)
    text_lora = sum(per_rank for _, per_rank in trained_text)
    lora = " + ".join([
        vae, frozen(arch.denoiser, True), *[frozen(size, True) for size in frozen_text],
        *[f"(self.training.trainTextEncoder ? {frozen(size, False)} : {frozen(size, True)})" for size, _ in trained_text],
        f"self.training.lora.rank * ({arch.lora_per_rank} + (self.training.trainTextEncoder ? {text_lora} : 0)) * {trained_bytes}",
        f"(self.training.ema ? self.training.lora.rank * {arch.lora_per_rank * FP32} : 0)",
    ])
    shard = "(self.training.strategy == 'fsdp' ? self.resources.nodes * self.resources.gpusPerNode : 1)"
    full = " + ".join([
        vae, *[f"{size.parameters} * {half}" for size in frozen_text],
        *[f"(self.training.trainTextEncoder ? {size.parameters} * {trained_bytes} : {size.parameters} * {half})" for size, _ in trained_text],
        f"{arch.denoiser.parameters} * {trained_bytes} / {shard}",
        f"(self.training.ema ? {arch.denoiser.parameters * FP32} : 0)",
    ])
    return f"(self.training.lora.enabled ? {lora} : {full})"
