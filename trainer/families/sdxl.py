"""SDXL: CLIP-L and bigG (penultimate states concatenated, bigG's pooled projection), a UNet
conditioned on size/crop `add_time_ids`, DDPM noise."""
from __future__ import annotations

from typing import Any

import torch

from .base import StepMeta
from .base import Noised
from .sd import StableDiffusion


def add_time_ids(meta: StepMeta, batch: int, latent_size: tuple[int, int], vae_scale: int, device: torch.device) -> torch.Tensor:
    """orig (h, w) + crop (top, left) + target (h, w) per row: the data's when it has them,
    else the training size and no crop; the target is the batch's own size."""
    target = torch.tensor([latent_size[0] * vae_scale, latent_size[1] * vae_scale], dtype=torch.long)
    original = meta.original_size if meta.original_size is not None else target.expand(batch, 2)
    crop = meta.crop_top_left if meta.crop_top_left is not None else torch.zeros(batch, 2, dtype=torch.long)
    ids = torch.cat([original.cpu().long(), crop.cpu().long(), target.expand(batch, 2)], dim=1)
    return ids.to(device, torch.float32)


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    tiny_source = "tiny-sdxl"
    default_guidance = 5.0
    vae_in_fp32 = True  # NaN in fp16 (diffusers#7188); diffusers' SDXL and SD3 scripts keep it fp32
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    trainable_text_encoders = (0, 1)

    def tiny(self, seed: int, resolution: int) -> Any:
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from ..tiny import TEXT_HIDDEN, tiny_clip_encoder, tiny_kl_autoencoder, tiny_tokenizer, seeded

        tokenizer = tiny_tokenizer()

        def build() -> dict[str, Any]:
            return {
                "text_encoder": tiny_clip_encoder(CLIPTextModel, tokenizer),
                "text_encoder_2": tiny_clip_encoder(CLIPTextModelWithProjection, tokenizer),
                "unet": UNet2DConditionModel(
                    sample_size=max(1, resolution // 4), in_channels=4, out_channels=4, block_out_channels=(16, 32),
                    layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                    projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN, cross_attention_dim=2 * TEXT_HIDDEN,
                    norm_num_groups=8),
                "vae": tiny_kl_autoencoder(resolution, 4, scale=0.13025),
            }

        modules = seeded(seed, build)
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                           timestep_spacing="leading")
        return StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tiny_tokenizer(), scheduler=scheduler, **modules)

    def extra_pipeline_kwargs(self) -> dict[str, Any]:
        return {"add_watermarker": False}

    def call_kwargs(self, pipeline: Any, negatives: list[str], guidance: float) -> dict[str, Any]:
        """An empty negative prompt is zeros, not the encoding of "" (SDXL's `force_zeros_for_empty_prompt`,
        which the pipeline applies only when no negative prompt is passed at all): each row gets what
        the pipeline would give its request alone."""
        kwargs: dict[str, Any] = {"guidance_scale": guidance}
        zeros = pipeline.config.get("force_zeros_for_empty_prompt", True)
        if not zeros or all(negatives):
            return {**kwargs, "negative_prompt": negatives}
        if not any(negatives):
            return kwargs
        embeds, _, pooled, _ = pipeline.encode_prompt(negatives, device=pipeline._execution_device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        empty = torch.tensor([not text for text in negatives], device=embeds.device)
        return {**kwargs, "negative_prompt_embeds": embeds.masked_fill(empty.view(-1, 1, 1), 0.0),
                "negative_pooled_prompt_embeds": pooled.masked_fill(empty.view(-1, 1), 0.0)}

    def text_layers_read(self, index: int, encoder: torch.nn.Module) -> int:
        """SDXL reads CLIP-L's penultimate hidden state (and not its pooled output): its last layer
        and final norm never get a gradient. bigG's pooled projection runs all of bigG."""
        layers = int(encoder.config.num_hidden_layers)
        return layers - 1 if index == 0 else layers

    def kohya_unet_name(self, name: str, config: Any) -> str:
        """sd-scripts trains SDXL on the original SGM UNet: its block names, not diffusers'."""
        from .kohya import sgm_unet_name

        return sgm_unet_name(name, config)

    def encode_text(self, pipeline: Any, prompts: list[str], device: torch.device, text_length: int | None = None) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipeline.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled": pooled}

    def predict(self, denoiser: torch.nn.Module, noised: Noised, conds: dict[str, torch.Tensor], meta: StepMeta) -> torch.Tensor:
        latents = noised.noisy
        time_ids = add_time_ids(meta, latents.shape[0], tuple(latents.shape[-2:]), meta.vae_scale, latents.device)
        added = {"text_embeds": conds["pooled"], "time_ids": time_ids.to(conds["pooled"].dtype)}
        return denoiser(latents, noised.timesteps, encoder_hidden_states=conds["prompt_embeds"], added_cond_kwargs=added).sample
