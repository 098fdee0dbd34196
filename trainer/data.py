"""Subject and class images: read from storage, checked, turned into deterministic batches.

The batch for micro-step m on rank r depends only on (seed, m, r), so a resumed run sees
exactly the batches an uninterrupted run would have seen: the data position is the step.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserInputError
from .storage import Storage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_images(storage: Storage, what: str) -> list[str]:
    """Image keys under a storage root, sorted; a clear error when there are none."""
    keys = [key for key in storage.list() if key.lower().endswith(IMAGE_SUFFIXES)]
    if not keys:
        raise UserInputError(f"{what} prefix {storage.describe()} holds no images ({' '.join(IMAGE_SUFFIXES)})")
    return keys


def decode_image(data: bytes, where: str, what: str = "image") -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        reason = str(error).split(" (")[0] or type(error).__name__
        raise UserInputError(f"{what} {where} is not a readable image ({reason})") from None
    return ImageOps.exif_transpose(image).convert("RGB")


def read_images(storage: Storage, keys: list[str], what: str) -> list[Image.Image]:
    return [decode_image(storage.read_bytes(key), storage.describe(key), what) for key in keys]


def resize_short_side(image: Image.Image, resolution: int) -> Image.Image:
    """Scale so the short side is `resolution` (done once per photo, at load)."""
    width, height = image.size
    scale = resolution / min(width, height)
    return image.resize((max(resolution, round(width * scale)), max(resolution, round(height * scale))), Image.BICUBIC)


def crop_to_pixels(image: Image.Image, resolution: int, center_crop: bool, flip: bool, crop_seed: int = 0) -> torch.Tensor:
    """Crop a resized photo square, maybe flip; CHW float in [-1, 1]."""
    width, height = image.size
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        rng = np.random.default_rng(crop_seed)
        left, top = int(rng.integers(0, width - resolution + 1)), int(rng.integers(0, height - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_pixels(image: Image.Image, resolution: int, center_crop: bool, flip: bool, crop_seed: int = 0) -> torch.Tensor:
    """Resize the short side to `resolution`, crop square, maybe flip; CHW float in [-1, 1]."""
    return crop_to_pixels(resize_short_side(image, resolution), resolution, center_crop, flip, crop_seed)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64), stable across processes and Python versions."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class Draw:
    """Which image (and flip) fills one slot of a batch."""

    index: int
    flip: bool
    crop_seed: int


def draw_indices(seed: int, stream: int, count: int, micro_step: int, rank: int, world: int, batch: int, random_flip: bool) -> list[Draw]:
    """Sample positions -> image indices: a fresh permutation per epoch of the image list."""
    draws = []
    for slot in range(batch):
        position = (micro_step * world + rank) * batch + slot
        epoch, offset = divmod(position, count)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(mix_seed(seed, stream, epoch)))
        slot_seed = mix_seed(seed, stream, position)
        flip = random_flip and slot_seed % 2 == 1
        draws.append(Draw(int(order[offset]), flip, slot_seed))
    return draws


def step_generator(seed: int, micro_step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The RNG for one micro-step's latent sampling, noise and timesteps, on the device that
    draws them (a host-drawn tensor copied to a GPU would make the host wait for the GPU)."""
    return torch.Generator(device).manual_seed(mix_seed(seed, 7, micro_step, rank))


@dataclass
class ImageSet:
    """Images of one kind (instance or class) with their prompt, ready to batch."""

    images: list[Image.Image]
    prompt: str


class PreparedImages:
    """An image set resized once at load. Center crops are cut (and flipped) once too; random
    crops are cut per draw from the resized photo."""

    def __init__(self, image_set: ImageSet, resolution: int, center_crop: bool, random_flip: bool):
        self.count = len(image_set.images)
        self.resolution, self.center_crop = resolution, center_crop
        self.resized = [resize_short_side(image, resolution) for image in image_set.images]
        self.crops: dict[tuple[int, bool], torch.Tensor] = {}
        if center_crop:
            for index, image in enumerate(self.resized):
                for flip in (False, True) if random_flip else (False,):
                    self.crops[(index, flip)] = crop_to_pixels(image, resolution, True, flip)

    def pixels(self, draw: Draw) -> torch.Tensor:
        if self.center_crop:
            return self.crops[(draw.index, draw.flip)]
        return crop_to_pixels(self.resized[draw.index], self.resolution, False, draw.flip, draw.crop_seed)


