"""The step math of diffusers' DreamBooth example scripts (huggingface/diffusers @58eb52c,
examples/dreambooth/), written again here in our own words as plain functions: text encoding,
latents to model space, the prediction and the prior-preservation loss, with the scripts' default
options. Noise, timesteps (or sigmas) and latents come in from outside, so one draw can go through
these and through our step.

- SD1/SD2: train_dreambooth.py (epsilon or v target, mse(instance) + λ·mse(class)).
- SDXL: train_dreambooth_lora_sdxl.py (CLIP-L and bigG penultimate states concatenated, bigG's
  pooled projection, time ids = original size + crop + (resolution, resolution)).
- SD3: train_dreambooth_lora_sd3.py (flow matching, --precondition_outputs 1: pred ← -σ·pred + x_t
  against x0, weighting "logit_normal" sampling with unit loss weights, T5 length 77).
- Flux: train_dreambooth_lora_flux.py (flow matching on packed latents, timestep/1000, distilled
  guidance 3.5 as a tensor when the model embeds guidance, target n - x0, weighting "none").
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

FLUX_GUIDANCE = 3.5  # train_dreambooth_lora_flux.py --guidance_scale
SD3_T5_LENGTH = 77  # train_dreambooth_lora_sd3.py --max_sequence_length
FLUX_T5_LENGTH = 512  # train_dreambooth_lora_flux.py --max_sequence_length
DEFAULT_WEIGHTING = {"sd3": "logit_normal", "flux": "none"}  # --weighting_scheme


def clip_ids(tokenizer: Any, prompts: list[str], length: int | None = None) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=length or tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def sd_text(pipeline: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    return {"prompt_embeds": pipeline.text_encoder(clip_ids(pipeline.tokenizer, prompts), return_dict=False)[0]}


def sdxl_text(pipeline: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    states = []
    for encoder, tokenizer in ((pipeline.text_encoder, pipeline.tokenizer), (pipeline.text_encoder_2, pipeline.tokenizer_2)):
        output = encoder(clip_ids(tokenizer, prompts), output_hidden_states=True, return_dict=False)
        pooled = output[0]
        states.append(output[-1][-2])
    return {"prompt_embeds": torch.cat(states, dim=-1), "pooled": pooled.view(len(prompts), -1)}


def t5_states(encoder: Any, tokenizer: Any, prompts: list[str], length: int) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                    return_tensors="pt").input_ids
    return encoder(ids)[0]


def sd3_text(pipeline: Any, prompts: list[str], t5_length: int) -> dict[str, torch.Tensor]:
    states, pooled = [], []
    for encoder, tokenizer in ((pipeline.text_encoder, pipeline.tokenizer), (pipeline.text_encoder_2, pipeline.tokenizer_2)):
        output = encoder(clip_ids(tokenizer, prompts, 77), output_hidden_states=True)
        pooled.append(output[0])
        states.append(output.hidden_states[-2])
    clip = torch.cat(states, dim=-1)
    t5 = t5_states(pipeline.text_encoder_3, pipeline.tokenizer_3, prompts, t5_length)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled": torch.cat(pooled, dim=-1)}


def flux_text(pipeline: Any, prompts: list[str], t5_length: int) -> dict[str, torch.Tensor]:
    pooled = pipeline.text_encoder(clip_ids(pipeline.tokenizer, prompts, 77), output_hidden_states=False).pooler_output
    return {"prompt_embeds": t5_states(pipeline.text_encoder_2, pipeline.tokenizer_2, prompts, t5_length), "pooled": pooled}


def model_space(raw: torch.Tensor, vae: Any) -> torch.Tensor:
    config = vae.config
    shift = getattr(config, "shift_factor", None)
    return (raw - shift) * config.scaling_factor if shift is not None else raw * config.scaling_factor


def prior_loss(pred: torch.Tensor, target: torch.Tensor, prior_weight: float, weighting: torch.Tensor | None = None) -> torch.Tensor:
    """The scripts' instance loss plus λ x the class loss (rows [instance; class], chunked in two)."""
    pred, pred_prior = torch.chunk(pred, 2, dim=0)
    target, target_prior = torch.chunk(target, 2, dim=0)
    if weighting is None:
        return F.mse_loss(pred.float(), target.float()) + prior_weight * F.mse_loss(pred_prior.float(), target_prior.float())
    weighting, weighting_prior = torch.chunk(weighting, 2, dim=0)

    def weighted(w: torch.Tensor, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.mean((w.float() * (p.float() - t.float()) ** 2).reshape(t.shape[0], -1), 1).mean()

    return weighted(weighting, pred, target) + prior_weight * weighted(weighting_prior, pred_prior, target_prior)


def ddpm_loss(unet: Any, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              conds: dict[str, torch.Tensor], prior_weight: float, time_ids: torch.Tensor | None = None) -> torch.Tensor:
    """train_dreambooth.py (no added conditions) and train_dreambooth_lora_sdxl.py (time ids + pooled)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    added = {"time_ids": time_ids, "text_embeds": conds["pooled"]} if time_ids is not None else None
    pred = unet(noisy, timesteps, conds["prompt_embeds"], added_cond_kwargs=added, return_dict=False)[0]
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    return prior_loss(pred, target, prior_weight)


def sdxl_time_ids(original_sizes: list[tuple[int, int]], crops: list[tuple[int, int]], resolution: int) -> torch.Tensor:
    return torch.cat([torch.tensor([list(size + crop + (resolution, resolution))]) for size, crop in zip(original_sizes, crops)])


def sd3_loss(transformer: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor,
             conds: dict[str, torch.Tensor], prior_weight: float) -> torch.Tensor:
    sigmas = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    pred = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=conds["prompt_embeds"],
                       pooled_projections=conds["pooled"], return_dict=False)[0]
    pred = pred * (-sigmas) + noisy  # --precondition_outputs 1
    weighting = torch.ones_like(sigmas)  # compute_loss_weighting_for_sd3("logit_normal")
    return prior_loss(pred, latents, prior_weight, weighting)


def flux_loss(transformer: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor,
              conds: dict[str, torch.Tensor], prior_weight: float, vae_scale_factor: int) -> torch.Tensor:
    from diffusers import FluxPipeline

    batch, channels, height, width = latents.shape
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
    text_ids = torch.zeros(conds["prompt_embeds"].shape[1], 3, dtype=latents.dtype)
    sigmas = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy, batch_size=batch, num_channels_latents=channels, height=height, width=width)
    guidance = torch.tensor([FLUX_GUIDANCE]).expand(batch) if transformer.config.guidance_embeds else None
    pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, pooled_projections=conds["pooled"],
                       encoder_hidden_states=conds["prompt_embeds"], txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
    pred = FluxPipeline._unpack_latents(pred, height=height * vae_scale_factor, width=width * vae_scale_factor,
                                        vae_scale_factor=vae_scale_factor)
    return prior_loss(pred, noise - latents, prior_weight, torch.ones_like(sigmas))
