"""What every model family provides, and the pieces two or more families share.

A family is a stateless object passed explicitly (no global registry of strategies): tests and the
server can hold several in one process. The step that uses it lives in `module.py`:
latents -> model space, text conditions (cached when the encoders are frozen), noise/timesteps,
the denoiser's prediction, the target and per-sample loss weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class Components:
    """The modules of one model by role (a diffusers pipeline's parts, named for what they do)."""

    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    scheduler: Any  # the inference scheduler; its config also drives the training noise


@dataclass(frozen=True)
class FlowSettings:
    """Flow-matching timestep sampling (SD3 paper; diffusers' `compute_density_for_timestep_sampling`)
    and SD3's output preconditioning."""

    weighting_scheme: str = "logit_normal"  # logit_normal | mode | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = False  # SD3: x_t - σ·prediction against x0


@dataclass
class Noised:
    """One micro-batch after noising: what the denoiser sees and what it is compared with."""

    latents: torch.Tensor  # clean, model space
    noise: torch.Tensor
    noisy: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor | None = None  # flow matching only


@dataclass(frozen=True)
class StepMeta:
    """What a family's prediction may need beyond latents and text: the batch's sizes (SDXL's size
    conditioning) and the run's distilled guidance (Flux-dev)."""

    vae_scale: int  # pixels per latent pixel
    original_size: torch.Tensor | None = None  # LongTensor [B, 2] (h, w) when the data knows it
    crop_top_left: torch.Tensor | None = None  # LongTensor [B, 2] (top, left)
    guidance: float | None = None  # Flux-dev: the guidance value the transformer is conditioned on


class ModelFamily:
    """The interface; SD's behaviour is the default where a family does not differ."""

    name = "base"
    pipeline_classes: tuple[str, ...] = ()  # model_index.json `_class_name`s this family reads
    tiny_source = ""
    denoiser_name = "unet"
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    tokenizer_names: tuple[str, ...] = ("tokenizer",)
    trainable_text_encoders: tuple[int, ...] = (0,)  # which encoders `train_text_encoder` trains
    denoiser_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    pixel_multiple = 8
    flow_matching = False
    default_guidance = 7.5  # the family's pipeline default (class images, validation, serving)
    default_weighting_scheme = "logit_normal"  # flow-matching families: the reference script's
    vae_in_fp32 = False  # the VAE stays fp32 under mixed precision (the family's reference scripts keep it so)

    # -- building ----------------------------------------------------------------------------
    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    def tiny(self, seed: int, resolution: int) -> Any:
        raise NotImplementedError

    def extra_pipeline_kwargs(self) -> dict[str, Any]:
        return {}

    def components(self, pipeline: Any) -> Components:
        return Components(
            denoiser=getattr(pipeline, self.denoiser_name), vae=pipeline.vae,
            text_encoders=[getattr(pipeline, name) for name in self.text_encoder_names],
            tokenizers=[getattr(pipeline, name) for name in self.tokenizer_names], scheduler=pipeline.scheduler)

    def assemble(self, parts: Components) -> Any:
        """A pipeline of this family's class around these modules (no copies)."""
        kwargs = {self.denoiser_name: parts.denoiser, "vae": parts.vae, "scheduler": parts.scheduler}
        kwargs.update(zip(self.text_encoder_names, parts.text_encoders))
        kwargs.update(zip(self.tokenizer_names, parts.tokenizers))
        return self.pipeline_class()(**kwargs, **self.extra_pipeline_kwargs())

    def with_trained(self, pipeline: Any, denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module]) -> Any:
        """The pipeline with the modules being trained in place of the base ones."""
        parts = self.components(pipeline)
        parts.denoiser, parts.text_encoders = denoiser, list(text_encoders)
        return self.assemble(parts)

    def native_size(self, pipeline: Any) -> int:
        """The image side the model is made for (the default width and height)."""
        denoiser = getattr(pipeline, self.denoiser_name)
        sample = getattr(denoiser.config, "sample_size", None)
        if sample is not None and self.denoiser_name == "unet":
            return int(sample) * pipeline.vae_scale_factor
        vae_size = getattr(pipeline.vae.config, "sample_size", None)
        return int(vae_size[0] if isinstance(vae_size, (list, tuple)) else vae_size or 1024)

    # -- text ---------------------------------------------------------------------------------
    def encode_text(self, pipeline: Any, prompts: list[str], device: torch.device, text_length: int | None = None) -> dict[str, torch.Tensor]:
        """Batch-first conditions for the denoiser, one row per prompt (cacheable); `text_length`:
        the T5 prompt length of the flow families (None: the family's inference length)."""
        raise NotImplementedError

    def training_guidance(self, denoiser: torch.nn.Module, cfg: Any = None) -> float | None:
        """The guidance value a guidance-distilled denoiser is conditioned on while training (None: not one)."""
        return None

    def training_text_length(self, cfg: Any) -> int | None:
        """The T5 prompt length training encodes with (None: the family has no T5)."""
        return None


    # -- latents ------------------------------------------------------------------------------
    def to_model_space(self, latents: torch.Tensor, vae: torch.nn.Module) -> torch.Tensor:
        """Raw VAE latents -> what the denoiser works on (shift, then scale)."""
        config = vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:  # per-channel statistics (some SDXL-style VAEs)
            view = (1, -1) + (1,) * (latents.dim() - 2)
            mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(view)
            std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(view)
            return (latents - mean) * config.scaling_factor / std
        shift = getattr(config, "shift_factor", None) or 0.0
        return (latents - shift) * config.scaling_factor

    # -- the objective -------------------------------------------------------------------------
    def training_scheduler(self, pipeline: Any) -> Any:
        raise NotImplementedError

    def draw_noise(self, latents: torch.Tensor, generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
        """THE place a family draws its noise, with `training.noise_offset`'s term (0: none drawn)."""
        from ..loss import offset_noise

        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        return offset_noise(noise, offset, generator)

    def noise(self, latents: torch.Tensor, scheduler: Any, generator: torch.Generator, flow: FlowSettings,
              noise_offset: float = 0.0) -> Noised:
        raise NotImplementedError

    def predict(self, denoiser: torch.nn.Module, noised: Noised, conds: dict[str, torch.Tensor], meta: StepMeta) -> torch.Tensor:
        raise NotImplementedError

    def objective(self, noised: Noised, prediction: torch.Tensor, scheduler: Any, flow: FlowSettings) -> tuple[torch.Tensor, torch.Tensor]:
        """(what is compared, what it is compared with): the prediction (or SD3's x0 estimate from it) and its target."""
        raise NotImplementedError

    def loss_weights(self, noised: Noised, scheduler: Any, min_snr_gamma: float | None = None) -> torch.Tensor | None:
        """THE place per-sample loss weights apply: min-SNR-γ for DDPM families; None = 1."""
        if min_snr_gamma is None or self.flow_matching:
            return None
        from ..loss import min_snr_weights

        return min_snr_weights(noised.timesteps, scheduler.alphas_cumprod, min_snr_gamma,
                               scheduler.config.get("prediction_type", "epsilon"))

    def text_layers_read(self, index: int, encoder: torch.nn.Module) -> int:
        """How many of text encoder `index`'s layers the family's conditions depend on (all, unless
        the family reads a hidden state before the last: those later layers get no gradient)."""
        return int(encoder.config.num_hidden_layers)

    # -- LoRA -----------------------------------------------------------------------------------
    def lora_layers(self, denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module]) -> dict[str, Any]:
        """`save_lora_weights` keywords, as diffusers' own scripts write them: each adapted module's raw
        PEFT weights (`lora_A`/`lora_B` keys, one layout for the whole file: diffusers picks the layout
        from the first key) and its adapter config as metadata (the trained `lora_alpha` and targets)."""
        from peft.utils import get_peft_model_state_dict

        modules = {self.denoiser_name: denoiser, **dict(zip(self.text_encoder_names, text_encoders))}
        layers: dict[str, Any] = {}
        for name, module in modules.items():
            config = getattr(module, "peft_config", None)
            if config:
                state = get_peft_model_state_dict(module)
                layers[f"{name}_lora_layers"] = state if module is denoiser else canonical_text_keys(state, module)
                layers[f"{name}_lora_adapter_metadata"] = config["default"].to_dict()
        return layers

    def save_lora(self, folder: Path, denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.pipeline_class().save_lora_weights(str(folder), **self.lora_layers(denoiser, text_encoders), safe_serialization=True)

    def kohya_lora(self, denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module]) -> dict[str, torch.Tensor] | None:
        """The same adapters in kohya's (A1111/ComfyUI) key layout, or None where the family has none."""
        return None

    # -- generation -----------------------------------------------------------------------------
    def generate(self, pipeline: Any, prompts: list[str], negatives: list[str], seeds: list[int], steps: int, guidance: float,
                 height: int, width: int, sampler: str | None = None) -> list[Any]:
        """Images through the family's own pipeline; each image from its own seed's generator;
        `sampler` (DDPM families) swaps the pipeline's scheduler for that call."""
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        kwargs = self.call_kwargs(pipeline, negatives, guidance)
        pipeline.set_progress_bar_config(disable=True)
        own = pipeline.scheduler
        if sampler is not None:
            from ..models import sampler_for

            pipeline.scheduler = sampler_for(pipeline, sampler)
        try:
            output = pipeline(prompt=prompts, num_inference_steps=steps, height=height, width=width,
                              generator=generators, output_type="pil", **kwargs)
        finally:
            pipeline.scheduler = own
        return list(output.images)

    def call_kwargs(self, pipeline: Any, negatives: list[str], guidance: float) -> dict[str, Any]:
        return {"negative_prompt": negatives, "guidance_scale": guidance}

    def metadata(self, pipeline: Any, cfg: Any = None) -> dict[str, Any]:
        """What the family trained with, beside the export (`cfg`: the run's config; None: the defaults)."""
        return {"family": self.name}


