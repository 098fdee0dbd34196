"""Stable Diffusion 1.x/2.x: one CLIP encoder, a UNet, DDPM noise with an epsilon or v target."""
from __future__ import annotations

from typing import Any

import torch

from .base import FlowSettings, ModelFamily, Noised, StepMeta, ddpm_noise, ddpm_scheduler


def kohya_from_peft(layers: dict[str, dict[str, torch.Tensor]], alpha: float) -> dict[str, torch.Tensor]:
    """PEFT adapters by module prefix (`unet`, `text_encoder`, `text_encoder_2`) -> kohya keys
    (`lora_unet_…`, `lora_te1_…`, `lora_te2_…`, lora_down/lora_up/alpha), the layout A1111 and ComfyUI read."""
    from diffusers.utils import convert_state_dict_to_kohya

    kohya: dict[str, torch.Tensor] = {}
    for prefix, state in layers.items():
        kohya.update(convert_state_dict_to_kohya({f"{prefix}.{key}": value for key, value in state.items()}))
    # diffusers writes alpha = rank; the trained alpha is what scales the adapter.
    return {key: (torch.tensor(float(alpha)) if key.endswith(".alpha") else value.detach().cpu().contiguous())
            for key, value in kohya.items()}


def peft_layers(names: tuple[str, ...], modules: list[torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    from peft.utils import get_peft_model_state_dict

    return {name: get_peft_model_state_dict(module) for name, module in zip(names, modules) if getattr(module, "peft_config", None)}


class StableDiffusion(ModelFamily):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    tiny_source = "tiny"

    def tiny(self, seed: int, resolution: int) -> Any:
        from ..tiny import tiny_pipeline

        return tiny_pipeline(seed=seed, sample_size=resolution)

    def extra_pipeline_kwargs(self) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encode_text(self, pipeline: Any, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
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

    def target(self, noised: Noised, scheduler: Any) -> torch.Tensor:
        from ..loss import diffusion_target

        return diffusion_target(scheduler, noised.latents, noised.noise, noised.timesteps)

    def kohya_lora(self, denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module], alpha: float) -> dict[str, torch.Tensor] | None:
        return kohya_from_peft(peft_layers((self.denoiser_name, *self.text_encoder_names), [denoiser, *text_encoders]), alpha)

    def metadata(self, pipeline: Any) -> dict[str, Any]:
        return {"family": self.name, "prediction_type": pipeline.scheduler.config.get("prediction_type", "epsilon")}
