"""Baselines for the SDXL-LoRA and Flux-LoRA cases: the inner loops of diffusers'
examples/dreambooth/train_dreambooth_lora_sdxl.py and train_dreambooth_lora_flux.py
(huggingface/diffusers @58eb52c), written again here in our own words, as users run them:

- SDXL: LoRA (r = alpha = rank, gaussian init) on the UNet's to_q/k/v/out; prompts encoded once
  before the loop (text encoders frozen, one prompt per side); every step encodes the pixels with
  the VAE (the script has no latent cache), scales them, draws epsilon and t ~ U{0..999}, adds
  noise, builds the size/crop time ids, runs the UNet with the pooled text and time ids, takes
  the epsilon (or v) target, prior loss on the second half, backward, clips to 1.0, AdamW.
- Flux: LoRA on the attention and feed-forward projections of the transformer (the script's
  default list); latents cached as the VAE's distribution and sampled every step (--cache_latents);
  shift/scale; t drawn uniformly (weighting "none") as an index into the flow scheduler; x_t =
  (1-σ)x0 + σn; 2x2 patches packed; distilled guidance 3.5 as a tensor when the model embeds it;
  timestep/1000; unpacked prediction against n - x0; prior loss; backward; clip; AdamW.

Both train the modules they are given in place (a freshly loaded pipeline's: a built-in tiny
model's on CPU, random full-size ones on a GPU; no second copy of the denoiser), so a case compares
the same shapes on both sides, with the AdamW implementation given (the one our run picked) and,
when asked, gradient checkpointing (the scripts' `--gradient_checkpointing`). Each returns seconds
per step, images per second and the peak GPU memory of the timed steps.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import measure

SDXL_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
FLUX_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
FLUX_GUIDANCE = 3.5


@dataclass
class Conditions:
    """Text conditions for [instance; class] rows, computed once before the loop."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor | None = None  # Flux only


def with_lora(model: torch.nn.Module, rank: int, targets: list[str]) -> list[torch.nn.Parameter]:
    """A LoRA adapter the way both scripts add one (r = alpha, gaussian init); its parameters."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    return [p for p in model.parameters() if p.requires_grad]


def adamw(params: list[torch.nn.Parameter], optimizer: dict[str, Any]) -> torch.optim.Optimizer:
    """The scripts' AdamW (lr 1e-4, weight decay 1e-4) with the given implementation (fused / foreach)."""
    kwargs = {key: optimizer[key] for key in ("fused", "foreach") if optimizer.get(key) is not None}
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, **kwargs)


def timed(step: Callable[[], torch.Tensor], steps: int, warmup: int, device: str) -> tuple[float, float | None, float]:
    """Seconds per step, peak GiB and this process's CPU seconds over the timed steps."""
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return (time.perf_counter() - started) / steps, peak, time.process_time() - cpu_started


def result(case: str, per_side: int, seconds: float, peak: float | None, optimizer: torch.optim.Optimizer,
           steps: int, cpu_seconds: float) -> dict[str, Any]:
    return {"case": case, "s_per_step": round(seconds, 4), "images_per_s": round(2 * per_side / seconds, 2),
            **measure.per_cpu_second(2 * per_side * steps, cpu_seconds),
            "peak_gib": None if peak is None else round(peak, 2), "optimizer": measure.optimizer_implementation(optimizer)}


