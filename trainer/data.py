"""Subject and class images: read from storage, checked, turned into deterministic batches.

The batch for micro-step m on rank r depends only on (seed, m, r), so a resumed run sees
exactly the batches an uninterrupted run would have seen: the data position is the step.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .buckets import Size, bucket_batch_indices, nearest_bucket
from .captions import prompt_table, read_caption_prompts
from .errors import UserInputError
from .storage import Storage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_images(storage: Storage, what: str, listing: list[str] | None = None) -> list[str]:
    """Image keys under a storage root (or in its `listing`), sorted; a clear error when there are none."""
    keys = [key for key in (storage.list() if listing is None else listing) if key.lower().endswith(IMAGE_SUFFIXES)]
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


def load_instance_images(storage: Storage, instance_prompt: str, token: str, caption_template: str | None) -> "ImageSet":
    """The subject's photos with their caption prompts (`photo.txt` beside `photo.jpg`), one listing."""
    listing = storage.list()
    keys = list_images(storage, "instance image", listing)
    captions = read_caption_prompts(storage, keys, listing, token, caption_template)
    return ImageSet(read_images(storage, keys, "instance image"), instance_prompt, captions)


def resize_to_cover(image: Image.Image, size: Size) -> Image.Image:
    """Scale so the photo just covers `size` (height, width): done once per photo and size, at load."""
    height, width = size
    scale = max(width / image.width, height / image.height)
    return image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC)


def crop_origin(image_size: tuple[int, int], size: Size, center_crop: bool, crop_seed: int = 0) -> tuple[int, int]:
    """(top, left) of a `size` crop in a photo of `image_size` (width, height): centered or seeded."""
    (width, height), (crop_height, crop_width) = image_size, size
    if center_crop:
        return (height - crop_height) // 2, (width - crop_width) // 2
    rng = np.random.default_rng(crop_seed)
    left = int(rng.integers(0, width - crop_width + 1))
    return int(rng.integers(0, height - crop_height + 1)), left


def pixels_at(image: Image.Image, origin: tuple[int, int], size: Size, flip: bool) -> torch.Tensor:
    """The `size` (height, width) crop at `origin` (top, left), maybe flipped; CHW float in [-1, 1]."""
    top, left = origin
    image = image.crop((left, top, left + size[1], top + size[0]))
    if flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_pixels(image: Image.Image, resolution: int, center_crop: bool, flip: bool, crop_seed: int = 0) -> torch.Tensor:
    """Resize so the short side is `resolution`, crop square, maybe flip; CHW float in [-1, 1]."""
    size = (resolution, resolution)
    resized = resize_to_cover(image, size)
    return pixels_at(resized, crop_origin(resized.size, size, center_crop, crop_seed), size, flip)


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


def prompt_slot(prompts: list[str], prompt: str) -> int:
    """The index of `prompt` in the prompt table, appended when missing."""
    if prompt not in prompts:
        prompts.append(prompt)
    return prompts.index(prompt)


def drop_captions(indices: list[int], empty: int, chance: float, seed: int, micro_step: int, rank: int) -> list[int]:
    """Each row's prompt index, replaced by `empty` with probability `chance`: a draw of its own
    from (seed, micro_step, rank), so it does not move any other random stream."""
    generator = torch.Generator().manual_seed(mix_seed(seed, 11, micro_step, rank))
    dropped = torch.rand(len(indices), generator=generator) < chance
    return [empty if drop else index for index, drop in zip(indices, dropped.tolist())]


@dataclass
class ImageSet:
    """Images of one kind (instance or class) with their prompt, ready to batch; `image_prompts`
    holds a photo's own prompt (from its caption) or None where it uses `prompt`."""

    images: list[Image.Image]
    prompt: str
    image_prompts: list[str | None] | None = None


@dataclass(frozen=True)
class Example:
    """One row of a batch: pixels (or cached latent parameters) and where they were cut from:
    the photo's (height, width) and the crop's (top, left) in the resized (maybe flipped) photo."""

    tensor: torch.Tensor
    original_size: Size
    crop_top_left: tuple[int, int]


