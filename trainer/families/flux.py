"""Flux.1: CLIP-L's pooled output and T5's states, a transformer on 2x2-packed latents, flow
matching on unshifted sigmas (dev shifts only at inference), a guidance embedding on dev."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import UserInputError
from .base import Noised, StepMeta, canonical_text_keys
from .sd3 import FlowFamily, t5_length

# diffusers' Flux DreamBooth LoRA targets: attention in both streams and the feed-forwards.
FLUX_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
TRAINING_GUIDANCE = 3.5  # what Flux-dev trains with by default (diffusers' Flux scripts); recorded in the metadata


class Flux(FlowFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    tiny_source = "tiny-flux"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    trainable_text_encoders = (0,)  # CLIP only, as diffusers' script does; T5 stays frozen
    denoiser_lora_targets = FLUX_LORA_TARGETS
    max_sequence_length = 512
    training_t5_default = 512  # diffusers' Flux DreamBooth scripts
    default_guidance = 3.5  # the distilled guidance of FLUX.1-dev (one forward per step)
    default_weighting_scheme = "uniform"  # the Flux scripts' "none"

    def tiny(self, seed: int, resolution: int) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextModel

        from ..tiny import TEXT_HIDDEN, seeded, tiny_clip_encoder, tiny_kl_autoencoder, tiny_t5_encoder, tiny_t5_tokenizer, tiny_tokenizer

        tokenizer, t5_tokenizer = tiny_tokenizer(), tiny_t5_tokenizer()

        def build() -> dict[str, Any]:
            return {
                "text_encoder": tiny_clip_encoder(CLIPTextModel, tokenizer),
                "text_encoder_2": tiny_t5_encoder(t5_tokenizer, TEXT_HIDDEN),
                "transformer": FluxTransformer2DModel(
                    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                    joint_attention_dim=TEXT_HIDDEN, pooled_projection_dim=TEXT_HIDDEN, axes_dims_rope=[4, 4, 8], guidance_embeds=True),
                "vae": tiny_kl_autoencoder(resolution, 4, shift=0.1159, scale=0.3611, quant_conv=False),
            }

        modules = seeded(seed, build)
        # Flux-dev's scheduler: the shift follows the image's token count at inference only.
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
        return FluxPipeline(tokenizer=tokenizer, tokenizer_2=t5_tokenizer, scheduler=scheduler, **modules)

    def encode_text(self, pipeline: Any, prompts: list[str], device: torch.device, text_length: int | None = None) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = pipeline.encode_prompt(prompts, prompts, device=device, num_images_per_prompt=1,
                                                   max_sequence_length=t5_length(pipeline, "tokenizer_2", text_length or self.max_sequence_length))
        return {"prompt_embeds": embeds, "pooled": pooled}


    def predict(self, denoiser: torch.nn.Module, noised: Noised, conds: dict[str, torch.Tensor], meta: StepMeta) -> torch.Tensor:
        from diffusers import FluxPipeline

        latents = noised.noisy
        batch, channels, height, width = latents.shape
        packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
        text_ids = torch.zeros(conds["prompt_embeds"].shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((batch,), TRAINING_GUIDANCE if meta.guidance is None else meta.guidance, device=latents.device,
                                  dtype=torch.float32)
        prediction = denoiser(hidden_states=packed, timestep=noised.timesteps / 1000, guidance=guidance,
                              pooled_projections=conds["pooled"], encoder_hidden_states=conds["prompt_embeds"],
                              txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        # _unpack_latents takes the pixel size and the VAE's factor; 1 keeps it in latent units.
        return FluxPipeline._unpack_latents(prediction, height, width, 1)

    def call_kwargs(self, pipeline: Any, negatives: list[str], guidance: float) -> dict[str, Any]:
        """`guidance` is Flux's distilled guidance; a negative prompt turns on true CFG."""
        kwargs: dict[str, Any] = {"guidance_scale": guidance,
                                  "max_sequence_length": t5_length(pipeline, "tokenizer_2", self.max_sequence_length)}
        if any(negatives):
            kwargs.update(negative_prompt=negatives, true_cfg_scale=guidance)
        return kwargs

    def kohya_lora(self, denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module]) -> dict[str, torch.Tensor] | None:
        """The transformer in BFL names and the CLIP-L adapters as `lora_te1_` (sd-scripts' Flux layout)."""
        from peft.utils import get_peft_model_state_dict

        from .flux_kohya import bfl_lora
        from .kohya import kohya_weights, peft_alpha

        out = bfl_lora(get_peft_model_state_dict(denoiser), denoiser, peft_alpha(denoiser))
        clip = text_encoders[0] if text_encoders else None
        if getattr(clip, "peft_config", None):
            # diffusers' kohya-Flux reader drops the text encoder's alphas: the scale travels in lora_up.
            out.update(kohya_weights("lora_te1", canonical_text_keys(get_peft_model_state_dict(clip), clip), peft_alpha(clip),
                                     bake_scale=True))
        return out

    def training_guidance(self, transformer: torch.nn.Module, cfg: Any = None) -> float | None:
        """The guidance Flux-dev is conditioned on while training (None for a model without the embedding)."""
        chosen = cfg.training.distilled_guidance if cfg is not None else None
        if not transformer.config.guidance_embeds:
            if chosen is not None:
                raise UserInputError("training.distilled_guidance: this Flux model has no guidance embedding (FLUX.1-schnell); unset it")
            return None
        return TRAINING_GUIDANCE if chosen is None else chosen

    def metadata(self, pipeline: Any, cfg: Any = None) -> dict[str, Any]:
        transformer = pipeline.transformer
        length = self.training_text_length(cfg) if cfg is not None else self.training_t5_default
        return {"family": self.name, "guidance_embeds": bool(transformer.config.guidance_embeds),
                "training_guidance": self.training_guidance(transformer, cfg),
                "t5_length": t5_length(pipeline, "tokenizer_2", length)}
