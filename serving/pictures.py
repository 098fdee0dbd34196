"""The pictures an edit starts from: decoded, bounded, turned upright, brought to the size drawn,
and the mask turned into diffusers' convention (white: paint here) from OpenAI's (transparent)."""
from __future__ import annotations

import io
import warnings
from typing import Any

from .drawing import EditInput
from .family import ServedFamily

MAX_INPUT_PIXELS = 40_000_000
DEFAULT_STRENGTH = {"edit": 0.8, "inpaint": 1.0}


class PictureError(ValueError):
    """An uploaded image or mask cannot be used; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def open_picture(data: bytes, field: str) -> Any:
    """The decoded image, upright (EXIF orientation applied); PictureError when it is none."""
    from PIL import Image, ImageOps

    if not data:
        raise PictureError(field, f"{field}: the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data))
            if picture.width * picture.height > MAX_INPUT_PIXELS:
                raise PictureError(field, f"{field}: {picture.width}x{picture.height} px is more than {MAX_INPUT_PIXELS // 1_000_000} megapixels")
            picture.load()
    except PictureError:
        raise
    except Exception as error:  # PIL raises many kinds for a file that is not an image
        raise PictureError(field, f"{field}: not a readable image ({type(error).__name__})") from None
    return ImageOps.exif_transpose(picture)


def has_alpha(picture: Any) -> bool:
    return picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info)


def paint_mask(picture: Any) -> Any:
    """White where to paint: the fully transparent pixels of a mask with alpha (OpenAI's rule),
    else the mask's own light pixels (diffusers' rule)."""
    if has_alpha(picture):
        alpha = picture.convert("RGBA").getchannel("A")
        return alpha.point(lambda value: 255 if value == 0 else 0)
    return picture.convert("L")


def auto_sides(width: int, height: int, family: ServedFamily) -> tuple[int, int]:
    """The picture's own size, scaled down to the family's largest side, in its pixel multiple."""
    scale = min(1.0, family.max_side / max(width, height))
    step = family.pixel_multiple
    return (max(step, int(width * scale) // step * step), max(step, int(height * scale) // step * step))


def edit_input(image_data: bytes, mask_data: bytes | None, requested: tuple[int | None, int | None], count: int,
               strength: float | None, family: ServedFamily) -> tuple[EditInput, tuple[int, int]]:
    """What `count` edits of the image start from, and the size they are drawn at. Without a mask,
    an image with fully transparent pixels is inpainted there; else it is redrawn whole (img2img)."""
    from PIL import Image

    image = open_picture(image_data, "image")
    mask = None
    if mask_data is not None:
        given = open_picture(mask_data, "mask")
        if given.size != image.size:
            raise PictureError("mask", f"mask: {given.width}x{given.height} px is not the image's size ({image.width}x{image.height})")
        mask = paint_mask(given)
    elif has_alpha(image) and image.convert("RGBA").getchannel("A").getextrema()[0] == 0:
        mask = paint_mask(image)
    width, height = requested
    if width is None or height is None:
        width, height = auto_sides(image.width, image.height, family)
    picture = image.convert("RGB").resize((width, height), Image.LANCZOS)
    masks = None if mask is None else [mask.resize((width, height), Image.NEAREST)] * count
    kind = "edit" if mask is None else "inpaint"
    return EditInput([picture] * count, masks, DEFAULT_STRENGTH[kind] if strength is None else strength), (width, height)