def cut_example(resized: Image.Image, original: Size, size: Size, center_crop: bool, flip: bool, crop_seed: int) -> Example:
    top, left = crop_origin(resized.size, size, center_crop, crop_seed)
    pixels = pixels_at(resized, (top, left), size, flip)
    if flip:  # the crop's left edge as the model sees the mirrored photo
        left = resized.width - left - size[1]
    return Example(pixels, original, (top, left))


class ImageLayout:
    """The size each image is cut to: square at `resolution`, or with buckets each instance photo
    at its nearest bucket and each class image at every bucket an instance photo uses (a class row
    joins the instance rows of its micro-batch, so it is cut to their bucket: one UNet call)."""

    def __init__(self, instance: ImageSet, klass: ImageSet | None, resolution: int, buckets: list[Size] | None = None):
        self.bucketed = buckets is not None
        if buckets is None:
            self.instance_sizes = [(resolution, resolution)] * len(instance.images)
        else:
            self.instance_sizes = [nearest_bucket((image.height, image.width), buckets) for image in instance.images]
        used = tuple(sorted(set(self.instance_sizes)))
        self.per_stream = [[(size,) for size in self.instance_sizes]] + ([[used] * len(klass.images)] if klass else [])
        # Each photo's bucket as a number, in sorted bucket order: the sampler groups by it.
        self.instance_buckets = tuple(used.index(size) for size in self.instance_sizes)


class PreparedImages:
    """An image set resized once at load to each size it is cut to. Center crops are cut (and
    flipped) once too; random crops are cut per draw from the resized photo."""

    def __init__(self, image_set: ImageSet, sizes: list[tuple[Size, ...]], center_crop: bool, random_flip: bool):
        self.count = len(image_set.images)
        self.center_crop = center_crop
        self.originals = [(image.height, image.width) for image in image_set.images]
        self.resized = {(index, size): resize_to_cover(image, size)
                        for index, image in enumerate(image_set.images) for size in sizes[index]}
        self.cuts: dict[tuple[int, Size, bool], Example] = {}
        if center_crop:
            for (index, size) in self.resized:
                for flip in (False, True) if random_flip else (False,):
                    self.cuts[(index, size, flip)] = self._cut(index, size, flip, 0)

    def _cut(self, index: int, size: Size, flip: bool, crop_seed: int) -> Example:
        return cut_example(self.resized[(index, size)], self.originals[index], size, self.center_crop, flip, crop_seed)

    def example(self, draw: Draw, size: Size) -> Example:
        if self.center_crop:
            return self.cuts[(draw.index, size, draw.flip)]
        return self._cut(draw.index, size, draw.flip, draw.crop_seed)


