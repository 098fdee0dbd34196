"""The published base models, as numbers: what a job's memory plan is made of.

Each count is what diffusers and transformers build from that model's published configs
(`dreambooth_trainer.architectures` builds them on the meta device; a test keeps the two equal).
A job's architecture is read from `model.source` when it names a published model, or from
`model.architecture` for a copy elsewhere (s3://, a folder).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModuleSize:
    parameters: int
    linear_weights: int = 0  # weights of linear layers: what int8/fp8 weight-only quantization packs
    linear_outputs: int = 0  # their output features (one scale each when quantized)


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str
    native_size: int  # pixels a side
    denoiser: ModuleSize
    text_encoders: tuple[ModuleSize, ...]  # in the pipeline's order
    vae: int  # parameters
    lora_per_rank: int  # LoRA parameters per unit of rank on the family's default denoiser targets
    text_lora_per_rank: tuple[int, ...]  # the same per text encoder `trainTextEncoder` trains (its read layers); 0: never trained
    block_classes: tuple[str, ...]  # what FSDP shards one by one (the denoiser's `_no_split_modules`)
    activation_per_latent_pixel: int  # an ESTIMATE: elements a step keeps per latent pixel of an image (half, no checkpointing)
    activation_per_text_token: int  # the same per text token (DiTs attend over them too)


UNET_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
CLIP_L = ModuleSize(123_060_480, 84_934_656, 82_944)
CLIP_L_PROJECTED = ModuleSize(123_650_304, 85_524_480, 83_712)
OPEN_CLIP_H = ModuleSize(340_387_840, 289_406_976, 211_968)
OPEN_CLIP_BIG_G = ModuleSize(694_659_840, 630_784_000, 369_920)
T5_XXL = ModuleSize(4_762_310_656, 4_630_511_616, 983_040)
SD_VAE, FLOW_VAE = 83_653_863, 83_819_683

ARCHITECTURES: dict[str, Architecture] = {arch.name: arch for arch in (
    Architecture("sd15", "sd", 512, ModuleSize(859_520_964, 270_049_280, 234_880), (CLIP_L,), SD_VAE, 199_296, (73_728,),
                 UNET_BLOCKS, 96_000, 0),
    Architecture("sd21-v", "sd", 768, ModuleSize(865_910_724, 301_219_840, 259_840), (OPEN_CLIP_H,), SD_VAE, 207_488, (188_416,),
                 UNET_BLOCKS, 96_000, 0),
    Architecture("sdxl-base", "sdxl", 1024, ModuleSize(2_567_463_684, 2_232_647_680, 1_455_040), (CLIP_L, OPEN_CLIP_BIG_G), SD_VAE,
                 1_451_520, (67_584, 327_680), UNET_BLOCKS, 168_000, 0),
    Architecture("sd35-medium", "sd3", 1024, ModuleSize(2_243_171_520, 2_241_822_720, 1_241_152),
                 (CLIP_L_PROJECTED, OPEN_CLIP_BIG_G, T5_XXL), FLOW_VAE, 586_752, (73_728, 327_680, 0), ("JointTransformerBlock",),
                 156_672, 626_688),
    Architecture("sd35-large", "sd3", 1024, ModuleSize(8_056_627_520, 8_053_694_464, 2_765_248),
                 (CLIP_L_PROJECTED, OPEN_CLIP_BIG_G, T5_XXL), FLOW_VAE, 1_473_792, (73_728, 327_680, 0), ("JointTransformerBlock",),
                 392_768, 1_571_072),
    Architecture("flux1-dev", "flux", 1024, ModuleSize(11_901_408_320, 11_898_322_944, 3_065_920), (CLIP_L, T5_XXL), FLOW_VAE,
                 2_801_664, (73_728, 0), ("FluxTransformerBlock", "FluxSingleTransformerBlock"), 744_192, 2_976_768),
    Architecture("flux1-schnell", "flux", 1024, ModuleSize(11_891_178_560, 11_888_099_328, 3_059_776), (CLIP_L, T5_XXL), FLOW_VAE,
                 2_801_664, (73_728, 0), ("FluxTransformerBlock", "FluxSingleTransformerBlock"), 744_192, 2_976_768),
)}
ARCHITECTURE_NAMES = tuple(ARCHITECTURES)

# Published models by source (a revision after `@` does not change the architecture).
PUBLISHED_SOURCES = {
    "hf://stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "hf://runwayml/stable-diffusion-v1-5": "sd15",
    "hf://stabilityai/stable-diffusion-2-1": "sd21-v",
    "hf://stabilityai/stable-diffusion-xl-base-1.0": "sdxl-base",
    "hf://stabilityai/stable-diffusion-3.5-medium": "sd35-medium",
    "hf://stabilityai/stable-diffusion-3.5-large": "sd35-large",
    "hf://black-forest-labs/FLUX.1-dev": "flux1-dev",
    "hf://black-forest-labs/FLUX.1-schnell": "flux1-schnell",
}
# The native size of each family's models (a model of the family not listed above).
FAMILY_NATIVE_SIZE = {"sd": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}


def architecture_of(source: str, named: str | None = None) -> Architecture | None:
    """The published architecture a model source is (`named`: model.architecture), or None."""
    if named:
        return ARCHITECTURES[named]
    name = PUBLISHED_SOURCES.get(source.partition("@")[0])
    return ARCHITECTURES[name] if name else None
