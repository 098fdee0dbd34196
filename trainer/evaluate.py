"""`dreambooth eval`: the fidelity scores of any model folder against subject photos, as the
DreamBooth paper's Table 1 lays them out, so our output compares with another trainer's.

The protocol is the trainer's (trainer/fidelity.py): each prompt of the set drawn with seeds
seed .. seed+n-1, DINO and CLIP-I the mean over every (generated, photo) pair, CLIP-T each image
against its prompt without the identifier token; the "real images" row is the photos against each
other. Printed beside the paper's published rows, with the backbones each figure needs to match.
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from .fidelity import Backbones, PromptSet, real_image_scores, subject_scores
from .generate import ImageRequest, generate_images

# The DreamBooth paper's Table 1 (Stable Diffusion; 30 subjects x 25 prompts x 4 images; DINO
# ViT-S/16, CLIP ViT-B/32). Only comparable with figures of those backbones and that protocol.
PAPER_ROWS = (("DreamBooth (Stable Diffusion), paper", {"fidelity/dino": 0.668, "fidelity/clip_i": 0.803, "fidelity/clip_t": 0.305}),
              ("Real images, paper", {"fidelity/dino": 0.774, "fidelity/clip_i": 0.885}))
TABLE_COLUMNS = (("fidelity/dino", "DINO"), ("fidelity/clip_i", "CLIP-I"), ("fidelity/clip_t", "CLIP-T"))


@dataclass(frozen=True)
class EvalSettings:
    steps: int = 25
    guidance: float | None = None  # None: the family's pipeline default
    images_per_prompt: int = 4
    seed: int = 0
    resolution: int | None = None


def draw_prompt_set(pipeline: object, prompts: PromptSet, settings: EvalSettings, batch: int = 8) -> list[Image.Image]:
    requests = [ImageRequest(prompt, "", settings.seed + i) for prompt in prompts.prompts for i in range(settings.images_per_prompt)]
    images: list[Image.Image] = []
    for start in range(0, len(requests), batch):
        images += generate_images(pipeline, requests[start:start + batch], steps=settings.steps, guidance=settings.guidance,
                                  height=settings.resolution, width=settings.resolution)
    return images


def evaluate(pipeline: object, backbones: Backbones, photos: list[Image.Image], prompts: PromptSet,
             settings: EvalSettings) -> tuple[dict[str, float], dict[str, float]]:
    """(the model's scores, the real images' row) for `pipeline` on `prompts`."""
    images = draw_prompt_set(pipeline, prompts, settings)
    texts = [text for text in prompts.texts for _ in range(settings.images_per_prompt)]
    return subject_scores(backbones, images, texts, photos, []), real_image_scores(backbones, photos)


def paper_table(label: str, scores: dict[str, float], real: dict[str, float]) -> str:
    """A plain-text table: this model, the photos' own row, then the paper's rows."""
    rows = [(label, scores), ("Real images (these photos)", real), *PAPER_ROWS]
    width = max(len(name) for name, _ in rows)
    head = f"{'':<{width}}  " + "  ".join(f"{title:>6}" for _, title in TABLE_COLUMNS)
    lines = [head]
    for name, figures in rows:
        cells = [f"{figures[key]:6.3f}" if figures.get(key) is not None else f"{'-':>6}" for key, _ in TABLE_COLUMNS]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)
