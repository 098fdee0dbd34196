"""What a request may ask of the served model's family: sizes, guidance, negative prompts.

The family is the trainer's (`dreambooth_trainer.families`), read from the loaded pipeline's
class, which the loader picked from model_index.json: an exported folder serves as what it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .settings import MAX_SIDE

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
    pixel_multiple: int  # 8, or 16 for Flux and SD3 (2x2 latent patches of an 8x VAE)
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


def denoiser(pipeline: Any) -> Any:
    """The UNet or transformer: the model LoRA adapters attach to."""
    return getattr(pipeline, "unet", None) or pipeline.transformer


def served_family(pipeline: Any) -> ServedFamily:
    """The request rules of a loaded pipeline's family."""
    from dreambooth_trainer.families import family_of_pipeline

    family = family_of_pipeline(pipeline)
    flux = family.name == "flux"
    return ServedFamily(name=family.name, native_side=family.native_size(pipeline), pixel_multiple=pixel_multiple(pipeline, family.name),
                        negative_prompt=not flux, default_guidance=DEFAULT_GUIDANCE[family.name])


def pixel_multiple(pipeline: Any, family: str) -> int:
    """Flux: 16 (as admission checks data.resolution); SD3: the VAE's factor times the transformer's
    patch (16 for SD3 itself); SD and SDXL: 8."""
    if family == "flux":
        return 16
    if family == "sd3":
        return max(8, pipeline.vae_scale_factor * pipeline.transformer.config.patch_size)
    return 8
