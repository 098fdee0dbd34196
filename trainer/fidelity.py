"""Subject fidelity: how close generated images are to the subject's photos.

Two forms, both "to the nearest subject photo", averaged over the generated images:
- `pixel_distance`: root-mean-square difference of pixels in [0, 1] at the training resolution
  (lower is closer). Needs nothing but the photos; the tiny models' tests and demo use it.
- `embedding_similarity`: cosine similarity of image embeddings from a vision model the job names
  (`validation.fidelity_model`, a CLIP or DINO checkpoint; higher is closer), as DreamBooth
  papers report CLIP-I and DINO scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import to_pixels


def as_unit_pixels(image: Image.Image, resolution: int) -> np.ndarray:
    """An image as HWC floats in [0, 1] at `resolution`, cropped the way training crops photos."""
    pixels = to_pixels(image, resolution, center_crop=True, flip=False)
    return ((pixels.permute(1, 2, 0).numpy() + 1.0) / 2.0).astype(np.float32)


def pixel_distance(images: list[Image.Image], subject: list[Image.Image], resolution: int) -> float:
    """Mean over `images` of the RMS pixel distance to the nearest subject photo."""
    photos = [as_unit_pixels(photo, resolution) for photo in subject]
    distances = []
    for image in images:
        generated = as_unit_pixels(image, resolution)
        distances.append(min(float(np.sqrt(np.mean((generated - photo) ** 2))) for photo in photos))
    return float(np.mean(distances))


@dataclass
class EmbeddingModel:
    """A vision model and its image processor, loaded once per run."""

    model: Any
    processor: Any

    @classmethod
    def load(cls, path: str) -> "EmbeddingModel":
        from transformers import AutoImageProcessor, AutoModel

        model = AutoModel.from_pretrained(path)
        return cls(model.eval(), AutoImageProcessor.from_pretrained(path))

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=images, return_tensors="pt")
        device = next(self.model.parameters()).device
        pixel_values = inputs["pixel_values"].to(device)
        if hasattr(self.model, "get_image_features"):
            features = self.model.get_image_features(pixel_values=pixel_values)
        else:
            output = self.model(pixel_values=pixel_values)
            features = output.pooler_output if getattr(output, "pooler_output", None) is not None else output.last_hidden_state[:, 0]
        if not torch.is_tensor(features):  # some models return an output object here
            features = features.pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


def embedding_similarity(model: EmbeddingModel, images: list[Image.Image], subject: list[Image.Image]) -> float:
    """Mean over `images` of the cosine similarity to the nearest subject photo."""
    similarity = model.embed(images) @ model.embed(subject).T
    return float(similarity.max(dim=1).values.mean())
