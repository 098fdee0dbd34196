"""What a request may ask of the served model's family: sizes, guidance, negative prompts.

The family is read from the loaded pipeline's class (what `DiffusionPipeline.from_pretrained`
picked from model_index.json), so an exported folder serves as whatever it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .settings import MAX_SIDE

# Pipeline class name -> family (the trainer's `model.family` names).
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
# Sizes above the native one up to this factor are allowed (SD 1.5: 1024 for a 512 model).
MAX_SIDE_FACTOR = 2
# Diffusers' default guidance per family (Flux's is the distilled guidance of FLUX.1-dev).
DEFAULT_GUIDANCE = {"sd": 7.5, "sdxl": 5.0, "sd3": 7.0, "flux": 3.5}


class UnsupportedRequest(ValueError):
    """A request field the served family cannot honour; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ServedFamily:
    name: str
    native_side: int  # default width and height in pixels
    pixel_multiple: int  # 8, or 16 for Flux (2x2 latent patches of an 8x VAE)
    negative_prompt: bool  # Flux-dev has distilled guidance: one forward per step, nothing to subtract
    default_guidance: float

    @property
    def max_side(self) -> int:
        return min(MAX_SIDE, max(1024, MAX_SIDE_FACTOR * self.native_side))

    def check(self, width: int | None, height: int | None, negative_prompt: str, size_field: str | None = None) -> None:
        """Refuse what this family cannot draw, naming the request field."""
        for field, side in (("width", width), ("height", height)):
            if side is None:
                continue
            if side % self.pixel_multiple or side > self.max_side:
                raise UnsupportedRequest(size_field or field, (
                    f"{size_field or field}: {side} px is not supported by this {self.name} model: sides are multiples of "
                    f"{self.pixel_multiple} up to {self.max_side} (native {self.native_side})"))
        if negative_prompt and not self.negative_prompt:
            raise UnsupportedRequest("negative_prompt", f"negative_prompt: a {self.name} model takes no negative prompt "
                                                        "(its guidance is distilled into the model)")


def family_name(pipeline: Any) -> str:
    name = PIPELINE_FAMILIES.get(type(pipeline).__name__)
    if name is None:
        raise ValueError(f"cannot serve a {type(pipeline).__name__}: the server knows {', '.join(PIPELINE_FAMILIES.values())}")
    return name


def denoiser(pipeline: Any) -> Any:
    """The UNet or transformer: the model LoRA adapters attach to."""
    return getattr(pipeline, "unet", None) or pipeline.transformer


def native_side(pipeline: Any, tiny_side: int | None = None) -> int:
    """The size the model was made for: its sample size in latents times the VAE's factor.
    Flux's transformer has none: a built-in tiny model's `tiny_side`, else the pipeline's
    default (1024 px for FLUX.1)."""
    sample_size = getattr(denoiser(pipeline).config, "sample_size", None)
    if sample_size is None and tiny_side:
        return tiny_side
    if sample_size is None:
        sample_size = getattr(pipeline, "default_sample_size", 128)
    return int(sample_size) * pipeline.vae_scale_factor


def served_family(pipeline: Any, tiny_side: int | None = None) -> ServedFamily:
    """The family facts of a loaded pipeline (`tiny_side`: see `native_side`)."""
    name = family_name(pipeline)
    side = native_side(pipeline, tiny_side)
    flux = name == "flux"
    return ServedFamily(name=name, native_side=side, pixel_multiple=16 if flux else 8,
                        negative_prompt=not flux, default_guidance=DEFAULT_GUIDANCE[name])