class DreamBoothBatches(torch.utils.data.IterableDataset):
    """Yields ready micro-batches for micro-steps [start, stop) of this rank, in order.

    Each batch: `pixels` (instance then class images) or, with cached latents, `latent_params`;
    `num_instance`; `prompt_kind` (0 instance, 1 class per row); `micro_step`. With N dataloader
    workers, worker w makes micro-steps start+w, start+w+N, ...; the DataLoader takes them round
    robin, so the sequence is the same for any N. It has no length on purpose: Lightning then
    never ends an "epoch" early on resume and restarts the sequence; max_steps ends the run.
    """

    def __init__(self, instance: ImageSet, klass: ImageSet | None, resolution: int, center_crop: bool, random_flip: bool,
                 batch_size: int, seed: int, rank: int, world: int, start: int, stop: int,
                 latent_cache: "LatentCache | None" = None):
        super().__init__()
        self.counts = [len(instance.images)] + ([len(klass.images)] if klass else [])
        self.random_flip = random_flip
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.start, self.stop = start, stop
        self.latent_cache = latent_cache
        self.prepared = [] if latent_cache is not None else [
            PreparedImages(image_set, resolution, center_crop, random_flip) for image_set in (instance, klass) if image_set]

    def batch_at(self, micro_step: int) -> dict[str, torch.Tensor | int]:
        rows: list[torch.Tensor] = []
        kinds: list[int] = []
        for stream, count in enumerate(self.counts):
            for draw in draw_indices(self.seed, stream, count, micro_step, self.rank, self.world, self.batch_size, self.random_flip):
                if self.latent_cache is not None:
                    rows.append(self.latent_cache.params(stream, draw.index, draw.flip))
                else:
                    rows.append(self.prepared[stream].pixels(draw))
                kinds.append(stream)
        key = "latent_params" if self.latent_cache is not None else "pixels"
        return {key: torch.stack(rows), "prompt_kind": torch.tensor(kinds), "num_instance": self.batch_size, "micro_step": micro_step}

    def micro_steps(self) -> range:
        """This process's share of [start, stop): all of it, or every N-th in worker w of N."""
        worker = torch.utils.data.get_worker_info()
        if worker is None:
            return range(self.start, self.stop)
        return range(self.start + worker.id, self.stop, worker.num_workers)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | int]]:
        for micro_step in self.micro_steps():
            yield self.batch_at(micro_step)


# log-variance standing for "no noise": a deterministic encoder's latents as a distribution.
DETERMINISTIC_LOGVAR = -30.0


def latent_distribution_params(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's latent distribution as (mean, logvar) stacked on channels. A KL autoencoder gives
    its Gaussian; a deterministic one (AutoencoderTiny) gives its latents with no variance."""
    encoded = vae.encode(pixels)
    if hasattr(encoded, "latent_dist"):
        return encoded.latent_dist.parameters
    return torch.cat([encoded.latents, torch.full_like(encoded.latents, DETERMINISTIC_LOGVAR)], dim=1)


class LatentCache:
    """VAE latent-distribution parameters per (kind, image, flip), computed once."""

    def __init__(self) -> None:
        self._params: dict[tuple[int, int, bool], torch.Tensor] = {}

    @torch.no_grad()
    def fill(self, vae: torch.nn.Module, image_sets: list[ImageSet | None], resolution: int, flips: tuple[bool, ...]) -> None:
        device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        for stream, image_set in enumerate(image_sets):
            if image_set is None:
                continue
            for index, image in enumerate(image_set.images):
                resized = resize_short_side(image, resolution)
                for flip in flips:
                    pixels = crop_to_pixels(resized, resolution, True, flip).unsqueeze(0).to(device, dtype)
                    self._params[(stream, index, flip)] = latent_distribution_params(vae, pixels)[0].float().cpu()

    def params(self, stream: int, index: int, flip: bool) -> torch.Tensor:
        return self._params[(stream, index, flip)]

    def __len__(self) -> int:
        return len(self._params)
