"""Text-to-image generation with classifier-free guidance in one batched UNet forward.

Each image starts from latents drawn with its own seed, so an image depends only on its own
(prompt, seed, steps, guidance, size) and not on what it was batched with. The server's
micro-batcher and `dreambooth generate` both call `generate_images`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image

from .models import sampler_for


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0


@torch.no_grad()
def encode_text(pipeline: object, prompts: list[str]) -> torch.Tensor:
    tokenizer, text_encoder = pipeline.tokenizer, pipeline.text_encoder
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


def placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a model's weights live. diffusers' `.device`/`.dtype` walk every submodule on each
    call, which a model carrying many LoRA adapters makes slow; its first parameter says the same."""
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


def initial_latents(pipeline: object, seeds: list[int], height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """One latent per seed, drawn on the CPU so a seed gives the same image on any device."""
    channels = pipeline.unet.config.in_channels
    scale = pipeline.vae_scale_factor
    latents = [
        torch.randn((1, channels, height // scale, width // scale), generator=torch.Generator("cpu").manual_seed(seed))
        for seed in seeds
    ]
    return torch.cat(latents).to(placement(pipeline.unet)[0], dtype)


def guided_noise(unet: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: unconditional and conditional run as ONE batch of 2N."""
    if guidance <= 1.0:
        return unet(latents, t, encoder_hidden_states=cond).sample
    both = unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    noise_uncond, noise_cond = both.chunk(2)
    return noise_uncond + guidance * (noise_cond - noise_uncond)


@torch.no_grad()
def generate_latents(pipeline: object, requests: list[ImageRequest], steps: int, guidance: float, height: int, width: int, sampler: str = "ddim") -> torch.Tensor:
    unet = pipeline.unet
    device, dtype = placement(unet)
    scheduler = sampler_for(pipeline, sampler)
    scheduler.set_timesteps(steps, device=device)
    cond = encode_text(pipeline, [r.prompt for r in requests]).to(dtype)
    uncond = encode_text(pipeline, [r.negative_prompt for r in requests]).to(dtype)
    latents = initial_latents(pipeline, [r.seed for r in requests], height, width, dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        noise = guided_noise(unet, model_input, t, cond, uncond, guidance)
        latents = scheduler.step(noise, t, latents).prev_sample
    return latents


@torch.no_grad()
def decode_images(pipeline: object, latents: torch.Tensor) -> list[Image.Image]:
    vae = pipeline.vae
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


def generate_images(pipeline: object, requests: list[ImageRequest], steps: int = 25, guidance: float | None = None,
                    height: int | None = None, width: int | None = None, sampler: str | None = None) -> list[Image.Image]:
    """SD runs the batched loop above (`sampler`, default ddim); other families run their own
    pipeline (its scheduler, or `sampler`'s for SDXL; for Flux `guidance` is the distilled
    guidance). `guidance` None: the family's pipeline default."""
    from .families import family_of_pipeline

    family = family_of_pipeline(pipeline)
    size = family.native_size(pipeline)
    height, width = height or size, width or size
    if height % 8 or width % 8:
        raise ValueError(f"width and height must be multiples of 8 (got {width}x{height})")
    guidance = family.default_guidance if guidance is None else guidance
    if family.name != "sd":
        return family.generate(pipeline, [r.prompt for r in requests], [r.negative_prompt for r in requests],
                               [r.seed for r in requests], steps, guidance, height, width, sampler)
    latents = generate_latents(pipeline, requests, steps, guidance, height, width, sampler or "ddim")
    return decode_images(pipeline, latents)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    columns = columns or len(images)
    rows = (len(images) + columns - 1) // columns
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid
