"""Stable Diffusion 3: two CLIP encoders with projections and T5, an MMDiT, flow matching (the
scheduler bakes SD3's shift into its sigmas)."""
from __future__ import annotations

from typing import Any

import torch

from .base import FlowSettings, ModelFamily, Noised, StepMeta, flow_noise, flow_scheduler


def t5_length(pipeline: Any, name: str, default: int) -> int:
    """The T5 prompt length: the family's usual one, capped by the tokenizer's (the tiny T5's is short)."""
    tokenizer = getattr(pipeline, name, None)
    limit = getattr(tokenizer, "model_max_length", None) or default
    return int(min(default, limit))


class FlowFamily(ModelFamily):
    """Rectified-flow families: noise, target n - x0 and no per-sample weights (SD3 paper schemes
    only change where timesteps are drawn)."""

    flow_matching = True
    denoiser_name = "transformer"
    pixel_multiple = 16
    training_t5_default = 512  # the reference script's T5 prompt length in training
    max_sequence_length = 512  # the pipeline's at inference

    def training_text_length(self, cfg: Any) -> int | None:
        return cfg.training.max_sequence_length or self.training_t5_default

    def training_scheduler(self, pipeline: Any) -> Any:
        return flow_scheduler(pipeline)

    def noise(self, latents: torch.Tensor, scheduler: Any, generator: torch.Generator, flow: FlowSettings,
              noise_offset: float = 0.0) -> Noised:
        # noise_offset is a DDPM option: refused for flow-matching families before training starts.
        return flow_noise(latents, self.draw_noise(latents, generator), scheduler, generator, flow)

    def objective(self, noised: Noised, prediction: torch.Tensor, scheduler: Any, flow: FlowSettings) -> tuple[torch.Tensor, torch.Tensor]:
        """The velocity against n - x0; with SD3's preconditioning, x_t - σ·v (an x0 estimate) against x0."""
        if flow.precondition_outputs:
            sigmas = noised.sigmas.view((-1,) + (1,) * (noised.noisy.dim() - 1))
            return prediction * (-sigmas) + noised.noisy, noised.latents
        return prediction, noised.noise - noised.latents


class StableDiffusion3(FlowFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    tiny_source = "tiny-sd3"
    vae_in_fp32 = True  # NaN in fp16 (diffusers#7188); diffusers' SDXL and SD3 scripts keep it fp32
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    trainable_text_encoders = (0, 1)
    denoiser_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                             "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    max_sequence_length = 256  # the pipeline's at inference
    training_t5_default = 77  # diffusers' SD3 DreamBooth scripts
    default_guidance = 7.0

    def tiny(self, seed: int, resolution: int) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
        from transformers import CLIPTextModelWithProjection

        from ..tiny import TEXT_HIDDEN, seeded, tiny_clip_encoder, tiny_kl_autoencoder, tiny_t5_encoder, tiny_t5_tokenizer, tiny_tokenizer

        tokenizer, t5_tokenizer = tiny_tokenizer(), tiny_t5_tokenizer()
        joint = 2 * TEXT_HIDDEN  # CLIP-L ⊕ CLIP-G is padded to the T5 width, so T5 is at least as wide

        def build() -> dict[str, Any]:
            return {
                "text_encoder": tiny_clip_encoder(CLIPTextModelWithProjection, tokenizer),
                "text_encoder_2": tiny_clip_encoder(CLIPTextModelWithProjection, tokenizer),
                "text_encoder_3": tiny_t5_encoder(t5_tokenizer, joint),
                "transformer": SD3Transformer2DModel(
                    sample_size=max(1, resolution // 4), patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                    num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=joint,
                    pooled_projection_dim=2 * TEXT_HIDDEN, out_channels=4),
                "vae": tiny_kl_autoencoder(resolution, 4, shift=0.0609, scale=1.5035, quant_conv=False),
            }

        modules = seeded(seed, build)
        return StableDiffusion3Pipeline(tokenizer=tokenizer, tokenizer_2=tiny_tokenizer(), tokenizer_3=t5_tokenizer,
                                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **modules)

    def encode_text(self, pipeline: Any, prompts: list[str], device: torch.device, text_length: int | None = None) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompts, prompts, prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=t5_length(pipeline, "tokenizer_3", text_length or self.max_sequence_length))
        return {"prompt_embeds": embeds, "pooled": pooled}

    def metadata(self, pipeline: Any, cfg: Any = None) -> dict[str, Any]:
        length = self.training_text_length(cfg) if cfg is not None else self.training_t5_default
        precondition = cfg.training.precondition_outputs if cfg is not None else None
        return {"family": self.name, "t5_length": t5_length(pipeline, "tokenizer_3", length),
                "precondition_outputs": True if precondition is None else precondition}

    def predict(self, denoiser: torch.nn.Module, noised: Noised, conds: dict[str, torch.Tensor], meta: StepMeta) -> torch.Tensor:
        return denoiser(hidden_states=noised.noisy, timestep=noised.timesteps, encoder_hidden_states=conds["prompt_embeds"],
                        pooled_projections=conds["pooled"], return_dict=False)[0]

    def call_kwargs(self, pipeline: Any, negatives: list[str], guidance: float) -> dict[str, Any]:
        return {"negative_prompt": negatives, "guidance_scale": guidance,
                "max_sequence_length": t5_length(pipeline, "tokenizer_3", self.max_sequence_length)}