def canonical_text_keys(state: dict[str, torch.Tensor], encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's keys as every reader knows them (`text_model.encoder.layers…`):
    transformers 5 flattened `CLIPTextModel` to `encoder.layers…` (diffusers strips the prefix again
    for such a model, and older transformers need it)."""
    if hasattr(encoder, "text_model") or not hasattr(encoder, "encoder"):
        return state
    return {f"text_model.{key}": value for key, value in state.items()}


def text_encoder_blocks(encoder: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(module-name prefix, the layer list) of a CLIP text encoder, flattened (transformers 5) or not."""
    prefix = "text_model." if hasattr(encoder, "text_model") else ""
    return prefix, encoder.get_submodule(prefix + "encoder.layers")


def ddpm_noise(latents: torch.Tensor, noise: torch.Tensor, scheduler: Any, generator: torch.Generator) -> Noised:
    """t ~ U{0..T-1}; x_t from the DDPM schedule."""
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=latents.device)
    return Noised(latents, noise, scheduler.add_noise(latents, noise, timesteps), timesteps)


def flow_noise(latents: torch.Tensor, noise: torch.Tensor, scheduler: Any, generator: torch.Generator, flow: FlowSettings) -> Noised:
    """Rectified flow: u from the weighting scheme picks a scheduler step; x_t = (1-σ)x0 + σn.
    The scheduler's sigmas carry its shift (SD3 bakes 3.0 in; Flux-dev's dynamic shift leaves them unshifted)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(flow.weighting_scheme, latents.shape[0], logit_mean=flow.logit_mean,
                                              logit_std=flow.logit_std, mode_scale=flow.mode_scale,
                                              device=latents.device, generator=generator)
    count = scheduler.config.num_train_timesteps
    indices = (u * count).long().clamp(0, count - 1).cpu()
    timesteps = scheduler.timesteps[indices].to(latents.device)
    sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype)
    shape = (-1,) + (1,) * (latents.dim() - 1)
    noisy = (1.0 - sigmas.view(shape)) * latents + sigmas.view(shape) * noise
    return Noised(latents, noise, noisy, timesteps, sigmas)


def flow_scheduler(pipeline: Any) -> Any:
    """A fresh flow-matching scheduler from the pipeline's config (its sigmas for training)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)


def ddpm_scheduler(pipeline: Any) -> Any:
    """DDPM with the pipeline's beta schedule and prediction type (epsilon or v_prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipeline.scheduler.config)