def sdxl_lora_case(unet: torch.nn.Module, vae: torch.nn.Module, conds: Conditions, scheduler: Any, resolution: int,
                   per_side: int, steps: int, warmup: int, optimizer_impl: dict[str, Any], rank: int = 4, device: str = "cpu",
                   gradient_checkpointing: bool = False) -> dict[str, Any]:
    unet = unet.to(device).train()
    params = with_lora(unet, rank, SDXL_TARGETS)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = adamw(params, optimizer_impl)
    batch = 2 * per_side
    pixels = torch.randn(batch, 3, resolution, resolution, device=device, dtype=vae.dtype)
    # original size, crop top-left, target size: one row per image
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, device=device)
    embeds = conds.prompt_embeds.repeat_interleave(per_side, 0).to(device)
    pooled = conds.pooled.repeat_interleave(per_side, 0).to(device)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step() -> torch.Tensor:
        with amp:
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample()
                if mean is None or std is None:
                    latents = latents * vae.config.scaling_factor
                else:
                    shape = (1, -1, 1, 1)
                    latents = (latents - torch.tensor(mean, device=device).view(shape)) * vae.config.scaling_factor \
                        / torch.tensor(std, device=device).view(shape)
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device).long()
            noisy = scheduler.add_noise(latents, noise, t)
            pred = unet(noisy, t, embeds, added_cond_kwargs={"time_ids": time_ids.to(noisy.dtype), "text_embeds": pooled},
                        return_dict=False)[0]
            target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
            pred, pred_prior = pred.float().chunk(2)
            target, target_prior = target.float().chunk(2)
            loss = F.mse_loss(pred, target) + 1.0 * F.mse_loss(pred_prior, target_prior)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss

    seconds, peak, cpu_seconds = timed(step, steps, warmup, device)
    return result(f"diffusers sdxl lora per_side={per_side} {resolution}px gradient_checkpointing={gradient_checkpointing}",
                  per_side, seconds, peak, optimizer, steps, cpu_seconds)


def flux_lora_case(transformer: torch.nn.Module, vae: torch.nn.Module, conds: Conditions, scheduler: Any, resolution: int,
                   per_side: int, steps: int, warmup: int, optimizer_impl: dict[str, Any], rank: int = 4, device: str = "cpu",
                   gradient_checkpointing: bool = False) -> dict[str, Any]:
    from diffusers import FluxPipeline

    transformer = transformer.to(device).train()
    params = with_lora(transformer, rank, FLUX_TARGETS)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = adamw(params, optimizer_impl)
    batch = 2 * per_side
    pixels = torch.randn(batch, 3, resolution, resolution, device=device, dtype=vae.dtype)
    with torch.no_grad():
        cached = vae.encode(pixels).latent_dist  # --cache_latents: sampled again every step
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    embeds = conds.prompt_embeds.repeat_interleave(per_side, 0).to(device)
    pooled = conds.pooled.repeat_interleave(per_side, 0).to(device)
    text_ids = conds.text_ids.to(device)
    sigmas_table, timesteps_table = scheduler.sigmas.to(device), scheduler.timesteps.to(device)
    guidance = torch.full((batch,), FLUX_GUIDANCE, device=device) if transformer.config.guidance_embeds else None
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step() -> torch.Tensor:
        with amp:
            latents = (cached.sample() - shift) * scale
            _, channels, height, width = latents.shape
            image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, latents.dtype)
            noise = torch.randn_like(latents)
            index = (torch.rand(batch) * scheduler.config.num_train_timesteps).long()  # weighting "none": uniform
            t = timesteps_table[index.to(device)]
            sigma = sigmas_table[index.to(device)].view(-1, 1, 1, 1)
            noisy = (1.0 - sigma) * latents + sigma * noise
            packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
            pred = transformer(hidden_states=packed, timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                               encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
            pred = FluxPipeline._unpack_latents(pred, height * vae_scale_factor, width * vae_scale_factor, vae_scale_factor)
            target = noise - latents
            pred, pred_prior = pred.float().chunk(2)
            target, target_prior = target.float().chunk(2)
            loss = ((pred - target) ** 2).reshape(per_side, -1).mean(1).mean() + \
                1.0 * ((pred_prior - target_prior) ** 2).reshape(per_side, -1).mean(1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss

    seconds, peak, cpu_seconds = timed(step, steps, warmup, device)
    return result(f"diffusers flux lora per_side={per_side} {resolution}px gradient_checkpointing={gradient_checkpointing}",
                  per_side, seconds, peak, optimizer, steps, cpu_seconds)