class DreamBoothBatches(torch.utils.data.IterableDataset):
    """Yields ready micro-batches for micro-steps [start, stop) of this rank, in order.

    Each batch: `pixels` (instance then class images) or, with cached latents, `latent_params`;
    `num_instance`; `prompt_kind` (0 instance, 1 class per row); `prompt_index` (per row, into
    `self.prompts`: instance_prompt, class_prompt, then captions); `original_size` and
    `crop_top_left` ([B, 2]: height/width, top/left; SDXL's time ids); `micro_step`. With
    `buckets`, a batch's instance photos share one bucket and its class rows are cut to it.
    With N dataloader workers, worker w makes micro-steps start+w, start+w+N, ...; the DataLoader
    takes them round robin, so the sequence is the same for any N. It has no length on purpose:
    Lightning then never ends an "epoch" early on resume and restarts the sequence; max_steps ends the run.
    """

    def __init__(self, instance: ImageSet, klass: ImageSet | None, resolution: int, center_crop: bool, random_flip: bool,
                 batch_size: int, seed: int, rank: int, world: int, start: int, stop: int,
                 latent_cache: "LatentCache | None" = None, buckets: list[Size] | None = None,
                 caption_dropout: float = 0.0):
        super().__init__()
        self.counts = [len(instance.images)] + ([len(klass.images)] if klass else [])
        self.random_flip = random_flip
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.start, self.stop = start, stop
        self.latent_cache = latent_cache
        self.layout = ImageLayout(instance, klass, resolution, buckets)
        self.prompts, instance_prompts = prompt_table(instance.prompt, klass.prompt if klass else "",
                                                      instance.image_prompts or [None] * len(instance.images))
        self.prompt_indices = [instance_prompts] + ([[1] * len(klass.images)] if klass else [])
        self.caption_dropout = caption_dropout
        self.empty_prompt = prompt_slot(self.prompts, "") if caption_dropout > 0 else None
        self.prepared = [] if latent_cache is not None else [
            PreparedImages(image_set, sizes, center_crop, random_flip)
            for image_set, sizes in zip((instance, klass), self.layout.per_stream) if image_set]

    def draws(self, stream: int, micro_step: int) -> list[Draw]:
        if stream > 0 or not self.layout.bucketed:
            return draw_indices(self.seed, stream, self.counts[stream], micro_step, self.rank, self.world, self.batch_size, self.random_flip)
        indices = bucket_batch_indices(self.seed, stream, self.layout.instance_buckets, micro_step, self.rank, self.world, self.batch_size)
        return [replace(draw, index=index) for draw, index in zip(self.slot_draws(micro_step), indices)]

    def slot_draws(self, micro_step: int) -> list[Draw]:
        """Flips and crop seeds of the instance slots (the image index comes from the bucket sampler)."""
        return draw_indices(self.seed, 0, 1, micro_step, self.rank, self.world, self.batch_size, self.random_flip)

    def batch_at(self, micro_step: int) -> dict[str, torch.Tensor | int]:
        examples: list[Example] = []
        kinds: list[int] = []
        prompts: list[int] = []
        size: Size | None = None
        for stream in range(len(self.counts)):
            for draw in self.draws(stream, micro_step):
                size = size or self.layout.instance_sizes[draw.index]
                if self.latent_cache is not None:
                    examples.append(self.latent_cache.example(stream, draw, size))
                else:
                    examples.append(self.prepared[stream].example(draw, size))
                kinds.append(stream)
                prompts.append(self.prompt_indices[stream][draw.index])
        if self.empty_prompt is not None:
            prompts = drop_captions(prompts, self.empty_prompt, self.caption_dropout, self.seed, micro_step, self.rank)
        key = "latent_params" if self.latent_cache is not None else "pixels"
        return {key: torch.stack([example.tensor for example in examples]), "prompt_kind": torch.tensor(kinds),
                "prompt_index": torch.tensor(prompts), "num_instance": self.batch_size, "micro_step": micro_step,
                "original_size": torch.tensor([example.original_size for example in examples]),
                "crop_top_left": torch.tensor([example.crop_top_left for example in examples])}

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
    its Gaussian; a deterministic one (AutoencoderTiny) gives its latents with no variance. The VAE
    runs in its own dtype, outside autocast (SDXL's and SD3's are kept in fp32: NaN in fp16)."""
    with torch.autocast(pixels.device.type, enabled=False):
        encoded = vae.encode(pixels)
    if hasattr(encoded, "latent_dist"):
        return encoded.latent_dist.parameters
    return torch.cat([encoded.latents, torch.full_like(encoded.latents, DETERMINISTIC_LOGVAR)], dim=1)


class LatentCache:
    """VAE latent-distribution parameters per (kind, image, size, flip), computed once; with
    buckets the entries differ in shape (each photo at its bucket, class images at each bucket)."""

    def __init__(self) -> None:
        self._examples: dict[tuple[int, int, Size, bool], Example] = {}

    @torch.no_grad()
    def fill(self, vae: torch.nn.Module, image_sets: list[ImageSet | None], resolution: int, flips: tuple[bool, ...],
             buckets: list[Size] | None = None) -> None:
        device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        instance, klass = image_sets[0], image_sets[1] if len(image_sets) > 1 else None
        layout = ImageLayout(instance, klass, resolution, buckets)
        for stream, (image_set, sizes) in enumerate(zip((instance, klass), layout.per_stream)):
            for index, image in enumerate(image_set.images):
                for size in sizes[index]:
                    resized = resize_to_cover(image, size)
                    for flip in flips:
                        example = cut_example(resized, (image.height, image.width), size, True, flip, 0)
                        params = latent_distribution_params(vae, example.tensor.unsqueeze(0).to(device, dtype))[0].float().cpu()
                        self._examples[(stream, index, size, flip)] = replace(example, tensor=params)

    def example(self, stream: int, draw: Draw, size: Size) -> Example:
        return self._examples[(stream, draw.index, size, draw.flip)]

    def __len__(self) -> int:
        return len(self._examples)
