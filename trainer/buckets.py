"""Aspect-ratio buckets (kohya-style): photos keep their shape, each batch comes from one bucket.

Buckets have about `resolution`² pixels and sides that are multiples of a step. The batches of
one pass over the photos are a pure function of (seed, pass), so the batch of micro-step m on
rank r depends only on (seed, m, r, world size): resume and dataloader workers change nothing.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from .errors import UserInputError

Size = tuple[int, int]  # (height, width) in pixels


def make_buckets(resolution: int, step: int, pixel_multiple: int = 8) -> list[Size]:
    """Every (height, width) with sides in [resolution/2, 2·resolution], multiples of `step`, the
    longest height for each width within resolution², plus the square; sorted by width/height.
    `pixel_multiple` is what the model's latents need (8 for SD-like VAEs, 16 for Flux)."""
    if step % pixel_multiple:
        raise UserInputError(f"data.bucket_step {step} must be a multiple of {pixel_multiple}, the pixel multiple this model needs")
    if resolution < step:
        raise UserInputError(f"data.bucket_step {step} must not exceed data.resolution {resolution}")
    area = resolution * resolution
    low, high = max(step, resolution // 2 // step * step), resolution * 2 // step * step
    square = resolution // step * step
    buckets = {(square, square)}
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            buckets.update({(height, width), (width, height)})
    return sorted(buckets, key=lambda size: (size[1] / size[0], size))


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is closest to the photo's (in log ratio; the first on a tie)."""
    ratio = math.log(size[1] / size[0])
    return min(buckets, key=lambda bucket: abs(math.log(bucket[1] / bucket[0]) - ratio))


@lru_cache(maxsize=64)
def pass_batches(seed: int, stream: int, image_buckets: tuple[int, ...], batch: int, epoch: int) -> tuple[tuple[int, ...], ...]:
    """One pass over the photos as batches: each bucket's photos shuffled and cut into batches
    (a bucket's last batch is topped up from its own start), then the batches shuffled."""
    from .data import mix_seed

    batches: list[tuple[int, ...]] = []
    for bucket in sorted(set(image_buckets)):
        members = [index for index, own in enumerate(image_buckets) if own == bucket]
        order = torch.randperm(len(members), generator=torch.Generator().manual_seed(mix_seed(seed, stream, epoch, bucket + 1)))
        shuffled = [members[int(position)] for position in order]
        padded = [shuffled[k % len(shuffled)] for k in range(-(-len(shuffled) // batch) * batch)]
        batches.extend(tuple(padded[k:k + batch]) for k in range(0, len(padded), batch))
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(mix_seed(seed, stream, epoch)))
    return tuple(batches[int(position)] for position in order)


def bucket_batch_indices(seed: int, stream: int, image_buckets: tuple[int, ...], micro_step: int, rank: int, world: int,
                         batch: int) -> tuple[int, ...]:
    """The photos of micro-step m on rank r: the (m·world + r)-th batch of the passes in order."""
    per_pass = sum(-(-image_buckets.count(bucket) // batch) for bucket in set(image_buckets))
    epoch, offset = divmod(micro_step * world + rank, per_pass)
    return pass_batches(seed, stream, image_buckets, batch, epoch)[offset]
