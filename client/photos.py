"""Subject photos checked on this machine before anything is uploaded or created.

Every file in the folder must be a photo the trainer can read: a supported format that decodes to
the last byte, not tiny, not huge. Each bad file gets its own line naming it and the reason.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import ClientError

# What the trainer and the operator read (dreambooth_trainer.data, dreambooth_operator.store).
PHOTO_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp"}
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MIN_PHOTOS = 3
MAX_PHOTOS = 20
MAX_PHOTO_BYTES = 25 * 1024 * 1024
MAX_PHOTO_PIXELS = 50_000_000
# A photo upscaled more than twice to the training resolution trains a blurry subject.
MIN_SIDE_FRACTION = 0.5


@dataclass(frozen=True)
class Photo:
    path: Path
    format: str
    width: int
    height: int
    size: int

    @property
    def content_type(self) -> str:
        return PHOTO_FORMATS[self.format]


class PhotoProblems(ClientError):
    """One or more photos cannot be used; `problems` has one line per bad file."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def check_photos(folder: Path, resolution: int) -> list[Photo]:
    """The folder's photos, sorted by name; PhotoProblems listing every bad file otherwise."""
    if not folder.exists():
        raise PhotoProblems([f"{folder}: no such folder"])
    if not folder.is_dir():
        raise PhotoProblems([f"{folder}: not a folder (give the folder that holds the photos)"])
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    photos: list[Photo] = []
    problems: list[str] = []
    for path in files:
        try:
            photos.append(read_photo(path, resolution))
        except ValueError as error:
            problems.append(f"{path}: {error}")
    if problems:
        raise PhotoProblems(problems)
    if len(photos) < MIN_PHOTOS:
        found = "no photos" if not photos else f"only {len(photos)} photo{'s' if len(photos) > 1 else ''}"
        raise PhotoProblems([f"{folder}: {found} ({', '.join('*' + s for s in PHOTO_SUFFIXES)}); "
                             f"DreamBooth needs {MIN_PHOTOS}-{MAX_PHOTOS} photos of the subject"])
    if len(photos) > MAX_PHOTOS:
        raise PhotoProblems([f"{folder}: {len(photos)} photos; DreamBooth needs {MIN_PHOTOS}-{MAX_PHOTOS} (keep the best {MAX_PHOTOS})"])
    return photos


def read_photo(path: Path, resolution: int) -> Photo:
    """Decode the whole file; ValueError with the reason when it is not a usable photo."""
    from PIL import Image

    if path.suffix.lower() not in PHOTO_SUFFIXES:
        raise ValueError(f"not a photo (expected {', '.join(PHOTO_SUFFIXES)})")
    size = path.stat().st_size
    if size == 0:
        raise ValueError("empty file")
    if size > MAX_PHOTO_BYTES:
        raise ValueError(f"{size / 2**20:.0f} MiB is larger than {MAX_PHOTO_BYTES // 2**20} MiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decodes every byte: a truncated or corrupt file fails here
                kind, width, height = image.format or "", image.width, image.height
    except (OSError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"not a readable image ({_reason(error)})") from None
    if kind not in PHOTO_FORMATS:
        raise ValueError(f"{kind or 'unknown'} images are not supported (use {', '.join(PHOTO_FORMATS)})")
    if width * height > MAX_PHOTO_PIXELS:
        raise ValueError(f"{width}x{height} px is more than {MAX_PHOTO_PIXELS // 1_000_000} megapixels")
    smallest = int(resolution * MIN_SIDE_FRACTION)
    if min(width, height) < smallest:
        raise ValueError(f"{width}x{height} px is too small: at least {smallest} px on the shorter side "
                         f"for training at {resolution} px")
    return Photo(path=path, format=kind, width=width, height=height, size=size)


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].removesuffix(".")
