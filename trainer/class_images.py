"""Class (prior) images: reuse given ones, generate the rest once into a content-addressed cache.

Cache key = sha256 of (model, class prompt, resolution, sampler, steps, guidance, seed, count).
Image i is generated from seed + i, so which rank makes it does not change it; rank r makes
the missing images i with i % world == r, then every rank waits until all are present.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig
from .data import IMAGE_SUFFIXES, ImageSet, read_images
from .errors import UserInputError
from .storage import Storage, is_s3, open_storage, split_s3_uri

log = logging.getLogger(__name__)
COMPLETE_MARKER = "complete.json"


@dataclass
class ClassImages:
    image_set: ImageSet
    generated_here: int
    cache_uri: str | None


def class_cache_key(model: str, class_prompt: str, resolution: int, sampler: str, steps: int, guidance: float, seed: int, count: int) -> str:
    identity = {
        "model": model, "class_prompt": class_prompt, "resolution": resolution, "sampler": sampler,
        "steps": steps, "guidance": guidance, "seed": seed, "count": count,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def model_identity(cfg: TrainConfig, family: str | None = None) -> str:
    """What makes generated images differ between models: the family and the source (tiny models
    also differ by design, seed and size)."""
    from .families import TINY_SOURCES

    family = family or cfg.model.family
    quantized = f":quantize={cfg.model.quantize}" if cfg.model.quantize != "none" else ""  # an 8-bit base draws its own images
    if cfg.model.source in TINY_SOURCES:
        from .tiny import TINY_DESIGN  # the built-in model's design: a new one must not reuse old images

        return f"{family}:{cfg.model.source}:{TINY_DESIGN}:seed={cfg.training.seed}:size={cfg.model.tiny_resolution}{quantized}"
    return f"{family}:{cfg.model.source}{quantized}"


def default_cache_uri(cfg: TrainConfig) -> str:
    if cfg.prior.cache_uri:
        return cfg.prior.cache_uri
    if is_s3(cfg.output.uri):
        bucket, _ = split_s3_uri(cfg.output.uri)
        return f"s3://{bucket}/class-cache"
    root = os.environ.get("DREAMBOOTH_CACHE") or Path.home() / ".cache" / "dreambooth"
    return str(Path(root) / "class-cache")


def image_key(index: int) -> str:
    return f"{index:05d}.png"


def existing_class_images(cfg: TrainConfig) -> tuple[Storage | None, list[str]]:
    if not cfg.prior.class_uri:
        return None, []
    storage = open_storage(cfg.prior.class_uri)
    keys = [key for key in storage.list() if key.lower().endswith(IMAGE_SUFFIXES)]
    return storage, keys[: cfg.prior.num_class_images]


def class_sampler(cfg: TrainConfig, family: object) -> str | None:
    """prior.sampler, or the family's default: ddim for SD, the pipeline's own scheduler (None) otherwise."""
    return cfg.prior.sampler or ("ddim" if family.name == "sd" else None)


def class_guidance(cfg: TrainConfig, family: object) -> float:
    """prior.guidance_scale, or the family's pipeline default (Flux-dev: its distilled guidance 3.5)."""
    return family.default_guidance if cfg.prior.guidance_scale is None else cfg.prior.guidance_scale


def generate_share(pipeline: object, cache: Storage, cfg: TrainConfig, missing: list[int], rank: int, world: int) -> int:
    """Generate this rank's share of the missing cache images; returns how many it made."""
    from .families import family_of_pipeline
    from .generate import ImageRequest, generate_images, png_bytes

    family = family_of_pipeline(pipeline)

    mine = [index for index in missing if index % world == rank]
    batch = cfg.prior.sample_batch_size
    for start in range(0, len(mine), batch):
        indices = mine[start:start + batch]
        requests = [ImageRequest(cfg.prior.class_prompt or "", "", cfg.training.seed + index) for index in indices]
        images = generate_images(
            pipeline, requests, steps=cfg.prior.sample_steps, guidance=class_guidance(cfg, family),
            height=cfg.data.resolution, width=cfg.data.resolution, sampler=class_sampler(cfg, family),
        )
        for index, image in zip(indices, images):
            cache.write_bytes(image_key(index), png_bytes(image))
    return len(mine)


def wait_for_images(cache: Storage, count: int, timeout: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        present = {key for key in cache.list() if key.endswith(".png")}
        if all(image_key(i) in present for i in range(count)):
            return
        time.sleep(1.0)
    raise TimeoutError(f"class images in {cache.describe()} were not all generated within {timeout:.0f} s")


def ensure_class_images(cfg: TrainConfig, pipeline: object, rank: int = 0, world: int = 1) -> ClassImages:
    """Collect `num_class_images` class images, generating (split across ranks) what is missing."""
    wanted = cfg.prior.num_class_images
    given_storage, given_keys = existing_class_images(cfg)
    images = read_images(given_storage, given_keys, "class image") if given_storage else []
    missing_count = wanted - len(images)
    if missing_count <= 0:
        return ClassImages(ImageSet(images, cfg.prior.class_prompt or ""), 0, None)
    from .families import family_of_pipeline

    family = family_of_pipeline(pipeline)
    key = class_cache_key(
        model_identity(cfg, family.name), cfg.prior.class_prompt or "", cfg.data.resolution, class_sampler(cfg, family) or "pipeline",
        cfg.prior.sample_steps, class_guidance(cfg, family), cfg.training.seed, missing_count,
    )
    cache = open_storage(f"{default_cache_uri(cfg).rstrip('/')}/{key}")
    generated = 0
    if not cache.exists(COMPLETE_MARKER):
        present = set(cache.list())
        missing = [i for i in range(missing_count) if image_key(i) not in present]
        log.info("class images", extra={"cache": cache.describe(), "missing": len(missing), "rank": rank})
        generated = generate_share(pipeline, cache, cfg, missing, rank, world)
        wait_for_images(cache, missing_count)
        if rank == 0:
            cache.write_text(COMPLETE_MARKER, json.dumps({"count": missing_count, "class_prompt": cfg.prior.class_prompt}))
    cached = read_images(cache, [image_key(i) for i in range(missing_count)], "cached class image")
    if not cached and not images:
        raise UserInputError("no class images available")
    return ClassImages(ImageSet(images + cached, cfg.prior.class_prompt or ""), generated, cache.describe())
