"""Stable Diffusion 1.x/2.x: one CLIP encoder, a UNet, DDPM noise with an epsilon or v target."""
from __future__ import annotations

from typing import Any

import torch

from .base import FlowSettings, ModelFamily, Noised, StepMeta, canonical_text_keys, ddpm_noise, ddpm_scheduler


class StableDiffusion(ModelFamily):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    tiny_source = "tiny"

    def tiny(self, seed: int, resolution: int) -> Any:
        from ..tiny import tiny_pipeline

        return tiny_pipeline(seed=seed, sample_size=resolution)

    def extra_pipeline_kwargs(self) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encode_text(self, pipeline: Any, prompts: list[str], device: torch.device, text_length: int | None = None) -> dict[str, torch.Tensor]:
        tokenizer = pipeline.tokenizer
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        return {"prompt_embeds": pipeline.text_encoder(ids.to(device))[0]}

    def training_scheduler(self, pipeline: Any) -> Any:
        return ddpm_scheduler(pipeline)

    def noise(self, latents: torch.Tensor, scheduler: Any, generator: torch.Generator, flow: FlowSettings,
              noise_offset: float = 0.0) -> Noised:
        return ddpm_noise(latents, self.draw_noise(latents, generator, noise_offset), scheduler, generator)

    def predict(self, denoiser: torch.nn.Module, noised: Noised, conds: dict[str, torch.Tensor], meta: StepMeta) -> torch.Tensor:
        return denoiser(noised.noisy, noised.timesteps, encoder_hidden_states=conds["prompt_embeds"]).sample

    def objective(self, noised: Noised, prediction: torch.Tensor, scheduler: Any, flow: FlowSettings) -> tuple[torch.Tensor, torch.Tensor]:
        from ..loss import diffusion_target

        return prediction, diffusion_target(scheduler, noised.latents, noised.noise, noised.timesteps)

    def kohya_unet_name(self, name: str, config: Any) -> str:
        """A UNet module's name in sd-scripts (which trains SD1/SD2 on diffusers' module names)."""
        return name

    def kohya_lora(self, denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module]) -> dict[str, torch.Tensor] | None:
        from peft.utils import get_peft_model_state_dict

        from .kohya import kohya_weights, peft_alpha, text_encoder_prefixes

        out = kohya_weights("lora_unet", get_peft_model_state_dict(denoiser), peft_alpha(denoiser),
                            lambda name: self.kohya_unet_name(name, denoiser.config))
        for prefix, encoder in zip(text_encoder_prefixes(len(self.text_encoder_names)), text_encoders):
            if getattr(encoder, "peft_config", None):
                state = canonical_text_keys(get_peft_model_state_dict(encoder), encoder)
                out.update(kohya_weights(prefix, state, peft_alpha(encoder)))
        return out

    def metadata(self, pipeline: Any, cfg: Any = None) -> dict[str, Any]:
        return {"family": self.name, "prediction_type": pipeline.scheduler.config.get("prediction_type", "epsilon")}
