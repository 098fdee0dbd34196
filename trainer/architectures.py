"""The published models at their real size, without their weights: each model's module configs,
written here as facts (the values of the published `config.json` files), built on the meta device
in seconds on a CPU. Tests check against them what only real sizes show: LoRA key sets, every
export layout read back by diffusers' readers, FSDP's block classes, and the parameter counts the
memory plan (`dreambooth_api.v1alpha1.architectures`) is made of.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 768, "hidden_act": "quick_gelu"}
OPEN_CLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
               "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 512, "hidden_act": "gelu"}
OPEN_CLIP_BIG_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
                   "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 1280, "hidden_act": "gelu"}
T5_XXL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
          "is_encoder_decoder": False, "use_cache": False}
SD_VAE = {"sample_size": 512, "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
          "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32}
FLOW_VAE = {**SD_VAE, "sample_size": 1024, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": [320, 640, 1280, 1280],
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
             "cross_attention_dim": 768, "attention_head_dim": 8}
SD21_UNET = {**SD15_UNET, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
             "use_linear_projection": True, "upcast_attention": True}
SDXL_UNET = {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "block_out_channels": [320, 640, 1280],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
             "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816}
SD35_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24, "attention_head_dim": 64,
               "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
               "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"}
SD35_LARGE = {**SD35_MEDIUM, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432, "pos_embed_max_size": 192,
              "dual_attention_layers": []}
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
            "axes_dims_rope": [16, 56, 56]}
FLUX_SCHNELL = {**FLUX_DEV, "guidance_embeds": False}


@dataclass(frozen=True)
class PublishedModel:
    """One published model's modules: (class name, config) per pipeline component."""

    family: str
    denoiser: tuple[str, dict[str, Any]]
    text_encoders: tuple[tuple[str, dict[str, Any]], ...]
    vae: dict[str, Any]


PUBLISHED: dict[str, PublishedModel] = {
    "sd15": PublishedModel("sd", ("UNet2DConditionModel", SD15_UNET), (("CLIPTextModel", CLIP_L),), SD_VAE),
    "sd21-v": PublishedModel("sd", ("UNet2DConditionModel", SD21_UNET), (("CLIPTextModel", OPEN_CLIP_H),), {**SD_VAE, "sample_size": 768}),
    "sdxl-base": PublishedModel("sdxl", ("UNet2DConditionModel", SDXL_UNET),
                                (("CLIPTextModel", CLIP_L), ("CLIPTextModelWithProjection", OPEN_CLIP_BIG_G)),
                                {**SD_VAE, "sample_size": 1024}),
    "sd35-medium": PublishedModel("sd3", ("SD3Transformer2DModel", SD35_MEDIUM),
                                  (("CLIPTextModelWithProjection", CLIP_L), ("CLIPTextModelWithProjection", OPEN_CLIP_BIG_G),
                                   ("T5EncoderModel", T5_XXL)), FLOW_VAE),
    "sd35-large": PublishedModel("sd3", ("SD3Transformer2DModel", SD35_LARGE),
                                 (("CLIPTextModelWithProjection", CLIP_L), ("CLIPTextModelWithProjection", OPEN_CLIP_BIG_G),
                                  ("T5EncoderModel", T5_XXL)), FLOW_VAE),
    "flux1-dev": PublishedModel("flux", ("FluxTransformer2DModel", FLUX_DEV), (("CLIPTextModel", CLIP_L), ("T5EncoderModel", T5_XXL)), FLOW_VAE),
    "flux1-schnell": PublishedModel("flux", ("FluxTransformer2DModel", FLUX_SCHNELL),
                                    (("CLIPTextModel", CLIP_L), ("T5EncoderModel", T5_XXL)), FLOW_VAE),
}


def build_module(class_name: str, config: dict[str, Any]) -> torch.nn.Module:
    """One module of a published model, built on the meta device (no memory, no weights)."""
    import diffusers
    import transformers

    with torch.device("meta"):
        if hasattr(diffusers, class_name):
            return getattr(diffusers, class_name)(**config)
        model_class = getattr(transformers, class_name)
        config_class = transformers.T5Config if class_name.startswith("T5") else transformers.CLIPTextConfig
        return model_class(config_class(**config))


def build_denoiser(name: str) -> torch.nn.Module:
    return build_module(*PUBLISHED[name].denoiser)


def build_text_encoders(name: str) -> list[torch.nn.Module]:
    return [build_module(class_name, config) for class_name, config in PUBLISHED[name].text_encoders]


def build_vae(name: str) -> torch.nn.Module:
    return build_module("AutoencoderKL", PUBLISHED[name].vae)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


# Activation elements a step keeps for backward, per latent pixel of one image (half precision, no
# gradient checkpointing): an estimate, not a count. A DiT block keeps about 17 tensors of its width
# per token (Korthikanti et al. 2022, with fused attention); a UNet resnet about 8 of its channels per
# pixel of its level, each transformer layer inside about 26 (self and cross attention, a GEGLU 8x wide).
TRANSFORMER_BLOCK_TENSORS = 17
UNET_TRANSFORMER_TENSORS = 26
RESNET_TENSORS = 8


def activation_estimate(name: str) -> tuple[int, int]:
    """(elements per latent pixel, elements per text token) a step keeps, by the rule above."""
    model = PUBLISHED[name]
    class_name, config = model.denoiser
    if class_name == "UNet2DConditionModel":
        per_pixel = 0.0
        depths = config.get("transformer_layers_per_block", 1)
        for level, (channels, kind) in enumerate(zip(config["block_out_channels"], config["down_block_types"])):
            depth = depths[level] if isinstance(depths, list) else depths
            attention = depth if kind.startswith("CrossAttn") else 0
            # down and up blocks: layers_per_block + (layers_per_block + 1) resnets, as many attentions
            layers = 2 * config["layers_per_block"] + 1
            per_pixel += layers * channels * (RESNET_TENSORS + UNET_TRANSFORMER_TENSORS * attention) / 4 ** level
        return round(per_pixel), 0
    width = config["num_attention_heads"] * config["attention_head_dim"]
    blocks = config["num_layers"] + config.get("num_single_layers", 0)
    patch = 2  # SD3 embeds 2x2 patches; Flux packs 2x2 latents into one token
    return round(blocks * width * TRANSFORMER_BLOCK_TENSORS / patch**2), blocks * width * TRANSFORMER_BLOCK_TENSORS
